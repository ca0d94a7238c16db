"""bfloat16 mixed precision for mmengine training where AmpOptimWrapper cannot run (CPU).

mmengine's ``AmpOptimWrapper`` asserts a GPU/NPU/MLU/MUSA device (it is built around fp16 with a
``GradScaler``). bfloat16 has float32's exponent range, so it needs no loss scaling: all that is
left is running forward and loss under ``mmengine.runner.amp.autocast`` with bfloat16, which CPU
autocast supports. Parameters, gradients and optimizer state stay float32 (DOConv composes its
kernel in float32 even under autocast).

mmcv's compiled ops have no bfloat16 kernels (CPU ``nms`` reads float32 only, ``roi_align``
dispatches float/double/half), and autocast does not know them, so under bf16 autocast a detector
such as Mask R-CNN hands them bf16 boxes and features and stops ("expected scalar type Float but
found BFloat16"). :func:`keep_bf16_out_of_mmcv_ops` makes each op compute in float32 when
handed bf16, much as ``torch.amp.custom_fwd(cast_inputs=torch.float32)`` does for a custom op:
bf16 inputs are cast to float32, the op runs with autocast off, and its float results come back
as bf16 (callers such as mmdet's RoI extractors write them into bf16 buffers); its backward does
the same with bf16 gradients. Only calls that receive a bf16 tensor, which would fail otherwise,
are affected; every other call is unchanged. BF16AmpOptimWrapper installs it.
"""
import functools
import sys
from contextlib import ExitStack, contextmanager

import torch
import torch.nn as nn
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from mmengine.runner.amp import autocast

__all__ = ['BF16AmpOptimWrapper', 'keep_bf16_out_of_mmcv_ops']

_PATCHED = '_do_conv_mm_float32_forward'


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


def _cast(value, source: torch.dtype, target: torch.dtype):
    """``value`` (a tensor or nested lists / tuples) with ``source`` tensors cast to ``target``."""
    if isinstance(value, torch.Tensor):
        return value.to(target) if value.dtype == source else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, source, target) for v in value)
    return value


def _in_float32(method, cast_back: bool):
    """``forward`` / ``backward`` of an autograd Function, run in float32 when it receives bf16
    tensors; ``cast_back``: float32 results return as bf16, the dtype the caller passed in."""

    @functools.wraps(method)
    def wrapped(ctx, *args, **kwargs):
        tensors = list(_tensors(list(args) + list(kwargs.values())))
        if not any(t.dtype == torch.bfloat16 for t in tensors):
            return method(ctx, *args, **kwargs)
        args = _cast(args, torch.bfloat16, torch.float32)
        kwargs = {k: _cast(v, torch.bfloat16, torch.float32) for k, v in kwargs.items()}
        with ExitStack() as stack:
            for device_type in sorted({t.device.type for t in tensors}):
                stack.enter_context(torch.autocast(device_type, enabled=False))
            result = method(ctx, *args, **kwargs)
        return _cast(result, torch.float32, torch.bfloat16) if cast_back else result

    setattr(wrapped, _PATCHED, True)
    return wrapped


def keep_bf16_out_of_mmcv_ops() -> int:
    """Make every autograd Function of ``mmcv.ops`` compute in float32 when given bf16 tensors
    (forward and backward; float results of forward return as bf16).

    Idempotent; returns the number of Functions patched by this call (0 when mmcv.ops is not
    available).
    """
    try:
        import mmcv.ops  # noqa: F401  (imports every op module)
    except ImportError:
        return 0
    patched = 0
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith('mmcv.ops'):
            continue
        for obj in list(vars(module).values()):
            if not (isinstance(obj, type) and issubclass(obj, torch.autograd.Function)
                    and obj.__module__ == module_name):
                continue
            forward, backward = obj.__dict__.get('forward'), obj.__dict__.get('backward')
            if not isinstance(forward, staticmethod) or getattr(forward.__func__, _PATCHED,
                                                                False):
                continue
            obj.forward = staticmethod(_in_float32(forward.__func__, cast_back=True))
            if isinstance(backward, staticmethod):
                obj.backward = staticmethod(_in_float32(backward.__func__, cast_back=False))
            patched += 1
    return patched


@OPTIM_WRAPPERS.register_module()
class BF16AmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward/loss run under bfloat16 autocast on the current device.

    Config: ``optim_wrapper=dict(type='BF16AmpOptimWrapper', optimizer=...)``; ``tools/train.py
    --amp`` selects it when no CUDA device is available. Checkpoints are those of OptimWrapper.
    mmcv ops (NMS, RoIAlign, ...) compute in float32 (:func:`keep_bf16_out_of_mmcv_ops`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        keep_bf16_out_of_mmcv_ops()

    @contextmanager
    def optim_context(self, model: nn.Module):
        with super().optim_context(model), autocast(dtype=torch.bfloat16):
            yield
