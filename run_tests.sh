#!/usr/bin/env bash
# Command 2 of 2 (README), also what CI runs: set up .venv (scripts/setup_env.sh) with the test
# tools, install Debian's chromium + chromium-driver for the dashboard's browser test when missing
# (needs root or sudo; nothing is downloaded at test time), then run pytest.
# Extra arguments go to pytest: bash run_tests.sh -q tests/test_api.py ; bash run_tests.sh -m unit
# (without them: everything but the ray lane, then the ray lane)
set -euo pipefail
cd "$(dirname "$0")"

. scripts/setup_env.sh requirements-dev.txt
# tinker-cookbook for tests/test_cookbook.py (the cookbook lane), without its declared dependencies
# (see requirements-cookbook.txt)
python -c "import tinker_cookbook" 2>/dev/null || _pip --no-deps -r requirements-cookbook.txt
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if [ "$#" -gt 0 ]; then
    exec python -m pytest "$@"
fi
# The ray lane (EXECUTOR=ray on a local Ray cluster its tests start and stop) runs in a pytest
# of its own after the rest, so its cluster never shares a run with them and its time shows apart.
status=0
python -m pytest -m "not ray" || status=$?
python -m pytest -m ray || status=$?
exit "$status"
