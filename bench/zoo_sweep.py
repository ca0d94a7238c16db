"""Model-zoo sweep: does DO-Conv hold across the installed mmdet / mmseg / mmpretrain families?

For one model per family (mmdet / mmseg: the shortest config name in each model-zoo folder;
mmpretrain: the shortest model name per family in ``mmpretrain.list_models()``, giant / huge /
large variants left out), on the CPU:

1. build it without pretrained weights (``init_cfg=Pretrained`` dropped, SyncBN -> BN) and,
   mmdet / mmseg, initialise it as a Runner does (``init_weights``), zero-initialised norm
   scales set to 1
   (``zero_init_residual`` would keep the step's gradient from every residual branch);
2. ``convert_to_doconv(model)``: every plain k×k conv becomes DO-Conv (1×1 convs are plain
   either way), D ~ N(0, 0.05²);
3. one training forward + backward on a synthetic batch; count the *trainable* D that got no
   gradient, and how many of those sit on a zero-initialised kernel W (dL/dD is linear in W, so
   it is 0 until W moves: DCN / DyHead offset convs);
4. eval: the DO-Conv model against its fold (``fold_doconv``) on one input, full output first;
   where that differs, the DO-Conv model against itself (randomness in eval) and the features
   (``extract_feat``: backbone + neck), which top-k proposal / query selection cannot reorder;
5. a failure (an exception, or a non-finite loss or gradient) is retried on the plain model
   from the same random state: "fails without DO-Conv too" marks the sweep's synthetic input or
   set-up, not DO-Conv.

Each family starts from the same seeds, and uninitialised memory reads NaN (torch's
``fill_uninitialized_memory``), so a row does not depend on the families before it or on what
the heap held. (Before the sweep called ``init_weights``, DETR-family models read their
``torch.empty`` level embeddings uninitialised and failed their training step.)

    python bench/zoo_sweep.py --zoo mmseg          # ~3 min on 2 cores
    python bench/zoo_sweep.py --zoo mmpretrain     # ~5 min
    python bench/zoo_sweep.py --zoo mmdet          # ~20 min
    python bench/zoo_sweep.py --zoo mmdet --families retinanet fcos   # a subset

Writes ``results/zoo_sweep_<zoo>.md``. Not a timing benchmark: the seconds are there to plan runs.
"""
import argparse
import glob
import os
import os.path as osp
import random
import sys
import time
import traceback
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from bench.bench_utils import (add_common_args, command_line, environment_lines,  # noqa: E402
                               md_table, setup_run, write_markdown)

FOLD_RTOL = 1e-4  # fp32 fold rounding through a deep network (tests/test_mm_integration.py)
LAYER_RTOL = 1e-5  # one layer: the folded kernel's fp32 rounding (~6e-8) summed over its taps

# Model-zoo folders that are not one more model family: dataset variants, video tracking,
# language-grounded models (text encoders download weights), teacher-student recipes (need a
# teacher checkpoint), timm / self-supervised wrappers and shared bases.
MMDET_SKIP = {
    '_base_', 'common', 'misc', 'legacy_1.x', 'dsdl', 'albu_example', 'cityscapes',
    'deepfashion', 'lvis', 'objects365', 'openimages', 'pascal_voc', 'wider_face', 'v3det',
    'bytetrack', 'deepsort', 'masktrack_rcnn', 'mask2former_vis', 'ocsort', 'qdtrack', 'reid',
    'sort', 'strongsort', 'glip', 'grounding_dino', 'mm_grounding_dino', 'selfsup_pretrain',
    'timm_example', 'ld', 'lad', 'soft_teacher', 'crowddet', 'scratch', 'strong_baselines',
    'simple_copy_paste', 'instaboost', 'resnet_strikes_back', 'seesaw_loss', 'gn', 'gn+ws',
    'cascade_rpn', 'fast_rcnn', 'libra_rcnn', 'boxinst', 'detectors'}
# Within a family, configs of these multi-stage cascades (minutes per CPU step) are picked
# only when the family has nothing else (htc, scnet).
HEAVY_PREFIXES = ('htc', 'scnet', 'cascade')
MMSEG_SKIP = {'_base_', 'dsdl', 'vpd', 'san', 'mae', 'beit', 'swin'}
# Families whose fixed-size layers need a larger input than the zoo's default --size.
SIZE_OVERRIDES = {('mmseg', 'mobilenet_v3'): 512, ('mmpretrain', 'swinv2'): 256,
                  ('mmdet', 'ssd'): 320, ('mmdet', 'pisa'): 320,  # SSD300's last 3×3 convs
                  ('mmdet', 'ddod'): 320}
# mmpretrain families not swept: multimodal models (need mmpretrain[multimodal]) and
# self-supervised algorithms whose build downloads a target network's weights (EVA, MILAN).
MMPRETRAIN_SKIP = {'blip', 'blip2', 'cn', 'flamingo', 'llava', 'minigpt', 'ofa', 'otter', 'eva',
                   'milan'}
MMPRETRAIN_SKIP_WORDS = ('giant', 'huge', 'large', '-g-', '-h-', '-l-', 'vit-g', 'vit-h',
                         'vit-l', 'xlarge')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--zoo', choices=['mmdet', 'mmseg', 'mmpretrain'], required=True)
    parser.add_argument('--families', nargs='+', default=None,
                        help='only these families (model-zoo folder names; mmpretrain: the '
                             'model-name prefix)')
    parser.add_argument('--size', type=int, default=None,
                        help='input side (default: mmdet 256, mmseg 128, mmpretrain 224)')
    return add_common_args(parser).parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Picking the models
# ------------------------------------------------------------------------------------------------
def _configs_dir(package: str) -> str:
    import importlib
    return osp.join(osp.dirname(importlib.import_module(package).__file__), '.mim', 'configs')


def zoo_models(zoo: str, families: Optional[List[str]]) -> Dict[str, str]:
    """family -> config path (mmdet / mmseg) or model name (mmpretrain)."""
    if zoo == 'mmpretrain':
        from mmpretrain import list_models
        picked = {}
        for name in list_models():
            if any(word in name for word in MMPRETRAIN_SKIP_WORDS):
                continue
            family = name.split('_')[0].split('-')[0]
            if family in MMPRETRAIN_SKIP:
                continue
            if family not in picked or len(name) < len(picked[family]):
                picked[family] = name
    else:
        root = _configs_dir('mmdet' if zoo == 'mmdet' else 'mmseg')
        skip = MMDET_SKIP if zoo == 'mmdet' else MMSEG_SKIP
        picked = {}
        for folder in sorted(os.listdir(root)):
            files = [f for f in glob.glob(osp.join(root, folder, '*.py'))
                     if not f.endswith('_tta.py')]
            if folder not in skip and files:  # the shortest name; a cascade only if all are
                picked[folder] = min(files, key=lambda f: (
                    osp.basename(f).startswith(HEAVY_PREFIXES), len(osp.basename(f)), f))
    if families:
        unknown = sorted(set(families) - set(picked))
        if unknown:
            raise SystemExit(f'--families: unknown {unknown}; known: {sorted(picked)}')
        picked = {f: picked[f] for f in families}
    return dict(sorted(picked.items()))


def build(zoo: str, source: str) -> nn.Module:
    """The model of ``source`` without pretrained weights, SyncBN as BN (do_conv_mm's
    ``deploy.build_model`` for mmdet / mmseg configs, ``get_model`` for mmpretrain names).
    Every random generator is seeded first, so a family's result does not depend on the
    families swept before it."""
    from mmengine.runner.utils import set_random_seed
    set_random_seed(0)
    if zoo == 'mmpretrain':
        from mmpretrain import get_model
        return get_model(source, pretrained=False)
    from mmengine.config import Config
    from do_conv_mm.config_check import walk_cfg
    from do_conv_mm.deploy import build_model
    from do_conv_mm.deploy_config import drop_pretrained_inits
    cfg = Config.fromfile(source)
    for _, node in walk_cfg(cfg.model, 'model'):
        node.pop('pretrained', None)
    drop_pretrained_inits(cfg.model)
    model = build_model(cfg)
    model.init_weights()  # as a Runner does (DETR-family embeddings are torch.empty until then)
    _unzero_norm_scales(model)
    return model


def _unzero_norm_scales(model: nn.Module) -> None:
    """Norm scales that init_weights set to 0 (mmdet's ResNet zeroes each residual block's
    last BN: ``zero_init_residual``) become 1: at 0 the one training step would give no conv of
    the residual branch a gradient, plain or DO-Conv, and the sweep checks that D gets one."""
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, 'weight', None)
            if (isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
                    and isinstance(weight, torch.Tensor) and bool((weight == 0).all())):
                weight.fill_(1)


# ------------------------------------------------------------------------------------------------
# Synthetic batches and passes
# ------------------------------------------------------------------------------------------------
def trains_with_masks(source: str) -> bool:
    """Does the mmdet config's training pipeline load instance masks? (Where it does not, a
    model may not take them: RTMDet's assigner reads masks when given, as tensors.)"""
    from mmengine.config import Config
    from do_conv_mm.config_check import walk_cfg
    cfg = Config.fromfile(source)
    loaders = [node for _, node in walk_cfg(cfg.get('train_dataloader', {}), 'train_dataloader')
               if node.get('type') in ('LoadAnnotations', 'LoadPanopticAnnotations')]
    return any(node.get('with_mask', node['type'] == 'LoadPanopticAnnotations')
               for node in loaders)


def batch(zoo: str, size: int, seed: int, with_masks: bool = True) -> dict:
    """Two uint8 images with detection (boxes, labels, masks if ``with_masks``), segmentation
    or class labels."""
    from mmengine.structures import InstanceData, PixelData
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
              for _ in range(2)]
    meta = dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                batch_input_shape=(size, size), scale_factor=(1.0, 1.0), flip=False,
                flip_direction=None)
    samples = []
    for i in range(2):
        if zoo == 'mmdet':
            from mmdet.structures import DetDataSample
            from mmdet.structures.mask import BitmapMasks
            xy = torch.rand(4, 2, generator=g) * (size - 32)
            wh = 24 + torch.rand(4, 2, generator=g) * (size - 32 - xy)
            boxes = torch.cat([xy, xy + wh], 1)
            masks = torch.zeros(4, size, size, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                masks[k, y0:y1, x0:x1] = 1
            sample = DetDataSample(metainfo=dict(meta, img_id=i))
            sample.gt_instances = InstanceData(
                bboxes=boxes, labels=torch.randint(0, 3, (4, ), generator=g))
            if with_masks:
                sample.gt_instances.masks = BitmapMasks(masks.numpy(), size, size)
            sample.ignored_instances = InstanceData(bboxes=torch.zeros(0, 4),
                                                    labels=torch.zeros(0, dtype=torch.long))
            sample.gt_sem_seg = PixelData(
                sem_seg=torch.randint(0, 3, (1, size, size), generator=g))
        elif zoo == 'mmseg':
            from mmseg.structures import SegDataSample
            sample = SegDataSample(metainfo=meta)
            sample.gt_sem_seg = PixelData(data=torch.randint(0, 2, (1, size, size), generator=g))
            sample.gt_edge_map = PixelData(data=torch.randint(0, 2, (1, size, size), generator=g))
        else:
            from mmpretrain.structures import DataSample
            sample = DataSample(metainfo=meta).set_gt_label(0)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _tensors(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _relative(got: List[torch.Tensor], want: List[torch.Tensor]) -> float:
    if len(got) != len(want) or not want:
        return float('inf')
    return max(float((a.float() - b.float()).abs().max() /
                     b.float().abs().max().clamp_min(1e-12)) for a, b in zip(got, want))


def prepare(model: nn.Module) -> nn.Module:
    """Stochastic depth off (a dropped block gives its D no gradient by chance), and no padding
    of the synthetic batch to a config's fixed crop (PIDNet's 1024²: its padded labels)."""
    for module in model.modules():
        if 'DropPath' in type(module).__name__ and hasattr(module, 'drop_prob'):
            module.drop_prob = 0.0
    preprocessor = getattr(model, 'data_preprocessor', None)
    if type(preprocessor).__name__ == 'SegDataPreProcessor':  # it needs size or size_divisor
        preprocessor.size = None
        preprocessor.size_divisor = preprocessor.size_divisor or 32
    return model


def _image_tensor(data: dict) -> torch.Tensor:
    """The preprocessed images as one (N, C, H, W) batch (self-supervised preprocessors give a
    list: of view batches, or, for single images as here, of the images)."""
    inputs = data['inputs']
    if isinstance(inputs, (list, tuple)):
        return inputs[0] if inputs[0].dim() == 4 else torch.stack(list(inputs))
    return inputs


def _features(model: nn.Module, images: torch.Tensor):
    """Backbone (+ neck) features; self-supervised models (whose extract_feat may need masks
    or views): their backbone's."""
    if hasattr(model, 'extract_feat') and type(model).__name__ in (
            'ImageClassifier', 'TimmClassifier') or not hasattr(model, 'backbone'):
        return model.extract_feat(images)
    return model.backbone(images)


def train_pass(zoo: str, model: nn.Module, size: int, with_masks: bool = True) -> None:
    """One forward + backward: mmdet / mmseg through their losses; mmpretrain through the
    backbone (+ neck) features, which every classifier and self-supervised model has (their
    losses need labels, views or masks that do not change what reaches D). The message hub says
    iteration 0 and epoch 0, as a Runner's would (YOLOX's batch resize and TOOD's head read
    them). A non-finite loss or gradient raises FloatingPointError (a failed step)."""
    from mmengine.logging import MessageHub
    MessageHub.get_current_instance().update_info_dict(dict(iter=0, epoch=0))
    model.train()
    data = model.data_preprocessor(batch(zoo, size, 0, with_masks), True)
    if zoo == 'mmpretrain':
        loss = sum(t.float().square().mean() for t in _tensors(_features(
            model, _image_tensor(data))))
    else:
        loss, _ = model.parse_losses(model(**data, mode='loss'))
    loss.backward()
    bad = [name for name, p in model.named_parameters()
           if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    if not bool(torch.isfinite(loss)) or bad:  # random-init instability, caught here
        raise FloatingPointError(f'non-finite training loss ({float(loss):.3g}) or gradients '
                                 f'({len(bad)} parameters, e.g. {bad[:1]})')


def outputs(zoo: str, model: nn.Module, size: int, features: bool) -> List[torch.Tensor]:
    """Eval outputs: backbone (+ neck) features, or the whole model's: mmseg's segmentation
    logits (predict mode, which every segmentor has), mmdet's raw head outputs (tensor mode)."""
    data = model.data_preprocessor(batch(zoo, size, 1), False)
    with torch.no_grad():
        if zoo == 'mmpretrain':
            return _tensors(_features(model, _image_tensor(data)))
        if features:
            return _tensors(model.extract_feat(data['inputs']))
        if zoo == 'mmseg':
            return [s.seg_logits.data for s in model(**data, mode='predict')]
        return _tensors(model(**data, mode='tensor'))


def layer_fold_error(model: nn.Module, zoo: str, size: int) -> float:
    """The largest relative difference, over the DO-Conv layers of ``model`` (eval), between a
    layer's output and its fold's (``to_conv2d``) on the input that layer received: the fold is
    exact layer by layer, whatever the network does with the outputs afterwards (top-k
    selections, random sampling)."""
    from do_conv_mm import DOConv2d
    worst = [0.0]

    def check(layer, args, output):
        with torch.no_grad():
            folded = layer.to_conv2d()(args[0])
        worst[0] = max(worst[0], _relative([folded], [output]))

    handles = [m.register_forward_hook(check) for m in model.modules()
               if isinstance(m, DOConv2d) and m.D is not None]
    try:
        outputs(zoo, model, size, features=zoo == 'mmdet')
    finally:
        for handle in handles:
            handle.remove()
    return worst[0]


# ------------------------------------------------------------------------------------------------
# One family
# ------------------------------------------------------------------------------------------------
def _first_line(error: BaseException) -> str:
    text = ' '.join(str(error).split())
    return f'{type(error).__name__}: {text[:110]}' + ('…' if len(text) > 110 else '')


def sweep_one(zoo: str, source: str, size: int) -> dict:
    from do_conv_mm import DOConv2d, convert_to_doconv, fold_doconv
    from bench.mm_models import randomize_D
    row = dict(doconv=0, no_grad=0, zero_w=0, no_grad_w=0, rel=None, layer_rel=None, status='',
               seconds=0.0)
    rng, with_masks = None, True
    t0 = time.time()
    stage = 'build'
    try:
        model = prepare(build(zoo, source))
        stage = 'convert'
        convert_to_doconv(model)
        layers = [m for m in model.modules() if isinstance(m, DOConv2d) and m.D is not None]
        row['doconv'] = len(layers)
        if not layers:
            row['status'] = 'no k×k conv'
            return row
        randomize_D(model, std=0.05)
        stage = 'train'
        rng = random_states()  # a retry without DO-Conv draws the same random numbers
        with_masks = zoo != 'mmdet' or trains_with_masks(source)
        train_pass(zoo, model, size, with_masks)
        missing = [m for m in layers if m.D.requires_grad and
                   (m.D.grad is None or not bool(m.D.grad.abs().sum() > 0))]
        row['no_grad'] = len(missing)
        row['zero_w'] = sum(not bool(m.weight.abs().sum() > 0) for m in missing)
        row['no_grad_w'] = sum(m.weight.grad is None or not bool(m.weight.grad.abs().sum() > 0)
                               for m in missing)  # the layer's output never reached the loss
        stage = 'fold'
        model.eval()
        row['layer_rel'] = layer_fold_error(model, zoo, size)
        folded = fold_doconv(model)
        assert not any(isinstance(m, DOConv2d) for m in folded.modules()), 'DO-Conv left'
        try:
            want = outputs(zoo, model, size, features=False)
            row['rel'] = _relative(outputs(zoo, folded, size, features=False), want)
            random = _relative(outputs(zoo, model, size, features=False), want) > FOLD_RTOL
        except Exception as error:  # noqa: BLE001  (e.g. a detector without tensor mode)
            if zoo == 'mmpretrain':
                raise
            row['rel'], random = float('inf'), False
            row['status'] = f'no whole-model output ({_first_line(error)[:60]})'
        if row['rel'] <= FOLD_RTOL:
            row['status'] = 'ok'
        elif zoo == 'mmpretrain':  # features are the whole comparison already
            row['status'] = ('random in eval (the model differs from itself)' if random else
                             'outputs differ after the fold' + (
                                 ' (top-k selection of near-ties); every layer folds exactly'
                                 if row['layer_rel'] <= LAYER_RTOL else ''))
        else:
            if random:
                row['status'] = 'random in eval (the model differs from itself)'
            elif not row['status']:
                row['status'] = 'outputs differ after the fold (top-k selection of near-ties)'
            row['rel'] = _relative(outputs(zoo, folded, size, True),
                                   outputs(zoo, model, size, True))
            row['status'] += ('; features ok' if row['rel'] <= FOLD_RTOL else
                              '; **features differ**')
    except Exception as error:  # noqa: BLE001  (one family's failure is a result, not a stop)
        row['status'] = f'failed at {stage}: {_first_line(error)}'
        if stage not in ('build', 'convert'):
            row['status'] += _retry_plain(zoo, source, size, rng, with_masks)
        elif os.environ.get('ZOO_SWEEP_TRACEBACK'):
            traceback.print_exc()
    finally:
        row['seconds'] = time.time() - t0
    return row


def random_states() -> tuple:
    """torch's, numpy's and Python's random states (mmdet's samplers draw from all three)."""
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def set_random_states(states: tuple) -> None:
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


def _retry_plain(zoo: str, source: str, size: int, rng: Optional[tuple],
                 with_masks: bool) -> str:
    """The same steps without DO-Conv, the training step from the same random state (random-
    init DETR matchers, for one, fail on some draws whatever the convs)."""
    try:
        model = prepare(build(zoo, source))
        if rng is not None:
            set_random_states(rng)
        train_pass(zoo, model, size, with_masks)
        model.eval()
        outputs(zoo, model, size, features=False)
    except Exception:  # noqa: BLE001
        return ' (fails without DO-Conv too: the sweep\'s input, not DO-Conv)'
    return ' (**passes without DO-Conv**)'


def _kind(status: str) -> str:
    """The summary class of a result."""
    if status.startswith('failed at build') or status.startswith('failed at convert'):
        return 'failed to build (before any DO-Conv)'
    if 'fails without DO-Conv too' in status:
        return 'failed, and without DO-Conv too (the sweep\'s input)'
    if status.startswith('failed'):
        return '**failed with DO-Conv only**'
    return status.split(';')[0].split(' (')[0]


def main(argv=None):
    args = parse_args(argv)
    device = setup_run(args)
    if device.type != 'cpu':
        raise SystemExit('zoo_sweep runs on the CPU (--device cpu).')
    import do_conv_mm  # noqa: F401  (registers DOConv)
    from mmengine.logging import MMLogger
    # Uninitialised memory reads NaN (torch fills torch.empty & co. in deterministic mode): a
    # model that reads it (DINO's random-init training does, upstream) then fails every time,
    # with or without DO-Conv, instead of passing or failing by what the heap held before.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    MMLogger.get_current_instance().setLevel('ERROR')
    size = args.size or dict(mmdet=256, mmseg=128, mmpretrain=224)[args.zoo]
    models = zoo_models(args.zoo, args.families)
    rows: List[List[object]] = []
    counts: Dict[str, int] = {}
    for family, source in models.items():
        row = sweep_one(args.zoo, source,
                        size if args.size else SIZE_OVERRIDES.get((args.zoo, family), size))
        name = osp.basename(source)
        rel = '–' if row['rel'] is None else f'{row["rel"]:.1e}'
        layer_rel = '–' if row['layer_rel'] is None else f'{row["layer_rel"]:.1e}'
        notes = [f'{row["zero_w"]} zero-init W'] if row['zero_w'] else []
        if row['no_grad_w']:
            notes.append(f'{row["no_grad_w"]} whose W got none either')
        no_grad = str(row['no_grad']) + (f' ({"; ".join(notes)})' if notes else '')
        rows.append([family, f'`{name}`', row['doconv'], no_grad, layer_rel, rel,
                     row['status'], f'{row["seconds"]:.0f}'])
        counts[_kind(row['status'])] = counts.get(_kind(row['status']), 0) + 1
        print(f'{family:22s} {row["status"]:60.60s} doconv={row["doconv"]:4d} '
              f'no_grad={no_grad} layer={layer_rel} rel={rel} {row["seconds"]:.0f}s',
              flush=True)
    summary = ', '.join(f'{n} {k}' for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    skipped = dict(mmdet=MMDET_SKIP, mmseg=MMSEG_SKIP, mmpretrain=MMPRETRAIN_SKIP)[args.zoo]
    sections = [
        f'{len(models)} {args.zoo} families, one model each, input {size}×{size}'
        + ''.join(f' ({f}: {n}×{n})' for (z, f), n in SIZE_OVERRIDES.items()
                  if z == args.zoo and f in models and not args.size)
        + f', CPU: {summary}.',
        'Columns: DO-Conv k×k layers after `convert_to_doconv(model)`; trainable D without a '
        'gradient after one training step (and how many of those sit on a zero-initialised W, '
        'where dL/dD = 0 until W moves, or had no gradient for W either: a layer whose output '
        'did not reach this batch\'s loss, such as a head level without positives); per '
        'layer, the largest relative difference between a '
        f'DO-Conv layer\'s output and its fold\'s on the input it received (tolerance '
        f'{LAYER_RTOL:g}); for the model, the largest relative difference between the DO-Conv '
        f'model and its fold (whole eval output, or backbone + neck features where noted; '
        f'tolerance {FOLD_RTOL:g}).',
        md_table(['family', 'model', 'DO-Conv k×k', 'no-grad D', 'layer fold diff',
                  'model fold diff', 'result', 's'], rows),
        '## Setup\n\n' + '\n'.join([f'- Command: {command_line(sys.argv)}'] +
                                   environment_lines(args, device)) +
        f'\n- Not swept (dataset variants, video, multimodal or language-grounded, teacher-'
        f'student, wrappers, builds that download weights, configs with fixed input sizes): '
        f'{", ".join(sorted(skipped))}',
    ]
    name = f'zoo_sweep_{args.zoo}' + ('_' + '_'.join(args.families) if args.families else '')
    write_markdown(osp.join(args.out_dir, f'{name}.md'),
                   f'DO-Conv across the {args.zoo} model zoo', sections)


if __name__ == '__main__':
    main()
