"""Convert plain k×k convolutions of a built model to DO-Conv, by module name, from a config.

Some mmdet / mmseg / mmpretrain modules build their k×k convs without ``conv_cfg`` (RPNHead's
``rpn_conv``, RetinaHead's ``retina_cls``, DeepLabV3+'s separable ASPP branches, ...). Two ways
to reach them:

* :func:`convert_to_doconv` on a live model::

      convert_to_doconv(model, include=['rpn_head', 'bbox_head.retina_*'], exclude=[...])

* the ``DOConvModel`` builder, config only (registered in the ``MODELS`` registries of mmdet,
  mmseg and mmpretrain, whichever are installed, so ``type='DOConvModel'`` works under those
  default scopes; it stays out of mmengine's root ``MODELS``, where mmcv treats every name
  containing "conv" as a conv layer; :func:`register_doconv_model` adds it to another scope's
  registry)::

      model = dict(type='DOConvModel', model_type='RetinaNet',
                   doconv=dict(include=['bbox_head.retina_cls', 'bbox_head.retina_reg']))

  merged over a ``_base_`` model: it builds ``dict(type=model_type, **other_keys)`` in the current
  scope, converts, and returns that same model object (no wrapper, no key prefix).

Conversion uses :meth:`DOConv2d.from_conv2d` (:class:`DOConv2dAdaptivePadding` /
:class:`DOConv2dWS` for mmcv's ``Conv2dAdaptivePadding`` / ``ConvWS2d``): weight and bias are
shared, D = 0, so the model computes exactly what it computed before and its state_dict keys
only gain ``<conv>.D`` (and ``<conv>.weight_extra`` when D_mul > kh*kw). Plain checkpoints still
load (missing D = identity).
"""
import difflib
from fnmatch import fnmatchcase
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
from mmengine.registry import MODELS, Registry

# The config checks lived here first; they are re-exported for code that imports them from here.
from .config_check import (DOConvNotApplicableError, _few, _is_plain_conv_class,  # noqa: F401
                           check_doconv_cfg, explain_build_error, walk_cfg)
from .doconv import DOConv2d, _hook_reparametrisation, doconv_twin_of

__all__ = ['convert_to_doconv', 'check_doconv_cfg', 'DOConvModel', 'DOConvNotApplicableError',
           'register_doconv_model']

Patterns = Union[None, str, Sequence[str]]
_DEFORM_CLASS_NAMES = ('DeformConv2d', 'ModulatedDeformConv2d')


# ----------------------------------------------------------------------------------------------
# Live-model conversion
# ----------------------------------------------------------------------------------------------
def _is_plain_conv2d(module: nn.Module) -> bool:
    """nn.Conv2d itself, or mmcv's ``Conv2d`` wrapper (registered as 'Conv': it only adds an
    empty-input shortcut for torch < 1.4 and otherwise *is* nn.Conv2d)."""
    return _is_plain_conv_class(type(module))


def _doconv_class_for(module: nn.Module) -> Optional[type]:
    """The DO-Conv class whose ``from_conv2d`` computes what ``module`` computes, or None."""
    if _is_plain_conv2d(module):
        return DOConv2d
    return doconv_twin_of(type(module))


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
    if parametrize.is_parametrized(module):
        return ('its parameters are parametrised (torch.nn.utils.parametrize); remove that '
                'with parametrize.remove_parametrizations(module, name), convert, and register '
                'the parametrisation on the DOConv2d (it supports parametrize)')
    if _doconv_class_for(module) is None:
        return (f'it is a {cls.__module__}.{cls.__name__}, a subclass of nn.Conv2d with its own '
                f'behaviour that a DOConv2d would silently drop')
    reparametrisation = _hook_reparametrisation(module)
    if reparametrisation is not None:
        return (f'its weight is recomputed in a forward pre-hook by {reparametrisation} (then '
                f'it can be converted)')
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
        model: any nn.Module (an mmdet detector, an mmseg segmentor, an mmpretrain classifier,
            a backbone, ...).
        include: fnmatch glob(s) on ``model.named_modules()`` names; a module is selected when
            its name or an ancestor's name matches (so ``'rpn_head'`` selects the whole head).
            None selects every module.
        exclude: glob(s) in the same form; a selected module whose name or an ancestor's name
            matches is left alone.
        D_mul: depth of the over-parameterisation (default kh*kw); see :class:`DOConv2d`.

    Returns:
        Names of the converted convs, in ``named_modules()`` order. A conv registered under
        several names (shared between parents, e.g. RTMDet's ``share_conv`` head) becomes one
        DOConv2d at all of its names and is listed under its first name.

    1×1 convs and layers that already are DOConv2d are skipped. Refused with an error naming
    the module or pattern and the fix (nothing is converted then): a selected conv-like module
    that cannot become DO-Conv (deformable, transposed, Conv1d/3d, a Conv2d subclass with its own
    forward) when it was selected by ``include`` (with ``include=None`` such layers are
    skipped); a pattern that matches no module name (the closest names are listed); an include
    pattern that selects no k×k conv (e.g. only 1×1 convs: it would convert nothing); a ``D_mul``
    smaller than a selected conv's kh*kw; a shared conv that ``include`` selects under one name
    and ``exclude`` leaves out under another. State-dict keys of the model are unchanged apart
    from the added ``.D`` / ``.weight_extra``.
    """
    include_patterns = _as_patterns(include, 'include')
    exclude_patterns = _as_patterns(exclude, 'exclude') or []
    # Every name of every module: a module shared by several parents has several.
    names_of: Dict[int, List[str]] = {}
    module_of: Dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
        module_of[id(module)] = module
    all_names = [name for names in names_of.values() for name in names if name]
    if include_patterns is not None:
        _check_patterns_match(include_patterns, all_names, 'include')
    _check_patterns_match(exclude_patterns, all_names, 'exclude')

    selected: List[Tuple[str, nn.Module]] = []
    # include pattern -> [k×k DO-Conv names it yields, 1×1 conv names, excluded k×k names]
    outcome = {pattern: ([], [], []) for pattern in include_patterns or []}
    for key, names in names_of.items():
        module = module_of[key]
        if not _is_conv_like(module):
            continue
        named = [n for n in names if n]
        if include_patterns is None:
            by = {}
        else:
            by = {n: p for n, p in ((n, _matches(n, include_patterns)) for n in named) if p}
            if not by:
                continue
        excluded_as = [n for n in named if _matches(n, exclude_patterns) is not None]
        kept_as = [n for n in (by if include_patterns is not None else named)
                   if n not in excluded_as]
        if kept_as and excluded_as:
            how = (f'include pattern {by[kept_as[0]]!r} selects it' if by else 'it is selected')
            raise DOConvNotApplicableError(
                f'convert_to_doconv: module {kept_as[0]!r} is shared: the same conv is also '
                f'registered as {[n for n in named if n != kept_as[0]]}; {how} as '
                f'{kept_as[0]!r} but exclude leaves it out as {excluded_as[0]!r}. One module '
                f'cannot be both DO-Conv and plain: exclude all of its names or none.')
        name = named[0] if named else ''
        taps = None
        if isinstance(module, nn.Conv2d):
            taps = module.kernel_size[0] * module.kernel_size[1]
        for pattern in set(by.values()):
            doconv_kxk, one_by_one, excluded_kxk = outcome[pattern]
            if taps == 1:
                one_by_one.append(name)
            elif excluded_as:
                excluded_kxk.append(name)
            elif isinstance(module, DOConv2d) or _why_not_convertible(module) is None:
                doconv_kxk.append(name)
        if excluded_as or isinstance(module, DOConv2d):
            continue
        reason = _why_not_convertible(module)
        if reason is not None:
            if include_patterns is None:
                continue
            raise DOConvNotApplicableError(
                f'convert_to_doconv: module {name!r} (selected by include pattern '
                f'{next(iter(by.values()))!r}) cannot be converted to DO-Conv: {reason}. Leave it '
                f'out with exclude=[{name!r}] (in a config: doconv=dict(include=[...], '
                f'exclude=[{name!r}])) or narrow the include pattern.')
        if taps == 1:
            continue  # a 1×1 DO-Conv is a plain 1×1 conv
        if not name:
            raise DOConvNotApplicableError(
                'convert_to_doconv: the model itself is a Conv2d; use DOConv2d.from_conv2d(conv) '
                'to convert a bare layer.')
        if D_mul is not None and isinstance(D_mul, int) and not isinstance(D_mul, bool) \
                and D_mul < taps:
            kernel = 'x'.join(map(str, module.kernel_size))
            raise DOConvNotApplicableError(
                f'convert_to_doconv: D_mul={D_mul} is smaller than kh*kw={taps} of module '
                f'{name!r} ({kernel} kernel); D_mul must be >= kh*kw of every conv it converts. '
                f'Use D_mul >= {taps}, leave D_mul unset (default kh*kw per layer), or leave the '
                f'module out with exclude=[{name!r}].')
        selected.append((name, module))
    _check_include_outcome(outcome)

    replacements = {id(conv): _to_doconv(conv, D_mul) for _, conv in selected}
    for parent in list(model.modules()):
        # _modules, not named_children(): a conv held twice by one parent (m.a = m.b = conv)
        # is listed once there, and its second name would keep the plain conv.
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return [name for name, _ in selected]


def _check_include_outcome(outcome: Dict[str, Tuple[List[str], List[str], List[str]]]) -> None:
    """An include pattern that yields no k×k DO-Conv layer would convert nothing: refuse it."""
    for pattern, (doconv_kxk, one_by_one, excluded_kxk) in outcome.items():
        if doconv_kxk:
            continue
        if excluded_kxk:
            why = (f'every k×k conv it selects is left out by exclude ({_few(excluded_kxk)}); '
                   f'narrow exclude or drop the include pattern')
        elif one_by_one:
            why = (f'it selects only 1×1 convs ({_few(one_by_one)}), and a 1×1 DO-Conv is a plain '
                   f'1×1 conv (D_mul >= kh*kw = 1 adds nothing), so nothing would change; select '
                   f'the k×k convs you mean (see tools/analyze_doconv.py for the plain k×k convs '
                   f'left) or drop the pattern')
        else:
            why = ('it selects no convolution at all; select modules that contain k×k convs or '
                   'drop the pattern')
        raise DOConvNotApplicableError(
            f'convert_to_doconv: include pattern {pattern!r} converts nothing: {why}.')



def _to_doconv(conv: nn.Conv2d, D_mul: Optional[int]) -> DOConv2d:
    doconv_class = _doconv_class_for(conv)
    if doconv_class is not DOConv2d:
        return doconv_class.from_conv2d(conv, D_mul=D_mul)
    if type(conv) is not nn.Conv2d:  # mmcv's Conv2d wrapper: view it as the nn.Conv2d it is
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                          conv.padding_mode, device='meta')
        plain.weight, plain.bias = conv.weight, conv.bias
        plain.train(conv.training)
        conv = plain
    return DOConv2d.from_conv2d(conv, D_mul=D_mul)


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
    except (AssertionError, TypeError, ValueError) as exc:
        message = explain_build_error(model_cfg, exc)
        if message is None:
            raise
        raise DOConvNotApplicableError(message) from exc
    if doconv_cfg is not None:
        try:
            convert_to_doconv(model, **doconv_cfg)
        except DOConvNotApplicableError:
            raise
        except (TypeError, ValueError) as exc:  # a pattern that matches nothing, a bad D_mul
            raise DOConvNotApplicableError(f'DOConvModel(model_type={model_type!r}): '
                                           f'{exc}') from exc
    return model


# Scopes whose MODELS registry gets DOConvModel at import (when the package is installed).
# mmpretrain is eager too: after torch / mmcv / mmengine (which do_conv_mm imports anyway)
# ``import mmpretrain.registry`` costs ~30-70 ms and imports neither its models nor torchvision,
# and eager registration is what lets mmpretrain's own entry points (init_model, get_model, the
# inferencers, its tools) build ``type='DOConvModel'`` from a config's ``custom_imports``.
DOWNSTREAM_SCOPES = ('mmdet', 'mmseg', 'mmpretrain')


def register_doconv_model(registry: Registry) -> None:
    """Make ``type='DOConvModel'`` buildable from ``registry`` (a downstream ``MODELS``, e.g.
    ``mmpretrain.registry.MODELS``) and from its scope. The :data:`DOWNSTREAM_SCOPES` (mmdet,
    mmseg, mmpretrain) are done at import.

    DOConvModel is deliberately not in mmengine's root ``MODELS``: mmcv's build_conv_layer looks
    conv layer types up there, and stock code (mmcv's own tests) treats every root name that
    contains "conv" as a conv layer it can build with ``(in_channels, out_channels, ...)``.
    """
    if registry.module_dict.get('DOConvModel') is not DOConvModel:
        registry.register_module(name='DOConvModel', module=DOConvModel)


def _register_downstream() -> None:
    """Register DOConvModel in every installed downstream scope. An installed package whose
    registry does not import (e.g. an mmpretrain built for another mmcv) is skipped with a
    warning, so ``import do_conv_mm`` still works for the other scopes; its configs then fail in
    the tools with their scope check's one-line error."""
    import importlib
    import importlib.util
    import warnings
    for scope in DOWNSTREAM_SCOPES:
        if importlib.util.find_spec(scope) is None:
            continue  # not installed: its configs cannot be used anyway
        try:
            registry = importlib.import_module(f'{scope}.registry').MODELS
        except Exception as error:  # noqa: BLE001  (any import failure of a third-party package)
            text = ' '.join(str(error).split())[:200]
            warnings.warn(f'do_conv_mm: {scope} is installed but {scope}.registry does not import '
                          f'({type(error).__name__}: {text}); DOConvModel is not registered '
                          f'for default_scope={scope!r}. Fix or uninstall {scope}.')
            continue
        register_doconv_model(registry)


_register_downstream()
