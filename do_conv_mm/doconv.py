"""DO-Conv: a k×k convolution over-parameterised by a per-input-channel depthwise kernel.

The layer, its kernel composition, its registration in mmcv's conv registry and its fold to a
plain :class:`torch.nn.Conv2d` live here, in that order.

Notation (shapes):
    O = out_channels, C = in_channels, g = groups, Og = O / g, Cg = C / g,
    K = kh * kw (spatial taps), S = D_mul >= K (depth of the over-parameterisation).

    W  = [weight | weight_extra]     (O, Cg, S)   ``weight`` is Conv2d-shaped (O, Cg, kh, kw)
    D                                 (C, K, S)    one K×S matrix per *input channel*, zero-init
    W'[o, i, m] = Σ_s (D + I)[c, m, s] · W[o, i, s]
                = weight[o, i, m] + Σ_s D[c, m, s] · W[o, i, s]
    with c = c(o, i) = (o // Og) · Cg + i, the input channel that kernel entry (o, i) reads.

Because D starts at zero, a fresh layer (or one warm-started from a plain checkpoint) computes
exactly the plain convolution ``conv2d(x, weight)``. 1×1 kernels carry no D: they are plain convs.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ['DOConv2d', 'compose_kernel', 'compose_kernel_into', 'compose_kernel_backward',
           'is_doconv_layer_type']


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

    Built from reshapes and one batched matmul (no einsum), so it traces and exports anywhere.
    """
    delta = torch.bmm(D, _by_channel(_full_W(weight, weight_extra), groups))  # (C, K, Og)
    return _to_kernel_layout(delta, groups).reshape(weight.shape).add_(weight)


def _full_W(weight: torch.Tensor, weight_extra: Optional[torch.Tensor]) -> torch.Tensor:
    """W = [weight | weight_extra] as (O, Cg, S)."""
    W = weight.reshape(weight.shape[0], weight.shape[1], -1)
    return W if weight_extra is None else torch.cat([W, weight_extra], dim=2)


def _by_channel(kernel_like: torch.Tensor, groups: int) -> torch.Tensor:
    """(O, Cg, X) -> (C, X, Og): row block (gi, i) holds the Og kernels of group gi that read
    input channel gi*Cg + i (a view when groups == 1)."""
    O, Cg, X = kernel_like.shape
    Og = O // groups
    return kernel_like.reshape(groups, Og, Cg, X).permute(0, 2, 3, 1).reshape(groups * Cg, X, Og)


def _to_kernel_layout(by_channel: torch.Tensor, groups: int) -> torch.Tensor:
    """(C, X, Og) per-input-channel blocks -> a new contiguous (O, Cg, X) tensor.

    With groups == 1 this is a 2-D transpose of a (C·X, O) matrix, which torch copies block-wise;
    reading the permuted view element-wise (as an add with it would) is ~2x slower on CPU.
    """
    C, X, Og = by_channel.shape
    if groups == 1:
        return by_channel.view(C * X, Og).t().contiguous().view(Og, C, X)
    Cg = C // groups
    return by_channel.reshape(groups, Cg, X, Og).permute(0, 3, 1, 2).reshape(groups * Og, Cg, X)


def compose_kernel_backward(grad_kernel: torch.Tensor,
                            weight: torch.Tensor,
                            D: torch.Tensor,
                            weight_extra: Optional[torch.Tensor] = None,
                            groups: int = 1,
                            needs: Tuple[bool, bool, bool] = (True, True, True)):
    """Gradients of ``compose_kernel`` w.r.t. (weight, D, weight_extra) given dL/dW' (O, Cg, kh, kw).

    Same batched layout as the forward: dD[c] = g_c @ W_c^T, dW_c = D[c]^T @ g_c with g_c, W_c the
    (K, Og) / (S, Og) blocks of input channel c. Entries of ``needs`` that are False return None.
    """
    O, Cg, kh, kw = weight.shape
    K = kh * kw
    grad_by_channel = _by_channel(grad_kernel.reshape(O, Cg, K), groups)  # (C, K, Og)
    grad_D = None
    if needs[1]:
        W_by_channel = _by_channel(_full_W(weight, weight_extra), groups)  # (C, S, Og)
        grad_D = torch.bmm(grad_by_channel, W_by_channel.transpose(1, 2))
    grad_weight = grad_extra = None
    if needs[0] or needs[2]:
        grad_W = _to_kernel_layout(torch.bmm(D.transpose(1, 2), grad_by_channel), groups)
        if needs[0]:
            grad_weight = grad_kernel + grad_W[..., :K].reshape(O, Cg, kh, kw)
        if needs[2] and weight_extra is not None:
            grad_extra = grad_W[..., K:]
    return grad_weight, grad_D, grad_extra


# Training path. Composing a large kernel into a *fresh* tensor costs more in page faults than in
# arithmetic (glibc maps allocations over 32 MB straight from the OS, so every new W' of e.g.
# PSPNet's 512x4096x3x3 head conv is faulted in page by page). The training Function therefore
# keeps such kernels in a per-layer buffer that lives across steps, composes in output-channel
# blocks small enough to come from the allocator's heap, accumulates dL/dD over the same blocks
# and turns dL/dW' into dL/dweight in place.
_BLOCK_ELEMENTS = 1 << 21  # ~8 MB of fp32 per temporary block
_KEEP_MIN_BYTES = 32 << 20  # glibc's largest mmap threshold: bigger blocks always come fresh


def _plus_identity(D: torch.Tensor) -> torch.Tensor:
    """D + I as a new (C, K, S) tensor, I[m, m] = 1 for m < K."""
    K = D.shape[1]
    shifted = D.clone()
    shifted[:, :, :K].diagonal(dim1=1, dim2=2).add_(1)
    return shifted


def _per_channel_matmul_into(rows: torch.Tensor, matrices: torch.Tensor,
                             source_by_channel: torch.Tensor) -> torch.Tensor:
    """rows (O, C·K) <- matrices[c] (K, X) @ source_by_channel[c] (X, O) for every channel c,
    written in kernel layout, in blocks of output channels. Each block reads its source rows
    before it writes its output rows, so ``rows`` may be the source itself. Returns ``rows``."""
    C, K, _ = matrices.shape
    step = max(1, _BLOCK_ELEMENTS // (C * K))
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
    W_by_channel = _by_channel(_full_W(weight, weight_extra), 1)  # (C, S, O), a view if S == K
    _per_channel_matmul_into(out.view(out.shape[0], -1), _plus_identity(D), W_by_channel)
    return out


def _weight_grad_in_place(grad_kernel: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """dL/dweight = per-channel (D + I)ᵀ dL/dW', written over ``grad_kernel`` (O, C, kh, kw)
    (groups == 1, S == K). Returns ``grad_kernel``."""
    O, C = grad_kernel.shape[:2]
    grad_by_channel = _by_channel(grad_kernel.view(O, C, -1), 1)  # (C, K, O) view
    _per_channel_matmul_into(grad_kernel.view(O, -1), _plus_identity(D).transpose(1, 2),
                             grad_by_channel)
    return grad_kernel


def _grad_D_blocked(grad_kernel: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """dL/dD (C, K, S) = Σ_o g[o, c]ᵀ W[o, c] for groups == 1, from g = dL/dW' (O, C, K) and
    W (O, C, S); accumulated over blocks of output channels, each copied to the (C, block, ·)
    layout a batched matmul reads fast (bmm on the whole strided views is several times slower)."""
    O, C, K = grad_kernel.shape
    S = W.shape[2]
    grad_D = grad_kernel.new_zeros(C, K, S)
    step = max(1, _BLOCK_ELEMENTS // (C * max(K, S)))
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
    output channels for groups == 1, so no kernel-sized temporaries."""
    if groups != 1:
        return compose_kernel_backward(grad_kernel, weight, D, weight_extra, groups, needs)
    O, C = weight.shape[:2]
    grad_D = None
    if needs[1]:  # before grad_kernel is overwritten
        grad_D = _grad_D_blocked(grad_kernel.view(O, C, -1), _full_W(weight, weight_extra))
    if weight_extra is not None:
        grad_weight, _, grad_extra = compose_kernel_backward(
            grad_kernel, weight, D, weight_extra, 1, (needs[0], False, needs[2]))
        return grad_weight, grad_D, grad_extra
    return (_weight_grad_in_place(grad_kernel, D) if needs[0] else None), grad_D, None


class _KernelWorkspace:
    """Where one layer's training path composes its kernel W'.

    A kernel of at least ``_KEEP_MIN_BYTES`` is composed into a buffer the layer keeps across
    steps (a fresh tensor that size is page-faulted in on every allocation) and is reused by
    backward. Smaller kernels get a fresh tensor that the allocator serves from memory it holds,
    freed after the convolution and recomposed in backward, so they cost no training memory.
    Writes bump the buffer's version counter, which tells a backward pass whether the buffer still
    holds the kernel its forward composed (it does not once a shared layer has run again).
    """

    def __init__(self):
        self.buffer: Optional[torch.Tensor] = None

    def take(self, weight: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        """(tensor to compose W' into, whether it is the kept buffer)."""
        if weight.numel() * weight.element_size() < _KEEP_MIN_BYTES:
            return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device), False
        buffer = self.buffer
        if (buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype
                or buffer.device != weight.device):
            buffer = self.buffer = torch.empty(weight.shape, dtype=weight.dtype,
                                               device=weight.device)
        return buffer, True

    def compose(self, weight, D, weight_extra, groups):
        """W' for a forward pass: (kernel, token); hand the token to ``kernel_for_backward``."""
        out, kept = self.take(weight)
        kernel = compose_kernel_into(out, weight, D, weight_extra, groups)
        return kernel, ((kernel, kernel._version) if kept else None)

    def kernel_for_backward(self, token, weight, D, weight_extra, groups) -> torch.Tensor:
        """The kept kernel if no later call overwrote it, else W' composed again."""
        if token is not None and token[0]._version == token[1]:
            return token[0]
        return compose_kernel_into(self.take(weight)[0], weight, D, weight_extra, groups)


class _ComposedConv2d(torch.autograd.Function):
    """``conv2d(x, compose_kernel(weight, D, weight_extra, groups), bias)`` for training.

    Saves only its inputs, which the layer holds anyway. W' is taken from the layer's
    workspace: a large kernel stays in the kept buffer (one per layer, not one per call) and
    backward reuses it unless a later call overwrote it; a small one is recomposed in backward.
    Input must already be padded for non-'zeros' padding modes; ``padding`` is numeric.
    """

    @staticmethod
    def forward(ctx, x, weight, D, weight_extra, bias, workspace, stride, padding, dilation,
                groups):
        ctx.save_for_backward(x, weight, D, weight_extra)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        kernel, ctx.kernel_token = workspace.compose(weight, D, weight_extra, groups)
        ctx.workspace = workspace
        return F.conv2d(x, kernel, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, D, weight_extra = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        needs_param = ctx.needs_input_grad[1:4]
        kernel = ctx.workspace.kernel_for_backward(ctx.kernel_token, weight, D, weight_extra,
                                                   groups)
        grad_x, grad_kernel, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, x, kernel, ctx.bias_shape, stride, padding, dilation, False, [0, 0],
            groups, [ctx.needs_input_grad[0], any(needs_param), ctx.needs_input_grad[4]])
        grad_weight = grad_D = grad_extra = None
        if any(needs_param):
            grad_weight, grad_D, grad_extra = compose_kernel_backward_(
                grad_kernel, weight, D, weight_extra, groups, needs_param)
        return grad_x, grad_weight, grad_D, grad_extra, grad_bias, None, None, None, None, None


def _no_autocast(device_type: str):
    """Compose in the parameters' own precision even inside an autocast region."""
    if device_type in ('cpu', 'cuda') and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return _NullContext()


class _NullContext:

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class DOConv2d(nn.Conv2d):
    """Depthwise over-parameterised Conv2d (Cao et al., IEEE TIP 2022); a drop-in for nn.Conv2d.

    Positional arguments are exactly those of :class:`torch.nn.Conv2d`; ``D_mul`` is keyword-only
    (default kh*kw, must be >= kh*kw). Parameters: ``weight`` (O, Cg, kh, kw), ``bias`` (O,) as in
    Conv2d, ``D`` (C, kh*kw, D_mul) zero-initialised, and ``weight_extra`` (O, Cg, D_mul - kh*kw)
    only when D_mul > kh*kw. For 1×1 kernels ``D`` and ``weight_extra`` are None (a plain conv).

    The forward pass convolves with ``compose_kernel(weight, D, weight_extra, groups)``. Training
    keeps a kernel of 32 MiB or more in a per-layer buffer (reused by every step, freed on a
    train/eval switch); smaller kernels cost no memory beyond the plain conv's. When no gradient
    is needed the composed kernel is cached and reused until a parameter changes (tracked by
    tensor version and storage), so unfolded eval costs what a plain conv costs.
    ``to_conv2d()`` / :func:`do_conv_mm.fold_doconv` fold it into a plain Conv2d for deployment.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size,
                 stride=1,
                 padding=0,
                 dilation=1,
                 groups: int = 1,
                 bias: bool = True,
                 padding_mode: str = 'zeros',
                 device=None,
                 dtype=None,
                 *,
                 D_mul: Optional[int] = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        kh, kw = self.kernel_size
        taps = kh * kw
        if D_mul is not None and (isinstance(D_mul, bool) or not isinstance(D_mul, int)):
            raise TypeError(f'DOConv2d: D_mul must be an int or None, got {D_mul!r} '
                            f'({type(D_mul).__name__}).')
        if taps == 1:
            # A 1×1 DO-Conv adds nothing a 1×1 conv cannot express: keep it plain.
            self.D_mul = 1
            self.register_parameter('D', None)
            self.register_parameter('weight_extra', None)
        else:
            D_mul = taps if D_mul is None else D_mul
            if D_mul < taps:
                raise ValueError(
                    f'DOConv2d: D_mul={D_mul} is smaller than kh*kw={taps} for kernel '
                    f'{self.kernel_size}; that is no over-parameterisation and would zero part '
                    f'of the kernel. Use D_mul >= {taps} or leave it unset (default {taps}).')
            self.D_mul = D_mul
            factory = dict(device=self.weight.device, dtype=self.weight.dtype)
            self.D = nn.Parameter(torch.zeros(in_channels, taps, D_mul, **factory))
            if D_mul > taps:
                self.weight_extra = nn.Parameter(
                    torch.empty(out_channels, in_channels // groups, D_mul - taps, **factory))
            else:
                self.register_parameter('weight_extra', None)
            self._reset_doconv_parameters()
        self._cached_kernel = None
        self._cached_key = None
        self._kernel_workspace = _KernelWorkspace()

    # ----------------------------------------------------------------------------------------
    # Initialisation and warm start
    # ----------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, 'D', None) is not None:
            self._reset_doconv_parameters()

    def _reset_doconv_parameters(self) -> None:
        """D = 0 (identity); extra W columns drawn like ``weight`` (Conv2d's default bound)."""
        with torch.no_grad():
            self.D.zero_()
            if self.weight_extra is not None:
                bound = 1.0 / math.sqrt(self.weight[0].numel())
                self.weight_extra.uniform_(-bound, bound)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """A plain-conv state dict (weight without D) loads as the identity: D = 0."""
        plain_source = (self.D is not None and prefix + 'D' not in state_dict
                        and prefix + 'weight' in state_dict)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if plain_source:
            for name in ('D', 'weight_extra'):
                if prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)
            with torch.no_grad():
                self.D.zero_()

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------
    def composed_weight(self) -> torch.Tensor:
        """The kernel this layer convolves with, W' (O, Cg, kh, kw)."""
        if self.D is None:
            return self.weight
        with _no_autocast(self.weight.device.type):
            return compose_kernel(self.weight, self.D, self.weight_extra, self.groups)

    def _needs_graph(self) -> bool:
        return torch.is_grad_enabled() and any(
            p.requires_grad for p in (self.weight, self.D, self.weight_extra) if p is not None)

    def _use_composed_conv(self, input: torch.Tensor) -> bool:
        """Train with the memory-saving Function: eager mode, gradients, no autocast.

        Compilers, tracers and autocast see the plain autograd expression instead.
        """
        return (self._needs_graph() and not isinstance(self.padding, str)
                and not torch.is_autocast_enabled(input.device.type)
                and not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                         or torch.jit.is_scripting()))

    def _cache_key(self):
        return tuple((p._version, p.data_ptr(), p.dtype, p.device)
                     for p in (self.weight, self.D, self.weight_extra) if p is not None)

    def _kernel(self) -> torch.Tensor:
        """Composed kernel; reused from the cache when no gradient can flow through it."""
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
                or self._needs_graph()):
            return self.composed_weight()
        key = self._cache_key()
        if self._cached_key != key:
            self._cached_kernel = self.composed_weight().detach()
            self._cached_key = key
        return self._cached_kernel

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Convolve with the composed kernel of ``weight``.

        ``weight`` is normally ``self.weight``. Callers that pass a transformed weight (mmcv's
        efficient_conv_bn_eval passes ``weight`` scaled per output channel) get it composed with
        D; composition is linear in W, so that is exact when D_mul == kh*kw.
        """
        if self.D is not None:
            if weight is self.weight and self._use_composed_conv(input):
                if self.padding_mode != 'zeros':
                    input = F.pad(input, self._reversed_padding_repeated_twice,
                                  mode=self.padding_mode)
                    padding = (0, 0)
                else:
                    padding = self.padding
                return _ComposedConv2d.apply(input, self.weight, self.D, self.weight_extra, bias,
                                             self._kernel_workspace, self.stride, padding,
                                             self.dilation, self.groups)
            if weight is self.weight:
                weight = self._kernel()
            elif self.weight_extra is not None:
                raise NotImplementedError(
                    'DOConv2d: a substitute weight was passed to _conv_forward (e.g. by '
                    'efficient_conv_bn_eval) on a layer with D_mul > kh*kw, whose extra columns '
                    'cannot be scaled with it. Fold the model first (do_conv_mm.fold_doconv) or '
                    'use the default D_mul.')
            else:
                with _no_autocast(weight.device.type):
                    weight = compose_kernel(weight, self.D, None, self.groups)
        return super()._conv_forward(input, weight, bias)

    def train(self, mode: bool = True):
        """Switching mode drops the eval cache and the training workspace (memory back)."""
        self._cached_kernel = self._cached_key = None
        self._kernel_workspace.buffer = None
        return super().train(mode)

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state['_cached_kernel'] = state['_cached_key'] = None
        state['_kernel_workspace'] = _KernelWorkspace()  # copies never share a buffer
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + f', D_mul={self.D_mul}'

    # ----------------------------------------------------------------------------------------
    # Conversion both ways
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, D_mul: Optional[int] = None) -> 'DOConv2d':
        """A DOConv2d that computes exactly what ``conv`` computes (D = 0), weights shared."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f'DOConv2d.from_conv2d expects a plain torch.nn.Conv2d, got '
                            f'{type(conv).__name__}.')
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                    conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                    D_mul=D_mul)
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer.train(conv.training)
        return layer

    @torch.no_grad()
    def to_conv2d(self) -> nn.Conv2d:
        """Fold into a plain nn.Conv2d (same hyper-parameters, device, dtype, training flag).

        The kernel is composed in float64 and cast back to the parameters' dtype.
        """
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, self.bias is not None,
                         self.padding_mode, device=self.weight.device, dtype=self.weight.dtype)
        conv.weight.copy_(fold_kernel(self.weight, self.D, self.weight_extra, self.groups))
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        conv.weight.requires_grad_(self.weight.requires_grad)
        conv.train(self.training)
        return conv


def fold_kernel(weight: torch.Tensor,
                D: Optional[torch.Tensor],
                weight_extra: Optional[torch.Tensor] = None,
                groups: int = 1) -> torch.Tensor:
    """``compose_kernel`` computed in float64 and cast back to ``weight.dtype`` (no autograd)."""
    if D is None:
        return weight.detach().clone()
    with torch.no_grad(), _no_autocast(weight.device.type):
        extra = None if weight_extra is None else weight_extra.double()
        folded = compose_kernel(weight.double(), D.double(), extra, groups)
    return folded.to(weight.dtype)


LAYER_TYPE_NAMES = ('DOConv', 'DOConv2d')


def is_doconv_layer_type(value) -> bool:
    """True for a config ``type`` naming this layer: 'DOConv', 'DOConv2d', a scoped
    'scope.DOConv', or the DOConv2d class itself."""
    if isinstance(value, type):
        return issubclass(value, DOConv2d)
    return isinstance(value, str) and value.rpartition('.')[2] in LAYER_TYPE_NAMES


def _register() -> None:
    """Register in mmengine's root MODELS, where mmcv's build_conv_layer looks conv types up."""
    from mmengine.registry import MODELS
    MODELS.register_module(name=list(LAYER_TYPE_NAMES), module=DOConv2d)


_register()
