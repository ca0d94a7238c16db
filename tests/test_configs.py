"""Shipped model-zoo configs, by-name conversion (convert_to_doconv / DOConvModel), coverage tool.

Outputs of converted models are compared with torch.equal: with D = 0 the composed kernel is
weight + bmm(0, W) = weight bit for bit, and the same conv kernel runs on the same input, so a
converted model computes the identical tensor (no tolerance needed).
"""
import importlib.util
import json
import os.path as osp
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmdet.registry import MODELS as DET_MODELS
from mmengine.registry import MODELS, init_default_scope

import do_conv_mm
from do_conv_mm import (DOConv2d, check_doconv_cfg, convert_to_doconv, count_doconv,
                        fold_doconv)
from do_conv_mm.analysis import conv_flops_by_module, doconv_coverage
from do_conv_mm.config_check import components_ignoring_conv_cfg
from do_conv_mm.convert import DOConvNotApplicableError

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
EXTRA_SUFFIXES = ('.D', '.weight_extra')


class TinyHead(nn.Module):

    def __init__(self, channels=4):
        super().__init__()
        self.cls = nn.Conv2d(channels, 3, 3, padding=1)
        self.reg = nn.Conv2d(channels, 4, 3, padding=1, bias=False)
        self.pw = nn.Conv2d(channels, 2, 1)

    def forward(self, x):
        return torch.cat([self.cls(x), self.reg(x), self.pw(x)], dim=1)


class TinyNet(nn.Module):
    """Stem, a depthwise/dilated body, a head; 5 k×k nn.Conv2d, 1 1×1, 1 transposed conv."""

    def __init__(self, channels=4, with_deconv=False):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2, groups=channels), nn.ReLU(),
            nn.Conv2d(channels, channels, (1, 5), padding=(0, 2)))
        self.head = TinyHead(channels)
        self.up = nn.ConvTranspose2d(channels, channels, 2, 2) if with_deconv else None

    def forward(self, x):
        x = self.body(self.stem(x))
        if self.up is not None:
            x = self.up(x)[..., ::2, ::2]
        return self.head(x)


def _plain_keys(state_dict):
    return [k for k in state_dict if not k.endswith(EXTRA_SUFFIXES)]


# ----------------------------------------------------------------------------------------------
# convert_to_doconv
# ----------------------------------------------------------------------------------------------
def test_convert_all_keeps_keys_outputs_and_weights():
    torch.manual_seed(0)
    model = TinyNet(with_deconv=True)
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    keys = list(model.state_dict())
    stem_weight = model.stem.weight

    converted = convert_to_doconv(model)  # include=None: the transposed conv is skipped

    assert converted == ['stem', 'body.0', 'body.2', 'head.cls', 'head.reg']
    assert count_doconv(model) == 5
    assert type(model.head.pw) is nn.Conv2d and type(model.up) is nn.ConvTranspose2d
    assert model.stem.weight is stem_weight  # shared, not copied
    state_dict = model.state_dict()
    assert _plain_keys(state_dict) == keys
    assert sorted(set(state_dict) - set(keys)) == sorted(f'{n}.D' for n in converted)
    assert torch.equal(model(x), expected)


def test_convert_include_exclude_and_d_mul():
    model = TinyNet()
    assert convert_to_doconv(model, include='head', exclude=['head.reg']) == ['head.cls']
    assert convert_to_doconv(model, include=['body.?', 'stem'], D_mul=12) == [
        'stem', 'body.0', 'body.2']
    assert model.stem.D.shape == (3, 9, 12) and model.stem.weight_extra.shape == (4, 3, 3)
    assert model.body[2].D.shape == (4, 5, 12)
    assert type(model.head.reg) is nn.Conv2d
    # Already converted layers and 1×1 convs are skipped, not errors.
    assert convert_to_doconv(model, include=['head.*']) == ['head.reg']
    plain = TinyNet()
    assert _plain_keys(model.state_dict()) == list(plain.state_dict())
    assert any(k.endswith('.weight_extra') for k in model.state_dict())


def test_convert_replaces_every_reference_to_a_shared_conv():
    model = TinyNet()
    model.alias = model.head.cls  # the same module under two names
    assert convert_to_doconv(model, include=['head.cls']) == ['head.cls']
    assert isinstance(model.alias, DOConv2d) and model.alias is model.head.cls


def test_convert_and_fold_a_conv_held_twice_by_one_parent():
    """``m.a = m.b = conv``: one parent, two names. Both become the one DOConv2d, and the fold
    gives one plain conv at both (the second name kept the plain conv / the DOConv2d before:
    named_children() lists a module once)."""
    model = nn.Module()
    model.a = model.b = nn.Conv2d(4, 4, 3, padding=1)
    assert convert_to_doconv(model) == ['a']
    assert isinstance(model.b, DOConv2d) and model.a is model.b
    assert {'a.D', 'b.D'} <= set(model.state_dict())
    with torch.no_grad():
        model.a.D.normal_(std=0.1)
    folded = fold_doconv(model)
    assert type(folded.a) is nn.Conv2d and folded.a is folded.b and count_doconv(folded) == 0
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(folded.b(x), model.b(x), rtol=1e-5, atol=1e-6)


def test_convert_shared_conv_selected_by_any_of_its_names():
    model = TinyNet()
    model.alias = model.head.cls  # registered second: named_modules() alone never yields 'alias'
    assert convert_to_doconv(model, include=['alias']) == ['head.cls']
    assert isinstance(model.head.cls, DOConv2d) and model.alias is model.head.cls
    assert {'head.cls.D', 'alias.D'} <= set(model.state_dict())
    # One module cannot be DO-Conv under one name and plain under another: refused, untouched.
    model = TinyNet()
    model.alias = model.head.cls
    with pytest.raises(DOConvNotApplicableError,
                       match=r"'head\.cls' is shared: the same conv is also registered as "
                             r"\['alias'\].*exclude leaves it out as 'alias'"):
        convert_to_doconv(model, include=['head'], exclude=['alias'])
    assert count_doconv(model) == 0


def test_convert_rtmdet_shared_head_convs_by_a_later_level_name():
    """RTMDet's head shares its stacked convs across levels (cls_convs[n][i].conv is
    cls_convs[0][i].conv): selecting level 1 by name converts the one shared conv everywhere."""
    cfg = Config.fromfile(_config_path('toy/rtmdet_tiny_toy.py'))
    cfg.model = dict(type='DOConvModel', model_type=cfg.model.pop('type'),
                     doconv=dict(include=['bbox_head.reg_convs.1']), **cfg.model)
    model = _build(cfg)
    head = model.bbox_head
    assert [n for n, m in model.named_modules() if isinstance(m, DOConv2d)] == [
        'bbox_head.reg_convs.0.0.conv', 'bbox_head.reg_convs.0.1.conv']
    for level in (1, 2):
        for i in (0, 1):
            assert head.reg_convs[level][i].conv is head.reg_convs[0][i].conv
            assert type(head.cls_convs[level][i].conv) is nn.Conv2d


def test_include_pattern_that_converts_nothing_is_an_error():
    with pytest.raises(DOConvNotApplicableError,
                       match=r"include pattern 'head\.pw' converts nothing: it selects only 1×1 "
                             r"convs \(head\.pw\), and a 1×1 DO-Conv is a plain 1×1 conv"):
        convert_to_doconv(TinyNet(), include=['head.pw'])
    with pytest.raises(DOConvNotApplicableError, match="'body.1' converts nothing: it selects no "
                                                        "convolution"):
        convert_to_doconv(TinyNet(), include=['body.1'])  # the ReLU
    model = TinyNet()
    with pytest.raises(DOConvNotApplicableError, match="'head' converts nothing: every k×k"):
        convert_to_doconv(model, include=['stem', 'head'], exclude=['head.cls', 'head.reg'])
    assert count_doconv(model) == 0  # nothing half-converted (stem was fine)
    # Already DO-Conv is not "nothing": converting again is a no-op, not an error.
    convert_to_doconv(model, include=['head'])
    assert convert_to_doconv(model, include=['head']) == []
    # From a config: RTMDet's predictors are 1×1 (pred_kernel_size=1).
    cfg = Config.fromfile(_config_path('toy/rtmdet_tiny-doconv_toy.py'))
    cfg.model.doconv.include.append('bbox_head.rtm_cls')
    with pytest.raises(DOConvNotApplicableError,
                       match=r"include pattern 'bbox_head\.rtm_cls' converts nothing: it selects "
                             r"only 1×1 convs \(bbox_head\.rtm_cls\.0"):
        _build(cfg)


def test_convert_with_d_mul_below_a_kernel_names_the_module():
    model = TinyNet()
    with pytest.raises(DOConvNotApplicableError,
                       match=r"D_mul=4 is smaller than kh\*kw=5 of module 'body\.2' \(1x5 "
                             r"kernel\).*exclude=\['body\.2'\]"):
        convert_to_doconv(model, include=['body.2'], D_mul=4)
    assert count_doconv(model) == 0


def test_convert_pattern_that_matches_nothing_names_close_modules():
    with pytest.raises(ValueError, match=r"include pattern 'head\.clss'.*head\.cls"):
        convert_to_doconv(TinyNet(), include=['head.clss'])
    with pytest.raises(ValueError, match="exclude pattern 'neck'"):
        convert_to_doconv(TinyNet(), exclude=['neck'])
    with pytest.raises(TypeError, match='glob pattern'):
        convert_to_doconv(TinyNet(), include=[3])


def test_convert_selected_unconvertible_module_says_why_and_how_to_exclude():
    model = TinyNet(with_deconv=True)
    with pytest.raises(DOConvNotApplicableError,
                       match=r"'up'.*transposed convolution.*exclude=\['up'\]"):
        convert_to_doconv(model, include=['*'])
    assert count_doconv(model) == 0  # nothing half-converted
    assert len(convert_to_doconv(model, include=['*'], exclude=['up'])) == 5

    class ConvWithOwnForward(nn.Conv2d):
        pass

    model = nn.Sequential(ConvWithOwnForward(3, 3, 3), nn.Conv3d(3, 3, 3))
    with pytest.raises(DOConvNotApplicableError, match='subclass of nn.Conv2d'):
        convert_to_doconv(model, include=['0'])
    with pytest.raises(DOConvNotApplicableError, match='2-D convolutions'):
        convert_to_doconv(model, include=['1'])


# ----------------------------------------------------------------------------------------------
# DOConvModel (config-only entry point) and config checks
# ----------------------------------------------------------------------------------------------
def test_doconv_model_builds_the_original_model_and_matches_its_output():
    x = torch.randn(1, 3, 12, 12)
    torch.manual_seed(0)
    plain = MODELS.build(dict(type=TinyNet, channels=6))
    torch.manual_seed(0)
    model = DET_MODELS.build(dict(type='DOConvModel', model_type=TinyNet, channels=6,
                                  doconv=dict(include=['head', 'stem'], exclude=['head.reg'])))
    assert type(model) is TinyNet  # no wrapper: state_dict keys carry no prefix
    assert [n for n, m in model.named_modules() if isinstance(m, DOConv2d)] == [
        'stem', 'head.cls']
    assert _plain_keys(model.state_dict()) == list(plain.state_dict())
    assert torch.equal(model(x), plain(x))
    # A plain checkpoint strict-loads into the DO-Conv model (missing D = identity).
    model.load_state_dict(plain.state_dict())


def test_doconv_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown doconv keys \['includes'\]"):
        DET_MODELS.build(dict(type='DOConvModel', model_type=TinyNet,
                              doconv=dict(includes=['x'])))
    with pytest.raises(ValueError, match='not .DOConvModel. itself'):
        DET_MODELS.build(dict(type='DOConvModel', model_type='DOConvModel'))
    with pytest.raises(ValueError, match='matches no module name'):
        DET_MODELS.build(dict(type='DOConvModel', model_type=TinyNet,
                              doconv=dict(include=['nek'])))


def test_check_doconv_cfg_flags_dcn_with_doconv():
    backbone = dict(type='ResNet', depth=50, conv_cfg=dict(type='DOConv'),
                    dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
                    stage_with_dcn=(False, True, True, True))
    with pytest.raises(DOConvNotApplicableError,
                       match=r'model\.backbone \(ResNet\).*stages \[2, 3, 4\].*remove conv_cfg'):
        check_doconv_cfg(dict(type='RetinaNet', backbone=backbone))
    check_doconv_cfg(dict(type='RetinaNet', backbone=dict(backbone, conv_cfg=None)))
    check_doconv_cfg(dict(type='RetinaNet', backbone=dict(backbone, stage_with_dcn=[False] * 4)))


# ----------------------------------------------------------------------------------------------
# FLOP / coverage accounting
# ----------------------------------------------------------------------------------------------
def test_conv_flops_and_coverage_match_hand_count():
    model = TinyNet(channels=4, with_deconv=True)
    convert_to_doconv(model, include=['stem', 'head.cls'], D_mul=10)
    x = torch.randn(1, 3, 16, 16)
    flops = conv_flops_by_module(model, lambda: model(x))
    # out_h*out_w*out_ch*(in_ch/groups)*kh*kw; stem halves 16 -> 8; deconv: in numel * out*k*k.
    expected = {'stem': 8 * 8 * 4 * 3 * 9, 'body.0': 8 * 8 * 4 * 1 * 9, 'body.2': 8 * 8 * 4 * 4 * 5,
                'head.cls': 8 * 8 * 3 * 4 * 9, 'head.reg': 8 * 8 * 4 * 4 * 9,
                'head.pw': 8 * 8 * 2 * 4, 'up': 8 * 8 * 4 * 4 * 4}
    assert dict(flops) == expected
    coverage = doconv_coverage(model, flops)
    kxk = sum(v for k, v in expected.items() if k != 'head.pw')
    total = coverage['total']
    assert total.kxk_flops == kxk
    assert total.doconv_kxk_flops == expected['stem'] + expected['head.cls']
    assert total.doconv_kxk == 2
    assert sorted(total.plain_kxk) == ['body.0', 'body.2', 'head.reg', 'up']
    assert coverage['components']['head'].plain_kxk == ['head.reg']
    # stem: D 3*9*10 + weight_extra 4*3*1; head.cls: D 4*9*10 + weight_extra 3*4*1
    assert total.extra_params == 270 + 12 + 360 + 12
    assert total.params == sum(p.numel() for p in TinyNet(4, True).parameters())
    assert coverage['not_run'] == []


# ----------------------------------------------------------------------------------------------
# Shipped model-zoo configs (mmdet / mmseg)
# ----------------------------------------------------------------------------------------------
# (config, DOConv k×k layers, plain k×k convs left): the numbers tools/analyze_doconv.py prints
# and the README states. Plain k×k left: Mask R-CNN's 2×2 transposed mask upsampling conv.
# RTMDet-tiny: 21 by conv_cfg + 11 by name, as its toy twin below.
SHIPPED = [
    ('mmdet/faster-rcnn_r50-doconv_fpn_1x_coco.py', 22, 0),
    ('mmdet/retinanet_r50-doconv_fpn_1x_coco.py', 32, 0),
    ('mmdet/mask-rcnn_r50-doconv_fpn_1x_coco.py', 26, 1),
    ('mmdet/fcos_r50-caffe-doconv_fpn_gn-head_1x_coco.py', 33, 0),
    ('mmdet/cascade-rcnn_r50-doconv_fpn_1x_coco.py', 22, 0),
    ('mmdet/rtmdet_tiny-doconv_8xb32-300e_coco.py', 32, 0),
    # EfficientNet-B3: 27 DOConvAdaptivePadding (its 'SAME' padding kept) + 15 DOConv.
    ('mmdet/retinanet_effb3-doconv_fpn_8xb4-crop896-1x_coco.py', 42, 0),
    ('mmseg/fcn_r50-d8-doconv_4xb2-80k_cityscapes-512x1024.py', 23, 0),
    ('mmseg/pspnet_r50-d8-doconv_4xb2-80k_cityscapes-512x1024.py', 21, 0),
    ('mmseg/deeplabv3_r50-d8-doconv_4xb2-80k_cityscapes-512x1024.py', 24, 0),
    ('mmseg/deeplabv3plus_r50-d8-doconv_4xb2-80k_cityscapes-512x1024.py', 26, 0),
    ('mmseg/upernet_r50-doconv_4xb2-80k_cityscapes-512x1024.py', 25, 0),
    # Other families. YOLOX-s: 31 3×3 (backbone, PAFPN, head; predictors 1×1). HRNet-W18: 265
    # (FCN head 1×1). UNet-S5-D16: 10 encoder + 8 decoder 3×3s + the 2 FCN heads' 3×3s.
    # SegFormer-B0 (by name): 4 patch embeddings, 8 depthwise 3×3s, 6 spatial reductions.
    ('mmdet/yolox_s-doconv_8xb8-300e_coco.py', 31, 0),
    ('mmseg/fcn_hr18-doconv_4xb2-80k_cityscapes-512x1024.py', 265, 0),
    ('mmseg/unet-s5-d16-doconv_fcn_4xb4-160k_cityscapes-512x1024.py', 20, 0),
    ('mmseg/segformer_mit-b0-doconv_8xb2-160k_ade20k-512x512.py', 18, 0),
]
FAMILIES = [name for name, _, _ in SHIPPED[-4:]]
# The DO-Conv toy configs (configs/toy), same columns. Plain k×k left: RetinaHead's retina_cls /
# retina_reg (built without conv_cfg). RTMDet: 21 by conv_cfg + 11 by name (CSPNeXt stem and
# CSPNeXtBlock conv1); its head's stacked 3×3 convs are shared across the 3 levels (counted once)
# and its predictors are 1×1.
NEEDS_MMPRETRAIN = pytest.mark.skipif(importlib.util.find_spec('mmpretrain') is None,
                                      reason='mmpretrain (pretraining extra) not installed')
TOY = [
    ('toy/retinanet_r18-tiny-doconv_fpn_toy.py', 24, 2),
    ('toy/fpn_r18-tiny-doconv_toy.py', 30, 0),
    ('toy/rtmdet_tiny-doconv_toy.py', 32, 0),
    ('toy/retinanet_r18-tiny-doconv-pretrained_fpn_toy.py', 24, 2),
    ('toy/fpn_r18-tiny-doconv-pretrained_toy.py', 30, 0),
    # Classifiers (mmpretrain): every backbone k×k conv; the head is linear.
    pytest.param('toy/cls_r18-tiny-doconv_toy.py', 17, 0, marks=NEEDS_MMPRETRAIN),
    pytest.param('toy/cls_r18v1c-tiny-doconv_toy.py', 19, 0, marks=NEEDS_MMPRETRAIN),
]
# A ResNet-18 RetinaNet with 16-channel FPN/head: the same config code path at a tiny size.
TINY_RETINANET = {
    'model.backbone.depth': 18, 'model.backbone.init_cfg': None,
    'model.neck.in_channels': [64, 128, 256, 512], 'model.neck.out_channels': 16,
    'model.bbox_head.in_channels': 16, 'model.bbox_head.feat_channels': 16,
    'model.bbox_head.stacked_convs': 1, 'model.bbox_head.num_classes': 3,
}


@pytest.fixture(scope='module')
def analyze_tool():
    """tools/analyze_doconv.py as a module (its main() is the CLI)."""
    spec = importlib.util.spec_from_file_location(
        'analyze_doconv', osp.join(REPO, 'tools', 'analyze_doconv.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _config_path(name):
    return osp.join(REPO, 'configs', name)


def _base_config_path(name):
    """Installed model-zoo file that a shipped config names in ``_base_ = 'pkg::path'``."""
    from mmengine.utils import get_installed_path
    with open(_config_path(name)) as f:
        base = next(line for line in f if line.startswith('_base_'))
    package, rel = base.split("'")[1].split('::')
    package = {'mmseg': 'mmsegmentation'}.get(package, package)
    path = osp.join(get_installed_path(package), '.mim', 'configs', rel)
    return path if osp.exists(path) else osp.join(get_installed_path(package), 'configs', rel)


def _build(cfg):
    from mmengine.model import revert_sync_batchnorm
    init_default_scope(cfg.default_scope)
    return revert_sync_batchnorm(MODELS.build(cfg.model))


def _kxk_convs(model):
    """(DOConv k×k names, plain k×k conv names) of a model."""
    doconv, plain = [], []
    for name, m in model.named_modules():
        weight = getattr(m, 'weight', None)
        if isinstance(m, DOConv2d) and m.D is not None:
            doconv.append(name)
        elif (isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, DOConv2d)
              and weight.dim() == 4 and weight.shape[2] * weight.shape[3] > 1):
            plain.append(name)
    return doconv, plain


def check_analysis_total(total: dict, model: nn.Module, n_doconv: int) -> None:
    """The analyze tool's ``total`` (a 1×3×64×64 pass) against a direct count on ``model``:
    every k×k conv DO-Conv, the extra parameters, and torch's own FLOP counter (2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode
    doconv, plain = _kxk_convs(model)
    assert total['doconv_kxk'] == len(doconv) == n_doconv
    assert total['plain_kxk'] == plain == []
    extra = sum(p.numel() for n, p in model.named_parameters() if n.endswith(EXTRA_SUFFIXES))
    assert total['extra_params'] == extra > 0
    assert total['params'] == sum(p.numel() for p in model.parameters()) - extra
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 64, 64), mode='tensor')
    conv_flops = sum(v for op, v in counter.get_flop_counts()['Global'].items()
                     if 'convolution' in str(op))
    assert 2 * total['conv_flops'] == conv_flops
    assert total['doconv_flop_share'] == 1.0 and total['kxk_flops'] > 0


@pytest.mark.parametrize('name,n_doconv,n_plain', SHIPPED + TOY,
                         ids=[(s.values if hasattr(s, 'values') else s)[0] for s in SHIPPED + TOY])
def test_shipped_config_builds_in_its_scope_with_stated_doconv(name, n_doconv, n_plain):
    cfg = Config.fromfile(_config_path(name))
    assert cfg.custom_imports == dict(imports=['do_conv_mm'], allow_failed_imports=False)
    if not name.startswith('toy/'):
        assert cfg.default_scope == name.split('/')[0]
    model = _build(cfg)
    doconv, plain = _kxk_convs(model)
    assert len(doconv) == n_doconv, doconv
    assert len(plain) == n_plain, plain
    assert components_ignoring_conv_cfg(cfg.model, model) == []
    # Every backbone k×k conv is DO-Conv, and DOConvModel returned the bare model.
    assert doconv and not [n for n in plain if n.startswith('backbone.')]
    if type(model.backbone).__name__.startswith('ResNet'):
        assert all(isinstance(m, DOConv2d) for n, m in model.backbone.named_modules()
                   if isinstance(m, nn.Conv2d) and (n == 'conv1' or n.endswith((
                       'conv2', 'stem.0', 'stem.3', 'stem.6',  # mmdet / mmseg stems
                       'stem.0.conv', 'stem.1.conv', 'stem.2.conv'))))  # mmpretrain's
    assert type(model).__name__ == cfg.model.get('model_type', cfg.model.type)
    if cfg.model.get('bbox_head', {}).get('share_conv'):  # RTMDet: one DOConv2d per shared conv
        head = model.bbox_head
        for level in range(1, len(head.cls_convs)):
            for i in range(head.stacked_convs):
                assert head.cls_convs[level][i].conv is head.cls_convs[0][i].conv
                assert isinstance(head.cls_convs[level][i].conv, DOConv2d)


def test_shipped_config_equals_base_model_and_loads_base_checkpoint(tmp_path, analyze_tool):
    from mmdet.apis import init_detector
    name = 'mmdet/retinanet_r50-doconv_fpn_1x_coco.py'
    base_cfg = Config.fromfile(_base_config_path(name))
    base_cfg.merge_from_dict(TINY_RETINANET)
    torch.manual_seed(0)
    base = _build(base_cfg).eval()
    cfg = Config.fromfile(_config_path(name))
    cfg.merge_from_dict(TINY_RETINANET)
    torch.manual_seed(0)
    model = _build(cfg).eval()
    # stem + 2 per BasicBlock x 8 = 17, FPN 3 + 2 extra = 5, head 2 stacked + retina_cls/reg = 4.
    assert len(_kxk_convs(model)[0]) == 26 and not _kxk_convs(base)[0]
    assert _plain_keys(model.state_dict()) == list(base.state_dict())
    x = torch.randn(1, 3, 64, 96)
    expected = base(x, mode='tensor')
    for got, want in zip(model(x, mode='tensor'), expected):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    # Training reaches the converted predictors: D of retina_cls gets a non-zero gradient.
    model.train()
    losses = model(x, analyze_tool._det_batch(model, 64, 96), mode='loss')
    sum(v if torch.is_tensor(v) else sum(v) for v in losses.values()).backward()
    assert torch.count_nonzero(model.bbox_head.retina_cls.D.grad) > 0
    model.zero_grad()
    # mmdet's init_detector builds the DOConvModel config and loads a plain checkpoint into it.
    checkpoint = str(tmp_path / 'plain.pth')
    torch.save(dict(state_dict=base.state_dict(), meta=dict(dataset_meta=dict(
        classes=('a', 'b', 'c')))), checkpoint)
    detector = init_detector(_config_path(name), checkpoint, device='cpu',
                             cfg_options=TINY_RETINANET).eval()
    assert detector.dataset_meta['classes'] == ('a', 'b', 'c')
    assert all(torch.count_nonzero(m.D) == 0 for m in detector.modules()
               if isinstance(m, DOConv2d) and m.D is not None)
    for got, want in zip(detector(x, mode='tensor'), expected):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_efficientnet_config_keeps_adaptive_padding_and_equals_stock_model():
    """The EfficientNet-B3 RetinaNet: every backbone conv keeps Conv2dAdaptivePadding's padding
    (DOConvAdaptivePadding), so with the same weights it computes bit for bit what the stock
    model computes, on an even input size where 'SAME' padding is asymmetric; its deploy config
    builds the stock model back."""
    from do_conv_mm import DOConv2dAdaptivePadding
    name = 'mmdet/retinanet_effb3-doconv_fpn_8xb4-crop896-1x_coco.py'
    cfg = Config.fromfile(_config_path(name))
    torch.manual_seed(0)
    model = _build(cfg).eval()
    backbone_kxk = [m for m in model.backbone.modules()
                    if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert backbone_kxk and all(type(m) is DOConv2dAdaptivePadding for m in backbone_kxk)
    base = Config.fromfile(_base_config_path(name))
    deploy = do_conv_mm.make_deploy_config(cfg)
    assert deploy.model.backbone.conv_cfg == dict(type='Conv2dAdaptivePadding')
    for plain_cfg in (base, deploy):
        torch.manual_seed(0)
        plain = _build(plain_cfg).eval()
        assert _plain_keys(model.state_dict()) == list(plain.state_dict())
        x = torch.randn(1, 3, 64, 96)
        with torch.no_grad():
            for got, want in zip(model(x, mode='tensor'), plain(x, mode='tensor')):
                assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize('name', FAMILIES, ids=[n.split('/')[1] for n in FAMILIES])
def test_family_config_equals_its_base_model(name):
    """YOLOX, HRNet, UNet (whose base sets conv_cfg=None: merged with _delete_) and SegFormer
    (by name): built from the same seed, the DO-Conv model has the base model's state_dict keys
    plus D and computes the identical tensor (D = 0)."""
    torch.manual_seed(0)
    model = _build(Config.fromfile(_config_path(name))).eval()
    torch.manual_seed(0)
    base = _build(Config.fromfile(_base_config_path(name))).eval()
    assert _plain_keys(model.state_dict()) == list(base.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, want = model(x, mode='tensor'), base(x, mode='tensor')
    got, want = _tensors(got), _tensors(want)
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


def _tensors(out) -> list:
    """The tensors of a ``mode='tensor'`` output (a tensor, or nested lists / tuples)."""
    if torch.is_tensor(out):
        return [out]
    return [t for item in out for t in _tensors(item)]


def test_mmseg_init_model_builds_doconv_model_config():
    from mmseg.apis import init_model
    name = 'mmseg/deeplabv3plus_r50-d8-doconv_4xb2-80k_cityscapes-512x1024.py'
    model = init_model(_config_path(name), device='cpu')
    doconv, _ = _kxk_convs(model)
    assert type(model).__name__ == 'EncoderDecoder' and len(doconv) == 26
    # The separable ASPP branches' depthwise 3×3 convs (built without conv_cfg) are DO-Conv.
    assert 'decode_head.aspp_modules.1.depthwise_conv.conv' in doconv


def test_dcn_backbone_with_doconv_conv_cfg_gives_clear_error():
    cfg = Config.fromfile(_config_path('mmdet/retinanet_r50-doconv_fpn_1x_coco.py'))
    cfg.model.backbone.update(dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
                              stage_with_dcn=(False, True, True, True))
    with pytest.raises(DOConvNotApplicableError,
                       match=r'model\.backbone \(ResNet\).*deformable.*remove conv_cfg'):
        _build(cfg)
    # The fix the message gives: no conv_cfg there, convert the non-deformable convs by name.
    cfg.model.backbone.conv_cfg = None
    cfg.model.doconv.include.append('backbone')
    cfg.model.doconv.exclude = [f'backbone.layer{i}.*.conv2' for i in (2, 3, 4)]
    model = _build(cfg)
    doconv = [n for n in _kxk_convs(model)[0] if n.startswith('backbone.')]
    assert doconv == ['backbone.conv1'] + [f'backbone.layer1.{i}.conv2' for i in range(3)]


def test_conv_cfg_on_a_head_that_rejects_it_gives_clear_error():
    cfg = Config.fromfile(_config_path('mmdet/faster-rcnn_r50-doconv_fpn_1x_coco.py'))
    cfg.model.rpn_head.conv_cfg = dict(type='DOConv')
    with pytest.raises(DOConvNotApplicableError, match=r'Rejected by: model\.rpn_head '
                       r'\(RPNHead\)\. ') as error:
        _build(cfg)
    # One line, said once, naming only the head that rejects it (its error names AnchorHead).
    message = str(error.value)
    assert '\n' not in message and message.count('Building the model failed') == 1
    assert 'model.neck' not in message


@pytest.mark.parametrize('override,expected', [
    ("rpn_head=dict(conv_cfg=dict(type='DOConv'))", 'Rejected by: model.rpn_head (RPNHead).'),
    ("doconv=dict(include=['rpn_head.rpn_cnv'])",
     "include pattern 'rpn_head.rpn_cnv' matches no module name. Close names: "
     "['rpn_head.rpn_conv'"),
], ids=['conv_cfg rejected', 'include typo'])
def test_doconv_model_failures_are_one_line_from_the_train_tool(tmp_path, override, expected):
    """DOConvModel explains the failure (a head that rejects conv_cfg, an include pattern that
    matches nothing); mmengine re-raises it wrapped; the tool says it once, no traceback (the
    typo gave 34 lines of one before)."""
    import subprocess
    import sys
    config = tmp_path / 'doconv_model_failure.py'
    config.write_text(f"_base_ = {_config_path('mmdet/faster-rcnn_r50-doconv_fpn_1x_coco.py')!r}\n"
                      f"model = dict({override})\n")
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'train.py'), str(config),
                           '--work-dir', str(tmp_path / 'w')], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert proc.returncode != 0 and len(errors) == 1 and 'Traceback' not in proc.stderr
    assert errors[0].count('Building the model failed') <= 1
    assert expected in errors[0]


def test_convert_names_unconvertible_mmcv_and_mmdet_layers():
    init_default_scope('mmdet')
    backbone = MODELS.build(dict(
        type='ResNet', depth=50, dcn=dict(type='DCNv2', deform_groups=1,
                                          fallback_on_stride=False),
        stage_with_dcn=(False, True, False, False)))
    with pytest.raises(DOConvNotApplicableError,
                       match=r"'layer2\.0\.conv2'.*deformable.*exclude=\['layer2\.0\.conv2'\]"):
        convert_to_doconv(backbone, include=['layer2'])
    with pytest.raises(DOConvNotApplicableError,
                       match=r"include pattern 'layer2' converts nothing: every k×k conv it "
                             r"selects is left out by exclude \(layer2\.0\.conv2"):
        convert_to_doconv(backbone, include=['layer2'], exclude=['layer2.*.conv2'])
    assert len(convert_to_doconv(backbone, exclude=['layer2'])) == 1 + 3 + 6 + 3
    cfg = Config.fromfile(_config_path('mmdet/mask-rcnn_r50-doconv_fpn_1x_coco.py'))
    cfg.model.doconv = dict(include=['roi_head'])
    with pytest.raises(DOConvNotApplicableError,
                       match=r"roi_head\.mask_head\.upsample.*transposed"):
        _build(cfg)


def test_analyze_tool_matches_direct_count(capsys, analyze_tool):
    name = 'mmseg/fcn_r50-d8-doconv_4xb2-80k_cityscapes-512x1024.py'
    # The CLI's own main(), in process (a subprocess would re-import torch and mmseg).
    capsys.readouterr()
    analyze_tool.main([_config_path(name), '--shape', '64', '64', '--mode', 'tensor', '--json'])
    result = json.loads(capsys.readouterr().out)
    total = result['total']

    n_stated = next(n for cfg_name, n, _ in SHIPPED if cfg_name == name)
    check_analysis_total(total, _build(Config.fromfile(_config_path(name))).eval(), n_stated)


def test_analyze_tool_loss_mode_on_rtmdet_and_mask_rcnn(capsys, analyze_tool):
    """The default --mode loss: the dummy batch carries masks only when the config's training
    pipeline loads them (RTMDet's assigner reads gt masks as a tensor when present)."""
    capsys.readouterr()
    analyze_tool.main([_config_path('toy/rtmdet_tiny-doconv_toy.py'), '--json'])
    result = json.loads(capsys.readouterr().out)
    assert result['mode'] == 'loss' and result['shape'] == [800, 1344]
    assert result['total']['doconv_kxk'] == 32 and result['total']['plain_kxk'] == []
    assert result['total']['doconv_flop_share'] == 1.0 and result['not_run'] == []
    cfg = Config.fromfile(_config_path('mmdet/mask-rcnn_r50-doconv_fpn_1x_coco.py'))
    model = _build(cfg)
    assert analyze_tool.loads_masks(cfg, model)
    assert analyze_tool._det_batch(model, 64, 64, True)[0].gt_instances.masks.masks.shape == (
        3, 64, 64)
    rtmdet = Config.fromfile(_config_path('toy/rtmdet_tiny-doconv_toy.py'))
    assert not analyze_tool.loads_masks(rtmdet, None)


def _kernel_change_by_formula(weight, D, extra, groups):
    """‖W' − weight‖_F / ‖weight‖_F in float64, W' entry by entry from the paper's formula:
    W'[o, i, m] = Σ_s (D + I)[c(o, i), m, s] · W[o, i, s], c(o, i) = (o // Og)·Cg + i."""
    O, Cg, kh, kw = weight.shape
    W = weight.double().reshape(O, Cg, -1)
    if extra is not None:
        W = torch.cat([W, extra.double()], dim=2)
    P = D.double() + torch.eye(kh * kw, D.shape[2], dtype=torch.float64)
    channel = (torch.arange(O)[:, None] // (O // groups)) * Cg + torch.arange(Cg)[None, :]
    composed = torch.einsum('oims,ois->oim', P[channel], W).reshape(weight.shape)
    return ((composed - weight.double()).norm() / weight.double().norm()).item()


def test_analyze_tool_reports_what_trained_d_does(tmp_path, capsys, analyze_tool):
    """--checkpoint: per layer, how far the trained D moves the kernel (against the formula in
    float64, 1e-9 relative: both sides are float64 sums of the same products); layers whose D is
    still 0 are counted and named, frozen ones apart from trainable ones; an EMA checkpoint is
    read from its state_dict, where mmengine's EMAHook saves the EMA weights (its
    ema_state_dict, 2·D here, holds the raw ones), with or without --use-ema, which refuses a
    checkpoint without EMA; a folded checkpoint is refused in one line."""
    config = _config_path('toy/retinanet_r18-tiny-doconv_fpn_toy.py')
    frozen_stem = ['--cfg-options', 'model.backbone.frozen_stages=0']  # conv1 (the stem) frozen
    cfg = Config.fromfile(config)
    cfg.model.backbone.frozen_stages = 0
    model = analyze_tool.build_model(cfg)
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, DOConv2d) and m.D is not None}
    stuck, frozen = 'neck.fpn_convs.1.conv', 'backbone.conv1'
    assert not layers[frozen].D.requires_grad and layers[stuck].D.requires_grad
    torch.manual_seed(0)
    with torch.no_grad():
        for name, layer in layers.items():
            if name not in (stuck, frozen):
                layer.D.normal_(std=0.05 * (1 + len(name) % 3))
    state_dict = model.state_dict()  # the EMA weights, as EMAHook saves them
    raw = {f'module.{k}': 2 * v if k.endswith('.D') else v for k, v in state_dict.items()}
    checkpoint = tmp_path / 'epoch_1.pth'
    torch.save(dict(meta={}, state_dict=state_dict, ema_state_dict=dict(raw, steps=torch.tensor(
        3))), checkpoint)
    args = [config, '--shape', '64', '64', '--mode', 'tensor', '--checkpoint', str(checkpoint)]

    for use_ema in (False, True):
        capsys.readouterr()
        analyze_tool.main(args + ['--json'] + ['--use-ema'] * use_ema + frozen_stem)
        trained = json.loads(capsys.readouterr().out)['trained']
        assert trained['weights'] == 'state_dict (EMA weights)'
        assert [layer['name'] for layer in trained['layers']] == list(layers)
        for row in trained['layers']:
            m = layers[row['name']]
            expected = _kernel_change_by_formula(m.weight, m.D, m.weight_extra, m.groups)
            assert row['change'] == pytest.approx(expected, rel=1e-9, abs=0)
            assert (row['d_rms'] == 0) == (row['name'] in (stuck, frozen))
            assert row['trainable'] == (row['name'] != frozen)
        total = trained['components']['total']
        assert total['layers'] == len(layers) == 24
        assert (total['untrained'], total['untrained_trainable']) == (2, 1)
        changes = {row['name']: row['change'] for row in trained['layers']}
        assert total['max_change_layer'] == max(changes, key=changes.get)
        assert trained['components']['neck']['untrained'] == 1

    analyze_tool.main(args + frozen_stem)
    report = capsys.readouterr().out
    assert re.search(rf'1 frozen DOConv layer\(s\) keep D = 0 .*\({frozen}\)', report)
    assert re.search(rf'1 DOConv layer\(s\) with a trainable D still have D = 0\s+\({stuck}\)',
                     report)

    folded = tmp_path / 'folded.pth'
    torch.save(dict(meta=dict(doconv_folded=True),
                    state_dict=do_conv_mm.fold_doconv(model).state_dict()), folded)
    with pytest.raises(SystemExit, match=r'^error: .*folded\.pth is already folded'):
        analyze_tool.main([config, '--shape', '64', '64', '--checkpoint', str(folded)])
    with pytest.raises(SystemExit, match='pass --checkpoint CKPT with it'):
        analyze_tool.main([config, '--use-ema'])
    no_ema = tmp_path / 'no_ema.pth'
    torch.save(dict(meta={}, state_dict=state_dict), no_ema)
    with pytest.raises(SystemExit, match=r'^error: .*no_ema\.pth has no EMA weights'):
        analyze_tool.main([config, '--shape', '64', '64', '--checkpoint', str(no_ema),
                           '--use-ema'])


# ----------------------------------------------------------------------------------------------
# Config mistakes: one line that names the module / the close match and the fix
# ----------------------------------------------------------------------------------------------
TOY_RETINA_PLAIN = _config_path('toy/retinanet_r18-tiny_fpn_toy.py')


def _toy_config_with(tmp_path, conv_cfg):
    path = tmp_path / 'mistake.py'
    path.write_text(f"""_base_ = {TOY_RETINA_PLAIN!r}
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)
conv_cfg = {conv_cfg}
model = dict(backbone=dict(conv_cfg=conv_cfg), neck=dict(conv_cfg=conv_cfg),
             bbox_head=dict(conv_cfg=conv_cfg))
""")
    return str(path)


def test_global_conv_cfg_with_d_mul_below_the_7x7_stem_names_the_module(tmp_path, analyze_tool):
    from do_conv_mm.runner_setup import ToolError, build_runner, load_config, set_work_dir
    config = _toy_config_with(tmp_path, "dict(type='DOConv', D_mul=16)")
    expected = (r"DO-Conv cannot build module 'backbone\.conv1': its 7x7 kernel has kh\*kw=49 "
                r"taps, but model\.backbone\.conv_cfg sets D_mul=16, and D_mul must be >= kh\*kw "
                r"of every conv a conv_cfg builds\. Fix: leave D_mul out of "
                r"model\.backbone\.conv_cfg")
    cfg = load_config(config)
    set_work_dir(cfg, config, str(tmp_path / 'work'))
    with pytest.raises(ToolError, match=expected):  # tools/train.py and tools/test.py
        build_runner(cfg)
    with pytest.raises(SystemExit, match='error: ' + expected):
        analyze_tool.main([config, '--shape', '64', '64'])
    from do_conv_mm.deploy import FoldError, build_model
    with pytest.raises(FoldError, match=expected):  # tools/fold_doconv.py
        build_model(Config.fromfile(config))
    # The fix as the message gives it: D_mul on the components whose convs are all 3×3.
    cfg = Config.fromfile(config)
    cfg.model.backbone.conv_cfg = dict(type='DOConv')
    assert len(_kxk_convs(_build(cfg))[0]) == 24


def test_d_mul_message_names_the_module_in_a_two_stage_detector(tmp_path, analyze_tool):
    """The probe build that finds the module works where the model reads sub-configs as
    attributes (mmdet's TwoStageDetector: train_cfg.rpn), README's Faster R-CNN example."""
    config = tmp_path / 'faster_d_mul.py'
    config.write_text("""_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)
model = dict(backbone=dict(conv_cfg=dict(type='DOConv', D_mul=16)))
""")
    with pytest.raises(SystemExit, match=r"error: DO-Conv cannot build module 'backbone\.conv1'"
                                         r": its 7x7 kernel has kh\*kw=49 taps"):
        analyze_tool.main([str(config), '--shape', '64', '64'])


def test_conv_type_typo_names_the_close_match(tmp_path):
    from do_conv_mm.runner_setup import ToolError, load_config
    config = _toy_config_with(tmp_path, "dict(type='DOconv')")
    with pytest.raises(ToolError, match=r"model\.backbone\.conv_cfg: conv type 'DOconv' is not "
                                        r"registered \(mmcv would stop with \"Cannot find None in "
                                        r"registry\"\); did you mean 'DOConv'"):
        load_config(config)
    with pytest.raises(DOConvNotApplicableError, match=r"did you mean 'DOConv2d'"):
        check_doconv_cfg(dict(type='EncoderDecoder', backbone=dict(
            type='ResNetV1c', conv_cfg=dict(type='DOConv2D'))), scope='mmseg')
    with pytest.raises(DOConvNotApplicableError, match=r"registered conv types: .*'DOConv'.*"
                                                        r"custom_imports"):
        check_doconv_cfg(dict(type='RetinaNet', neck=dict(conv_cfg=dict(type='Zebra'))),
                         scope='mmdet')
    check_doconv_cfg(dict(type='RetinaNet', neck=dict(conv_cfg=dict(type='DOConv'))),
                     scope='mmdet')
    check_doconv_cfg(dict(type='RetinaNet', neck=dict(conv_cfg=dict(type='Conv2d'))),
                     scope='mmdet')


def test_config_that_does_not_load_is_one_line(tmp_path, analyze_tool):
    """mmseg's UNet sets conv_cfg=None: a child conv_cfg dict cannot merge into it (mmengine
    says to use _delete_); the tools report that in one line instead of a loader traceback."""
    from do_conv_mm.runner_setup import ToolError, load_config
    path = tmp_path / 'unet.py'
    path.write_text("_base_ = 'mmseg::unet/unet-s5-d16_fcn_4xb4-160k_cityscapes-512x1024.py'\n"
                    "custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)\n"
                    "model = dict(backbone=dict(conv_cfg=dict(type='DOConv')))\n")
    expected = (r"config '.*unet\.py' could not be loaded \(TypeError: conv_cfg=\{'type': "
                r"'DOConv'\} in child config cannot inherit from base.*_delete_=True")
    with pytest.raises(ToolError, match=expected):
        load_config(str(path))
    with pytest.raises(SystemExit, match='error: ' + expected):
        analyze_tool.main([str(path)])
    # The fix mmengine names works: the UNet backbone's 18 k×k convs become DO-Conv.
    path.write_text(path.read_text().replace("dict(type='DOConv')",
                                             "dict(_delete_=True, type='DOConv')"))
    cfg = load_config(str(path))
    assert len([n for n in _kxk_convs(_build(cfg))[0] if n.startswith('backbone.')]) == 18
    # _delete_ where the base has no conv_cfg (the decode head) is not consumed by mmengine and
    # would reach DOConv2d as an argument: named with the fix instead.
    path.write_text(path.read_text() + "model.update(decode_head=dict(conv_cfg=dict(\n"
                                       "    _delete_=True, type='DOConv')))\n")
    with pytest.raises(ToolError, match=r"model\.decode_head\.conv_cfg still holds _delete_=True "
                                        r".*base config has no conv_cfg there.*Remove _delete_"):
        load_config(str(path))


@pytest.mark.parametrize('missing', ['mmdet', 'mmsegmentation'])
def test_config_whose_base_package_is_missing_names_the_package_not_the_file(
        monkeypatch, missing):
    """A shipped config inherits ``mmdet::`` / ``mmseg::`` bases: where that package is not
    installed, every tool says which to install (it said "fix the config file"); the fold tool
    too."""
    import mmengine.config.config as mmengine_config

    from do_conv_mm.deploy import FoldError
    from do_conv_mm.deploy.fold_model import load_model_config
    from do_conv_mm.runner_setup import ToolError, load_config
    monkeypatch.setattr(mmengine_config, 'is_installed', lambda package: package != missing)
    config = osp.join(REPO, 'configs', 'mmdet' if missing == 'mmdet' else 'mmseg',
                      'faster-rcnn_r50-doconv_fpn_1x_coco.py' if missing == 'mmdet' else
                      'pspnet_r50-d8-doconv_4xb2-80k_cityscapes-512x1024.py')
    pin = {'mmdet': 'mmdet==3.3.0', 'mmsegmentation': 'mmsegmentation==1.2.2'}[missing]
    expected = (rf"could not be loaded \(ModuleNotFoundError: {missing} is not installed.*\); "
                rf"it needs {missing}: pip install {pin}, or bash tools/install.sh\.$")
    with pytest.raises(ToolError, match=expected):
        load_config(config)
    with pytest.raises(FoldError, match=expected):
        load_model_config(config, None)


# Run first in a fresh interpreter: mmcv._ext missing (mmcv-lite), or present but not loadable
# (built for another torch; here a file the loader rejects, served at mmcv's name).
NO_MMCV_OPS = "import sys; sys.modules['mmcv._ext'] = None\n"
BROKEN_MMCV_OPS = """import importlib.abc, importlib.machinery, importlib.util, sys
BAD = {bad!r}
class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == 'mmcv._ext':
            loader = importlib.machinery.ExtensionFileLoader(name, BAD)
            return importlib.util.spec_from_file_location(name, BAD, loader=loader)
sys.meta_path.insert(0, Finder())
"""


@pytest.mark.parametrize('ops', ['missing', 'broken'])
def test_mmcv_ops_that_do_not_load_are_one_line_naming_the_fix(tmp_path, ops):
    """With mmcv-lite (no ``mmcv._ext``), or an ``_ext`` built for another torch, mmdet's models
    do not import: the tools say so in one line with the fix, instead of a 54-line traceback.
    Run in a fresh interpreter (this one has imported mmdet already)."""
    import sysconfig
    config = osp.join(REPO, 'configs', 'toy', 'retinanet_r18-tiny-doconv_fpn_toy.py')
    bad = tmp_path / 'mmcv' / ('_ext' + sysconfig.get_config_var('EXT_SUFFIX'))
    bad.parent.mkdir()
    bad.write_bytes(b'not a shared library')
    script = ((NO_MMCV_OPS if ops == 'missing' else BROKEN_MMCV_OPS.format(bad=str(bad)))
              + "from do_conv_mm.runner_setup import ToolError, load_config\n"
              "try:\n"
              f"    load_config({config!r})\n"
              "except ToolError as error:\n"
              "    print('ToolError:', error)\n")
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    cause = r'.*mmcv\._ext.*' if ops == 'missing' else r'.*_ext.*'
    assert re.fullmatch(rf"ToolError: mmdet's models need mmcv's compiled ops, and those of mmcv "
                        rf"\S+ do not load \({cause}\): it is mmcv-lite, was built without ops, "
                        rf"or for another torch\. pip uninstall mmcv-lite mmcv, then bash "
                        rf"tools/install\.sh .*\n", result.stdout), result.stdout


MMDET_CONFIGS = osp.join(osp.dirname(importlib.util.find_spec('mmdet').origin), '.mim', 'configs')
MMSEG_CONFIGS = osp.join(osp.dirname(importlib.util.find_spec('mmseg').origin), '.mim', 'configs')


def _conv_type_warnings(load):
    """The messages of the conv-type warnings that ``load()`` emits."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        load()
    return [str(w.message) for w in caught if 'builds DO-Conv over' in str(w.message)]


def test_doconv_over_a_conv_type_set_by_a_base_config_is_warned_with_the_fix(tmp_path,
                                                                              analyze_tool):
    """mmengine's merge keeps only the child's conv type, so conv_cfg=DOConv over the GN+WS
    recipe's ConvWS would drop the weight standardisation without a word: the tools warn and name
    DOConvWS (DOConvWS itself is silent), also when --cfg-options does the replacing; over
    DetectoRS' ConvAWS, which has no DO-Conv twin, the warning says so."""
    from do_conv_mm.runner_setup import load_config
    gn_ws = osp.join(MMDET_CONFIGS, 'gn+ws', 'faster-rcnn_r50_fpn_gn-ws-all_1x_coco.py')
    child = tmp_path / 'gn_ws_doconv.py'
    child.write_text(f'_base_ = {gn_ws!r}\n'
                     "custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)\n"
                     "model = dict(backbone=dict(conv_cfg=dict(type='DOConv')),\n"
                     "             neck=dict(conv_cfg=dict(type='DOConvWS')))\n")
    expected = (r"model\.backbone: the base config '.*gn\+ws/faster-rcnn_r50_fpn_gn-ws-all_1x_coco"
                r"\.py' sets conv_cfg=dict\(type='ConvWS'\) there, but conv_cfg=dict\(type='DOConv'"
                r"\) builds DO-Conv over a plain Conv2d, which drops weight standardisation.*To "
                r"keep it use conv_cfg=dict\(type='DOConvWS'\)\.$")
    messages = _conv_type_warnings(lambda: load_config(str(child)))
    assert len(messages) == 1 and re.match(expected, messages[0]), messages
    messages = _conv_type_warnings(lambda: analyze_tool.main([str(child), '--shape', '64', '64']))
    assert len(messages) == 1 and re.match(expected, messages[0]), messages
    # With DOConvWS on the backbone too, nothing is dropped: silent.
    child.write_text(child.read_text().replace("dict(type='DOConv')", "dict(type='DOConvWS')"))
    assert _conv_type_warnings(lambda: load_config(str(child))) == []
    # --cfg-options replacing the file's own ConvWS.
    messages = _conv_type_warnings(lambda: load_config(
        gn_ws, cfg_options={'model.neck.conv_cfg': dict(type='DOConv')}))
    assert len(messages) == 1 and re.match(
        r"model\.neck: .*gn-ws-all_1x_coco\.py \(before --cfg-options\) sets conv_cfg=dict\("
        r"type='ConvWS'\) there.*type='DOConvWS'", messages[0]), messages
    # DetectoRS: ConvAWS has no DO-Conv twin.
    sac = osp.join(MMDET_CONFIGS, 'detectors', 'cascade-rcnn_r50-sac_1x_coco.py')
    child.write_text(f'_base_ = {sac!r}\n'
                     "model = dict(backbone=dict(conv_cfg=dict(type='DOConv')))\n")
    messages = _conv_type_warnings(lambda: load_config(str(child)))
    assert len(messages) == 1 and re.match(
        r"model\.backbone: the base config .* sets conv_cfg=dict\(type='ConvAWS'\) there.*drops "
        r"adaptive weight standardisation.*DO-Conv has no twin of ConvAWS; to keep it, leave "
        r"model\.backbone without conv_cfg=dict\(type='DOConv'\)\.$", messages[0]), messages


def test_doconv_where_a_component_builds_1d_convs_is_refused():
    """PointRend's point heads build Conv1d layers by default (their conv_cfg default): a DO-Conv
    conv_cfg there would build 2-D layers that fail on the first forward deep inside the head, so
    the config check refuses it in one line naming the path; the neighbouring FPN head (plain
    Conv2d by default) takes it."""
    from do_conv_mm.runner_setup import ToolError, load_config
    config = osp.join(MMSEG_CONFIGS, 'point_rend', 'pointrend_r50_4xb4-160k_ade20k-512x512.py')
    cfg = Config.fromfile(config)
    cfg.model.decode_head[1].conv_cfg = dict(type='DOConv')
    expected = (r"model\.decode_head\[1\] \(PointHead\) builds its convs as Conv1d by default "
                r"\(1-D convolutions\), but conv_cfg=dict\(type='DOConv'\) builds 2-D DO-Conv "
                r"layers, which fail on 1-D inputs\. DO-Conv applies to 2-D convolutions only: "
                r"remove conv_cfg from model\.decode_head\[1\]\.")
    with pytest.raises(DOConvNotApplicableError, match=expected):
        check_doconv_cfg(cfg.model, scope='mmseg')
    with pytest.raises(ToolError, match=expected):
        load_config(config, cfg_options={'model.decode_head.1.conv_cfg': dict(type='DOConv')})
    cfg.model.decode_head[1].conv_cfg = dict(type='Conv1d')
    cfg.model.decode_head[0].conv_cfg = dict(type='DOConv')
    assert _conv_type_warnings(lambda: check_doconv_cfg(cfg.model, scope='mmseg')) == []
    # Likewise over a transposed conv type that an earlier config set there.
    from do_conv_mm.config_check import check_base_conv_types
    child = Config(dict(default_scope='mmdet', model=dict(type='CenterNet', neck=dict(
        type='CTResNetNeck', conv_cfg=dict(type='DOConv')))))
    with pytest.raises(DOConvNotApplicableError, match=r"model\.neck: the base sets conv_cfg=dict"
                                                        r"\(type='deconv'\) there \(transposed "
                                                        r"convolutions.*remove conv_cfg"):
        check_base_conv_types(child, [('the base', dict(type='CenterNet', neck=dict(
            type='CTResNetNeck', conv_cfg=dict(type='deconv'))))])


# ----------------------------------------------------------------------------------------------
# SyncBN in the shipped mmseg configs
# ----------------------------------------------------------------------------------------------
MMSEG_SHIPPED = [name for name, _, _ in SHIPPED if name.startswith('mmseg/')]


def _sync_bn_paths(model_cfg):
    from do_conv_mm.convert import walk_cfg
    return [p for p, node in walk_cfg(model_cfg, 'model') if node.get('type') == 'SyncBN']


def test_readme_convert_everything_config_works_as_written(tmp_path):
    """The README's three-line config that converts every k×k conv of a model-zoo model builds,
    as written, the same DO-Conv layers as the shipped Faster R-CNN config (the README says so),
    with the stem and layer1 frozen, and equals the plain model at D = 0."""
    with open(osp.join(REPO, 'README.md')) as f:
        readme = f.read()
    section = readme[readme.index('Every k×k conv of any model-zoo model'):]
    snippet = re.search(r'```python\n(.*?)```', section, re.S).group(1)
    assert "doconv=dict()" in snippet and 'conv_cfg' not in snippet
    path = tmp_path / 'everything.py'
    path.write_text(snippet)
    everything = _build(Config.fromfile(str(path)))
    shipped_name = 'mmdet/faster-rcnn_r50-doconv_fpn_1x_coco.py'
    shipped = _build(Config.fromfile(_config_path(shipped_name)))
    assert _kxk_convs(everything) == _kxk_convs(shipped)
    assert len(_kxk_convs(everything)[0]) == 22
    frozen = [n for n, m in everything.named_modules() if isinstance(m, DOConv2d)
              and m.D is not None and not m.D.requires_grad]
    assert frozen == ['backbone.conv1'] + [f'backbone.layer1.{i}.conv2' for i in range(3)]
    plain = _build(Config.fromfile(_base_config_path(shipped_name)))
    plain.load_state_dict({k: v for k, v in everything.state_dict().items()
                           if not k.endswith('.D')})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(everything.eval().extract_feat(x)[-1], plain.eval().extract_feat(x)[-1])


def test_readme_syncbn_advice_works_as_written():
    """The README's --cfg-options for plain BN, applied as written (the components it names for
    each config), leave no SyncBN in any shipped mmseg config, and the model builds (norm_cfg is
    nested per component: a top-level norm_cfg.type=BN changes a variable nothing reads)."""
    import argparse
    import re
    import shlex
    from mmengine.config import DictAction
    with open(osp.join(REPO, 'README.md')) as f:
        readme = f.read()
    section = readme[readme.index('SyncBN'):]
    snippet = re.search(r'`(--cfg-options [^`]*norm_cfg[^`]*)`', section).group(1)
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    options = parser.parse_args(shlex.split(snippet)).cfg_options
    assert len(options) == 3
    components = {  # what the README says beside the snippet
        'fcn_hr18': ('backbone', 'decode_head'), 'segformer': ('decode_head', )}
    for name in MMSEG_SHIPPED:
        cfg = Config.fromfile(_config_path(name))
        assert _sync_bn_paths(cfg.model), name  # the base recipes use SyncBN
        named = next((c for key, c in components.items() if key in name), None)
        cfg.merge_from_dict({k: v for k, v in options.items()
                             if named is None or k.split('.')[1] in named})
        assert _sync_bn_paths(cfg.model) == [], name
        if named is not None:
            _build(cfg)  # no component created by the options


def test_cpu_distributed_reverts_sync_bn_in_the_config():
    from do_conv_mm.runner_setup import revert_sync_bn_cfg
    for name in MMSEG_SHIPPED:
        cfg = Config.fromfile(_config_path(name))
        sync_bn = set(_sync_bn_paths(cfg.model))
        assert 'model.decode_head.norm_cfg' in sync_bn, name
        if 'auxiliary_head' in cfg.model:
            assert {'model.backbone.norm_cfg', 'model.auxiliary_head.norm_cfg'} <= sync_bn, name
        assert set(revert_sync_bn_cfg(cfg.model)) == sync_bn, name
        assert _sync_bn_paths(cfg.model) == []
        model = _build(cfg) if name == MMSEG_SHIPPED[0] else None
        if model is not None:
            assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


@pytest.mark.parametrize('num_classes', [1, 2])
def test_analyze_tool_loss_pass_with_fewer_classes_than_dummy_boxes(num_classes, capsys,
                                                                     analyze_tool):
    """The synthetic annotation has 3 boxes; their labels stay below every head's num_classes
    (a 1-class detector used to fail with 'Class values must be smaller than num_classes')."""
    capsys.readouterr()
    analyze_tool.main([_config_path('toy/retinanet_r18-tiny-doconv_fpn_toy.py'), '--shape', '64',
                       '64', '--json', '--cfg-options',
                       f'model.bbox_head.num_classes={num_classes}'])
    result = json.loads(capsys.readouterr().out)
    assert result['mode'] == 'loss' and result['total']['doconv_kxk'] == 24


def test_analyze_tool_loss_pass_on_a_cascade_segmentor(tmp_path, capsys, analyze_tool):
    """OCRNet's decode_head is a list of heads (CascadeEncoderDecoder): the dummy labels stay
    below every head's num_classes (the tool read num_classes off the list and failed)."""
    config = tmp_path / 'ocrnet_hr18s-doconv.py'
    config.write_text("_base_ = 'mmseg::ocrnet/ocrnet_hr18s_4xb2-160k_cityscapes-512x1024.py'\n"
                      "custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)\n"
                      "model = dict(backbone=dict(conv_cfg=dict(type='DOConv')))\n")
    capsys.readouterr()
    analyze_tool.main([str(config), '--shape', '64', '64', '--json', '--cfg-options',
                       'model.decode_head.1.num_classes=3'])
    result = json.loads(capsys.readouterr().out)
    model = _build(Config.fromfile(str(config)))
    doconv_kxk = sum(isinstance(m, DOConv2d) and m.D is not None for m in model.modules())
    assert result['mode'] == 'loss' and result['not_run'] == []
    assert result['total']['doconv_kxk'] == doconv_kxk > 100


def test_a_component_that_drops_conv_cfg_is_named(tmp_path):
    """mmseg 1.2.2's BiSeNetV2 takes conv_cfg and never passes it on: the DO-Conv setting builds
    nothing there. The check names that component (and not the heads, which built DO-Conv), and
    the tools say it as a warning (they said nothing)."""
    c = "dict(type='DOConv')"
    config = tmp_path / 'bisenetv2-doconv.py'
    config.write_text(
        "_base_ = 'mmseg::bisenetv2/bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024.py'\n"
        "custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)\n"
        f"model = dict(backbone=dict(conv_cfg={c}), decode_head=dict(conv_cfg={c}))\n")
    cfg = Config.fromfile(str(config))
    model = _build(cfg)
    [line] = components_ignoring_conv_cfg(cfg.model, model)
    assert line.startswith("model.backbone (BiSeNetV2) sets conv_cfg='DOConv' but built no "
                           "DO-Conv layer") and "doconv=dict(include=['backbone'])" in line
    assert any(isinstance(m, DOConv2d) for m in model.decode_head.modules())
    from do_conv_mm.runner_setup import _warn_conv_cfg_ignored
    from mmengine.logging import MMLogger
    logger = MMLogger.get_instance('test_conv_cfg_ignored', log_file=str(tmp_path / 'log.txt'))
    _warn_conv_cfg_ignored(cfg, model)  # logs to the current (latest) MMLogger
    for handler in logger.handlers:
        handler.flush()
    assert 'DO-Conv: model.backbone (BiSeNetV2) sets conv_cfg' in (tmp_path / 'log.txt').read_text()
