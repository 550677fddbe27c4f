#!/usr/bin/env bash
# The test command (README, .ci/run): install the test tools, then run pytest.
# The dashboard's browser test drives Debian's Chromium through the chromedriver built with it
# (same version; nothing is downloaded at test time): installed here when missing (needs root
# or sudo). Extra arguments go to pytest: bash run_tests.sh -q tests/test_api.py
set -euo pipefail
cd "$(dirname "$0")"

python3 -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
python3 -m pytest "$@"
