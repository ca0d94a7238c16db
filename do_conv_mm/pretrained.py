"""Carry a pretrained backbone, DO-Conv ``D`` included, into a detector or segmentor.

A classification checkpoint (mmpretrain ``ImageClassifier``: ``backbone.*``, ``neck.*``,
``head.*``) initialises the backbone of an mmdet / mmseg model through mmengine's
``init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')``. mmengine loads it
*non-strictly*: a key the backbone lacks or has in another shape is only logged. For DO-Conv that
hides two real mistakes: a DO-Conv checkpoint into a plain backbone (``D`` dropped: the detector
starts from the plain kernels, not from the pretrained function) and ``D_mul`` differing (``D``
not loaded at all). :func:`check_pretrained_inits` finds every such ``init_cfg`` of a built model
and compares the checkpoint with the module before any weight is loaded; tools/train.py stops on
a mismatch with one line naming the keys and the fix.

mmpretrain's ResNet deep stem (ResNetV1c/V1d: ``stem.N.conv`` / ``stem.N.bn``, ConvModules) is
laid out differently from mmdet's / mmseg's (``stem.3N`` conv, ``stem.3N+1`` norm, ReLUs
between); :func:`backbone_state_dict` renames it (tools/extract_backbone.py writes the result).
"""
import os
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, key_listing, load_checkpoint_file

__all__ = ['PretrainedMismatchError', 'backbone_state_dict', 'build_config_module',
           'check_pretrained_inits', 'check_pretrained_state_dict', 'compare_state_dict']

DOCONV_SUFFIXES = ('.D', '.weight_extra')
_DEEP_STEM_KEY = re.compile(r'^stem\.(\d+)\.(conv|bn)\.(.+)$')


class PretrainedMismatchError(CheckpointError):
    """A pretrained checkpoint that would load only partly into its module."""


def _is_doconv_key(key: str) -> bool:
    return key.endswith(DOCONV_SUFFIXES)


def checkpoint_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = False) -> Dict:
    """The weights of a loaded checkpoint: its ``state_dict``, or itself (a bare state dict).

    mmengine's EMAHook saves the averaged weights as ``state_dict`` (the raw ones as
    ``ema_state_dict``), so an EMA checkpoint gives its EMA weights; ``use_ema`` refuses a
    checkpoint without them."""
    if use_ema and not isinstance(checkpoint.get('ema_state_dict'), Mapping):
        raise CheckpointError('the checkpoint has no EMA weights (no ema_state_dict: it was not '
                              'trained with EMAHook); drop --use-ema.')
    if isinstance(checkpoint.get('state_dict'), Mapping):
        return dict(checkpoint['state_dict'])
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    raise CheckpointError(f'the checkpoint holds no state_dict (keys: '
                          f'{", ".join(list(checkpoint)[:5])}); pass a model checkpoint.')


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> 'OrderedDict':
    """The entries under ``prefix`` with it removed, as mmengine's ``load_checkpoint_with_prefix``
    does: a prefix without a trailing dot gets one ('backbone' = 'backbone.', as in mmdet's
    EfficientNet configs). A ``module.`` wrapper prefix is dropped first."""
    if prefix and not prefix.endswith('.'):
        prefix += '.'
    out = OrderedDict()
    for key, value in state_dict.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
    return out


def backbone_state_dict(checkpoint: Mapping[str, Any], prefix: str = 'backbone.',
                        use_ema: bool = False) -> Tuple['OrderedDict', int]:
    """The backbone weights of a classifier checkpoint, keys as mmdet / mmseg backbones name them.

    Returns ``(state_dict, renamed)``: keys under ``prefix`` without it, DO-Conv ``D`` /
    ``weight_extra`` kept, and, for the ResNet family (keys ``layer1.*``), mmpretrain's
    deep-stem ConvModule keys ``stem.N.conv.*`` / ``stem.N.bn.*`` renamed to ``stem.3N.*`` /
    ``stem.3N+1.*`` (``renamed`` counts those). Other backbones keep their keys: CSPNeXt's stem,
    for one, is named ``stem.N.conv`` in mmdet too.
    """
    weights = strip_prefix(checkpoint_state_dict(checkpoint, use_ema), prefix)
    if not weights:
        raise CheckpointError(f'the checkpoint has no keys under {prefix!r}; pass a classifier '
                              f'checkpoint (keys backbone.*) or the right --prefix.')
    resnet_family = any(key.startswith('layer1.') for key in weights)
    out, renamed = OrderedDict(), 0
    for key, value in weights.items():
        match = _DEEP_STEM_KEY.match(key) if resnet_family else None
        if match:
            index, part, rest = int(match.group(1)), match.group(2), match.group(3)
            key = f'stem.{3 * index + (part == "bn")}.{rest}'
            renamed += 1
        out[key] = value
    return out, renamed


def compare_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Dict:
    """How ``state_dict`` would load into ``module``: lists of keys by kind.

    ``d_missing``: DO-Conv keys of the module absent from the checkpoint (a plain checkpoint:
    they load as D = 0, the same function). ``d_dropped``: DO-Conv keys of the checkpoint the
    module does not have (a plain module). ``missing`` / ``unexpected``: other keys.
    ``mismatched``: (key, checkpoint shape, module shape).
    """
    own = module.state_dict()
    report = dict(loaded=[], d_missing=[], d_dropped=[], missing=[], unexpected=[],
                  mismatched=[])
    for key, value in own.items():
        if key not in state_dict:
            if key.endswith('num_batches_tracked'):
                continue  # BN counters: never needed to reproduce a function
            report['d_missing' if _is_doconv_key(key) else 'missing'].append(key)
        elif tuple(state_dict[key].shape) != tuple(value.shape):
            report['mismatched'].append((key, tuple(state_dict[key].shape), tuple(value.shape)))
        else:
            report['loaded'].append(key)
    for key in state_dict:
        if key not in own:
            # D of a layer the module has as a plain conv: dropped; of a layer it does not have
            # at all: another architecture, reported with the other unexpected keys. (A
            # weight_extra of a DO-Conv layer of the module is a D_mul mismatch, told by D's
            # shape.)
            layer = key.rsplit('.', 1)[0]
            plain_here = (_is_doconv_key(key) and layer + '.weight' in own
                          and layer + '.D' not in own)
            report['d_dropped' if plain_here else 'unexpected'].append(key)
    return report


def check_pretrained_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor],
                                source: str = 'the checkpoint', where: str = 'the module') -> str:
    """Raise :class:`PretrainedMismatchError` where ``state_dict`` would load only partly into
    ``module``; otherwise return a one-line summary.

    Refused: DO-Conv ``D`` into a module without DO-Conv layers (or ``D_mul`` differing: a shape
    mismatch), module keys the checkpoint lacks (they would keep their random init), any shape
    mismatch. Accepted: a plain checkpoint into DO-Conv layers (D = 0), extra keys of another
    head (summarised).
    """
    report = compare_state_dict(module, state_dict)
    if report['d_dropped']:
        layers = sorted({k.rsplit('.', 1)[0] for k in report['d_dropped']})
        raise PretrainedMismatchError(
            f'{source} is a DO-Conv checkpoint (D for {len(layers)} conv(s), e.g. {layers[0]}.D) '
            f'but {where} has plain convs there: D would be dropped and training would start '
            f'from a different function. Give {where} conv_cfg=dict(type=\'DOConv\') (the same '
            f'D_mul as the pretraining config), or fold the checkpoint first '
            f'(python tools/fold_doconv.py) for a plain model.')
    d_shapes = [m for m in report['mismatched'] if _is_doconv_key(m[0])]
    if d_shapes:
        key, theirs, ours = d_shapes[0]
        raise PretrainedMismatchError(
            f'{source} has DO-Conv {key} of shape {theirs} but {where} expects {ours} (D is '
            f'(in_channels, kh*kw, D_mul): D_mul {theirs[-1]} vs {ours[-1]}; '
            f'{len(d_shapes)} such keys): set conv_cfg=dict(type=\'DOConv\', D_mul={theirs[-1]}) '
            f'as in the pretraining config.')
    if report['mismatched']:
        key, theirs, ours = report['mismatched'][0]
        raise PretrainedMismatchError(
            f'{source} does not fit {where}: {len(report["mismatched"])} shape mismatches, e.g. '
            f'{key} {theirs} vs {ours}; pretrain the same architecture (depth, channels, '
            f'groups) as the backbone.')
    if report['missing']:
        stem = [k for k in report['missing'] if k.startswith('stem.')]
        hint = (' mmpretrain\'s deep stem is named differently: extract the backbone with '
                'python tools/extract_backbone.py CHECKPOINT OUT.pth and load OUT.pth without '
                'a prefix.' if stem and any(k.startswith('stem.') and '.conv.' in k
                                            for k in report['unexpected']) else
                ' Pretrain the same backbone type and settings (e.g. ResNetV1c has a deep stem, '
                'ResNet a 7×7 conv1), and check the init_cfg prefix (prefix=\'backbone.\' for a '
                'classifier checkpoint).')
        raise PretrainedMismatchError(
            f'{source} lacks {len(report["missing"])} weights of {where} '
            f'({key_listing(report["missing"])}): they would keep their random init.{hint}')
    n_d = len({k.rsplit('.', 1)[0] for k in report['loaded'] if k.endswith('.D')})
    line = f'{len(report["loaded"])} tensors'
    if n_d:
        line += f', D of {n_d} DO-Conv layer(s)'
    if report['d_missing']:
        layers = {k.rsplit('.', 1)[0] for k in report['d_missing'] if k.endswith('.D')}
        line += f'; {len(layers)} DO-Conv layer(s) start from D = 0 (plain weights)'
    if report['unexpected']:
        line += f'; {len(report["unexpected"])} checkpoint keys unused ' \
                f'({key_listing(report["unexpected"], 2)})'
    return line


def _pretrained_cfgs(init_cfg: Any) -> List[Dict]:
    cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    return [c for c in cfgs if isinstance(c, Mapping) and c.get('type') == 'Pretrained'
            and c.get('checkpoint')]


def check_pretrained_inits(model: nn.Module) -> List[str]:
    """Check every local ``init_cfg=dict(type='Pretrained', ...)`` of a built model against its
    module (see :func:`check_pretrained_state_dict`); returns one summary line per checkpoint.

    Remote checkpoints (``torchvision://``, ``https://`` ...) are left to mmengine. Raises
    :class:`PretrainedMismatchError` / :class:`~do_conv_mm.checkpoint.CheckpointError`.
    """
    lines = []
    for name, module in model.named_modules():
        for cfg in _pretrained_cfgs(getattr(module, 'init_cfg', None)):
            path = str(cfg['checkpoint'])
            if '://' in path:
                continue
            where = name or type(module).__name__
            if not os.path.isfile(path):
                raise CheckpointError(f'init_cfg of {where}: pretrained checkpoint {path!r} does '
                                      f'not exist; pretrain it first or fix the path.')
            weights = checkpoint_state_dict(load_checkpoint_file(path))
            prefix = cfg.get('prefix')
            if prefix:
                weights = strip_prefix(weights, prefix)
                if not weights:
                    raise PretrainedMismatchError(
                        f'init_cfg of {where}: {path!r} has no keys under prefix {prefix!r}; '
                        f'fix the prefix (or drop it for an extracted backbone).')
            source = f'{path!r}' + (f' (prefix {prefix!r})' if prefix else '')
            summary = check_pretrained_state_dict(module, weights, source, where)
            lines.append(f'{where} <- {source}: {summary}')
    return lines


def build_config_module(config: str, cfg_options=None, part: str = 'backbone') -> nn.Module:
    """The module ``part`` (a dotted path, e.g. ``backbone``; ``''`` for the whole model) of the
    model ``config`` builds, on the CPU, no pretrained weights loaded: what a checkpoint meant
    for it must load into. The whole model is built, so DOConvModel's by-name conversions are
    included."""
    from .deploy.fold_model import build_model
    from .runner_setup import load_config
    model = build_model(load_config(config, cfg_options))
    if not part:
        return model
    try:
        return model.get_submodule(part)
    except AttributeError:
        children = ', '.join(name for name, _ in model.named_children())
        raise CheckpointError(f'the model of {config} has no {part!r} to check against (its '
                              f'parts: {children}).') from None
