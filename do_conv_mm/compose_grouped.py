"""Launch-light composition for grouped convs with several input channels per group.

With groups g > 1 and Cg = C / g > 1 the kernel entries reading input channel c = gi·Cg + i are
no single strided batch of W (see :func:`do_conv_mm.compose_batched.channel_major`), so the
per-channel GEMMs cannot be one ``bmm`` over views. Per group they are one GEMM with a
block-diagonal right factor instead:

    W'_g (Og, Cg·K) = weight_g (Og, Cg·K) · B_g (Cg·K, Cg·K) + extra_g (Og, Cg·R) · E_g (Cg·R, Cg·K)
    B_g[i·K + s, i·K + m] = (D + I)[gi·Cg + i, m, s],   E_g[i·R + r, i·K + m] = D[.., m, K + r]

with K = kh·kw, R = D_mul - K, and every other entry of B, E zero. ``weight.view(g, Og, Cg·K)``
and W' in its (O, Cg, kh, kw) layout are plain views, so a forward is: one zero fill, one add
writing D + I into B's diagonal blocks through a strided view, and one batched matmul. Backward
recomposes W' (one matmul), dL/dweight = G·Bᵀ (one matmul), dL/dD = the diagonal blocks of
weight_gᵀ·G (one matmul and one strided copy). With E (D_mul > kh·kw), forward takes one copy
and one matmul more, backward three matmuls and one copy more.

The block products cost Cg times the FLOPs of the per-channel ones and B holds Cg times the
values of D, so this is used for Cg <= ``MAX_CHANNELS_PER_GROUP`` only (ResNeXt's 3×3 convs,
Cg 4 to 32): there the largest product is ~0.2 GFLOP, microseconds on a datacentre GPU, and the
saved launches cost more. Wider groups take the general formulas of :mod:`.composition`.
Device-independent: tested against ``compose_kernel`` in float64 on CPU tensors.
"""
from typing import Optional, Tuple

import torch

from .composition import identity

__all__ = ['MAX_CHANNELS_PER_GROUP', 'BlockDiagonalFactors', 'block_diagonal_factors',
           'compose_with_blocks', 'blocks_backward']

MAX_CHANNELS_PER_GROUP = 32

# (B, E): B (g, Cg·K, Cg·K) and E (g, Cg·R, Cg·K) or None; the token from forward to backward.
BlockDiagonalFactors = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _diagonal_blocks(factor: torch.Tensor, Cg: int) -> torch.Tensor:
    """(g, Cg·X, Cg·K) -> the (g, X, K, Cg) strided view of its Cg diagonal (X, K) blocks."""
    g, rows, cols = factor.shape
    return factor.view(g, Cg, rows // Cg, Cg, cols // Cg).diagonal(dim1=1, dim2=3)


def _D_blocks(D: torch.Tensor, groups: int, columns: slice) -> torch.Tensor:
    """D (C, K, S) -> a (g, s, m, i) view of D[gi·Cg + i, m, s] for s in ``columns``."""
    C, K, S = D.shape
    return D.view(groups, C // groups, K, S)[..., columns].permute(0, 3, 2, 1)


def block_diagonal_factors(D: torch.Tensor, groups: int) -> BlockDiagonalFactors:
    """B and E built from D (one zero fill, one add, one copy when D_mul > kh·kw)."""
    C, K, S = D.shape
    Cg = C // groups
    both = torch.zeros(groups, Cg * S, Cg * K, dtype=D.dtype, device=D.device)
    B = both[:, :Cg * K]
    eye = identity(K, S, D.dtype, D.device)[:, :K].unsqueeze(-1)  # I[s, m], each channel
    torch.add(_D_blocks(D, groups, slice(0, K)), eye, out=_diagonal_blocks(B, Cg))
    E = None
    if S > K:
        E = both[:, Cg * K:]
        _diagonal_blocks(E, Cg).copy_(_D_blocks(D, groups, slice(K, S)))
    return B, E


def _by_group(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """(O, Cg, ...) contiguous -> the (g, Og, Cg·...) view."""
    return tensor.view(groups, tensor.shape[0] // groups, -1)


def compose_with_blocks(factors: BlockDiagonalFactors, weight: torch.Tensor,
                        weight_extra: Optional[torch.Tensor], groups: int) -> torch.Tensor:
    """W' (O, Cg, kh, kw), contiguous: one matmul (two with weight_extra)."""
    B, E = factors
    kernel = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    kernel_g = _by_group(kernel, groups)
    torch.bmm(_by_group(weight.contiguous(), groups), B, out=kernel_g)
    if E is not None:
        kernel_g.baddbmm_(_by_group(weight_extra.contiguous(), groups), E)
    return kernel


def blocks_backward(grad_kernel: torch.Tensor, weight: torch.Tensor, D: torch.Tensor,
                    weight_extra: Optional[torch.Tensor], groups: int,
                    factors: BlockDiagonalFactors, needs):
    """(dL/dweight, dL/dD, dL/dweight_extra) from dL/dW'; False entries of ``needs`` -> None."""
    B, E = factors
    Cg, K = weight.shape[1], B.shape[-1] // weight.shape[1]
    G = _by_group(grad_kernel.contiguous(), groups)  # (g, Og, Cg·K)
    grad_weight = grad_D = grad_extra = None
    if needs[1]:
        grad_D = torch.empty_like(D)
        weight_g = _by_group(weight.contiguous(), groups)
        _D_blocks(grad_D, groups, slice(0, K)).copy_(
            _diagonal_blocks(torch.bmm(weight_g.transpose(1, 2), G), Cg))
        if E is not None:
            extra_g = _by_group(weight_extra.contiguous(), groups)
            _D_blocks(grad_D, groups, slice(K, D.shape[2])).copy_(
                _diagonal_blocks(torch.bmm(extra_g.transpose(1, 2), G), Cg))
    if needs[0]:
        grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        torch.bmm(G, B.transpose(1, 2), out=_by_group(grad_weight, groups))
    if needs[2] and E is not None:
        grad_extra = torch.empty(weight_extra.shape, dtype=weight_extra.dtype,
                                 device=weight_extra.device)
        torch.bmm(G, E.transpose(1, 2), out=_by_group(grad_extra, groups))
    return grad_weight, grad_D, grad_extra
