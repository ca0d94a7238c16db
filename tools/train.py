"""Train a detector, segmentor or classifier from an mmdet / mmseg / mmpretrain config (DO-Conv
registered).

Usage (the OpenMMLab command line):
    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CHECKPOINT]]
                          [--auto-scale-lr] [--cfg-options KEY=VALUE ...]
                          [--launcher {none,pytorch,slurm,mpi}] [--local_rank N]
    bash tools/dist_train.sh CONFIG GPUS [same options]      # torchrun, one process per device

The config's ``default_scope`` ('mmdet', 'mmseg' or 'mmpretrain') picks the registries, as in the
upstream tools.
``import do_conv_mm`` registers DOConv and allow-lists the types of mmengine checkpoints, so
``--resume`` and ``load_from`` work on torch >= 2.6 with safe loading on. Each local
``init_cfg=dict(type='Pretrained', ...)`` checkpoint is compared with its module first
(do_conv_mm.pretrained): a DO-Conv checkpoint into plain convs, a D_mul mismatch or missing weights
stop with one line instead of mmengine's non-strict partial load.
"""
import argparse
import logging
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a bare checkout

from do_conv_mm.runner_setup import CfgOptionsAction  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.runner import find_latest_checkpoint  # noqa: E402

import do_conv_mm  # noqa: E402,F401  (DOConv registry entries + safe checkpoint globals)
from do_conv_mm.checkpoint import CheckpointError  # noqa: E402
from do_conv_mm.runner_setup import (ToolError, build_runner, check_checkpoint,  # noqa: E402
                                     load_config, prepare_toy_data, set_work_dir)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Train a detector / segmentor / classifier (DO-Conv ready)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp', action='store_true', default=False,
        help='enable automatic mixed precision: fp16 AmpOptimWrapper on CUDA, bfloat16 '
        'autocast (BF16AmpOptimWrapper) on CPU')
    parser.add_argument(
        '--auto-scale-lr', action='store_true', help='enable automatically scaling LR')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='if a checkpoint is given, resume from it; without one, resume from the latest '
        'checkpoint in the work dir')
    parser.add_argument(
        '--cfg-options', nargs='+', action=CfgOptionsAction,
        help='override settings of the config, key=value pairs (e.g. train_cfg.max_iters=10 '
        'or key="[a,b]")')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank; older launchers --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def enable_amp(cfg) -> None:
    """Mixed precision as upstream on CUDA; bfloat16 autocast on CPU, where fp16 is unavailable."""
    import torch
    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper in ('AmpOptimWrapper', 'BF16AmpOptimWrapper'):
        print_log('AMP training is already enabled in your config.', logger='current',
                  level=logging.WARNING)
        return
    if wrapper != 'OptimWrapper':
        raise ToolError(f'--amp needs optim_wrapper.type = OptimWrapper, but the config has '
                        f'{wrapper!r}; set it to OptimWrapper or drop --amp.')
    if torch.cuda.is_available():
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    else:
        cfg.optim_wrapper.type = 'BF16AmpOptimWrapper'
        print_log('--amp without CUDA: training under bfloat16 CPU autocast (fp16 autocast is '
                  'CUDA-only).', logger='current')


def enable_auto_scale_lr(cfg) -> None:
    if 'auto_scale_lr' in cfg and 'base_batch_size' in cfg.auto_scale_lr:
        cfg.auto_scale_lr.enable = True
    else:
        raise ToolError('--auto-scale-lr needs auto_scale_lr = dict(enable=..., '
                        'base_batch_size=...) in the config; add it or drop the flag.')


def check_pretrained(runner) -> None:
    """Compare each local init_cfg Pretrained checkpoint with its module before mmengine loads it
    non-strictly: DO-Conv D dropped, D_mul differing or weights missing stop training here."""
    from mmengine.model import is_model_wrapper
    from do_conv_mm.pretrained import check_pretrained_inits
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    for line in check_pretrained_inits(model):
        print_log(f'pretrained: {line}', logger='current')


def warn_of_an_earlier_run(cfg) -> None:
    """A work dir that holds an earlier run's checkpoints, trained again without --resume: the
    new run replaces checkpoints of the same names (as mmdet's tool does), so say so first."""
    marker = osp.join(cfg.work_dir, 'last_checkpoint')
    if cfg.get('resume') or not osp.isfile(marker):
        return
    with open(marker) as f:
        last = f.read().strip()
    print_log(f'{cfg.work_dir} holds checkpoints of an earlier run (last: {osp.basename(last)}); '
              f'this run starts anew and replaces those of the same names. Pass --resume to '
              f'continue it, or another --work-dir to keep them.', logger='current',
              level=logging.WARNING)


def warn_where_d_cannot_train(runner) -> None:
    """Once the optimizer is built (before the first iteration): warn where a trust-ratio
    optimizer (mmpretrain's Lamb, LARS) would keep DO-Conv's D at zero."""
    from mmengine.hooks import Hook
    from mmengine.model import is_model_wrapper
    from mmengine.optim import OptimWrapperDict
    from do_conv_mm.config_check import d_held_by_trust_ratio

    class TrustRatioCheck(Hook):
        def before_train(self, runner):
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            wrapper = runner.optim_wrapper
            wrappers = wrapper.values() if isinstance(wrapper, OptimWrapperDict) else [wrapper]
            for each in wrappers:
                line = d_held_by_trust_ratio(each.optimizer, model)
                if line:
                    print_log(f'DO-Conv: {line}', logger='current', level=logging.WARNING)

    runner.register_hook(TrustRatioCheck(), priority='LOWEST')


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.cfg_options, args.launcher)
        set_work_dir(cfg, args.config, args.work_dir)
        if args.amp:
            enable_amp(cfg)
        if args.auto_scale_lr:
            enable_auto_scale_lr(cfg)
        # As in mmdet/mmseg: a path resumes from that checkpoint, a bare --resume from the
        # work dir's latest checkpoint (mmengine reads <work_dir>/last_checkpoint).
        if args.resume == 'auto':
            cfg.resume = True
            cfg.load_from = None
        elif args.resume is not None:
            cfg.resume = True
            cfg.load_from = args.resume
        if cfg.get('load_from'):
            check_checkpoint(cfg.load_from, cfg, resume=bool(cfg.get('resume')))
        elif cfg.get('resume') and osp.isfile(osp.join(cfg.work_dir, 'last_checkpoint')):
            # what the Runner resumes from without load_from
            check_checkpoint(find_latest_checkpoint(cfg.work_dir), cfg, resume=True)
        warn_of_an_earlier_run(cfg)
        prepare_toy_data(cfg)
        runner = build_runner(cfg)
        check_pretrained(runner)
        warn_where_d_cannot_train(runner)
    except (ToolError, CheckpointError) as error:
        sys.exit(f'error: {error}')
    runner.train()


if __name__ == '__main__':
    main()
