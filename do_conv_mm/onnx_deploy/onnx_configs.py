"""The export tool's configs: the shipped mmdeploy ONNX Runtime configs (found in the checkout,
else in the wheel's .mim copy), a model config's task, and a deploy config checked to target
ONNX Runtime for that task (one-line :class:`.DeployError` otherwise).
"""
import os
from typing import Optional, Sequence

from mmengine.config import Config

from ..config_loading import load_config_file
from .onnx_errors import DeployError

__all__ = ['DEPLOY_CONFIG_DIR', 'default_deploy_config', 'task_of', 'load_cfg_file',
           'load_deploy_cfg', 'is_dynamic']


def _find_deploy_config_dir() -> str:
    """The checkout's configs/deploy (an editable install), else the copy a wheel carries."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # do_conv_mm/
    checkout = os.path.join(os.path.dirname(package), 'configs', 'deploy')
    for candidate in (checkout, os.path.join(package, '.mim', 'configs', 'deploy')):
        if os.path.isdir(candidate):
            return candidate
    return checkout


DEPLOY_CONFIG_DIR = _find_deploy_config_dir()


def default_deploy_config(task: str, dynamic: bool = False) -> str:
    """The shipped mmdeploy config for ``task`` ('det' / 'seg') on ONNX Runtime."""
    name = {'det': 'detection', 'seg': 'segmentation'}[task]
    return os.path.join(DEPLOY_CONFIG_DIR,
                        f'{name}_onnxruntime_{"dynamic" if dynamic else "static"}.py')


def task_of(cfg: Config) -> str:
    """'det' (default_scope mmdet) or 'seg' (mmseg); DeployError for any other scope."""
    scope = cfg.get('default_scope')
    if scope == 'mmdet':
        return 'det'
    if scope == 'mmseg':
        return 'seg'
    raise DeployError(f'CONFIG\'s default_scope is {scope!r}; deploy_onnx exports mmdet and mmseg '
                      f'models (default_scope "mmdet" or "mmseg").')


def load_cfg_file(path: str, what: str) -> Config:
    """The config file ``path`` (``what`` names it in the one-line DeployError)."""
    if not os.path.isfile(path):
        state = 'is a directory' if os.path.isdir(path) else 'does not exist'
        raise DeployError(f'{what} {path!r} {state}; pass a config file (.py).')
    return load_config_file(path, DeployError, what)


def load_deploy_cfg(path: str, task: str, shape: Optional[Sequence[int]]) -> Config:
    """The mmdeploy config ``path``, checked: ONNX Runtime, ONNX, ``task``'s codebase; a static
    one takes ``shape`` (H, W) as its input shape."""
    cfg = load_cfg_file(path, '--deploy-cfg')
    backend = cfg.get('backend_config', {}).get('type')
    if backend != 'onnxruntime':
        raise DeployError(f'--deploy-cfg {path!r} targets backend {backend!r}; this tool exports '
                          f'for and runs ONNX Runtime: pass a config with '
                          f'backend_config=dict(type="onnxruntime") (configs/deploy/).')
    if cfg.get('onnx_config', {}).get('type') != 'onnx':
        raise DeployError(f'--deploy-cfg {path!r} has no onnx_config of type "onnx"; pass one of '
                          f'configs/deploy/*_onnxruntime_*.py.')
    codebase = cfg.get('codebase_config', {}).get('type')
    expected = {'det': 'mmdet', 'seg': 'mmseg'}[task]
    if codebase != expected:
        raise DeployError(f'--deploy-cfg {path!r} is for {codebase!r} but CONFIG is an '
                          f'{expected} config; pass {os.path.relpath(default_deploy_config(task))} '
                          f'or its _dynamic twin.')
    if shape is not None and not is_dynamic(cfg):
        cfg.onnx_config['input_shape'] = [int(shape[1]), int(shape[0])]  # mmdeploy: (W, H)
    return cfg


def is_dynamic(deploy_cfg: Config) -> bool:
    """Whether the mmdeploy config exports with dynamic input shapes."""
    from mmdeploy.utils import is_dynamic_shape
    return bool(is_dynamic_shape(deploy_cfg))
