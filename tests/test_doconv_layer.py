"""DOConv2d is exactly the paper's formula and a true drop-in for nn.Conv2d (torch only)."""
import contextlib
import itertools
import pickle
from copy import deepcopy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from do_conv_mm import DOConv2d, compose_kernel, convert_to_doconv, fold_doconv
from do_conv_mm import compose_blocked
from do_conv_mm.compose_batched import BATCHED_COMPOSER

# float64 checks: the layer and the reference perform the same arithmetic in a different order,
# so they agree to a few ulps of the activations (|y| ~ 10): 1e-10 leaves five orders of margin.
ATOL64 = 1e-10


def reference_kernel(layer: DOConv2d) -> torch.Tensor:
    """W' built entry by entry from the paper's formula, independent of compose_kernel."""
    O, Cg, kh, kw = layer.weight.shape
    K = kh * kw
    Og = O // layer.groups
    if layer.D is None:
        return layer.weight.detach().clone()
    W = layer.weight.detach().reshape(O, Cg, K)
    if layer.weight_extra is not None:
        W = torch.cat([W, layer.weight_extra.detach()], dim=2)
    S = W.shape[2]
    identity = torch.zeros(K, S, dtype=W.dtype)
    identity[:, :K] = torch.eye(K, dtype=W.dtype)
    out = torch.empty(O, Cg, K, dtype=W.dtype)
    for o in range(O):
        for i in range(Cg):
            c = (o // Og) * Cg + i  # the input channel kernel entry (o, i) reads
            out[o, i] = (layer.D.detach()[c] + identity) @ W[o, i]
    return out.reshape(O, Cg, kh, kw)


def reference_forward(layer: DOConv2d, x: torch.Tensor) -> torch.Tensor:
    weight = reference_kernel(layer)
    bias = None if layer.bias is None else layer.bias.detach()
    if layer.padding_mode != 'zeros':
        ph, pw = layer.padding
        x = F.pad(x, (pw, pw, ph, ph), mode=layer.padding_mode)
        return F.conv2d(x, weight, bias, layer.stride, 0, layer.dilation, layer.groups)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def randomise(layer: DOConv2d, seed: int = 0) -> DOConv2d:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def use_batched_function(monkeypatch, layer: DOConv2d) -> None:
    """Make ``layer`` train through the Function with the launch-light composer: what a GPU
    runs for grouped convs, D_mul > kh·kw and under others' saved-tensor hooks (the layouts a
    GPU runs as autograd ops are tested in test_recomposed_conv.py)."""
    monkeypatch.setattr(layer, '_training_composer', lambda: BATCHED_COMPOSER)
    monkeypatch.setattr(layer, '_recompose_in_autograd', False)


# (in, out, groups): plain, grouped, depthwise, depthwise with channel multiplier 2
GROUPINGS = [(4, 6, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4)]
# The launch-light composer's layouts: channel-major (plain, depthwise), block-diagonal (grouped,
# Cg <= MAX_CHANNELS_PER_GROUP) and the general formulas (grouped, Cg = 34 > 32).
COMPOSER_GROUPINGS = GROUPINGS + [(68, 4, 2)]
KERNELS = [(1, 1), (3, 3), (5, 5), (3, 5)]


@pytest.mark.parametrize('cin,cout,groups', GROUPINGS)
@pytest.mark.parametrize('kernel', KERNELS)
def test_matches_formula(cin, cout, groups, kernel):
    torch.manual_seed(0)
    taps = kernel[0] * kernel[1]
    grid = itertools.product([1, 2], [1, 2], ['zeros', 'reflect', 'replicate', 'circular'],
                             [taps, taps + 3], [True, False])
    for stride, dilation, padding_mode, d_mul, bias in grid:
        padding = (dilation * (kernel[0] - 1) // 2, dilation * (kernel[1] - 1) // 2)
        layer = DOConv2d(cin, cout, kernel, stride, padding, dilation, groups, bias, padding_mode,
                         dtype=torch.float64, D_mul=d_mul)
        randomise(layer, seed=stride + 10 * dilation + d_mul)
        x = torch.randn(2, cin, 11, 10, dtype=torch.float64)
        expected = reference_forward(layer, x)
        case = (stride, dilation, padding_mode, d_mul, bias)
        torch.testing.assert_close(layer(x), expected, atol=ATOL64, rtol=0, msg=str(case))
        if taps > 1:
            assert layer.D.abs().sum() > 0  # the check really exercised a non-zero D


def test_wrong_channel_binding_would_be_detected():
    """The reference code ties D to i (index within the group); c(o, i) must be the real channel."""
    layer = randomise(DOConv2d(4, 8, 3, padding=1, groups=4, dtype=torch.float64))
    wrong = layer.weight.detach().reshape(8, 1, 9) + torch.einsum(
        'oms,ois->oim', layer.D.detach()[[0] * 8], layer.weight.detach().reshape(8, 1, 9))
    assert not torch.allclose(layer.composed_weight().reshape(8, 1, 9), wrong)
    torch.testing.assert_close(layer.composed_weight(), reference_kernel(layer), atol=ATOL64,
                               rtol=0)


def test_fresh_layer_is_plain_conv():
    layer = DOConv2d(3, 5, 3, 2, 1, D_mul=12)
    plain = nn.Conv2d(3, 5, 3, 2, 1)
    plain.load_state_dict({'weight': layer.weight, 'bias': layer.bias})
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(layer(x), plain(x))
    assert torch.count_nonzero(layer.D) == 0
    assert layer.weight_extra.abs().max() > 0  # extra columns are initialised, so they can learn


def test_shapes_and_conv2d_contract():
    layer = DOConv2d(8, 16, (3, 5), groups=2, D_mul=20)
    assert isinstance(layer, nn.Conv2d)
    assert layer.weight.shape == (16, 4, 3, 5)
    assert layer.D.shape == (8, 15, 20)
    assert layer.weight_extra.shape == (16, 4, 5)
    assert layer.transposed is False and layer.output_padding == (0, 0)
    one = DOConv2d(8, 16, 1, D_mul=9)
    assert one.D is None and one.weight_extra is None and one.D_mul == 1
    assert [n for n, _ in one.named_parameters()] == ['weight', 'bias']


def test_positional_stride_is_stride():
    layer = DOConv2d(3, 4, 3, 2)
    assert layer.stride == (2, 2) and layer.D_mul == 9
    assert layer(torch.randn(1, 3, 8, 8)).shape == (1, 4, 3, 3)
    with pytest.raises(TypeError):
        DOConv2d(3, 4, 3, 1, 0, 1, 1, True, 'zeros', None, None, 9)  # D_mul is keyword-only


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(D_mul=4), ValueError, 'D_mul=4 is smaller than kh\\*kw=9'),
    (dict(D_mul=9.0), TypeError, 'D_mul must be an int'),
    (dict(D_mul=True), TypeError, 'D_mul must be an int'),
    (dict(groups=3), ValueError, 'in_channels must be divisible by groups'),
    (dict(padding_mode='mirror'), ValueError, 'padding_mode'),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DOConv2d(4, 4, 3, **kwargs)


def test_gradcheck_weight_D_extra_and_input():
    """Analytic gradients of the composition match finite differences for every input."""
    from do_conv_mm import compose_kernel
    torch.manual_seed(0)
    layer = randomise(DOConv2d(4, 6, 3, 1, 1, groups=2, dtype=torch.float64, D_mul=11))
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in
              (layer.weight, layer.D, layer.weight_extra, layer.bias)]

    def forward(x, weight, D, extra, bias):
        return F.conv2d(x, compose_kernel(weight, D, extra, 2), bias, 1, 1, 1, 2)

    assert torch.autograd.gradcheck(forward, (x, *params))
    # the module's own forward produces non-zero gradients for W, D and the extra columns
    out = layer(x).square().sum()
    grads = torch.autograd.grad(out, [x, layer.weight, layer.D, layer.weight_extra])
    assert all(g.abs().sum() > 0 for g in grads)


def test_eval_follows_every_way_parameters_change():
    """Nothing is cached: eval outputs follow an optimizer step, load_state_dict, copy_, writes
    through .data (which bump no version counter), .to() and a swap of parameter storages."""
    torch.manual_seed(0)
    layer = randomise(DOConv2d(4, 4, 3, padding=1, dtype=torch.float64)).eval()
    other = randomise(DOConv2d(4, 4, 3, padding=1, dtype=torch.float64), seed=1)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=ATOL64,
                                       rtol=0)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=ATOL64,
                                       rtol=0)

    check()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().mean().backward()
    opt.step()
    check()
    layer.load_state_dict(other.state_dict())
    check()
    with torch.no_grad():
        layer.D.copy_(torch.randn_like(layer.D))
    check()
    layer.weight.data.zero_()
    layer.D.data.add_(0.5)
    check()
    layer.weight.data = other.weight.data.clone()  # storage swap, as EMA swaps do
    check()
    layer.float()
    with torch.no_grad():
        torch.testing.assert_close(layer(x.float()), reference_forward(layer, x.float()),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('keep_min_bytes', [None, 0])
def test_kernel_composed_under_inference_mode_never_reaches_autograd(monkeypatch, keep_min_bytes):
    """inference_mode first, then gradients: for input gradients through a frozen layer
    (saliency, attacks) and for training. Nothing composed in inference mode is saved for
    backward or written to outside it, also with a kept kernel (threshold lowered to 0)."""
    if keep_min_bytes is not None:
        monkeypatch.setattr(compose_blocked, 'KEEP_MIN_BYTES', keep_min_bytes)
    layer = randomise(DOConv2d(4, 4, 3, padding=1, dtype=torch.float64))
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with torch.inference_mode():
        layer(x)
    layer.requires_grad_(False)
    x.requires_grad_(True)
    layer(x).sum().backward()
    expected = torch.autograd.grad(reference_forward(layer, x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, atol=ATOL64, rtol=0)
    layer.requires_grad_(True)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()
    assert layer.D.grad.abs().sum() > 0


def test_frozen_layer_gives_input_gradients():
    layer = randomise(DOConv2d(4, 4, 3, padding=1, dtype=torch.float64)).requires_grad_(False)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    expected = torch.autograd.grad(reference_forward(layer, x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, atol=ATOL64, rtol=0)


def test_warm_start_from_plain_state_dict_is_identity():
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    layer = randomise(DOConv2d(4, 6, 3, padding=1, groups=2, D_mul=12))
    result = layer.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(layer(x), plain(x))
    assert torch.count_nonzero(layer.D) == 0


def test_missing_weight_is_still_reported():
    layer = DOConv2d(4, 6, 3)
    with pytest.raises(RuntimeError, match='Missing key'):
        layer.load_state_dict({'bias': torch.zeros(6)}, strict=True)


def test_deepcopy_and_pickle_never_share_a_kept_kernel():
    layer = randomise(DOConv2d(4, 4, 3, padding=1))
    layer._blocked_composer.buffer = torch.zeros(4, 4, 3, 3)
    for clone in (deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._blocked_composer.buffer is None
        x = torch.randn(1, 4, 5, 5)
        torch.testing.assert_close(clone(x), layer(x))


def test_from_conv2d_shares_weights_and_matches():
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=4)
    layer = DOConv2d.from_conv2d(conv, D_mul=10)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    x = torch.randn(1, 4, 7, 7)
    assert torch.equal(layer(x), conv(x))
    with pytest.raises(TypeError, match='plain torch.nn.Conv2d'):
        DOConv2d.from_conv2d(layer)


@pytest.mark.parametrize('d_mul', [None, 12])
def test_conversion_keeps_a_frozen_conv_frozen(d_mul):
    """A conv frozen before conversion (requires_grad=False: a stage frozen in __init__, an EMA
    target network) gets a frozen D and frozen extra columns, as if conv_cfg had built it and
    the model had then frozen all its parameters; a trainable conv gets trainable ones."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    model[0].requires_grad_(False)
    convert_to_doconv(model, D_mul=d_mul)
    frozen, trainable = model
    extras = ('D', ) if d_mul is None else ('D', 'weight_extra')
    assert all(not getattr(frozen, name).requires_grad for name in extras)
    assert all(getattr(trainable, name).requires_grad for name in extras)
    model(torch.randn(1, 3, 9, 9)).sum().backward()
    assert frozen.D.grad is None and trainable.D.grad is not None


def test_to_conv2d_keeps_attributes_and_output():
    layer = randomise(DOConv2d(4, 6, (3, 5), 2, (1, 2), 1, 2, False, 'reflect', D_mul=18))
    layer.eval()
    conv = layer.to_conv2d()
    assert type(conv) is nn.Conv2d
    for attr in ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation',
                 'groups', 'padding_mode', 'training'):
        assert getattr(conv, attr) == getattr(layer, attr), attr
    assert conv.bias is None
    x = torch.randn(2, 4, 12, 12)
    # fp32: the fold rounds each composed entry once (float64 -> float32); outputs of magnitude
    # ~10 accumulate ~60 products, so they agree to ~1e-5 absolute.
    torch.testing.assert_close(conv(x), layer(x), atol=1e-4, rtol=1e-5)


def test_autocast_bf16_cpu():
    layer = randomise(DOConv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.D.grad is not None
    # bf16 keeps 8 mantissa bits: relative error ~2^-8 per product, so compare at 5e-2.
    torch.testing.assert_close(y.float(), layer(x).detach(), atol=5e-2 * 10, rtol=5e-2)


@pytest.mark.parametrize('mode', ['train', 'no_grad', 'frozen'])
@pytest.mark.parametrize('input_dtype', [torch.float64, torch.float16, torch.bfloat16])
def test_input_of_another_dtype_is_rejected_as_conv2d_rejects_it(mode, input_dtype):
    """Outside autocast a float32 layer given another dtype fails as nn.Conv2d does, with the
    same message, in every forward path (the training Function used to cast W' silently)."""
    layer = randomise(DOConv2d(4, 6, 3, padding=1))
    plain = layer.to_conv2d()
    if mode == 'frozen':
        layer.requires_grad_(False)
    x = torch.randn(2, 4, 8, 8, dtype=input_dtype)
    with torch.set_grad_enabled(mode != 'no_grad'):
        with pytest.raises(RuntimeError) as plain_error:
            plain(x)
        with pytest.raises(RuntimeError) as doconv_error:
            layer(x)
    assert str(doconv_error.value) == str(plain_error.value)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_parameters_train(dtype):
    """A model cast to bf16 / fp16 as a whole (no autocast) trains through the training path:
    output and every gradient in the parameters' dtype, each within 4 machine epsilons of the
    float64 result relative to its largest entry (measured: at most 1.05 eps over 10 seeds; each
    entry rounds a few times: a 12-term composition, then a 72-term convolution sum)."""
    try:
        nn.Conv2d(1, 1, 1).to(dtype)(torch.zeros(1, 1, 1, 1, dtype=dtype))
    except RuntimeError as error:  # torch 2.1: "slow_conv2d_cpu" not implemented for 'Half'
        pytest.skip(f'this torch has no {dtype} conv2d on CPU, plain or DO-Conv: {error}')
    torch.manual_seed(0)
    layer = randomise(DOConv2d(8, 16, 3, padding=1, D_mul=12)).to(dtype)
    reference = deepcopy(layer).double()  # the same (rounded) parameters
    x = torch.randn(2, 8, 10, 10, dtype=dtype, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    y, y64 = layer(x), reference(x64)
    y.float().square().sum().backward()
    y64.square().sum().backward()
    tol = 4 * torch.finfo(dtype).eps
    pairs = [(y, y64), (x.grad, x64.grad)] + [
        (getattr(layer, n).grad, getattr(reference, n).grad)
        for n in ('weight', 'D', 'weight_extra', 'bias')]
    for got, expected in pairs:
        assert got.dtype == dtype
        assert (got.double() - expected).abs().max() <= tol * expected.abs().max()


def test_torch_compile_fullgraph():
    layer = randomise(DOConv2d(4, 6, 3, padding=1, groups=2, D_mul=11))
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(layer, backend='eager', fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))


def test_torch_compile_inductor_trains_like_eager():
    """torch.compile with its default backend (Inductor, what mmengine's ``compile=True``
    uses): 3 SGD steps of a model with a D_mul > kh·kw, a grouped and a depthwise reflect-padded
    DO-Conv track an eager twin (fp32; Inductor fuses and reorders sums: measured 4e-7
    relative, compared at 1e-5), then eval agrees too. Compiling takes 5-25 s (warm or cold
    Inductor cache) on 2 cores."""
    torch.manual_seed(0)
    model = nn.Sequential(  # default init, D ~ N(0, 0.1²): a model that trains stably
        DOConv2d(4, 8, 3, padding=1, D_mul=11), nn.ReLU(),
        DOConv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        DOConv2d(8, 8, 3, padding=1, groups=8, padding_mode='reflect'))
    with torch.no_grad():
        for layer in model[::2]:
            layer.D.normal_(0, 0.1)
    eager = deepcopy(model)
    compiled = torch.compile(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (model, eager)]
    x = torch.randn(2, 4, 12, 12)

    def close(got, expected):
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()

    for _ in range(3):
        out, expected = compiled(x), eager(x)
        close(out, expected)
        out.square().mean().backward()
        expected.square().mean().backward()
        for got_p, expected_p in zip(model.parameters(), eager.parameters()):
            close(got_p.grad, expected_p.grad)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    eager.eval()
    with torch.no_grad():
        close(compiled(x), eager(x))


def test_jit_trace_follows_parameters():
    layer = randomise(DOConv2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(1, 4, 6, 6)
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x))
    with torch.no_grad():
        layer.D.mul_(2)
    # the trace composes from the live parameters, so it never serves a stale kernel
    torch.testing.assert_close(traced(x), layer(x))


def test_fold_copy_of_a_model_that_keeps_graph_tensors():
    """A module that keeps training-time tensors of an autograd graph (mmdet's dense heads keep
    predictions in ``_raw_positive_infos`` after a loss pass) cannot be deep-copied by torch;
    fold_doconv's copy holds their detached values instead, and the original keeps its own."""
    import copy

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = randomise(DOConv2d(3, 4, 3, padding=1))
            self._infos = {}

        def forward(self, x):
            y = self.conv(x)
            self._infos['preds'] = [y * 2]
            return y

    head, x = Head(), torch.randn(1, 3, 6, 6)
    head(x).sum().backward()
    with pytest.raises(RuntimeError, match='graph leaves'):
        copy.deepcopy(head)
    kept = head._infos['preds'][0]
    folded = fold_doconv(head)
    assert type(folded.conv) is nn.Conv2d and folded._infos['preds'][0].grad_fn is None
    assert torch.equal(folded._infos['preds'][0], kept) and head._infos['preds'][0] is kept
    with torch.no_grad():
        torch.testing.assert_close(folded(x), head(x), atol=1e-5, rtol=1e-5)


def test_fold_doconv_model_copy_and_inplace():
    model = nn.Sequential(randomise(DOConv2d(3, 4, 3, padding=1)), nn.ReLU(),
                          nn.Sequential(randomise(DOConv2d(4, 4, 1)))).eval()
    x = torch.randn(1, 3, 6, 6)
    folded = fold_doconv(model)
    assert isinstance(model[0], DOConv2d)
    assert not any(isinstance(m, DOConv2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    same = fold_doconv(model, inplace=True)
    assert same is model and type(model[0]) is nn.Conv2d


def test_fold_state_dict_of_a_bare_layer():
    """A bare DOConv2d's own state dict (keys 'weight', 'D', 'weight_extra', no prefix) folds
    too: it strict-loads into the plain conv, which computes the layer's output (float64,
    1e-10; grouped, D_mul > kh*kw)."""
    from do_conv_mm import fold_state_dict
    layer = randomise(DOConv2d(4, 6, 3, padding=1, groups=2, D_mul=12, dtype=torch.float64))
    folded = fold_state_dict(layer.state_dict())
    assert list(folded) == ['weight', 'bias']
    plain = nn.Conv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64)
    plain.load_state_dict(folded, strict=True)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(plain(x), reference_forward(layer, x), atol=ATOL64, rtol=0)


@pytest.mark.parametrize('cin,cout,groups', GROUPINGS)
@pytest.mark.parametrize('padding_mode,d_extra', [('zeros', 0), ('reflect', 3), ('circular', 0)])
def test_training_path_gradients_match_autograd_of_formula(cin, cout, groups, padding_mode,
                                                           d_extra):
    """The memory-saving training Function (hand-written backward) against autograd."""
    torch.manual_seed(0)
    layer = randomise(DOConv2d(cin, cout, (3, 5), 2, (1, 2), 1, groups, True, padding_mode,
                               dtype=torch.float64, D_mul=15 + d_extra))
    x = torch.randn(2, cin, 9, 10, dtype=torch.float64, requires_grad=True)
    r = torch.randn_like(layer(x))
    params = [p for p in (layer.weight, layer.D, layer.weight_extra, layer.bias) if p is not None]
    got = torch.autograd.grad((layer(x) * r).sum(), [x] + params)
    padded = x if padding_mode == 'zeros' else F.pad(x, (2, 2, 1, 1), mode=padding_mode)
    expected_out = F.conv2d(padded, compose_kernel(layer.weight, layer.D, layer.weight_extra,
                                                   groups), layer.bias, 2,
                            (1, 2) if padding_mode == 'zeros' else 0, 1, groups)
    expected = torch.autograd.grad((expected_out * r).sum(), [x] + params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=0)


def test_training_path_gradcheck():
    """Finite differences through the module's own training forward, every parameter included."""
    torch.manual_seed(0)
    layer = randomise(DOConv2d(4, 6, 3, 1, 1, groups=2, dtype=torch.float64, D_mul=11))
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    names = ['weight', 'D', 'weight_extra', 'bias']
    values = [getattr(layer, n).detach().clone().requires_grad_() for n in names]

    def forward(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x, ))

    assert torch.autograd.gradcheck(forward, (x, *values))


def test_training_path_saves_only_inputs_and_keeps_no_small_kernel():
    """Only inputs are saved for backward, and a kernel under 32 MiB is not kept either: the
    training path holds no kernel-sized tensor beyond the parameters."""
    layer = randomise(DOConv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 8, 6, 6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert len(saved) == 3  # x, weight, D (no bias, no weight_extra, no composed kernel)
    assert any(t is layer.weight for t in saved) and any(t is layer.D for t in saved)
    assert layer._blocked_composer.buffer is None
    y.sum().backward()
    assert layer._blocked_composer.buffer is None


@pytest.mark.parametrize('composer', ['blocked', 'batched'])
def test_training_path_frees_the_recomposed_kernel_before_parameter_gradients(monkeypatch,
                                                                             composer):
    """Backward recomposes W', convolves backward with it, and lets it go before the composer
    allocates dL/dweight and dL/dD: at most one kernel-sized temporary beside dL/dW' (the layer
    with the largest kernel runs its backward first, while the activations are still held)."""
    import weakref
    layer = randomise(DOConv2d(8, 8, 3, padding=1))
    chosen = BATCHED_COMPOSER if composer == 'batched' else layer._blocked_composer
    use_batched_function(monkeypatch, layer)
    monkeypatch.setattr(layer, '_training_composer', lambda: chosen)
    recomposed, alive_at_gradients = [], []
    compose_again, gradients = chosen.kernel_for_backward, chosen.backward

    def recording_kernel_for_backward(*args):
        kernel = compose_again(*args)
        recomposed.append(weakref.ref(kernel))
        return kernel

    def checking_backward(*args):
        alive_at_gradients.append(recomposed[-1]() is not None)
        return gradients(*args)

    monkeypatch.setattr(chosen, 'kernel_for_backward', recording_kernel_for_backward)
    monkeypatch.setattr(chosen, 'backward', checking_backward)
    layer(torch.randn(1, 8, 6, 6)).sum().backward()
    assert alive_at_gradients == [False]
    assert layer.D.grad is not None


def test_training_path_keeps_one_large_kernel_per_layer(monkeypatch):
    """A kernel over the threshold (lowered here to 0 bytes) lives in one per-layer buffer, reused
    by every call and step, replaced on a dtype change and given back on a mode switch."""
    monkeypatch.setattr(compose_blocked, 'KEEP_MIN_BYTES', 0)
    layer = randomise(DOConv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 8, 6, 6)
    y = layer(x)
    buffer = layer._blocked_composer.buffer
    torch.testing.assert_close(buffer, reference_kernel(layer), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    layer(x).sum().backward()
    assert layer._blocked_composer.buffer is buffer
    layer.double()
    layer(x.double()).sum().backward()
    assert layer._blocked_composer.buffer.dtype == torch.float64
    assert deepcopy(layer)._blocked_composer.buffer is None
    layer.eval()
    assert layer._blocked_composer.buffer is None


def formula_gradients(layer: DOConv2d, inputs, loss_fn, params=None):
    """Autograd through the plain composition expression, w.r.t. ``params`` (default: all the
    layer's parameters): the reference for the training paths."""
    kernel = compose_kernel(layer.weight, layer.D, layer.weight_extra, layer.groups)
    outputs = [F.conv2d(x, kernel, layer.bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups) for x in inputs]
    return torch.autograd.grad(loss_fn(outputs),
                               list(layer.parameters()) if params is None else params)


@pytest.mark.parametrize('d_mul', [9, 12])
def test_training_path_blocked_composition_matches_formula(monkeypatch, d_mul):
    """Blocks of a few output channels (the path large kernels take) compose and back-propagate
    exactly what one block does; 100 elements per block splits 24 channels into 12 blocks."""
    monkeypatch.setattr(compose_blocked, 'BLOCK_ELEMENTS', 100)
    layer = randomise(DOConv2d(6, 24, 3, padding=1, dtype=torch.float64, D_mul=d_mul))
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    got = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()))
    expected = formula_gradients(layer, [x], lambda ys: ys[0].square().sum())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=0)
    with torch.no_grad():
        composed = compose_blocked.compose_kernel_into(torch.empty_like(layer.weight), layer.weight,
                                                       layer.D, layer.weight_extra)
    torch.testing.assert_close(composed, reference_kernel(layer), atol=ATOL64, rtol=0)


@pytest.mark.parametrize('keep_min_bytes', [0, None])
@pytest.mark.parametrize('groups', [1, 2])
def test_training_path_shared_layer_called_twice_before_backward(monkeypatch, groups,
                                                                 keep_min_bytes):
    """A layer applied to several inputs (mmdet's shared heads), kept kernel (threshold 0) or
    not (default threshold): the parameter gradients sum every call's. (All calls have the
    same W' here; that earlier calls recompose a buffer overwritten by a later call is checked
    by the per-call-weight test below.)"""
    if keep_min_bytes is not None:
        monkeypatch.setattr(compose_blocked, 'KEEP_MIN_BYTES', keep_min_bytes)
    layer = randomise(DOConv2d(4, 6, 3, padding=1, groups=groups, dtype=torch.float64))
    inputs = [torch.randn(1, 4, 5, 5, dtype=torch.float64) for _ in range(3)]

    def loss(outputs):
        return sum((i + 1) * y.square().sum() for i, y in enumerate(outputs))

    got = torch.autograd.grad(loss([layer(x) for x in inputs]), list(layer.parameters()))
    for g, e in zip(got, formula_gradients(layer, inputs, loss)):
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=0)


@pytest.mark.parametrize('groups', [1, 2])
def test_shared_layer_whose_weight_changes_per_call_backpropagates_each_calls_kernel(
        monkeypatch, groups):
    """A shared layer whose weight differs on every call (a parametrisation; here call k
    scales it by k) with a kept kernel (threshold 0): the buffer holds the last call's W' when
    the earlier calls run backward, so their input gradients need their own W' recomposed.
    Input and parameter gradients against the formula with each call's kernel (float64)."""
    monkeypatch.setattr(compose_blocked, 'KEEP_MIN_BYTES', 0)
    layer = randomise(DOConv2d(4, 6, 3, padding=1, groups=groups, dtype=torch.float64))

    class CallScaled(nn.Module):
        calls = 0

        def forward(self, weight):
            self.calls += 1
            return weight * self.calls

    scaled = CallScaled()
    torch.nn.utils.parametrize.register_parametrization(layer, 'weight', scaled)
    scaled.calls = 0  # registering evaluates it once
    inputs = [torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
              for _ in range(3)]

    def loss(outputs):
        return sum((i + 1) * y.square().sum() for i, y in enumerate(outputs))

    params = list(layer.parameters())
    got = torch.autograd.grad(loss([layer(x) for x in inputs]), inputs + params)
    base = layer.parametrizations.weight.original
    outputs = [F.conv2d(x, compose_kernel(base * k, layer.D, None, groups), layer.bias, 1, 1, 1,
                        groups) for k, x in enumerate(inputs, 1)]
    expected = torch.autograd.grad(loss(outputs), inputs + params)
    for g, e in zip(got, expected):  # gradients reach ~1e4 here: 1e-12 relative as well
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=1e-12)


def test_kernel_is_kept_from_its_size_in_bytes(monkeypatch):
    """KEEP_MIN_BYTES is a size in bytes: a float32 kernel of exactly that many bytes is kept
    in the layer's buffer, one byte more and it is composed fresh (not kept)."""
    layer = randomise(DOConv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 8, 6, 6)
    size = layer.weight.numel() * 4
    monkeypatch.setattr(compose_blocked, 'KEEP_MIN_BYTES', size)
    layer(x).sum().backward()
    assert layer._blocked_composer.buffer is not None
    layer.train()  # gives the buffer back
    monkeypatch.setattr(compose_blocked, 'KEEP_MIN_BYTES', size + 1)
    layer(x).sum().backward()
    assert layer._blocked_composer.buffer is None


def test_training_path_follows_in_place_edits_between_steps():
    """Every training forward recomposes: edits through .data (which do not bump the version
    counter) and optimizer steps are both seen."""
    layer = randomise(DOConv2d(4, 4, 3, padding=1, dtype=torch.float64))
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().mean().backward()
    opt.step()
    torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=ATOL64, rtol=0)
    layer.D.data.add_(0.5)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=ATOL64, rtol=0)


# ------------------------------------------------------------------------------------------------
# A drop-in wherever nn.Conv2d goes: layouts, autograd modes, transforms, loading paths
# ------------------------------------------------------------------------------------------------
def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` (N, C, H, W) in another layout a model may hand a conv."""
    if layout == 'channels_last':
        return x.contiguous(memory_format=torch.channels_last)
    if layout == 'sliced':  # every other column of a wider map: non-contiguous, odd strides
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == 'tokens':  # (N, H*W, C) token map permuted back to NCHW (mmseg nlc_to_nchw)
        N, C, H, W = x.shape
        return x.flatten(2).transpose(1, 2).contiguous().transpose(1, 2).reshape(N, C, H, W)
    if layout == 'unbatched':
        return x[0]
    return x


LAYOUTS = ['contiguous', 'channels_last', 'sliced', 'tokens', 'unbatched']
MODES = ['train', 'eval', 'no_grad', 'inference_mode']


@pytest.mark.parametrize('cin,cout,groups', GROUPINGS)
@pytest.mark.parametrize('d_extra', [0, 3])
@pytest.mark.parametrize('mode', MODES)
def test_layouts_and_autograd_modes_match_conv2d_on_composed_kernel(cin, cout, groups, d_extra,
                                                                    mode):
    """Forward and every gradient (input, weight, D, weight_extra, bias) against F.conv2d on the
    composed kernel, float64, for each input layout; no_grad / inference_mode forward only."""
    torch.manual_seed(0)
    layer = randomise(DOConv2d(cin, cout, 3, 1, 1, groups=groups, dtype=torch.float64,
                               D_mul=9 + d_extra), seed=groups + d_extra)
    layer.train(mode == 'train')
    base = torch.randn(2, cin, 7, 6, dtype=torch.float64)
    params = [p for p in (layer.weight, layer.D, layer.weight_extra, layer.bias) if p is not None]
    for layout in LAYOUTS:
        x = _layout(base, layout)
        assert torch.equal(x, base[0] if layout == 'unbatched' else base)
        expected = F.conv2d(x, compose_kernel(*params[:-1], groups) if d_extra else
                            compose_kernel(params[0], params[1], None, groups), layer.bias, 1, 1,
                            1, groups)
        if mode in ('no_grad', 'inference_mode'):
            with getattr(torch, mode)():
                got = layer(x)
            torch.testing.assert_close(got, expected, atol=ATOL64, rtol=0, msg=layout)
            continue
        x = x.detach().requires_grad_()
        got = layer(x)
        torch.testing.assert_close(got, expected.detach(), atol=ATOL64, rtol=0, msg=layout)
        r = torch.randn_like(got)
        got_grads = torch.autograd.grad((got * r).sum(), [x] + params)
        expected_out = F.conv2d(x, compose_kernel(layer.weight, layer.D, layer.weight_extra,
                                                  groups), layer.bias, 1, 1, 1, groups)
        expected_grads = torch.autograd.grad((expected_out * r).sum(), [x] + params)
        for name, g, e in zip(['input', 'weight', 'D', 'weight_extra', 'bias'], got_grads,
                              expected_grads):
            torch.testing.assert_close(g, e, atol=ATOL64, rtol=0, msg=f'{layout}: d{name}')


def test_channels_last_model_trains():
    """model.to(memory_format=channels_last) makes the weights channels_last too (common with
    AMP on GPUs): forward and backward still match the formula."""
    layer = randomise(DOConv2d(8, 16, 3, padding=1, dtype=torch.float64))
    layer = layer.to(memory_format=torch.channels_last)
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64).to(memory_format=torch.channels_last)
    layer(x).square().sum().backward()
    expected = formula_gradients(layer, [x], lambda ys: ys[0].square().sum())
    for g, e in zip([p.grad for p in layer.parameters()], expected):
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=0)


@pytest.mark.parametrize('cin,cout,groups', GROUPINGS)
@pytest.mark.parametrize('d_extra', [0, 3])
@pytest.mark.parametrize('composer', ['cpu', 'launch-light'])
def test_output_memory_format_follows_conv2d(monkeypatch, cin, cout, groups, d_extra, composer):
    """conv2d returns channels_last where its input or its weight is: a model made
    channels_last stays channels_last from its first conv on, even fed NCHW (mmdet's data
    preprocessor). The output strides equal nn.Conv2d's for every input / layer layout, every
    path (training, frozen, no_grad, inference_mode, also under bf16 autocast) and both
    composers; so do the folded conv's."""
    if composer == 'launch-light':
        monkeypatch.setattr(DOConv2d, '_training_composer', lambda self: BATCHED_COMPOSER)
    base = torch.randn(2, cin, 7, 6)
    for layer_format in (torch.contiguous_format, torch.channels_last):
        layer = randomise(DOConv2d(cin, cout, 3, padding=1, groups=groups, D_mul=9 + d_extra))
        plain = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
        layer.to(memory_format=layer_format)
        plain.to(memory_format=layer_format)
        assert layer.weight.stride() == plain.weight.stride()
        folded = layer.to_conv2d()
        assert folded.weight.stride() == plain.weight.stride()
        for input_format in (torch.contiguous_format, torch.channels_last):
            x = base.contiguous(memory_format=input_format)
            expected = plain(x).stride()
            for mode in ('train', 'frozen', 'no_grad', 'inference_mode', 'autocast',
                         'autocast no_grad'):
                layer.requires_grad_(mode != 'frozen')
                with (torch.inference_mode() if mode == 'inference_mode' else
                      torch.no_grad() if mode.endswith('no_grad') else contextlib.nullcontext()):
                    with torch.autocast('cpu', dtype=torch.bfloat16,
                                        enabled=mode.startswith('autocast')):
                        y = layer(x)
                        assert plain(x).stride() == expected
                assert y.stride() == expected, (layer_format, input_format, mode)
                if mode in ('train', 'autocast'):
                    y.float().sum().backward()
            assert folded(x).stride() == expected


@pytest.mark.parametrize('cin,cout,groups', [(4, 6, 1), (4, 4, 4), (4, 12, 4)])
def test_compiled_output_memory_format_follows_conv2d(cin, cout, groups):
    """Under torch.compile too (aot_eager: dynamo's graph and AOT autograd) a channels_last
    layer fed NCHW returns what compiled nn.Conv2d returns, in training and no_grad. Fake
    tensors report a depthwise W' as channels_last where the compiled code gives it
    contiguous, so the layer may not trust their strides (a depthwise layer returned NCHW)."""
    layer = randomise(DOConv2d(cin, cout, 3, padding=1, groups=groups, D_mul=11))
    layer.to(memory_format=torch.channels_last)
    plain = layer.to_conv2d()
    x = torch.randn(2, cin, 7, 6)
    for grad in (True, False):
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            y = torch.compile(layer, backend='aot_eager')(x)
            expected = torch.compile(plain, backend='aot_eager')(x)
        assert y.stride() == expected.stride() == plain(x).stride(), (grad, y.stride())
        torch.testing.assert_close(y, expected)


def _outcome(call):
    """What a call gives: ('ok', output shape) or ('error', its message)."""
    try:
        return 'ok', tuple(call().shape)
    except RuntimeError as error:
        return 'error', str(error)


@pytest.mark.parametrize('composer', ['cpu', 'launch-light'])
@pytest.mark.parametrize('d_mul', [9, 12])
def test_float64_layer_under_autocast_fails_as_conv2d(monkeypatch, composer, d_mul):
    """Autocast never casts float64: a float64 layer fed float32 under CPU autocast gets a
    bf16 input next to its float64 kernel, which conv2d rejects. The training paths used to
    cast the kernel down and train in bf16 (while no_grad raised)."""
    if composer == 'launch-light':
        monkeypatch.setattr(DOConv2d, '_training_composer', lambda self: BATCHED_COMPOSER)
    layer = DOConv2d(4, 6, 3, padding=1, D_mul=d_mul, dtype=torch.float64)
    plain = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 4, 5, 5)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), torch.autocast('cpu', dtype=torch.bfloat16):
            got, expected = _outcome(lambda: layer(x)), _outcome(lambda: plain(x))
        assert expected[0] == 'error'
        assert got == expected, grad


@pytest.mark.parametrize('composer', ['cpu', 'launch-light'])
def test_float64_input_under_autocast_is_not_cast(monkeypatch, composer):
    """Autocast never casts a float64 input, and neither do the training paths: a float64
    layer fed float64 under CPU bf16 autocast trains in float64 as nn.Conv2d runs (the
    formula's output and input gradient to 1e-10), and a float32 layer fed float64 fails, as
    nn.Conv2d fails, on the float64 input (a bf16-cast input would run instead)."""
    if composer == 'launch-light':
        monkeypatch.setattr(DOConv2d, '_training_composer', lambda self: BATCHED_COMPOSER)
    layer = randomise(DOConv2d(4, 6, 3, padding=1, D_mul=12, dtype=torch.float64))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    expected = reference_forward(layer, x)
    torch.testing.assert_close(y, expected, atol=ATOL64, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0],
                               torch.autograd.grad(expected.sum(), x)[0], atol=ATOL64, rtol=0)
    layer32 = DOConv2d(4, 6, 3, padding=1, D_mul=12)
    plain = nn.Conv2d(4, 6, 3, padding=1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got, wanted = _outcome(lambda: layer32(x)), _outcome(lambda: plain(x))
    assert wanted[0] == got[0] == 'error'  # (nn.Conv2d names the bias as bf16, ours as fp32)
    assert 'Input type (double)' in got[1]


def test_wrong_rank_input_is_reported_with_its_own_sizes():
    """'same' padding with an odd total pads the input in the layer; the rank error still
    names the sizes the caller passed, as nn.Conv2d's does."""
    layer, plain = DOConv2d(4, 6, 2, padding='same'), nn.Conv2d(4, 6, 2, padding='same')
    for shape in [(4, 5), (1, 2, 4, 5, 5)]:
        x = torch.randn(shape)
        got, expected = _outcome(lambda: layer(x)), _outcome(lambda: plain(x))
        assert expected[0] == 'error' and str(list(shape)) in expected[1]
        assert got == expected


@pytest.mark.parametrize('cin,cout', [(0, 4), (4, 0)])
def test_convs_without_channels_build_and_run_as_conv2d(cin, cout):
    """nn.Conv2d takes 0 input or output channels (pruned or generated architectures): so
    does DOConv2d, as a plain conv (no kernel to compose), forward and fold alike."""
    layer = DOConv2d(cin, cout, 3, D_mul=10)
    assert layer.D is None and layer.weight_extra is None
    plain = nn.Conv2d(cin, cout, 3)
    x = torch.randn(1, cin, 5, 5)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert _outcome(lambda: layer(x)) == _outcome(lambda: plain(x))
    assert type(layer.to_conv2d()) is nn.Conv2d
    with pytest.raises(ValueError, match='D_mul=5 is smaller'):
        DOConv2d(cin, cout, 3, D_mul=5)


def test_unbatched_input_trains():
    """(C, H, W) input, as nn.Conv2d takes it: forward and every gradient match the batched
    formula."""
    layer = randomise(DOConv2d(4, 6, 3, padding=1, dtype=torch.float64, D_mul=11))
    x = torch.randn(4, 9, 9, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (6, 9, 9)
    params = list(layer.parameters())
    got = torch.autograd.grad(y.square().sum(), [x] + params)
    expected = F.conv2d(x.unsqueeze(0), layer.composed_weight(), layer.bias, 1, 1)[0]
    torch.testing.assert_close(y, expected, atol=ATOL64, rtol=0)
    for g, e in zip(got, torch.autograd.grad(expected.square().sum(), [x] + params)):
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=0)


def penalty_gradients(forward, x: torch.Tensor, params) -> tuple:
    """Gradients w.r.t. ``params`` of the gradient penalty ||d sum(forward(x)²) / dx||²
    (create_graph=True): second-order terms of forward."""
    gx, = torch.autograd.grad(forward(x).square().sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), params)


def assert_penalty_gradients_match_expression(layer: DOConv2d, x: torch.Tensor):
    """The layer's second-order gradients equal the plain expression's (float64; second-order
    terms reach ~1e6 here: compared relatively)."""
    params = list(layer.parameters())
    got = penalty_gradients(layer, x, params)
    expected = penalty_gradients(
        lambda t: F.conv2d(t, layer.composed_weight(), layer.bias, 1, 1), x, params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=1e-12)


def test_double_backward_gradient_penalty():
    """create_graph=True (gradient penalties, Hessian-vector products): second-order gradients
    of the training path equal those of the plain expression; gradgradcheck passes."""
    torch.manual_seed(0)
    layer = randomise(DOConv2d(3, 4, 3, padding=1, groups=1, dtype=torch.float64, D_mul=11))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert_penalty_gradients_match_expression(layer, x)
    names = ['weight', 'D', 'weight_extra', 'bias']

    def forward(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x, ))

    values = [getattr(layer, n).detach().clone().requires_grad_() for n in names]
    small = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(forward, (small, *values))


@pytest.mark.parametrize('groups', [1, 2])
def test_backward_with_create_graph_gives_every_parameter_its_gradient(groups):
    """loss.backward(create_graph=True) / autograd.grad(..., create_graph=True) over all
    parameters (meta-learning, Hessian-vector products) takes the Function's differentiable
    backward: the first-order gradients of input, weight, D, weight_extra and bias equal the
    plain expression's (float64, 1e-10), and so does a Hessian-vector product through them."""
    layer = randomise(DOConv2d(4, 6, 3, padding=1, groups=groups, D_mul=12,
                               dtype=torch.float64))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(layer.parameters())
    assert len(inputs) == 5  # weight, bias, D, weight_extra

    def grads_and_hvp(forward):
        grads = torch.autograd.grad(forward(x).square().sum(), inputs, create_graph=True)
        vector = sum((g * (i + 1)).sum() for i, g in enumerate(grads))
        return grads + torch.autograd.grad(vector, inputs)

    got = grads_and_hvp(layer)
    expected = grads_and_hvp(lambda t: F.conv2d(t, layer.composed_weight(), layer.bias, 1, 1, 1,
                                                groups))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=1e-12)


def test_torch_func_per_sample_gradients_and_jvp():
    """torch.func.grad + vmap (per-sample gradients) and forward-mode jvp match loops over
    samples of the plain expression."""
    torch.manual_seed(0)
    layer = randomise(DOConv2d(3, 4, 3, padding=1, groups=1, dtype=torch.float64))
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)

    def loss(p, sample):
        return torch.func.functional_call(layer, p, (sample.unsqueeze(0), )).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(3):
        kernel = compose_kernel(layer.weight, layer.D, None, 1)
        y = F.conv2d(x[i:i + 1], kernel, layer.bias, 1, 1).square().sum()
        expected = torch.autograd.grad(y, [layer.weight, layer.D, layer.bias])
        for name, e in zip(['weight', 'D', 'bias'], expected):
            torch.testing.assert_close(per_sample[name][i], e, atol=ATOL64, rtol=0)
    tangent = torch.randn_like(x)
    _, jvp_out = torch.func.jvp(lambda t: layer(t), (x, ), (tangent, ))
    torch.testing.assert_close(jvp_out, F.conv2d(tangent, layer.composed_weight(), None, 1,
                                                 1).detach(), atol=ATOL64, rtol=0)


def test_forward_mode_ad_with_dual_tensors():
    """torch.autograd.forward_ad (dual tensors, no torch.func transform) on a training layer:
    the forward gives the primal and the tangent conv2d(tangent, W') of the formula (float64,
    1e-10), where the training Function, which has no jvp, would raise."""
    from torch.autograd import forward_ad
    layer = randomise(DOConv2d(4, 6, 3, padding=1, D_mul=12, dtype=torch.float64))
    x, tangent = (torch.randn(2, 4, 5, 5, dtype=torch.float64) for _ in range(2))
    with forward_ad.dual_level():
        primal, jvp_out = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, tangent)))
    kernel = layer.composed_weight().detach()
    torch.testing.assert_close(primal, F.conv2d(x, kernel, layer.bias, 1, 1).detach(),
                               atol=ATOL64, rtol=0)
    torch.testing.assert_close(jvp_out, F.conv2d(tangent, kernel, None, 1, 1), atol=ATOL64,
                               rtol=0)


def test_meta_device_init_then_assign_plain_state_dict():
    """How large models and FSDP are built: meta init, then load_state_dict(assign=True) of a
    plain checkpoint. D and weight_extra must end up real (D = 0), not left on meta."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    with torch.device('meta'):
        model = nn.Sequential(DOConv2d(3, 4, 3, padding=1), DOConv2d(4, 4, 3, padding=1,
                                                                     D_mul=12))
    result = model.load_state_dict(plain.state_dict(), assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, p in model.named_parameters():
        assert p.device.type == 'cpu' and torch.isfinite(p).all(), name
    assert torch.count_nonzero(model[0].D) == 0 and torch.count_nonzero(model[1].D) == 0
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)
    model(x).sum().backward()  # trainable: fresh D and weight_extra are parameters with grads
    assert model[1].D.grad is not None and model[1].weight_extra.grad is not None


def test_meta_device_to_empty_then_load_plain_state_dict():
    plain = nn.Conv2d(3, 4, 3, padding=1)
    with torch.device('meta'):
        layer = DOConv2d(3, 4, 3, padding=1, D_mul=12)
    layer = layer.to_empty(device='cpu')
    with torch.no_grad():  # to_empty leaves garbage: make it obvious
        layer.weight_extra.fill_(float('nan'))
        layer.D.fill_(float('nan'))
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(layer(x), plain(x), atol=0, rtol=0)


def test_meta_device_forward_gives_shapes():
    with torch.device('meta'):
        layer = DOConv2d(3, 4, 3, stride=2, padding=1, D_mul=12)
        x = torch.randn(2, 3, 9, 9)
    for mode in (torch.no_grad, torch.enable_grad):
        with mode():
            assert layer(x).shape == (2, 4, 5, 5)


def test_fx_symbolic_trace_records_composition_and_conv():
    """torch.fx (FX quantisation, pruning tools): DOConv2d traces to compose_kernel + conv2d on
    the live parameters; the GraphModule computes the same and trains."""
    model = nn.Sequential(randomise(DOConv2d(3, 4, 3, padding=1, D_mul=11)), nn.ReLU(),
                          randomise(DOConv2d(4, 4, 3, padding=1, padding_mode='reflect'),
                                    seed=1)).double()
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == 'call_function']
    assert compose_kernel.__name__ in {getattr(t, '__name__', '') for t in targets}
    assert torch.conv2d in targets
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(traced(x), model(x), atol=ATOL64, rtol=1e-12)
    traced(x).sum().backward()
    assert traced.get_submodule('0').D.grad is not None


def exported_name_of(exported, parameter: torch.Tensor) -> str:
    """The name under which an ExportedProgram holds ``parameter`` as a parameter (not a
    constant): the one state-dict entry with its shape and values."""
    names = [name for name, value in exported.state_dict.items()
             if value.shape == parameter.shape and torch.equal(value, parameter)]
    assert len(names) == 1 and names[0] in exported.graph_signature.parameters, names
    return names[0]


def test_torch_export_composes_live_and_trains():
    """torch.export (the capture behind torch.onnx's dynamo exporter, ExecuTorch, AOTInductor):
    an unfolded model exports with the composition in its graph (bmm + conv, D a parameter), the
    exported module equals the model in eval and train mode, follows a later change of D, and
    back-propagates into D (float64)."""
    model = nn.Sequential(randomise(DOConv2d(4, 6, 3, padding=1, groups=2, D_mul=11)), nn.ReLU(),
                          randomise(DOConv2d(6, 4, 3, padding=1, padding_mode='reflect'),
                                    seed=1)).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for train in (False, True):
        model.train(train)
        exported = torch.export.export(model, (x,))
        D_name = exported_name_of(exported, model[0].D)  # '0.D' (torch 2.1: 'L__self___0_D')
        exported_name_of(exported, model[2].D)
        targets = {str(n.target) for n in exported.graph.nodes if n.op == 'call_function'}
        assert 'aten.bmm.default' in targets
        assert targets & {'aten.conv2d.default', 'aten.convolution.default'}  # 2.1: convolution
        module = exported.module()
        torch.testing.assert_close(module(x), model(x), atol=ATOL64, rtol=1e-12)
    with torch.no_grad():
        module.get_parameter(D_name).add_(0.1)
        model[0].D.add_(0.1)
    torch.testing.assert_close(module(x), model(x), atol=ATOL64, rtol=1e-12)
    module(x).square().sum().backward()
    model(x).square().sum().backward()
    torch.testing.assert_close(module.get_parameter(D_name).grad, model[0].D.grad, atol=ATOL64,
                               rtol=1e-10)


def test_torch_jit_script():
    model = nn.Sequential(randomise(DOConv2d(3, 4, 3, padding=1, D_mul=11)), nn.ReLU(),
                          randomise(DOConv2d(4, 4, 1)),
                          randomise(DOConv2d(4, 4, 3, padding=1, padding_mode='circular'))).double()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(scripted(x), model(x), atol=ATOL64, rtol=1e-12)
    with torch.no_grad():
        model[0].D.add_(0.1)  # the scripted module shares the parameters and composes live
    torch.testing.assert_close(scripted(x), model(x), atol=ATOL64, rtol=1e-12)


@pytest.mark.parametrize('padding_mode', ['zeros', 'reflect'])
def test_torch_jit_script_keeps_stride_dilation_and_groups(padding_mode):
    """The scripted forward (its own conv2d call) passes stride, dilation and groups on, for
    both of its padding branches: it equals F.conv2d of the formula's kernel (float64, 1e-10),
    a dilated, strided, grouped layer with D_mul > kh*kw and a non-square kernel."""
    layer = randomise(DOConv2d(4, 6, (3, 5), stride=(2, 1), padding=(2, 4), dilation=(2, 2),
                               groups=2, padding_mode=padding_mode, D_mul=17,
                               dtype=torch.float64))
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    expected = reference_forward(layer, x)
    assert expected.shape == (2, 6, 5, 11)
    torch.testing.assert_close(scripted(x), expected, atol=ATOL64, rtol=0)


@pytest.mark.parametrize('d_mul', [None, 12])
def test_torch_bn_fusers_exact(d_mul):
    """torch's fuse_conv_bn_eval and torch.ao.quantization.fuse_modules on an unfolded layer,
    also with D_mul > kh*kw (whose extra columns a fuser cannot see): the fused module computes
    conv -> BN, float64."""
    torch.manual_seed(0)
    conv = randomise(DOConv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64, D_mul=d_mul))
    bn = nn.BatchNorm2d(6, dtype=torch.float64)
    randomise_bn(bn)
    model = nn.Sequential(conv, bn, nn.ReLU()).eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    expected = model(x)
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    torch.testing.assert_close(torch.relu(fused(x)), expected, atol=ATOL64, rtol=0)
    quantisation_fused = torch.ao.quantization.fuse_modules(model, [['0', '1', '2']])
    torch.testing.assert_close(quantisation_fused(x), expected, atol=ATOL64, rtol=0)
    assert not any(isinstance(m, DOConv2d) for m in quantisation_fused.modules())
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)  # the original is untouched


def randomise_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()


def test_weight_reassignment_that_is_not_a_rescale_keeps_extra():
    layer = randomise(DOConv2d(4, 6, 3, padding=1, D_mul=12))
    extra = layer.weight_extra.detach().clone()
    layer.weight = nn.Parameter(torch.randn_like(layer.weight))
    assert torch.equal(layer.weight_extra, extra)
    layer.weight = nn.Parameter(layer.weight.detach() * 3)  # a rescale: W scales as a whole
    torch.testing.assert_close(layer.weight_extra.detach(), 3 * extra)


def test_parametrize_acts_on_weight():
    """torch.nn.utils.parametrize (and spectral / weight norm built on it) transforms ``weight``;
    W' is composed from the transformed weight. With D_mul = kh*kw a scaling parametrisation
    scales W'."""
    import torch.nn.utils.parametrize as parametrize

    class Scale(nn.Module):

        def forward(self, w):
            return 2 * w

    layer = randomise(DOConv2d(4, 6, 3, padding=1, dtype=torch.float64))
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    before = layer(x) - layer.bias.view(1, -1, 1, 1)
    parametrize.register_parametrization(layer, 'weight', Scale())
    after = layer(x) - layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(after, 2 * before, atol=ATOL64, rtol=0)
    after.sum().backward()
    assert layer.parametrizations.weight.original.grad is not None


@pytest.mark.parametrize('cin,cout,groups', COMPOSER_GROUPINGS)
@pytest.mark.parametrize('d_extra', [0, 3])
def test_batched_composer_equals_formula(cin, cout, groups, d_extra):
    """The launch-light CUDA formulation, run on CPU tensors: W', dL/dweight, dL/dD and
    dL/dweight_extra equal compose_kernel and its autograd to 1e-12 in float64."""
    torch.manual_seed(0)
    layer = randomise(DOConv2d(cin, cout, (3, 5), groups=groups, dtype=torch.float64,
                               D_mul=15 + d_extra))
    weight, D, extra = layer.weight, layer.D, layer.weight_extra
    with torch.no_grad():  # as inside the training Function
        kernel, token = BATCHED_COMPOSER.compose(weight, D, extra, groups)
        recomposed = BATCHED_COMPOSER.kernel_for_backward(token, weight, D, extra, groups)
        grad_kernel = torch.randn_like(kernel)
        got = BATCHED_COMPOSER.backward(grad_kernel, weight, D, extra, groups, token,
                                        (True, True, True))
    expected = compose_kernel(weight, D, extra, groups)
    torch.testing.assert_close(kernel, expected.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(recomposed, expected.detach(), atol=1e-12, rtol=0)
    params = [p for p in (weight, D, extra) if p is not None]
    expected_grads = torch.autograd.grad(expected, params, grad_kernel)
    for g, e in zip([g for g in got if g is not None], expected_grads):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0)


# ATen calls that launch no kernel: views, metadata and uninitialised allocations.
NO_KERNEL_OPS = {'view', '_unsafe_view', 'transpose', 't', 'permute', 'alias', 'slice',
                 'diagonal', 'unsqueeze', 'squeeze', 'expand', 'as_strided', 'detach', 'empty',
                 'empty_like', 'empty_strided', 'select', 'lift_fresh',
                 'is_same_size'}  # torch 2.1's engine checks gradient shapes at dispatch
CONV_OPS = {'convolution', 'convolution_backward', 'conv2d', '_convolution',
            'mkldnn_convolution', 'thnn_conv2d'}
# (in, out, groups) -> kernels beyond the conv: (forward, backward) at D_mul = kh·kw, and what
# D_mul > kh·kw adds. Channel-major: P = D + I and one matmul; backward three matmuls.
# Block-diagonal: zero fill, D + I into the diagonal blocks, one matmul; backward adds the copy of
# dL/dD's diagonal blocks.
KERNEL_BUDGET = {(4, 6, 1): ((2, 3), (1, 3)), (4, 8, 4): ((2, 3), (1, 3)),
                 (4, 6, 2): ((3, 4), (2, 4))}


class KernelLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the ATen calls that run a kernel (beyond the conv) under this mode."""

    def __init__(self):
        super().__init__()
        self.kernels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split('.')[0]
        if name not in NO_KERNEL_OPS and name not in CONV_OPS:
            self.kernels.append(name)
        return func(*args, **(kwargs or {}))


def kernels_of_a_training_step(layer: DOConv2d, cin: int):
    """(forward, backward) KernelLogs of one warm training step of ``layer`` on a 2×cin×6×6
    input that needs a gradient; gradients start as None, so nothing accumulates."""
    x = torch.randn(2, cin, 6, 6, requires_grad=True)
    layer(x).sum().backward()  # caches (the identity matrix)
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with KernelLog() as forward:
        y = layer(x)
    grad_out = torch.ones_like(y)
    with KernelLog() as backward:
        y.backward(grad_out)
    return forward, backward


@pytest.mark.parametrize('cin,cout,groups', list(KERNEL_BUDGET))
@pytest.mark.parametrize('d_extra', [0, 3])
def test_batched_composer_kernel_counts(monkeypatch, cin, cout, groups, d_extra):
    """The launch-light path's kernel count per layer and training step (issue 10: forward at
    most 2 beyond the conv, backward at most 3, one matmul more each for D_mul > kh·kw; grouped
    convs with several channels per group a zero fill and a copy more), counted at ATen's
    dispatcher on CPU tensors: the calls a GPU would launch."""
    layer = randomise(DOConv2d(cin, cout, 3, padding=1, groups=groups, D_mul=9 + d_extra))
    use_batched_function(monkeypatch, layer)
    forward, backward = kernels_of_a_training_step(layer, cin)
    (fwd, bwd), (fwd_extra, bwd_extra) = KERNEL_BUDGET[(cin, cout, groups)]
    if d_extra:
        fwd, bwd = fwd + fwd_extra, bwd + bwd_extra
    assert len(forward.kernels) <= fwd, forward.kernels
    assert len(backward.kernels) <= bwd, backward.kernels
    matmuls = [k for k in forward.kernels + backward.kernels if 'bmm' in k]
    assert len(matmuls) == (4 if not d_extra else 8), matmuls


@pytest.mark.parametrize('cin,cout,groups', COMPOSER_GROUPINGS)
@pytest.mark.parametrize('composer', ['blocked', 'batched'])
def test_training_function_under_autocast(monkeypatch, composer, cin, cout, groups):
    """Autocast runs inside the training Function (no fallback): W' composed in fp32 and cast
    once, the conv in bf16, parameter gradients in fp32; both composers (every layout of the
    batched one), CPU bf16. Reference: the same bf16 conv of the fp32-composed kernel (bf16
    keeps 8 mantissa bits: 2e-2)."""
    from do_conv_mm import composed_conv
    layer = randomise(DOConv2d(cin, cout, 3, padding=1, groups=groups, D_mul=12))
    if composer == 'batched':
        use_batched_function(monkeypatch, layer)
    applied = []
    original = composed_conv._ComposedConv2d.apply
    monkeypatch.setattr(composed_conv._ComposedConv2d, 'apply',
                        lambda *a: applied.append(1) or original(*a))
    x = torch.randn(2, cin, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x)
    assert applied and y.dtype == torch.bfloat16
    (y.float() ** 2).sum().backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(g.dtype == torch.float32 for g in grads)
    kernel = layer.composed_weight()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ref = F.conv2d(x, kernel.to(torch.bfloat16), layer.bias.to(torch.bfloat16), 1, 1, 1,
                       groups)
    expected = torch.autograd.grad((ref.float() ** 2).sum(), list(layer.parameters()))
    torch.testing.assert_close(y.float(), ref.float(), atol=0, rtol=0)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=2e-2 * e.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize('mode', ['frozen', 'no_grad', 'substitute'])
def test_paths_without_the_function_compose_in_fp32_under_autocast(mode):
    """Under autocast the expression path (a frozen layer giving input gradients; a substitute
    weight, as efficient_conv_bn_eval passes) and the no_grad path compose W' in the
    parameters' fp32 and leave only the conv to autocast, as the training Function does:
    the output is bit for bit autocast's bf16 conv of the fp32-composed kernel (the same ops;
    a kernel composed from bf16-cast factors differs from it by bf16 roundings, ~1e-2 here)."""
    layer = randomise(DOConv2d(4, 6, 3, padding=1, groups=2, D_mul=12))
    x = torch.randn(2, 4, 8, 8)
    weight = layer.weight
    if mode == 'frozen':
        layer.requires_grad_(False)
        x.requires_grad_(True)
    elif mode == 'substitute':
        weight = layer.weight * 1.0  # not the layer's own Parameter, same values
    kernel = layer.composed_weight().detach()
    with torch.autocast('cpu', dtype=torch.bfloat16), \
            torch.set_grad_enabled(mode != 'no_grad'):
        y = layer._conv_forward(x, weight, layer.bias)
        expected = F.conv2d(x, kernel, layer.bias, 1, 1, 1, 2)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


def test_structured_pruning_with_extra_columns_needs_their_mask_too():
    """With D_mul > kh·kw, output channels pruned in ``weight`` stay alive through weight_extra
    until it is pruned with the same mask (the README's recipe); then they are exactly 0."""
    import torch.nn.utils.prune as prune
    layer = randomise(DOConv2d(4, 6, 3, padding=1, bias=False, D_mul=12))
    prune.ln_structured(layer, 'weight', amount=0.5, n=2, dim=0)
    pruned = layer.weight_mask.flatten(1).sum(1) == 0
    x = torch.randn(2, 4, 6, 6)
    assert int(pruned.sum()) == 3 and layer(x)[:, pruned].abs().max() > 0
    prune.custom_from_mask(layer, 'weight_extra',
                           layer.weight_mask.flatten(2)[..., :1].expand_as(layer.weight_extra))
    assert layer(x)[:, pruned].abs().max() == 0 and layer(x)[:, ~pruned].abs().amax() > 0


@pytest.mark.parametrize('d_mul', [None, 12])
def test_pruning_acts_on_weight(d_mul):
    """torch.nn.utils.prune replaces ``weight`` by weight_orig * mask before every forward:
    the mask applies to ``weight`` (W' = (D + I) W is then not sparse; prune a folded model to
    sparsify the deployed kernel), and training reaches weight_orig and D."""
    import torch.nn.utils.prune as prune
    layer = randomise(DOConv2d(4, 6, 3, padding=1, dtype=torch.float64, D_mul=d_mul))
    prune.l1_unstructured(layer, 'weight', amount=0.5)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    masked = layer.weight_orig.detach() * layer.weight_mask
    expected = F.conv2d(x, compose_kernel(masked, layer.D.detach(),
                                          None if d_mul is None else layer.weight_extra.detach()),
                        layer.bias.detach(), 1, 1)
    y = layer(x)
    torch.testing.assert_close(y, expected, atol=ATOL64, rtol=0)
    y.square().sum().backward()
    assert layer.weight_orig.grad is not None and layer.D.grad.abs().sum() > 0
    assert torch.all(layer.weight_orig.grad[layer.weight_mask == 0] == 0)


@pytest.mark.parametrize('trainable', [('D', ), ('weight', ), ('weight', 'weight_extra')])
def test_partly_frozen_parameters(trainable):
    """Only some parameters train (e.g. D alone on a frozen pretrained kernel): their gradients
    match autograd of the formula, the frozen ones get none."""
    layer = randomise(DOConv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64, D_mul=12))
    for name, p in layer.named_parameters():
        p.requires_grad_(name in trainable)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    layer(x).square().sum().backward()
    wanted = [p for n, p in layer.named_parameters() if n in trainable]
    expected = torch.autograd.grad(
        F.conv2d(x, layer.composed_weight(), layer.bias, 1, 1, 1, 2).square().sum(), wanted)
    for p, e in zip(wanted, expected):
        torch.testing.assert_close(p.grad, e, atol=ATOL64, rtol=0)
    assert all(p.grad is None for n, p in layer.named_parameters() if n not in trainable)


@pytest.mark.parametrize('use_reentrant', [True, False])
def test_activation_checkpointing(use_reentrant):
    """torch.utils.checkpoint (mmdet/mmseg backbones' with_cp=True) recomputes the forward in
    backward: gradients equal those without checkpointing."""
    from torch.utils.checkpoint import checkpoint
    model = nn.Sequential(randomise(DOConv2d(4, 6, 3, padding=1, dtype=torch.float64)),
                          nn.ReLU(),
                          randomise(DOConv2d(6, 6, 3, padding=1, dtype=torch.float64), seed=1))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(model(x).square().sum(), [x] + list(model.parameters()))
    checkpoint(model, x, use_reentrant=use_reentrant).square().sum().backward()
    got = [x.grad] + [p.grad for p in model.parameters()]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=0)


def quantisable_model_and_input():
    """conv-BN-ReLU-conv with random D (the second with D_mul > kh·kw), in train mode, and an
    input batch (4, 3, 16, 16)."""
    torch.manual_seed(0)
    model = nn.Sequential(DOConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          DOConv2d(8, 8, 3, padding=1, D_mul=12))
    with torch.no_grad():
        for m in model:
            if isinstance(m, DOConv2d):
                m.D.normal_(std=0.1)
    return model, torch.randn(4, 3, 16, 16)


def test_fx_graph_mode_quantisation_of_unfolded_model():
    """prepare_fx / convert_fx (post-training int8) on an unfolded model: the weight observer
    sees the composed kernel, so the quantised model approximates the float one as well as the
    quantised folded model does (int8 steps of ~1/128 of each tensor's range)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    model, x = quantisable_model_and_input()
    model.eval()
    errors = {}
    for name, float_model in (('unfolded', model), ('folded', fold_doconv(model))):
        prepared = prepare_fx(float_model, get_default_qconfig_mapping('x86'), (x, ))
        prepared(x)  # calibration
        errors[name] = (convert_fx(prepared)(x) - model(x)).abs().max().item()
    scale = model(x).abs().max().item()
    assert errors['unfolded'] < 0.05 * scale
    assert errors['unfolded'] < 2 * errors['folded'] + 1e-3 * scale


def test_fx_quantisation_aware_training_of_unfolded_model():
    """prepare_qat_fx on an unfolded model (the FX path QAT tools such as MMRazor build on): the
    weight fake-quant observes the composed kernel W' per output channel (not W), D trains
    through it, and convert_fx gives an int8 model within a few int8 steps of the QAT model."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx
    model, x = quantisable_model_and_input()
    prepared = prepare_qat_fx(model, get_default_qat_qconfig_mapping('x86'), (x, ))
    compositions = [node for node in prepared.graph.nodes if node.target is compose_kernel]
    assert [node.args[1].target for node in compositions] == ['0.D', '3.D']

    def composed_and_fake_quant(node):  # W' from the GraphModule's copies of W, D (and extra)
        tensors = [prepared.get_parameter(a.target) if a is not None else None
                   for a in node.args[:3]]
        kernel = compose_kernel(*tensors, groups=node.args[3]).detach().flatten(1)
        return kernel, prepared.get_submodule(next(iter(node.users)).target)

    def d_of(node):
        return prepared.get_parameter(node.args[1].target)

    d_before = [d_of(node).detach().clone() for node in compositions]
    losses = []
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for step in range(5):
        loss = prepared(x).square().mean()
        if step == 0:  # the observer's first reading is the kernel it saw, exactly
            for node in compositions:
                composed, fake_quant = composed_and_fake_quant(node)
                observer = fake_quant.activation_post_process
                torch.testing.assert_close(observer.min_val, composed.amin(1), atol=0, rtol=0)
                torch.testing.assert_close(observer.max_val, composed.amax(1), atol=0, rtol=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for node, before in zip(compositions, d_before):
        assert (d_of(node) - before).abs().max() > 1e-4

    prepared.eval()
    with torch.no_grad():
        float_out = prepared(x)
        int8_out = convert_fx(prepared)(x)
    assert (int8_out - float_out).abs().max() < 0.05 * float_out.abs().max()


def eager_quantisable_model_and_input():
    """QuantWrapper(conv-BN-ReLU-grouped conv-ReLU-depthwise conv) with random D and D_mul >
    kh·kw on the grouped conv, and an input batch (4, 4, 16, 16)."""
    torch.manual_seed(0)
    model = nn.Sequential(DOConv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          DOConv2d(8, 8, 3, padding=1, groups=2, D_mul=12), nn.ReLU(),
                          DOConv2d(8, 8, 3, padding=1, groups=8))
    with torch.no_grad():
        for m in model:
            if isinstance(m, DOConv2d):
                m.D.normal_(std=0.1)
    return torch.ao.quantization.QuantWrapper(model), torch.randn(4, 4, 16, 16)


def test_eager_mode_post_training_quantisation_quantises_the_fold():
    """prepare / convert (eager post-training int8) swap each DOConv2d for torch's quantised
    conv of its fold: the int8 kernels are those made from the folded model, bit for bit. The
    calibration runs differ by float32 rounding (W' composed in float32 vs folded in float64),
    which moves the activation scales by ulps, so the outputs agree to 1e-6 relative, far below
    one int8 step (~1e-2 relative). Without the table entries the DOConv2d stays a float conv
    and the converted model fails on its quantised input."""
    from torch.ao.quantization import convert, get_default_qconfig, prepare
    from torch.ao.nn.quantized import Conv2d as QuantizedConv2d
    model, x = eager_quantisable_model_and_input()
    model.eval()
    outputs = {}
    for name, float_model in (('unfolded', model), ('folded', fold_doconv(model))):
        float_model.qconfig = get_default_qconfig('x86')
        prepared = prepare(float_model)
        prepared(x)  # calibration
        quantised = convert(prepared)
        convs = [m for m in quantised.modules() if isinstance(m, (nn.Conv2d, QuantizedConv2d))]
        assert [type(m) for m in convs] == [QuantizedConv2d] * 3
        outputs[name] = quantised(x), [m.weight() for m in convs]
    for got, expected in zip(outputs['unfolded'][1], outputs['folded'][1]):
        assert torch.equal(got.int_repr(), expected.int_repr())
        assert torch.equal(got.q_per_channel_scales(), expected.q_per_channel_scales())
    scale = model(x).abs().max().item()
    assert (outputs['unfolded'][0] - outputs['folded'][0]).abs().max() < 1e-6 * scale
    assert (outputs['unfolded'][0] - model(x)).abs().max() < 0.05 * scale  # a few int8 steps


@pytest.mark.parametrize('fuse_first', [False, True])
def test_eager_mode_quantisation_aware_training_trains_the_fold(fuse_first):
    """prepare_qat swaps each DOConv2d for torch's QAT conv made from its fold (W' trains
    directly), also after fuse_modules_qat (conv-BN-ReLU), so QAT and the int8 model are those
    of the folded model, bit for bit; the stock entries for nn.Conv2d are untouched."""
    from torch.ao.nn import qat
    from torch.ao.quantization import (convert, fuse_modules_qat, get_default_qat_module_mappings,
                                       get_default_qat_qconfig, prepare_qat)
    assert get_default_qat_module_mappings()[nn.Conv2d] is qat.Conv2d
    model, x = eager_quantisable_model_and_input()
    results = {}
    for name, float_model in (('unfolded', model), ('folded', fold_doconv(model))):
        float_model.train()
        if fuse_first:
            float_model = fuse_modules_qat(float_model, [['module.0', 'module.1', 'module.2']])
        float_model.qconfig = get_default_qat_qconfig('x86')
        prepared = prepare_qat(float_model)
        assert len([m for m in prepared.modules() if hasattr(m, 'weight_fake_quant')]) == 3
        assert not any(isinstance(m, DOConv2d) for m in prepared.modules())
        optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
        losses = []
        for _ in range(3):
            loss = prepared(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        quantised = convert(prepared.eval())
        results[name] = losses, quantised(x)
    assert results['unfolded'][0] == results['folded'][0]
    assert results['unfolded'][0][-1] < results['unfolded'][0][0]
    torch.testing.assert_close(results['unfolded'][1], results['folded'][1], atol=0, rtol=0)


@pytest.mark.parametrize('cin,cout,groups', GROUPINGS)
@pytest.mark.parametrize('d_extra', [0, 3])
def test_training_function_with_batched_composer(monkeypatch, cin, cout, groups, d_extra):
    """The layer's training path as CUDA runs it (launch-light composer), here on CPU tensors:
    forward and all gradients against autograd of the formula, float64, also channels_last."""
    layer = randomise(DOConv2d(cin, cout, 3, 1, 1, groups=groups, dtype=torch.float64,
                               D_mul=9 + d_extra))
    use_batched_function(monkeypatch, layer)
    for x in (torch.randn(2, cin, 6, 7, dtype=torch.float64),
              torch.randn(2, cin, 6, 7, dtype=torch.float64).to(
                  memory_format=torch.channels_last)):
        loss = layer(x).square().sum()
        got = torch.autograd.grad(loss, list(layer.parameters()))
        expected = formula_gradients(layer, [x], lambda ys: ys[0].square().sum())
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=ATOL64, rtol=0)
