"""Fold DO-Conv training checkpoints into plain-conv deploy checkpoints (+ the deploy config).

Invariants of :func:`fold_checkpoint` / :func:`fold_checkpoints`:

* Folding uses the model built from CONFIG: the checkpoint must strict-load into it (missing,
  unexpected or mis-shaped keys are refused), then :func:`do_conv_mm.fold_doconv` replaces every
  DOConv2d by its plain Conv2d and the folded model's ``state_dict`` is written. Its keys are the
  training keys minus ``.D`` / ``.weight_extra``; it strict-loads into the deploy config.
* Reads full mmengine training checkpoints, slim ``{meta, state_dict}`` ones, bare state dicts and
  EMA checkpoints. mmengine's EMAHook saves the averaged weights as ``state_dict`` and the raw
  ones as ``ema_state_dict`` (it swaps them at save): ``state_dict`` is deployed, the EMA
  weights where there are any, as mmdet's / mmseg's test tools use them; ``ema_state_dict`` is
  folded too and kept; ``use_ema`` refuses a checkpoint without EMA.
  Optimizer, message hub and scheduler states are dropped. The output is
  ``{meta, state_dict[, ema_state_dict]}`` and loads with ``torch.load(weights_only=True)``
  without any allow-list (meta is reduced to plain Python types).
* Writes are atomic (temporary file in the destination directory, then ``os.replace``); on any
  error nothing is written and the inputs are never modified. Expected problems raise
  :class:`FoldError` with one line naming the problem and the fix.
"""
import os
import re
import tempfile
import time
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config

from .checkpoint import key_listing, key_mismatch, load_checkpoint_file
from .config_loading import first_line_or_type, load_config_file
from .deploy_config import doconv_references, make_deploy_config
from .deploy_verify import (DEFAULT_ATOL, DEFAULT_RTOL, OutputDiff, compare_outputs,
                            format_diffs, make_verify_batch, model_outputs)
from .doconv import DOConv2d
from .fold import _is_doconv_entry, fold_doconv
from .version import __version__

__all__ = ['FoldError', 'FoldVerificationError', 'FoldResult', 'fold_checkpoint',
           'fold_checkpoints', 'fold_checkpoint_dict', 'checkpoint_weights', 'build_model',
           'make_deploy_config', 'OutputDiff', 'DEFAULT_ATOL', 'DEFAULT_RTOL']

PathLike = Union[str, os.PathLike]
_EMA_KEY = 'ema_state_dict'


class FoldError(ValueError):
    """An expected, user-fixable problem; the message is one line naming it and the fix."""


class FoldVerificationError(FoldError):
    """``verify`` found outputs beyond tolerance; ``diffs`` holds every comparison."""

    def __init__(self, message: str, diffs: List[OutputDiff]):
        super().__init__(message)
        self.diffs = diffs


@dataclass
class FoldResult:
    """What one fold wrote and measured (seconds per stage: load, fold, save, verify)."""
    checkpoint: str
    out: str
    out_config: str
    num_folded: int
    deployed_weights: str  # 'state_dict', or 'state_dict (EMA weights)' for EMA checkpoints
    kept_ema: bool
    seconds: Dict[str, float] = field(default_factory=dict)
    verify: Optional[List[OutputDiff]] = None


# ------------------------------------------------------------------------------------------------
# Model from config
# ------------------------------------------------------------------------------------------------
def _load_config(config: Union[Config, PathLike], cfg_options: Optional[dict]) -> Config:
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
    from .config_check import DOConvNotApplicableError, check_doconv_cfg, explain_build_error
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


def _doconv_layers(model: nn.Module) -> List[str]:
    """Names of the DOConv2d layers that carry D (1x1 ones are plain convs already)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, DOConv2d) and m.D is not None]


# ------------------------------------------------------------------------------------------------
# Checkpoint parsing and matching
# ------------------------------------------------------------------------------------------------
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
    if 'state_dict' in ckpt or _EMA_KEY in ckpt:
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
    if _EMA_KEY in ckpt:
        raw = dict(ckpt[_EMA_KEY])
        steps = raw.pop('steps', None)
        if not _is_state_dict(raw) or not all(k.startswith('module.') for k in raw):
            raise FoldError(f'{name}: "ema_state_dict" is not an mmengine EMA state dict (keys '
                            f'"module.*" and "steps"); pass the checkpoint EMAHook saved.')
        ema = type(raw)((k[len('module.'):], v) for k, v in raw.items())
    if state_dict is not None:
        state_dict = _strip_prefix(state_dict, 'module.')
    return meta, state_dict, ema, steps


def _check_matches(model: nn.Module, layers: List[str], state_dict, meta, name: str,
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
    return _checked_checkpoint(model, ckpt, use_ema, name, config_name)[2]


def _checked_checkpoint(model, ckpt, use_ema, name, config_name):
    """(DO-Conv layer names, meta, the weights asked for, EMA weights or None, EMA steps or
    None), after the checks :func:`checkpoint_weights` states."""
    layers = _doconv_layers(model)
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
    _check_matches(model, layers, weights, meta, name, config_name, 'state_dict')
    return layers, meta, weights, ema, steps


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
    layers, meta, deployed_weights, ema, steps = _checked_checkpoint(model, ckpt, use_ema, name,
                                                                     config_name)
    deployed = 'state_dict (EMA weights)' if ema is not None else 'state_dict'
    other = ema  # EMAHook's raw weights: folded and kept in the same layout
    folded_other = None
    if other is not None:
        _check_matches(model, layers, other, meta, name, config_name, 'ema_state_dict')
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
        folded[_EMA_KEY] = ema_out
    info = dict(num_folded=len(layers), deployed_weights=deployed,
                kept_ema=folded_other is not None)
    return folded, info


# ------------------------------------------------------------------------------------------------
# Safe writing
# ------------------------------------------------------------------------------------------------
def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_writable_dir(path: str, what: str) -> None:
    """``path``'s directory is writable (created later if missing): probed, not assumed."""
    directory = os.path.dirname(os.path.abspath(path))
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise FoldError(f'{what} {path!r} cannot be written: {probe!r} is a file, not a '
                        f'directory; choose an OUT path inside a directory.')
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix='.fold_doconv_probe_')
        os.close(fd)
        os.unlink(tmp)
    except OSError as error:
        raise FoldError(f'{what} {path!r} cannot be written: directory {probe!r} is not writable '
                        f'({error.strerror}); choose a writable OUT directory.') from None
    if os.path.isdir(path):
        raise FoldError(f'{what} {path!r} is an existing directory; pass a file path.')


class StagedFiles:
    """Files written under temporary names next to their targets; ``commit`` renames them all."""

    def __init__(self):
        self._files: List[Tuple[str, str]] = []
        self._made_dirs: List[str] = []

    def _temp(self, target: str, suffix: str) -> str:
        directory = os.path.dirname(os.path.abspath(target))
        missing = []
        probe = directory
        while not os.path.exists(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        os.makedirs(directory, exist_ok=True)
        self._made_dirs += reversed(missing)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(target)}.',
                                   suffix=suffix)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        self._files.append((tmp, target))
        return tmp

    def torch_save(self, obj: Any, target: str) -> str:
        tmp = self._temp(target, '.tmp')
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def config(self, cfg: Config, target: str, header: str = '') -> str:
        """``cfg.dump`` staged for ``target``, ``header`` (comment lines) first."""
        tmp = self._temp(target, os.path.splitext(target)[1] or '.py')
        cfg.dump(tmp)
        if header:
            with open(tmp, encoding='utf-8') as f:
                text = f.read()
            with open(tmp, 'w', encoding='utf-8') as f:
                f.write(header + text)
        return tmp

    def commit(self) -> None:
        for tmp, target in self._files:
            os.replace(tmp, target)
        self._files = []
        self._made_dirs = []

    def discard(self) -> None:
        for tmp, _ in self._files:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for directory in reversed(self._made_dirs):
            try:
                os.rmdir(directory)
            except OSError:
                pass
        self._files = []
        self._made_dirs = []


def save_atomically(obj: Any, target: str) -> None:
    """``torch.save(obj, target)`` under a temporary name, renamed when complete: ``target``
    is either the old file or the whole new one, never half-written."""
    staged = StagedFiles()
    try:
        staged.torch_save(obj, target)
        staged.commit()
    finally:
        staged.discard()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _load_plain(path: str) -> Dict[str, Any]:
    """torch.load with weights_only and *no* user allow-list: proves the file is plain."""
    if not hasattr(torch.serialization, 'get_safe_globals'):  # torch < 2.4: no allow-list
        return torch.load(path, map_location='cpu', weights_only=True)
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    finally:
        torch.serialization.add_safe_globals(saved)


def _reload_config(path: str) -> Config:
    try:
        cfg = Config.fromfile(path)
    except Exception as error:  # a dump that does not load back is our bug, say so plainly
        raise RuntimeError(f'the dumped deploy config does not load back: {error}') from error
    left = doconv_references(cfg.to_dict())
    if left:
        raise RuntimeError(f'the deploy config still refers to DO-Conv at {left}')
    return cfg


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
class _Run:
    """Config-level state shared by every checkpoint of one call."""

    def __init__(self, config, cfg_options, out_config_path: str, log: Callable[[str], None]):
        self.log = log
        self.cfg = _load_config(config, cfg_options)
        self.config_name = (os.path.basename(self.cfg.filename) if self.cfg.filename
                            else 'CONFIG')
        self.deploy_cfg = make_deploy_config(self.cfg)
        self.out_config = out_config_path
        start = time.perf_counter()
        self.model = build_model(self.cfg)
        self.build_seconds = time.perf_counter() - start
        if not _doconv_layers(self.model):
            raise FoldError(f'{self.config_name} builds no DO-Conv layer (no k×k conv with '
                            f'conv_cfg=dict(type="DOConv") and no DOConvModel conversion), so '
                            f'there is nothing to fold; pass the DO-Conv training config of the '
                            f'checkpoint (mmengine keeps a copy in the training run\'s work dir, '
                            f'next to its checkpoints).')

    def fold_one(self, checkpoint: str, out: str, staged: StagedFiles, deploy_cfg_file: str,
                 use_ema: bool, verify: bool, verify_kwargs: dict) -> FoldResult:
        name = os.path.basename(checkpoint)
        seconds = {}
        start = time.perf_counter()
        try:
            ckpt = load_checkpoint_file(checkpoint)
        except ValueError as error:  # CheckpointError: one line with the fix already
            raise FoldError(str(error)) from None
        seconds['load'] = time.perf_counter() - start
        start = time.perf_counter()
        folded, info = fold_checkpoint_dict(self.model, ckpt, self.deploy_cfg, use_ema, name,
                                            self.config_name)
        del ckpt
        seconds['fold'] = time.perf_counter() - start
        start = time.perf_counter()
        tmp = staged.torch_save(folded, out)
        del folded
        written = _load_plain(tmp)
        seconds['save'] = time.perf_counter() - start
        result = FoldResult(checkpoint, out, self.out_config, info['num_folded'],
                            info['deployed_weights'], info['kept_ema'], seconds)
        if verify:
            start = time.perf_counter()
            result.verify = self._verify(written['state_dict'], deploy_cfg_file, **verify_kwargs)
            seconds['verify'] = time.perf_counter() - start
        return result

    def _verify(self, state_dict, deploy_cfg_file: str, image, size, atol, rtol):
        from mmengine.registry import DefaultScope
        deploy_cfg = _reload_config(deploy_cfg_file)
        deployed = build_model(deploy_cfg)
        try:
            deployed.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:  # a fold/deploy-config bug, not bad input: still one line
            raise FoldError(f'verify: the folded weights do not load into the deploy model '
                            f'({" ".join(str(error).split())[:300]}); nothing was '
                            f'written. This is a do_conv_mm bug, please report it with the '
                            f'config.') from None
        if _doconv_layers(deployed):
            raise FoldError('verify: the deploy model still has DO-Conv layers; nothing was '
                            'written. This is a do_conv_mm bug, please report it with the '
                            'config.')
        with DefaultScope.overwrite_default_scope(self.cfg.get('default_scope')):
            try:
                batch = make_verify_batch(self.model, self.cfg, image, size)
            except (OSError, ValueError, TypeError, KeyError) as error:
                raise FoldError(f'--image {image!r} could not be read through the test pipeline '
                                f'({type(error).__name__}: {first_line_or_type(error)}); pass a '
                                f'readable image file or verify with random input.') from error
            reference, proposals = model_outputs(self.model, batch)
            outputs, _ = model_outputs(deployed, batch, proposals)
        diffs = compare_outputs(reference, outputs, atol, rtol)
        if not diffs:
            raise RuntimeError('verify: the model returned no output tensor to compare')
        self.log(format_diffs(diffs, atol, rtol))
        return diffs


def _default_out_config(config, out_dir: str) -> str:
    stem = 'deploy_config'
    if isinstance(config, Config):
        if config.filename:
            stem = os.path.splitext(os.path.basename(config.filename))[0] + '_deploy'
    else:
        stem = os.path.splitext(os.path.basename(os.fspath(config)))[0] + '_deploy'
    return os.path.join(out_dir, stem + '.py')


# First line of the deploy configs the fold writes (.py / .yaml: a comment; JSON has none).
DEPLOY_CONFIG_MARK = '# do_conv_mm deploy config'


def _deploy_config_header(out_config: str) -> str:
    if not out_config.endswith(('.py', '.yaml', '.yml')):
        return ''
    return (f'{DEPLOY_CONFIG_MARK}: the training config with DO-Conv folded away, written by '
            f'tools/fold_doconv.py (do_conv_mm {__version__}); use it with the folded '
            f'checkpoint.\n')


def _checkpoint_meta_has(path: str, key: str) -> bool:
    """Whether ``path`` is a checkpoint whose ``meta[key]`` is set (a tool's own output)."""
    try:
        meta = load_checkpoint_file(path).get('meta')
    except Exception:  # not a checkpoint at all: foreign
        return False
    return isinstance(meta, dict) and bool(meta.get(key))


def _is_folded_checkpoint(path: str) -> bool:
    return _checkpoint_meta_has(path, 'doconv_folded')


def check_checkpoint_output(out: str, inputs: Sequence[Optional[str]], meta_key: str,
                            overwrite: bool = False) -> None:
    """Before a tool writes the checkpoint ``out``: it is none of ``inputs``, its directory is
    writable, and an existing file there is replaced only if it is this tool's own output (its
    ``meta[meta_key]`` set: a rerun) or with ``overwrite`` (--force)."""
    for source in inputs:
        if source and _same_file(out, source):
            raise FoldError(f'OUT {out!r} is the same file as the input {source!r}; write to a '
                            f'new path (inputs are never modified).')
    check_writable_dir(out, 'OUT')
    if not overwrite:
        _check_replaceable(out, 'OUT', lambda path: _checkpoint_meta_has(path, meta_key),
                           'a checkpoint')


def _is_written_deploy_config(path: str) -> bool:
    try:
        with open(path, encoding='utf-8') as f:
            return f.readline().startswith(DEPLOY_CONFIG_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def _check_replaceable(path: str, what: str, ours: Callable[[str], bool], kind: str) -> None:
    """An existing file at an output path is replaced only if this tool wrote it (a rerun)."""
    if os.path.isfile(path) and not ours(path):
        raise FoldError(f'{what} {path!r} exists and is not {kind} this tool wrote; nothing was '
                        f'written. Pass another path, or --force (overwrite=True) to replace '
                        f'it.')


def _preflight(config, checkpoints: List[str], outs: List[str], out_config: str,
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
            if _same_file(out, source):
                raise FoldError(f'OUT {out!r} is the same file as the input {source!r}; write the '
                                f'folded checkpoint to a new path (inputs are never modified).')
        if os.path.realpath(out) in seen:
            raise FoldError(f'{checkpoint!r} and {seen[os.path.realpath(out)]!r} would both be '
                            f'written to {out!r}; fold them into different OUT directories.')
        seen[os.path.realpath(out)] = checkpoint
        check_writable_dir(out, 'OUT')
        if not overwrite:
            _check_replaceable(out, 'OUT', _is_folded_checkpoint, 'a folded checkpoint')
    if not out_config.endswith(('.py', '.json', '.yaml', '.yml')):
        raise FoldError(f'--out-config {out_config!r} must end with .py (or .json/.yaml); '
                        f'pass e.g. {os.path.splitext(out_config)[0]}.py.')
    for source in inputs + outs:
        if _same_file(out_config, source):
            raise FoldError(f'--out-config {out_config!r} is the same file as {source!r}; pass '
                            f'another path for the deploy config.')
    check_writable_dir(out_config, '--out-config')
    if not overwrite:
        _check_replaceable(out_config, '--out-config', _is_written_deploy_config,
                           'a deploy config')


def fold_checkpoints(config: Union[Config, PathLike],
                     checkpoints: Sequence[PathLike],
                     out_dir: PathLike,
                     *,
                     outs: Optional[Sequence[PathLike]] = None,
                     out_config: Optional[PathLike] = None,
                     use_ema: bool = False,
                     verify: bool = False,
                     image: Optional[PathLike] = None,
                     verify_size: Sequence[int] = (128, 128),
                     atol: float = DEFAULT_ATOL,
                     rtol: float = DEFAULT_RTOL,
                     cfg_options: Optional[dict] = None,
                     progress: bool = False,
                     overwrite: bool = False,
                     log: Callable[[str], None] = print) -> List[FoldResult]:
    """Fold several checkpoints of one config; each goes to ``out_dir/<its file name>``.

    ``outs`` overrides the output paths (one per checkpoint). The deploy config goes to
    ``out_config`` (default ``out_dir/<config stem>_deploy.py``) and is written once, after the
    checkpoints. Each checkpoint is written atomically; with ``verify`` a checkpoint whose outputs
    differ beyond ``atol + rtol * max|ref|`` is not written. A failing checkpoint does not stop
    the others; the call then raises :class:`FoldError` listing the failures (with the deploy
    config written if any checkpoint succeeded). ``progress`` shows a rich progress bar. An
    existing file at an output path is replaced only if the fold wrote it (a folded checkpoint,
    a deploy config with its first-line mark: a rerun), or with ``overwrite``.
    """
    checkpoints = [os.fspath(c) for c in checkpoints]
    if not checkpoints:
        raise FoldError('no CHECKPOINT given; pass at least one .pth file.')
    out_dir = os.fspath(out_dir)
    outs = ([os.fspath(o) for o in outs] if outs is not None else
            [os.path.join(out_dir, os.path.basename(c)) for c in checkpoints])
    out_config = os.fspath(out_config) if out_config else _default_out_config(config, out_dir)
    _preflight(config, checkpoints, outs, out_config, overwrite)
    verify_kwargs = dict(image=None if image is None else os.fspath(image), size=verify_size,
                         atol=atol, rtol=rtol)
    if image is not None and not os.path.isfile(os.fspath(image)):
        raise FoldError(f'--image {os.fspath(image)!r} does not exist or is not a file; pass an '
                        f'image file, or leave --image out to verify with random input.')

    run = _Run(config, cfg_options, out_config, log)
    config_stage = StagedFiles()
    results: List[FoldResult] = []
    failures: List[str] = []
    try:
        deploy_cfg_file = config_stage.config(run.deploy_cfg, out_config,
                                              _deploy_config_header(out_config))
        _reload_config(deploy_cfg_file)
        with _progress(progress, len(checkpoints)) as advance:
            for checkpoint, out in zip(checkpoints, outs):
                staged = StagedFiles()
                try:
                    result = run.fold_one(checkpoint, out, staged, deploy_cfg_file, use_ema,
                                          verify, verify_kwargs)
                    if result.verify is not None and not all(d.ok for d in result.verify):
                        bad = [d for d in result.verify if not d.ok]
                        raise FoldVerificationError(
                            f'{os.path.basename(checkpoint)}: verify failed, {len(bad)} output(s) '
                            f'beyond tolerance (worst {bad[0].name}: max abs '
                            f'{max(d.max_abs for d in bad):.3e}); nothing was written. Check '
                            f'that CONFIG is the training config, or loosen --rtol/--atol.',
                            result.verify)
                    staged.commit()
                    results.append(result)
                    log(_summary(result))
                except FoldError as error:
                    staged.discard()
                    if len(checkpoints) == 1:
                        raise
                    failures.append(str(error))
                    log(f'failed: {error}')
                except BaseException:
                    staged.discard()
                    raise
                finally:
                    advance()
        if results:
            config_stage.commit()
            log(f'deploy config: {out_config}')
    finally:
        config_stage.discard()
    if failures:
        raise FoldError(f'{len(failures)} of {len(checkpoints)} checkpoints failed (the others '
                        f'were written): ' + ' | '.join(failures))
    return results


def fold_checkpoint(config: Union[Config, PathLike],
                    checkpoint: PathLike,
                    out: PathLike,
                    *,
                    out_config: Optional[PathLike] = None,
                    **kwargs) -> FoldResult:
    """Fold one DO-Conv checkpoint into ``out`` and write the deploy config.

    ``out_config`` defaults to ``<dir of out>/<config stem>_deploy.py``. Keyword arguments are
    those of :func:`fold_checkpoints` (``use_ema``, ``verify``, ``image``, ``verify_size``,
    ``atol``, ``rtol``, ``cfg_options``, ``log``). Raises :class:`FoldError` (nothing written).
    """
    out = os.fspath(out)
    out_dir = os.path.dirname(os.path.abspath(out))
    return fold_checkpoints(config, [checkpoint], out_dir, outs=[out], out_config=out_config,
                            **kwargs)[0]


def _summary(result: FoldResult) -> str:
    s = result.seconds
    timing = ', '.join(f'{k} {v:.2f}s' for k, v in s.items())
    ema = ' (+ folded ema_state_dict: the raw weights)' if result.kept_ema else ''
    src = ', EMA weights' if result.kept_ema else ''
    return (f'folded {result.num_folded} DOConv layers{src}: {result.checkpoint} -> '
            f'{result.out}{ema} [{timing}]')


class _progress:
    """Context manager yielding ``advance()``; a rich bar when enabled, else a no-op."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self._bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)
        self._bar = Progress(TextColumn('folding'), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn())
        self._bar.start()
        task = self._bar.add_task('fold', total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
        return False
