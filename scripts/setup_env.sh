#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install worldserve with everything it needs.
# Without an NVIDIA GPU it installs the CPU build of PyTorch 2.13.0 and faiss-cpu; with one, the CUDA build and
# faiss-gpu. Safe to rerun: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    accel=gpu
else
    accel=cpu
fi

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if [ "$accel" = gpu ]; then
        pip install "torch==$TORCH_VERSION"
    else
        # A local wheel or mirror may carry the CPU build under its local version; otherwise PyTorch's CPU index.
        pip install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
            || pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
fi

pip install -e ".[$accel,dev]"

# The browser client's one dependency (msgpack) comes from the npm registry, pinned by client/web/package-lock.json;
# the server serves it from client/web/node_modules (no CDN: the machine may be offline).
if command -v npm >/dev/null 2>&1; then
    npm ci --prefix client/web --no-audit --no-fund --loglevel=error
else
    echo "warning: npm not found: the browser client at / will not load (install Node.js and npm, then rerun)" >&2
fi

# The browser tests drive Debian's Chromium (never a downloaded browser). Installed here when missing and we may.
if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "warning: no Chromium: the browser tests will be skipped (apt-get install chromium)" >&2
    fi
fi
echo "worldserve installed in $VENV ($accel)"
