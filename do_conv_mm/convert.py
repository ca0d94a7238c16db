"""Convert plain k×k convolutions of a built model to DO-Conv, by module name, from a config.

Some mmdet / mmseg modules build their k×k convs without ``conv_cfg`` (RPNHead's ``rpn_conv``,
RetinaHead's ``retina_cls``, DeepLabV3+'s separable ASPP branches, ...). Two ways to reach them:

* :func:`convert_to_doconv` on a live model::

      convert_to_doconv(model, include=['rpn_head', 'bbox_head.retina_*'], exclude=[...])

* the ``DOConvModel`` builder, config only (registered in the ``MODELS`` registries of mmdet and
  mmseg, whichever are installed, so ``type='DOConvModel'`` works under both default scopes; it
  stays out of mmengine's root ``MODELS``, where mmcv treats every name containing "conv" as a
  conv layer; :func:`register_doconv_model` adds it to another scope's registry)::

      model = dict(type='DOConvModel', model_type='RetinaNet',
                   doconv=dict(include=['bbox_head.retina_cls', 'bbox_head.retina_reg']))

  merged over a ``_base_`` model: it builds ``dict(type=model_type, **other_keys)`` in the current
  scope, converts, and returns that same model object (no wrapper, no key prefix).

Conversion uses :meth:`DOConv2d.from_conv2d`: weight and bias are shared, D = 0, so the model
computes exactly what it computed before and its state_dict keys only gain ``<conv>.D`` (and
``<conv>.weight_extra`` when D_mul > kh*kw). Plain checkpoints still load (missing D = identity).
"""
import difflib
import re
from fnmatch import fnmatchcase
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from mmengine.registry import MODELS, Registry

from .doconv import DOConv2d, is_doconv_layer_type

__all__ = ['convert_to_doconv', 'check_doconv_cfg', 'DOConvModel', 'DOConvNotApplicableError',
           'register_doconv_model']

Patterns = Union[None, str, Sequence[str]]
_DEFORM_CLASS_NAMES = ('DeformConv2d', 'ModulatedDeformConv2d')


class DOConvNotApplicableError(ValueError):
    """DO-Conv was requested for a module or component it cannot apply to."""


# ----------------------------------------------------------------------------------------------
# Live-model conversion
# ----------------------------------------------------------------------------------------------
def _is_plain_conv2d(module: nn.Module) -> bool:
    """nn.Conv2d itself, or mmcv's ``Conv2d`` wrapper (registered as 'Conv': it only adds an
    empty-input shortcut for torch < 1.4 and otherwise *is* nn.Conv2d)."""
    cls = type(module)
    if cls is nn.Conv2d:
        return True
    return (cls.__name__ == 'Conv2d' and cls.__module__ == 'mmcv.cnn.bricks.wrappers'
            and cls.__bases__ == (nn.Conv2d, ))


def _is_conv_like(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) or any(
        c.__name__ in _DEFORM_CLASS_NAMES for c in type(module).__mro__)


def _why_not_convertible(module: nn.Module) -> Optional[str]:
    """None if ``module`` can become a DOConv2d, else the reason it cannot (conv-like only)."""
    cls = type(module)
    if any(c.__name__ in _DEFORM_CLASS_NAMES for c in cls.__mro__):
        return (f'it is a deformable convolution ({cls.__name__}): mmcv applies its kernel at '
                f'learned offsets inside its own op, not through nn.Conv2d, so there is no '
                f'nn.Conv2d kernel for DO-Conv to over-parameterise')
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return (f'it is a transposed convolution ({cls.__name__}); DOConv2d only replaces '
                f'forward nn.Conv2d layers')
    if not isinstance(module, nn.Conv2d):
        return f'it is a {cls.__name__}; DOConv2d only replaces 2-D convolutions (nn.Conv2d)'
    if not _is_plain_conv2d(module):
        return (f'it is a {cls.__module__}.{cls.__name__}, a subclass of nn.Conv2d with its own '
                f'behaviour that a DOConv2d would silently drop')
    return None


def _as_patterns(patterns: Patterns, arg: str) -> Optional[List[str]]:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f'convert_to_doconv: {arg} must be a glob pattern or a list of glob '
                        f'patterns (str), got {patterns!r}.')
    return list(patterns)


def _matches(name: str, patterns: Iterable[str]) -> Optional[str]:
    """The first pattern that matches ``name`` or one of its ancestors (a selected subtree)."""
    parts = name.split('.')
    prefixes = ['.'.join(parts[:i]) for i in range(len(parts), 0, -1)]
    for pattern in patterns:
        if any(fnmatchcase(prefix, pattern) for prefix in prefixes):
            return pattern
    return None


def _check_patterns_match(patterns: List[str], names: List[str], arg: str) -> None:
    for pattern in patterns:
        if any(fnmatchcase(name, pattern) for name in names):
            continue
        literal = pattern.split('*')[0].split('?')[0].split('[')[0]
        close = difflib.get_close_matches(pattern, names, n=6, cutoff=0.6)
        close += [n for n in names if literal and n.startswith(literal.rsplit('.', 1)[0] + '.')
                  and n not in close][:6 - len(close)]
        hint = (f' Close names: {close}.' if close else
                f' Top-level modules: {sorted({n.split(".")[0] for n in names})}.')
        raise ValueError(
            f'convert_to_doconv: {arg} pattern {pattern!r} matches no module name.{hint} Patterns '
            f'are fnmatch globs on model.named_modules() names (e.g. "rpn_head.rpn_conv", '
            f'"bbox_head.retina_*"); a pattern selects the matched modules and everything '
            f'inside them.')


def convert_to_doconv(model: nn.Module,
                      include: Patterns = None,
                      exclude: Patterns = None,
                      D_mul: Optional[int] = None) -> List[str]:
    """Replace plain k×k ``nn.Conv2d`` layers of ``model`` by :class:`DOConv2d`, in place.

    Args:
        model: any nn.Module (an mmdet detector, an mmseg segmentor, a backbone, ...).
        include: fnmatch glob(s) on ``model.named_modules()`` names; a module is selected when
            its name or an ancestor's name matches (so ``'rpn_head'`` selects the whole head).
            None selects every module.
        exclude: glob(s) in the same form; a selected module whose name or an ancestor's name
            matches is left alone.
        D_mul: depth of the over-parameterisation (default kh*kw); see :class:`DOConv2d`.

    Returns:
        Names of the converted convs, in ``named_modules()`` order (a conv registered under
        several names is converted once and listed under its first name).

    1×1 convs and layers that already are DOConv2d are skipped. A selected conv-like module that
    cannot become DO-Conv (deformable, transposed, Conv1d/3d, a Conv2d subclass with its own
    forward) raises :class:`DOConvNotApplicableError` naming it and the ``exclude`` fix when it
    was selected by ``include``; with ``include=None`` such layers are skipped. A pattern that
    matches no module name raises ValueError with the closest names. State-dict keys of the model
    are unchanged apart from the added ``.D`` / ``.weight_extra``.
    """
    include_patterns = _as_patterns(include, 'include')
    exclude_patterns = _as_patterns(exclude, 'exclude') or []
    all_names = [name for name, _ in model.named_modules() if name]
    if include_patterns is not None:
        _check_patterns_match(include_patterns, all_names, 'include')
    _check_patterns_match(exclude_patterns, all_names, 'exclude')

    selected: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not _is_conv_like(module) or isinstance(module, DOConv2d):
            continue
        if include_patterns is not None:
            by = _matches(name, include_patterns) if name else None
            if by is None:
                continue
        if name and _matches(name, exclude_patterns) is not None:
            continue
        reason = _why_not_convertible(module)
        if reason is not None:
            if include_patterns is None:
                continue
            raise DOConvNotApplicableError(
                f'convert_to_doconv: module {name!r} (selected by include pattern {by!r}) cannot '
                f'be converted to DO-Conv: {reason}. Leave it out with '
                f'exclude=[{name!r}] (in a config: doconv=dict(include=[...], '
                f'exclude=[{name!r}])) or narrow the include pattern.')
        if module.kernel_size[0] * module.kernel_size[1] == 1:
            continue  # a 1×1 DO-Conv is a plain 1×1 conv
        if not name:
            raise DOConvNotApplicableError(
                'convert_to_doconv: the model itself is a Conv2d; use DOConv2d.from_conv2d(conv) '
                'to convert a bare layer.')
        selected.append((name, module))

    replacements = {id(conv): _to_doconv(conv, D_mul) for _, conv in selected}
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return [name for name, _ in selected]


def _to_doconv(conv: nn.Conv2d, D_mul: Optional[int]) -> DOConv2d:
    if type(conv) is not nn.Conv2d:  # mmcv's Conv2d wrapper: view it as the nn.Conv2d it is
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                          conv.padding_mode, device='meta')
        plain.weight, plain.bias = conv.weight, conv.bias
        plain.train(conv.training)
        conv = plain
    return DOConv2d.from_conv2d(conv, D_mul=D_mul)


# ----------------------------------------------------------------------------------------------
# Config checks: components where conv_cfg=DOConv cannot apply
# ----------------------------------------------------------------------------------------------
def _is_doconv_cfg(conv_cfg: Any) -> bool:
    return isinstance(conv_cfg, dict) and is_doconv_layer_type(conv_cfg.get('type'))


def walk_cfg(node: Any, path: str):
    """Yield (path, dict) for every dict in a nested config (dicts and lists)."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk_cfg(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from walk_cfg(value, f'{path}[{i}]')


def _dcn_stages(component: Dict) -> List[int]:
    """Stages (1-based) of a ResNet-like config that build DCN blocks."""
    dcn = component.get('dcn')
    if dcn is None or dcn.get('fallback_on_stride', False):
        return []
    stage_with_dcn = component.get('stage_with_dcn', (False, False, False, False))
    return [i + 1 for i, on in enumerate(stage_with_dcn) if on]


def check_doconv_cfg(model_cfg: Dict, where: str = 'model') -> None:
    """Raise :class:`DOConvNotApplicableError` if ``model_cfg`` asks for DO-Conv where it cannot
    apply; otherwise return None. Call it on ``cfg.model`` before building.

    Detected: a ResNet-style component with ``dcn`` and ``conv_cfg=dict(type='DOConv')`` (mmdet
    and mmseg Bottleneck/BasicBlock assert ``conv_cfg is None`` for DCN blocks).
    """
    for path, component in walk_cfg(model_cfg, where):
        if not _is_doconv_cfg(component.get('conv_cfg')):
            continue
        stages = _dcn_stages(component)
        if stages:
            kind = component.get('type', 'this component')
            name = path.split('.', 1)[-1]
            exclude = [f'{name}.layer{stage}.*.conv2' for stage in stages]
            raise DOConvNotApplicableError(
                f'{path} ({kind}) sets conv_cfg=dict(type={component["conv_cfg"]["type"]!r}) and '
                f'dcn={dict(component["dcn"])} on stages {stages}: DO-Conv cannot apply to '
                f'deformable convolutions (their kernel runs inside mmcv\'s deformable op), and '
                f'the ResNet blocks assert conv_cfg is None when dcn is set. Fix: remove conv_cfg '
                f'from {path} and convert its other k×k convs by name instead: '
                f"model=dict(type='DOConvModel', model_type=..., doconv=dict(include=['{name}'], "
                f'exclude={exclude})).')


def _explain_build_error(model_cfg: Dict, exc: BaseException) -> Optional[str]:
    """A clear message for known DO-Conv build failures, or None."""
    text = str(exc)
    if 'conv_cfg' in text and ('unexpected keyword' in text or 'must be None' in text):
        users = [(path, c.get('type', '?')) for path, c in walk_cfg(model_cfg, 'model')
                 if 'conv_cfg' in c and path != 'model']
        named = [(p, t) for p, t in users if isinstance(t, str) and t in text]
        culprits = named or users
        listing = ', '.join(f'{p} ({t})' for p, t in culprits)
        return (f'Building the model failed on conv_cfg: {text}\nComponent(s) with conv_cfg: '
                f'{listing}. A component whose constructor does not take conv_cfg (e.g. mmdet '
                f'RPNHead) or that cannot use it (DCN blocks) must not get conv_cfg=DOConv; '
                f'remove it there and convert its k×k convs by name with '
                f"model=dict(type='DOConvModel', model_type=..., doconv=dict(include=[...])).")
    return None


# ----------------------------------------------------------------------------------------------
# Config-only entry point
# ----------------------------------------------------------------------------------------------
_DOCONV_KEYS = ('include', 'exclude', 'D_mul')


def DOConvModel(model_type: Union[str, type], doconv: Optional[Dict] = None, **kwargs) -> nn.Module:
    """Build ``dict(type=model_type, **kwargs)`` in the current registry scope, then
    :func:`convert_to_doconv` it with ``doconv=dict(include=..., exclude=..., D_mul=...)``.

    Returns the built model itself (its class, state_dict keys and attributes are the original
    model's). ``doconv=None`` converts nothing beyond what conv_cfg already built; a ``doconv``
    dict without ``include`` converts every plain k×k conv (minus ``exclude``).
    """
    if model_type in ('DOConvModel', DOConvModel):
        raise ValueError('DOConvModel: model_type must be the wrapped model type (e.g. '
                         "'RetinaNet'), not 'DOConvModel' itself.")
    doconv_cfg = None if doconv is None else dict(doconv)
    unknown = sorted(set(doconv_cfg or {}) - set(_DOCONV_KEYS))
    if unknown:
        raise ValueError(f'DOConvModel: unknown doconv keys {unknown}; allowed: '
                         f'{list(_DOCONV_KEYS)}.')
    model_cfg = dict(type=model_type, **kwargs)
    check_doconv_cfg(model_cfg)
    try:
        model = MODELS.build(model_cfg)
    except (AssertionError, TypeError) as exc:
        message = _explain_build_error(model_cfg, exc)
        if message is None:
            raise
        raise DOConvNotApplicableError(message) from exc
    if doconv_cfg is not None:
        convert_to_doconv(model, **doconv_cfg)
    return model


# Scopes whose MODELS registry gets DOConvModel at import (when the package is installed).
DOWNSTREAM_SCOPES = ('mmdet', 'mmseg')


def register_doconv_model(registry: Registry) -> None:
    """Make ``type='DOConvModel'`` buildable from ``registry`` (a downstream ``MODELS``, e.g.
    ``mmpretrain.registry.MODELS``) and from its scope. mmdet's and mmseg's are done at import.

    DOConvModel is deliberately not in mmengine's root ``MODELS``: mmcv's build_conv_layer looks
    conv layer types up there, and stock code (mmcv's own tests) treats every root name that
    contains "conv" as a conv layer it can build with ``(in_channels, out_channels, ...)``.
    """
    if registry.module_dict.get('DOConvModel') is not DOConvModel:
        registry.register_module(name='DOConvModel', module=DOConvModel)


def _register_downstream() -> None:
    import importlib
    import importlib.util
    for scope in DOWNSTREAM_SCOPES:
        if importlib.util.find_spec(scope) is None:
            continue  # not installed: its configs cannot be used anyway
        register_doconv_model(importlib.import_module(f'{scope}.registry').MODELS)


_register_downstream()
