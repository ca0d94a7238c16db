"""Make model tools that look layer types up *exactly* treat DOConv2d as the conv it is.

Two tools keep a table keyed by ``type(module)``, so a subclass of nn.Conv2d is invisible to them;
their tables are their only extension point, and this module adds DOConv2d to them (new keys
only: nothing that stock code sees for stock types changes). Both steps are idempotent and skip
quietly where the tool or its table is absent.

* mmcv's FLOP counter (``mmcv.cnn.get_model_complexity_info``): DOConv2d counts as the conv it
  deploys to (its composition is training-time work that folds away).
* torch's eager-mode fuser (``torch.ao.quantization.fuse_modules``): every fusion pattern that
  starts with nn.Conv2d also starts with DOConv2d; the DOConv2d is folded to its plain Conv2d
  first (quantised models are deployed models), then fused as torch fuses a Conv2d.
"""
import functools

import torch.nn as nn

from .doconv import DOConv2d

__all__ = ['register_model_tools']


def _register_mmcv_flops_counter() -> None:
    try:
        from mmcv.cnn.utils import flops_counter
    except ImportError:
        return
    stock = getattr(flops_counter, 'get_modules_mapping', None)
    if stock is None or getattr(stock, 'includes_doconv', False):
        return

    @functools.wraps(stock)
    def get_modules_mapping():
        mapping = stock()
        mapping[DOConv2d] = mapping[nn.Conv2d]
        return mapping

    get_modules_mapping.includes_doconv = True
    flops_counter.get_modules_mapping = get_modules_mapping


def _fold_first(fuser):
    """A fuser method for (DOConv2d, ...) from torch's method for (nn.Conv2d, ...)."""

    def fuse(is_qat, conv, *others):
        return fuser(is_qat, conv.to_conv2d(), *others)

    return fuse


def _register_torch_fusers() -> None:
    try:
        from torch.ao.quantization import fuser_method_mappings
    except ImportError:
        return
    table = getattr(fuser_method_mappings, '_DEFAULT_OP_LIST_TO_FUSER_METHOD', None)
    if not isinstance(table, dict):
        return
    for pattern, fuser in list(table.items()):
        if isinstance(pattern, tuple) and pattern[0] is nn.Conv2d:
            table.setdefault((DOConv2d, ) + pattern[1:], _fold_first(fuser))


def register_model_tools() -> None:
    """Add DOConv2d to mmcv's FLOP counter and torch's eager-mode fuser tables."""
    _register_mmcv_flops_counter()
    _register_torch_fusers()
