"""Which weights of a loaded checkpoint dict a fold uses, checked against the model first.

Reads full mmengine checkpoints, slim ``{meta, state_dict}`` ones, bare state dicts and EMAHook
checkpoints (``state_dict``: the averaged weights; ``ema_state_dict``: the raw ones, keys
``module.*`` plus ``steps``); a DDP ``module.`` prefix is dropped. The weights must be a DO-Conv
checkpoint of exactly the model built from CONFIG: no missing, unexpected or mis-shaped key, and
a ``.D`` for its DO-Conv layers; a folded, plain or other model's checkpoint is refused with a
one-line :class:`.FoldError` naming the fix.
"""
import re
from typing import Any, Dict, List

import torch
import torch.nn as nn

from ..checkpoint import key_listing, key_mismatch
from ..fold import _is_doconv_entry
from .fold_errors import FoldError
from .fold_model import doconv_layers

__all__ = ['EMA_KEY', 'checkpoint_weights', 'checked_checkpoint', 'check_matches']

EMA_KEY = 'ema_state_dict'


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_prefix(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Drop ``prefix`` when every key has it (DDP's 'module.', like mmengine's revise_keys)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return type(state_dict)((k[len(prefix):], v) for k, v in state_dict.items())
    return state_dict


def _split_checkpoint(ckpt: Dict[str, Any], name: str):
    """(meta, state_dict or None, ema weights without 'module.' or None, ema 'steps' or None)."""
    if 'state_dict' in ckpt or EMA_KEY in ckpt:
        state_dict = ckpt.get('state_dict')
        if state_dict is not None and not _is_state_dict(state_dict):
            raise FoldError(f'{name}: "state_dict" is not a dict of tensors; pass a checkpoint '
                            f'saved by mmengine or torch.save(model.state_dict()).')
        meta = ckpt.get('meta') or {}
    elif _is_state_dict(ckpt):
        state_dict, meta = ckpt, {}
    else:
        keys = ', '.join(sorted(map(str, ckpt))[:6]) or 'none'
        raise FoldError(f'{name} holds no model weights (top-level keys: {keys}); pass an mmengine '
                        f'checkpoint (with "state_dict") or a saved model.state_dict().')
    ema, steps = None, None
    if EMA_KEY in ckpt:
        raw = dict(ckpt[EMA_KEY])
        steps = raw.pop('steps', None)
        if not _is_state_dict(raw) or not all(k.startswith('module.') for k in raw):
            raise FoldError(f'{name}: "ema_state_dict" is not an mmengine EMA state dict (keys '
                            f'"module.*" and "steps"); pass the checkpoint EMAHook saved.')
        ema = type(raw)((k[len('module.'):], v) for k, v in raw.items())
    if state_dict is not None:
        state_dict = _strip_prefix(state_dict, 'module.')
    return meta, state_dict, ema, steps


def check_matches(model: nn.Module, layers: List[str], state_dict, meta, name: str,
                  config_name: str, what: str) -> None:
    """Refuse a state dict that is not a DO-Conv checkpoint of exactly this model."""
    present = [layer for layer in layers if f'{layer}.D' in state_dict]
    if not present:
        if isinstance(meta, dict) and meta.get('doconv_folded'):
            raise FoldError(f'{name} is already folded (its meta["doconv_folded"] is set by this '
                            f'tool); use it as is with its deploy config: it has no D to fold or '
                            f'analyse.')
        foreign = [k[:-len('.D')] for k in state_dict if _is_doconv_entry(state_dict, k)]
        if foreign:
            raise FoldError(
                f'{name} ({what}) is a DO-Conv checkpoint of another model: it has '
                f'{len(foreign)} DO-Conv ".D" keys ({key_listing([f + ".D" for f in foreign])}) '
                f'that the model of {config_name} lacks (its {len(layers)} DOConv layers: '
                f'{key_listing(layers)}). Pass the DO-Conv training config the checkpoint was '
                f'trained with{_trained_with(meta)}; do not load it into a plain or deploy '
                f'config (its D would be ignored).')
        raise FoldError(f'{name} ({what}) holds no DO-Conv parameters (no ".D" for any of the '
                        f'{len(layers)} DOConv layers {config_name} builds): it is already '
                        f'folded or a plain-conv checkpoint, with no D to fold or analyse; use it '
                        f'with the plain/deploy config directly.')
    expected = model.state_dict()
    missing, unexpected, misshaped = key_mismatch(expected, state_dict)
    misshaped = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs CONFIG '
                 f'{tuple(expected[k].shape)}' for k in misshaped]
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing key(s) ({key_listing(missing)})')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected key(s) ({key_listing(unexpected)})')
    if misshaped:
        problems.append(f'{len(misshaped)} mis-shaped key(s) ({key_listing(misshaped)})')
    if problems:
        raise FoldError(f'checkpoint does not match CONFIG: {name} ({what}) vs {config_name}: '
                        f'{"; ".join(problems)}. Pass the config the checkpoint was trained with '
                        f'(its meta["cfg"] holds it for mmengine checkpoints).')


def _trained_with(meta: Any) -> str:
    """' (... config ...)' from an mmengine checkpoint's meta, or ''."""
    if not isinstance(meta, dict):
        return ''
    experiment = meta.get('experiment_name')
    if isinstance(experiment, str) and experiment:
        stem = re.sub(r'_\d{8}_\d{6}$', '', experiment)  # Runner appends _YYYYMMDD_HHMMSS
        return f' (its meta names the experiment {experiment!r}: config {stem}.py)'
    if isinstance(meta.get('cfg'), str):
        return ' (its meta["cfg"] holds that config\'s text)'
    return ''


def checkpoint_weights(model: nn.Module,
                       ckpt: Dict[str, Any],
                       use_ema: bool = False,
                       name: str = 'checkpoint',
                       config_name: str = 'CONFIG') -> Dict[str, torch.Tensor]:
    """The weights of a loaded checkpoint dict that ``model`` (a DO-Conv model built from its
    config) strict-loads: its ``state_dict``, or its EMA weights with ``use_ema``, without a
    DDP 'module.' prefix. FoldError where the config builds no DO-Conv layer, the weights asked
    for are absent, or they are no DO-Conv checkpoint of exactly this model (a folded or plain
    one, another model's)."""
    return checked_checkpoint(model, ckpt, use_ema, name, config_name)[2]


def checked_checkpoint(model, ckpt, use_ema, name, config_name):
    """(DO-Conv layer names, meta, the weights asked for, EMA weights or None, EMA steps or
    None), after the checks :func:`checkpoint_weights` states."""
    layers = doconv_layers(model)
    if not layers:
        raise FoldError(f'{config_name} builds no DO-Conv layer (no k×k conv with '
                        f'conv_cfg=dict(type="DOConv") and no DOConvModel conversion), so there is '
                        f'no D to fold or analyse; pass the DO-Conv training config of the '
                        f'checkpoint{_trained_with(ckpt.get("meta"))} (mmengine keeps a copy in '
                        f'the training run\'s work dir, next to its checkpoints).')
    meta, state_dict, ema, steps = _split_checkpoint(ckpt, name)
    if use_ema and ema is None:
        raise FoldError(f'{name} has no EMA weights (no "ema_state_dict": it was not trained with '
                        f'EMAHook); drop --use-ema to use its state_dict.')
    if state_dict is None:
        raise FoldError(f'{name} has no "state_dict", only "ema_state_dict", where mmengine\'s '
                        f'EMAHook keeps the raw, non-averaged weights (it saves the EMA ones as '
                        f'state_dict); pass the checkpoint the training run saved.')
    weights = state_dict
    check_matches(model, layers, weights, meta, name, config_name, 'state_dict')
    return layers, meta, weights, ema, steps
