"""Shipped model-zoo configs, by-name conversion (convert_to_doconv / DOConvModel), coverage tool.

Outputs of converted models are compared with torch.equal: with D = 0 the composed kernel is
weight + bmm(0, W) = weight bit for bit, and the same conv kernel runs on the same input, so a
converted model computes the identical tensor (no tolerance needed).
"""
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

import do_conv_mm
from do_conv_mm import DOConv2d, check_doconv_cfg, convert_to_doconv, count_doconv
from do_conv_mm.analysis import conv_flops_by_module, doconv_coverage
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
    model = MODELS.build(dict(type='DOConvModel', model_type=TinyNet, channels=6,
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
        MODELS.build(dict(type='DOConvModel', model_type=TinyNet, doconv=dict(includes=['x'])))
    with pytest.raises(ValueError, match='not .DOConvModel. itself'):
        MODELS.build(dict(type='DOConvModel', model_type='DOConvModel'))
    with pytest.raises(ValueError, match='matches no module name'):
        MODELS.build(dict(type='DOConvModel', model_type=TinyNet, doconv=dict(include=['nek'])))


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
