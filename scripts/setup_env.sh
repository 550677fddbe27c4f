# Sourced by serve.sh and run_tests.sh: create the virtual environment (.venv, or $THINKER_VENV)
# once, install torch for this machine, then the pinned requirements, and activate it.
#
# torch first, on purpose: PyPI's Linux torch wheel depends on ~2.7 GB of CUDA libraries. On a
# machine without an NVIDIA GPU we install the CPU build (torch==X+cpu) instead: from what pip
# already finds (a local wheel or mirror), else from PyTorch's CPU index. TORCH_BUILD=cpu|cuda
# overrides the detection. The requirements then see torch satisfied and download no CUDA.
# Extra arguments: requirement files to install (default: requirements.txt).

THINKER_VENV="${THINKER_VENV:-.venv}"
TORCH_VERSION="$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements.txt)"
_pip() {  # (this machine's pip configuration may warn about missing local mirrors: not ours to show)
    python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}

if [ ! -x "$THINKER_VENV/bin/python" ]; then
    echo "setup: creating the virtual environment $THINKER_VENV" >&2
    python3 -m venv "$THINKER_VENV"
fi
# shellcheck disable=SC1091
. "$THINKER_VENV/bin/activate"

if ! python -c "import torch" 2>/dev/null; then
    build="${TORCH_BUILD:-}"
    if [ -z "$build" ]; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then build=cuda; else build=cpu; fi
    fi
    echo "setup: installing torch $TORCH_VERSION ($build build)" >&2
    if [ "$build" = cpu ]; then
        _pip "torch==$TORCH_VERSION+cpu" 2>/dev/null \
            || _pip "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    else
        _pip "torch==$TORCH_VERSION"
    fi
fi
requirement_files=("$@")
[ ${#requirement_files[@]} -eq 0 ] && requirement_files=(requirements.txt)
for file in "${requirement_files[@]}"; do
    _pip -r "$file"
done
# The package itself, editable: `import thinker` from anywhere, and the thinker-server and
# thinker-keys commands (its dependencies are the requirements just installed).
if ! python -c "import importlib.metadata as m; m.distribution('thinker')" 2>/dev/null; then
    _pip --no-deps -e .
fi
