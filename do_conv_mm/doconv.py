"""DO-Conv: a k×k convolution over-parameterised by a per-input-channel depthwise kernel.

The layer, its registration in mmcv's conv registry and its fold to a plain
:class:`torch.nn.Conv2d` live here, in that order. The formula (:mod:`do_conv_mm.composition`):

    W  = [weight | weight_extra]     (O, Cg, S)   ``weight`` is Conv2d-shaped (O, Cg, kh, kw)
    D                                 (C, K, S)    one K×S matrix per *input channel*, zero-init
    W'[o, i, m] = Σ_s (D + I)[c, m, s] · W[o, i, s],   c = (o // Og) · Cg + i
    y = conv2d(x, W')

with O, C the output / input channels, g the groups, Og = O / g, Cg = C / g, K = kh·kw taps and
S = D_mul >= K. Because D starts at zero, a fresh layer (or one warm-started from a plain
checkpoint) computes exactly ``conv2d(x, weight)``. 1×1 kernels carry no D: they are plain convs.

How a forward pass computes W' (always from the current parameters; nothing is cached):

* parameters need gradients, eager mode: on a GPU, for groups == 1 or depthwise layers at
  the default D_mul, autograd ops that recompose W' in backward (host-light,
  :mod:`do_conv_mm.recomposed_conv`); otherwise the training Function of
  :mod:`do_conv_mm.composed_conv` (memory-light, per-device kernels, autocast inside);
* no gradient mode (``no_grad``, ``inference_mode``): the same per-device kernels, no autograd;
* everything else (frozen parameters with input gradients, ``torch.compile``, ``jit.trace``,
  ``jit.script``, ``torch.fx``, ``torch.func`` transforms, forward-mode AD, a substitute
  weight): the plain differentiable expression ``compose_kernel`` + ``conv2d``.
"""
import copy
import math
import warnings
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch.autograd import forward_ad

from .compose_batched import BATCHED_COMPOSER
from .compose_blocked import BlockedComposer
from .composed_conv import composed_conv2d
from .recomposed_conv import AUTOGRAD_PATH_ENABLED, recomposable, recomposed_conv2d
from .composition import compose_kernel, fold_kernel, in_layout_of, no_autocast

__all__ = ['DOConv2d', 'compose_kernel', 'doconv_layer_type_for', 'doconv_twin_of', 'fold_kernel',
           'is_doconv_layer_type', 'plain_layer_type', 'register_doconv_layer']

# torch.fx records calls to compose_kernel as one node (weight, D, weight_extra -> W') instead of
# tracing its reshapes, so a traced DOConv2d reads as "compose, then F.conv2d".
torch.fx.wrap('compose_kernel')


def _transforms_active() -> bool:
    """True while a compiler, tracer, torch.func transform or forward-mode AD is running: the
    layer then uses the plain expression, which all of them understand."""
    return (_is_compiling() or torch.jit.is_tracing() or _functorch_transforms_active()
            or forward_ad._current_level >= 0)


def _functorch_transforms_active() -> bool:
    active = getattr(torch._C, '_are_functorch_transforms_active', None)  # torch >= 2.0
    return bool(active()) if active is not None else False


def _compiling_query():
    """torch's "is dynamo tracing?" function, looked up once at import: a lookup inside the
    traced forward (``getattr``, ``import``) makes torch 2.1's dynamo break the graph there and
    run the check eagerly, where it says False."""
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and hasattr(compiler, 'is_compiling'):  # torch >= 2.3
        return compiler.is_compiling
    try:
        from torch._dynamo import is_compiling  # torch 2.0 - 2.2
    except ImportError:
        return lambda: False
    return is_compiling


_is_compiling = _compiling_query()


def _substitutes(weight: torch.Tensor, own: torch.Tensor) -> bool:
    """True when ``weight`` is not the layer's own ``own``. While compiling, a Parameter counts
    as the layer's own: torch 2.0-2.2's dynamo cannot compare tensors by identity."""
    if _is_compiling() and isinstance(weight, nn.Parameter):
        return False
    return weight is not own


def _output_channel_scale(new: torch.Tensor, old: torch.Tensor) -> Optional[torch.Tensor]:
    """a (O,) with ``new == a[o] * old`` row by row (up to fp rounding), else None. A row that
    is zero in both has no determined factor: it gets 1 (see :func:`_check_extra_follows`).

    Differentiable in both arguments (exact gradients when ``new`` is such a multiple), so a
    caller may rescale other tensors with it inside autograd (efficient_conv_bn_eval).
    """
    if new.shape != old.shape or new.device != old.device or new.device.type == 'meta':
        return None
    n = new.reshape(new.shape[0], -1).to(torch.promote_types(new.dtype, old.dtype))
    o = old.reshape(old.shape[0], -1).to(n.dtype)
    norm2 = (o * o).sum(1)
    scale = (n * o).sum(1) / norm2.clamp_min(torch.finfo(n.dtype).tiny)
    residual = (n - scale[:, None] * o).abs().amax(1)
    tolerance = 1e-4 * n.abs().amax(1) + torch.finfo(n.dtype).tiny
    undetermined = (norm2 == 0) & (n.abs().amax(1) > 0)
    if bool((residual > tolerance).any()) or bool(undetermined.any()):
        return None
    return torch.where(norm2 == 0, torch.ones_like(scale), scale)


def _check_extra_follows(scale: torch.Tensor, old: torch.Tensor, extra: torch.Tensor) -> None:
    """Refuse a rescale of ``weight`` by ``scale`` (O,) that ``weight_extra`` cannot follow: on
    an output channel whose ``weight`` row is zero (a pruned layer) while its extra columns are
    not, the new weight says nothing about the factor, so W' there would be wrong."""
    if bool((scale == 1).all()):
        return  # the same values re-assigned: nothing to follow
    dead = (old.detach().reshape(old.shape[0], -1) == 0).all(1)
    live_extra = (extra.detach().reshape(extra.shape[0], -1) != 0).any(1)
    rows = torch.nonzero(dead & live_extra).flatten().tolist()
    if rows:
        raise ValueError(
            f'DOConv2d: output channel(s) {rows[:8]}{" ..." if len(rows) > 8 else ""} have an '
            f'all-zero weight but non-zero weight_extra (e.g. pruned with D_mul > kh*kw), so a '
            f'per-channel rescale of weight (a BN fuser, efficient_conv_bn_eval) cannot say how '
            f'to rescale the composed kernel there. Fold first (do_conv_mm.fold_doconv(model)) '
            f'and fuse the plain convs, or zero weight_extra on those channels too (README: '
            f'pruning).')


_warned_d_trains_alone = False


def _warn_d_trains_alone() -> None:
    """Once per process: a layer frozen through ``weight`` alone still trains D."""
    global _warned_d_trains_alone
    if not _warned_d_trains_alone:
        _warned_d_trains_alone = True
        warnings.warn(
            'DOConv2d: weight is frozen but D still trains, so the composed kernel keeps '
            'changing. To freeze a DO-Conv layer, freeze all its parameters '
            '(layer.requires_grad_(False), as frozen_stages do); code that freezes only '
            'conv.weight / conv.bias (e.g. mmpretrain MoCoV3ViT(stop_grad_conv1=True)) also needs '
            'conv.D.requires_grad_(False). Ignore this if D is meant to train alone.')


# Hook tables of a module that run with it (forward / backward), in torch >= 1.13's names.
_RUN_HOOK_TABLES = ('_forward_pre_hooks', '_forward_pre_hooks_with_kwargs', '_forward_hooks',
                    '_forward_hooks_with_kwargs', '_forward_hooks_always_called',
                    '_backward_pre_hooks', '_backward_hooks')


def _carry_hooks(source: nn.Module, target: nn.Module) -> None:
    """``target`` runs the forward / backward hooks registered on ``source`` (copies of the
    tables, as torch's module swappers re-register them; a handle removes from ``source``)."""
    for table in _RUN_HOOK_TABLES:
        if source.__dict__.get(table):
            target.__dict__[table] = copy.copy(source.__dict__[table])
    if source.__dict__.get('_backward_hooks'):
        target._is_full_backward_hook = source._is_full_backward_hook


def _hook_reparametrisation(module: nn.Module) -> Optional[str]:
    """None, or what recomputes a parameter of ``module`` in a forward pre-hook (torch.nn.utils
    ``prune`` / ``spectral_norm`` / ``weight_norm``, the pre-parametrize API) and how to remove
    it. Such a layer's ``weight`` attribute is only the last forward's result (stale after an
    optimizer step) and cannot be swapped for another layer's Parameter."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, BasePruningMethod):
            return (f'torch.nn.utils.prune on {hook._tensor_name!r}; make it permanent with '
                    f'torch.nn.utils.prune.remove(module, {hook._tensor_name!r})')
        if isinstance(hook, SpectralNorm):
            return (f'torch.nn.utils.spectral_norm on {hook.name!r}; remove it with '
                    f'torch.nn.utils.remove_spectral_norm(module) (or use '
                    f'torch.nn.utils.parametrizations.spectral_norm, which DOConv2d supports)')
        if isinstance(hook, WeightNorm):
            return (f'torch.nn.utils.weight_norm on {hook.name!r}; remove it with '
                    f'torch.nn.utils.remove_weight_norm(module) (or use '
                    f'torch.nn.utils.parametrizations.weight_norm, which DOConv2d supports)')
    return None


class DOConv2d(nn.Conv2d):
    """Depthwise over-parameterised Conv2d (Cao et al., IEEE TIP 2022); a drop-in for nn.Conv2d.

    Positional arguments are exactly those of :class:`torch.nn.Conv2d`; ``D_mul`` is keyword-only
    (default kh*kw, must be >= kh*kw). Parameters: ``weight`` (O, Cg, kh, kw), ``bias`` (O,) as in
    Conv2d, ``D`` (C, kh*kw, D_mul) zero-initialised, and ``weight_extra`` (O, Cg, D_mul - kh*kw)
    only when D_mul > kh*kw. For 1×1 kernels ``D`` and ``weight_extra`` are None (a plain conv).

    Weight transformations act on ``weight``, the first kh·kw columns of W, and W' is composed
    from whatever ``weight`` is at call time: ``_conv_forward(x, w, b)`` with another ``w``
    (efficient_conv_bn_eval, parametrizations) composes that ``w``. When ``w``, or a new
    ``weight`` assigned to the layer (BN fusers), is a per-output-channel multiple of the
    current weight, ``weight_extra`` is scaled with it, so W' scales as a whole.
    ``to_conv2d()`` / :func:`do_conv_mm.fold_doconv` fold it into a plain Conv2d for deployment.
    """
    plain_class = nn.Conv2d  # what from_conv2d() takes and to_conv2d() returns (exact type)
    # On a GPU, train groups == 1 / depthwise layers through autograd ops (recomposed_conv);
    # False: through the Function, as other layouts (DO_CONV_MM_GPU_TRAINING=function).
    _recompose_in_autograd = AUTOGRAD_PATH_ENABLED
    plain_layer_type = 'Conv2d'  # plain_class's name in mmcv's conv registry

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
        if padding_mode != 'zeros' and self.plain_class is not nn.Conv2d:
            raise ValueError(f'{type(self).__name__} pads with zeros as '
                             f'{self.plain_class.__name__} does, got padding_mode='
                             f'{padding_mode!r}; use DOConv2d for other modes.')
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        kh, kw = self.kernel_size
        taps = kh * kw
        if D_mul is not None and (isinstance(D_mul, bool) or not isinstance(D_mul, int)):
            raise TypeError(f'DOConv2d: D_mul must be an int or None, got {D_mul!r} '
                            f'({type(D_mul).__name__}).')
        if taps > 1 and D_mul is not None and D_mul < taps:
            raise ValueError(
                f'DOConv2d: D_mul={D_mul} is smaller than kh*kw={taps} for kernel '
                f'{self.kernel_size}; that is no over-parameterisation and would zero part '
                f'of the kernel. Use D_mul >= {taps} or leave it unset (default {taps}).')
        if taps == 1 or self.weight.numel() == 0:
            # A 1×1 DO-Conv adds nothing a 1×1 conv cannot express, and a conv without
            # channels has no kernel to compose: keep them plain.
            self.D_mul = 1
            self.register_parameter('D', None)
            self.register_parameter('weight_extra', None)
        else:
            D_mul = taps if D_mul is None else D_mul
            self.D_mul = D_mul
            factory = dict(device=self.weight.device, dtype=self.weight.dtype)
            self.D = nn.Parameter(torch.zeros(in_channels, taps, D_mul, **factory))
            if D_mul > taps:
                self.weight_extra = nn.Parameter(
                    torch.empty(out_channels, in_channels // groups, D_mul - taps, **factory))
            else:
                self.register_parameter('weight_extra', None)
            self._reset_doconv_parameters()
        self._blocked_composer = BlockedComposer()

    # ----------------------------------------------------------------------------------------
    # Initialisation, warm start, weight replacement
    # ----------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, 'D', None) is not None:
            self._reset_doconv_parameters()

    def _reset_doconv_parameters(self, names=('D', 'weight_extra')) -> None:
        """D = 0 (identity); extra W columns drawn like ``weight`` (Conv2d's default bound,
        1/sqrt(Cg·kh·kw)). ``names``: which of the two (a partial state dict keeps the other)."""
        with torch.no_grad():
            if 'D' in names:
                self.D.zero_()
            if 'weight_extra' in names and self.weight_extra is not None:
                bound = 1.0 / math.sqrt(self.weight[0].numel())
                self.weight_extra.uniform_(-bound, bound)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """A plain-conv state dict (weight without D) loads as the identity: D = 0 and fresh
        extra columns, materialised next to the loaded weight (meta-device models loaded with
        ``assign=True`` included)."""
        plain_source = (self.D is not None and prefix + 'D' not in state_dict
                        and prefix + 'weight' in state_dict)
        self.__dict__['_loading'] = True  # assign=True sets weight: not a fuser's rescale
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
        finally:
            self.__dict__['_loading'] = False
        theirs = state_dict.get(prefix + 'D')
        if (self.D is not None and isinstance(theirs, torch.Tensor) and theirs.dim() == 3
                and theirs.shape != self.D.shape):  # torch said "size mismatch"; say why
            error_msgs.append(
                f'DO-Conv {prefix}D: the checkpoint has D_mul={theirs.shape[-1]}, this layer '
                f'D_mul={self.D_mul} (D is (in_channels, kh*kw, D_mul)); build the model with '
                f'conv_cfg=dict(type=\'DOConv\', D_mul={theirs.shape[-1]}) to load it.')
        if plain_source:
            absent = [name for name in ('D', 'weight_extra')
                      if getattr(self, name) is not None and prefix + name not in state_dict]
            for name in absent:
                if prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)
            self._materialise_doconv_parameters_like_weight(absent)

    def _materialise_doconv_parameters_like_weight(self, names) -> None:
        """Re-create ``names`` (of D, weight_extra: those the state dict lacks) on weight's device
        and dtype, keeping their Parameter objects where they already live there (optimizer
        references stay valid), and initialise them: D = 0, fresh extra columns. A loaded
        weight_extra is kept."""
        for name in names:
            param = getattr(self, name)
            if param.device != self.weight.device or param.dtype != self.weight.dtype:
                fresh = torch.empty(param.shape, device=self.weight.device,
                                    dtype=self.weight.dtype)
                setattr(self, name, nn.Parameter(fresh, requires_grad=param.requires_grad))
        self._reset_doconv_parameters(names)

    def __setattr__(self, name, value):
        if (name == 'weight' and isinstance(value, torch.Tensor)
                and self.__dict__.get('_parameters', {}).get('weight_extra') is not None
                and not self.__dict__.get('_loading', False)):
            self._rescale_extra_with(value, self._parameters.get('weight'))
        super().__setattr__(name, value)

    def _rescale_extra_with(self, new_weight: torch.Tensor, old_weight) -> None:
        """A BN fuser replaces ``weight`` by a[o]·weight: scale ``weight_extra`` by a as well."""
        if old_weight is None or new_weight is old_weight:
            return
        scale = _output_channel_scale(new_weight.detach(), old_weight.detach())
        if scale is not None and not bool((scale == 1).all()):
            _check_extra_follows(scale, old_weight, self.weight_extra)
            with torch.no_grad():
                self.weight_extra.mul_(scale.view(-1, 1, 1).to(self.weight_extra.dtype))

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------
    def composed_weight(self) -> torch.Tensor:
        """The kernel this layer convolves with, W' (O, Cg, kh, kw), differentiable."""
        if self.D is None:
            return self.weight
        with no_autocast(self.weight.device.type):
            return compose_kernel(self.weight, self.D, self.weight_extra, self.groups)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """nn.Conv2d's forward, defined here so that torch 2.0-2.2's dynamo traces into it: it
        keeps a method of a ``torch.nn`` module opaque, and then AOTAutograd, where the layer
        cannot tell it is being compiled, meets the training Function."""
        return self._own_conv_forward(input)

    def _own_conv_forward(self, input: torch.Tensor) -> torch.Tensor:
        """``_conv_forward`` with the layer's own weight and bias."""
        if not torch.jit.is_scripting():
            # a dict lookup first: this runs on every call (is_parametrized's getattr raises
            # and catches an AttributeError on a plain layer)
            if 'parametrizations' in self._modules and parametrize.is_parametrized(self,
                                                                                   'weight'):
                return self._parametrized_conv_forward(input)
        return self._conv_forward(input, self.weight, self.bias)

    @torch.jit.unused
    def _parametrized_conv_forward(self, input: torch.Tensor) -> torch.Tensor:
        """A ``torch.nn.utils.parametrize``d weight is evaluated once per call, as in
        nn.Conv2d (a stateful parametrisation, e.g. spectral_norm, advances once), and the
        layer sees that one tensor as its own weight, not as a substitute."""
        if torch.jit.is_tracing():  # torch refuses to trace while caching parametrizations
            return self._conv_forward(input, self.weight, self.bias)
        with parametrize.cached():
            return self._conv_forward(input, self.weight, self.bias)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Convolve with the kernel composed from ``weight`` (normally ``self.weight``)."""
        if torch.jit.is_scripting():
            return self._scripted_conv_forward(input, weight, bias)
        return self._eager_conv_forward(input, weight, bias)

    def _scripted_conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor]) -> torch.Tensor:
        """TorchScript: the plain expression (nn.Conv2d's _conv_forward, which script cannot
        reach through super())."""
        D = self.D
        if D is not None:
            weight = in_layout_of(compose_kernel(weight, D, self.weight_extra, self.groups),
                                  weight)
        if self.padding_mode != 'zeros':
            return F.conv2d(F.pad(input, self._reversed_padding_repeated_twice,
                                  mode=self.padding_mode), weight, bias, self.stride, (0, 0),
                            self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation,
                        self.groups)

    @torch.jit.unused
    def _eager_conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.D is None:
            return super()._conv_forward(input, weight, bias)
        # Transforms first: torch 2.0-2.2's dynamo breaks the graph at a tensor `is not`, and
        # the checks after a break run eagerly, where they cannot see the compiler.
        if (_transforms_active() or isinstance(input, torch.fx.Proxy)
                or weight is not self.weight):
            return self._expression_conv_forward(input, weight, bias)
        if torch.is_grad_enabled():
            D, extra = self.D, self.weight_extra  # weight is self.weight here
            if not (weight.requires_grad or D.requires_grad
                    or (extra is not None and extra.requires_grad)):
                return self._expression_conv_forward(input, weight, bias)
            if D.requires_grad and not weight.requires_grad:
                _warn_d_trains_alone()
            input, padding = self._numeric_padding(input)
            composer = self._training_composer()
            if (composer is BATCHED_COMPOSER and self._recompose_in_autograd
                    and recomposable(weight, extra, self.groups)):
                return recomposed_conv2d(input, weight, D, bias, self.stride, padding,
                                         self.dilation, self.groups)
            return composed_conv2d(input, weight, D, extra, bias, composer, self.stride, padding,
                                   self.dilation, self.groups)
        with no_autocast(self.weight.device.type):  # no_grad / inference_mode
            kernel, _ = self._training_composer().compose(self.weight, self.D, self.weight_extra,
                                                          self.groups)
        return super()._conv_forward(input, in_layout_of(kernel, self.weight), bias)

    def _numeric_padding(self, input: torch.Tensor):
        """(input, numeric padding) for the training paths: non-'zeros' padding modes pad the
        input here, as nn.Conv2d does; 'valid' is 0; 'same' is symmetric padding where the
        total dilation·(k - 1) is even and otherwise pads the input, one more at the bottom /
        right, as conv2d's 'same' does."""
        if self.padding_mode != 'zeros':
            return F.pad(input, self._reversed_padding_repeated_twice,
                         mode=self.padding_mode), (0, 0)
        if self.padding == 'valid':
            return input, (0, 0)
        if self.padding == 'same':
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]  # (h, w)
            if all(total % 2 == 0 for total in totals):
                return input, tuple(total // 2 for total in totals)
            if input.dim() not in (3, 4):  # conv2d's own check, before the pad changes sizes
                raise RuntimeError(f'Expected 3D (unbatched) or 4D (batched) input to conv2d, '
                                   f'but got input of size: {list(input.shape)}')
            (total_h, total_w) = totals
            return F.pad(input, (total_w // 2, total_w - total_w // 2,
                                 total_h // 2, total_h - total_h // 2)), (0, 0)
        return input, self.padding

    def _expression_conv_forward(self, input, weight, bias) -> torch.Tensor:
        """conv2d(input, compose_kernel(weight, D, weight_extra)) as differentiable ops; a
        substitute ``weight`` that rescales ``self.weight`` rescales weight_extra too."""
        extra = self.weight_extra
        if extra is not None and _substitutes(weight, self.weight):
            own = self.weight
            scale = _output_channel_scale(weight, own)
            if scale is not None:
                _check_extra_follows(scale, own, extra)
                extra = extra * scale.view(-1, 1, 1).to(extra.dtype)
        with no_autocast(weight.device.type):
            kernel = compose_kernel(weight, self.D, extra, self.groups)
        # fx proxies and vmap's batched tensors have no strides to follow; the functorch query
        # is not asked while compiling (torch 2.1's dynamo cannot trace it: a graph break)
        if _is_compiling():
            kernel = in_layout_of(kernel, weight, strides_known=False)
        elif not (isinstance(weight, torch.fx.Proxy) or _functorch_transforms_active()):
            kernel = in_layout_of(kernel, weight)
        return super()._conv_forward(input, kernel, bias)

    def _training_composer(self):
        """The layer's CPU composer (it keeps large kernels) or the launch-light one."""
        if self.weight.device.type == 'cpu':
            return self._blocked_composer
        return BATCHED_COMPOSER

    def train(self, mode: bool = True):
        """Switching mode frees the kernel the CPU composer keeps (memory back)."""
        self._blocked_composer.buffer = None
        return super().train(mode)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state['_blocked_composer'] = BlockedComposer()  # copies never share a buffer
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + f', D_mul={self.D_mul}'

    # ----------------------------------------------------------------------------------------
    # Conversion both ways
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, D_mul: Optional[int] = None) -> 'DOConv2d':
        """A DOConv2d that computes exactly what ``conv`` computes (D = 0), weights shared."""
        cls._check_plain_twin(conv)
        cls._check_no_hook_reparametrisation(conv, 'convert')
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                   conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                   conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                   D_mul=D_mul, **cls._twin_arguments(conv))._sharing_parameters_of(conv)

    @classmethod
    def _twin_arguments(cls, conv: nn.Conv2d) -> dict:
        """Constructor arguments a twin class takes from its plain conv beyond nn.Conv2d's."""
        return {}

    @classmethod
    def _check_plain_twin(cls, conv: nn.Module) -> None:
        """from_conv2d takes exactly ``cls.plain_class`` (a subclass may compute otherwise)."""
        plain = cls.plain_class
        if type(conv) is not plain:
            expected = ('a plain torch.nn.Conv2d' if plain is nn.Conv2d
                        else f'an mmcv {plain.__name__}')
            raise TypeError(f'{cls.__name__}.from_conv2d expects {expected}, got '
                            f'{type(conv).__name__}.')

    @staticmethod
    def _check_no_hook_reparametrisation(conv: nn.Conv2d, action: str) -> None:
        reparametrisation = _hook_reparametrisation(conv)
        if reparametrisation is not None:
            raise ValueError(
                f'cannot {action} this {type(conv).__name__}: its weight is recomputed in a '
                f'forward pre-hook by {reparametrisation}, then {action} it.')

    def _sharing_parameters_of(self, conv: nn.Conv2d) -> 'DOConv2d':
        """This layer with ``conv``'s weight and bias (the same Parameters) and training flag; D
        and the extra columns train only if ``conv.weight`` does, so a conv frozen before the
        conversion (a frozen stage, an EMA target network) stays frozen, as it would have been
        had conv_cfg built it as DO-Conv and the model then frozen it."""
        nn.Module.__setattr__(self, 'weight', conv.weight)  # sharing, not a rescale
        self.bias = conv.bias
        for extra in (self.D, self.weight_extra):
            if extra is not None:
                extra.requires_grad_(conv.weight.requires_grad)
        self.train(conv.training)
        _carry_hooks(conv, self)
        return self

    @torch.no_grad()
    def to_conv2d(self) -> nn.Conv2d:
        """Fold into a plain nn.Conv2d (same hyper-parameters, device, dtype, training flag,
        requires_grad flags and forward / backward hooks).

        The kernel is composed in float64 and cast back to the parameters' dtype.
        """
        self._check_no_hook_reparametrisation(self, 'fold')
        conv = self._empty_plain_conv()
        folded = in_layout_of(fold_kernel(self.weight, self.D, self.weight_extra, self.groups),
                              self.weight)  # a channels_last layer folds channels_last
        conv.weight = nn.Parameter(folded, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
            conv.bias.requires_grad_(self.bias.requires_grad)
        conv.train(self.training)
        _carry_hooks(self, conv)
        return conv

    def _empty_plain_conv(self) -> nn.Conv2d:
        """The fold target: a plain conv with this layer's hyper-parameters, device and dtype."""
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, self.bias is not None,
                         self.padding_mode, device=self.weight.device, dtype=self.weight.dtype)


# Config type name of every registered DO-Conv layer -> the plain conv type it folds into.
_PLAIN_TYPE_OF = {}
# Plain conv class -> (the registered DO-Conv layer class that is its twin, its config name).
_TWIN_OF = {}


def register_doconv_layer(cls: type, names) -> None:
    """Register a DO-Conv layer class under ``names`` in mmengine's root MODELS, where mmcv's
    build_conv_layer looks conv types up, and record its plain twin: ``cls.plain_layer_type``,
    the conv type its fold gives (the deploy config builds that type where the training config
    names one of ``names``), and ``cls.plain_class``, the layers it converts."""
    from mmengine.registry import MODELS
    MODELS.register_module(name=list(names), module=cls)
    _PLAIN_TYPE_OF.update(dict.fromkeys(names, cls.plain_layer_type))
    _TWIN_OF[cls.plain_class] = (cls, names[0])


def doconv_twin_of(plain_class: type) -> Optional[type]:
    """The registered DO-Conv class whose from_conv2d takes exactly ``plain_class``, or None."""
    return _TWIN_OF.get(plain_class, (None, None))[0]


def doconv_layer_type_for(plain_class: type) -> Optional[str]:
    """The config type name of ``plain_class``'s DO-Conv twin ('DOConvWS' for mmcv's ConvWS2d,
    'DOConv' for nn.Conv2d), or None when it has none."""
    return _TWIN_OF.get(plain_class, (None, None))[1]


def is_doconv_layer_type(value) -> bool:
    """True for a config ``type`` naming a DO-Conv layer: 'DOConv', 'DOConv2d',
    'DOConvAdaptivePadding', a scoped 'scope.DOConv', or a DOConv2d class itself."""
    if isinstance(value, type):
        return issubclass(value, DOConv2d)
    return isinstance(value, str) and value.rpartition('.')[2] in _PLAIN_TYPE_OF


def plain_layer_type(value) -> str:
    """The conv type a DO-Conv layer type folds into: 'Conv2d' for 'DOConv',
    'Conv2dAdaptivePadding' for 'DOConvAdaptivePadding' (``value`` as in is_doconv_layer_type)."""
    if isinstance(value, type):
        return value.plain_layer_type
    return _PLAIN_TYPE_OF[value.rpartition('.')[2]]


register_doconv_layer(DOConv2d, ('DOConv', 'DOConv2d'))
