"""Test (and evaluate) a detector, segmentor or classifier checkpoint from an mmdet / mmseg /
mmpretrain config.

Usage (the OpenMMLab command line):
    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out PATH] [--show] [--show-dir DIR]
                         [--wait-time S] [--tta] [--cfg-options KEY=VALUE ...]
                         [--launcher {none,pytorch,slurm,mpi}] [--local_rank N]
    bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [same options]

``--out``: mmdet configs dump predictions to a .pkl file (DumpDetResults), mmseg configs write
prediction maps into that directory (IoUMetric output_dir), mmpretrain configs dump predictions
to a .pkl file (mmengine's DumpResults), as the upstream tools do. The metrics are printed by
mmengine's logger and also written to ``<work_dir>/test_metrics.json``.

The checkpoint is loaded with torch's safe unpickler (``import do_conv_mm`` allow-lists the types
of mmengine training checkpoints); a damaged or unsafe file is reported in one line, and so is an
unfolded DO-Conv checkpoint given with a config that has no DO-Conv layer (it would load
non-strictly and compute a different function: fold it first). The log names the checkpoint's
kind (folded by tools/fold_doconv.py, unfolded DO-Conv, or plain).
"""
import argparse
import copy
import json
import logging
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a bare checkout

from do_conv_mm.runner_setup import CfgOptionsAction  # noqa: E402
from mmengine.dist import is_main_process  # noqa: E402
from mmengine.logging import print_log  # noqa: E402

import do_conv_mm  # noqa: E402,F401  (DOConv registry entries + safe checkpoint globals)
from do_conv_mm.checkpoint import CheckpointError  # noqa: E402
from do_conv_mm.runner_setup import (ToolError, build_runner, check_checkpoint,  # noqa: E402
                                     check_checkpoint_fits, load_config, prepare_toy_data,
                                     set_work_dir)

METRICS_FILE = 'test_metrics.json'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Test (and eval) a detector / segmentor / classifier')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the directory to save the evaluation metrics')
    parser.add_argument(
        '--out', type=str,
        help='mmdet / mmpretrain: dump predictions to this .pkl file; mmseg: save prediction maps '
        'in this directory')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir', help='directory where painted images will be saved')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=CfgOptionsAction,
        help='override settings of the config, key=value pairs')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
        help='job launcher')
    parser.add_argument('--tta', action='store_true',
                        help='test-time augmentation (needs tta_model and tta_pipeline in the '
                        'config)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def enable_visualization(cfg, args) -> None:
    """Turn the config's visualization hook on, as mmdet's / mmseg's / mmpretrain's test tools
    do (mmpretrain's VisualizationHook: enable, out_dir, every sample as its --interval 1)."""
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise ToolError('--show / --show-dir need a visualization hook in default_hooks (e.g. '
                        "visualization=dict(type='DetVisualizationHook')).")
    if cfg.get('default_scope') == 'mmpretrain':
        hook.update(enable=True, show=args.show, wait_time=args.wait_time,
                    out_dir=args.show_dir, interval=1)
        return
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        if cfg.get('default_scope') == 'mmseg':
            cfg.visualizer['save_dir'] = args.show_dir
        else:
            hook['test_out_dir'] = args.show_dir


# --tta without tta_model in the config: what mmdet's and mmpretrain's tools/test.py use (mmseg's
# has no default).
DEFAULT_TTA_MODELS = {
    'mmdet': dict(type='DetTTAModel',
                  tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)),
    'mmpretrain': dict(type='mmpretrain.AverageClsScoreTTA'),
}
DET_PACK = dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                                 'scale_factor', 'flip', 'flip_direction'))


def pipeline_dataset(cfg):
    """The test dataset config that holds the pipeline: inside wrappers (RepeatDataset,
    ClassBalancedDataset) the wrapped one; a ConcatDataset (one pipeline per part) is refused."""
    dataset = cfg.test_dataloader.dataset
    while 'dataset' in dataset:
        dataset = dataset['dataset']
    if 'pipeline' not in dataset:
        raise ToolError(f'--tta: the test dataset ({dataset.get("type")}) has no single pipeline '
                        f'to replace; test each dataset on its own with --tta.')
    return dataset


def default_tta_pipeline(test_pipeline: list, scope: str) -> list:
    """The test pipeline with its packing step replaced by flip / no-flip test-time
    augmentation, as mmdet's and mmpretrain's tools/test.py build it."""
    pipeline = copy.deepcopy(test_pipeline)
    pack = DET_PACK if scope == 'mmdet' else pipeline[-1]
    pipeline[-1] = dict(type='TestTimeAug', transforms=[
        [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)], [pack]])
    return pipeline


def enable_tta(cfg) -> None:
    """Wrap the model in the config's tta_model and test with its tta_pipeline; where the config
    has none, mmdet and mmpretrain configs get their tools' flip TTA (with a warning, as there),
    mmseg configs are refused (mmseg's tool has no default)."""
    scope = cfg.get('default_scope')
    missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
    if missing and scope not in DEFAULT_TTA_MODELS:
        raise ToolError(f'--tta needs tta_model and tta_pipeline in the config (there is no '
                        f'default for default_scope {scope!r}); add them or drop --tta.')
    dataset = pipeline_dataset(cfg)
    if 'tta_model' not in cfg:
        cfg.tta_model = copy.deepcopy(DEFAULT_TTA_MODELS[scope])
    if 'tta_pipeline' not in cfg:
        cfg.tta_pipeline = default_tta_pipeline(dataset.pipeline, scope)
    if missing:
        print_log(f'--tta: the config has no {" / ".join(missing)}; using {scope}\'s tools/test.py '
                  f'default (flip and no flip, merged by {cfg.tta_model["type"]}).',
                  logger='current', level=logging.WARNING)
    dataset.pipeline = cfg.tta_pipeline
    cfg.tta_model.module = cfg.model
    cfg.model = cfg.tta_model


def request_output(cfg, out: str) -> None:
    """--out, config side: mmseg's IoUMetric writes prediction maps to ``out``; mmdet and
    mmpretrain dump to a pickle file (checked here, attached by :func:`attach_output`)."""
    scope = cfg.get('default_scope')
    if scope == 'mmseg':
        cfg.test_evaluator['output_dir'] = out
        cfg.test_evaluator['keep_results'] = True
    elif scope not in ('mmdet', 'mmpretrain'):
        raise ToolError(f'--out supports mmdet, mmseg and mmpretrain configs; this config\'s '
                        f'default_scope is {scope!r}. Drop --out.')
    elif not out.endswith(('.pkl', '.pickle')):
        raise ToolError(f'--out {out!r}: the dump file must end in .pkl or .pickle.')


def attach_output(cfg, runner, out: str) -> None:
    """--out, runner side: mmdet dumps predictions through a DumpDetResults metric, mmpretrain
    (as its tools/test.py) through mmengine's DumpResults: a list with one dict per sample
    (``pred_label``, ``pred_score``, ``gt_label``, ...)."""
    scope = cfg.get('default_scope')
    if scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=out))
    elif scope == 'mmpretrain':
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=out))


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.cfg_options, args.launcher)
        set_work_dir(cfg, args.config, args.work_dir)
        checkpoint_kind = check_checkpoint(args.checkpoint, cfg)
        cfg.load_from = args.checkpoint
        if args.show or args.show_dir:
            enable_visualization(cfg, args)
        if args.tta:
            enable_tta(cfg)
        if args.out is not None:
            for source in (args.checkpoint, args.config):
                if ('://' not in source and osp.exists(args.out) and osp.exists(source)
                        and osp.samefile(args.out, source)):
                    raise ToolError(f'--out {args.out!r} is the input {source!r}; dump the '
                                    f'predictions to a new path (inputs are never modified).')
            request_output(cfg, args.out)
        prepare_toy_data(cfg)
        runner = build_runner(cfg)
        check_checkpoint_fits(args.checkpoint, runner.model)
    except (ToolError, CheckpointError) as error:
        sys.exit(f'error: {error}')
    if checkpoint_kind:
        print_log(f'checkpoint {args.checkpoint}: {checkpoint_kind}', logger='current')
    if args.out is not None:
        attach_output(cfg, runner, args.out)
    metrics = runner.test()
    if is_main_process():
        path = osp.join(runner.work_dir, METRICS_FILE)
        with open(path, 'w') as f:
            json.dump(dict(config=args.config, checkpoint=args.checkpoint,
                           metrics={k: float(v) if hasattr(v, '__float__') else v
                                    for k, v in metrics.items()}), f, indent=2)
    return metrics


if __name__ == '__main__':
    main()
