#!/usr/bin/env bash
# Downloads the wheel files that bench/gpu_check.sh installs on a GPU machine without network:
# the OpenMMLab stack as pure-Python wheels (mmcv as mmcv-lite: mmcv 2.1.0 has no wheel for the
# GPU machine's torch/CUDA and no time to be built there; bench/mmcv_ext_shim.py stands in for its
# compiled ops) and the packages they import that the GPU machine's image lacks. Run it on a
# machine with PyPI, in the checkout the device tool sends; the folder is ignored by git and
# travels with the device tool's `carry: [".gpu_wheels"]`. About 11 MiB.
#
#   bash bench/gpu_wheels.sh [--python-version 3.12] [--dest .gpu_wheels]
#
# --python-version: the GPU machine's Python (3.12 there); binary wheels (pycocotools, shapely,
# wcwidth) are chosen for it. The image already has torch, torchvision, numpy, scipy, matplotlib,
# opencv-python-headless, pyyaml, rich, regex, six, tqdm, packaging, pillow and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=3.12
dest=.gpu_wheels
while (( $# )); do
  case "$1" in
    --python-version) pyver="$2"; shift 2 ;;
    --dest) dest="$2"; shift 2 ;;
    *) echo "usage: bash bench/gpu_wheels.sh [--python-version X.Y] [--dest DIR]" >&2; exit 2 ;;
  esac
done

PACKAGES=(
  mmengine==0.10.7 mmcv-lite==2.1.0 mmdet==3.3.0 mmsegmentation==1.2.2
  # mmengine / mmcv: addict, yapf (+ platformdirs), termcolor
  addict==2.4.0 yapf==0.43.0 platformdirs==4.14.8 termcolor==3.3.0
  # mmdet: terminaltables, pycocotools, shapely (all imported at registration)
  terminaltables==3.1.10 pycocotools==2.0.11 shapely==2.2.0
  # mmseg: prettytable (+ wcwidth), ftfy
  prettytable==3.18.0 wcwidth==0.9.4 ftfy==6.3.1
  # pkg_resources for mmengine's `mmdet::` config lookup; installed there only if missing
  setuptools==80.9.0
)
mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each: two would stop the install
python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${PACKAGES[@]}"

count=$(ls "$dest"/*.whl | wc -l)
kib=$(du -sk "$dest" | cut -f1)
if (( count != ${#PACKAGES[@]} )); then
  echo "error: expected ${#PACKAGES[@]} wheel files in $dest, found $count" >&2; exit 1
fi
if (( kib > 60 * 1024 )); then
  echo "error: $dest holds $((kib / 1024)) MiB; the device tool carries 64 MiB in all" >&2; exit 1
fi
ls -1 "$dest"/*.whl
echo "$count wheel files for Python $pyver in $dest ($((kib / 1024)) MiB)."
