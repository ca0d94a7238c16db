"""CPU composition kernels for the training path: blocked, with a per-layer kept buffer.

On CPU, composing a large kernel into a *fresh* tensor costs more in page faults than in
arithmetic: glibc maps allocations over 32 MiB straight from the OS, so every new W' of e.g.
PSPNet's 512×4096×3×3 head conv is faulted in page by page. So here:

* a kernel of at least ``KEEP_MIN_BYTES`` is composed into a buffer the layer keeps across steps
  and reused by backward (unless a later call of the same layer, a shared head, overwrote it);
  smaller kernels get a fresh tensor and are recomposed in backward (no training memory);
* composition and its backward run in blocks of output channels (~8 MB temporaries, served from
  memory the allocator holds); dL/dweight is written in place over dL/dW'.

Everything equals :func:`do_conv_mm.composition.compose_kernel` and its gradient (tested in
float64). groups != 1 falls back to the batched formulas of :mod:`do_conv_mm.composition`.
"""
from typing import Optional, Tuple

import torch

from .composition import by_channel, compose_kernel, compose_kernel_backward, full_W, \
    plus_identity

__all__ = ['BlockedComposer', 'compose_kernel_into']

BLOCK_ELEMENTS = 1 << 21  # ~8 MB of fp32 per temporary block
KEEP_MIN_BYTES = 32 << 20  # glibc's largest mmap threshold: bigger blocks always come fresh


def _per_channel_matmul_into(rows: torch.Tensor, matrices: torch.Tensor,
                             source_by_channel: torch.Tensor) -> torch.Tensor:
    """rows (O, C·K) <- matrices[c] (K, X) @ source_by_channel[c] (X, O) for every channel c,
    written in kernel layout, in blocks of output channels. Each block reads its source rows
    before it writes its output rows, so ``rows`` may be the source itself. Returns ``rows``."""
    C, K, _ = matrices.shape
    step = max(1, BLOCK_ELEMENTS // (C * K))
    for o0 in range(0, rows.shape[0], step):
        block = torch.bmm(matrices, source_by_channel[:, :, o0:o0 + step])  # (C, K, step)
        rows[o0:o0 + step].copy_(block.view(C * K, -1).t())
    return rows


def compose_kernel_into(out: torch.Tensor,
                        weight: torch.Tensor,
                        D: torch.Tensor,
                        weight_extra: Optional[torch.Tensor] = None,
                        groups: int = 1) -> torch.Tensor:
    """``out.copy_(compose_kernel(weight, D, weight_extra, groups))``, with no kernel-sized
    temporaries when groups == 1; ``out``: contiguous (O, Cg, kh, kw). No autograd; returns out."""
    if groups != 1:
        return out.copy_(compose_kernel(weight, D, weight_extra, groups))
    W_by_channel = by_channel(full_W(weight, weight_extra), 1)  # (C, S, O), a view if S == K
    _per_channel_matmul_into(out.view(out.shape[0], -1), plus_identity(D), W_by_channel)
    return out


def _weight_grad_in_place(grad_kernel: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """dL/dweight = per-channel (D + I)ᵀ dL/dW', written over the contiguous ``grad_kernel``
    (O, C, kh, kw) (groups == 1, S == K). Returns ``grad_kernel``."""
    O, C = grad_kernel.shape[:2]
    grad_by_channel = by_channel(grad_kernel.view(O, C, -1), 1)  # (C, K, O) view
    _per_channel_matmul_into(grad_kernel.view(O, -1), plus_identity(D).transpose(1, 2),
                             grad_by_channel)
    return grad_kernel


def _grad_D_blocked(grad_kernel: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """dL/dD (C, K, S) = Σ_o g[o, c]ᵀ W[o, c] for groups == 1, from g = dL/dW' (O, C, K) and
    W (O, C, S); accumulated over blocks of output channels, each copied to the (C, block, ·)
    layout a batched matmul reads fast (bmm on the whole strided views is several times slower)."""
    O, C, K = grad_kernel.shape
    S = W.shape[2]
    grad_D = grad_kernel.new_zeros(C, K, S)
    step = max(1, BLOCK_ELEMENTS // (C * max(K, S)))
    for o0 in range(0, O, step):
        g_block = grad_kernel[o0:o0 + step].transpose(0, 1).contiguous()  # (C, step, K)
        W_block = W[o0:o0 + step].transpose(0, 1).contiguous()  # (C, step, S)
        grad_D.baddbmm_(g_block.transpose(1, 2), W_block)
    return grad_D


def compose_kernel_backward_(grad_kernel: torch.Tensor,
                             weight: torch.Tensor,
                             D: torch.Tensor,
                             weight_extra: Optional[torch.Tensor] = None,
                             groups: int = 1,
                             needs: Tuple[bool, bool, bool] = (True, True, True)):
    """``compose_kernel_backward`` that may overwrite ``grad_kernel`` and return it as the weight
    gradient (groups == 1 and S == K, the case of every DO-Conv in the R50 models); blocked over
    output channels for groups == 1, so no kernel-sized temporaries. ``grad_kernel`` in any
    memory format (a channels_last one is made contiguous first)."""
    if groups != 1:
        return compose_kernel_backward(grad_kernel, weight, D, weight_extra, groups, needs)
    grad_kernel = grad_kernel.contiguous()  # no copy unless it came channels_last
    O, C = weight.shape[:2]
    grad_D = None
    if needs[1]:  # before grad_kernel is overwritten
        grad_D = _grad_D_blocked(grad_kernel.view(O, C, -1), full_W(weight, weight_extra))
    if weight_extra is not None:
        grad_weight, _, grad_extra = compose_kernel_backward(
            grad_kernel, weight, D, weight_extra, 1, (needs[0], False, needs[2]))
        return grad_weight, grad_D, grad_extra
    return (_weight_grad_in_place(grad_kernel, D) if needs[0] else None), grad_D, None


class BlockedComposer:
    """One layer's CPU training composition, and where it keeps its kernel W'.

    A kernel of at least ``KEEP_MIN_BYTES`` is composed into a buffer kept across steps and
    reused by backward; smaller kernels get a fresh tensor, freed after the convolution and
    recomposed in backward. Writes bump the buffer's version counter, which tells a backward pass
    whether the buffer still holds the kernel its forward composed (not once a shared layer has
    run again). The buffer is replaced when shape, dtype, device or inference-mode-ness change.
    """

    def __init__(self):
        self.buffer: Optional[torch.Tensor] = None

    def _take(self, weight: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        """(tensor to compose W' into, whether it is the kept buffer)."""
        if weight.numel() * weight.element_size() < KEEP_MIN_BYTES:
            return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device), False
        buffer = self.buffer
        if (buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype
                or buffer.device != weight.device
                or buffer.is_inference() != torch.is_inference_mode_enabled()):
            buffer = self.buffer = torch.empty(weight.shape, dtype=weight.dtype,
                                               device=weight.device)
        return buffer, True

    def compose(self, weight, D, weight_extra, groups):
        """W' for a forward pass: (kernel, token); hand the token to ``kernel_for_backward``."""
        out, kept = self._take(weight)
        kernel = compose_kernel_into(out, weight, D, weight_extra, groups)
        if not kept or kernel.is_inference():  # inference tensors have no version (no backward)
            return kernel, None
        return kernel, (kernel, kernel._version)

    def kernel_for_backward(self, token, weight, D, weight_extra, groups) -> torch.Tensor:
        """The kept kernel if no later call overwrote it, else W' composed again."""
        if token is not None and token[0]._version == token[1]:
            return token[0]
        return compose_kernel_into(self._take(weight)[0], weight, D, weight_extra, groups)

    def backward(self, grad_kernel, weight, D, weight_extra, groups, token, needs):
        """(dL/dweight, dL/dD, dL/dweight_extra); may overwrite ``grad_kernel``."""
        return compose_kernel_backward_(grad_kernel, weight, D, weight_extra, groups, needs)
