#!/usr/bin/env bash
# Installs what do_conv_mm needs that is missing; quick when it is all there already.
#
# Fresh machine (CPU, CI): the verified stack of README "Install": torch 2.13.0 + torchvision
# 0.28.0 (PyPI's build, a CUDA build on x86_64 that runs on the CPU: the local CPU-only torch
# 2.13.0+cpu wheel cannot load any torchvision, which mmpretrain needs), setuptools 80.9.0 +
# wheel + ninja, mmcv 2.1.0 built from source (MAX_JOBS=2, --no-build-isolation), mmengine 0.10.7,
# mmdet 3.3.0, mmsegmentation 1.2.2, mmpretrain 1.2.0, ftfy, regex, pytest, onnx, scikit-learn,
# matplotlib, then this checkout in editable mode.
#
# Existing environment (e.g. an OpenMMLab GPU environment): never replaces
#   - an installed torch in the project's range (>= 1.13; CUDA builds included). The one
#     exception is the CPU-only wheel torch 2.13.0+cpu with no torchvision that imports (this
#     script's own earlier choice): it becomes PyPI's torch 2.13.0 + torchvision 0.28.0;
#   - an installed mmcv 2.0.x-2.1.x whose ops import (mmcv.ops). One whose ops do not import
#     (built for another torch) is rebuilt, bypassing pip's wheel cache.
# mmpretrain (the DO-Conv pretraining extra) needs a torchvision that imports beside the torch;
# without one it is left out with a warning (its tests then skip) - install the torchvision
# release of your torch and run this again.
# Where mmcv must be built and torch is a CUDA build and nvcc is found (PATH or CUDA_HOME), its
# CUDA ops are built for the visible GPU's compute capability (FORCE_CUDA=1,
# TORCH_CUDA_ARCH_LIST), or for TORCH_CUDA_ARCH_LIST where that is set; with no GPU visible and
# no TORCH_CUDA_ARCH_LIST, CPU ops only (building every architecture takes hours). MAX_JOBS
# (default 2) sets the build's jobs.
#
# Where nvcc's toolkit lacks the library headers torch's CUDA headers include (cuSPARSE, cuBLAS,
# cuSOLVER: a toolkit with nvcc alone), they are taken from torch's own nvidia-* wheels (CPATH,
# NVCC_APPEND_FLAGS -isystem, after the toolkit's headers); where the nvcc on PATH is a wrapper
# outside its toolkit, CUDA_HOME is set to the toolkit nvcc reports (a CUDA_HOME or CUDA_PATH
# you set is kept). Where neither has the headers, CPU ops only, with a warning naming them.
# Where torch's headers need C++20 (torch >= 2.14), mmcv's -std=c++17 is raised to it through
# compiler wrappers (CXX, PYTORCH_NVCC) for the build.
#
# bash tools/install.sh --facts   prints what it found (torch, CUDA, mmcv, ...) and installs nothing.
# PYTHON=...              the interpreter to install into (default: python on PATH)
# DOCONV_INSTALL_DRY_RUN=1 print the install commands it would run ('would run: ...'), run none.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$(pwd -P)
PYTHON="${PYTHON:-python}"
DRY_RUN="${DOCONV_INSTALL_DRY_RUN:-0}"
STACK=(mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 ftfy regex pytest onnx scikit-learn
       matplotlib)
PRETRAIN_STACK=(mmpretrain==1.2.0)
# torch from PyPI, not the local CPU-only 2.13.0+cpu wheel (no torchvision loads beside that).
TORCH_SPEC=("torch==2.13.0,!=2.13.0+cpu" torchvision==0.28.0)

RAN=0
run() {  # run an install command (print it on a dry run), then re-read the facts
  RAN=$((RAN + 1))
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "would run: $*"
  else
    "$@"
    FACTS=$(probe)
  fi
}

# One line per fact, key=value, read by the decisions below.
probe() {
  (cd / && "$PYTHON" - "$CHECKOUT" "${STACK[@]}" <<'PY'
import glob
import importlib.machinery
import importlib.metadata as md
import importlib.util
import os
import re
import shutil
import subprocess
import sys

checkout, stack = sys.argv[1], sys.argv[2:]


def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def release(v):  # '2.11.0+cu130' -> (2, 11, 0)
    return tuple(int(x) for x in re.findall(r'\d+', v.split('+')[0])[:3])


# Headers that torch's CUDA headers (ATen/cuda/CUDAContextLight.h) include, so every mmcv CUDA
# source needs them. A toolkit with nvcc alone (some images, conda's cuda-nvcc) lacks the
# library ones; torch's own nvidia-* wheels carry them.
CUDA_HEADERS = ('cuda_runtime_api.h', 'cusparse.h', 'cublas_v2.h', 'cublasLt.h', 'cusolverDn.h')


def nvcc_toolkit_root():
    """The toolkit the nvcc that the build will run belongs to, from its own dry run (the nvcc
    on PATH may be a wrapper script elsewhere, e.g. /usr/local/bin/nvcc), or None."""
    nvcc = shutil.which('nvcc') or os.path.join(os.environ.get('CUDA_HOME', '/usr/local/cuda'),
                                                'bin', 'nvcc')
    try:
        out = subprocess.run([nvcc, '--dryrun', '-x', 'cu', '-c', os.devnull, '-o', os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith('#$ _HERE_='):
            return os.path.dirname(line.split('=', 1)[1].strip())
    return None


def nvcc_release(nvcc):
    """'12.1' from ``nvcc --version`` ("Cuda compilation tools, release 12.1, V12.1.105"): the
    check torch's extension builder runs on CUDA_HOME's nvcc. None where it does not answer."""
    try:
        out = subprocess.run([nvcc, '--version'], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r'release (\d+\.\d+)', out.stdout)
    return found.group(1) if found else None


def cuda_build_facts(torch):
    """cuda_home: the toolkit root to build with where torch would pick another (it takes the
    parent of the nvcc on PATH, wrong for a wrapper; CUDA_HOME / CUDA_PATH set by the user
    are kept); cuda_includes: torch's nvidia wheel include folders that supply headers the
    toolkit lacks; cuda_headers_missing: headers found in neither; nvcc_path: that toolkit's
    nvcc; nvcc_cuda: its CUDA release. Empty without an nvcc."""
    facts = {}
    root = nvcc_toolkit_root()
    if root is None:
        return facts
    home = os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
    if not home:
        import logging  # torch logs a warning where its CUDA_HOME has no CUDA runtime
        logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
        from torch.utils.cpp_extension import CUDA_HOME as torch_choice
        home = torch_choice
        if not home or os.path.realpath(home) != os.path.realpath(root):
            facts['cuda_home'] = home = root
    facts['nvcc_path'] = os.path.join(home, 'bin', 'nvcc')  # the nvcc torch's builder runs
    facts['nvcc_cuda'] = nvcc_release(facts['nvcc_path']) or 'none'
    missing = [h for h in CUDA_HEADERS if not os.path.isfile(os.path.join(home, 'include', h))]
    site = os.path.dirname(os.path.dirname(torch.__file__))
    wheel_dirs = sorted(glob.glob(os.path.join(site, 'nvidia', '*', 'include')))
    found = {h: next((d for d in wheel_dirs if os.path.isfile(os.path.join(d, h))), None)
             for h in missing}
    extra = sorted({d for d in found.values() if d})
    facts['cuda_includes'] = ':'.join(extra) or 'none'
    facts['cuda_headers_missing'] = ' '.join(h for h, d in found.items() if not d) or 'none'
    return facts


def torch_cxx_standard(torch):
    """The C++ standard torch's headers demand (ATen.h: '#error C++20 or later compatible
    compiler is required'): 'c++20' from torch 2.14, 'c++17' from 2.0, 'c++14' before; None
    where ATen.h does not say."""
    header = os.path.join(os.path.dirname(torch.__file__), 'include', 'ATen', 'ATen.h')
    try:
        with open(header) as f:
            found = re.search(r'C\+\+(\d+) or later compatible compiler is required', f.read())
    except OSError:
        return None
    return f'c++{found.group(1)}' if found else None


def mmcv_ext_facts():
    """('yes', its CUDA version or 'not available') where mmcv's compiled ops load against this
    torch, else ('no', 'none'). The extension is loaded on its own: mmcv's package imports
    mmengine, which may not be installed yet, and that must not pass for ops built for another
    torch (a rebuild, an hour with CUDA ops)."""
    spec = importlib.util.find_spec('mmcv')  # finds the package without running it
    folders = (spec.submodule_search_locations or []) if spec else []
    paths = [p for d in folders for suffix in importlib.machinery.EXTENSION_SUFFIXES
             for p in glob.glob(os.path.join(d, '_ext' + suffix))]
    if not paths:  # no mmcv, or mmcv-lite
        return 'no', 'none'
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)
        loader = importlib.machinery.ExtensionFileLoader('mmcv._ext', paths[0])
        ext = importlib.util.module_from_spec(importlib.util.spec_from_loader('mmcv._ext', loader))
        loader.exec_module(ext)
        return 'yes', ext.get_compiling_cuda_version()
    except Exception:
        return 'no', 'none'


facts = {}
torch_version = version('torch')
facts['torch'] = torch_version or 'none'
facts['torch_in_range'] = 'yes' if torch_version and release(torch_version) >= (1, 13) else 'no'
facts['torch_cuda'] = facts['gpu_arch'] = 'none'
facts['torch_imports'] = 'no'
if torch_version:
    try:
        import torch
        facts['torch_imports'] = 'yes'
        facts['torch_cuda'] = torch.version.cuda or 'none'
        if torch.version.cuda and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            facts['gpu_arch'] = f'{major}.{minor}'
    except Exception:
        pass
facts['torch_cxx_std'] = (facts['torch_imports'] == 'yes' and torch_cxx_standard(torch)) or 'none'
facts.update(cuda_home='none', cuda_includes='none', cuda_headers_missing='none')
if facts['torch_cuda'] != 'none':
    try:
        facts.update(cuda_build_facts(torch))
    except Exception:
        pass
facts['torchvision'] = version('torchvision') or 'none'
facts['torchvision_imports'] = 'no'
if version('torchvision') and facts['torch_imports'] == 'yes':
    try:
        import torchvision.ops  # noqa: F401  (fails where its C++ ops do not match the torch)
        facts['torchvision_imports'] = 'yes'
    except Exception:
        pass
facts['mmpretrain'] = version('mmpretrain') or 'none'
facts['numpy'] = version('numpy') or 'none'
mmcv_version = version('mmcv')
facts['mmcv'] = mmcv_version or 'none'
facts['mmcv_in_range'] = 'yes' if mmcv_version and (2, 0) <= release(mmcv_version)[:2] <= (2, 1) else 'no'
facts['mmcv_ops'], facts['mmcv_ops_cuda'] = mmcv_ext_facts()
# other distributions of the same mmcv/ package folder, which pip would not replace
facts['mmcv_other_dists'] = ' '.join(d for d in ('mmcv-lite', 'mmcv-full') if version(d)) or 'none'
facts['build_tools'] = 'yes' if version('setuptools') == '80.9.0' and version('wheel') \
    and version('ninja') else 'no'
missing = [spec for spec in stack
           if version(spec.split('==')[0]) is None
           or ('==' in spec and version(spec.split('==')[0]).split('+')[0] != spec.split('==')[1])]
facts['stack_missing'] = ' '.join(missing) or 'none'
# where do_conv_mm imports from, found without running it (its import would warn about a stack
# that this script is about to complete)
spec = importlib.util.find_spec('do_conv_mm')
here = bool(spec and spec.origin
            and os.path.realpath(spec.origin).startswith(checkout + os.sep))
facts['do_conv_mm_here'] = 'yes' if here else 'no'
for key, value in facts.items():
    print(f'{key}={value}')
PY
  )
}

fact() {  # fact KEY: the value of KEY in the last probe
  sed -n "s/^$1=//p" <<<"$FACTS" | head -n 1
}

have_nvcc() {
  command -v nvcc >/dev/null 2>&1 || [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]
}

FACTS=$(probe)
if [[ "${1:-}" == --facts ]]; then  # what the decisions below read, e.g. to see why one was taken
  echo "$FACTS"
  exit 0
fi

# torch: keep any installed version in range; install the verified one only where there is none,
# or where it is the CPU-only 2.13.0+cpu wheel that cannot serve torchvision.
TORCHVISION_INSTALLED=0  # set where this run installs TORCH_SPEC (what a dry run cannot probe)
if [[ "$(fact torch)" == none ]]; then
  run "$PYTHON" -m pip install "${TORCH_SPEC[@]}"
  TORCHVISION_INSTALLED=1
elif [[ "$(fact torch_in_range)" != yes || "$(fact torch_imports)" != yes ]]; then
  echo "error: torch $(fact torch) is installed, but do_conv_mm needs a torch >= 1.13 that" \
       "imports (verified: 2.13.0). Upgrade or repair it yourself (a CUDA build of your" \
       "choice, or pip install torch==2.13.0 torchvision==0.28.0), then run this again; an" \
       "installed torch is never replaced by this script." >&2
  exit 1
elif [[ "$(fact torch)" == 2.13.0+cpu && "$(fact torchvision_imports)" != yes ]]; then
  echo "torch 2.13.0+cpu (the CPU-only wheel) cannot load torchvision, which mmpretrain needs:" \
       "replacing it by PyPI's torch 2.13.0 (same release) + torchvision 0.28.0." >&2
  run "$PYTHON" -m pip install "${TORCH_SPEC[@]}"
  TORCHVISION_INSTALLED=1
fi

known() {  # known KEY: the fact is set and not 'none'
  local value
  value=$(fact "$1")
  [[ -n "$value" && "$value" != none ]]
}

# (Arrays that may be empty expand as ${a[@]+"${a[@]}"}: bash < 4.4 calls an empty one unbound
# under set -u.)
# An installed numpy stays as it is: the environment's torch and compiled packages were built
# against it (torch <= 2.2 against numpy 1, which numpy 2 breaks), and the newest releases of
# the stack's dependencies would otherwise pull numpy 2 in. pip takes it as a constraint.
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/do_conv_mm_install.XXXXXX")  # this run's own files
trap 'rm -rf "$SCRATCH"' EXIT
KEEP=()
if known numpy; then
  KEEP_FILE="$SCRATCH/constraints.txt"
  echo "numpy==$(fact numpy)" >"$KEEP_FILE"
  KEEP=(-c "$KEEP_FILE")
  echo "note: keeping the installed numpy $(fact numpy) (a pip constraint on what follows)." >&2
fi

if [[ "$(fact build_tools)" != yes ]]; then
  run "$PYTHON" -m pip install setuptools==80.9.0 wheel ninja
fi

# add_cuda_build_env ARCHS: FORCE_CUDA for ARCHS into build_env, with the toolkit root and
# header folders the build needs where torch would not find them itself; CPU ops only (and why)
# where the toolkit lacks headers that no installed nvidia wheel supplies either.
add_cuda_build_env() {
  if known nvcc_cuda && [[ "$(fact nvcc_cuda | cut -d. -f1)" != "$(fact torch_cuda | cut -d. -f1)" ]]
  then
    echo "warning: nvcc is CUDA $(fact nvcc_cuda) but torch $(fact torch) was built with CUDA" \
         "$(fact torch_cuda), and torch builds no extension across CUDA major versions: mmcv" \
         "is built with CPU ops only. Install the CUDA $(fact torch_cuda) toolkit (or set" \
         "CUDA_HOME to one), pip uninstall mmcv, and run this again for CUDA ops." >&2
    return
  fi
  if known cuda_headers_missing; then
    echo "warning: the CUDA toolkit of nvcc lacks $(fact cuda_headers_missing), which torch's" \
         "CUDA headers include, and no installed nvidia-* wheel carries them: mmcv is built" \
         "with CPU ops only. Install the toolkit's library headers (cuBLAS, cuSPARSE," \
         "cuSOLVER development packages of CUDA $(fact torch_cuda)), pip uninstall mmcv, and" \
         "run this again for CUDA ops." >&2
    return
  fi
  build_env+=("FORCE_CUDA=1" "TORCH_CUDA_ARCH_LIST=$1")
  if known cuda_home; then
    echo "note: building with CUDA_HOME=$(fact cuda_home), the toolkit of the nvcc found" \
         "(torch would take another folder)." >&2
    build_env+=("CUDA_HOME=$(fact cuda_home)")
  fi
  if known cuda_includes; then
    local dirs flags=()
    IFS=: read -ra dirs <<<"$(fact cuda_includes)"
    for d in "${dirs[@]}"; do flags+=("-isystem $d"); done
    echo "note: the CUDA toolkit lacks library headers; taking them from torch's nvidia wheels" \
         "($(fact cuda_includes)), after the toolkit's own." >&2
    build_env+=("CPATH=$(fact cuda_includes)${CPATH:+:$CPATH}"
                "NVCC_APPEND_FLAGS=${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }${flags[*]}")
  fi
}

# add_standard_wrappers STD: torch's headers need STD (C++20 from torch 2.14: ATen.h refuses
# anything older) but mmcv 2.1.0's setup.py passes -std=c++17 to the C++ compiler and nvcc, so the
# build fails at the first source. Wrappers that pass -std=STD instead of that one flag go into
# build_env as CXX and, for CUDA ops, PYTORCH_NVCC (both honoured by torch's extension builder).
add_standard_wrappers() {
  local std=$1 cxx nvcc nvcc_wrapped=""
  if ! cxx=$(command -v "${CXX:-c++}"); then
    echo "error: no C++ compiler (${CXX:-c++}) found to build mmcv with; install g++." >&2
    exit 1
  fi
  write_standard_wrapper "$SCRATCH/c++" "$cxx" "$std"
  build_env+=("CXX=$SCRATCH/c++")
  if [[ " ${build_env[*]} " == *" FORCE_CUDA=1 "* ]]; then
    # the nvcc torch's builder would run: the probe's, else as torch finds it
    nvcc=$(fact nvcc_path)
    known nvcc_path || nvcc=${CUDA_HOME:+$CUDA_HOME/bin/nvcc}
    [[ -n "$nvcc" ]] || nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    write_standard_wrapper "$SCRATCH/nvcc" "$nvcc" "$std"
    build_env+=("PYTORCH_NVCC=$SCRATCH/nvcc")
    nvcc_wrapped=" and nvcc"
  fi
  echo "note: torch $(fact torch)'s headers need $std but mmcv 2.1.0 compiles with" \
       "-std=c++17: building it with -std=$std (a wrapper around $cxx$nvcc_wrapped)." >&2
}

write_standard_wrapper() {  # write_standard_wrapper PATH COMPILER STD
  cat >"$1" <<WRAPPER
#!/usr/bin/env bash
# Made by do_conv_mm's tools/install.sh for one mmcv build: $2 with -std=$3 for -std=c++17.
args=()
for arg in "\$@"; do
  [[ "\$arg" == -std=c++17 ]] && arg=-std=$3
  args+=("\$arg")
done
exec "$2" "\${args[@]}"
WRAPPER
  chmod +x "$1"
}

# mmcv: keep an installed 2.0-2.1 whose ops import; otherwise build 2.1.0 (no wheel exists for
# these torch versions), with CUDA ops where torch has CUDA and nvcc is there.
if [[ "$(fact mmcv_in_range)" == yes && "$(fact mmcv_ops)" == yes ]]; then
  if [[ "$(fact gpu_arch)" != none && "$(fact mmcv_ops_cuda)" == "not available" ]]; then
    echo "warning: mmcv $(fact mmcv) was built without CUDA ops; detectors that need them" \
         "(RoIAlign, NMS, ...) fail on the GPU. Rebuild it with CUDA (pip uninstall mmcv, then" \
         "run this again where nvcc is installed)." >&2
  fi
else
  build_env=("MAX_JOBS=${MAX_JOBS:-2}")
  if [[ "$(fact torch_cuda)" != none ]]; then
    if ! have_nvcc; then
      echo "warning: torch $(fact torch) has CUDA $(fact torch_cuda) but nvcc is not found" \
           "(PATH, CUDA_HOME): mmcv is built with CPU ops only, and detectors that need its" \
           "CUDA ops (RoIAlign, NMS, ...) will fail on the GPU. Install the CUDA toolkit" \
           "$(fact torch_cuda) and run this again for CUDA ops." >&2
    elif [[ -n "${TORCH_CUDA_ARCH_LIST:-}" || "$(fact gpu_arch)" != none ]]; then
      add_cuda_build_env "${TORCH_CUDA_ARCH_LIST:-$(fact gpu_arch)}"
    else
      echo "note: no GPU visible and TORCH_CUDA_ARCH_LIST unset: mmcv is built with CPU ops" \
           "only. For CUDA ops, set TORCH_CUDA_ARCH_LIST to your GPUs' compute capability" \
           "(e.g. 9.0), pip uninstall mmcv, and run this again." >&2
    fi
  fi
  # (torch < 2.0 asks for C++14, which mmcv's C++17 satisfies: only a newer standard is raised)
  cxx_std=$(fact torch_cxx_std)
  if [[ "$cxx_std" =~ ^c\+\+([0-9]+)$ ]] && (( BASH_REMATCH[1] > 17 )); then
    add_standard_wrappers "$cxx_std"
  fi
  # No wheel exists for these torch versions: built from source (~17 min on 2 cores for the CPU
  # ops, cached by pip afterwards; CUDA ops take longer). An installed mmcv (other version, or
  # ops built for another torch) is replaced, and then pip's cache, which may hold a wheel built
  # against that other torch, is bypassed.
  others=$(fact mmcv_other_dists)
  if [[ -n "$others" && "$others" != none ]]; then
    echo "note: removing $others first: it installs into the same mmcv/ folder as mmcv 2.1.0," \
         "and mmdet needs the full mmcv's compiled ops." >&2
    # shellcheck disable=SC2086  (one word per distribution)
    run "$PYTHON" -m pip uninstall -y $others
  fi
  rebuild=()
  if [[ "$(fact mmcv)" != none ]]; then
    if [[ "$(fact mmcv_in_range)" != yes ]]; then
      echo "note: mmcv $(fact mmcv) is outside 2.0-2.1, the range mmdet 3.3 and mmseg 1.2" \
           "accept: replacing it with mmcv 2.1.0, built from source." >&2
    else
      echo "note: mmcv $(fact mmcv)'s compiled ops do not load beside torch $(fact torch):" \
           "rebuilding mmcv 2.1.0 against it." >&2
    fi
    rebuild=(--force-reinstall --no-deps --no-cache-dir)
  fi
  run env "${build_env[@]}" "$PYTHON" -m pip install --no-build-isolation \
      ${rebuild[@]+"${rebuild[@]}"} ${KEEP[@]+"${KEEP[@]}"} mmcv==2.1.0
  # pip's wheel cache keys the mmcv build by its source, not by torch: a wheel built against
  # another torch (another environment on this machine) installs, and its ops do not load.
  if [[ "$DRY_RUN" != 1 && "$(fact mmcv_ops)" != yes && ${#rebuild[@]} == 0 ]]; then
    echo "note: the mmcv wheel pip took from its cache was built against another torch (its ops" \
         "do not load beside torch $(fact torch)): rebuilding it without the cache." >&2
    run env "${build_env[@]}" "$PYTHON" -m pip install --no-build-isolation --force-reinstall \
        --no-deps --no-cache-dir mmcv==2.1.0
  fi
  if [[ "$DRY_RUN" != 1 && "$(fact mmcv_ops)" != yes ]]; then
    echo "error: mmcv 2.1.0 was built, but its compiled ops do not load beside torch" \
         "$(fact torch). See pip's output above." >&2
    exit 1
  fi
fi

if [[ "$(fact stack_missing)" != none ]]; then
  run "$PYTHON" -m pip install ${KEEP[@]+"${KEEP[@]}"} "${STACK[@]}"
fi
# mmpretrain: needs a torchvision that imports beside this torch.
if [[ "$(fact mmpretrain)" != 1.2.0 ]]; then
  if [[ "$(fact torchvision_imports)" == yes || "$TORCHVISION_INSTALLED" == 1 ]]; then
    run "$PYTHON" -m pip install ${KEEP[@]+"${KEEP[@]}"} "${PRETRAIN_STACK[@]}"
  else
    echo "warning: no torchvision imports beside torch $(fact torch): mmpretrain (DO-Conv" \
         "pretraining, configs/mmpretrain) is not installed and its tests skip. Install the" \
         "torchvision release built for your torch (torch 2.13 -> torchvision 0.28) and run" \
         "this again." >&2
  fi
fi
# The package must import from this checkout from anywhere (checked outside the repo root, where
# the current directory would shadow the installed package).
if [[ "$(fact do_conv_mm_here)" != yes ]]; then
  run "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
fi
if [[ "$DRY_RUN" == 1 && "$RAN" == 0 ]]; then
  echo "nothing to install"
fi
