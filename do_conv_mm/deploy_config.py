"""The deploy config of a DO-Conv training config: the same model with DO-Conv removed.

A folded checkpoint holds plain ``nn.Conv2d`` kernels under the training keys, so it strict-loads
into the training config with every DO-Conv opt-in undone:

* ``dict(type='DOConvModel', model_type=T, doconv=..., **kw)``  ->  ``dict(type=T, **kw)``
* ``conv_cfg=dict(type='DOConv' | 'DOConv2d', ...)``            ->  ``conv_cfg=None`` (plain conv)
* ``conv_cfg=dict(type='DOConvAdaptivePadding', ...)``  ->  ``dict(type='Conv2dAdaptivePadding')``
* any other ``*_cfg=dict(type='DOConv', ...)`` (e.g. a predictor)  ->  ``dict(type='Conv2d', ...)``
  (``'Conv2dAdaptivePadding'`` for ``'DOConvAdaptivePadding'``)
* ``'do_conv_mm'`` leaves ``custom_imports`` (dropped when nothing else is imported).
* ``init_cfg=dict(type='Pretrained', ...)`` entries of the model go (``None``; dropped from an
  init_cfg list): the deploy model's weights come from the folded checkpoint, and a DO-Conv
  backbone checkpoint would not load into its plain convs anyway (D would be dropped).
* the training run's own state, which a work dir's config dump carries, is reset:
  ``resume=False`` and ``load_from=None`` (the deploy config loads the folded checkpoint it is
  given), and ``work_dir`` goes (the tools then default to ``./work_dirs/<deploy config
  name>``, not the training run's directory).

The whole config is walked (nested dicts, lists and tuples), so top-level variables such as
``conv_cfg = dict(type='DOConv')`` are cleaned too.
"""
import copy
import os
from typing import Any, List, Union

from mmengine.config import Config

from .config_check import walk_cfg
from .doconv import is_doconv_layer_type, plain_layer_type

__all__ = ['drop_pretrained_inits', 'make_deploy_config', 'doconv_references']

_MODEL_TYPE = 'DOConvModel'
_PACKAGE = 'do_conv_mm'
_LAYER_ONLY_KEYS = ('D_mul', )  # DOConv2d-only constructor arguments
_RUN_STATE = dict(resume=False, load_from=None)  # as mmengine's defaults; work_dir goes


def _short_type(value: Any) -> Any:
    """'mmdet.DOConv' -> 'DOConv'; a class -> its name; anything else unchanged."""
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, str):
        return value.rpartition('.')[2]
    return value


def _is_model_type(value: Any) -> bool:
    return _short_type(value) == _MODEL_TYPE


def _undo(node: Any, key: str = '') -> Any:
    """A copy of ``node`` with every DO-Conv opt-in replaced by its plain equivalent."""
    if isinstance(node, dict):
        node_type = node.get('type')
        if is_doconv_layer_type(node_type):
            plain_type = plain_layer_type(node_type)
            rest = {k: _undo(v, k) for k, v in node.items()
                    if k != 'type' and k not in _LAYER_ONLY_KEYS}
            if key == 'conv_cfg' and plain_type == 'Conv2d':
                return None
            return dict(type=plain_type, **rest)
        if _is_model_type(node_type):
            if 'model_type' not in node:
                raise ValueError(f"make_deploy_config: a 'DOConvModel' entry ({key or 'model'}) "
                                 f"has no 'model_type'; set model_type to the model it wraps, "
                                 f"e.g. model_type='FasterRCNN'.")
            rest = {k: _undo(v, k) for k, v in node.items()
                    if k not in ('type', 'model_type', 'doconv')}
            return dict(type=node['model_type'], **rest)
        return {k: _undo(v, k) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_undo(v, key) for v in node)
    return copy.deepcopy(node)


def _without_package(custom_imports: Any) -> Any:
    """custom_imports minus do_conv_mm (and its submodules); None when nothing is left."""
    if not isinstance(custom_imports, dict):
        return custom_imports
    imports = custom_imports.get('imports', [])
    if isinstance(imports, str):
        imports = [imports]
    kept = [m for m in imports if m != _PACKAGE and not str(m).startswith(_PACKAGE + '.')]
    if not kept:
        return None
    return dict(custom_imports, imports=kept)


def _loads_weights(init_cfg: Any) -> bool:
    """``dict(type='Pretrained', ...)``, or a bare ``dict(checkpoint=...)`` that some backbones
    (mmdet's PVT) load in their own init_weights."""
    return isinstance(init_cfg, dict) and (init_cfg.get('type') == 'Pretrained'
                                           or 'checkpoint' in init_cfg)


def drop_pretrained_inits(model_cfg: dict) -> None:
    """Every init_cfg of ``model_cfg`` (nested) that loads weights becomes None (is dropped
    from an init_cfg list), in place."""
    for _, node in walk_cfg(model_cfg, 'model'):
        init_cfg = node.get('init_cfg')
        if _loads_weights(init_cfg):
            node['init_cfg'] = None
        elif isinstance(init_cfg, (list, tuple)) and any(map(_loads_weights, init_cfg)):
            node['init_cfg'] = [c for c in init_cfg if not _loads_weights(c)] or None


def doconv_references(node: Any, path: str = 'cfg') -> List[str]:
    """Config paths that still opt into DO-Conv (empty for a deploy config)."""
    found = []
    for where, entry in walk_cfg(node, path):
        if is_doconv_layer_type(entry.get('type')) or _is_model_type(entry.get('type')):
            found.append(where)
        if where.rpartition('.')[2] == 'custom_imports':
            imports = entry.get('imports', [])
            imports = [imports] if isinstance(imports, str) else imports
            if any(m == _PACKAGE or str(m).startswith(_PACKAGE + '.') for m in imports):
                found.append(where + '.imports')
    return found


def make_deploy_config(cfg: Union[Config, str, os.PathLike]) -> Config:
    """The deploy config of a DO-Conv training config (a new Config; ``cfg`` is not modified).

    ``cfg`` is a Config or a config path (``_base_`` already resolved by ``Config.fromfile``, so
    the result is self-contained and ``Config.dump`` writes a file that loads on its own).
    """
    if not isinstance(cfg, Config):
        cfg = Config.fromfile(os.fspath(cfg))
    plain = _undo(cfg.to_dict())
    for key, value in _RUN_STATE.items():
        if key in plain:
            plain[key] = value
    plain.pop('work_dir', None)
    if isinstance(plain.get('model'), dict):
        drop_pretrained_inits(plain['model'])
    if 'custom_imports' in plain:
        custom_imports = _without_package(plain['custom_imports'])
        if custom_imports is None:
            del plain['custom_imports']
        else:
            plain['custom_imports'] = custom_imports
    return Config(plain)
