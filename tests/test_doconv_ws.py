"""DOConv2dWS: DO-Conv with mmcv ConvWS2d's weight standardisation (mmdet's GN+WS recipes).

The reference for every check is mmcv's own ConvWS2d holding the kernel of the paper's formula,
built entry by entry (test_doconv_layer.reference_kernel).
"""
import os.path as osp
from copy import deepcopy

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule, build_conv_layer
from mmcv.cnn.bricks import ConvWS2d
from mmengine.config import Config

from do_conv_mm import (DOConv2d, DOConv2dWS, convert_to_doconv, fold_doconv, fold_state_dict,
                        make_deploy_config)
from test_configs import _build, _kxk_convs, _plain_keys
from test_doconv_layer import ATOL64, randomise, reference_kernel

# (in, out, kernel, stride, padding, groups, D_mul): plain, grouped and strided, depthwise 5×5.
CASES = [(4, 8, 3, 1, 1, 1, None), (4, 8, 3, 2, 1, 2, 12), (4, 4, 5, 1, 2, 4, None)]
IDS = ['g1', 'g2-stride2-Dmul12', 'dw-5x5']


def mmcv_twin(layer: DOConv2dWS, kernel: torch.Tensor = None) -> ConvWS2d:
    """mmcv's ConvWS2d (same eps and bias) holding ``kernel``, by default the formula's kernel
    of ``layer``."""
    conv = ConvWS2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                    layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                    eps=layer.eps).to(layer.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(reference_kernel(layer) if kernel is None else kernel)
        conv.bias.copy_(layer.bias)
    return conv


@pytest.mark.parametrize('cin,cout,kernel,stride,padding,groups,D_mul', CASES, ids=IDS)
def test_fresh_layer_is_exactly_conv_ws(cin, cout, kernel, stride, padding, groups, D_mul):
    """D = 0: bit for bit mmcv's ConvWS2d (eps carried over), in training, no_grad and eval."""
    torch.manual_seed(0)
    plain = ConvWS2d(cin, cout, kernel, stride, padding, groups=groups, eps=1e-4)
    x = torch.randn(2, cin, 9, 10)
    expected = plain(x)
    layer = DOConv2dWS.from_conv2d(deepcopy(plain), D_mul=D_mul)
    assert layer.eps == 1e-4 and layer.weight.shape == plain.weight.shape
    assert torch.equal(layer(x), expected)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    assert torch.equal(layer.eval()(x), expected)


@pytest.mark.parametrize('cin,cout,kernel,stride,padding,groups,D_mul', CASES, ids=IDS)
def test_matches_formula_trains_and_folds(cin, cout, kernel, stride, padding, groups, D_mul):
    """Random D: float64 outputs equal mmcv's ConvWS2d with the formula's kernel (the
    standardisation applies to W'); gradcheck of every parameter and the input; the fold is a
    ConvWS2d computing the same (1e-10: see ATOL64)."""
    layer = randomise(DOConv2dWS(cin, cout, kernel, stride, padding, 1, groups,
                                 D_mul=D_mul).double())
    x = torch.randn(2, cin, 9, 10, dtype=torch.float64)
    expected = mmcv_twin(layer)(x)
    got = layer(x)
    assert (got - expected).abs().max() < ATOL64
    # Without D the output is another one: D acts before the standardisation.
    with torch.no_grad():
        assert (mmcv_twin(layer, layer.weight)(x) - expected).abs().max() > 1e-3
    got.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    small = torch.randn(1, cin, 6, 7, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    assert torch.autograd.gradcheck(
        lambda inp, *params: torch.func.functional_call(layer, dict(zip(names, params)), (inp,)),
        (small, *[p.detach().requires_grad_() for p in layer.parameters()]))
    folded = layer.eval().to_conv2d()
    assert type(folded) is ConvWS2d and folded.eps == layer.eps
    with torch.no_grad():
        assert (folded(x) - expected).abs().max() < ATOL64


def test_conv_cfg_init_cfg_deploy_config_and_bad_arguments():
    """conv_cfg 'DOConvWS' reaches build_conv_layer and ConvModule (with GN, as the GN+WS
    recipes); init_cfg layer='Conv2d' reaches it; its deploy config names ConvWS and
    fold_state_dict's weights strict-load into that plain model with the same outputs."""
    from mmengine.model import BaseModule
    layer = build_conv_layer(dict(type='DOConvWS', D_mul=12, eps=1e-3), 4, 8, 3, padding=1)
    assert type(layer) is DOConv2dWS and layer.D_mul == 12 and layer.eps == 1e-3

    class Init(BaseModule):
        def __init__(self):
            super().__init__(init_cfg=dict(type='Constant', layer='Conv2d', val=0.5, bias=0.25))
            self.conv = DOConv2dWS(4, 8, 3)

    initialised = Init()
    initialised.init_weights()
    assert (initialised.conv.weight == 0.5).all() and torch.count_nonzero(initialised.conv.D) == 0

    class Block(nn.Module):
        def __init__(self, conv_cfg):
            super().__init__()
            self.body = ConvModule(4, 8, 3, stride=2, padding=1, conv_cfg=conv_cfg,
                                   norm_cfg=dict(type='GN', num_groups=4))

    block = Block(dict(type='DOConvWS'))
    with torch.no_grad():
        block.body.conv.D.normal_(0, 0.2)
    x = torch.randn(2, 4, 10, 10)
    block.eval()
    deploy = make_deploy_config(Config(dict(model=dict(
        backbone=dict(conv_cfg=dict(type='DOConvWS', D_mul=12, eps=1e-3))))))
    assert deploy.model.backbone.conv_cfg == dict(type='ConvWS', eps=1e-3)
    plain = Block(dict(type='ConvWS')).eval()
    plain.load_state_dict(fold_state_dict(block.state_dict()))
    assert type(plain.body.conv) is ConvWS2d
    with torch.no_grad():
        got, want = plain.body(x), block.body(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    with pytest.raises(ValueError, match="padding_mode='reflect'.*use DOConv2d"):
        DOConv2dWS(4, 8, 3, padding_mode='reflect')
    with pytest.raises(TypeError, match='expects an mmcv ConvWS2d, got Conv2d'):
        DOConv2dWS.from_conv2d(nn.Conv2d(4, 8, 3))


def test_gn_ws_recipe_with_doconv_ws_equals_it_at_d0_and_folds_back():
    """mmdet's Faster R-CNN R50 GN+WS recipe (loaded by file path: mmengine's 'mmdet::' paths do
    not take the '+' of gn+ws) with conv_cfg 'DOConvWS' wherever the recipe has 'ConvWS': the
    same state_dict keys plus D, the identical output at D = 0 from the same seed, and a fold
    back into ConvWS2d at the same names (fp32 fold rounding: 1e-4 relative)."""
    from mmengine.utils import get_installed_path
    recipe = osp.join(get_installed_path('mmdet'), '.mim', 'configs', 'gn+ws',
                      'faster-rcnn_r50_fpn_gn-ws-all_1x_coco.py')
    base = Config.fromfile(recipe)
    base.model.backbone.init_cfg = None
    cfg = deepcopy(base)
    cfg.model.backbone.conv_cfg = cfg.model.neck.conv_cfg = dict(type='DOConvWS')
    cfg.model.roi_head.bbox_head.conv_cfg = dict(type='DOConvWS')
    torch.manual_seed(0)
    model = _build(cfg).eval()
    torch.manual_seed(0)
    stock = _build(base).eval()
    ws = [n for n, m in stock.named_modules() if type(m) is ConvWS2d]
    assert ws and all(type(model.get_submodule(n)) is DOConv2dWS for n in ws)
    assert _plain_keys(model.state_dict()) == list(stock.state_dict())
    x, rois = torch.randn(1, 3, 64, 64), torch.randn(3, 256, 7, 7)

    def outputs(detector):  # backbone + neck features, RPN maps, RoI head on given RoI features
        feats = detector.extract_feat(x)
        rpn_cls, rpn_reg = detector.rpn_head(feats)
        return [*feats, *rpn_cls, *rpn_reg, *detector.roi_head.bbox_head(rois)]

    with torch.no_grad():
        got, want = outputs(model), outputs(stock)
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
    # By name, the same: convert_to_doconv turns the recipe's ConvWS2d into DOConv2dWS.
    converted = convert_to_doconv(deepcopy(stock), include=['backbone'])
    assert set(converted) == {n for n in _kxk_convs(model)[0] if n.startswith('backbone.')}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DOConv2d) and m.D is not None:
                m.D.normal_(0, 0.05)
        unfolded = model.backbone(x)
    folded = fold_doconv(model)
    assert [n for n, m in folded.named_modules() if type(m) is ConvWS2d] == ws
    with torch.no_grad():
        for got, want in zip(folded.backbone(x), unfolded):
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
