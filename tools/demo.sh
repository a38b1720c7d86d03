#!/usr/bin/env bash
# Set up and run the main demo: fit two moons, print the held-out log-likelihood, write a PNG.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_torch.sh
python -m pip install -q -e ".[plot]"
python examples/demo_two_moons.py "$@"
