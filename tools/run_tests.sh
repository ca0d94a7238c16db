#!/usr/bin/env bash
# Installs what is missing (the stack, then the deploy extra's venv that the export tests use),
# then runs the whole test suite. Exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
bash tools/install_deploy.sh
python -m pytest tests -q --durations=30 "$@"  # (the 30 slowest listed: the suite has a ~30 min budget)
