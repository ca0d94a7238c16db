"""Weights trained with the public reference DO-Conv code, converted to :class:`DOConv2d`'s layout.

The reference layer stores, per conv (O = out_channels, C = in_channels, g = groups, Cg = C / g,
K = kh·kw, S = D_mul):

    W       (O, Cg, S)    the whole over-parameterised kernel
    D       (C, K, S)     zero-initialised, only when K > 1
    d_diag  (C, K, S)     fixed: eye(K) repeated S // K times, then S % K zero columns
                          (``D_diag`` in some copies; stored because it is a Parameter)

and computes, with ``Wr = W.reshape(O / g, C, S)`` and ``P = D + d_diag``,

    W'[o', c', m] = Σ_s P[c', m, s] · Wr[o', c', s],   then W'.reshape(O, Cg, kh, kw).

The reshape ties kernel entry (o, i) to input channel (o·Cg + i) mod C. Where that is the channel
the entry reads, (o // Og)·Cg + i, for every entry (groups = 1, and depthwise convs without a
channel multiplier) this is exactly do_conv_mm's formula, so the conversion is exact: ``weight``
and ``weight_extra`` are W's first K and remaining S - K columns, and our ``D = P - [eye(K) | 0]``
(so ``D + I`` is the reference's ``P``, bit for bit wherever |P - I| < 1/2). Other grouped layers
compute a function do_conv_mm's per-channel D cannot express: such a layer is *rebased*, its
composed kernel W' becomes ``weight`` and ``D = 0`` (the same function; the over-parameterisation
restarts from the identity), and W's extra columns stay as ``weight_extra``. 1×1 layers carry only
W (O, Cg, 1): a plain conv. ``plain=True`` folds every layer to its composed kernel instead, for
models without DO-Conv.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .checkpoint import CheckpointError
from .pretrained import strip_prefix

__all__ = ['ReferenceCheckpointError', 'ReferenceLayer', 'binds_true_channels',
           'convert_reference_state_dict', 'find_reference_layers', 'reference_identity',
           'reference_kernel']

_DIAG_NAMES = ('d_diag', 'D_diag')


class ReferenceCheckpointError(CheckpointError):
    """A state dict that is not (or not consistently) in the reference DO-Conv layout."""


@dataclass(frozen=True)
class ReferenceLayer:
    """One converted layer: its name, kernel (kh, kw), groups (None for a 1×1 layer: no D tells
    the input channels), D_mul and ``how`` it was converted: ``'exact'`` (D kept),
    ``'rebased'`` (the reference's kernel became ``weight``, D restarts at 0), ``'folded'``
    (``plain=True``: the reference's kernel only) or ``'1x1'`` (W was a plain 1×1 kernel)."""
    name: str
    kernel_size: Tuple[int, int]
    groups: Optional[int]
    D_mul: int
    how: str
    diag_rebuilt: bool  # the state dict had no d_diag: rebuilt by the reference's rule


def reference_identity(taps: int, D_mul: int, channels: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference's fixed ``d_diag`` (C, K, S): eye(K) repeated S // K times, zero-padded."""
    eye = torch.eye(taps, dtype=dtype).repeat(1, D_mul // taps)
    eye = torch.cat([eye, torch.zeros(taps, D_mul % taps, dtype=dtype)], dim=1)
    return eye.expand(channels, taps, D_mul).clone()


def find_reference_layers(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the reference DO-Conv layers: a 3-D ``<name>.W`` and no ``<name>.weight``."""
    return [key[:-len('.W')] for key, value in state_dict.items()
            if key.endswith('.W') and isinstance(value, torch.Tensor) and value.dim() == 3
            and key[:-len('.W')] + '.weight' not in state_dict]


def binds_true_channels(out_channels: int, in_channels: int, groups: int) -> bool:
    """Whether the reference's reshape ties every kernel entry (o, i) to the input channel it
    reads: (o·Cg + i) mod C == (o // Og)·Cg + i for all o, i (groups = 1, plain depthwise)."""
    Cg, Og = in_channels // groups, out_channels // groups
    o = torch.arange(out_channels).unsqueeze(1)
    i = torch.arange(Cg).unsqueeze(0)
    return bool(((o * Cg + i) % in_channels == (o // Og) * Cg + i).all())


def _kernel_size(name: str, taps: int, kernel_sizes: Optional[Mapping]) -> Tuple[int, int]:
    if kernel_sizes is not None and name in kernel_sizes:
        kh, kw = kernel_sizes[name]
        if kh * kw != taps:
            raise ReferenceCheckpointError(
                f'{name}: the checkpoint has {taps} kernel taps (D is (C, kh*kw, D_mul)) but the '
                f'model\'s layer is {kh}×{kw}; pass the config of the model it was trained as.')
        return int(kh), int(kw)
    side = math.isqrt(taps)
    if side * side != taps:
        raise ReferenceCheckpointError(
            f'{name}: {taps} kernel taps is not a square kernel, so kh×kw cannot be read off the '
            f'weights; pass --config with the model (its layer gives the kernel shape).')
    return side, side


def _diag(state_dict: Mapping, name: str, shape) -> Optional[torch.Tensor]:
    """The layer's stored d_diag (either spelling), None where the state dict has none."""
    for diag_name in _DIAG_NAMES:
        diag = state_dict.get(f'{name}.{diag_name}')
        if diag is not None:
            if tuple(diag.shape) != tuple(shape):
                raise ReferenceCheckpointError(
                    f'{name}.{diag_name} has shape {tuple(diag.shape)}, not D\'s {tuple(shape)}: '
                    f'not a reference DO-Conv layer.')
            return diag
    return None


def reference_kernel(W: torch.Tensor, P: torch.Tensor, groups: int,
                     kernel_size: Tuple[int, int]) -> torch.Tensor:
    """The reference's composed kernel (O, Cg, kh, kw) from W (O, Cg, S) and P = D + d_diag
    (C, K, S), with its channel binding; computed in float64, returned in W's dtype."""
    O, Cg, S = W.shape
    C = P.shape[0]
    Wr = W.reshape(O // groups, C, S)
    composed = torch.bmm(P.double(), Wr.double().permute(1, 2, 0))  # (C, K, O / g)
    return composed.permute(2, 0, 1).reshape(O, Cg, *kernel_size).to(W.dtype)


def _convert_layer(state_dict: Mapping, name: str, kernel_sizes,
                   plain: bool) -> Tuple[Dict, ReferenceLayer]:
    """The do_conv_mm entries (``weight``, ``D``, ``weight_extra``) of one reference layer."""
    W = state_dict[f'{name}.W']
    O, Cg, S = W.shape
    D = state_dict.get(f'{name}.D')
    if D is None:
        if S != 1:
            raise ReferenceCheckpointError(
                f'{name}.W is (O, Cg, D_mul) = {tuple(W.shape)} but {name}.D is missing (only '
                f'1×1 reference layers, D_mul 1, have no D); pass the complete checkpoint.')
        return ({'weight': W.reshape(O, Cg, 1, 1)},
                ReferenceLayer(name, (1, 1), None, 1, '1x1', diag_rebuilt=False))
    if D.dim() != 3 or D.shape[2] != S or D.shape[0] % Cg or D.shape[1] > S:
        raise ReferenceCheckpointError(
            f'{name}: D {tuple(D.shape)} does not fit W {tuple(W.shape)} (expected D (C, kh*kw, '
            f'D_mul) with D_mul = {S} >= kh*kw and C a multiple of {Cg}): not a reference '
            f'DO-Conv layer.')
    C, K = D.shape[:2]
    groups = C // Cg
    if O % groups:
        raise ReferenceCheckpointError(
            f'{name}: {O} output channels are not divisible by groups = {groups} (C {C} / Cg '
            f'{Cg}): not a reference DO-Conv layer.')
    kh, kw = _kernel_size(name, K, kernel_sizes)
    diag = _diag(state_dict, name, D.shape)
    rebuilt = diag is None
    if rebuilt:
        diag = reference_identity(K, S, C, D.dtype)
    P = D + diag
    if plain:
        how, entries = 'folded', {'weight': reference_kernel(W, P, groups, (kh, kw))}
    elif binds_true_channels(O, C, groups):
        how = 'exact'  # our D + I, I = eye(K, S) = [eye(K) | 0], is the reference's P
        entries = {'weight': W[..., :K].reshape(O, Cg, kh, kw).clone(),
                   'D': P - torch.eye(K, S, dtype=D.dtype)}
    else:
        how = 'rebased'
        entries = {'weight': reference_kernel(W, P, groups, (kh, kw)), 'D': torch.zeros_like(D)}
    if S > K and not plain:
        entries['weight_extra'] = W[..., K:].clone()
    return entries, ReferenceLayer(name, (kh, kw), groups, S, how, diag_rebuilt=rebuilt)


def convert_reference_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        kernel_sizes: Optional[Mapping[str, Tuple[int, int]]] = None,
        plain: bool = False
) -> Tuple['OrderedDict', List[ReferenceLayer]]:
    """A state dict of the reference DO-Conv code in :class:`DOConv2d`'s layout.

    Every reference layer ``<name>.W`` / ``.D`` / ``.d_diag`` becomes ``<name>.weight`` (Conv2d
    shaped), ``.D`` and ``.weight_extra`` (when D_mul > kh·kw); with ``plain=True`` only
    ``<name>.weight``, the reference's composed kernel (a plain conv's weights, for a model
    without DO-Conv). Other entries (bias, norms, plain convs) are kept, in order; a ``module.``
    wrapper prefix is dropped. ``kernel_sizes`` maps layer names to (kh, kw) for non-square
    kernels (square ones are read off D's shape).

    Returns ``(state_dict, layers)``. Raises :class:`ReferenceCheckpointError` for a state dict
    with no reference layer or with inconsistent shapes.
    """
    state_dict = strip_prefix(state_dict, '')  # only the 'module.' wrapper prefix
    names = find_reference_layers(state_dict)
    if not names:
        ours = [k[:-len('.D')] for k in state_dict if k.endswith('.D')
                and k[:-len('.D')] + '.weight' in state_dict]
        hint = (f' It is already in do_conv_mm\'s layout ({len(ours)} layers with .weight and .D,'
                f' e.g. {ours[0]}): use it as is.' if ours else
                ' Pass a checkpoint saved from a model built with the reference DOConv2d.')
        raise ReferenceCheckpointError(
            f'the checkpoint has no reference DO-Conv layer (a 3-D "<name>.W" of shape '
            f'(out_channels, in_channels/groups, D_mul)).{hint}')
    converted, layers = {}, []
    for name in names:
        entries, layer = _convert_layer(state_dict, name, kernel_sizes, plain)
        converted[name] = entries
        layers.append(layer)
    reference_keys = {f'{name}.{part}' for name in names for part in ('W', 'D', *_DIAG_NAMES)}
    out = OrderedDict()
    for key, value in state_dict.items():
        layer = key.rsplit('.', 1)[0]
        if layer in converted and key.endswith('.W'):
            out.update((f'{layer}.{part}', tensor) for part, tensor in converted[layer].items())
        elif key not in reference_keys:
            out[key] = value
    return out, layers
