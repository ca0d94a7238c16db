"""Config checks: where ``conv_cfg=dict(type='DOConv')`` cannot apply, and why a build failed.

:func:`check_doconv_cfg` reads a (merged) model config before it is built and refuses, with one
line naming the config path and the fix, what would otherwise fail deep inside mmcv / mmdet or,
worse, build a model that silently computes something else. :func:`explain_build_error` turns a
known DO-Conv build failure into such a line. The tools (train / test / fold / analyse) call
both; :class:`~do_conv_mm.convert.DOConvModel` does too. After a build,
:func:`components_ignoring_conv_cfg` names the components whose DO-Conv conv_cfg built nothing;
:func:`d_held_by_trust_ratio` warns where the optimizer would keep D at zero.
"""
import difflib
import inspect
import os
import re
import warnings
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.registry import MODELS

from .doconv import DOConv2d, doconv_layer_type_for, is_doconv_layer_type, plain_layer_type

__all__ = ['DOConvNotApplicableError', 'check_base_conv_types', 'check_doconv_cfg',
           'components_ignoring_conv_cfg', 'd_held_by_trust_ratio', 'explain_build_error',
           'walk_cfg']


class DOConvNotApplicableError(ValueError):
    """DO-Conv was requested for a module or component it cannot apply to."""


def _few(names: List[str], limit: int = 4) -> str:
    shown = ', '.join(names[:limit])
    return shown + (f', ... ({len(names) - limit} more)' if len(names) > limit else '')


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


def components_ignoring_conv_cfg(model_cfg: Dict, model: nn.Module) -> List[str]:
    """One line for each component whose config sets a DO-Conv ``conv_cfg`` but whose built
    module holds plain k×k convs and no DO-Conv layer: it does not hand conv_cfg to its convs
    (mmseg 1.2.2's BiSeNetV2 takes it and drops it), so the setting changed nothing. (A
    component without k×k convs, such as Shared2FCBBoxHead, is no concern.)"""
    lines = []
    for path, component in walk_cfg(model_cfg, 'model'):
        if not _is_doconv_cfg(component.get('conv_cfg')):
            continue
        name = _module_prefix(path)
        try:
            module = model.get_submodule(name)
        except AttributeError:  # a config dict that is no module (e.g. a train_cfg entry)
            continue
        plain = [m for m in module.modules() if isinstance(m, nn.Conv2d)
                 and not isinstance(m, DOConv2d) and m.kernel_size != (1, 1)]
        if plain and not any(isinstance(m, DOConv2d) for m in module.modules()):
            lines.append(
                f'{path} ({type(module).__name__}) sets conv_cfg='
                f'{component["conv_cfg"].get("type")!r} but built no DO-Conv layer ({len(plain)} '
                f'plain k×k convs): it does not pass conv_cfg on to its convs. Convert them by '
                f"name instead: model = dict(type='DOConvModel', model_type=..., "
                f"doconv=dict(include=['{name or '*'}'])).")
    return lines


def _dcn_stages(component: Dict) -> List[int]:
    """Stages (1-based) of a ResNet-like config that build DCN blocks."""
    dcn = component.get('dcn')
    if dcn is None or dcn.get('fallback_on_stride', False):
        return []
    stage_with_dcn = component.get('stage_with_dcn', (False, False, False, False))
    return [i + 1 for i, on in enumerate(stage_with_dcn) if on]


def check_doconv_cfg(model_cfg: Dict, where: str = 'model', scope: Optional[str] = None) -> None:
    """Raise :class:`DOConvNotApplicableError` if ``model_cfg`` asks for DO-Conv where it cannot
    apply or names a conv type that does not exist; otherwise return None. Call it on
    ``cfg.model`` before building (``scope``: the config's ``default_scope``, where the conv types
    are looked up as mmcv's ``build_conv_layer`` does; None keeps the current default scope).

    Detected: a ResNet-style component with ``dcn`` and ``conv_cfg=dict(type='DOConv')`` (mmdet
    and mmseg Bottleneck/BasicBlock assert ``conv_cfg is None`` for DCN blocks); a ``conv_cfg``
    whose type is not registered (a typo such as 'DOconv', or a missing ``custom_imports``),
    named with the closest registered conv types; a DO-Conv ``conv_cfg`` that still holds
    ``_delete_`` (given where the base has no conv_cfg, so mmengine did not consume it); a
    DO-Conv ``conv_cfg`` on a component that builds 1-D / 3-D convs by default (PointRend's point
    heads: Conv1d), where the 2-D layers would fail at the first forward.
    Warned (a UserWarning; the model is valid): a DO-Conv ``conv_cfg`` on a component whose
    default conv type adds something a plain conv lacks (EfficientNet's Conv2dAdaptivePadding:
    use 'DOConvAdaptivePadding' to keep its padding). Conv types a *base config* set are checked
    by :func:`check_base_conv_types`.
    """
    _check_conv_types(model_cfg, where, scope)
    for path, component in walk_cfg(model_cfg, where):
        if not _is_doconv_cfg(component.get('conv_cfg')):
            continue
        if '_delete_' in component['conv_cfg']:
            raise DOConvNotApplicableError(
                f'{path}.conv_cfg still holds _delete_=True after the config was merged: the base '
                f'config has no conv_cfg there, so mmengine passed _delete_ on and the layer '
                f'would get it as an argument. Remove _delete_=True from {path}.conv_cfg (it is '
                f'needed only where the base sets conv_cfg=None, e.g. mmseg\'s UNet backbone).')
        _check_class_default_conv(path, component, scope)
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


# What a conv type other than the plain Conv2d adds, for the messages below.
_WHAT_IT_ADDS = {
    'Conv2dAdaptivePadding': "TensorFlow 'SAME' padding, which its pretrained weights were "
                             'trained with (symmetric padding makes stride-2 convs sample one '
                             'pixel off on even input sizes)',
    'ConvWS': 'weight standardisation, which GN+WS recipes and their pretrained weights rely on',
    'ConvAWS': 'adaptive weight standardisation (DetectoRS), which its recipes rely on',
}


def _is_plain_conv_class(cls: type) -> bool:
    """nn.Conv2d, or mmcv's ``Conv2d`` wrapper (registered as 'Conv'; otherwise nn.Conv2d)."""
    return cls is nn.Conv2d or (cls.__name__ == 'Conv2d' and cls.__module__ ==
                                'mmcv.cnn.bricks.wrappers' and cls.__bases__ == (nn.Conv2d, ))


def _check_replaced_conv(where: str, path: str, old_type: Any, new_type: str,
                         scope: Optional[str]) -> None:
    """``where`` (e.g. "model.backbone (EfficientNet) builds its convs as X by default") had conv
    type ``old_type`` at ``path``; the config now asks for the DO-Conv type ``new_type``.

    Silent when the two compute the same thing at D = 0 (old is plain Conv2d or DO-Conv, or the
    twin of ``new_type``); raises DOConvNotApplicableError for 1-D / 3-D and transposed convs
    (the 2-D forward layer would fail on their inputs or shapes); warns (UserWarning) for other
    conv types, whose behaviour DO-Conv over a plain conv would drop, naming the DO-Conv type that
    keeps it where one exists.
    """
    old_cls = _registered_class(old_type, scope)
    new_plain = plain_layer_type(new_type)
    if old_cls is None or issubclass(old_cls, DOConv2d) or _is_plain_conv_class(old_cls) \
            or old_cls is _registered_class(new_plain, scope):
        return
    old = str(old_type).rpartition('.')[2] if isinstance(old_type, str) else old_cls.__name__
    if issubclass(old_cls, nn.modules.conv._ConvTransposeNd):
        raise DOConvNotApplicableError(
            f'{where} (transposed convolutions, which upsample), but conv_cfg=dict(type='
            f'{new_type!r}) builds forward DO-Conv layers. DO-Conv replaces forward convolutions '
            f'only: remove conv_cfg from {path}.')
    if issubclass(old_cls, (nn.Conv1d, nn.Conv3d)):
        dims = 1 if issubclass(old_cls, nn.Conv1d) else 3
        raise DOConvNotApplicableError(
            f'{where} ({dims}-D convolutions), but conv_cfg=dict(type={new_type!r}) builds 2-D '
            f'DO-Conv layers, which fail on {dims}-D inputs. DO-Conv applies to 2-D convolutions '
            f'only: remove conv_cfg from {path}.')
    adds = _WHAT_IT_ADDS.get(old, f'the behaviour of {old_cls.__name__} (it is not a plain '
                                  f'nn.Conv2d)')
    twin = doconv_layer_type_for(old_cls)
    fix = (f'To keep it use conv_cfg=dict(type={twin!r}).' if twin else
           f'DO-Conv has no twin of {old}; to keep it, leave {path} without '
           f'conv_cfg=dict(type={new_type!r}).')
    over = 'a plain Conv2d' if new_plain == 'Conv2d' else new_plain
    warnings.warn(f'{where}, but conv_cfg=dict(type={new_type!r}) builds DO-Conv over {over}, '
                  f'which drops {adds}. {fix}', UserWarning, stacklevel=4)


def _check_class_default_conv(path: str, component: Dict, scope: Optional[str]) -> None:
    """A DO-Conv conv_cfg replacing what a component builds by default (mmdet's / mmpretrain's
    EfficientNet: Conv2dAdaptivePadding; mmdet's MaskPointHead, mmseg's PointHead: Conv1d)."""
    cls = _registered_class(component.get('type'), scope)
    try:
        default = inspect.signature(cls).parameters['conv_cfg'].default if cls else None
    except (KeyError, TypeError, ValueError):  # no conv_cfg argument, or no signature
        return
    if isinstance(default, dict) and default.get('type') is not None:
        _check_replaced_conv(f'{path} ({cls.__name__}) builds its convs as '
                             f'{default["type"]} by default', path, default['type'],
                             component['conv_cfg']['type'], scope)


def check_base_conv_types(cfg: Config,
                          earlier: Sequence[Tuple[str, Dict]] = ()) -> None:
    """Check each DO-Conv ``conv_cfg`` of ``cfg.model`` against the conv type that the config's
    direct ``_base_`` files (and ``earlier``: (label, model config) pairs, e.g. the file before
    ``--cfg-options``) set at the same place, as :func:`check_doconv_cfg` does for class
    defaults: mmengine's merge keeps only the child's type, so ``conv_cfg=dict(type='DOConv')``
    over a GN+WS recipe's ``ConvWS`` would otherwise drop the weight standardisation silently.

    Warns (UserWarning) where a DO-Conv over a plain conv replaces a conv type that adds
    something (ConvWS, ConvAWS, Conv2dAdaptivePadding, ...), naming the DO-Conv twin that keeps
    it; raises :class:`DOConvNotApplicableError` where it replaces 1-D / 3-D convs. Bases that
    cannot be read are skipped (the config itself loaded, so this check only adds).
    """
    model = cfg.get('model')
    if not isinstance(model, dict) or not any(
            _is_doconv_cfg(c.get('conv_cfg')) for _, c in walk_cfg(model, 'model')):
        return
    scope = cfg.get('default_scope')
    for label, base_model in list(earlier) + _base_models(cfg.filename):
        base_types = {path: c['conv_cfg']['type'] for path, c in walk_cfg(base_model, 'model')
                      if isinstance(c.get('conv_cfg'), dict) and c['conv_cfg'].get('type')}
        for path, component in walk_cfg(model, 'model'):
            if _is_doconv_cfg(component.get('conv_cfg')) and path in base_types:
                _check_replaced_conv(f'{path}: {label} sets conv_cfg=dict(type='
                                     f'{base_types[path]!r}) there', path, base_types[path],
                                     component['conv_cfg']['type'], scope)


def _base_models(filename: Optional[str]) -> List[Tuple[str, Dict]]:
    """('the base config <name>', model config) of each direct ``_base_`` of ``filename`` that
    has a model (a base's own bases are merged into it)."""
    if not filename or not os.path.isfile(filename):
        return []
    try:  # mmengine's own reading of _base_ (relative paths and 'mmdet::' package paths)
        bases = Config._get_base_files(filename)
    except Exception:  # noqa: BLE001  (a config that loaded but whose _base_ we cannot read)
        return []
    found = []
    for base in bases if isinstance(bases, (list, tuple)) else [bases]:
        try:
            base_cfg = Config.fromfile(Config._get_cfg_path(base, filename)[0])
        except Exception:  # noqa: BLE001
            continue
        if isinstance(base_cfg.get('model'), dict):
            found.append((f'the base config {base!r}', base_cfg.model))
    return found


def _conv_registry_lookup(type_name: str, scope: Optional[str]):
    """(found, candidate names) as mmcv's build_conv_layer resolves ``type_name``: in the
    registry of the default scope (``scope`` if given), then its parents up to the root."""
    from mmengine.registry import DefaultScope
    context = (DefaultScope.overwrite_default_scope(scope) if scope is not None else
               nullcontext())
    with context, MODELS.switch_scope_and_registry(None) as registry:
        found = registry.get(type_name)
        names = []
        node = registry
        while node is not None:
            names += [n for n in node.module_dict if n not in names]
            node = node.parent
    return found, names


def _check_conv_types(model_cfg: Dict, where: str, scope: Optional[str]) -> None:
    """Every string ``conv_cfg.type`` must resolve the way build_conv_layer looks it up."""
    checked = {}
    for path, component in walk_cfg(model_cfg, where):
        conv_cfg = component.get('conv_cfg')
        if not isinstance(conv_cfg, dict) or not isinstance(conv_cfg.get('type'), str):
            continue
        type_name = conv_cfg['type']
        if type_name not in checked:
            checked[type_name] = _conv_registry_lookup(type_name, scope)
        found, names = checked[type_name]
        if found is not None:
            continue
        convs = [n for n in names if 'conv' in n.lower()]
        short = type_name.rpartition('.')[2]
        close = [n for n in convs if n.lower() == short.lower()]
        close += [n for n in difflib.get_close_matches(short, convs, n=3, cutoff=0.6)
                  if n not in close]
        if close:
            hint = f'did you mean {close[0]!r}' + (
                f' (or {", ".join(map(repr, close[1:]))})' if close[1:] else '') + '?'
        else:
            hint = (f'registered conv types: {sorted(convs)}; a type from a plugin needs '
                    f"custom_imports=dict(imports=['<package>']) in the config.")
        raise DOConvNotApplicableError(
            f'{path}.conv_cfg: conv type {type_name!r} is not registered (mmcv would stop with '
            f'"Cannot find None in registry"); {hint}')


def explain_build_error(model_cfg: Dict, error: BaseException,
                        scope: Optional[str] = None) -> Optional[str]:
    """One clear message for a known DO-Conv failure while building ``model_cfg`` (the error
    mmengine raised), or None when the error is not one of ours.

    Known: ``conv_cfg`` on a component that does not take it (or cannot, e.g. DCN blocks), and a
    ``D_mul`` smaller than kh*kw of a conv its conv_cfg builds (named by module, from a probe
    build of the same model without D_mul).
    """
    explained = _innermost_explained(error)
    if explained is not None:  # DOConvModel explained it already; mmengine re-raised it wrapped
        return str(explained)
    uses_doconv = any(is_doconv_layer_type(c.get('type')) or
                      str(c.get('type', '')).rpartition('.')[2] == 'DOConvModel'
                      for _, c in walk_cfg(model_cfg, 'model'))
    if not uses_doconv:
        return None
    return (_explain_build_error(model_cfg, error, scope)
            or _explain_d_mul(model_cfg, error, scope))


def _innermost_explained(error: BaseException) -> Optional[BaseException]:
    """The first DOConvNotApplicableError raised on the way to ``error`` (through mmengine's
    re-raises, which chain the original as ``__context__``), or None."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DOConvNotApplicableError):
            found = error
        error = error.__cause__ or error.__context__
    return found


_D_MUL_ERROR = re.compile(r'DOConv2d: D_mul=(\d+) is smaller than kh\*kw=(\d+) for kernel '
                          r'\((\d+), (\d+)\)')


def _d_mul_sources(model_cfg: Dict) -> List[Tuple[str, int]]:
    """(config path, D_mul) of every conv_cfg=DOConv that sets D_mul."""
    return [(path, component['conv_cfg']['D_mul'])
            for path, component in walk_cfg(model_cfg, 'model')
            if _is_doconv_cfg(component.get('conv_cfg'))
            and component['conv_cfg'].get('D_mul') is not None]


def _without_d_mul(node: Any) -> Any:
    """A copy of a config with D_mul dropped from every conv_cfg=DOConv (default per layer).
    Dicts come back as ConfigDicts: models read their sub-configs as attributes (``train_cfg.rpn``
    in mmdet's two-stage detectors)."""
    if isinstance(node, dict):
        out = ConfigDict({k: _without_d_mul(v) for k, v in node.items()})
        if is_doconv_layer_type(out.get('type')):
            out.pop('D_mul', None)
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_without_d_mul(v) for v in node)
    return node


def _module_prefix(path: str) -> str:
    """Config path 'model.roi_head.bbox_head[0]' -> module name 'roi_head.bbox_head.0'."""
    return re.sub(r'\[(\d+)\]', r'.\1', path).partition('.')[2]


def _explain_d_mul(model_cfg: Dict, error: BaseException, scope: Optional[str]) -> Optional[str]:
    match = _D_MUL_ERROR.search(str(error))
    if match is None:
        return None
    d_mul, taps = int(match.group(1)), int(match.group(2))
    kernel = f'{match.group(3)}x{match.group(4)}'
    sources = _d_mul_sources(model_cfg)
    offenders = []  # (module name, kernel, taps, config path, D_mul)
    try:
        from mmengine.registry import DefaultScope
        context = (DefaultScope.overwrite_default_scope(scope) if scope is not None else
                   nullcontext())
        with context:
            probe = MODELS.build(_without_d_mul(model_cfg))
        for name, module in probe.named_modules():
            if not isinstance(module, DOConv2d) or module.D is None:
                continue
            owners = [(p, d) for p, d in sources
                      if name.startswith(_module_prefix(p) + '.') or not _module_prefix(p)]
            if not owners:
                continue
            path, value = max(owners, key=lambda o: len(o[0]))
            layer_taps = module.kernel_size[0] * module.kernel_size[1]
            if layer_taps > value:
                offenders.append((name, 'x'.join(map(str, module.kernel_size)), layer_taps,
                                  path, value))
    except Exception:  # the probe is best effort; the message below still names the kernel
        offenders = []
    if offenders:
        name, kernel, taps, path, d_mul = offenders[0]
        more = [o[0] for o in offenders[1:]]
        others = f' (also: {_few(more)})' if more else ''
        need = max(o[2] for o in offenders)
        return (f'DO-Conv cannot build module {name!r}{others}: its {kernel} kernel has kh*kw='
                f'{taps} taps, but {path}.conv_cfg sets D_mul={d_mul}, and D_mul must be >= '
                f'kh*kw of every conv a conv_cfg builds. Fix: leave D_mul out of {path}.conv_cfg '
                f'(default kh*kw per layer; if a shared conv_cfg variable sets it, give {path} '
                f"its own conv_cfg=dict(type='DOConv')), or set D_mul >= {need} there.")
    paths = ', '.join(f'{p} (D_mul={d})' for p, d in sources) or 'a DOConvModel doconv.D_mul'
    return (f'DO-Conv cannot build a {kernel} conv (kh*kw={taps} taps) with D_mul={d_mul}: D_mul '
            f'must be >= kh*kw of every conv it applies to. It is set in {paths}; leave D_mul '
            f'unset there (default kh*kw per layer) or raise it to >= {taps}.')


def _registered_class(type_name: Any, scope: Optional[str]) -> Optional[type]:
    """The class a config ``type`` builds under ``scope`` (a class passes through), or None."""
    if isinstance(type_name, type):
        return type_name
    if not isinstance(type_name, str):
        return None
    from mmengine.registry import DefaultScope
    context = (DefaultScope.overwrite_default_scope(scope) if scope is not None else
               nullcontext())
    try:
        with context, MODELS.switch_scope_and_registry(None) as registry:
            cls = registry.get(type_name)
    except Exception:  # noqa: BLE001  (an unknown scope or type)
        return None
    return cls if isinstance(cls, type) else None


def _class_names(type_name: Any, scope: Optional[str]) -> List[str]:
    """Names of the registered class ``type_name`` and its bases (just ``type_name`` when it
    cannot be looked up): an error may name a base, e.g. AnchorHead for RPNHead."""
    cls = _registered_class(type_name, scope)
    if cls is None:
        if isinstance(type_name, str):
            return [type_name.rpartition('.')[2]]
        return [getattr(type_name, '__name__', str(type_name))]
    return [c.__name__ for c in cls.__mro__ if c.__module__.split('.')[0] != 'torch']


def _explain_build_error(model_cfg: Dict, exc: BaseException,
                         scope: Optional[str] = None) -> Optional[str]:
    """A clear message for known DO-Conv build failures, or None."""
    text = str(exc)
    if 'conv_cfg' in text and ('unexpected keyword' in text or 'must be None' in text):
        users = [(path, c.get('type', '?')) for path, c in walk_cfg(model_cfg, 'model')
                 if 'conv_cfg' in c and path != 'model']
        named = [(p, t) for p, t in users
                 if any(f'{name}.' in text or f'{name} ' in text or text.endswith(name)
                        for name in _class_names(t, scope))]
        culprits = named or users
        listing = ', '.join(f'{p} ({t})' for p, t in culprits)
        label = 'Rejected by' if named else 'Component(s) with conv_cfg'
        return (f'Building the model failed on conv_cfg: {text}. {label}: {listing}. A '
                f'component whose constructor does not take conv_cfg (e.g. mmdet RPNHead) or '
                f'that cannot use it (DCN blocks) must not get conv_cfg=DOConv; '
                f'remove it there and convert its k×k convs by name with '
                f"model=dict(type='DOConvModel', model_type=..., doconv=dict(include=[...])).")
    return None


# ----------------------------------------------------------------------------------------------
# Trust-ratio optimizers: D starts at zero
# ----------------------------------------------------------------------------------------------
def _adapts_group(optimizer_name: str, group: dict) -> bool:
    """Whether mmpretrain's Lamb / LARS scales this group's steps by the parameters' own norms."""
    if optimizer_name == 'Lamb':
        return group.get('weight_decay', 0) != 0 or bool(group.get('always_adapt', False))
    return not group.get('lars_exclude', False)  # LARS


def d_held_by_trust_ratio(optimizer, model: nn.Module) -> Optional[str]:
    """A warning where a trust-ratio optimizer (mmpretrain's ``Lamb``, ``LARS``) would keep D at 0.

    Both scale a parameter's step by ‖p‖ / ‖update‖. D starts at exactly 0, so after the first
    (warm-up sized) step every step is proportional to D's own tiny norm: D barely moves and the
    DO-Conv layers train as plain convs. None where no trained D is adapted so."""
    name = type(optimizer).__name__
    if name not in ('Lamb', 'LARS'):
        return None
    d_ids = {id(m.D) for m in model.modules()
             if isinstance(m, DOConv2d) and m.D is not None and m.D.requires_grad}
    adapted = sum(1 for group in optimizer.param_groups if _adapts_group(name, group)
                  for p in group['params'] if id(p) in d_ids)
    if not adapted:
        return None
    fix = ("custom_keys={'.D': dict(decay_mult=0.)} (mmpretrain's Lamb does not adapt "
           "parameters without weight decay)" if name == 'Lamb' else
           "custom_keys={'.D': dict(lars_exclude=True, lr_mult=M)}, with lr·M an SGD-sized "
           "rate (M = 0.01 for lr 4.8)")
    return (f'{name} scales each parameter\'s step by its own norm (trust ratio), and D starts at '
            f'0: {adapted} DO-Conv D tensors would stay near 0 and their layers train as plain '
            f'convs. Fix: optim_wrapper.paramwise_cfg.{fix}.')
