"""End-to-end training through mmengine's Runner and our tools, on the bundled toy data.

Tiny settings throughout (4 training images, batch 2, a handful of iterations; constant LR so a
few steps visibly lower the loss). One trained work dir per task is shared by the resume and test
checks (module-scoped fixtures). Tools run as subprocesses, as a user runs them.
"""
import json
import logging
import math
import os.path as osp
import pickle
import shutil
import struct
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')

import do_conv_mm  # noqa: E402,F401
from do_conv_mm import CheckpointError, allow_mmengine_checkpoint_types, load_checkpoint_file  # noqa: E402
from do_conv_mm.checkpoint import safe_torch_load  # noqa: E402
from training_helpers import (REPO, free_port, logged_scalars, run, run_tool,  # noqa: E402
                              tool_env, train_losses)



def _toy_doconv_config(name, scope):
    """configs/toy/<name>, a DO-Conv toy config of ``scope``."""
    from mmengine.config import Config
    path = osp.join(REPO, 'configs', 'toy', name)
    assert Config.fromfile(path).get('default_scope') == scope, path
    return path


DET_CFG = _toy_doconv_config('retinanet_r18-tiny-doconv_fpn_toy.py', 'mmdet')
SEG_CFG = _toy_doconv_config('fpn_r18-tiny-doconv_toy.py', 'mmseg')

# Overrides that make each toy config a seconds-long run: 4 images, batch 2, no warm-up, raw
# per-iteration losses in the log (window 1). Evaluation uses 4 val images.
TINY_COMMON = """
train_dataloader = dict(batch_size=2, dataset=dict(indices=4))
val_dataloader = dict(batch_size=2, dataset=dict(indices=4))
test_dataloader = dict(batch_size=2, dataset=dict(indices=4))
param_scheduler = []
log_processor = dict(window_size=1)
"""
NO_VAL = ('val_cfg=None', 'val_dataloader=None', 'val_evaluator=None')  # --cfg-options: skip val
TINY_DET = f"""_base_ = {DET_CFG!r}
{TINY_COMMON}
# 2 iterations per epoch: 4 epochs = 8 iterations, checkpoints at epochs 2 and 4.
train_cfg = dict(max_epochs=4, val_interval=4)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
"""
TINY_SEG = f"""_base_ = {SEG_CFG!r}
{TINY_COMMON}
train_cfg = dict(max_iters=8, val_interval=8)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=4))
"""


def _write_config(directory, name, text):
    path = osp.join(str(directory), name)
    with open(path, 'w') as f:
        f.write(text)
    return path


@pytest.fixture(scope='module')
def toy_configs(tmp_path_factory):
    from mmengine.config import Config
    from do_conv_mm.toy_data import ensure_toy_data_for_config
    directory = tmp_path_factory.mktemp('configs')
    det = _write_config(directory, 'tiny_det.py', TINY_DET)
    seg = _write_config(directory, 'tiny_seg.py', TINY_SEG)
    ensure_toy_data_for_config(Config.fromfile(det))  # generated once, before any subprocess
    return dict(det=det, seg=seg)


@pytest.fixture(scope='module')
def det_run(toy_configs, tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('det') / 'work')
    run_tool('train.py', toy_configs['det'], '--work-dir', work_dir)
    return work_dir


@pytest.fixture(scope='module')
def seg_run(toy_configs, tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('seg') / 'work')
    run_tool('train.py', toy_configs['seg'], '--work-dir', work_dir)
    return work_dir


def _assert_loss_decreases(work_dir, iters):
    losses = train_losses(work_dir)
    assert [i for i, _ in losses] == list(range(1, iters + 1))
    assert all(math.isfinite(v) for _, v in losses)
    first, last = losses[0][1], losses[-1][1]
    # Same 4 images every epoch, constant LR: 8 AdamW steps lower the loss clearly (> 5 %).
    assert last < 0.95 * first, losses


# ----------------------------------------------------------------------------------------------
# Detection (mmdet RetinaNet, DO-Conv backbone/neck/head convs)
# ----------------------------------------------------------------------------------------------
def test_detection_trains_and_writes_checkpoints(det_run):
    _assert_loss_decreases(det_run, iters=8)
    for name in ('epoch_2.pth', 'epoch_4.pth'):
        assert osp.isfile(osp.join(det_run, name))
    checkpoint = load_checkpoint_file(osp.join(det_run, 'epoch_4.pth'))
    assert checkpoint['meta']['epoch'] == 4 and checkpoint['meta']['iter'] == 8
    assert any(k.endswith('.D') for k in checkpoint['state_dict'])
    val = [r for r in logged_scalars(det_run) if 'coco/bbox_mAP' in r]
    assert len(val) == 1 and 0.0 <= val[0]['coco/bbox_mAP'] <= 1.0


def test_detection_resume_continues(det_run, toy_configs, tmp_path):
    work_dir = str(tmp_path / 'work')
    shutil.copytree(det_run, work_dir)
    proc = run_tool('train.py', toy_configs['det'], '--work-dir', work_dir, '--resume',
                    '--cfg-options', 'train_cfg.max_epochs=6', *NO_VAL)
    assert 'resumed epoch: 4, iter: 8' in proc.stdout + proc.stderr
    checkpoint = load_checkpoint_file(osp.join(work_dir, 'epoch_6.pth'))
    assert checkpoint['meta']['epoch'] == 6 and checkpoint['meta']['iter'] == 12
    # The resumed run logged iterations 9..12 only: the counter continued.
    resumed = [i for i, _ in train_losses(work_dir)][8:]
    assert resumed == [9, 10, 11, 12]


def test_resume_from_a_weights_only_checkpoint_says_to_use_load_from(det_run, toy_configs,
                                                                      tmp_path):
    """--resume needs the training state; mmengine died in a 400-line KeyError ('message_hub')."""
    weights = tmp_path / 'weights.pth'
    torch.save({'state_dict': load_checkpoint_file(osp.join(det_run, 'epoch_4.pth'))['state_dict']},
               weights)
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'train.py'), toy_configs['det'],
                           '--work-dir', str(tmp_path / 'work'), '--resume', str(weights)],
                          capture_output=True, text=True, timeout=300, env=tool_env())
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and 'is not a training checkpoint' in last, last
    assert f'--cfg-options load_from={weights}' in last and 'Traceback' not in proc.stderr


def test_detection_test_tool_reports_metric(det_run, toy_configs, tmp_path):
    work_dir = str(tmp_path / 'test')
    out = str(tmp_path / 'preds.pkl')
    run_tool('test.py', toy_configs['det'], osp.join(det_run, 'epoch_4.pth'),
             '--work-dir', work_dir, '--out', out)
    with open(osp.join(work_dir, 'test_metrics.json')) as f:
        import json
        metrics = json.load(f)['metrics']
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0
    with open(out, 'rb') as f:
        predictions = pickle.load(f)
    assert len(predictions) == 4 and 'pred_instances' in predictions[0]


TTA = """
tta_model = dict(type='DetTTAModel',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
_test = _base_.test_dataloader.dataset.pipeline
tta_pipeline = [
    _test[0],
    dict(type='TestTimeAug', transforms=[
        [_test[1]],
        [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
        [_test[2]],
        [dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                               'scale_factor', 'flip', 'flip_direction'))]])]
"""


def test_detection_test_tool_tta(det_run, seg_run, toy_configs, tmp_path):
    """--tta as mmdet's test tool: the DO-Conv detector wrapped in the config's DetTTAModel
    (flip and no flip, merged) predicts every image, and its merged boxes differ from the plain
    test's; without tta_model / tta_pipeline, mmdet's default flip TTA (with a warning, as
    mmdet's tool) gives the same predictions as that config; an mmseg config without them is
    refused in one line (mmseg's tool has no default). The checkpoint must fit the model inside
    the TTA wrapper: D the config would drop is refused under --tta too."""
    checkpoint = osp.join(det_run, 'epoch_4.pth')
    with pytest.raises(AssertionError, match="error: --tta needs tta_model and tta_pipeline in "
                                             "the config \\(there is no default for default_scope "
                                             "'mmseg'\\)"):
        run_tool('test.py', toy_configs['seg'], osp.join(seg_run, 'iter_8.pth'), '--tta',
                 '--work-dir', str(tmp_path / 'none'))
    config = _write_config(tmp_path, 'tta.py', f"_base_ = {toy_configs['det']!r}\n{TTA}")
    predictions = {}
    for mode, config_path, extra in (('plain', config, ()), ('tta', config, ('--tta', )),
                                     ('default tta', toy_configs['det'], ('--tta', ))):
        out = str(tmp_path / f'{mode}.pkl')
        proc = run_tool('test.py', config_path, checkpoint, *extra, '--work-dir',
                        str(tmp_path / mode), '--out', out)
        assert ('--tta: the config has no tta_model / tta_pipeline; using mmdet' in
                proc.stdout + proc.stderr) == (mode == 'default tta')
        with open(out, 'rb') as f:
            predictions[mode] = pickle.load(f)
        with open(osp.join(tmp_path, mode, 'test_metrics.json')) as f:
            assert 0.0 <= json.load(f)['metrics']['coco/bbox_mAP'] <= 1.0
    assert len(predictions['tta']) == len(predictions['plain']) == 4
    assert any(not torch.equal(torch.as_tensor(t['pred_instances']['bboxes']),
                               torch.as_tensor(p['pred_instances']['bboxes']))
               for t, p in zip(predictions['tta'], predictions['plain']))
    for t, d in zip(predictions['tta'], predictions['default tta']):  # the same flip TTA
        torch.testing.assert_close(torch.as_tensor(d['pred_instances']['bboxes']),
                                   torch.as_tensor(t['pred_instances']['bboxes']))
    partial = _write_config(tmp_path, 'partial.py',
                            f"_base_ = {config!r}\nmodel = dict(neck=dict(conv_cfg=None), "
                            f"bbox_head=dict(conv_cfg=None))\n")
    with pytest.raises(AssertionError, match="does not fit the model of this config: it has "
                                             "DO-Conv parameters where this config builds plain"):
        run_tool('test.py', partial, checkpoint, '--tta', '--work-dir', str(tmp_path / 'partial'))


def test_tta_pipeline_goes_into_the_wrapped_test_dataset(toy_configs):
    """--tta replaces the pipeline of the dataset that has one: inside RepeatDataset /
    ClassBalancedDataset wrappers (mmdet's tool writes it onto the wrapper, which then fails to
    build); a ConcatDataset, one pipeline per part, is refused in one line."""
    import importlib.util

    from mmengine.config import Config
    spec = importlib.util.spec_from_file_location('test_tool', osp.join(REPO, 'tools', 'test.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = Config.fromfile(toy_configs['det'])
    inner = cfg.test_dataloader.dataset
    cfg.test_dataloader.dataset = dict(type='RepeatDataset', times=1, dataset=inner)
    tool.enable_tta(cfg)
    wrapper = cfg.test_dataloader.dataset
    assert 'pipeline' not in wrapper and wrapper.dataset.pipeline == cfg.tta_pipeline
    assert cfg.tta_pipeline[-1]['type'] == 'TestTimeAug'
    cfg = Config.fromfile(toy_configs['det'])
    cfg.test_dataloader.dataset = dict(type='ConcatDataset', datasets=[inner, inner])
    with pytest.raises(tool.ToolError, match=r"--tta: the test dataset \(ConcatDataset\) has no "
                                             r"single pipeline to replace"):
        tool.enable_tta(cfg)


# ----------------------------------------------------------------------------------------------
# Segmentation (the mmseg toy segmentor, DO-Conv backbone/neck/head convs)
# ----------------------------------------------------------------------------------------------
def test_segmentation_trains_and_writes_checkpoints(seg_run):
    _assert_loss_decreases(seg_run, iters=8)
    checkpoint = load_checkpoint_file(osp.join(seg_run, 'iter_8.pth'))
    assert checkpoint['meta']['iter'] == 8
    assert osp.isfile(osp.join(seg_run, 'iter_4.pth'))
    val = [r for r in logged_scalars(seg_run) if 'mIoU' in r]
    assert len(val) == 1 and 0.0 <= val[0]['mIoU'] <= 100.0


def test_segmentation_resume_from_given_checkpoint(seg_run, toy_configs, tmp_path):
    work_dir = str(tmp_path / 'work')
    proc = run_tool('train.py', toy_configs['seg'], '--work-dir', work_dir,
                    '--resume', osp.join(seg_run, 'iter_8.pth'),
                    '--cfg-options', 'train_cfg.max_iters=10', *NO_VAL)
    assert 'resumed epoch: 0, iter: 8' in proc.stdout + proc.stderr
    assert [i for i, _ in train_losses(work_dir)] == [9, 10]
    assert load_checkpoint_file(osp.join(work_dir, 'iter_10.pth'))['meta']['iter'] == 10


def test_segmentation_test_tool_reports_metric(seg_run, toy_configs, tmp_path):
    import json
    work_dir = str(tmp_path / 'test')
    run_tool('test.py', toy_configs['seg'], osp.join(seg_run, 'iter_8.pth'),
             '--work-dir', work_dir)
    with open(osp.join(work_dir, 'test_metrics.json')) as f:
        metrics = json.load(f)['metrics']
    assert 0.0 <= metrics['mIoU'] <= 100.0


# ----------------------------------------------------------------------------------------------
# Distributed (2 CPU processes, gloo, through tools/dist_train.sh and mmengine's Runner)
# ----------------------------------------------------------------------------------------------
def test_distributed_two_processes_keep_doconv_parameters_identical(toy_configs, tmp_path):
    # SyncBN, as in the shipped mmseg configs: on CPU the tools make it BN (with a warning).
    config = _write_config(tmp_path, 'dist_seg.py', f"""_base_ = {toy_configs['seg']!r}
custom_imports = dict(imports=['do_conv_mm', 'training_helpers'], allow_failed_imports=False)
custom_hooks = [dict(type='DOConvParamDumpHook')]
model = dict(backbone=dict(norm_cfg=dict(type='SyncBN', requires_grad=True)),
             decode_head=dict(norm_cfg=dict(type='SyncBN', requires_grad=True)))
train_cfg = dict(max_iters=3, val_interval=100)
val_cfg = None
val_dataloader = None
val_evaluator = None
default_hooks = dict(checkpoint=dict(interval=3))
""")
    work_dir = str(tmp_path / 'work')
    proc = run(['bash', 'tools/dist_train.sh', config, '2', '--work-dir', work_dir], threads=1,
               env_extra=dict(PORT=str(free_port())))
    assert 'SyncBN needs GPUs, so the 2 SyncBN norm_cfg(s) of the model' in proc.stdout + \
        proc.stderr
    load = lambda rank, tag: torch.load(  # noqa: E731
        osp.join(work_dir, f'doconv_params_rank{rank}_{tag}.pth'), weights_only=True)
    final0, final1, init0 = load(0, 'final'), load(1, 'final'), load(0, 'init')
    assert len(final0) >= 2 * 20  # D and weight of every k×k DOConv (ResNetV1c-18 alone has 19)
    assert final0.keys() == final1.keys() == init0.keys()
    for name in final0:
        # DDP all-reduces gradients and both ranks step the same optimizer: bit-identical.
        assert torch.equal(final0[name], final1[name]), name
        assert not torch.equal(final0[name], init0[name]), f'{name} did not train'
    assert all(init0[n].abs().max() == 0 for n in init0 if n.endswith('.D'))  # D starts at 0
    assert osp.isfile(osp.join(work_dir, 'iter_3.pth'))


# ----------------------------------------------------------------------------------------------
# Mixed precision (bfloat16 autocast on CPU)
# ----------------------------------------------------------------------------------------------
def test_bf16_optim_wrapper_runs_forward_in_bfloat16_and_keeps_fp32_params():
    from do_conv_mm import BF16AmpOptimWrapper, DOConv2d
    from do_conv_mm.composition import autocast_dtype
    torch.manual_seed(0)
    model = torch.nn.Sequential(DOConv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                DOConv2d(4, 2, 3, padding=1))
    wrapper = BF16AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    with wrapper.optim_context(model):
        out = model(torch.randn(2, 3, 8, 8))
        assert autocast_dtype('cpu') == torch.bfloat16
    assert out.dtype == torch.bfloat16
    wrapper.update_params(out.float().square().mean())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_amp_flag_trains_detector_with_bf16_on_cpu(toy_configs, tmp_path):
    work_dir = str(tmp_path / 'work')
    proc = run_tool('train.py', toy_configs['det'], '--amp', '--work-dir', work_dir,
                    '--cfg-options', 'train_cfg.max_epochs=1',
                    'default_hooks.checkpoint.interval=1', *NO_VAL)
    assert 'bfloat16 CPU autocast' in proc.stdout + proc.stderr
    losses = train_losses(work_dir)
    assert len(losses) == 2 and all(math.isfinite(v) for _, v in losses)
    checkpoint = load_checkpoint_file(osp.join(work_dir, 'epoch_1.pth'))
    assert all(v.dtype == torch.float32 for k, v in checkpoint['state_dict'].items()
               if k.endswith(('.D', '.weight')))


def test_bf16_reaches_mmcv_ops_as_float32():
    """mmcv's compiled ops have no bfloat16 kernels: under BF16AmpOptimWrapper they compute in
    float32 (NMS keeps the same boxes, RoIAlign the same features, gradients flow back)."""
    from mmcv.ops import RoIAlign, batched_nms, nms
    from do_conv_mm import BF16AmpOptimWrapper
    BF16AmpOptimWrapper(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 20], dim=1)
    scores = torch.rand(50, generator=g)
    expected = nms(boxes.bfloat16().float(), scores.bfloat16().float(), 0.5)[1]
    _, keep = nms(boxes.bfloat16(), scores.bfloat16(), 0.5)
    assert torch.equal(keep, expected)
    _, keep = batched_nms(boxes.bfloat16(), scores.bfloat16(), torch.zeros(50, dtype=torch.long),
                          dict(type='nms', iou_threshold=0.5))
    assert torch.equal(keep, expected)
    feats = torch.randn(1, 4, 16, 16, generator=g).bfloat16().requires_grad_()
    rois = torch.tensor([[0., 1., 1., 9., 9.], [0., 4., 2., 15., 12.]])
    align = RoIAlign((3, 3), spatial_scale=1.0, sampling_ratio=2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = align(feats, rois.bfloat16())
    assert out.dtype == torch.bfloat16  # computed in float32, returned in the caller's dtype
    leaf = feats.detach().float().requires_grad_()
    reference = align(leaf, rois.bfloat16().float())
    assert torch.equal(out, reference.bfloat16())
    out.float().square().sum().backward()
    reference.bfloat16().float().square().sum().backward()
    assert feats.grad.dtype == torch.bfloat16 and feats.grad.abs().sum() > 0
    assert torch.equal(feats.grad, leaf.grad.bfloat16())


# A Mask R-CNN from the shipped DO-Conv config, shrunk to the toy data (ResNet-18, 32-channel
# FPN/heads, 128 px, 3 classes, masks from the toy polygons): the path mmcv's NMS and RoIAlign take.
TINY_MASK_RCNN = """_base_ = {base!r}
toy_data_root = {root!r}
data_root = toy_data_root + '/coco/'
classes = ('circle', 'square', 'triangle')
model = dict(
    backbone=dict(depth=18, init_cfg=None, frozen_stages=-1),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=3),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32, num_classes=3)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='PackDetInputs')
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), indices=4,
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                 pipeline=train_pipeline))
train_cfg = dict(max_epochs=1)
val_cfg = None
val_dataloader = None
val_evaluator = None
param_scheduler = []
log_processor = dict(window_size=1)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
"""


def test_amp_flag_trains_mask_rcnn_with_bf16_on_cpu(toy_configs, tmp_path):
    """--amp on CPU for a two-stage detector with masks: mmcv's NMS and RoIAlign under bf16."""
    config = _write_config(tmp_path, 'mask_rcnn.py', TINY_MASK_RCNN.format(
        base=osp.join(REPO, 'configs', 'mmdet', 'mask-rcnn_r50-doconv_fpn_1x_coco.py'),
        root=osp.join(REPO, 'data', 'toy')))
    work_dir = str(tmp_path / 'work')
    proc = run_tool('train.py', config, '--amp', '--work-dir', work_dir)
    assert 'bfloat16 CPU autocast' in proc.stdout + proc.stderr
    records = [r for r in logged_scalars(work_dir) if 'loss' in r]
    assert [r['iter'] for r in records] == [1, 2]
    assert all(math.isfinite(r[k]) for r in records for k in ('loss', 'loss_mask', 'loss_rpn_cls'))
    checkpoint = load_checkpoint_file(osp.join(work_dir, 'epoch_1.pth'))
    assert checkpoint['state_dict']['rpn_head.rpn_conv.D'].dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Warm start from a plain checkpoint through init_cfg=Pretrained
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('scope, backbone', [
    ('mmdet', dict(type='ResNet', depth=18, stem_channels=16, base_channels=16)),
    ('mmseg', dict(type='ResNetV1c', depth=18, stem_channels=16, base_channels=16,
                   dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=True)),
])
def test_warm_start_backbone_from_plain_checkpoint_via_init_cfg(scope, backbone, tmp_path):
    import importlib
    from mmengine.registry import DefaultScope
    models = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        _check_warm_start(models, backbone, str(tmp_path / 'plain_backbone.pth'))


def _check_warm_start(models, backbone, path):
    from do_conv_mm import DOConv2d, count_doconv
    torch.manual_seed(0)
    plain = models.build(dict(backbone))
    plain.init_weights()
    for m in plain.modules():  # non-trivial BN statistics, so they must load too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save({'state_dict': plain.state_dict()}, path)

    doconv = models.build(dict(backbone, conv_cfg=dict(type='DOConv'),
                               init_cfg=dict(type='Pretrained', checkpoint=path)))
    doconv.init_weights()
    assert count_doconv(doconv) >= 17  # stem + basic blocks' 3×3 convs
    assert all(m.D is None or m.D.abs().max() == 0
               for m in doconv.modules() if isinstance(m, DOConv2d))
    plain.eval()
    doconv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = plain(x), doconv(x)
    # D = 0 composes to exactly the plain kernel (weight + 0), so outputs are bit-identical.
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))


# ----------------------------------------------------------------------------------------------
# Safe checkpoint loading
# ----------------------------------------------------------------------------------------------
TORCH_HAS_ALLOW_LIST = hasattr(torch.serialization, 'add_safe_globals')  # torch >= 2.4
TORCH_LOADS_WEIGHTS_ONLY = tuple(int(v) for v in torch.__version__.split('.')[:2]) >= (2, 6)


@pytest.fixture(params=['weights_only', 'restricted_pickle'])
def safe_loader(request, monkeypatch):
    """Each safe loader of load_checkpoint_file: torch's weights-only one with the allow-list
    (torch >= 2.4), and the restricted unpickler that torch < 2.4 gets (forced here by hiding
    add_safe_globals, so this torch tests it too)."""
    if request.param == 'weights_only' and not TORCH_HAS_ALLOW_LIST:
        pytest.skip('torch < 2.4 has no allow-list; the restricted unpickler serves it')
    if request.param == 'restricted_pickle':
        monkeypatch.delattr(torch.serialization, 'add_safe_globals', raising=False)
    return request.param


@pytest.mark.skipif(not TORCH_LOADS_WEIGHTS_ONLY,
                    reason='torch < 2.6 loads full checkpoints without weights_only by default')
def test_full_training_checkpoint_needs_the_allow_list(det_run):
    path = osp.join(det_run, 'epoch_2.pth')
    bare = subprocess.run(
        [sys.executable, '-c', f'import torch; torch.load({path!r})'],
        capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and 'Weights only load failed' in bare.stderr
    checkpoint = torch.load(path, weights_only=True)  # this process imported do_conv_mm
    history = checkpoint['message_hub']['log_scalars']['train/loss']
    assert history.mean() > 0  # HistoryBuffer restored with its statistics methods


def test_both_safe_loaders_restore_a_full_training_checkpoint(det_run, safe_loader):
    path = osp.join(det_run, 'epoch_2.pth')
    checkpoint = safe_torch_load(path)
    history = checkpoint['message_hub']['log_scalars']['train/loss']
    assert history.mean() > 0  # HistoryBuffer restored with its statistics methods
    full = torch.load(path, weights_only=False)  # trusted here: our own file
    for key, value in full['state_dict'].items():
        assert torch.equal(checkpoint['state_dict'][key], value), key


@pytest.mark.skipif(not TORCH_HAS_ALLOW_LIST, reason='torch < 2.4 has no allow-list to extend')
def test_allow_list_is_idempotent():
    allow_mmengine_checkpoint_types()
    count = len(torch.serialization.get_safe_globals())
    allow_mmengine_checkpoint_types()
    assert len(torch.serialization.get_safe_globals()) == count


class _RunsCode:
    """Unpickling this would run code (it creates a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f'open({self.marker!r}, "w").close()',))


class _Foreign:
    pass


def _history_getattr_exploit():
    from mmengine.logging import HistoryBuffer

    class Exploit:
        def __reduce__(self):
            return (getattr, (HistoryBuffer, '__init__'))
    return Exploit()


def test_load_checkpoint_file_good_and_bad_inputs(det_run, tmp_path, safe_loader):
    good = osp.join(det_run, 'epoch_2.pth')
    assert {'meta', 'state_dict', 'message_hub', 'optimizer'} <= set(load_checkpoint_file(good))

    def error(path):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint_file(path)
        return str(info.value)

    assert 'does not exist' in error(tmp_path / 'missing.pth')
    message = error(det_run)
    assert 'is a directory' in message and 'epoch_2.pth' in message and 'pass the .pth' in message
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint\n')
    assert 'is not a torch checkpoint' in error(text)
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    assert 'is empty' in error(empty)
    truncated = tmp_path / 'truncated.pth'
    with open(good, 'rb') as f:
        truncated.write_bytes(f.read()[:4096])
    assert 'truncated or corrupt' in error(truncated)
    flipped = tmp_path / 'flipped.pth'  # bytes flipped inside tensor data: torch.load takes it
    torch.save({'state_dict': {'w': torch.randn(256, 256)}}, flipped)
    data = bytearray(flipped.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    flipped.write_bytes(bytes(data))
    assert "fails its CRC check" in error(flipped)
    plain_pickle = tmp_path / 'plain.pkl'
    plain_pickle.write_bytes(pickle.dumps({'w': [1.0]}, protocol=4))
    assert 'is a Python pickle (pickle.dump), not a torch checkpoint' in error(plain_pickle)
    header = json.dumps({'w': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4]}}).encode()
    safetensors = tmp_path / 'model.safetensors'
    safetensors.write_bytes(struct.pack('<Q', len(header)) + header + bytes(4))
    assert 'is a safetensors file' in error(safetensors)
    try:
        from torch.utils.serialization import config as serialization_config
    except ImportError:  # torch < 2.5 always writes CRCs
        serialization_config = None
    if serialization_config is not None:  # records saved without CRCs (CRC 0) load
        no_crc = tmp_path / 'no_crc.pth'
        serialization_config.save.compute_crc32 = False
        try:
            torch.save({'w': torch.ones(3)}, no_crc)
        finally:
            serialization_config.save.compute_crc32 = True
        assert torch.equal(load_checkpoint_file(no_crc)['w'], torch.ones(3))
    legacy = tmp_path / 'legacy.pth'  # torch's pre-1.6 format still loads
    torch.save({'w': torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint_file(legacy)['w'], torch.ones(1))
    tensor = tmp_path / 'tensor.pth'
    torch.save(torch.ones(2), tensor)
    assert 'holds a Tensor, not a dict' in error(tensor)

    marker = tmp_path / 'code_ran'
    unsafe = tmp_path / 'unsafe.pth'
    torch.save({'state_dict': {}, 'x': _RunsCode(str(marker))}, unsafe)
    message = error(unsafe)
    assert 'Refused' in message and 'the global exec' in message
    assert 'nothing from the file was executed' in message
    assert not marker.exists()
    foreign = tmp_path / 'foreign.pth'
    torch.save({'x': _Foreign()}, foreign)
    assert f'{__name__}._Foreign' in error(foreign)
    exploit = tmp_path / 'getattr.pth'
    torch.save({'x': _history_getattr_exploit()}, exploit)
    assert "getattr(HistoryBuffer, '__init__')" in error(exploit)


def test_test_tool_reports_bad_checkpoint_in_one_line(toy_configs, tmp_path):
    text = tmp_path / 'notes.txt'
    text.write_text('hello')
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'test.py'),
                           toy_configs['seg'], str(text)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith('error: ')
    assert 'is not a torch checkpoint' in proc.stderr and 'Traceback' not in proc.stderr


def test_test_tool_refuses_a_checkpoint_that_does_not_fit_the_config(det_run, seg_run,
                                                                     toy_configs, tmp_path):
    """mmengine loads non-strictly: another model's checkpoint (weights left random), DO-Conv D
    where the config builds plain convs (D dropped) and another D_mul (D and the extra columns
    not loaded) would be evaluated without an error. One line each, naming the keys."""
    detector = osp.join(det_run, 'epoch_4.pth')
    cases = [
        ([toy_configs['det'], osp.join(seg_run, 'iter_8.pth')], 'it lacks'),
        ([toy_configs['det'], detector, '--cfg-options', 'model.neck.conv_cfg=None'],
         'DO-Conv parameters where this config builds plain convs, which would be dropped '
         '(neck.fpn_convs.0.conv.D'),
        ([toy_configs['det'], detector, '--cfg-options', 'model.neck.conv_cfg.D_mul=12'],
         'another D_mul'),
    ]
    for args, expected in cases:
        proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'test.py'), *args,
                               '--work-dir', str(tmp_path / 'work')], capture_output=True,
                              text=True, timeout=300, env=tool_env())
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith('error: ') and 'does not fit the model' in last, last
        assert expected in last, last
    assert not (tmp_path / 'work' / 'test_metrics.json').exists()
    # --out on the checkpoint itself (a checkpoint named .pkl) is refused, the file kept.
    as_pkl = tmp_path / 'model.pkl'
    as_pkl.write_bytes(open(detector, 'rb').read())
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'test.py'), toy_configs['det'],
                           str(as_pkl), '--out', str(as_pkl), '--work-dir', str(tmp_path / 'w')],
                          capture_output=True, text=True, timeout=300, env=tool_env())
    assert proc.returncode != 0 and 'is the input' in proc.stderr.strip().splitlines()[-1]
    assert as_pkl.read_bytes() == open(detector, 'rb').read()


def test_train_tool_reports_dcn_with_doconv_in_one_line(tmp_path):
    """DO-Conv asked for on DCN blocks: the tool names the component and the fix, no trace."""
    config = tmp_path / 'dcn.py'
    config.write_text(
        f"_base_ = "
        f"{osp.join(REPO, 'configs', 'mmdet', 'faster-rcnn_r50-doconv_fpn_1x_coco.py')!r}\n"
        "model = dict(backbone=dict(dcn=dict(type='DCNv2', deform_groups=1, "
        "fallback_on_stride=False), stage_with_dcn=(False, True, True, True)))\n")
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'train.py'), str(config),
                           '--work-dir', str(tmp_path / 'work')], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: model.backbone (ResNet)') and 'exclude=' in last
    assert not (tmp_path / 'work').exists()


# ----------------------------------------------------------------------------------------------
# The README main command (tools/demo.py), on a tiny budget
# ----------------------------------------------------------------------------------------------
def test_demo_trains_evaluates_folds_and_compares(toy_configs, tmp_path):
    import json
    work_dir = tmp_path / 'demo'
    # 4 images, 2 iterations, no score threshold: detections exist, so COCO metrics are computed.
    proc = run_tool('demo.py', '--work-dir', work_dir, '--cfg-options',
                    'train_cfg.max_epochs=1', 'train_dataloader.batch_size=2',
                    'train_dataloader.dataset.indices=4', 'test_dataloader.dataset.indices=4',
                    'model.test_cfg.score_thr=0.0', timeout=600)
    with open(work_dir / 'demo_summary.json') as f:
        summary = json.load(f)
    assert 0.0 <= summary['doconv']['coco/bbox_mAP'] <= 1.0
    assert 'fold tool not available' not in proc.stdout
    # The folded model must score what the DO-Conv model scores: folding changes outputs by
    # float rounding only (fold --verify bounds it), far below the 1e-3 resolution of COCO mAP.
    assert summary['folded']['coco/bbox_mAP'] == pytest.approx(summary['doconv']['coco/bbox_mAP'],
                                                              abs=1e-3)
    assert summary['max_output_difference'] < 1e-4
    assert 'DO-Conv' in proc.stdout and 'folded' in proc.stdout


def test_train_tool_warns_before_replacing_an_earlier_runs_checkpoints(tmp_path):
    """Training again into a work dir with checkpoints, without --resume, replaces them (as
    mmdet's tool does): the tool says so before it starts, and not when resuming."""
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    sys.path.insert(0, osp.join(REPO, 'tools'))
    try:
        import train as train_tool
    finally:
        sys.path.pop(0)
    (tmp_path / 'epoch_4.pth').write_bytes(b'')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_4.pth'))
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        train_tool.warn_of_an_earlier_run(Config(dict(work_dir=str(tmp_path), resume=True)))
        assert not logged
        train_tool.warn_of_an_earlier_run(Config(dict(work_dir=str(tmp_path), resume=False)))
    finally:
        logger.removeHandler(handler)
    assert len(logged) == 1 and 'earlier run (last: epoch_4.pth)' in logged[0]
    assert 'Pass --resume' in logged[0]


def test_a_config_mistake_at_build_is_one_line(toy_configs, tmp_path):
    """A --cfg-options typo surfaces deep in mmengine's registry (a 380-line traceback): one
    error line with the error's own message; DO_CONV_MM_TRACEBACK=1 gives the traceback."""
    command = [sys.executable, osp.join(REPO, 'tools', 'train.py'), toy_configs['det'],
               '--work-dir', str(tmp_path / 'work'), '--cfg-options', 'model.backbone.depht=18']
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=tool_env())
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: could not build'), last
    assert "unexpected keyword argument 'depht'" in last, last
    env = dict(tool_env(), DO_CONV_MM_TRACEBACK='1')
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and 'Traceback' in proc.stderr


def test_fit_and_resume_checks_accept_what_mmengine_loads_correctly(tmp_path):
    """check_checkpoint_fits: a plain checkpoint into a DO-Conv layer registered under two names
    (RTMDet's shared head convs) is D = 0 at both; check_resumable: a checkpoint saved without
    optimizer state (CheckpointHook(save_optimizer=False)) resumes, one without the message hub
    does not."""
    from do_conv_mm import DOConv2d
    from do_conv_mm.runner_setup import check_checkpoint_fits, check_resumable
    model = torch.nn.Module()
    model.a = model.b = DOConv2d(4, 4, 3, padding=1)
    plain = tmp_path / 'plain.pth'
    torch.save({'state_dict': {f'{name}.{key}': value for name in ('a', 'b') for key, value in
                               torch.nn.Conv2d(4, 4, 3).state_dict().items()}}, plain)
    check_checkpoint_fits(str(plain), model)
    no_optimizer = tmp_path / 'no_optimizer.pth'
    torch.save({'meta': {'epoch': 1, 'iter': 2}, 'state_dict': {}, 'message_hub': {}},
               no_optimizer)
    check_resumable(str(no_optimizer))
    with pytest.raises(CheckpointError, match='no message_hub'):
        check_resumable(str(plain))
