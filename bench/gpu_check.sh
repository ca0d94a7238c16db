#!/usr/bin/env bash
# The prepared GPU check of issue 10: one command, no network, bounded time (bench/README.md,
# "GPU check"). On a GPU machine:
#
#   bash bench/gpu_check.sh                   # --device cuda; ends within --budget (450 s)
#   bash bench/gpu_check.sh --device cpu      # the same stages on the CPU, tiny settings
#
# 1. Set-up: where mmengine / mmcv.ops / mmdet / mmseg do not import, the wheel files in
#    .gpu_wheels/ (bash bench/gpu_wheels.sh makes them; the device tool carries them) are
#    installed into a private folder ($GPU_SITE, put first on PYTHONPATH; nothing else changes),
#    and where mmcv has no compiled ops (mmcv-lite) bench/mmcv_ext_shim.py goes in as
#    mmcv/_ext.py. GPU_CHECK_FORCE_WHEELS=1 installs the wheels even where the stack imports
#    (to rehearse this path on a machine that has it).
# 2. bench/gpu_check.py: the `gpu` tests, then the training-overhead benchmark (fp32, AMP), each
#    stage timed, under a global time guard; summary in gpu_check_<device>.md.
# Options go to bench/gpu_check.py (--budget S, --models ..., --precisions ..., --reps N, ...).
# Results: --out-dir, else $OUT if set (the device tool brings $OUT back), else bench/results
# (cuda) or work_dirs/gpu_check_cpu (cpu); the whole log is gpu_check.log there.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
T0=$(date +%s)
PY="${PYTHON:-$(command -v python3 || command -v python)}"
WHEELS="${GPU_WHEELS:-$REPO/.gpu_wheels}"
SITE="${GPU_SITE:-/tmp/do_conv_mm_gpu_site}"

device=cuda
out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --device) device="${args[i + 1]:-cuda}" ;;
    --device=*) device="${args[i]#*=}" ;;
    --out-dir) out="${args[i + 1]:-}" ;;
    --out-dir=*) out="${args[i]#*=}" ;;
  esac
done
if [[ -z "$out" ]]; then
  if [[ -n "${OUT:-}" ]]; then out="$OUT"
  elif [[ "$device" == cuda ]]; then out="$REPO/bench/results"
  else out="$REPO/work_dirs/gpu_check_cpu"; fi
fi
mkdir -p "$out"
LOG="$out/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
trap 'exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT  # the log's last lines get written

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
echo "== [setup] $(date -u '+%F %T') UTC; $PY ($("$PY" -V 2>&1)); device $device; results in $out"

stack_imports() {
  "$PY" -c 'import mmengine, mmcv, mmcv.ops, mmdet, mmseg' >/dev/null 2>&1
}

if stack_imports && [[ "${GPU_CHECK_FORCE_WHEELS:-0}" != 1 ]]; then
  note="OpenMMLab stack used as installed (mmcv $("$PY" -c 'import mmcv; print(mmcv.__version__)'))"
else
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if (( ${#wheels[@]} == 0 )); then
    echo "error: mmengine / mmcv.ops / mmdet / mmseg do not import here, and $WHEELS holds no" \
         "wheel files. On a machine with PyPI run 'bash bench/gpu_wheels.sh' in this checkout" \
         "and carry .gpu_wheels along (device tool: carry [\".gpu_wheels\"])."
    exit 2
  fi
  if "$PY" -c 'import pkg_resources' >/dev/null 2>&1; then
    kept=()  # the machine's setuptools has pkg_resources: keep it, skip ours
    for w in "${wheels[@]}"; do [[ "$(basename "$w")" == setuptools-* ]] || kept+=("$w"); done
    wheels=("${kept[@]}")
  fi
  rm -rf "$SITE" && mkdir -p "$SITE"
  t=$(date +%s)
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --disable-pip-version-check --target "$SITE" "${wheels[@]}"; then
    echo "error: installing the wheel files from $WHEELS failed"; exit 2
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
  note="${#wheels[@]} wheel files from $(basename "$WHEELS")/ installed into $SITE in $(( $(date +%s) - t )) s"
  if ! "$PY" -c 'import mmcv.ops' >/dev/null 2>&1 && [[ -d "$SITE/mmcv" ]] \
      && ! compgen -G "$SITE/mmcv/_ext*.so" >/dev/null; then
    cp bench/mmcv_ext_shim.py "$SITE/mmcv/_ext.py"
    note="$note; mmcv-lite 2.1.0 with bench/mmcv_ext_shim.py as mmcv/_ext.py (RoIAlign and NMS"
    note="$note by torchvision's kernels where they pass its self-check, else by its pure-PyTorch"
    note="$note reference; other compiled mmcv ops unavailable)"
  fi
  if ! stack_imports; then
    echo "error: after the set-up the stack still does not import:"
    "$PY" -c 'import mmengine, mmcv, mmcv.ops, mmdet, mmseg'
    exit 2
  fi
fi
echo "$note"
echo "== [setup] done in $(( $(date +%s) - T0 )) s"
export GPU_CHECK_SETUP="$note"
"$PY" bench/gpu_check.py --t0 "$T0" --out-dir "$out" "$@"
rc=$?
echo "== gpu_check: exit $rc after $(( $(date +%s) - T0 )) s in all; results in $out"
exit $rc
