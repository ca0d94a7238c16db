"""DO-Conv coverage of an mmdet / mmseg / mmpretrain config: per component, which k×k convs are
DO-Conv and which stay plain, the share of k×k conv FLOPs that is DO-Conv, and the extra training
parameters.

    python tools/analyze_doconv.py CONFIG [--shape H W] [--mode loss|tensor] [--json]
                                   [--checkpoint CKPT [--use-ema]] [--cfg-options KEY=VALUE ...]

The model is built on CPU with random weights (no checkpoint, no download); SyncBN becomes BN.
FLOPs come from forward hooks on one dummy image of --shape (default: 800x1344 for detectors,
the config's crop_size for segmentors, the test pipeline's crop / resize size for classifiers,
else 224x224). ``--mode loss`` (default) runs the training forward pass (RPN proposals and RoI
sampling as in training, auxiliary heads included) on a synthetic annotation (boxes, a label map,
or class label 0); ``--mode tensor`` runs the plain forward pass.

With ``--checkpoint`` (a DO-Conv training checkpoint of CONFIG; its ``state_dict``, which holds
the EMA weights where EMAHook saved any; ``--use-ema`` insists on those) it also reports what
the trained D does: per component, how far D moves each kernel from the plain one
(‖W' − weight‖ / ‖weight‖), the largest changes, and the layers whose D is still exactly 0.
The checkpoint is checked as the fold tool checks it (strict match, no folded or plain
checkpoint).
"""
import argparse
import dataclasses
import json
import os.path as osp
import sys
from typing import Dict, List, Tuple

import numpy as np
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import MODELS, init_default_scope

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout
from do_conv_mm.analysis import (conv_flops_by_module, doconv_coverage,  # noqa: E402
                                 kernel_changes, summarise_kernel_changes)
from do_conv_mm.checkpoint import key_listing, load_checkpoint_file  # noqa: E402
from do_conv_mm.config_check import (DOConvNotApplicableError,  # noqa: E402
                                     check_base_conv_types, check_doconv_cfg,
                                     explain_build_error)
from do_conv_mm.deploy import checkpoint_weights  # noqa: E402
from do_conv_mm.deploy_verify import model_task  # noqa: E402
from do_conv_mm.runner_setup import (CfgOptionsAction, load_config_file,  # noqa: E402
                                     merge_cfg_options, positive_int)

DEFAULT_DET_SHAPE = (800, 1344)
DEFAULT_SEG_SHAPE = (512, 1024)
DEFAULT_CLS_SHAPE = (224, 224)
# Synthetic objects (x1, y1, x2, y2 as fractions of the image) for the training forward pass.
DUMMY_BOXES = ((0.10, 0.10, 0.45, 0.55), (0.50, 0.30, 0.90, 0.90), (0.30, 0.60, 0.42, 0.74))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='DO-Conv coverage of a model config')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--shape', type=positive_int, nargs=2, metavar=('H', 'W'),
                        help='dummy input height and width (multiples of 32)')
    parser.add_argument('--mode', choices=['loss', 'tensor'], default='loss',
                        help='forward pass to count FLOPs on (default: loss = training pass)')
    parser.add_argument('--json', action='store_true', help='print the result as JSON only')
    parser.add_argument('--checkpoint', metavar='CKPT',
                        help='a DO-Conv training checkpoint of CONFIG: also report what its '
                             'trained D does to each kernel')
    parser.add_argument('--use-ema', action='store_true',
                        help='with --checkpoint: make sure its EMA weights are analysed '
                        '(mmengine\'s EMAHook saves them as state_dict, the default; refused '
                        'without EMA)')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override settings of the config, xxx=yyy format')
    return parser.parse_args(argv)


class AnalyzeError(Exception):
    """A config this tool cannot analyse; the message names the problem and the fix."""


def build_model(cfg: Config) -> torch.nn.Module:
    """The config's model on CPU, random weights (seed 0), SyncBN reverted to BN, eval mode."""
    scope = cfg.get('default_scope', None) or 'mmengine'
    init_default_scope(scope)
    try:
        check_doconv_cfg(cfg.model, scope=scope)
    except DOConvNotApplicableError as error:
        raise AnalyzeError(str(error)) from None
    torch.manual_seed(0)
    try:
        model = MODELS.build(cfg.model)
    except Exception as error:
        message = explain_build_error(cfg.model, error, scope)
        if message is None:
            raise
        raise AnalyzeError(message) from None
    model = revert_sync_batchnorm(model)
    model.eval()
    return model


def _task(model) -> str:
    """'det', 'seg' or 'cls' (what gets a dummy batch); AnalyzeError for anything else."""
    task = model_task(model)
    if task == 'other':
        raise AnalyzeError(f'{type(model).__name__} is neither an mmdet detector, an mmseg '
                           f'segmentor nor an mmpretrain classifier; only those get a dummy '
                           f'batch.')
    return task


def default_shape(cfg: Config, task: str) -> Tuple[int, int]:
    if task == 'seg' and cfg.get('crop_size'):
        return tuple(int(s) for s in cfg.crop_size)
    if task == 'cls':
        return _cls_input_shape(cfg) or DEFAULT_CLS_SHAPE
    return DEFAULT_DET_SHAPE if task == 'det' else DEFAULT_SEG_SHAPE


def _cls_input_shape(cfg: Config):
    """(H, W) the classifier's test pipeline fixes last (CenterCrop crop_size, Resize scale;
    mmpretrain sizes are int or (w, h)), or None (e.g. ResizeEdge only, or no pipeline)."""
    for transform in reversed([t for t in _pipeline(cfg, 'test') or [] if isinstance(t, dict)]):
        kind = str(transform.get('type', '')).rpartition('.')[2]
        size = {'CenterCrop': transform.get('crop_size'),
                'Resize': transform.get('scale')}.get(kind)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (list, tuple)) and len(size) == 2 and min(size) > 0:
            return int(size[1]), int(size[0])
    return None


def _pipeline(cfg: Config, split: str):
    """The ``split`` ('train' / 'test') pipeline of the config (through dataset wrappers such as
    RepeatDataset, else the top-level ``<split>_pipeline``), or None."""
    dataset = (cfg.get(f'{split}_dataloader') or {}).get('dataset') or {}
    while 'pipeline' not in dataset and isinstance(dataset.get('dataset'), dict):
        dataset = dataset['dataset']
    return dataset.get('pipeline') or cfg.get(f'{split}_pipeline')


def loads_masks(cfg: Config, model) -> bool:
    """Whether real training batches carry instance masks: the train pipeline's LoadAnnotations
    has with_mask=True (the model's ``with_mask`` when the config has no pipeline). Heads that
    do not train on masks may still read them when present (RTMDet's assigner takes the centre
    of mass of ``gt_instances.masks`` as a tensor), so the dummy batch mirrors the pipeline."""
    pipeline = _pipeline(cfg, 'train')
    if pipeline:
        return any(str(t.get('type', '')).endswith('LoadAnnotations') and t.get('with_mask')
                   for t in pipeline if isinstance(t, dict))
    return bool(getattr(model, 'with_mask', False))


def _fewest_classes(model) -> int:
    """The smallest ``num_classes`` of the model's heads (RPN heads: 1), so that synthetic labels
    below it are valid everywhere; 1 when no module states one."""
    counts = [m.num_classes for m in model.modules()
              if isinstance(getattr(m, 'num_classes', None), int) and m.num_classes > 0]
    return min(counts, default=1)


def _det_batch(model, h: int, w: int, with_mask: bool = None):
    """One synthetic training sample; masks (BitmapMasks, as LoadAnnotations(with_mask=True)
    makes them) only when ``with_mask`` (None: the model's own ``with_mask``)."""
    from mmengine.structures import InstanceData
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    if with_mask is None:
        with_mask = bool(getattr(model, 'with_mask', False))
    shape = (h, w)
    sample = DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape,
                                         batch_input_shape=shape, scale_factor=(1.0, 1.0),
                                         flip=False, img_id=0))
    boxes = torch.tensor(DUMMY_BOXES) * torch.tensor([w, h, w, h])
    masks = np.zeros((len(boxes), h, w), dtype=np.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.round().int().tolist()):
        mask[y1:y2, x1:x2] = 1
    # Plain tensors, as DetDataPreprocessor(boxtype2tensor=True) hands them to the model.
    labels = torch.arange(len(boxes)) % _fewest_classes(model)  # valid for every head
    sample.gt_instances = InstanceData(bboxes=boxes, labels=labels)
    if with_mask:
        sample.gt_instances.masks = BitmapMasks(masks, h, w)
    sample.ignored_instances = InstanceData(bboxes=torch.zeros(0, 4),
                                            labels=torch.zeros(0, dtype=torch.long))
    return [sample]


def _seg_batch(model, h: int, w: int):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    shape = (h, w)
    sample = SegDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape))
    generator = torch.Generator().manual_seed(0)
    heads = model.decode_head  # a ModuleList of heads in cascade segmentors (OCRNet, PointRend)
    heads = list(heads) if isinstance(heads, torch.nn.ModuleList) else [heads]
    num_classes = min(head.num_classes for head in heads)  # valid for every head
    sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, h, w),
                                                     generator=generator))
    return [sample]


def _cls_batch(model, h: int, w: int):
    """One training sample of class 0 (valid for any number of classes)."""
    from mmpretrain.structures import DataSample
    shape = (h, w)
    return [DataSample(metainfo=dict(img_shape=shape, ori_shape=shape)).set_gt_label(0)]


def load_trained_weights(model, checkpoint: str, use_ema: bool, config_name: str) -> str:
    """Strict-load the checkpoint's weights (EMA ones with ``use_ema``) into ``model``; return
    which ('state_dict', the EMA weights where EMAHook saved any: it swaps them in at save).
    AnalyzeError for anything the fold tool refuses, and with ``use_ema`` a checkpoint without
    EMA."""
    try:
        ckpt = load_checkpoint_file(checkpoint)
        weights = checkpoint_weights(model, ckpt, use_ema, checkpoint, config_name)
    except ValueError as error:  # CheckpointError, FoldError: one line with the fix
        raise AnalyzeError(str(error)) from None
    model.load_state_dict(weights, strict=True)
    return 'state_dict (EMA weights)' if 'ema_state_dict' in ckpt else 'state_dict'


def analyze(cfg: Config, shape=None, mode: str = 'loss', checkpoint: str = None,
            use_ema: bool = False, config_name: str = 'CONFIG') -> Dict:
    """Build the model of ``cfg``, run one dummy pass, return the coverage as plain data; with
    ``checkpoint``, also what its trained D does (``result['trained']``)."""
    model = build_model(cfg)
    task = _task(model)
    weights = None
    if checkpoint is not None:  # before the pass: a wrong checkpoint fails fast
        weights = load_trained_weights(model, checkpoint, use_ema, config_name)
    h, w = shape or default_shape(cfg, task)
    inputs = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    if task == 'det':
        samples = _det_batch(model, h, w, loads_masks(cfg, model))
    else:
        samples = _seg_batch(model, h, w) if task == 'seg' else _cls_batch(model, h, w)
    flops = conv_flops_by_module(model, lambda: model(inputs, samples, mode=mode))
    coverage = doconv_coverage(model, flops)
    total = coverage['total']
    result = dict(
        model=type(model).__name__, task=task, shape=[h, w], mode=mode,
        components={k: v.to_dict() for k, v in coverage['components'].items()},
        total=dict(total.to_dict(), extra_params_ratio=total.extra_params / total.params),
        plain_reasons=coverage['plain_reasons'], not_run=coverage['not_run'])
    if checkpoint is not None:
        changes = kernel_changes(model)
        result['trained'] = dict(
            checkpoint=checkpoint, weights=weights,
            components=summarise_kernel_changes(changes),
            layers=[dict(dataclasses.asdict(c), untrained=c.untrained) for c in changes])
    return result


def _pct(x) -> str:
    return '-' if x is None else f'{100 * x:.1f}%'


def _count(n: int) -> str:
    return f'{n / 1e6:.3f} M' if n >= 1e5 else f'{n / 1e3:.1f} K' if n >= 1e3 else str(n)


def print_report(result: Dict, config: str) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console(width=max(Console().width, 132))
    table = Table(title=f'DO-Conv coverage: {osp.basename(config)} ({result["model"]}, '
                  f'{result["mode"]} pass on {result["shape"][0]}x{result["shape"][1]})')
    columns = ('component', 'DOConv k×k', 'frozen', 'DOConv 1×1', 'plain k×k', 'k×k GMACs',
               'DO share', 'trainable', 'extra params', 'params')
    for column in columns:
        table.add_column(column, justify='left' if column == 'component' else 'right',
                         no_wrap=True)
    rows: List = list(result['components'].items()) + [('total', result['total'])]
    for name, cov in rows:
        table.add_row(name, str(cov['doconv_kxk']), str(cov['frozen_doconv_kxk']),
                      str(cov['doconv_1x1']), str(len(cov['plain_kxk'])),
                      f'{cov["kxk_flops"] / 1e9:.2f}', _pct(cov['doconv_flop_share']),
                      _pct(cov['trainable_doconv_flop_share']), _count(cov['extra_params']),
                      _count(cov['params']), end_section=name == rows[-2][0])
    console.print(table)
    console.print('DO share: share of k×k conv FLOPs run by DOConv layers; trainable: the same '
                  'without frozen ones.')
    total = result['total']
    console.print(f'Extra training parameters (D + weight_extra): {total["extra_params"]:,} '
                  f'= +{100 * total["extra_params_ratio"]:.2f}% of the plain model '
                  f'({total["params"]:,}); they fold away for deployment.')
    if total['frozen_doconv_kxk']:
        console.print(f'{total["frozen_doconv_kxk"]} DOConv k×k layers are frozen (their D has '
                      f'requires_grad=False, e.g. ResNet frozen_stages): they train as plain '
                      f'convs; "trainable share" leaves them out.')
    if result['plain_reasons']:
        console.print('Plain k×k convs left:')
        for name, why in result['plain_reasons'].items():
            console.print(f'  {name}: {why}', highlight=False)
    if result['not_run']:
        console.print(f'Conv layers not called by the {result["mode"]} pass (0 FLOPs): '
                      f'{", ".join(result["not_run"])}', highlight=False)
    if 'trained' in result:
        print_trained_report(result['trained'], console)


LARGEST_CHANGES_SHOWN = 5


def print_trained_report(trained: Dict, console) -> None:
    """The ``--checkpoint`` part: what the trained D does to the kernels."""
    from rich.table import Table
    table = Table(title=f'What the trained D does: {osp.basename(trained["checkpoint"])} '
                  f'({trained["weights"]}); change = ‖W\' − weight‖ / ‖weight‖')
    for column in ('component', 'DOConv k×k', 'D = 0', 'median change', 'largest change',
                   'at layer'):
        table.add_column(column, justify='left' if column in ('component', 'at layer')
                         else 'right', no_wrap=True)
    rows = list(trained['components'].items())
    for name, row in rows:
        table.add_row(name, str(row['layers']), str(row['untrained']),
                      _pct(row['median_change']), _pct(row['max_change']),
                      row['max_change_layer'] or '-', end_section=name == rows[-2][0])
    console.print(table)
    measured = sorted((layer for layer in trained['layers'] if layer['change'] is not None),
                      key=lambda layer: -layer['change'])
    console.print('Largest kernel changes: ' + ', '.join(
        f'{layer["name"]} {_pct(layer["change"])}'
        for layer in measured[:LARGEST_CHANGES_SHOWN]), highlight=False)
    stuck = [layer['name'] for layer in trained['layers']
             if layer['untrained'] and layer['trainable']]
    frozen = [layer['name'] for layer in trained['layers']
              if layer['untrained'] and not layer['trainable']]
    if frozen:
        console.print(f'{len(frozen)} frozen DOConv layer(s) keep D = 0 and deploy their plain '
                      f'kernel ({key_listing(frozen)}).', highlight=False)
    if stuck:
        console.print(f'{len(stuck)} DOConv layer(s) with a trainable D still have D = 0 '
                      f'({key_listing(stuck)}): they trained as plain convs. Check that the '
                      f'optimizer updates D (paramwise_cfg lr_mult / custom_keys) and that the '
                      f'layers run in the training pass.', highlight=False)


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.config):
        sys.exit(f'error: config {args.config!r} does not exist; pass a config file such as '
                 f'configs/mmdet/faster-rcnn_r50-doconv_fpn_1x_coco.py.')
    try:
        cfg = load_config_file(args.config, AnalyzeError)
    except AnalyzeError as error:
        sys.exit(f'error: {error}')
    earlier = merge_cfg_options(cfg, args.config, args.cfg_options)
    if args.use_ema and not args.checkpoint:
        sys.exit('error: --use-ema selects the EMA weights of --checkpoint; pass --checkpoint '
                 'CKPT with it.')
    try:
        check_base_conv_types(cfg, earlier)
        result = analyze(cfg, args.shape, args.mode, args.checkpoint, args.use_ema,
                         config_name=args.config)
    except (AnalyzeError, DOConvNotApplicableError) as error:
        sys.exit(f'error: {error}')
    result['config'] = args.config
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result, args.config)


if __name__ == '__main__':
    main()
