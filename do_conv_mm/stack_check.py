"""What do_conv_mm needs installed beside it, checked at import.

torch and mmcv are not pip requirements of this package, as they are not of mmdet, mmseg or
mmpretrain: a plain ``pip install`` must never replace a working CUDA torch, or a compiled mmcv
with a source build of another version. They are checked here instead, with the fix in the
message. mmcv 2.x serves the layer (full or lite; mmdet 3.3 and mmseg 1.2 themselves need
mmcv < 2.2 and say so).
"""
from mmengine.utils import digit_version

__all__ = ['TORCH_MIN', 'MMCV_MIN', 'MMCV_BELOW', 'check_stack']

TORCH_MIN = '1.13.0'
MMCV_MIN, MMCV_BELOW = '2.0.0rc4', '3.0.0'
_FIX = 'run bash tools/install.sh from the do_conv_mm checkout, or see README "Install"'


def _known(version) -> bool:
    """True for a version string digit_version can read (not 'unknown', not None)."""
    try:
        digit_version(str(version))
    except Exception:
        return False
    return version is not None


def check_stack() -> None:
    """Raise ImportError naming the package, the version found and the fix where torch or mmcv
    is missing or outside the supported range."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(f'do_conv_mm needs torch >= {TORCH_MIN}, which does not import '
                          f'({error}): install the torch build for your CUDA '
                          f'(https://pytorch.org/get-started), or {_FIX}.') from error
    if _known(torch.__version__) and digit_version(torch.__version__) < digit_version(TORCH_MIN):
        raise ImportError(f'do_conv_mm needs torch >= {TORCH_MIN}, found {torch.__version__}: '
                          f'upgrade torch (and rebuild mmcv against it), or {_FIX}.')
    try:
        import mmcv
    except ImportError as error:
        raise ImportError(f'do_conv_mm needs mmcv 2.x (2.0-2.1 for mmdet 3 / mmseg 1), which '
                          f'does not import ({error}): {_FIX}.') from error
    found = getattr(mmcv, '__version__', None)
    if not _known(found):  # a source build without version metadata: nothing to judge
        return
    if not digit_version(MMCV_MIN) <= digit_version(found) < digit_version(MMCV_BELOW):
        raise ImportError(f'do_conv_mm needs mmcv 2.x (2.0-2.1 for mmdet 3 / mmseg 1), found '
                          f'mmcv {found}: uninstall it (and mmcv-full / mmcv-lite), then {_FIX}.')


check_stack()
