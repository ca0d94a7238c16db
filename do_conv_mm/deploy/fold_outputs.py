"""The fold's output files: default paths, the deploy config's first-line mark, the checks
made before anything is written (:func:`preflight`) and of what was staged (:func:`load_plain`,
:func:`reload_config`).
"""
import os
from typing import Any, Dict, List

import torch
from mmengine.config import Config

from ..checkpoint import load_checkpoint_file
from ..deploy_config import doconv_references
from .fold_errors import FoldError
from .output_checks import check_replaceable, check_writable_dir, checkpoint_meta_has, same_file
from ..version import __version__

__all__ = ['DEPLOY_CONFIG_MARK', 'default_out_config', 'deploy_config_header', 'preflight',
           'load_plain', 'reload_config']


def default_out_config(config, out_dir: str) -> str:
    """``out_dir/<config stem>_deploy.py`` (``deploy_config.py`` for a Config without file)."""
    stem = 'deploy_config'
    if isinstance(config, Config):
        if config.filename:
            stem = os.path.splitext(os.path.basename(config.filename))[0] + '_deploy'
    else:
        stem = os.path.splitext(os.path.basename(os.fspath(config)))[0] + '_deploy'
    return os.path.join(out_dir, stem + '.py')


# First line of the deploy configs the fold writes (.py / .yaml: a comment; JSON has none).
DEPLOY_CONFIG_MARK = '# do_conv_mm deploy config'


def deploy_config_header(out_config: str) -> str:
    """The comment line that marks a deploy config as the fold's own ('' for JSON)."""
    if not out_config.endswith(('.py', '.yaml', '.yml')):
        return ''
    return (f'{DEPLOY_CONFIG_MARK}: the training config with DO-Conv folded away, written by '
            f'tools/fold_doconv.py (do_conv_mm {__version__}); use it with the folded '
            f'checkpoint.\n')


def _is_folded_checkpoint(path: str) -> bool:
    return checkpoint_meta_has(path, 'doconv_folded')


def _is_written_deploy_config(path: str) -> bool:
    try:
        with open(path, encoding='utf-8') as f:
            return f.readline().startswith(DEPLOY_CONFIG_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def preflight(config, checkpoints: List[str], outs: List[str], out_config: str,
              overwrite: bool = False) -> None:
    """Path checks that need no model: every problem is found before anything is written."""
    for checkpoint in checkpoints:
        if not os.path.isfile(checkpoint):
            try:
                load_checkpoint_file(checkpoint)  # raises its precise missing/directory message
            except ValueError as error:
                raise FoldError(str(error)) from None
    config_path = None if isinstance(config, Config) else os.fspath(config)
    inputs = checkpoints + ([config_path] if config_path else [])
    seen = {}
    for out, checkpoint in zip(outs, checkpoints):
        for source in inputs:
            if same_file(out, source):
                raise FoldError(f'OUT {out!r} is the same file as the input {source!r}; write the '
                                f'folded checkpoint to a new path (inputs are never modified).')
        if os.path.realpath(out) in seen:
            raise FoldError(f'{checkpoint!r} and {seen[os.path.realpath(out)]!r} would both be '
                            f'written to {out!r}; fold them into different OUT directories.')
        seen[os.path.realpath(out)] = checkpoint
        check_writable_dir(out, 'OUT')
        if not overwrite:
            check_replaceable(out, 'OUT', _is_folded_checkpoint, 'a folded checkpoint')
    if not out_config.endswith(('.py', '.json', '.yaml', '.yml')):
        raise FoldError(f'--out-config {out_config!r} must end with .py (or .json/.yaml); '
                        f'pass e.g. {os.path.splitext(out_config)[0]}.py.')
    for source in inputs + outs:
        if same_file(out_config, source):
            raise FoldError(f'--out-config {out_config!r} is the same file as {source!r}; pass '
                            f'another path for the deploy config.')
    check_writable_dir(out_config, '--out-config')
    if not overwrite:
        check_replaceable(out_config, '--out-config', _is_written_deploy_config,
                          'a deploy config')


def load_plain(path: str) -> Dict[str, Any]:
    """torch.load with weights_only and *no* user allow-list: proves the file is plain."""
    if not hasattr(torch.serialization, 'get_safe_globals'):  # torch < 2.4: no allow-list
        return torch.load(path, map_location='cpu', weights_only=True)
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    finally:
        torch.serialization.add_safe_globals(saved)


def reload_config(path: str) -> Config:
    """The written deploy config loaded back; RuntimeError (a bug) if it fails or names DO-Conv."""
    try:
        cfg = Config.fromfile(path)
    except Exception as error:  # a dump that does not load back is our bug, say so plainly
        raise RuntimeError(f'the dumped deploy config does not load back: {error}') from error
    left = doconv_references(cfg.to_dict())
    if left:
        raise RuntimeError(f'the deploy config still refers to DO-Conv at {left}')
    return cfg
