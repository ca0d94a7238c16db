"""Refuse train/deploy checkpoint mix-ups before a model silently computes the wrong function.

mmengine loads checkpoints non-strictly. An *unfolded* DO-Conv checkpoint (``<conv>.weight`` plus
``<conv>.D``) given with a config that builds no DO-Conv layer (a deploy or stock config) loads
``weight``, drops ``D`` with a log warning only, and the model then computes ``conv(x, weight)``
instead of ``conv(x, W')``. :func:`check_checkpoint_config` refuses exactly that case with one
line naming what the checkpoint is and the command that fixes it, and describes the checkpoint
otherwise (the fold tool's ``meta['doconv_folded']`` marker is reported).

The other direction is harmless and only reported: a folded checkpoint with the DO-Conv training
config loads with ``D = 0`` (missing keys), and a DO-Conv layer with ``D = 0`` is its plain conv.
"""
import os
from typing import Any, Dict, List, Optional, Union

import torch
from mmengine.config import Config

from .checkpoint import CheckpointError

__all__ = ['unfolded_doconv_layers', 'config_has_doconv', 'check_checkpoint_config',
           'describe_checkpoint']

FOLD_COMMAND = 'python tools/fold_doconv.py TRAINING_CONFIG {ckpt} FOLDED.pth --verify'


def _state_dicts(checkpoint: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The weight dicts a checkpoint holds: ``state_dict`` / ``ema_state_dict`` or itself."""
    found = [checkpoint[k] for k in ('state_dict', 'ema_state_dict', 'model')
             if isinstance(checkpoint.get(k), dict)]
    if not found and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        found = [checkpoint]
    return found


def unfolded_doconv_layers(checkpoint: Dict[str, Any]) -> List[str]:
    """Names of the layers that carry a DO-Conv ``D`` (a 3-D tensor next to a 4-D ``weight``)."""
    layers = []
    for state_dict in _state_dicts(checkpoint):
        for key, value in state_dict.items():
            if not key.endswith('.D') or not isinstance(value, torch.Tensor) or value.dim() != 3:
                continue
            weight = state_dict.get(key[:-2] + '.weight')
            if isinstance(weight, torch.Tensor) and weight.dim() == 4:
                name = key[:-2]
                name = name[len('module.'):] if name.startswith('module.') else name
                if name not in layers:
                    layers.append(name)
    return layers


def config_has_doconv(cfg: Union[Config, dict]) -> bool:
    """Whether a config asks for DO-Conv layers (``conv_cfg``/``*_cfg`` DOConv or DOConvModel)."""
    from .config_check import walk_cfg
    from .doconv import is_doconv_layer_type
    node = cfg.to_dict() if isinstance(cfg, Config) else cfg
    for _, entry in walk_cfg(node, 'cfg'):
        node_type = entry.get('type')
        if is_doconv_layer_type(node_type):
            return True
        if isinstance(node_type, str) and node_type.rpartition('.')[2] == 'DOConvModel':
            return True
    return False


def describe_checkpoint(checkpoint: Dict[str, Any]) -> str:
    """One line: folded by do_conv_mm (with the marker's details), unfolded DO-Conv, or plain."""
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    if meta.get('doconv_folded'):
        info = meta.get('doconv_fold') or {}
        parts = [f'{info["num_folded"]} DO-Conv layers folded' if 'num_folded' in info else None,
                 f'from {info["source"]}' if info.get('source') else None,
                 f'weights: {info["deployed_weights"]}' if info.get('deployed_weights') else None,
                 f'do_conv_mm {info["do_conv_mm_version"]}'
                 if info.get('do_conv_mm_version') else None]
        details = ', '.join(p for p in parts if p)
        return f'folded DO-Conv checkpoint (meta["doconv_folded"]: {details})'
    layers = unfolded_doconv_layers(checkpoint)
    if layers:
        kernels = _distinct_d_kernels(checkpoint, layers)
        shared = (f' under {len(layers)} names: convs shared by several modules'
                  if kernels < len(layers) else '')
        return f'unfolded DO-Conv training checkpoint ({kernels} layers with a D kernel{shared})'
    return 'plain checkpoint (no DO-Conv parameters, no fold marker)'


def _distinct_d_kernels(checkpoint: Dict[str, Any], layers: List[str]) -> int:
    """How many distinct D tensors ``layers`` name in the checkpoint's first weight dict: a conv
    shared under several names (RTMDet's head) is saved once, its tensors shared by the keys."""
    weights = _state_dicts(checkpoint)[0]
    seen = set()
    for name in layers:
        D = weights.get(f'{name}.D', weights.get(f'module.{name}.D'))
        if isinstance(D, torch.Tensor):
            seen.add((D.untyped_storage().data_ptr(), D.storage_offset()))
        else:  # only in another weight dict (EMA): counted by name
            seen.add(name)
    return len(seen)


def check_checkpoint_config(checkpoint: Dict[str, Any],
                            cfg: Union[Config, dict],
                            path: Union[str, os.PathLike] = 'checkpoint',
                            config_name: Optional[str] = None) -> str:
    """Raise :class:`CheckpointError` for an unfolded DO-Conv checkpoint with a config that has
    no DO-Conv layer; otherwise return a one-line description to report.

    Args:
        checkpoint: the loaded checkpoint dict (``do_conv_mm.load_checkpoint_file``).
        cfg: the config the checkpoint is about to be loaded into (Config or dict).
        path: the checkpoint's path, for the message.
        config_name: the config's name for the message (default: its file name).
    """
    path = os.fspath(path)
    if config_name is None:
        filename = getattr(cfg, 'filename', None)
        config_name = os.path.basename(filename) if filename else 'the config'
    layers = unfolded_doconv_layers(checkpoint)
    has_doconv = config_has_doconv(cfg)
    if layers and not has_doconv:
        raise CheckpointError(
            f'{path!r} is an unfolded DO-Conv training checkpoint ({len(layers)} layers with a D '
            f'kernel, e.g. {layers[0]}.D) but {config_name} has no DO-Conv layers (a deploy or '
            f'plain config): loading it would drop D and silently compute a different function. '
            f'Fold it first: {FOLD_COMMAND.format(ckpt=path)}, and use FOLDED.pth with this '
            f'config (or pass the DO-Conv training config instead).')
    line = describe_checkpoint(checkpoint)
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    if meta.get('doconv_folded') and has_doconv:
        line += ('; with a DO-Conv config it loads with D = 0 (the same function), but deploy it '
                 'with its deploy config (written next to it by the fold tool)')
    return line
