"""The DO-Conv training step: ``conv2d(x, W', bias)`` as one autograd Function.

The Function saves only what the layer holds anyway (its input and parameters) and composes W'
with a per-device *composer* (:mod:`do_conv_mm.compose_blocked` on CPU,
:mod:`do_conv_mm.compose_batched` elsewhere), which also computes the composition's gradient.

Mixed precision runs inside the same Function: under autocast the input is cast as autocast would
cast it (before the Function, so autograd sees the cast), W' is composed in the parameters' dtype
with autocast off and cast once to the input's dtype, the convolution and its backward run in
that dtype, and the parameter gradients come back in the parameters' dtype. The low-precision W'
is saved for backward, as autocast saves a plain conv's cast weight.

Double backward (``create_graph=True``) differentiates the plain expression instead, so gradient
penalties work. Inputs may be batched (N, C, H, W) or unbatched (C, H, W), in any memory format.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .composition import autocast_dtype, compose_kernel, in_layout_of, no_autocast

__all__ = ['composed_conv2d', 'autocast_input']


def autocast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to ``dtype``, the autocast dtype of its device, where autocast would cast a
    conv input (floating point, not float64); else ``x`` itself."""
    if not x.is_floating_point() or x.dtype == torch.float64:
        return x
    return x.to(dtype)


def _no_batched_query(tensor: torch.Tensor) -> bool:
    return False


# True for a grad_out of ``torch.autograd.grad(..., is_grads_batched=True)`` (legacy vmap);
# torch 2.1 cannot tell.
_is_batched = getattr(torch._C._functorch, 'is_legacy_batchedtensor', _no_batched_query)


def _as(tensor: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


class _ComposedConv2d(torch.autograd.Function):
    """``conv2d(x, compose_kernel(weight, D, weight_extra, groups), bias)``, the kernel cast to
    the autocast dtype where autocast has cast ``x``.

    ``padding`` is numeric: non-'zeros' padding modes pad the input before the Function.
    """

    @staticmethod
    def forward(ctx, x, weight, D, weight_extra, bias, composer, stride, padding, dilation,
                groups, autocast):
        """``autocast``: the autocast dtype of x's device, None while autocast is off there
        (then no autocast context is entered at all: the common, cheapest case)."""
        low_precision_kernel = None
        if autocast is None:
            kernel, token = composer.compose(weight, D, weight_extra, groups)
            kernel = in_layout_of(kernel, weight)
        else:
            with torch.autocast(weight.device.type, enabled=False):
                kernel, token = composer.compose(weight, D, weight_extra, groups)
                kernel = in_layout_of(kernel, weight)
            # Only autocast convolves in another dtype than the parameters', and it never casts
            # float64. Any other mismatch (a float64 layer's kernel, a float64 or fp16 input to a
            # float32 layer) reaches conv2d, which rejects it as it does for nn.Conv2d.
            if x.dtype != weight.dtype and x.dtype == autocast and weight.dtype != torch.float64:
                # The token stays: the composer's backward needs it (P = D + I on CUDA).
                kernel = low_precision_kernel = kernel.to(x.dtype)
        # The bias is not saved (its gradient needs only its shape): an in-place bias update
        # before backward is no error, as for nn.Conv2d.
        ctx.save_for_backward(x, weight, D, weight_extra, low_precision_kernel)
        ctx.composer, ctx.token = composer, token
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        if autocast is None:
            return F.conv2d(x, kernel, _as(bias, kernel.dtype), stride, padding, dilation,
                            groups)
        with torch.autocast(x.device.type, enabled=False):  # dtypes are settled: the kernel's
            return F.conv2d(x, kernel, _as(bias, kernel.dtype), stride, padding, dilation,
                            groups)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled() or _is_batched(grad_out):
            return _differentiable_backward(ctx, grad_out)
        x, weight, D, weight_extra, low_precision_kernel = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        needs_param = tuple(ctx.needs_input_grad[1:4])
        kernel = low_precision_kernel
        # A backward called inside autocast composes in the parameters' precision all the same.
        with no_autocast(weight.device.type):
            if kernel is None:
                kernel = ctx.composer.kernel_for_backward(ctx.token, weight, D, weight_extra,
                                                          groups)
            grad_x, grad_kernel, grad_bias = torch.ops.aten.convolution_backward(
                grad_out, x, kernel, ctx.bias_shape, stride, padding, dilation, False, [0, 0],
                groups, [ctx.needs_input_grad[0], any(needs_param), ctx.needs_input_grad[4]])
            del kernel  # a recomposed W' is freed before the parameter gradients are allocated
            grad_weight = grad_D = grad_extra = None
            if any(needs_param):
                grad_kernel = _as(grad_kernel, weight.dtype)  # autocast: the low-precision one
                grad_weight, grad_D, grad_extra = ctx.composer.backward(
                    grad_kernel, weight, D, weight_extra, groups, ctx.token, needs_param)
        return (grad_x, grad_weight, grad_D, grad_extra, _as(grad_bias, weight.dtype), None, None,
                None, None, None, None)


def _differentiable_backward(ctx, grad_out):
    """Backward with ``create_graph=True``: the gradients of the plain expression, themselves
    differentiable (gradient penalties, Hessian-vector products); also the backward of
    ``is_grads_batched=True`` (vectorised jacobians), whose vmap the composers' ``out=`` writes
    do not pass."""
    x, weight, D, weight_extra, _ = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad(), no_autocast(weight.device.type):
        kernel = compose_kernel(weight, D, weight_extra, groups).to(x.dtype)
        out = F.conv2d(x, kernel, None, stride, padding, dilation, groups)
    inputs = (x, weight, D, weight_extra)
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out,
                                create_graph=create_graph, allow_unused=True) if wanted else ()
    result = [None] * 11
    for i, grad in zip(wanted, grads):
        result[i] = grad
    if ctx.bias_shape is not None and ctx.needs_input_grad[4]:  # dL/dbias: grad_out summed
        result[4] = _as(grad_out.sum((0, 2, 3)), weight.dtype)
    return tuple(result)


def composed_conv2d(x: torch.Tensor, weight: torch.Tensor, D: torch.Tensor,
                    weight_extra: Optional[torch.Tensor], bias: Optional[torch.Tensor], composer,
                    stride, padding, dilation, groups: int) -> torch.Tensor:
    """The training conv of a DOConv2d: x (N, C, H, W) or (C, H, W), already padded for
    non-'zeros' padding modes; ``padding`` numeric; ``composer`` from the layer."""
    autocast = autocast_dtype(x.device.type)
    if autocast is not None:
        x = autocast_input(x, autocast)
    if x.dim() == 3:
        return _ComposedConv2d.apply(x.unsqueeze(0), weight, D, weight_extra, bias, composer,
                                     stride, padding, dilation, groups, autocast).squeeze(0)
    return _ComposedConv2d.apply(x, weight, D, weight_extra, bias, composer, stride, padding,
                                 dilation, groups, autocast)
