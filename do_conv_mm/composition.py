"""The DO-Conv kernel composition W' = (D + I) · W and its gradient, as plain differentiable ops.

Shapes (O = out_channels, C = in_channels, g = groups, Og = O / g, Cg = C / g, K = kh * kw,
S = D_mul >= K):

    W  = [weight | weight_extra]     (O, Cg, S)   ``weight`` is Conv2d-shaped (O, Cg, kh, kw)
    D                                 (C, K, S)    one K×S matrix per *input channel*
    W'[o, i, m] = Σ_s (D + I)[c, m, s] · W[o, i, s]
                = weight[o, i, m] + Σ_s D[c, m, s] · W[o, i, s]
    with c = c(o, i) = (o // Og) · Cg + i, the input channel that kernel entry (o, i) reads.

Everything here is reshapes, permutes and one batched matmul (no einsum, no in-place writes into
inputs), so it runs under autograd, torch.func transforms, torch.compile, tracers and ONNX export.
The training path (:mod:`do_conv_mm.composed_conv`) computes the same thing with per-device
kernels; :func:`fold_kernel` is what deployment uses.
"""
import contextlib
from typing import Dict, Optional, Tuple

import torch

__all__ = ['compose_kernel', 'compose_kernel_backward', 'fold_kernel', 'plus_identity',
           'in_layout_of', 'autocast_dtype', 'no_autocast']


def compose_kernel(weight: torch.Tensor,
                   D: torch.Tensor,
                   weight_extra: Optional[torch.Tensor] = None,
                   groups: int = 1) -> torch.Tensor:
    """Compose a DO-Conv kernel: returns W' (O, Cg, kh, kw), same dtype as ``weight``.

    Args:
        weight: (O, Cg, kh, kw), the first K columns of W.
        D: (C, K, S) with C = Cg * groups, K = kh * kw.
        weight_extra: (O, Cg, S - K) or None when S == K.
        groups: conv groups; D[c] is applied to every kernel entry that reads channel c.
    """
    delta = torch.bmm(D, by_channel(full_W(weight, weight_extra), groups))  # (C, K, Og)
    return weight + to_kernel_layout(delta, groups).reshape(weight.shape)


def full_W(weight: torch.Tensor, weight_extra: Optional[torch.Tensor]) -> torch.Tensor:
    """W = [weight | weight_extra] as (O, Cg, S)."""
    W = weight.reshape(weight.shape[0], weight.shape[1], -1)
    if weight_extra is None:
        return W
    return torch.cat([W, weight_extra], dim=2)


def by_channel(kernel_like: torch.Tensor, groups: int) -> torch.Tensor:
    """(O, Cg, X) -> (C, X, Og): row block (gi, i) holds the Og kernels of group gi that read
    input channel gi*Cg + i (a view when groups == 1)."""
    O, Cg, X = kernel_like.shape
    Og = O // groups
    return kernel_like.reshape(groups, Og, Cg, X).permute(0, 2, 3, 1).reshape(groups * Cg, X, Og)


def to_kernel_layout(per_channel: torch.Tensor, groups: int) -> torch.Tensor:
    """(C, X, Og) per-input-channel blocks -> a new contiguous (O, Cg, X) tensor.

    With groups == 1 this is a 2-D transpose of a (C·X, O) matrix, which torch copies block-wise;
    reading the permuted view element-wise (as an add with it would) is ~2x slower on CPU.
    """
    C, X, Og = per_channel.shape
    if groups == 1:
        return per_channel.reshape(C * X, Og).t().contiguous().view(Og, C, X)
    Cg = C // groups
    return per_channel.reshape(groups, Cg, X, Og).permute(0, 3, 1, 2).reshape(groups * Og, Cg, X)


_IDENTITY: Dict[tuple, torch.Tensor] = {}


def plus_identity(D: torch.Tensor) -> torch.Tensor:
    """P = D + I as a new (C, K, S) tensor, I[m, m] = 1 for m < K: one broadcast add of a cached
    (K, S) identity (no autograd)."""
    return D + identity(*D.shape[1:], D.dtype, D.device)


def identity(K: int, S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (K, S) matrix I[m, m] = 1 for m < K, made once per shape, dtype and device."""
    key = (K, S, dtype, device)
    eye = _IDENTITY.get(key)
    if eye is None:
        with torch.inference_mode(False):  # torch 2.1 has no bfloat16 eye on CPU: cast one
            eye = _IDENTITY[key] = torch.eye(K, S, device=device).to(dtype)
    return eye


def compose_kernel_backward(grad_kernel: torch.Tensor,
                            weight: torch.Tensor,
                            D: torch.Tensor,
                            weight_extra: Optional[torch.Tensor] = None,
                            groups: int = 1,
                            needs: Tuple[bool, bool, bool] = (True, True, True)):
    """Gradients of ``compose_kernel`` w.r.t. (weight, D, weight_extra), given dL/dW'
    (O, Cg, kh, kw).

    Same batched layout as the forward: dD[c] = g_c @ W_c^T, dW_c = D[c]^T @ g_c with g_c, W_c the
    (K, Og) / (S, Og) blocks of input channel c. Entries of ``needs`` that are False return None.
    """
    O, Cg, kh, kw = weight.shape
    K = kh * kw
    grad_by_channel = by_channel(grad_kernel.reshape(O, Cg, K), groups)  # (C, K, Og)
    grad_D = None
    if needs[1]:
        W_by_channel = by_channel(full_W(weight, weight_extra), groups)  # (C, S, Og)
        grad_D = torch.bmm(grad_by_channel, W_by_channel.transpose(1, 2))
    grad_weight = grad_extra = None
    if needs[0] or needs[2]:
        grad_W = to_kernel_layout(torch.bmm(D.transpose(1, 2), grad_by_channel), groups)
        if needs[0]:
            grad_weight = grad_kernel + grad_W[..., :K].reshape(O, Cg, kh, kw)
        if needs[2] and weight_extra is not None:
            grad_extra = grad_W[..., K:]
    return grad_weight, grad_D, grad_extra


def fold_kernel(weight: torch.Tensor,
                D: Optional[torch.Tensor],
                weight_extra: Optional[torch.Tensor] = None,
                groups: int = 1) -> torch.Tensor:
    """``compose_kernel`` computed in float64 and cast back to ``weight.dtype`` (no autograd,
    no autocast): one rounding of each kernel entry. A layer without D returns a copy of weight."""
    if D is None:
        return weight.detach().clone()
    with torch.no_grad(), no_autocast(weight.device.type):
        extra = None if weight_extra is None else weight_extra.double()
        folded = compose_kernel(weight.double(), D.double(), extra, groups)
    return folded.to(weight.dtype)


def in_layout_of(kernel: torch.Tensor, weight: torch.Tensor,
                 strides_known: bool = True) -> torch.Tensor:
    """``kernel`` (W', shaped like ``weight``) with ``weight``'s strides: conv2d picks its
    memory format from its input's and its weight's, so a layer made channels_last convolves
    (and returns) channels_last, as nn.Conv2d does. No copy where the strides agree already
    (always for a contiguous weight and a contiguous W').

    ``strides_known=False`` while compiling: dynamo's fake tensors may report strides the
    compiled code does not give (a depthwise W' reads as channels_last there and comes out
    contiguous), so every weight not in the default row-major layout gets the copy."""
    if kernel.stride() == weight.stride() and (strides_known or _is_row_major(weight)):
        return kernel
    return torch.empty_like(weight, dtype=kernel.dtype).copy_(kernel)


def _is_row_major(tensor: torch.Tensor) -> bool:
    """Strides exactly those of a new contiguous tensor (size-1 dimensions included)."""
    sizes, strides = tensor.shape, tensor.stride()
    expected = 1
    for dim in range(tensor.dim() - 1, -1, -1):  # (TorchScript has no reversed / zip)
        if strides[dim] != expected:
            return False
        expected *= sizes[dim]
    return True


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs convolutions in on ``device_type``; None while autocast is off
    there (or the device type has none). Works on torch 2.0 and later."""
    if not isinstance(device_type, str):  # torch.fx tracing: a Proxy's device
        return None
    try:
        if hasattr(torch, 'get_autocast_dtype'):  # torch >= 2.4
            if torch.is_autocast_enabled(device_type):
                return torch.get_autocast_dtype(device_type)
            return None
        if device_type == 'cuda' and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == 'cpu' and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
    except (RuntimeError, TypeError):  # device types without autocast (meta)
        pass
    return None


def no_autocast(device_type: str):
    """A context that turns autocast off for ``device_type`` if it is on (compose in the
    parameters' own precision), else does nothing."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
