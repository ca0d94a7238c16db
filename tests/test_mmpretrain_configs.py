"""configs/mmpretrain: DO-Conv classifiers built in scope mmpretrain; DOConvModel in that scope.

Every config inherits an mmpretrain model-zoo recipe and only adds DO-Conv to the backbone, so
the model is the stock one with D = 0: given the stock model's state dict it computes the
identical tensor (torch.equal; see tests/test_configs.py for why no tolerance is needed).
"""
import os.path as osp
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

pytest.importorskip('mmpretrain')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope, MODELS  # noqa: E402

import do_conv_mm  # noqa: E402
from do_conv_mm import DOConv2d  # noqa: E402
from test_configs import (REPO, _base_config_path, _build, _config_path,  # noqa: E402
                          _kxk_convs, _plain_keys)
from training_helpers import tool_env  # noqa: E402

# (config, DOConv k×k layers, plain k×k convs left): the README coverage table's numbers.
# ResNet-18/50, ResNeXt-50: 7×7 stem + 16 block 3×3s; ResNetV1c-50: 3×3 deep stem (3) + 16;
# MobileNetV2: 3×3 stem + 17 depthwise 3×3s; CSPNeXt-tiny (mmdet's, RTMDet-tiny's backbone):
# 3×3 stem (3) + 4 stage downsamplings + 4 block conv1 3×3s (by name) + 4 depthwise 5×5s. Every
# EfficientNet-B3: 3×3 stem + 26 depthwise 3×3 / 5×5s, all DOConvAdaptivePadding. Every
# other conv is 1×1; the head is Linear.
MMPRETRAIN = [
    ('mmpretrain/resnet50-doconv_8xb32_in1k.py', 17, 0),
    ('mmpretrain/resnet18-doconv_8xb32_in1k.py', 17, 0),
    ('mmpretrain/resnext50-32x4d-doconv_8xb32_in1k.py', 17, 0),
    ('mmpretrain/mobilenet-v2-doconv_8xb32_in1k.py', 18, 0),
    ('mmpretrain/resnetv1c50-doconv_8xb32_in1k.py', 19, 0),
    ('mmpretrain/cspnext-tiny-doconv_8xb256-rsb-a1-600e_in1k.py', 15, 0),
    ('mmpretrain/efficientnet-b3-doconv_8xb32_in1k.py', 27, 0),
]
IDS = [name.split('/')[1] for name, _, _ in MMPRETRAIN]


def _random_bn_stats(model, seed=0):
    """Non-trivial BN statistics, so equality is not helped by identity normalisation."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)


@pytest.mark.parametrize('name,n_doconv,n_plain', MMPRETRAIN, ids=IDS)
def test_config_builds_in_mmpretrain_with_stated_doconv(name, n_doconv, n_plain):
    cfg = Config.fromfile(_config_path(name))
    assert cfg.custom_imports == dict(imports=['do_conv_mm'], allow_failed_imports=False)
    assert cfg.default_scope == 'mmpretrain'
    model = _build(cfg)
    doconv, plain = _kxk_convs(model)
    assert len(doconv) == n_doconv, doconv
    assert len(plain) == n_plain, plain
    assert all(n.startswith('backbone.') for n in doconv)
    assert type(model).__name__ == 'ImageClassifier'
    assert isinstance(model.head.fc, nn.Linear)
    backbone = model.backbone
    if name.startswith('mmpretrain/resnext'):
        groups = {backbone.get_submodule(n[len('backbone.'):]).groups for n in doconv}
        assert groups == {1, 32}  # the stem, every grouped 3×3
        assert sum(model.get_submodule(n).groups == 32 for n in doconv) == 16
    if name.startswith('mmpretrain/mobilenet'):
        depthwise = [model.get_submodule(n) for n in doconv if model.get_submodule(n).groups > 1]
        assert len(depthwise) == 17
        for conv in depthwise:
            assert conv.groups == conv.in_channels == conv.out_channels
            assert conv.D.shape == (conv.in_channels, 9, 9)  # one 9×9 D per real channel
        assert model.get_submodule(doconv[0]).groups == 1  # the 3×3 stem
    if name.startswith('mmpretrain/efficientnet'):  # TensorFlow 'SAME' padding kept
        assert all(type(model.get_submodule(n)) is do_conv_mm.DOConv2dAdaptivePadding
                   for n in doconv)


@pytest.mark.parametrize('name', [name for name, _, _ in MMPRETRAIN], ids=IDS)
def test_doconv_model_at_d0_equals_stock_model_with_its_checkpoint(name):
    """The stock (plain) state dict strict-loads into the DO-Conv model (missing D = identity)
    and both compute the identical tensor."""
    torch.manual_seed(0)
    stock = _build(Config.fromfile(_base_config_path(name))).eval()
    _random_bn_stats(stock)
    assert not _kxk_convs(stock)[0]
    torch.manual_seed(1)  # different init: everything must come from the checkpoint
    model = _build(Config.fromfile(_config_path(name))).eval()
    assert _plain_keys(model.state_dict()) == list(stock.state_dict())
    model.load_state_dict(stock.state_dict())  # strict
    assert all(torch.count_nonzero(m.D) == 0 for m in model.modules()
               if isinstance(m, DOConv2d) and m.D is not None)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x, mode='tensor'), stock(x, mode='tensor'))


def test_pretrained_backbones_match_the_detection_and_segmentation_backbones():
    """What the config comments promise: the ResNet-50 checkpoint's backbone keys (D included)
    are those of configs/mmdet's R50 backbones; ResNetV1c-50's are mmseg's R50-D8 ones apart
    from the deep stem's naming (stem.N.conv / stem.N.bn = mmseg's stem.3N / stem.3N+1);
    EfficientNet-B3's are the RetinaNet's plus the last 1×1 conv (layers.6)."""
    def backbone_shapes(name, scope=None):
        cfg = Config.fromfile(_config_path(name))
        with DefaultScope.overwrite_default_scope(scope or cfg.default_scope):
            backbone = MODELS.build(cfg.model.backbone)
        return {k: tuple(v.shape) for k, v in backbone.state_dict().items()}

    r50 = backbone_shapes('mmpretrain/resnet50-doconv_8xb32_in1k.py')
    assert r50 == backbone_shapes('mmdet/faster-rcnn_r50-doconv_fpn_1x_coco.py')
    assert sum(k.endswith('.D') for k in r50) == 17
    v1c = backbone_shapes('mmpretrain/resnetv1c50-doconv_8xb32_in1k.py')
    seg = backbone_shapes('mmseg/pspnet_r50-d8-doconv_4xb2-80k_cityscapes-512x1024.py')

    def to_mmseg(key):
        parts = key.split('.')
        if parts[0] == 'stem':
            index = 3 * int(parts[1]) + (parts[2] == 'bn')
            return '.'.join(['stem', str(index)] + parts[3:])
        return key

    assert {to_mmseg(k): v for k, v in v1c.items()} == seg
    # EfficientNet-B3: the detector's backbone stops before the classifier's last 1×1 conv.
    effb3 = backbone_shapes('mmpretrain/efficientnet-b3-doconv_8xb32_in1k.py')
    retina = backbone_shapes('mmdet/retinanet_effb3-doconv_fpn_8xb4-crop896-1x_coco.py')
    assert {k: v for k, v in effb3.items() if not k.startswith('layers.6.')} == retina
    assert sum(k.endswith('.D') for k in retina) == 27


# ----------------------------------------------------------------------------------------------
# DOConvModel in scope mmpretrain
# ----------------------------------------------------------------------------------------------
def test_doconv_model_builds_through_mmpretrain_apis(tmp_path):
    """type='DOConvModel' over an mmpretrain recipe, built by mmpretrain's own init_model: the
    by-name conversion gives the same 17 DO-Conv layers as conv_cfg."""
    import mmpretrain.registry
    from mmpretrain.apis import init_model
    assert mmpretrain.registry.MODELS.module_dict['DOConvModel'] is do_conv_mm.DOConvModel
    path = tmp_path / 'r18_by_name.py'
    path.write_text("_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'\n"
                    "custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)\n"
                    "model = dict(type='DOConvModel', model_type='ImageClassifier',\n"
                    "             doconv=dict(include=['backbone']))\n")
    model = init_model(str(path), device='cpu')
    by_conv_cfg = _build(Config.fromfile(_config_path('mmpretrain/resnet18-doconv_8xb32_in1k.py')))
    assert type(model).__name__ == 'ImageClassifier'
    assert _kxk_convs(model) == _kxk_convs(by_conv_cfg)
    assert sorted(model.state_dict()) == sorted(by_conv_cfg.state_dict())


def test_import_registers_mmpretrain_cheaply():
    """The registration choice: eager, because ``import mmpretrain.registry`` neither imports
    mmpretrain's models nor torchvision (a fresh interpreter checks that)."""
    code = ('import sys, do_conv_mm, mmpretrain.registry as r; '
            'assert r.MODELS.module_dict["DOConvModel"] is do_conv_mm.DOConvModel; '
            'print(sorted(m for m in ("torchvision", "mmpretrain.models") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                         env=tool_env(threads=1), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == '[]'


def test_a_downstream_package_that_fails_to_import_is_skipped_with_a_warning(monkeypatch):
    import importlib

    from do_conv_mm import convert
    real = importlib.import_module

    def import_module(name, *args):
        if name == 'mmpretrain.registry':
            raise AssertionError('MMCV==9.9.9 is used but incompatible.')
        return real(name, *args)

    monkeypatch.setattr(importlib, 'import_module', import_module)
    with pytest.warns(UserWarning, match=r"do_conv_mm: mmpretrain is installed but "
                                         r"mmpretrain\.registry does not import \(AssertionError: "
                                         r"MMCV==9\.9\.9.*Fix or uninstall mmpretrain"):
        convert._register_downstream()  # mmdet and mmseg are still (idempotently) registered
    import mmdet.registry
    assert mmdet.registry.MODELS.module_dict['DOConvModel'] is do_conv_mm.DOConvModel
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        monkeypatch.undo()
        convert._register_downstream()  # a healthy environment: silent


# ----------------------------------------------------------------------------------------------
# Re-parameterisable backbones: fold DO-Conv first, then switch_to_deploy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ['RepVGG', 'MobileOne'])
def test_reparameterisable_backbone_folds_doconv_first(arch):
    """mmpretrain's RepVGG / MobileOne with conv_cfg=DOConv and random D: fold_doconv, then the
    backbone's own switch_to_deploy, then fold_doconv again (the fused branches it rebuilds
    through conv_cfg are DOConv2d with D = 0) gives a plain-conv model with the same outputs
    (fp32: 1e-4 relative). What the README warns about stays true: switch_to_deploy on the
    unfolded model fuses conv.weight, W without D, and the output is another one."""
    from copy import deepcopy
    from mmpretrain.models.backbones import MobileOne, RepVGG
    torch.manual_seed(0)
    net = (RepVGG('A0', conv_cfg=dict(type='DOConv'), out_indices=(3, )) if arch == 'RepVGG'
           else MobileOne('s0', conv_cfg=dict(type='DOConv'), out_indices=(3, )))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, DOConv2d) and m.D is not None:
                m.D.normal_(0, 0.1)
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)[0]
    deployed = do_conv_mm.fold_doconv(net)
    deployed.switch_to_deploy()
    do_conv_mm.fold_doconv(deployed, inplace=True)
    assert do_conv_mm.count_doconv(deployed) == 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())  # fused
    unfolded = deepcopy(net)
    unfolded.switch_to_deploy()
    with torch.no_grad():
        scale = expected.abs().max()
        assert (deployed(x)[0] - expected).abs().max() <= 1e-4 * scale
        assert (unfolded(x)[0] - expected).abs().max() > 0.1 * scale


# ----------------------------------------------------------------------------------------------
# Trust-ratio optimizers (mmpretrain's Lamb, LARS): D starts at 0 and must still train
# ----------------------------------------------------------------------------------------------
def _tiny_doconv_classifier():
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(dict(
            type='ImageClassifier',
            backbone=dict(type='ResNet', depth=18, stem_channels=8, base_channels=8,
                          conv_cfg=dict(type='DOConv')),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=4, in_channels=64)))


def _optimizer(model, optimizer, paramwise_cfg=None):
    from mmengine.optim import build_optim_wrapper
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return build_optim_wrapper(model, dict(type='OptimWrapper', optimizer=optimizer,
                                               paramwise_cfg=paramwise_cfg or {})).optimizer


def _d_change_after_steps(model, optimizer, steps=30):
    """Median over DO-Conv layers of ‖W' − weight‖ / ‖weight‖ after ``steps`` steps under a
    linear warm-up from 1e-4 (mmpretrain's recipes)."""
    torch.manual_seed(1)
    base = [group['lr'] for group in optimizer.param_groups]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    for step in range(steps):
        for group, lr in zip(optimizer.param_groups, base):
            group['lr'] = lr * min(1.0, 1e-4 + step / 10)
        optimizer.zero_grad()
        logits = model.head.fc(model.neck(model.backbone(x))[-1])
        torch.nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()
    with torch.no_grad():
        changes = sorted(float((m.composed_weight() - m.weight).norm() / m.weight.norm())
                         for m in model.modules() if isinstance(m, DOConv2d) and m.D is not None)
    return changes[len(changes) // 2]


@pytest.mark.parametrize('optimizer, fix', [
    (dict(type='Lamb', lr=5e-3, weight_decay=0.01), {'.D': dict(decay_mult=0.)}),
    (dict(type='LARS', lr=4.8, momentum=0.9, weight_decay=1e-6),
     {'.D': dict(lars_exclude=True, lr_mult=0.01)}),
])
def test_trust_ratio_optimizers_are_warned_and_the_fix_trains_D(optimizer, fix):
    """The warning's premise (D stays ~0 under the trust ratio) and its fix (D trains: measured
    Lamb 1.7e-6 -> 6.9e-2, LARS 5.4e-4 -> 2.6e-2 relative kernel change; 30x is the bound)."""
    from do_conv_mm.config_check import d_held_by_trust_ratio
    torch.manual_seed(0)
    model = _tiny_doconv_classifier()
    held = _optimizer(model, optimizer)
    message = d_held_by_trust_ratio(held, model)
    assert message and optimizer['type'] in message and str(next(iter(fix))) in message
    model_fixed = _tiny_doconv_classifier()
    model_fixed.load_state_dict(model.state_dict())
    fixed = _optimizer(model_fixed, optimizer, dict(custom_keys=fix))
    assert d_held_by_trust_ratio(fixed, model_fixed) is None
    held_change = _d_change_after_steps(model, held)
    fixed_change = _d_change_after_steps(model_fixed, fixed)
    assert held_change < 1e-3 and fixed_change > 30 * held_change


def test_other_optimizers_and_the_shipped_lamb_config_are_not_warned():
    from do_conv_mm.config_check import d_held_by_trust_ratio
    model = _tiny_doconv_classifier()
    for optimizer in (dict(type='SGD', lr=0.1), dict(type='AdamW', lr=1e-3)):
        assert d_held_by_trust_ratio(_optimizer(model, optimizer), model) is None
    cfg = Config.fromfile(_config_path('mmpretrain/cspnext-tiny-doconv_8xb256-rsb-a1-600e_in1k.py'))
    assert cfg.optim_wrapper.optimizer.type == 'Lamb'
    cspnext = _build(cfg)
    assert d_held_by_trust_ratio(_optimizer(cspnext, cfg.optim_wrapper.optimizer,
                                            cfg.optim_wrapper.paramwise_cfg), cspnext) is None


def test_train_tool_warns_before_the_first_iteration(capsys):
    """tools/train.py registers the check as a hook that reads the Runner's built optimizer."""
    from mmengine.optim import OptimWrapper
    sys.path.insert(0, osp.join(REPO, 'tools'))
    try:
        import train as train_tool
    finally:
        sys.path.pop(0)

    class FakeRunner:
        def __init__(self):
            self.hooks = []
            self.model = _tiny_doconv_classifier()
            self.optim_wrapper = OptimWrapper(_optimizer(
                self.model, dict(type='Lamb', lr=5e-3, weight_decay=0.01)))

        def register_hook(self, hook, priority):
            self.hooks.append(hook)

    runner = FakeRunner()
    train_tool.warn_where_d_cannot_train(runner)
    (hook, ) = runner.hooks
    from mmengine.logging import MMLogger
    logged = []
    logger = MMLogger.get_current_instance()
    handler = __import__('logging').Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logger.addHandler(handler)
    try:
        hook.before_train(runner)
    finally:
        logger.removeHandler(handler)
    assert any(line.startswith('DO-Conv: Lamb scales') for line in logged)
