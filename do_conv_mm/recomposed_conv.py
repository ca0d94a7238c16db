"""The DO-Conv training step on CUDA as autograd ops: W' composed by two kernels, and recomposed
in backward instead of kept.

A GPU training step is launch-bound: what a layer costs is the host time of the ops it issues,
and a Python ``autograd.Function`` (:mod:`.composed_conv`) spends more of it than autograd ops
whose backward formulas run in C++ (``bench/host_overhead.py``, 2-core VM: +192 µs against
+158 µs per layer step over a plain conv's 115 µs). So where the
composition is one batched matmul, the channel-major layouts (groups == 1, or depthwise; see
:func:`.compose_batched.channel_major`) at D_mul = kh·kw (the default), the step is written as
autograd ops:

    Δᵀ_c = D_c · W_cᵀ            (C, K, Og)  one bmm per layer
    W'   = weight + Δ             (O, Cg, kh, kw)  one add, written in W's own layout
    y    = conv2d(x, W')

Forward issues 2 kernels beyond the conv; backward: W' recomposed (2), dL/dD (1 bmm), the bmm's
share of dL/dweight (1) and its sum with the direct share (1). W' is not kept: a saved-tensor
hook hands the conv a marker instead and recomposes W' from the (saved-anyway) parameters when
the conv's backward asks for it, so memory is that of a plain conv; as autograd checks no
tensor saved under hooks for in-place edits, the hooks check the conv's input and the
parameters W' is recomposed from. The hooks and the
recomposition cost host time (~half of this path's, ``bench/host_overhead.py``), so a kernel of
at most ``KEEP_MAX_BYTES`` (ResNet's stem and first two stages: ~3 MiB in all for PSPNet) is
simply saved by the conv, as autograd would. Under autocast W' is composed
in the parameters' dtype and cast once; the conv keeps the cast kernel, as autocast does for a
plain conv's weight, and the parameter gradients come back in the parameters' dtype.

Where saved-tensor hooks are already active (non-reentrant activation checkpointing,
``save_on_cpu``) or disabled, ours would bypass or break theirs; the layer then takes
:func:`.composed_conv.composed_conv2d`, as it does for the other layouts, for D_mul > kh·kw
(whose slices of D autograd would differentiate with extra zero fills and copies) and on the CPU.
Device-independent: tested on CPU tensors against ``compose_kernel`` in float64.

``DO_CONV_MM_GPU_TRAINING=function`` in the environment (read at import) sends every layer
through the Function instead: to compare the two on a GPU, or as a way around this path.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .compose_batched import channel_major
from .composed_conv import autocast_input
from .composition import autocast_dtype, in_layout_of, no_autocast

__all__ = ['AUTOGRAD_PATH_ENABLED', 'recomposable', 'recomposed_conv2d']


def _autograd_path_chosen(variable: str = 'DO_CONV_MM_GPU_TRAINING') -> bool:
    value = os.environ.get(variable, 'autograd')
    if value not in ('autograd', 'function'):
        raise ValueError(f'{variable}={value!r}: use "autograd" (the default) or "function".')
    return value == 'autograd'


AUTOGRAD_PATH_ENABLED = _autograd_path_chosen()
KEEP_MAX_BYTES = 1 << 20  # W' up to this size is saved for backward rather than recomposed

_top_saved_tensors_hooks = getattr(torch._C._autograd, '_top_saved_tensors_default_hooks', None)


def recomposable(weight: torch.Tensor, weight_extra: Optional[torch.Tensor], groups: int) -> bool:
    """True where this path applies: a channel-major layout, D_mul = kh·kw, and no saved-tensor
    hooks of others active (or disabled), which ours would bypass. False where torch cannot tell
    (torch 2.1)."""
    if weight_extra is not None or (weight.shape[1] != 1 and groups != 1):
        return False
    if _top_saved_tensors_hooks is None or not torch._C._autograd._saved_tensors_hooks_is_enabled():
        return False
    return _top_saved_tensors_hooks(True) is None


def compose_channel_major(weight: torch.Tensor, D: torch.Tensor, groups: int) -> torch.Tensor:
    """W' (O, Cg, kh, kw), contiguous, as differentiable ops; groups == 1 or Cg == 1, D (C, K, K)
    with K = kh·kw."""
    O, Cg, kh, kw = weight.shape
    flat = weight.reshape(O, Cg, kh * kw)  # a view, channels_last weights included
    W_cm = channel_major(flat, groups)  # (C, Og, K)
    delta_t = torch.bmm(D, W_cm.transpose(1, 2))  # (C, K, Og)
    if groups == 1:  # the add reads Δ through a permuted view and writes W' contiguous
        return (flat + delta_t.permute(2, 0, 1)).view(O, Cg, kh, kw)
    return (W_cm + delta_t.transpose(1, 2)).view(O, Cg, kh, kw)  # depthwise: (C, Og, K) is W'


class _RecomposedKernel:
    """What the conv keeps in place of W' (fp32 path)."""


def _check_version(tensor: torch.Tensor, saved_version: int, what: str) -> None:
    """Autograd's check on a saved tensor, which it skips for tensors saved under hooks."""
    if tensor._version != saved_version:
        raise RuntimeError(
            f'one of the variables needed for gradient computation has been modified by an '
            f'inplace operation: {what}, {tuple(tensor.shape)}, is at version '
            f'{tensor._version}; expected version {saved_version} instead. Change it out of '
            f'place, or after the backward pass.')


def recomposed_conv2d(x: torch.Tensor, weight: torch.Tensor, D: torch.Tensor,
                      bias: Optional[torch.Tensor], stride, padding, dilation,
                      groups: int) -> torch.Tensor:
    """``conv2d(x, W', bias)`` for :func:`recomposable` layers: x (N, C, H, W) or (C, H, W),
    already padded for non-'zeros' padding modes; ``padding`` numeric."""
    autocast = autocast_dtype(x.device.type)
    if autocast is not None:
        x = autocast_input(x, autocast)
        with torch.autocast(x.device.type, enabled=False):
            kernel = in_layout_of(compose_channel_major(weight, D, groups), weight)
            if x.dtype == autocast and x.dtype != kernel.dtype and kernel.dtype != torch.float64:
                kernel = kernel.to(x.dtype)
                bias = None if bias is None else bias.to(x.dtype)
            return F.conv2d(x, kernel, bias, stride, padding, dilation, groups)

    kernel = in_layout_of(compose_channel_major(weight, D, groups), weight)
    if kernel.numel() * kernel.element_size() <= KEEP_MAX_BYTES:
        return F.conv2d(x, kernel, bias, stride, padding, dilation, groups)
    # Autograd keeps the pack hook as long as the conv's saved tensors: it must not hold W'.
    composed = [kernel]
    del kernel
    marker = _RecomposedKernel()
    # Autograd checks no saved tensor's version under hooks: these do (the conv's input, and
    # the parameters W' is recomposed from, which a partly frozen layer's autograd saves not).
    parameter_versions = [(weight, weight._version), (D, D._version)]

    def pack(tensor):
        if composed and tensor is composed[0]:
            return marker
        return tensor, tensor._version

    def unpack(packed):
        if packed is not marker:
            tensor, version = packed
            _check_version(tensor, version, 'the input of a DO-Conv layer')
            return tensor
        for parameter, version in parameter_versions:
            _check_version(parameter, version, "a DO-Conv parameter W' is recomposed from")
        with no_autocast(weight.device.type):  # a backward called inside autocast: still fp32
            return compose_channel_major(weight, D, groups)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = F.conv2d(x, composed[0], bias, stride, padding, dilation, groups)
    composed.clear()
    return out
