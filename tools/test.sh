#!/usr/bin/env bash
# Set up and run the test suite (fast tests; `-m slow` runs the long ones).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_torch.sh
python -m pip install -q -e ".[test,distributed]"
python -m pytest -m "not slow and not gpu" "$@"
