"""Config loading and Runner construction shared by ``tools/train.py`` and ``tools/test.py``.

It follows mmdet's / mmseg's own tools (Config.fromfile, --cfg-options, work_dir priority
CLI > config > ``./work_dirs/<config name>``, ``runner_type`` through the scope's RUNNERS), and adds
what those tools leave to a stack trace: a clear error for a missing config or an uninstalled
scope, and distributed training on CPU-only machines (see :func:`prepare_cpu_distributed`).
"""
import argparse
import copy
import importlib
import logging
import os
import os.path as osp
import re
import time
from typing import Optional

import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log

from . import config_loading
from .checkpoint import CheckpointError, load_checkpoint_file
from .doconv import DOConv2d

__all__ = ['CfgOptionsAction', 'ToolError', 'build_runner', 'check_checkpoint',
           'check_checkpoint_fits', 'check_resumable', 'load_config', 'load_config_file',
           'merge_cfg_options', 'positive_int', 'prepare_cpu_distributed', 'prepare_toy_data',
           'revert_sync_bn_cfg', 'set_work_dir']



class ToolError(Exception):
    """A bad command line or config; the message names the problem and the fix."""


def load_config(path: str, cfg_options: Optional[dict] = None,
                launcher: str = 'none') -> Config:
    """``Config.fromfile`` + ``--cfg-options`` + launcher, as the upstream tools do."""
    if not osp.isfile(path):
        where = '' if osp.isabs(path) else f' (looked in {os.getcwd()})'
        raise ToolError(f'config {path!r} does not exist{where}; pass a config file such as '
                        f'configs/toy/retinanet_r18-tiny-doconv_fpn_toy.py of the do_conv_mm '
                        f'checkout.')
    cfg = load_config_file(path, ToolError)
    cfg.launcher = launcher
    earlier = merge_cfg_options(cfg, path, cfg_options)
    _check_scope(cfg)
    _check_doconv(cfg, earlier)
    if launcher != 'none':
        prepare_cpu_distributed(cfg)
    return cfg


def load_config_file(path: str, error_type=None) -> Config:
    """``Config.fromfile``; a file that does not load (syntax, a bad ``_base_``, a child dict over
    a base None such as conv_cfg, a failing custom import, a ``pkg::`` base whose package is not
    installed) raises ``error_type`` (ToolError by default) with the loader's first line and the
    fix instead of a traceback through mmengine."""
    return config_loading.load_config_file(path, error_type or ToolError)


def merge_cfg_options(cfg: Config, path: str, cfg_options: Optional[dict]) -> list:
    """Merge ``--cfg-options`` into ``cfg``; returns ``[(label, the file's model before them)]``
    for :func:`~do_conv_mm.config_check.check_base_conv_types` (a conv type they replace)."""
    if not cfg_options:
        return []
    earlier = ([(f'{path} (before --cfg-options)', copy.deepcopy(cfg.model))]
               if 'model' in cfg else [])
    cfg.merge_from_dict(cfg_options)
    return earlier


def _check_doconv(cfg: Config, earlier=()) -> None:
    """DO-Conv asked for where it cannot apply (e.g. DCN blocks): one clear line, no trace; a
    conv type of a base config (or ``earlier`` model configs) that DO-Conv replaces: warned."""
    from .config_check import DOConvNotApplicableError, check_base_conv_types, check_doconv_cfg
    if 'model' not in cfg:
        return
    try:
        check_doconv_cfg(cfg.model, scope=cfg.get('default_scope'))
        check_base_conv_types(cfg, earlier)
    except DOConvNotApplicableError as error:
        raise ToolError(str(error)) from None


def _check_scope(cfg: Config) -> None:
    scope = cfg.get('default_scope')
    if scope is None:
        return
    try:
        importlib.import_module(f'{scope}.registry')
    except ImportError as error:
        package = config_loading.PACKAGE_PINS.get(scope, scope)
        raise ToolError(f'the config\'s default_scope is {scope!r} but {scope} cannot be imported '
                        f'({error}); install it (pip install {package}, or bash '
                        f'tools/install.sh).') from None
    try:  # its models import mmcv's compiled ops, which mmcv-lite does not have
        importlib.import_module(f'{scope}.models')
    except ImportError as error:
        if not _is_mmcv_ops_error(error):
            return  # a scope without a models package, or another failure the build reports
        import mmcv
        raise ToolError(f'{scope}\'s models need mmcv\'s compiled ops, and those of mmcv '
                        f'{getattr(mmcv, "__version__", "?")} do not load '
                        f'({config_loading.first_line(error)}): it is '
                        f'mmcv-lite, was built without ops, or for another torch. pip uninstall '
                        f'mmcv-lite mmcv, then bash tools/install.sh (it builds mmcv 2.1.0 with '
                        f'its ops against this torch).') from None


def _is_mmcv_ops_error(error: ImportError) -> bool:
    """mmcv's ``_ext`` is missing (mmcv-lite: name 'mmcv._ext') or its library does not load
    (built for another torch: CPython names it '_ext', with mmcv's path)."""
    name = getattr(error, 'name', None) or ''
    path = str(getattr(error, 'path', None) or '')
    return name.startswith('mmcv._ext') or (name == '_ext' and 'mmcv' in path)


def check_checkpoint(path: str, cfg: Optional[Config] = None, *,
                     resume: bool = False) -> Optional[str]:
    """Fail early, in one line, on a missing, damaged or unsafe local checkpoint.

    With ``cfg`` (the config it will be loaded into) a train/deploy mix-up is refused too (an
    unfolded DO-Conv checkpoint with a config that has no DO-Conv layer, see
    :mod:`do_conv_mm.checkpoint_guard`), and a one-line description of the checkpoint (folded
    by the fold tool / unfolded DO-Conv / plain) is returned for the tool to report. With
    ``resume``, a file without training state is refused as :func:`check_resumable` does.
    """
    if '://' in path:  # http(s)://, s3://, open-mmlab:// ... are mmengine's to fetch
        return None
    checkpoint = load_checkpoint_file(path)
    if not any(k in checkpoint for k in ('state_dict', 'model', 'module')) and not all(
            hasattr(v, 'shape') for v in checkpoint.values()):
        raise CheckpointError(f'Checkpoint {path!r} holds neither a state_dict nor tensors '
                              f'(keys: {", ".join(list(checkpoint)[:5])}); pass a model '
                              f'checkpoint.')
    kind = None
    if cfg is not None:
        from .checkpoint_guard import check_checkpoint_config
        kind = check_checkpoint_config(checkpoint, cfg, path)
    if resume:
        _check_training_state(checkpoint, path)
    return kind


class CfgOptionsAction(DictAction):
    """mmengine's ``--cfg-options`` action, with an argparse error for an item without ``=``
    (mmengine's raises ValueError: a 27-line traceback)."""

    def __call__(self, parser, namespace, values, option_string=None):
        for item in values:
            if '=' not in item:
                parser.error(f'argument {option_string}: {item!r} is not KEY=VALUE (e.g. '
                             f'train_cfg.max_epochs=1)')
            # spaces next to , [ ] ( ) only separate items; elsewhere (a path, a string) mmengine's
            # deletion would change the value
            if ' ' in re.sub(r'\s*([,\[\]()])\s*', r'\1', item.partition('=')[2].strip()):
                parser.error(f'argument {option_string}: {item!r}: mmengine\'s parser deletes '
                             f'spaces inside values (it would read '
                             f'{item.replace(" ", "")!r}); use a path without spaces or set the '
                             f'value in a config file')
        super().__call__(parser, namespace, values, option_string)


def positive_int(text: str) -> int:
    """argparse type for sizes: an int >= 1 (``--shape 0 0`` failed deep inside the model)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'{value} is not a positive size')
    return value


def check_resumable(path: str) -> None:
    """``--resume`` continues a training run: refuse, in one line, a checkpoint without the
    training state mmengine's resume reads (message hub, epoch / iteration; the optimizer state
    is optional). ``check_checkpoint(path, cfg, resume=True)`` does this on the same load."""
    if '://' not in path:
        _check_training_state(load_checkpoint_file(path), path)


def _check_training_state(checkpoint: dict, path: str) -> None:
    meta = checkpoint.get('meta')
    lacking = [] if 'message_hub' in checkpoint else ['message_hub']  # optimizer: optional
    if not isinstance(meta, dict) or 'iter' not in meta:
        lacking.append('meta.iter')
    if lacking:
        raise CheckpointError(
            f'Checkpoint {path!r} is not a training checkpoint (no {" or ".join(lacking)}: a '
            f'folded, extracted or weights-only file); --resume continues a run from its '
            f'epoch_N.pth / iter_N.pth. To train from its weights instead, pass '
            f'--cfg-options load_from={path}.')


def check_checkpoint_fits(path: str, model) -> None:
    """Refuse, in one line, a checkpoint that does not fit ``model`` where mmengine's non-strict
    load would evaluate something else without an error: model weights it lacks (left random:
    another model's checkpoint), DO-Conv parameters the model has no layer for (D dropped: a
    config with DO-Conv on fewer components), mis-shaped tensors (another D_mul). A plain
    checkpoint into DO-Conv layers (D = 0) and extra non-DO-Conv keys are fine, as for mmengine.
    """
    from mmengine.model import BaseTTAModel, is_model_wrapper
    from .checkpoint import key_listing, key_mismatch
    if '://' in path:
        return
    model = model.module if is_model_wrapper(model) else model
    model = model.module if isinstance(model, BaseTTAModel) else model  # --tta: the model inside
    checkpoint = load_checkpoint_file(path)
    weights = checkpoint.get('state_dict', checkpoint)
    weights = {re.sub(r'^module\.', '', k): v for k, v in weights.items() if hasattr(v, 'shape')}
    expected = model.state_dict()
    missing, unexpected, misshaped = key_mismatch(expected, weights)
    plain_source = {name for name, m in model.named_modules(remove_duplicate=False)
                    if isinstance(m, DOConv2d) and f'{name}.weight' in weights
                    and f'{name}.D' not in weights}
    missing = [k for k in missing if not k.endswith('num_batches_tracked') and not (
        k.endswith(('.D', '.weight_extra')) and k.rsplit('.', 1)[0] in plain_source)]
    dropped = [k for k in unexpected if k.endswith(('.D', '.weight_extra'))]
    problems = []
    if missing:
        problems.append(f'it lacks {len(missing)} of the model\'s tensors, which would stay at '
                        f'their initialisation ({key_listing(missing)})')
    if dropped:
        problems.append(f'it has DO-Conv parameters where this config builds plain convs, which '
                        f'would be dropped ({key_listing(dropped)})')
    if misshaped:
        d_mul = any(k.endswith('.D') for k in misshaped)
        problems.append(f'{len(misshaped)} tensors differ in shape ({key_listing(misshaped)}'
                        f'{": another D_mul" if d_mul else ""})')
    if problems:
        raise CheckpointError(f'Checkpoint {path!r} does not fit the model of this config: '
                              f'{"; ".join(problems)}. Pass the config it was trained with (its '
                              f'work dir keeps a copy).')


def set_work_dir(cfg: Config, config_path: str, work_dir: Optional[str]) -> None:
    """work_dir priority: CLI > ``work_dir`` in the config > ./work_dirs/<config name>."""
    if work_dir is not None:
        if osp.isfile(work_dir):
            raise ToolError(f'--work-dir {work_dir!r} is a file; pass a directory (created if '
                            f'missing).')
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def prepare_cpu_distributed(cfg: Config) -> None:
    """Let mmengine's distributed Runner run on CPU-only machines (gloo), unchanged otherwise.

    mmengine 0.10.7 cannot start distributed CPU training by itself: ``init_dist`` calls
    ``torch.cuda.set_device`` (fails without CUDA) and the Runner wraps the model in
    ``MMDistributedDataParallel(device_ids=[LOCAL_RANK])`` (DDP rejects device ids for CPU
    modules). Without CUDA this initialises the gloo process group from torchrun's environment
    (the Runner then skips ``init_dist``) and sets ``device_ids=None``; sampling, gradient
    all-reduce and checkpointing stay mmengine's. SyncBN only runs on GPUs (DDP refuses CPU
    modules with SyncBatchNorm layers), so SyncBN in the model config becomes BN, with a warning
    (:func:`revert_sync_bn_cfg`); a single process needs nothing, mmengine's Runner reverts
    SyncBN itself when not distributed.
    """
    if torch.cuda.is_available() or cfg.launcher == 'none':
        return
    if 'model' in cfg:
        reverted = revert_sync_bn_cfg(cfg.model)
        if reverted:
            print_log(f'No CUDA device: SyncBN needs GPUs, so the {len(reverted)} SyncBN '
                      f'norm_cfg(s) of the model ({", ".join(reverted[:4])}'
                      f'{", ..." if len(reverted) > 4 else ""}) become BN: each process '
                      f'normalises its own batch (statistics are not synchronised).',
                      logger='current', level=logging.WARNING)
    if cfg.launcher != 'pytorch':
        raise ToolError(f'--launcher {cfg.launcher} needs CUDA devices; on CPU use '
                        f'--launcher pytorch through torchrun (bash tools/dist_train.sh).')
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
               if k not in os.environ]
    if missing:
        raise ToolError(f'--launcher pytorch needs the torchrun environment ({", ".join(missing)} '
                        f'unset); start it with torchrun or bash tools/dist_train.sh.')
    dist_cfg = cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    if dist_cfg.get('backend', 'nccl') != 'gloo':
        print_log(f'No CUDA device: using the gloo backend instead of '
                  f'{dist_cfg.get("backend", "nccl")!r}.', logger='current',
                  level=logging.WARNING)
    dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel')
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    if not torch.distributed.is_initialized():
        kwargs = {k: v for k, v in dist_cfg.items() if k != 'backend'}
        if 'timeout' in kwargs:
            import datetime
            kwargs['timeout'] = datetime.timedelta(seconds=kwargs['timeout'])
        torch.distributed.init_process_group(backend='gloo', **kwargs)


_SYNC_BN_TYPES = ('SyncBN', 'MMSyncBN')


def revert_sync_bn_cfg(model_cfg) -> list:
    """Replace every ``dict(type='SyncBN' | 'MMSyncBN', ...)`` in a model config by BN, in
    place (config-level ``mmengine.model.revert_sync_batchnorm``); returns the config paths."""
    from .config_check import walk_cfg
    changed = []
    for path, node in walk_cfg(model_cfg, 'model'):
        if isinstance(node.get('type'), str) and node['type'] in _SYNC_BN_TYPES:
            node['type'] = 'BN'
            changed.append(path)
    return changed


def prepare_toy_data(cfg: Config, wait_s: float = 600) -> None:
    """Generate the bundled toy data a toy config trains on, if missing (other configs: no-op).

    Under a distributed launch only local rank 0 generates; the other ranks wait for it.
    """
    from .toy_data import ensure_toy_data_for_config, toy_data_missing_for_config
    if int(os.environ.get('LOCAL_RANK', 0)) == 0:
        ensure_toy_data_for_config(cfg)
        return
    deadline = time.monotonic() + wait_s
    while toy_data_missing_for_config(cfg):
        if time.monotonic() > deadline:
            raise ToolError(f'toy data in {toy_data_missing_for_config(cfg)} did not appear '
                            f'within {wait_s:.0f} s; run python tools/make_toy_data.py first.')
        time.sleep(1)


def build_runner(cfg: Config):
    """``Runner.from_cfg`` or, when ``runner_type`` is set, the scope's RUNNERS registry."""
    from mmengine.runner import Runner
    if cfg.get('default_scope') == 'mmdet':
        from mmdet.utils import setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()  # as mmdet's own tools do
    try:
        if 'runner_type' not in cfg:
            runner = Runner.from_cfg(cfg)
        else:
            scope = cfg.get('default_scope')
            registry = importlib.import_module(f'{scope}.registry') if scope else None
            runners = getattr(registry, 'RUNNERS', None)
            if runners is None:
                from mmengine.registry import RUNNERS as runners
            runner = runners.build(cfg)
    except Exception as error:
        # A known DO-Conv build failure (e.g. D_mul below a 7x7 stem's kh*kw): one line that
        # names the module and the fix instead of mmengine's nested build traceback.
        from .config_check import explain_build_error
        message = explain_build_error(cfg.model, error, cfg.get('default_scope'))
        if message is None:
            if os.environ.get('DO_CONV_MM_TRACEBACK'):
                raise
            # A config mistake (a --cfg-options typo, an invalid argument) surfaces here deep
            # inside mmengine's registry: one line with the error, the traceback on request.
            message = (f'could not build the model / runner from the config: '
                       f'{type(error).__name__}: {config_loading.first_line(error)} '
                       f'(DO_CONV_MM_TRACEBACK=1 prints the '
                       f'traceback)')
        raise ToolError(message) from None
    _warn_conv_cfg_ignored(cfg, runner.model)
    return runner


def _warn_conv_cfg_ignored(cfg: Config, model) -> None:
    """Warn where a component's DO-Conv conv_cfg built no DO-Conv layer."""
    from mmengine.model import is_model_wrapper
    from .config_check import components_ignoring_conv_cfg
    if 'model' not in cfg:
        return
    model = model.module if is_model_wrapper(model) else model
    for line in components_ignoring_conv_cfg(cfg.model, model):
        print_log(f'DO-Conv: {line}', logger='current', level=logging.WARNING)
