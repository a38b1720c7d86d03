#!/usr/bin/env bash
# Install PyTorch only where it is missing. torch==2.13.0 is the CPU build this project is tested
# with; an unpinned `pip install torch` would pull a multi-GB CUDA build. Users with their own
# torch (>=2.1) keep it.
set -euo pipefail
if python -c "import torch" >/dev/null 2>&1; then
    echo "torch $(python -c 'import torch; print(torch.__version__)') already installed"
else
    python -m pip install -q "torch==2.13.0"
fi
