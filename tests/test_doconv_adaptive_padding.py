"""DOConv2dAdaptivePadding: DO-Conv with mmcv Conv2dAdaptivePadding's TensorFlow 'SAME' padding.

The reference for every check is mmcv's own Conv2dAdaptivePadding (it does the padding) holding
the kernel of the paper's formula, built entry by entry (test_doconv_layer.reference_kernel).
"""
import os.path as osp
import warnings
from copy import deepcopy

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule, build_conv_layer
from mmcv.cnn.bricks import Conv2dAdaptivePadding
from mmengine.config import Config

from do_conv_mm import (DOConv2d, DOConv2dAdaptivePadding, check_doconv_cfg, convert_to_doconv,
                        fold_doconv, fold_state_dict, make_deploy_config)
from do_conv_mm.analysis import conv_flops_by_module, doconv_coverage
from test_doconv_layer import ATOL64, randomise, reference_kernel

# (kernel, stride, dilation, groups, input size): even and odd sizes, where 'SAME' padding is
# asymmetric (even size, stride 2) and symmetric; a 5×5 depthwise, a dilated and a 3×5 kernel.
CASES = [(3, 2, 1, 1, (10, 8)), (3, 2, 1, 1, (9, 9)), (3, 1, 1, 2, (8, 7)),
         (5, 2, 1, 4, (10, 11)), (3, 2, 2, 1, (7, 8)), ((3, 5), (2, 1), 1, 1, (12, 9))]
EFFICIENTNET_CONFIG = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs', 'mmdet',
                               'retinanet_effb3-doconv_fpn_8xb4-crop896-1x_coco.py')
IDS = [f'k{k}-s{s}-d{d}-g{g}-{h}x{w}' for k, s, d, g, (h, w) in CASES]


def mmcv_twin(layer: DOConv2dAdaptivePadding) -> Conv2dAdaptivePadding:
    """mmcv's Conv2dAdaptivePadding with the formula's kernel of ``layer``."""
    conv = Conv2dAdaptivePadding(layer.in_channels, layer.out_channels, layer.kernel_size,
                                 layer.stride, 0, layer.dilation, layer.groups,
                                 layer.bias is not None).to(layer.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(reference_kernel(layer))
        conv.bias.copy_(layer.bias)
    return conv


@pytest.mark.parametrize('kernel,stride,dilation,groups,size', CASES, ids=IDS)
def test_fresh_layer_is_exactly_conv2d_adaptive_padding(kernel, stride, dilation, groups, size):
    """D = 0: bit for bit mmcv's layer, in training, no_grad and eval, D_mul = kh*kw and more."""
    torch.manual_seed(0)
    plain = Conv2dAdaptivePadding(4, 8, kernel, stride, 0, dilation, groups)
    x = torch.randn(2, 4, *size)
    expected = plain(x)
    for D_mul in (None, 30):
        layer = DOConv2dAdaptivePadding.from_conv2d(deepcopy(plain), D_mul=D_mul)
        assert layer.padding == (0, 0) and layer.weight.shape == plain.weight.shape
        assert torch.equal(layer(x), expected)
        with torch.no_grad():
            assert torch.equal(layer(x), expected)
        assert torch.equal(layer.eval()(x), expected)


@pytest.mark.parametrize('kernel,stride,dilation,groups,size', CASES, ids=IDS)
def test_matches_formula_trains_and_folds(kernel, stride, dilation, groups, size):
    """Random D (and extra columns): float64 outputs equal mmcv's layer with the formula's
    kernel in training and eval; gradcheck of every parameter and the input; the fold is a
    Conv2dAdaptivePadding computing the same (1e-10: see ATOL64)."""
    layer = randomise(DOConv2dAdaptivePadding(4, 8, kernel, stride, 0, dilation, groups,
                                              D_mul=12 if kernel == 3 else None).double())
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    expected = mmcv_twin(layer)(x)
    got = layer(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < ATOL64
    got.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    small = torch.randn(1, 4, *size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda inp, *params: torch.func.functional_call(
            layer, dict(zip([n for n, _ in layer.named_parameters()], params)), (inp,)),
        (small, *[p.detach().requires_grad_() for p in layer.parameters()]))
    layer.eval()
    folded = layer.to_conv2d()
    assert type(folded) is Conv2dAdaptivePadding and not folded.training
    with torch.no_grad():
        assert (layer(x) - expected).abs().max() < ATOL64
        assert (folded(x) - expected).abs().max() < ATOL64


def test_built_from_conv_cfg_and_deployed_as_conv2d_adaptive_padding():
    """conv_cfg type 'DOConvAdaptivePadding' reaches mmcv's build_conv_layer and ConvModule (a
    ``padding`` argument is ignored, as by Conv2dAdaptivePadding); its deploy config names
    Conv2dAdaptivePadding; fold_state_dict's weights strict-load into that plain model."""
    layer = build_conv_layer(dict(type='DOConvAdaptivePadding', D_mul=12), 4, 8, 3, stride=2,
                             padding=1)
    assert type(layer) is DOConv2dAdaptivePadding and layer.padding == (0, 0)
    assert layer.D_mul == 12 and layer.weight_extra.shape == (8, 4, 3)

    def block(conv_cfg):
        torch.manual_seed(0)
        return nn.Sequential(ConvModule(4, 8, 3, stride=2, padding=1, conv_cfg=conv_cfg,
                                        norm_cfg=dict(type='BN')),
                             ConvModule(8, 8, 3, padding=1, conv_cfg=conv_cfg))

    model = block(dict(type='DOConvAdaptivePadding'))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DOConv2d):
                m.D.normal_(0, 0.2)
    x = torch.randn(2, 4, 10, 10)
    model(x).mean().backward()
    assert all(m.D.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, DOConv2d))
    model.eval()
    deploy = make_deploy_config(Config(dict(
        model=dict(backbone=dict(conv_cfg=dict(type='DOConvAdaptivePadding', D_mul=12)),
                   neck=dict(conv_cfg=dict(type='DOConv')),
                   predictor=dict(type='mmdet.DOConvAdaptivePadding', D_mul=12)),
        custom_imports=dict(imports=['do_conv_mm']))))
    assert deploy.model.backbone.conv_cfg == dict(type='Conv2dAdaptivePadding')
    assert deploy.model.neck.conv_cfg is None
    assert deploy.model.predictor == dict(type='Conv2dAdaptivePadding')
    plain = block(deploy.model.backbone.conv_cfg).eval()
    plain.load_state_dict(fold_state_dict(model.state_dict()))
    assert all(type(m.conv) is Conv2dAdaptivePadding for m in plain)
    with torch.no_grad():
        assert (plain(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()
        # TorchScript composes with compose_kernel: the same sums in another order (fp32).
        h = torch.randn(2, 8, 5, 6)
        expected = model[1].conv(h)
        scripted = torch.jit.script(model[1].conv)(h)
        assert (scripted - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_init_cfg_for_conv2d_layers_reaches_it():
    """mmengine matches init_cfg ``layer=`` against a module's class and direct bases: the
    'Conv2d' of EfficientNet's default Kaiming init reaches DOConv2dAdaptivePadding (D stays 0),
    and 'DOConv2d' does too."""
    from mmengine.model import BaseModule

    class Block(BaseModule):
        def __init__(self, layer):
            super().__init__(init_cfg=dict(type='Constant', layer=layer, val=0.5, bias=0.25))
            self.conv = DOConv2dAdaptivePadding(4, 8, 3, 2)

    for layer in ('Conv2d', 'DOConv2d'):
        block = Block(layer)
        block.init_weights()
        assert (block.conv.weight == 0.5).all() and (block.conv.bias == 0.25).all(), layer
        assert torch.count_nonzero(block.conv.D) == 0


def test_dynamic_export_of_size_dependent_same_padding_is_refused():
    """tools/deploy_onnx.py --dynamic on a folded 'SAME'-padded model: the strided k×k
    Conv2dAdaptivePadding layers (whose padding depends on the input size and would be baked
    into the graph) are named and the export is refused; stride-1 and 1×1 ones pad the same at
    every size and pass."""
    from do_conv_mm.onnx_deploy.onnx_checks import refuse_dynamic_same_padding
    from do_conv_mm.onnx_deploy import DeployError
    constant = nn.Sequential(Conv2dAdaptivePadding(3, 4, 3), Conv2dAdaptivePadding(4, 4, 1, 2))
    refuse_dynamic_same_padding(constant)
    model = nn.Sequential(constant, Conv2dAdaptivePadding(4, 4, 3, 2))
    with pytest.raises(DeployError, match=r"'SAME' padding of 1 strided Conv2dAdaptivePadding "
                                          r"layer\(s\) \(1\).*drop --dynamic"):
        refuse_dynamic_same_padding(model)


def test_bad_arguments():
    with pytest.raises(ValueError, match="padding_mode='reflect'.*use DOConv2d"):
        DOConv2dAdaptivePadding(4, 8, 3, padding_mode='reflect')
    with pytest.raises(TypeError, match='expects an mmcv Conv2dAdaptivePadding, got Conv2d'):
        DOConv2dAdaptivePadding.from_conv2d(nn.Conv2d(4, 8, 3))
    with pytest.raises(TypeError, match='expects a plain torch.nn.Conv2d'):
        DOConv2d.from_conv2d(Conv2dAdaptivePadding(4, 8, 3))


def test_convert_to_doconv_keeps_mobilenet_v3_adaptive_padding():
    """mmseg's MobileNetV3 hard-codes Conv2dAdaptivePadding for its stem and stride-2 depthwise
    convs, which conv_cfg cannot reach: the coverage analysis names them convertible,
    convert_to_doconv makes them DOConv2dAdaptivePadding (bit-identical outputs at D = 0) and
    fold_doconv turns them back into Conv2dAdaptivePadding at the same names (fp32 fold
    rounding: 1e-4 relative)."""
    from mmseg.models.backbones import MobileNetV3
    torch.manual_seed(0)
    net = MobileNetV3(arch='small', out_indices=(0, 1, 12))
    net.eval()  # mmseg's MobileNetV3.train returns None
    adaptive = [n for n, m in net.named_modules() if type(m) is Conv2dAdaptivePadding]
    assert len(adaptive) >= 4  # layer0 and the stride-2 depthwise convs
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
        flops = conv_flops_by_module(net, lambda: net(x))
    reasons = doconv_coverage(net, flops)['plain_reasons']  # what tools/analyze_doconv.py lists
    assert all(reasons[n].startswith('mmcv Conv2dAdaptivePadding: convertible') for n in adaptive)
    converted = convert_to_doconv(net)
    assert set(adaptive) <= set(converted)
    modules = dict(net.named_modules())
    assert all(type(modules[n]) is DOConv2dAdaptivePadding for n in adaptive)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(net(x), expected))
        for n in converted:
            modules[n].D.normal_(0, 0.2)
        unfolded = net(x)
    folded = fold_doconv(net)
    assert [n for n, m in folded.named_modules() if type(m) is Conv2dAdaptivePadding] == adaptive
    with torch.no_grad():
        for got, want in zip(folded(x), unfolded):
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_doconv_where_adaptive_padding_is_the_default_warns_with_the_fix():
    """conv_cfg=DOConv on mmdet's EfficientNet (default Conv2dAdaptivePadding) warns and names
    'DOConvAdaptivePadding'; the shipped EfficientNet config, which uses it, does not warn."""
    cfg = Config.fromfile(EFFICIENTNET_CONFIG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        check_doconv_cfg(cfg.model, scope='mmdet')
    assert not [w for w in caught if 'Conv2dAdaptivePadding' in str(w.message)]
    cfg.model.backbone.conv_cfg = dict(type='DOConv')
    with pytest.warns(UserWarning, match=r"model\.backbone \(EfficientNet\) builds its convs as "
                                         r"Conv2dAdaptivePadding.*type='DOConvAdaptivePadding'"):
        check_doconv_cfg(cfg.model, scope='mmdet')
