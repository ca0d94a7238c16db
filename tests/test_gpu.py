"""DOConv2d on CUDA (issue 10): precision, gradients, eval cache, fold, AMP training.

Every check is parametrised over ``device``: the ``cuda`` instances are marked ``gpu`` and run
only where torch sees a CUDA device (tests/conftest.py skips them elsewhere); the ``cpu``
instances run everywhere, so the harness itself (reference, cases, tolerances) is exercised in CI
before any device time is spent. ``python -m pytest tests -m gpu`` runs the CUDA ones alone.

Reference: the layer's own parameters and input, upcast to float64 on the CPU, through
``F.conv2d(pad(x), compose_kernel(weight, D, weight_extra, groups), bias)`` (the public
composition, which tests/test_doconv_layer.py checks entry by entry against the paper's formula).
Gradients of ``sum(y * g)`` for a fixed random ``g`` are compared the same way.

Error measure: ``rel(t) = ||t - ref|| / ||ref||`` over the whole tensor (float64). Tolerances
(output / gradients) and why:

    fp32, TF32 off   5e-5 / 5e-5   float32 rounding (u = 6e-8) over sums of <= 2e4 products,
                                   with room for cuDNN's Winograd/FFT algorithms; TF32 (~1e-3)
                                   or any composition error is far above it
    fp16 autocast    3e-3 / 6e-3   operands and results rounded to fp16 (u = 4.9e-4, about 5e-4
                                   expected); products accumulate in fp32
    bf16 autocast    2e-2 / 4e-2   the same with bf16 (u = 3.9e-3, about 5e-3 expected)

Each case draws D ~ N(0, 1/S), so D moves the output by rel >= 0.3 (asserted; 0.63-0.73 in the
cases here): dropping D, or applying it to the wrong channel, fails even the bf16 tolerance by a
factor >= 15. Measured on the CPU (torch 2.13): fp32 <= 3e-7, fp16 <= 8e-4, bf16 <= 5.2e-3.
Cases cover groups 1, 2, depthwise and depthwise x2, D_mul > kh*kw (weight_extra), stride,
dilation, a non-square kernel and all four padding modes.
"""
import contextlib
import importlib.util
import math
import os.path as osp

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from do_conv_mm import DOConv2d, DOConv2dAdaptivePadding, compose_kernel, fold_doconv
from do_conv_mm.doconv_adaptive_padding import same_padding

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)]
CUDA_ONLY = [pytest.param('cuda', marks=pytest.mark.gpu)]

# name: (in, out, groups, kernel, stride, padding, dilation, D_mul, padding_mode, bias)
CASES = {
    'g1': (6, 8, 1, 3, 1, 1, 1, None, 'zeros', True),
    'g1-Dmul13': (6, 8, 1, 3, 1, 1, 1, 13, 'zeros', False),
    'g2-stride2-reflect': (6, 8, 2, 3, 2, 1, 1, None, 'reflect', True),
    'g2-Dmul17-3x5-stride2': (6, 8, 2, (3, 5), 2, (1, 2), 1, 17, 'zeros', True),
    'dw-dilation2-replicate': (6, 6, 6, 3, 1, 2, 2, None, 'replicate', True),
    'dw-Dmul11-circular': (6, 6, 6, 3, 1, 1, 1, 11, 'circular', False),
    'dwx2': (6, 12, 6, 3, 1, 1, 1, None, 'zeros', True),
    'dwx2-Dmul27-5x5-reflect': (6, 12, 6, 5, 1, 2, 1, 27, 'reflect', True),
    'g1-64to128': (64, 128, 1, 3, 1, 1, 1, None, 'zeros', True),
}
# A kernel of 512x2048x3x3 (36 MiB in fp32): large enough for any keep-a-buffer path.
LARGE = {'g1-2048to512-large': (2048, 512, 1, 3, 1, 1, 1, None, 'zeros', False)}
GRADCHECK_CASES = ['g1', 'g1-Dmul13', 'g2-stride2-reflect', 'dw-Dmul11-circular', 'dwx2']

TOL = {  # precision: (output, gradients)
    'fp32': (5e-5, 5e-5),
    'fp16': (3e-3, 6e-3),
    'bf16': (2e-2, 4e-2),
}
AUTOCAST_DTYPE = {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}
D_MATTERS = 0.3  # rel(output without D) must be at least this


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 means fp32: TF32 off for convolutions and matmuls (restored afterwards)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_layer(name: str, seed: int = 0) -> DOConv2d:
    """The case's layer on the CPU in fp32, D ~ N(0, 1/S), other parameters as initialised."""
    cin, cout, groups, kernel, stride, padding, dilation, d_mul, mode, bias = \
        {**CASES, **LARGE}[name]
    torch.manual_seed(seed)
    layer = DOConv2d(cin, cout, kernel, stride, padding, dilation, groups, bias, mode,
                     D_mul=d_mul)
    with torch.no_grad():
        layer.D.normal_(0.0, 1.0 / math.sqrt(layer.D.shape[2]))
    return layer


def make_input(name: str, seed: int = 1, batch: int = 2, size=(9, 10)) -> torch.Tensor:
    cin = {**CASES, **LARGE}[name][0]
    if name in LARGE:
        size = (6, 6)
    return torch.randn(batch, cin, *size, generator=torch.Generator().manual_seed(seed))


def reference(layer: DOConv2d, x: torch.Tensor, g: torch.Tensor = None, use_D: bool = True):
    """float64 CPU output of ``layer`` on ``x`` and, given ``g``, the gradients of sum(y * g)
    w.r.t. x and every parameter (dict; 'x' and parameter names)."""
    params = {n: p.detach().to('cpu', torch.float64).requires_grad_()
              for n, p in layer.named_parameters()}
    x64 = x.detach().to('cpu', torch.float64).requires_grad_()
    D = params['D'] if use_D else torch.zeros_like(params['D'])
    kernel = compose_kernel(params['weight'], D, params.get('weight_extra'), layer.groups)
    padding = layer.padding
    if layer.padding_mode != 'zeros':
        ph, pw = layer.padding
        x_in = F.pad(x64, (pw, pw, ph, ph), mode=layer.padding_mode)
        padding = 0
    else:
        x_in = x64
    y = F.conv2d(x_in, kernel, params.get('bias'), layer.stride, padding, layer.dilation,
                 layer.groups)
    if g is None:
        return y.detach()
    (y * g.to(torch.float64)).sum().backward()
    grads = {'x': x64.grad}
    grads.update({n: p.grad for n, p in params.items()})
    return y.detach(), grads


def rel(t: torch.Tensor, ref: torch.Tensor) -> float:
    t = t.detach().to('cpu', torch.float64)
    return ((t - ref).norm() / ref.norm()).item()


def autocast(device: str, precision: str):
    dtype = AUTOCAST_DTYPE[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device == 'cuda' and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip('this GPU has no bf16')
    try:
        with torch.autocast(device, dtype=dtype):
            pass
    except RuntimeError as error:  # torch 2.1: "AutocastCPU only support Bfloat16"
        pytest.skip(f'this torch has no {dtype} autocast on {device}: {error}')
    return torch.autocast(device, dtype=dtype)


def check_forward_backward(name: str, device: str, precision: str) -> dict:
    """Run the case on ``device`` under ``precision``; assert dtypes and tolerances; returns the
    errors (for the record)."""
    layer = make_layer(name)
    x = make_input(name)
    g = torch.randn(reference(layer, x).shape, generator=torch.Generator().manual_seed(2))
    ref_y, ref_grads = reference(layer, x, g)
    assert rel(reference(layer, x, use_D=False), ref_y) >= D_MATTERS, 'D too small to test'

    layer = layer.to(device)
    xd = x.to(device).requires_grad_()
    with autocast(device, precision):
        y = layer(xd)
    expected = AUTOCAST_DTYPE[precision] or torch.float32
    assert y.dtype == expected and y.device.type == device
    (y.float() * g.to(device)).sum().backward()

    tol_out, tol_grad = TOL[precision]
    errors = {'output': rel(y, ref_y)}
    got = {'x': xd.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    for key, ref in ref_grads.items():
        assert got[key] is not None, f'no gradient for {key}'
        assert got[key].dtype == torch.float32 and got[key].device.type == device, key
        errors[key] = rel(got[key], ref)
    bad = {k: v for k, v in errors.items()
           if not v <= (tol_out if k == 'output' else tol_grad)}  # NaN fails too
    assert not bad, f'{name} {device} {precision}: over tolerance {bad}; all errors {errors}'
    return errors


# ------------------------------------------------------------------------------------------------
# Forward + backward vs the float64 reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', list(CASES))
def test_fp32_forward_backward_match_float64_reference(device, name):
    check_forward_backward(name, device, 'fp32')


@pytest.mark.parametrize('device', CUDA_ONLY)
@pytest.mark.parametrize('precision', ['fp32', 'fp16', 'bf16'])
def test_large_kernel_matches_float64_reference(device, precision):
    check_forward_backward('g1-2048to512-large', device, precision)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
@pytest.mark.parametrize('name', list(CASES))
def test_autocast_forward_backward_match_float64_reference(device, precision, name):
    check_forward_backward(name, device, precision)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('precision', ['fp32', 'fp16', 'bf16'])
def test_adaptive_padding_layer_matches_float64_reference(device, precision):
    """DOConv2dAdaptivePadding (EfficientNet's 'SAME' padding, asymmetric at this even size and
    stride 2) takes the same training path: forward and every gradient against the float64
    reference on the input padded the 'SAME' way, within the precision's TOL."""
    torch.manual_seed(0)
    layer = DOConv2dAdaptivePadding(6, 8, 3, 2, D_mul=13)
    with torch.no_grad():
        layer.D.normal_(0.0, 1.0 / math.sqrt(13))
    x = torch.randn(2, 6, 10, 12, generator=torch.Generator().manual_seed(1))
    pads = same_padding([10, 12], [3, 3], [2, 2], [1, 1])
    assert pads == [0, 1, 0, 1]  # nothing left / top, one pixel right / bottom
    g = torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(2))
    ref_y, ref_grads = reference(layer, F.pad(x, pads), g)
    ref_grads['x'] = ref_grads['x'][:, :, :10, :12]  # the padding's gradient is dropped
    layer = layer.to(device)
    xd = x.to(device).requires_grad_()
    with autocast(device, precision):
        y = layer(xd)
    assert y.dtype == (AUTOCAST_DTYPE[precision] or torch.float32) and y.shape == (2, 8, 5, 6)
    (y.float() * g.to(device)).sum().backward()
    tol_out, tol_grad = TOL[precision]
    assert rel(y, ref_y) <= tol_out
    got = {'x': xd.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    assert all(rel(got[k], ref) <= tol_grad for k, ref in ref_grads.items()), \
        {k: rel(got[k], ref) for k, ref in ref_grads.items()}


def test_tolerances_catch_a_wrong_channel_mapping():
    """The fp16 tolerance is far below what a D applied to the wrong input channel (the
    reference code's bug for groups > 1) does to the output."""
    layer = make_layer('dwx2')
    x = make_input('dwx2')
    ref_y = reference(layer, x)
    with torch.no_grad():
        wrong = layer.D.roll(1, dims=0)  # D[c] used for channel c + 1
        kernel = compose_kernel(layer.weight, wrong, None, layer.groups)
        y = F.conv2d(x, kernel, layer.bias, layer.stride, layer.padding, layer.dilation,
                     layer.groups)
    assert rel(y, ref_y) > 10 * TOL['bf16'][0]


# ------------------------------------------------------------------------------------------------
# gradcheck in float64
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', GRADCHECK_CASES)
def test_gradcheck_float64(device, name):
    layer = make_layer(name).to(device=device, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    inputs = [make_input(name, batch=1, size=(5, 6)).to(device, torch.float64)] + \
        [p.detach().clone() for p in layer.parameters()]
    inputs = [t.requires_grad_() for t in inputs]

    def fn(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))
    # Full Jacobians on CUDA; on the CPU (where tests/test_doconv_layer.py runs full gradchecks)
    # the random-projection fast mode keeps this harness check to a second. nondet_tol: cuDNN's
    # weight-gradient kernels may sum in a varying order (1e-16 relative in float64).
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    nondet_tol=1e-10, fast_mode=device == 'cpu')


# ------------------------------------------------------------------------------------------------
# Eval cache: reused while parameters stay, invalidated by every kind of change
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('device', DEVICES)
def test_eval_follows_parameter_changes_on_device(device):
    """Eval composes from the live parameters on every call: optimizer steps, in-place and
    .data edits, load_state_dict and dtype changes are all seen."""
    name = 'g2-Dmul17-3x5-stride2'
    layer = make_layer(name).to(device).eval()
    x = make_input(name).to(device)

    def forward_checked(previous=None, tol=TOL['fp32'][0]):
        with torch.no_grad():
            y = layer(x)
        assert rel(y, reference(layer, x)) <= tol
        if previous is not None:
            assert rel(y, previous.detach().to('cpu', torch.float64)) > 1e-2, 'change not seen'
        return y

    y0 = forward_checked()
    with torch.no_grad():  # second call: the same result
        assert rel(layer(x), y0.detach().to('cpu', torch.float64)) <= 1e-7
    # 1. an optimizer step (gradients from an eval-mode forward, no train()/eval() switch)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().mean().backward()
    optimizer.step()
    y1 = forward_checked(y0)
    # 2. an in-place edit of D under no_grad
    with torch.no_grad():
        layer.D.mul_(-1.5)
    y2 = forward_checked(y1)
    # 2b. a write through .data, which bumps no version counter
    layer.weight.data.mul_(-1.0)
    y2 = forward_checked(y2)
    # 3. load_state_dict from another layer
    layer.load_state_dict(make_layer(name, seed=7).state_dict())
    y3 = forward_checked(y2)
    # 4. a dtype change: float64 on the device, exact to float64 rounding
    layer.double()
    x = x.double()
    with torch.no_grad():
        y4 = layer(x)
    assert y4.dtype == torch.float64 and rel(y4, reference(layer, x)) <= 1e-12
    # 5. and back
    layer.float()
    x = x.float()
    y5 = forward_checked()
    assert rel(y5, y3.detach().to('cpu', torch.float64)) <= TOL['fp32'][0]


# ------------------------------------------------------------------------------------------------
# Fold: the plain conv computes what the DO-Conv layer computes, on the device
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', list(CASES))
def test_fold_equivalence_on_device(device, name):
    layer = make_layer(name).to(device)
    model = nn.Sequential(layer, nn.ReLU()).eval()
    folded = fold_doconv(model)
    conv = folded[0]
    assert type(conv) is nn.Conv2d and conv.weight.device.type == device
    assert conv.padding_mode == layer.padding_mode and conv.groups == layer.groups
    assert not any(isinstance(m, DOConv2d) for m in folded.modules())
    assert isinstance(model[0], DOConv2d)  # not in place
    x = make_input(name).to(device)
    with torch.no_grad():
        y, y_folded = model(x), folded(x)
    ref = F.relu(reference(layer, x))
    assert rel(y_folded, ref) <= TOL['fp32'][0]
    assert rel(y_folded, y.detach().to('cpu', torch.float64)) <= TOL['fp32'][0]


# ------------------------------------------------------------------------------------------------
# The bench shim's torchvision-backed mmcv ops agree with its reference on CUDA
# ------------------------------------------------------------------------------------------------
def _load_shim():
    spec = importlib.util.spec_from_file_location(
        'mmcv_ext_shim_under_test', osp.join(REPO, 'bench', 'mmcv_ext_shim.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('device', CUDA_ONLY)
def test_mmcv_shim_torchvision_ops_match_reference(device):
    pytest.importorskip('torchvision')
    shim = _load_shim()
    dev = torch.device(device)
    shim._self_check(dev)  # small random problems; raises on any disagreement
    assert shim._backend(dev) == 'torchvision'
    # Faster R-CNN-sized problems: 256-channel FPN level 0 of a 2 x 512² batch, 512 RoIs
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 256, 128, 128, generator=gen).to(dev)
    xy = torch.rand(512, 2, generator=gen) * 480
    wh = 8 + torch.rand(512, 2, generator=gen) * 100
    rois = torch.cat([torch.randint(0, 2, (512, 1), generator=gen).float(), xy, xy + wh],
                     1).to(dev)
    ref = shim.reference_roi_align_forward(feats, rois, 7, 7, 0.25, 0, True)
    out = torch.zeros_like(ref)
    shim.roi_align_forward(feats, rois, out, None, None, aligned_height=7, aligned_width=7,
                           spatial_scale=0.25, sampling_ratio=0, pool_mode=1, aligned=True)
    assert rel(out, ref.double().cpu()) <= 1e-5
    grad = torch.randn(ref.shape, generator=gen).to(dev)
    ref_in = shim.reference_roi_align_backward(grad, rois, tuple(feats.shape), 7, 7, 0.25, 0,
                                               True)
    got_in = torch.zeros_like(feats)
    shim.roi_align_backward(grad, rois, None, None, got_in, aligned_height=7, aligned_width=7,
                            spatial_scale=0.25, sampling_ratio=0, pool_mode=1, aligned=True)
    assert rel(got_in, ref_in.double().cpu()) <= 1e-5
    boxes = torch.cat([xy, xy + wh], 1).to(dev)
    scores = torch.rand(512, generator=gen).to(dev)
    assert torch.equal(shim.nms(boxes, scores, 0.7).cpu(),
                       shim.reference_nms(boxes, scores, 0.7).cpu())


# ------------------------------------------------------------------------------------------------
# Toy training on CUDA with mmengine's AmpOptimWrapper, then fold --verify
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('device', CUDA_ONLY)
def test_toy_training_with_amp_optim_wrapper_then_fold_verify(device, tmp_path):
    pytest.importorskip('mmseg')
    from mmengine.config import Config
    from do_conv_mm import load_checkpoint_file
    from do_conv_mm.toy_data import ensure_toy_data_for_config
    from training_helpers import run_tool, train_losses

    base = osp.join(REPO, 'configs', 'toy', 'fpn_r18-tiny-doconv_toy.py')
    config = tmp_path / 'toy_amp.py'
    config.write_text(
        f'_base_ = {base!r}\n'
        'train_dataloader = dict(batch_size=8, dataset=dict(indices=32))\n'
        'param_scheduler = []  # constant LR: the loss trend is the model\'s alone\n'
        'log_processor = dict(window_size=1)\n'
        'train_cfg = dict(max_iters=40, val_interval=1000)\n'
        'default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=40))\n')
    ensure_toy_data_for_config(Config.fromfile(str(config)))
    work = tmp_path / 'work'
    run_tool('train.py', config, '--amp', '--work-dir', work, '--cfg-options', 'val_cfg=None',
             'val_dataloader=None', 'val_evaluator=None', timeout=400)
    # tools/train.py --amp on CUDA = mmengine's AmpOptimWrapper (fp16, dynamic loss scale)
    dumped = Config.fromfile(str(work / 'toy_amp.py'))
    assert dumped.optim_wrapper.type == 'AmpOptimWrapper'
    losses = [v for _, v in train_losses(str(work))]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f'loss did not fall: first 5 {first:.3f}, last 10 {last:.3f}'
    checkpoint = work / 'iter_40.pth'
    state = load_checkpoint_file(str(checkpoint))['state_dict']
    assert any(k.endswith('.D') for k in state)
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.endswith(('.D', '.weight')))

    folded = tmp_path / 'deploy' / 'toy_folded.pth'
    proc = run_tool('fold_doconv.py', config, checkpoint, folded, '--verify', timeout=300)
    assert folded.is_file(), proc.stdout + proc.stderr
    plain = load_checkpoint_file(str(folded))['state_dict']
    assert not any(k.endswith(('.D', '.weight_extra')) for k in plain)
