#!/usr/bin/env bash
# README main command: installs what is missing, then generates the toy data, trains the DO-Conv
# toy detector, evaluates it, folds it to plain convs and evaluates the folded model.
# Usage: bash tools/demo.sh [--work-dir work_dirs/demo] [--cfg-options KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
python tools/demo.py "$@"
