#!/usr/bin/env bash
# Installs what is missing, then runs the whole test suite. Exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
python -m pytest tests -q "$@"
