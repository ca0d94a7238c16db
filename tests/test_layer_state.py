"""DOConv2d keeps module state as nn.Conv2d does: parametrised weights, weight re-assignment by
BN fusers, hooks and flags across fold / conversion, partial state dicts (torch + mmcv, CPU)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from torch.nn.utils.parametrizations import spectral_norm

from do_conv_mm import DOConv2d, compose_kernel, convert_to_doconv
from do_conv_mm import fold_doconv
from do_conv_mm.config_check import DOConvNotApplicableError

# float32 layers compared with the same arithmetic in another order: |y| ~ 1-10, so 1e-5 is a
# few hundred ulps of margin; float64 comparisons use 1e-10 (the layer tests' bound).
ATOL32 = 1e-5
ATOL64 = 1e-10


def trained_layer(D_mul=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = DOConv2d(4, 6, 3, padding=1, D_mul=D_mul, dtype=dtype)
    with torch.no_grad():
        layer.D.normal_(0, 0.3)  # a trained D: W' differs from weight
    return layer


def pruned_layer(zero_extra_too=False):
    """Output channel 0 pruned on weight only; with D_mul > kh*kw its extra columns (and so W'
    there) stay alive, as README's pruning section describes."""
    layer = trained_layer(D_mul=12)
    with torch.no_grad():
        layer.weight[0].zero_()
        if zero_extra_too:
            layer.weight_extra[0].zero_()
    return layer


def random_bn(channels=6):
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    return bn


class CountingIdentity(nn.Module):
    """A parametrisation that counts its evaluations and returns a fresh tensor (as real ones)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, weight):
        self.calls += 1
        return weight * 1.0


# ----------------------------------------------------------------------------------------------
# torch.nn.utils.parametrize on weight
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('D_mul', [None, 12])
@pytest.mark.parametrize('grad', [True, False])
def test_parametrised_weight_is_evaluated_once_per_forward(D_mul, grad):
    counter = CountingIdentity()
    layer = trained_layer(D_mul)
    parametrize.register_parametrization(layer, 'weight', counter)
    counter.calls = 0
    with torch.set_grad_enabled(grad):
        layer(torch.randn(2, 4, 7, 7))
    assert counter.calls == 1  # nn.Conv2d's count


@pytest.mark.parametrize('D_mul', [None, 12])
def test_spectral_norm_trains_as_on_the_plain_conv_while_D_is_zero(D_mul):
    """A stateful parametrisation (power iteration) advances once per forward, as on nn.Conv2d:
    with D = 0 both compute the same, step after step (outputs, u and gradients bit-equal)."""
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, 3, padding=1)
    layer = DOConv2d(4, 6, 3, padding=1, D_mul=D_mul)
    layer.load_state_dict(plain.state_dict())
    for module in (plain, layer):
        torch.manual_seed(1)
        spectral_norm(module)
    x = torch.randn(2, 4, 7, 7)
    for _ in range(3):
        y_plain, y_layer = plain(x), layer(x)
        torch.testing.assert_close(y_layer, y_plain, rtol=0, atol=ATOL32)
        torch.testing.assert_close(layer.parametrizations.weight[0]._u,
                                   plain.parametrizations.weight[0]._u, rtol=0, atol=0)
        y_plain.square().sum().backward()
        y_layer.square().sum().backward()
        torch.testing.assert_close(layer.parametrizations.weight.original.grad,
                                   plain.parametrizations.weight.original.grad,
                                   rtol=1e-5, atol=ATOL32)


@pytest.mark.parametrize('D_mul', [None, 12])
def test_parametrised_weight_composes_with_D_and_weight_extra_unscaled(D_mul):
    """W' = compose(parametrised weight, D, weight_extra) from the one evaluation; gradients to
    the original weight, D and weight_extra equal the expression's (float64)."""
    layer = trained_layer(D_mul, dtype=torch.float64)
    parametrize.register_parametrization(layer, 'weight', CountingIdentity())
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(1.5)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    y = layer(x)
    params = [layer.parametrizations.weight.original, layer.D] + (
        [layer.weight_extra] if layer.weight_extra is not None else [])
    grads = torch.autograd.grad(y.square().sum(), params)
    weight = layer.parametrizations.weight.original * 1.0
    reference = F.conv2d(x, compose_kernel(weight, layer.D, layer.weight_extra), layer.bias,
                         padding=1)
    torch.testing.assert_close(y, reference, rtol=0, atol=ATOL64)
    for got, want in zip(grads, torch.autograd.grad(reference.square().sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=ATOL64)


# ----------------------------------------------------------------------------------------------
# A new weight assigned by a BN fuser, on a pruned layer with D_mul > kh*kw
# ----------------------------------------------------------------------------------------------
def test_reassigning_the_same_values_keeps_a_pruned_layers_output():
    layer = pruned_layer()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        before = layer(x)
    extra = layer.weight_extra.detach().clone()
    layer.weight = nn.Parameter(layer.weight.detach().clone())
    with torch.no_grad():
        assert torch.equal(layer(x), before)
    assert torch.equal(layer.weight_extra, extra)  # row 0 not zeroed by an undetermined 0/0


def test_a_substitute_weight_of_the_same_values_keeps_a_pruned_layers_output():
    """``_conv_forward(x, w, b)`` with ``w`` a copy of weight (a rescale by 1, as an
    efficient_conv_bn_eval whose BN scale is 1 passes) on a layer pruned on weight alone: the
    extra columns need no rescale, so nothing is refused and the output is the layer's."""
    layer = pruned_layer()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        expected = layer(x)
        got = layer._conv_forward(x, layer.weight.clone(), layer.bias)
    torch.testing.assert_close(got, expected, atol=ATOL32, rtol=0)


def test_bn_fusers_refuse_a_pruned_layer_they_cannot_rescale_and_change_nothing():
    from mmcv.cnn import fuse_conv_bn
    layer, bn = pruned_layer().eval(), random_bn()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        before = layer(x)
    with pytest.raises(ValueError, match=r'channel\(s\) \[0\].*Fold first'):
        torch.nn.utils.fusion.fuse_conv_bn_eval(layer, bn)
    model = nn.Sequential(layer, bn).eval()
    with pytest.raises(ValueError, match=r'channel\(s\) \[0\].*Fold first'):
        fuse_conv_bn(model)
    assert model[0] is layer and isinstance(model[1], nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(layer(x), before)


def test_efficient_conv_bn_eval_refuses_a_pruned_layer_it_cannot_rescale():
    import do_conv_mm  # noqa: F401  (registers 'DOConv')
    from mmcv.cnn import ConvModule
    module = ConvModule(4, 6, 3, padding=1, conv_cfg=dict(type='DOConv', D_mul=12),
                        norm_cfg=dict(type='BN'), act_cfg=None, bias=True)
    module.conv.load_state_dict(pruned_layer().state_dict())
    module.bn.load_state_dict(random_bn().state_dict())
    module.eval().turn_on_efficient_conv_bn_eval(True)
    with pytest.raises(ValueError, match=r'channel\(s\) \[0\]'):
        module(torch.randn(2, 4, 7, 7))


def test_bn_fuser_is_exact_on_a_layer_pruned_on_weight_and_extra():
    """README's pruning recipe (weight_extra masked too): the fuser's rescale is determined."""
    layer, bn = pruned_layer(zero_extra_too=True).eval(), random_bn()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        reference = bn(layer(x))
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(layer, bn)
        torch.testing.assert_close(fused(x), reference, rtol=1e-5, atol=ATOL32)


# ----------------------------------------------------------------------------------------------
# Hooks and flags across fold and conversion
# ----------------------------------------------------------------------------------------------
def hooked(conv, calls):
    conv.register_forward_pre_hook(lambda module, args: calls.append('pre'))
    conv.register_forward_hook(lambda module, args, out: calls.append('post'))
    conv.register_full_backward_hook(lambda module, grad_in, grad_out: calls.append('backward'))
    return conv


def test_fold_keeps_hooks_and_requires_grad_flags():
    calls = []
    layer = hooked(trained_layer(), calls)
    layer.bias.requires_grad_(False)
    folded = fold_doconv(nn.Sequential(layer))[0]
    assert type(folded) is nn.Conv2d
    assert folded.weight.requires_grad and not folded.bias.requires_grad
    folded(torch.randn(2, 4, 7, 7, requires_grad=True)).sum().backward()
    assert calls == ['pre', 'post', 'backward']


def test_fold_and_convert_keep_hooks_registered_with_kwargs():
    """Forward hooks registered with_kwargs=True (whose flags torch keeps in their own tables)
    still receive the call's kwargs after fold and conversion."""
    def register(conv, calls):
        conv.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs) or None,
                                       with_kwargs=True)
        conv.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs),
                                   with_kwargs=True)

    x = torch.randn(1, 4, 7, 7)
    calls = []
    layer = trained_layer()
    register(layer, calls)
    fold_doconv(nn.Sequential(layer))[0](input=x)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    register(model[0], calls)
    convert_to_doconv(model)
    model[0](input=x)
    assert len(calls) == 4 and all(set(kwargs) == {'input'} for kwargs in calls)


def test_convert_to_doconv_keeps_the_training_flag_and_takes_d_mul_equal_to_the_taps():
    """An mmcv Conv2d wrapper (viewed as the nn.Conv2d it is) and a plain conv in a model put in
    eval become eval DOConv2d layers; D_mul = kh*kw, the smallest allowed, is taken."""
    from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
    model = nn.Sequential(MMCVConv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)).eval()
    assert convert_to_doconv(model, D_mul=9) == ['0', '1']
    assert all(type(m) is DOConv2d and not m.training and m.D_mul == 9 for m in model)


def test_convert_to_doconv_keeps_hooks():
    calls = []
    model = nn.Sequential(hooked(nn.Conv2d(4, 6, 3, padding=1), calls))
    assert convert_to_doconv(model) == ['0']
    assert isinstance(model[0], DOConv2d)
    model(torch.randn(2, 4, 7, 7, requires_grad=True)).sum().backward()
    assert calls == ['pre', 'post', 'backward']


def test_fuse_modules_runs_the_conv_hooks_as_on_a_plain_conv():
    """torch.ao.quantization.fuse_modules (DOConv2d entries from do_conv_mm.model_tools) runs the
    conv's hooks as it does for nn.Conv2d (torch's own counts: conv + BN deep-copies the conv
    and re-registers its pre-hooks, so they run twice there), for conv + ReLU and conv + BN."""
    import do_conv_mm.model_tools  # noqa: F401
    from torch.ao.quantization import fuse_modules
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    fired = {}
    for conv_class in (nn.Conv2d, DOConv2d):
        for second in ('relu', 'bn'):
            calls = []
            model = nn.Sequential(hooked(conv_class(4, 6, 3, padding=1), calls),
                                  nn.ReLU() if second == 'relu' else random_bn()).eval()
            fuse_modules(model, [['0', '1']])(x).sum().backward()
            fired[conv_class, second] = calls
    assert fired[DOConv2d, 'relu'] == fired[nn.Conv2d, 'relu'] == ['pre', 'post', 'backward']
    assert fired[DOConv2d, 'bn'] == fired[nn.Conv2d, 'bn']
    assert 'post' in fired[DOConv2d, 'bn'] and 'backward' in fired[DOConv2d, 'bn']


def test_fold_refuses_a_pre_hook_reparametrisation_and_changes_nothing():
    model = nn.Sequential(trained_layer(), nn.ReLU())
    prune.l1_unstructured(model[0], 'weight', amount=0.3)
    with pytest.raises(ValueError, match=r"cannot fold '0'.*prune\.remove\(module, 'weight'\)"):
        fold_doconv(model, inplace=True)
    assert isinstance(model[0], DOConv2d)
    prune.remove(model[0], 'weight')
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(fold_doconv(model)(x), model(x), rtol=1e-5, atol=ATOL32)


@pytest.mark.parametrize('reparametrise, fix', [
    (lambda conv: torch.nn.utils.spectral_norm(conv), 'remove_spectral_norm'),
    (lambda conv: torch.nn.utils.weight_norm(conv), 'remove_weight_norm'),
    (lambda conv: spectral_norm(conv), 'remove_parametrizations'),
])
def test_conversion_names_a_reparametrised_conv_and_its_fix(reparametrise, fix):
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    reparametrise(model[0])
    with pytest.raises(DOConvNotApplicableError, match=fix):
        convert_to_doconv(model, include=['0'])
    assert not isinstance(model[0], DOConv2d)


# ----------------------------------------------------------------------------------------------
# Partial state dicts
# ----------------------------------------------------------------------------------------------
def test_state_dict_without_D_keeps_the_weight_extra_it_gives():
    """weight + weight_extra without D (e.g. "keep W, reset D"): D = 0, weight_extra loaded."""
    source = trained_layer(D_mul=12, seed=1)
    state = {k: v for k, v in source.state_dict().items() if k != 'D'}
    layer = trained_layer(D_mul=12, seed=2)
    layer.load_state_dict(state, strict=True)
    assert torch.equal(layer.weight_extra, source.weight_extra)
    assert torch.equal(layer.weight, source.weight)
    assert not layer.D.any()


def test_plain_state_dict_still_draws_fresh_extra_columns():
    plain = nn.Conv2d(4, 6, 3, padding=1)
    layer = trained_layer(D_mul=12)
    layer.load_state_dict(plain.state_dict(), strict=True)
    bound = 1 / (4 * 9) ** 0.5
    assert not layer.D.any() and layer.weight_extra.abs().max() <= bound
    assert layer.weight_extra.abs().max() > 0
    copy.deepcopy(layer)  # still an ordinary module


@pytest.mark.parametrize('D_mul', [None, 12])
def test_plain_state_dict_keeps_the_parameters_an_optimizer_holds(D_mul):
    """mmengine loads ``load_from`` after it has built the optimizer: a plain checkpoint's load
    resets D (and draws fresh extra columns) in the Parameter objects the optimizer holds, so
    the next step still trains them."""
    layer = trained_layer(D_mul=D_mul)
    D, extra = layer.D, layer.weight_extra
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.load_state_dict(nn.Conv2d(4, 6, 3, padding=1).state_dict())
    assert layer.D is D and layer.weight_extra is extra and not D.any()
    layer(torch.randn(2, 4, 7, 7)).square().sum().backward()
    opt.step()
    assert layer.D.abs().sum() > 0


@pytest.mark.parametrize('groups', [1, 2])
def test_extra_columns_are_drawn_like_weight(groups):
    """weight_extra, made by the constructor, by reset_parameters() and by a plain state dict's
    load, is drawn from U(-b, b) with Conv2d's default b = 1/sqrt(Cg·kh·kw), as weight's own
    columns: every value within b, and the largest of its 6·Cg·3 = 72+ values above b/2
    (fails with probability 2^-72 for the right b; a b computed from all of weight's values
    would be sqrt(6) times smaller and put every value below b/2)."""
    torch.manual_seed(0)
    layer = DOConv2d(8, 6, 3, padding=1, groups=groups, D_mul=12)
    bound = 1 / (8 // groups * 9) ** 0.5

    def check():
        values = layer.weight_extra.detach().abs()
        assert values.max() <= bound and values.max() > bound / 2
        assert not layer.D.any()

    check()
    with torch.no_grad():
        layer.weight_extra.zero_()
        layer.D.normal_()
    layer.reset_parameters()
    check()
    with torch.no_grad():
        layer.weight_extra.zero_()
        layer.D.normal_()
    layer.load_state_dict(nn.Conv2d(8, 6, 3, padding=1, groups=groups).state_dict())
    check()


# ----------------------------------------------------------------------------------------------
# Freezing through weight alone
# ----------------------------------------------------------------------------------------------
def test_a_layer_frozen_through_weight_alone_warns_once_that_D_trains(monkeypatch):
    """Code that freezes conv.weight / conv.bias only (mmpretrain MoCoV3ViT(stop_grad_conv1=True))
    leaves D training: said once per process; a wholly frozen or trained layer says nothing."""
    import warnings
    from do_conv_mm import doconv
    monkeypatch.setattr(doconv, '_warned_d_trains_alone', False)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trained_layer()(x)
        trained_layer().requires_grad_(False)(x)
        partly = trained_layer()
        partly.weight.requires_grad_(False)
        partly.bias.requires_grad_(False)
        partly(x)
        partly(x)
    messages = [str(w.message) for w in caught if 'D still trains' in str(w.message)]
    assert len(messages) == 1 and 'requires_grad_(False)' in messages[0]


def test_a_parametrised_layer_traces_with_jit_trace():
    """torch refuses to trace inside parametrize.cached(): tracing evaluates the parametrisation
    as nn.Conv2d's forward does, and the trace follows later parameter updates."""
    layer = trained_layer(D_mul=12)
    parametrize.register_parametrization(layer, 'weight', CountingIdentity())
    x = torch.randn(2, 4, 7, 7)
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=ATOL32)
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(2)
    torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=ATOL32)
