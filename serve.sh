#!/usr/bin/env bash
# Command 1 of 2 (README): set up .venv on first use (CPU or CUDA torch, see scripts/setup_env.sh),
# then run the server. Settings come from the environment (BASE_MODEL, PORT, ...; docs/configuration.md).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/setup_env.sh requirements.txt
exec python app.py "$@"
