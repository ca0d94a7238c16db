"""DOConv2d inside the OpenMMLab ecosystem: registry, ConvModule, init, fuse, backbones, export."""
import io
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule, build_conv_layer, fuse_conv_bn
from mmengine.model import BaseModule
from mmengine.registry import DefaultScope

import do_conv_mm
from do_conv_mm import DOConv2d, count_doconv, fold_doconv
from do_conv_mm.mmdeploy_compat import torchscript_export_kwargs

# A deep fp32 network: eval outputs of the DO-Conv model and its fold differ only by the float64
# -> float32 rounding of each folded kernel entry (rel. 6e-8) accumulated through ~50 layers and
# BN rescaling; 1e-4 relative to the output's scale is ~1000x that unit round-off.
DEEP_RTOL = 1e-4


def randomise_doconv_and_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero D / extra columns everywhere and non-trivial BN statistics and affine."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DOConv2d) and m.D is not None:
                m.D.copy_(0.2 * torch.randn(m.D.shape, generator=g))
                if m.weight_extra is not None:
                    m.weight_extra.copy_(0.1 * torch.randn(m.weight_extra.shape, generator=g))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model


def in_eval(model: nn.Module) -> nn.Module:
    """model.eval() that also works where train() returns None (mmdet's ResNet)."""
    model.eval()
    return model


def assert_close_rel(actual, expected, rtol=DEEP_RTOL):
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f'max abs diff / max |expected| = {err:.3g} > {rtol}'


@pytest.mark.parametrize('scope', [None, 'mmdet', 'mmseg'])
@pytest.mark.parametrize('name', ['DOConv', 'DOConv2d'])
def test_build_conv_layer_in_every_scope(scope, name, monkeypatch):
    if scope is None:  # no default scope at all, whatever earlier tests created
        monkeypatch.setattr(DefaultScope, '_instance_dict', OrderedDict())
    with DefaultScope.overwrite_default_scope(scope):
        current = DefaultScope.get_current_instance()
        assert (current is None) if scope is None else (current.scope_name == scope)
        layer = build_conv_layer(dict(type=name, D_mul=12), 4, 8, 3, stride=2, padding=1)
    assert isinstance(layer, DOConv2d)
    assert layer.stride == (2, 2) and layer.D_mul == 12


def test_mmcv_build_conv_layer_check_still_passes(monkeypatch):
    """mmcv's own tests/test_cnn/test_build_layers.py::test_build_conv_layer, as it is: every name
    in the root MODELS that contains "conv" must build as a conv layer of that class from
    (in_channels, out_channels, kernel_size, dilation). Registering DO-Conv must not change what
    stock code sees: only the layer names DOConv / DOConv2d join the root; DOConvModel (a model
    builder) lives in the mmdet and mmseg registries and still works under those scopes."""
    import mmcv.ops  # noqa: F401  (every conv type mmcv registers, sparse convs included)
    from mmengine.registry import MODELS
    monkeypatch.setattr(DefaultScope, '_instance_dict', OrderedDict())  # mmcv's test: no scope
    # mmcv's loop, verbatim apart from collecting the names (groups was popped before it).
    kwargs = dict(in_channels=4, out_channels=8, kernel_size=3, dilation=2)
    built = []
    for type_name, module in MODELS.module_dict.items():
        cfg = dict(type=type_name)
        # SparseInverseConv2d and SparseInverseConv3d do not have the argument 'dilation'
        if type_name == 'SparseInverseConv2d' or type_name == 'SparseInverseConv3d':
            kwargs.pop('dilation')
        if 'conv' in type_name.lower():
            layer = build_conv_layer(cfg, **kwargs)
            assert isinstance(layer, module), type_name
            assert layer.in_channels == kwargs['in_channels'], type_name
            assert layer.out_channels == kwargs['out_channels'], type_name
            kwargs['dilation'] = 2  # recover the key
            built.append(type_name)
    layer_types = {'DOConv', 'DOConv2d', 'DOConvAdaptivePadding', 'DOConv2dAdaptivePadding',
                   'DOConvWS', 'DOConv2dWS'}
    assert layer_types <= set(built) and 'DOConvModel' not in MODELS.module_dict
    ours = {n for n, m in MODELS.module_dict.items() if m.__module__.startswith('do_conv_mm')}
    assert ours == layer_types
    import mmdet.registry
    import mmseg.registry
    for scope, registry in (('mmdet', mmdet.registry.MODELS), ('mmseg', mmseg.registry.MODELS)):
        assert registry.module_dict['DOConvModel'] is do_conv_mm.DOConvModel
        with DefaultScope.overwrite_default_scope(scope):
            model = MODELS.build(dict(type='DOConvModel', model_type=_TwoConvs,
                                      doconv=dict(include=['head'])))
        assert type(model) is _TwoConvs and type(model.stem) is nn.Conv2d
        assert isinstance(model.head, DOConv2d)


class _TwoConvs(nn.Module):

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(4, 4, 3)


def test_register_doconv_model_in_another_scope():
    from mmengine.registry import MODELS, Registry
    registry = Registry('model', parent=MODELS, scope='doconv_test_scope')
    do_conv_mm.register_doconv_model(registry)
    do_conv_mm.register_doconv_model(registry)  # idempotent
    model = registry.build(dict(type='DOConvModel', model_type=nn.Conv2d, in_channels=2,
                                out_channels=2, kernel_size=3))
    assert type(model) is nn.Conv2d  # built in the current scope; a bare conv is not converted


def test_conv_module_with_doconv_bn_act():
    module = ConvModule(8, 16, 3, padding=1, conv_cfg=dict(type='DOConv'),
                        norm_cfg=dict(type='BN'), act_cfg=dict(type='ReLU'))
    module.init_weights()  # kaiming_init on the conv: must leave D at identity
    assert isinstance(module.conv, DOConv2d)
    assert torch.count_nonzero(module.conv.D) == 0
    y = module(torch.randn(2, 8, 10, 10))
    assert y.shape == (2, 16, 10, 10) and (y >= 0).all()


def test_conv_module_padding_mode_reflect():
    module = ConvModule(4, 4, 3, padding=1, conv_cfg=dict(type='DOConv'), padding_mode='reflect')
    assert isinstance(module.conv, DOConv2d)
    assert module(torch.randn(1, 4, 6, 6)).shape == (1, 4, 6, 6)


def test_init_cfg_layer_conv2d_reaches_doconv():

    class Net(BaseModule):

        def __init__(self):
            super().__init__(init_cfg=dict(type='Constant', layer='Conv2d', val=0.5, bias=0.25))
            self.conv = DOConv2d(4, 4, 3)

    net = Net()
    net.init_weights()
    assert torch.all(net.conv.weight == 0.5) and torch.all(net.conv.bias == 0.25)
    assert torch.count_nonzero(net.conv.D) == 0


def _conv_bn(D_mul=None, efficient=False):
    module = ConvModule(6, 8, 3, padding=1, groups=2, conv_cfg=dict(type='DOConv', D_mul=D_mul),
                        norm_cfg=dict(type='BN'), act_cfg=None, efficient_conv_bn_eval=efficient)
    return randomise_doconv_and_bn(module).eval()


def test_fold_conv_module_with_bn():
    module = _conv_bn(D_mul=12)
    x = torch.randn(2, 6, 9, 9)
    folded = fold_doconv(module)
    assert type(folded.conv) is nn.Conv2d and count_doconv(folded) == 0
    # single layer fp32: rounding of the folded kernel only; 1e-5 relative
    assert_close_rel(folded(x), module(x), rtol=1e-5)


@pytest.mark.parametrize('D_mul', [None, 12])
def test_fuse_conv_bn_on_unfolded_doconv(D_mul):
    """mmcv's fuse_conv_bn scales ``weight`` per output channel; with D_mul > kh*kw the layer
    scales its extra columns with it, so the fused module computes conv -> BN exactly."""
    module = _conv_bn(D_mul=D_mul).double()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    expected = module(x)
    fused = fuse_conv_bn(module)
    assert isinstance(fused.bn, nn.Identity)
    assert_close_rel(fused(x), expected, rtol=1e-12)


@pytest.mark.parametrize('D_mul', [None, 12])
def test_efficient_conv_bn_eval(D_mul):
    """efficient_conv_bn_eval hands _conv_forward a per-channel scaled weight: outputs and the
    gradients of every parameter (the BN affine included) equal conv -> BN in eval, float64."""
    module = _conv_bn(D_mul=D_mul, efficient=True).double()
    reference = _conv_bn(D_mul=D_mul, efficient=False).double()
    reference.load_state_dict(module.state_dict())
    for m in (module, reference):  # efficient_conv_bn_eval: frozen BN statistics, training conv
        m.train()
        m.bn.eval()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    got, expected = module(x), reference(x)
    assert_close_rel(got, expected, rtol=1e-12)
    grads = torch.autograd.grad(got.square().sum(), list(module.parameters()))
    expected_grads = torch.autograd.grad(expected.square().sum(), list(reference.parameters()))
    for g, e in zip(grads, expected_grads):
        assert_close_rel(g, e, rtol=1e-10)


@pytest.mark.parametrize('D_mul', [None, 49])  # 49: the 7×7 stem's kh·kw, > 9 for the 3×3s
def test_mmengine_efficient_conv_bn_eval_on_a_doconv_backbone(D_mul):
    """mmengine's fx-based efficient_conv_bn_eval (the Runner's ``efficient_conv_bn_eval``
    option) on mmdet's ResNet-18 built with DO-Conv: every conv + BN pair (20) is found, and the
    outputs and every parameter's gradient (BN in eval, convs training)
    equal the untransformed backbone's, float64. It failed with a KeyError on the DOConv2d's
    traced conv2d."""
    import copy

    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.model.efficient_conv_bn_eval import (efficient_conv_bn_eval_control,
                                                       turn_on_efficient_conv_bn_eval)
    conv_cfg = dict(type='DOConv') if D_mul is None else dict(type='DOConv', D_mul=D_mul)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = nn.Module()
        model.backbone = DET_MODELS.build(dict(type='ResNet', depth=18, conv_cfg=conv_cfg,
                                               norm_eval=False)).double()
    randomise_doconv_and_bn(model)
    reference = copy.deepcopy(model)
    turn_on_efficient_conv_bn_eval(model, ['backbone'])
    graph_module = model.backbone.forward.__self__
    fused = [n for n in graph_module.graph.nodes if n.target is efficient_conv_bn_eval_control]
    assert len(fused) == 20 == count_doconv(model)  # conv_cfg builds the 1×1 convs too
    for m in (model, reference):
        m.train()
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got, expected = model.backbone(x), reference.backbone(x)
    for g, e in zip(got, expected):
        assert_close_rel(g, e, rtol=1e-12)
    loss = sum(o.square().sum() for o in got)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected_grads = torch.autograd.grad(sum(o.square().sum() for o in expected),
                                         list(reference.parameters()))
    for g, e in zip(grads, expected_grads):
        assert_close_rel(g, e, rtol=1e-10)


def test_mmcv_flop_counter_counts_doconv_as_its_conv():
    """mmcv's get_model_complexity_info maps layer types exactly: DOConv2d counts the FLOPs of
    the conv it folds to, the same as the plain model's."""
    from mmcv.cnn import get_model_complexity_info
    doconv = nn.Sequential(DOConv2d(3, 8, 3, padding=1, D_mul=12), nn.ReLU(),
                           DOConv2d(8, 8, 3, padding=1, groups=2))
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2))
    flops_doconv, _ = get_model_complexity_info(doconv, (3, 16, 16), print_per_layer_stat=False,
                                                as_strings=False)
    flops_plain, _ = get_model_complexity_info(plain, (3, 16, 16), print_per_layer_stat=False,
                                               as_strings=False)
    assert flops_doconv == flops_plain > 0


def test_mmengine_ema_swap_is_seen_by_eval():
    """mmengine's EMAHook swaps parameters through ``.data`` (no version bump) before
    validation; eval outputs follow the swap in both directions."""
    from mmengine.model import ExponentialMovingAverage
    model = nn.Sequential(DOConv2d(3, 4, 3, padding=1)).double()
    ema = ExponentialMovingAverage(model, momentum=0.5)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model[0].D.normal_()
        model[0].weight.mul_(2)
    ema.update_parameters(model)  # now averaged: EMA and live weights differ
    model.eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        live = model(x)
        averaged = ema.module(x)
        assert not torch.allclose(live, averaged)
        for p_avg, p in zip(ema.module.parameters(), model.parameters()):  # EMAHook's swap
            tmp = p_avg.data.clone()
            p_avg.data.copy_(p.data)
            p.data.copy_(tmp)
        torch.testing.assert_close(model(x), averaged, atol=1e-12, rtol=0)
        torch.testing.assert_close(ema.module(x), live, atol=1e-12, rtol=0)


def _mmdet_resnet50(conv_cfg):
    from mmdet.models.backbones import ResNet
    return ResNet(depth=50, conv_cfg=conv_cfg, norm_cfg=dict(type='BN'), out_indices=(0, 1, 2, 3))


def _mmseg_resnetv1c(conv_cfg):
    from mmseg.models.backbones import ResNetV1c
    return ResNetV1c(depth=50, conv_cfg=conv_cfg, norm_cfg=dict(type='BN'),
                     dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), out_indices=(0, 1, 2, 3))


@pytest.mark.parametrize('build,expected_doconv_kxk', [(_mmdet_resnet50, 17),
                                                       (_mmseg_resnetv1c, 19)])
def test_fold_whole_backbone(build, expected_doconv_kxk):
    torch.manual_seed(0)
    model = build(dict(type='DOConv'))
    model.init_weights()
    kxk = [m for m in model.modules() if isinstance(m, DOConv2d) and m.D is not None]
    assert len(kxk) == expected_doconv_kxk  # every 3x3/7x7 conv of the backbone is DO-Conv
    randomise_doconv_and_bn(model)
    model.eval()
    folded = fold_doconv(model)
    assert count_doconv(folded) == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for y, z in zip(model(x), folded(x)):
            assert_close_rel(z, y)


def test_warm_start_resnet50_from_plain_weights():
    torch.manual_seed(0)
    plain = _mmdet_resnet50(None)
    plain.init_weights()
    randomise_doconv_and_bn(plain, seed=1)
    plain.eval()
    model = _mmdet_resnet50(dict(type='DOConv'))
    randomise_doconv_and_bn(model, seed=2)  # D non-zero before loading: loading must reset it
    result = model.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for y, z in zip(plain(x), model(x)):
            assert torch.equal(y, z)  # D = 0 composes to the very same kernel bits


def test_folded_state_dict_loads_into_plain_architecture():
    # ResNetV1c has only 3x3 k×k convs (deep stem), so D_mul=12 adds extra W columns everywhere
    model = in_eval(randomise_doconv_and_bn(_mmseg_resnetv1c(dict(type='DOConv', D_mul=12))))
    plain = in_eval(_mmseg_resnetv1c(None))
    plain.load_state_dict(do_conv_mm.fold_state_dict(model.state_dict()), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for y, z in zip(model(x), plain(x)):
            assert_close_rel(z, y)


def test_folded_model_exports_onnx_opset11_without_einsum():
    onnx = pytest.importorskip('onnx')
    model = nn.Sequential(
        ConvModule(3, 8, 3, padding=1, conv_cfg=dict(type='DOConv'), norm_cfg=dict(type='BN')),
        ConvModule(8, 8, 3, padding=1, groups=8, conv_cfg=dict(type='DOConv')),
        ConvModule(8, 4, 1, conv_cfg=dict(type='DOConv')))
    folded = fold_doconv(randomise_doconv_and_bn(model)).eval()
    buffer = io.BytesIO()
    torch.onnx.export(folded, torch.randn(1, 3, 16, 16), buffer, opset_version=11,
                      **torchscript_export_kwargs())
    graph = onnx.load_from_string(buffer.getvalue()).graph
    ops = {node.op_type for node in graph.node}
    assert 'Einsum' not in ops and 'MatMul' not in ops
    assert sum(node.op_type == 'Conv' for node in graph.node) == 3


def test_flops_and_params_of_folded_model_equal_plain():
    from mmengine.analysis import get_model_complexity_info
    doconv = in_eval(fold_doconv(randomise_doconv_and_bn(_mmdet_resnet50(dict(type='DOConv')))))
    plain = in_eval(_mmdet_resnet50(None))
    a = get_model_complexity_info(doconv, input_shape=(3, 64, 64), show_table=False,
                                  show_arch=False)
    b = get_model_complexity_info(plain, input_shape=(3, 64, 64), show_table=False,
                                  show_arch=False)
    assert a['flops'] == b['flops'] and a['params'] == b['params']
    assert a['flops'] > 0


def _random_D(model: nn.Module, std: float = 0.05) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DOConv2d) and m.D is not None:
                m.D.copy_(std * torch.randn(m.D.shape, generator=g))
    return model


def _detection_batch(size: int, images: int = 2, boxes: int = 3) -> dict:
    """Random uint8 images with ``boxes`` random boxes each (sides >= 24 px), as a dataloader
    would yield them."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for i in range(images):
        inputs.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))
        xy = torch.rand(boxes, 2, generator=g) * (size - 32)
        wh = 24 + torch.rand(boxes, 2, generator=g) * (size - 32 - xy)
        sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             pad_shape=(size, size), scale_factor=(1.0, 1.0),
                                             img_id=i))
        sample.gt_instances = InstanceData(bboxes=torch.cat([xy, xy + wh], 1),
                                           labels=torch.randint(0, 80, (boxes, ), generator=g))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize('config, model_update, converted', [
    # DETR family: ResNet-50 and the ChannelMapper neck through conv_cfg alone (17 + 1 k×k; the
    # deformable transformer has no convs to convert).
    ('dino/dino-4scale_r50_8xb2-12e_coco.py',
     dict(backbone=dict(conv_cfg=dict(type='DOConv')), neck=dict(conv_cfg=dict(type='DOConv'))),
     18),
    # A transformer backbone: PVT-tiny's patch embeddings and spatial-reduction convs (4×4 to 8×8
    # kernels, as strides) by name (10), the FPN through conv_cfg (5).
    ('pvt/retinanet_pvt-t_fpn_1x_coco.py',
     dict(type='DOConvModel', model_type='RetinaNet', doconv=dict(include=['backbone']),
          neck=dict(conv_cfg=dict(type='DOConv'))), 15),
])
def test_detr_and_transformer_backbone_detectors_train_and_fold(config, model_update, converted):
    """mmdet model-zoo detectors beyond CNN backbones with FPNs, built from their installed
    configs with the DO-Conv additions merged: one training step reaches every trainable D, and
    the fold keeps the features the heads read (the final detections go through top-k query /
    box selection, where rounding may swap near-ties, so they are not compared; fp32 fold
    rounding: DEEP_RTOL)."""
    import copy
    import os.path as osp

    import mmdet
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', config))
    cfg.merge_from_dict(dict(model=model_update))
    model_cfg = copy.deepcopy(cfg.model)
    for part in ('backbone', ):  # no ImageNet download: random weights
        model_cfg[part].pop('init_cfg', None)
        model_cfg[part].pop('pretrained', None)
    if model_cfg.backbone.type == 'ResNet':
        # Initialised, each block's last BN would be 0 and no residual-branch conv get a
        # gradient in the first step (a plain conv's neither).
        model_cfg.backbone.zero_init_residual = False
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = DET_MODELS.build(model_cfg)
        # As a Runner does: DINO's level_embed is torch.empty until init_weights, and reading it
        # uninitialised made the step pass or fail by what the heap held (NaN matcher costs).
        model.init_weights()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DOConv2d) and m.D is not None}
    assert len(layers) == converted
    _random_D(model)
    model.train()
    data = model.data_preprocessor(_detection_batch(256), True)  # DINO: 900 queries need 256²
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    loss.backward()
    trainable = {n: m for n, m in layers.items() if m.D.requires_grad}  # DINO freezes the stem
    assert len(trainable) >= converted - 4
    assert all(m.D.grad is not None and m.D.grad.abs().sum() > 0 for m in trainable.values())
    model.eval()
    inputs = model.data_preprocessor(_detection_batch(256), False)['inputs']
    with torch.no_grad():
        expected = model.extract_feat(inputs)
        folded = fold_doconv(model)
        assert count_doconv(folded) == 0
        for got, want in zip(folded.extract_feat(inputs), expected):
            assert_close_rel(got, want)


def _tiny_hrnet_extra() -> dict:
    """HRNet's 4 stages, one module and one block per branch, 8-64 channels."""
    def stage(branches, block='BASIC'):
        return dict(num_modules=1, num_branches=branches, block=block,
                    num_blocks=(1, ) * branches, num_channels=(8, 16, 32, 64)[:branches])
    return dict(stage1=stage(1, 'BOTTLENECK'), stage2=stage(2), stage3=stage(3), stage4=stage(4))


@pytest.mark.parametrize('family', ['segformer', 'yolox', 'hrnet', 'unet'])
def test_other_model_families_train_and_fold(family):
    """Beyond ResNets: SegFormer's MixVisionTransformer converted by name (its convs read token
    maps permuted back to NCHW, i.e. channels_last-strided inputs), YOLOX's CSPDarknet with
    depthwise DO-Convs through conv_cfg, HRNet through conv_cfg with ``with_cp=True`` (its
    blocks recompute DO-Convs under torch.utils.checkpoint; its fuse layers' strided 3×3 convs
    are DO-Convs too), and mmseg's UNet through conv_cfg (every encoder and decoder 3×3, under
    with_cp too; its upsampling convs are 1×1): a training step reaches every D, and the fold
    keeps the eval outputs (fp32 fold rounding: 1e-4 relative)."""
    torch.manual_seed(0)
    if family == 'unet':
        from mmseg.models.backbones import UNet
        with DefaultScope.overwrite_default_scope('mmseg'):  # its upsample_cfg is InterpConv
            net = UNet(base_channels=8, num_stages=3, strides=(1, 1, 1), enc_num_convs=(2, 2, 2),
                       dec_num_convs=(2, 2), downsamples=(True, True), enc_dilations=(1, 1, 1),
                       dec_dilations=(1, 1), with_cp=True, conv_cfg=dict(type='DOConv'))
        kxk = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
        assert len(kxk) == 3 * 2 + 2 * 2 and all(isinstance(m, DOConv2d) for m in kxk)
    elif family == 'hrnet':
        from mmseg.models.backbones import HRNet
        net = HRNet(_tiny_hrnet_extra(), conv_cfg=dict(type='DOConv'), with_cp=True)
        assert count_doconv(net) > 0
        fuse_convs = [m for name, m in net.named_modules()
                      if '.fuse_layers.' in name and isinstance(m, DOConv2d) and m.D is not None]
        assert fuse_convs and all(m.stride == (2, 2) for m in fuse_convs)
    elif family == 'segformer':
        from mmseg.models.backbones import MixVisionTransformer
        net = MixVisionTransformer(embed_dims=16, num_layers=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
                                   out_indices=(0, 1, 2, 3))
        converted = do_conv_mm.convert_to_doconv(net, include=['*'])
        assert len(converted) == count_doconv(net) > 0
    else:
        from mmdet.models.backbones import CSPDarknet
        net = CSPDarknet(deepen_factor=0.33, widen_factor=0.125, use_depthwise=True,
                         conv_cfg=dict(type='DOConv'))
        assert any(m.groups == m.in_channels > 1 for m in net.modules()
                   if isinstance(m, DOConv2d) and m.D is not None)  # depthwise DO-Convs
    _random_D(net)
    x = torch.randn(2, 3, 64, 64)
    sum(o.square().mean() for o in net(x)).backward()
    layers = [m for m in net.modules() if isinstance(m, DOConv2d) and m.D is not None]
    assert layers and all(m.D.grad is not None and m.D.grad.abs().sum() > 0 for m in layers)
    net.eval()
    with torch.no_grad():
        for got, expected in zip(fold_doconv(net)(x), net(x)):
            assert_close_rel(got, expected)
