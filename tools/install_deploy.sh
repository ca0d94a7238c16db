#!/usr/bin/env bash
# Installs the deploy extra (do_conv_mm[deploy]: mmdeploy 1.3.1 + ONNX Runtime) into its own
# virtual environment, .venv-deploy (or $DO_CONV_MM_DEPLOY_VENV), created with
# --system-site-packages: it sees the main stack (torch, mmcv, mmdet, mmseg) and adds only the
# deploy packages, so the main environment and its test stack stay exactly as they are.
# mmdeploy pins protobuf<=3.20.2; the venv holds that protobuf and onnx 1.17.0 (the newest onnx
# that accepts it) in front of the main stack's newer onnx/protobuf. Quick when already done.
# Then: .venv-deploy/bin/python tools/deploy_onnx.py CONFIG CHECKPOINT OUT_DIR --verify
# DOCONV_INSTALL_DRY_RUN=1: make the venv, print the install command, install nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DO_CONV_MM_DEPLOY_VENV:-.venv-deploy}"
PY="$VENV/bin/python"

# The pins live in setup.py (extras_require['deploy']).
PINS=$(python - <<'PY'
import re
text = open('setup.py').read()
block = re.search(r"'deploy':\s*\[([^\]]*)\]", text).group(1)
print(' '.join(re.findall(r"'([^']+)'", block)))
PY
)

if [ ! -x "$PY" ]; then
  # --without-pip: the main environment's pip serves the venv (installing into the venv), so no
  # second, older pip/setuptools shadows the main stack's.
  python -m venv --system-site-packages --without-pip "$VENV"
fi
# --system-site-packages reaches the base interpreter's packages only: where the main python is
# itself a venv, its site-packages are added by a .pth file, after the deploy venv's own (whose
# pins stay in front) and before the base interpreter's.
MAIN_SITE=$(python -c 'import site, sys; sys.prefix != sys.base_prefix and print(*site.getsitepackages(), sep="\n")')
PTH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_do_conv_mm_main_env.pth"
if [[ -n "$MAIN_SITE" ]]; then
  echo "$MAIN_SITE" > "$PTH"
else
  rm -f "$PTH"
fi
if [[ "${DOCONV_INSTALL_DRY_RUN:-0}" == 1 ]]; then  # the venv only; say what would be installed
  echo "would run: $PY -m pip install --no-build-isolation -e .[deploy]"
  exit 0
fi
if ! "$PY" - $PINS <<'PY' >/dev/null 2>&1
import importlib.metadata as md, os, sys
for spec in sys.argv[1:]:
    name, _, version = spec.partition('==')
    if md.version(name) != version:
        sys.exit(1)
# the package itself must import from this checkout
import do_conv_mm
sys.exit(not os.path.realpath(do_conv_mm.__file__).startswith(os.path.realpath('.') + os.sep))
PY
then
  # Editable, so the venv imports do_conv_mm from this checkout; everything the main
  # environment already has (torch, mmcv, mmdet, ...) is taken from there, not reinstalled.
  "$PY" -m pip install --no-build-isolation -e ".[deploy]"
fi
"$PY" -m pip check
