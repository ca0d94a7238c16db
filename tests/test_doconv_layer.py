"""DOConv2d is exactly the paper's formula and a true drop-in for nn.Conv2d (torch only)."""
import itertools
import pickle
from copy import deepcopy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from do_conv_mm import DOConv2d, compose_kernel, fold_doconv
from do_conv_mm import doconv as doconv_module

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


# (in, out, groups): plain, grouped, depthwise, depthwise with channel multiplier 2
GROUPINGS = [(4, 6, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4)]
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


def test_eval_cache_reused_and_invalidated_by_optimizer_step():
    torch.manual_seed(0)
    layer = randomise(DOConv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        first = layer._kernel()
        assert layer._kernel() is first  # reused while nothing changed
        y0 = layer(x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        y1 = layer(x)
        assert layer._kernel() is not first
        torch.testing.assert_close(y1, reference_forward(layer, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y0, y1)


def test_eval_cache_invalidated_by_load_state_dict_and_to():
    torch.manual_seed(0)
    layer = randomise(DOConv2d(4, 4, 3, padding=1))
    other = randomise(DOConv2d(4, 4, 3, padding=1), seed=1)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x), atol=0, rtol=0)
        layer.double()
        torch.testing.assert_close(layer(x.double()), reference_forward(layer, x.double()),
                                   atol=ATOL64, rtol=0)


def test_cached_kernel_not_used_when_gradients_needed():
    layer = randomise(DOConv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        layer(x)
    layer(x).sum().backward()
    assert layer.D.grad is not None and layer.D.grad.abs().sum() > 0


def test_frozen_layer_uses_cache_in_training():
    layer = randomise(DOConv2d(4, 4, 3, padding=1)).requires_grad_(False)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    layer(x)
    first = layer._cached_kernel
    assert first is not None
    layer(x).sum().backward()
    assert layer._cached_kernel is first and x.grad is not None


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


def test_deepcopy_and_pickle_drop_cache():
    layer = randomise(DOConv2d(4, 4, 3, padding=1))
    with torch.no_grad():
        layer(torch.randn(1, 4, 5, 5))
    for clone in (deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._cached_kernel is None
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


def test_torch_compile_fullgraph():
    layer = randomise(DOConv2d(4, 6, 3, padding=1, groups=2, D_mul=11))
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(layer, backend='eager', fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))


def test_jit_trace_follows_parameters():
    layer = randomise(DOConv2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(1, 4, 6, 6)
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x))
    with torch.no_grad():
        layer.D.mul_(2)
    # the trace composes from the live parameters, so it never serves a stale kernel
    torch.testing.assert_close(traced(x), layer(x))


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
    assert len(saved) == 3  # x, weight, D (no weight_extra, no composed kernel)
    assert any(t is layer.weight for t in saved) and any(t is layer.D for t in saved)
    assert layer._kernel_workspace.buffer is None
    y.sum().backward()
    assert layer._kernel_workspace.buffer is None


def test_training_path_keeps_one_large_kernel_per_layer(monkeypatch):
    """A kernel over the threshold (lowered here to 0 bytes) lives in one per-layer buffer, reused
    by every call and step, replaced on a dtype change and given back on a mode switch."""
    monkeypatch.setattr(doconv_module, '_KEEP_MIN_BYTES', 0)
    layer = randomise(DOConv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 8, 6, 6)
    y = layer(x)
    buffer = layer._kernel_workspace.buffer
    torch.testing.assert_close(buffer, reference_kernel(layer), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    layer(x).sum().backward()
    assert layer._kernel_workspace.buffer is buffer
    layer.double()
    layer(x.double()).sum().backward()
    assert layer._kernel_workspace.buffer.dtype == torch.float64
    assert deepcopy(layer)._kernel_workspace.buffer is None
    layer.eval()
    assert layer._kernel_workspace.buffer is None


def formula_gradients(layer: DOConv2d, inputs, loss_fn):
    """Autograd through the plain composition expression: the reference for the Function."""
    kernel = compose_kernel(layer.weight, layer.D, layer.weight_extra, layer.groups)
    outputs = [F.conv2d(x, kernel, layer.bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups) for x in inputs]
    return torch.autograd.grad(loss_fn(outputs), list(layer.parameters()))


@pytest.mark.parametrize('d_mul', [9, 12])
def test_training_path_blocked_composition_matches_formula(monkeypatch, d_mul):
    """Blocks of a few output channels (the path large kernels take) compose and back-propagate
    exactly what one block does; 100 elements per block splits 24 channels into 12 blocks."""
    monkeypatch.setattr(doconv_module, '_BLOCK_ELEMENTS', 100)
    layer = randomise(DOConv2d(6, 24, 3, padding=1, dtype=torch.float64, D_mul=d_mul))
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    got = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()))
    expected = formula_gradients(layer, [x], lambda ys: ys[0].square().sum())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=0)
    with torch.no_grad():
        composed = doconv_module.compose_kernel_into(torch.empty_like(layer.weight), layer.weight,
                                                     layer.D, layer.weight_extra)
    torch.testing.assert_close(composed, reference_kernel(layer), atol=ATOL64, rtol=0)


@pytest.mark.parametrize('keep_min_bytes', [0, None])
@pytest.mark.parametrize('groups', [1, 2])
def test_training_path_shared_layer_called_twice_before_backward(monkeypatch, groups,
                                                                 keep_min_bytes):
    """A layer applied to several inputs (mmdet's shared heads): with a kept kernel (threshold
    0) each call overwrites the buffer and the earlier calls' backward must notice and
    recompose; with the default threshold every backward recomposes."""
    if keep_min_bytes is not None:
        monkeypatch.setattr(doconv_module, '_KEEP_MIN_BYTES', keep_min_bytes)
    layer = randomise(DOConv2d(4, 6, 3, padding=1, groups=groups, dtype=torch.float64))
    inputs = [torch.randn(1, 4, 5, 5, dtype=torch.float64) for _ in range(3)]

    def loss(outputs):
        return sum((i + 1) * y.square().sum() for i, y in enumerate(outputs))

    got = torch.autograd.grad(loss([layer(x) for x in inputs]), list(layer.parameters()))
    for g, e in zip(got, formula_gradients(layer, inputs, loss)):
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=0)


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
