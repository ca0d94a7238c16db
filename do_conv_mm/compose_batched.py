"""Launch-light composition kernels for the training path on CUDA (and any non-CPU device).

A GPU training step is launch-bound: what costs is the number of kernels, not their FLOPs. Per
layer (groups == 1, or depthwise) this issues

* forward: ``P = D + I`` (one broadcast add) and one batched matmul written straight into W' in
  its (O, Cg, kh, kw) layout through a strided ``out=`` view (no permute copy);
* backward: W' recomposed from the saved P (one matmul), dL/dD (one matmul) and dL/dweight (one
  matmul into a strided view); D_mul > kh·kw adds one matmul each for the extra columns.

Per input channel c the composition is a small GEMM, W'_cᵀ (Og×K) = W_cᵀ (Og×S) · P_cᵀ (S×K),
and ``weight.view(O, C, K).transpose(0, 1)`` is a (C, O, K) view that a batched GEMM reads and
writes directly (groups == 1; depthwise convs have a (g, Og, K) view).
Grouped convs whose channel blocks are no single strided batch (groups > 1 with more than one
input channel per group) use block-diagonal factors per group (:mod:`.compose_grouped`), and
beyond ``MAX_CHANNELS_PER_GROUP`` channels per group the formulas of :mod:`.composition`.
Device-independent: tested against ``compose_kernel`` in float64 on CPU tensors.
"""
from typing import Any, Optional, Tuple

import torch

from .compose_grouped import (MAX_CHANNELS_PER_GROUP, block_diagonal_factors, blocks_backward,
                              compose_with_blocks)
from .composition import compose_kernel, compose_kernel_backward, plus_identity

__all__ = ['BatchedComposer', 'BATCHED_COMPOSER']


def channel_major(kernel_like: torch.Tensor, groups: int) -> Optional[torch.Tensor]:
    """(O, Cg, X) -> a (C, Og, X) *view* whose block c holds the Og rows that read input channel
    c; None where no such view exists (groups > 1 and Cg > 1). Needs X-contiguous rows."""
    O, Cg, X = kernel_like.shape
    if groups == 1:
        return kernel_like.transpose(0, 1)
    if Cg == 1:
        return kernel_like.view(groups, O // groups, X)
    return None


class BatchedComposer:
    """Stateless: the token it hands from forward to backward is P = D + I (C·K·S values) for
    channel-major layouts, the block-diagonal factors of :mod:`.compose_grouped` for grouped
    convs with Cg <= MAX_CHANNELS_PER_GROUP, and None for wider groups (general formulas)."""

    @staticmethod
    def _layout(weight: torch.Tensor, groups: int) -> str:
        Cg = weight.shape[1]
        if groups == 1 or Cg == 1:
            return 'channel_major'
        return 'blocks' if Cg <= MAX_CHANNELS_PER_GROUP else 'general'

    @staticmethod
    def _compose_with(P, weight, weight_extra, groups) -> torch.Tensor:
        O, Cg, kh, kw = weight.shape
        K = kh * kw
        weight = weight.contiguous()  # no copy unless the model was made channels_last
        kernel = torch.empty_like(weight, memory_format=torch.contiguous_format)
        kernel_cm = channel_major(kernel.view(O, Cg, K), groups)  # (C, Og, K) view of W'
        P_taps = P if weight_extra is None else P[:, :, :K]  # (C, K, K)
        torch.bmm(channel_major(weight.view(O, Cg, K), groups), P_taps.transpose(1, 2),
                  out=kernel_cm)
        if weight_extra is not None:
            extra_cm = channel_major(weight_extra.contiguous(), groups)
            kernel_cm.baddbmm_(extra_cm, P[:, :, K:].transpose(1, 2))
        return kernel

    def compose(self, weight, D, weight_extra, groups) -> Tuple[torch.Tensor, Any]:
        """W' for a forward pass: (kernel, token); hand the token to ``kernel_for_backward``."""
        layout = self._layout(weight, groups)
        if layout == 'channel_major':
            P = plus_identity(D)
            return self._compose_with(P, weight, weight_extra, groups), P
        if layout == 'blocks':
            factors = block_diagonal_factors(D, groups)
            return compose_with_blocks(factors, weight, weight_extra, groups), factors
        return compose_kernel(weight, D, weight_extra, groups), None

    def kernel_for_backward(self, token, weight, D, weight_extra, groups) -> torch.Tensor:
        layout = self._layout(weight, groups)
        if layout == 'channel_major':
            return self._compose_with(token, weight, weight_extra, groups)
        if layout == 'blocks':
            return compose_with_blocks(token, weight, weight_extra, groups)
        return compose_kernel(weight, D, weight_extra, groups)

    def backward(self, grad_kernel, weight, D, weight_extra, groups, token, needs):
        """(dL/dweight, dL/dD, dL/dweight_extra) from dL/dW' (any memory format)."""
        layout = self._layout(weight, groups)
        if layout == 'channel_major':
            return self._channel_major_backward(grad_kernel, weight, D, weight_extra, groups,
                                                token, needs)
        if layout == 'blocks':
            return blocks_backward(grad_kernel, weight, D, weight_extra, groups, token, needs)
        return compose_kernel_backward(grad_kernel, weight, D, weight_extra, groups, needs)

    @staticmethod
    def _channel_major_backward(grad_kernel, weight, D, weight_extra, groups, P, needs):
        """The channel-major gradients: one matmul each, written through strided views."""
        O, Cg, kh, kw = weight.shape
        K = kh * kw
        grad_kernel = grad_kernel.contiguous()  # no copy unless it came channels_last
        G_cm = channel_major(grad_kernel.view(O, Cg, K), groups)  # (C, Og, K)
        grad_weight = grad_D = grad_extra = None
        if needs[1]:
            grad_D = torch.empty_like(D)
            G_cm_t = G_cm.transpose(1, 2)  # (C, K, Og)
            torch.bmm(G_cm_t, channel_major(weight.contiguous().view(O, Cg, K), groups),
                      out=grad_D if weight_extra is None else grad_D[:, :, :K])
            if weight_extra is not None:
                torch.bmm(G_cm_t, channel_major(weight_extra.contiguous(), groups),
                          out=grad_D[:, :, K:])
        if needs[0]:
            grad_weight = torch.empty_like(grad_kernel)
            torch.bmm(G_cm, P if weight_extra is None else P[:, :, :K],
                      out=channel_major(grad_weight.view(O, Cg, K), groups))
        if needs[2] and weight_extra is not None:
            grad_extra = torch.empty_like(weight_extra, memory_format=torch.contiguous_format)
            torch.bmm(G_cm, P[:, :, K:], out=channel_major(grad_extra, groups))
        return grad_weight, grad_D, grad_extra


BATCHED_COMPOSER = BatchedComposer()
