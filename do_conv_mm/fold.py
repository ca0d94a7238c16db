"""Fold DO-Conv into plain convolutions: on a live model, or on a state dict alone.

Both compose in float64 and cast back, so a folded model computes what the DO-Conv model computes
up to one rounding of each kernel entry.
"""
from collections import OrderedDict
from copy import deepcopy
from typing import Mapping

import torch
import torch.nn as nn

from .doconv import DOConv2d, _hook_reparametrisation, fold_kernel

__all__ = ['fold_doconv', 'fold_state_dict', 'count_doconv']


def count_doconv(model: nn.Module) -> int:
    """Number of DOConv2d layers in ``model`` (1×1 ones included)."""
    return sum(isinstance(m, DOConv2d) for m in model.modules())


def fold_doconv(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every DOConv2d in ``model`` by the equivalent plain nn.Conv2d.

    Returns the folded model (a deep copy unless ``inplace``). A bare DOConv2d is returned as its
    folded nn.Conv2d. Attributes, device, dtype and the training flag are kept. A DOConv2d
    registered under several names (twice in one parent, or shared between parents as in
    RTMDet's head with ``share_conv=True``) becomes one nn.Conv2d at every one of its names:
    sharing is kept.
    """
    if isinstance(model, DOConv2d):
        return model.to_conv2d()
    for name, layer in model.named_modules():  # refuse before changing anything
        reparametrisation = isinstance(layer, DOConv2d) and _hook_reparametrisation(layer)
        if reparametrisation:
            raise ValueError(f'fold_doconv: cannot fold {name!r}: its weight is recomputed in a '
                             f'forward pre-hook by {reparametrisation}, then fold.')
    if not inplace:  # deepcopy keeps shared submodules shared
        model = deepcopy(model, _graph_tensors_detached(model))
    folded = {}  # id(DOConv2d) -> (the layer, its folded conv); the layer is held so ids stay
    for parent in list(model.modules()):
        # _modules, not named_children(): a layer held twice by one parent is listed once there
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, DOConv2d):
                if id(child) not in folded:
                    folded[id(child)] = (child, child.to_conv2d())
                setattr(parent, child_name, folded[id(child)][1])
    return model


def _is_doconv_entry(state_dict: Mapping[str, torch.Tensor], key: str) -> bool:
    return (key == 'D' or key.endswith('.D')) and (key[:-1] + 'weight') in state_dict


def fold_state_dict(state_dict: Mapping[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """Fold a DO-Conv state dict on tensors alone.

    Every ``<prefix>D`` that has a ``<prefix>weight`` beside it is a DOConv: its weight becomes
    the composed kernel, and ``<prefix>D`` / ``<prefix>weight_extra`` are dropped. groups is read
    from the shapes (C = D.shape[0], Cg = weight.shape[1]). The result strict-loads into the same
    architecture built with plain convs. Key order and ``_metadata`` are kept. A layer shared
    under several prefixes (its tensors are the same storage, as in ``model.state_dict()`` and
    in checkpoints saved from it) is folded once, and every prefix gets that same tensor.
    """
    folded = OrderedDict()
    dropped = set()
    kernels = {}
    by_source = {}  # the same (weight, D, weight_extra) tensors under several prefixes: fold once
    for key in state_dict:
        if not _is_doconv_entry(state_dict, key):
            continue
        prefix = key[:-1]
        D = state_dict[key]
        weight = state_dict[prefix + 'weight']
        extra = state_dict.get(prefix + 'weight_extra')
        source = tuple(_tensor_identity(t) for t in (weight, D, extra))
        if source not in by_source:
            _check_shapes(prefix, weight, D, extra)
            by_source[source] = fold_kernel(weight, D, extra, D.shape[0] // weight.shape[1])
        kernels[prefix + 'weight'] = by_source[source]
        dropped.update({key, prefix + 'weight_extra'})
    for key, value in state_dict.items():
        if key not in dropped:
            folded[key] = kernels.get(key, value)
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        folded._metadata = deepcopy(metadata)
    return folded


def _graph_tensors_detached(model: nn.Module) -> dict:
    """A deepcopy memo that copies, as their detached values, the tensors of an autograd graph
    that modules keep outside their parameters and buffers (mmdet's dense heads keep training
    predictions in ``_raw_positive_infos`` after a loss pass; torch cannot deep-copy them, so
    folding a copy right after training would fail)."""
    memo, seen = {}, set()

    def visit(value, depth: int) -> None:
        if id(value) in seen or depth > 6:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if value.grad_fn is not None:
                memo[id(value)] = value.detach()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                visit(item, depth + 1)
        elif hasattr(value, '__dict__') and not isinstance(value, (nn.Module, type)):
            visit(vars(value), depth + 1)  # e.g. mmengine InstanceData, SamplingResult

    for module in model.modules():
        for name, value in vars(module).items():
            if name not in ('_parameters', '_buffers', '_modules'):
                visit(value, 0)
    return memo


def _tensor_identity(tensor):
    """What makes two state-dict entries the same tensor data (None for a missing entry)."""
    if tensor is None:
        return None
    storage = (tensor.untyped_storage() if hasattr(tensor, 'untyped_storage')
               else tensor.storage())  # torch < 2.0
    return (storage.data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype, tensor.device)


def _check_shapes(prefix, weight, D, extra) -> None:
    where = prefix.rstrip('.') or '<root>'
    if weight.dim() != 4 or D.dim() != 3:
        raise ValueError(f'fold_state_dict: {where} has D of shape {tuple(D.shape)} and weight '
                         f'of shape {tuple(weight.shape)}; a DOConv needs D (C, kh*kw, D_mul) and '
                         f'weight (O, C/groups, kh, kw).')
    O, Cg, kh, kw = weight.shape
    C, K, S = D.shape
    extra_cols = 0 if extra is None else extra.shape[-1]
    ok = (K == kh * kw and C % Cg == 0 and O % (C // Cg) == 0 and S == K + extra_cols
          and (extra is None or tuple(extra.shape[:2]) == (O, Cg)))
    if not ok:
        raise ValueError(
            f'fold_state_dict: {where} has inconsistent DOConv shapes: '
            f'weight {tuple(weight.shape)}, '
            f'D {tuple(D.shape)}, weight_extra {None if extra is None else tuple(extra.shape)}. '
            f'Is this a DO-Conv checkpoint from do_conv_mm?')
