"""Fold a loaded DO-Conv checkpoint dict into the slim deploy checkpoint.

The output is ``{meta, state_dict[, ema_state_dict]}``: the keys are the training keys minus
``.D`` / ``.weight_extra``, ``meta`` is reduced to plain Python types (the file loads with
``torch.load(weights_only=True)`` without any allow-list) and marked ``doconv_folded``.
Optimizer, message hub and scheduler states are dropped.
"""
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config

from .checkpoint_match import EMA_KEY, check_matches, checked_checkpoint
from ..fold import fold_doconv
from ..version import __version__

__all__ = ['fold_checkpoint_dict']


def _fold_weights(model: nn.Module, state_dict) -> 'Dict[str, torch.Tensor]':
    """Strict-load into ``model`` (left loaded, unfolded) and return the folded state dict."""
    model.load_state_dict(state_dict, strict=True)
    return fold_doconv(model, inplace=False).state_dict()


def _plain(value: Any) -> Any:
    """``value`` reduced to types torch's weights_only unpickler accepts by default."""
    if isinstance(value, np.generic):  # first: np.float64 is also a float
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int, float, bool)) else str(k): _plain(v)
                for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (list, set, frozenset)):
        return [_plain(v) for v in value]
    return str(value)


def fold_checkpoint_dict(model: nn.Module,
                         ckpt: Dict[str, Any],
                         deploy_cfg: Optional[Config] = None,
                         use_ema: bool = False,
                         name: str = 'checkpoint',
                         config_name: str = 'CONFIG') -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Fold a loaded checkpoint dict with ``model`` (a DO-Conv model built from its config).

    Returns ``(folded, info)``: the slim checkpoint ``{meta, state_dict[, ema_state_dict]}`` and
    ``dict(num_folded, deployed_weights, kept_ema)``. ``model`` is left holding the deployed
    weights (``state_dict``: the EMA weights of an EMAHook checkpoint), unfolded (the reference
    for verification); ``use_ema`` refuses a checkpoint without EMA.
    """
    layers, meta, deployed_weights, ema, steps = checked_checkpoint(model, ckpt, use_ema, name,
                                                                    config_name)
    deployed = 'state_dict (EMA weights)' if ema is not None else 'state_dict'
    other = ema  # EMAHook's raw weights: folded and kept in the same layout
    folded_other = None
    if other is not None:
        check_matches(model, layers, other, meta, name, config_name, 'ema_state_dict')
        folded_other = _fold_weights(model, other)
    folded_main = _fold_weights(model, deployed_weights)

    meta = _plain(dict(meta)) if isinstance(meta, dict) else {}
    train_cfg_text = meta.get('cfg')
    if deploy_cfg is not None:
        meta['cfg'] = deploy_cfg.pretty_text
    meta['doconv_folded'] = True
    meta['doconv_fold'] = dict(
        num_folded=len(layers), deployed_weights=deployed, source=os.path.basename(name),
        do_conv_mm_version=__version__, train_cfg=train_cfg_text)
    folded = dict(meta=meta, state_dict=folded_main)
    if folded_other is not None:
        ema_out = type(folded_other)((f'module.{k}', v) for k, v in folded_other.items())
        if steps is not None:
            ema_out['steps'] = steps
        folded[EMA_KEY] = ema_out
    info = dict(num_folded=len(layers), deployed_weights=deployed,
                kept_ema=folded_other is not None)
    return folded, info
