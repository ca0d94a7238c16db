#!/usr/bin/env bash
# Installs everything do_conv_mm needs on a fresh machine; quick when it is all there already.
# The pins are those of the verified stack (see README "Install").
set -euo pipefail
cd "$(dirname "$0")/.."

have() { python - "$@" <<'PY' 2>/dev/null
import importlib.metadata as md, sys
for spec in sys.argv[1:]:
    name, _, version = spec.partition('==')
    installed = md.version(name)
    if version and installed.split('+')[0] != version:
        sys.exit(1)
PY
}

if ! have torch==2.13.0; then pip install torch==2.13.0; fi
if ! have setuptools==80.9.0 wheel ninja; then pip install setuptools==80.9.0 wheel ninja; fi
if ! have mmcv==2.1.0 || ! python -c 'import mmcv.ops' >/dev/null 2>&1; then
  # No wheel exists for this torch: build from source (~17 min on 2 cores, cached by pip after).
  MAX_JOBS="${MAX_JOBS:-2}" pip install --no-build-isolation mmcv==2.1.0
fi
if ! have mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 ftfy regex pytest onnx scikit-learn matplotlib; then
  pip install mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 ftfy regex pytest onnx scikit-learn matplotlib
fi
# The package must import from this checkout from anywhere (checked outside the repo root, where
# the current directory would shadow the installed package).
if ! (cd / && python -c 'import do_conv_mm, os, sys; sys.exit(not os.path.realpath(do_conv_mm.__file__).startswith(sys.argv[1] + os.sep))' "$(pwd -P)") >/dev/null 2>&1; then
  pip install --no-build-isolation --no-deps -e .
fi
# The deploy extra (mmdeploy + ONNX Runtime) goes into its own venv, .venv-deploy, which sees the
# packages above and changes none of them (tools/install_deploy.sh); tests/test_deploy_onnx.py
# runs the export tool with it.
bash tools/install_deploy.sh
