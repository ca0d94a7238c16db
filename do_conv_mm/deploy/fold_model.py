"""The model a fold works with: CONFIG loaded (one-line errors) and built on the CPU.

:func:`build_model` refuses a config whose DO-Conv ``conv_cfg`` cannot apply and explains a
failing build in one line (:class:`.FoldError`); :func:`doconv_layers` names the layers that
carry a ``D`` (the ones a fold replaces).
"""
import os
from copy import deepcopy
from typing import List, Optional, Union

import torch.nn as nn
from mmengine.config import Config

from ..config_loading import first_line_or_type, load_config_file
from ..doconv import DOConv2d
from .fold_errors import FoldError

__all__ = ['PathLike', 'load_model_config', 'build_model', 'doconv_layers']

PathLike = Union[str, os.PathLike]


def load_model_config(config: Union[Config, PathLike], cfg_options: Optional[dict]) -> Config:
    """CONFIG (a Config, copied, or a path) with ``cfg_options`` merged; FoldError where it is
    missing, does not load or has no ``model``."""
    if isinstance(config, Config):
        cfg = deepcopy(config)
    else:
        path = os.fspath(config)
        if not os.path.isfile(path):
            what = 'is a directory' if os.path.isdir(path) else 'does not exist'
            raise FoldError(f'CONFIG {path!r} {what}; pass the DO-Conv training config (.py) the '
                            f'checkpoint was trained with.')
        cfg = load_config_file(path, FoldError, 'CONFIG')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if 'model' not in cfg:
        raise FoldError(f'CONFIG {cfg.filename!r} has no "model"; pass a model training config.')
    return cfg


def build_model(cfg: Config) -> nn.Module:
    """Build ``cfg.model`` on the CPU in the config's default scope, SyncBN reverted to BN."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, DefaultScope
    from ..config_check import DOConvNotApplicableError, check_doconv_cfg, explain_build_error
    scope = cfg.get('default_scope')
    try:
        check_doconv_cfg(cfg.model, scope=scope)
    except DOConvNotApplicableError as error:
        raise FoldError(f'CONFIG {cfg.filename or "<Config>"}: {error}') from None
    try:
        with DefaultScope.overwrite_default_scope(scope):
            model = MODELS.build(deepcopy(cfg.model))  # some builders edit their cfg
    except Exception as error:
        message = explain_build_error(cfg.model, error, scope)
        if message is not None:
            raise FoldError(f'CONFIG {cfg.filename or "<Config>"}: {message}') from None
        raise FoldError(f'CONFIG {cfg.filename or "<Config>"} could not build its model '
                        f'({type(error).__name__}: {first_line_or_type(error)}); check that the '
                        f'config builds with tools/train.py and that its package (mmdet / mmseg / '
                        f'mmpretrain) is installed.') from error
    model = revert_sync_batchnorm(model)
    model.eval()
    return model


def doconv_layers(model: nn.Module) -> List[str]:
    """Names of the DOConv2d layers that carry D (1x1 ones are plain convs already)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, DOConv2d) and m.D is not None]
