"""The GPU training path of groups == 1 and depthwise layers (autograd ops, W' recomposed in
backward, :mod:`do_conv_mm.recomposed_conv`), run here on CPU tensors: taken exactly where it
applies, exact, no kernel kept, few kernels, autocast inside, out of others' saved-tensor hooks."""
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from do_conv_mm import DOConv2d, compose_kernel, composed_conv, recomposed_conv
from do_conv_mm.compose_batched import BATCHED_COMPOSER
from test_doconv_layer import (ATOL64, assert_penalty_gradients_match_expression,
                               formula_gradients, kernels_of_a_training_step, randomise,
                               use_batched_function)

# Older torch (2.1) cannot say whether saved-tensor hooks are active: the Function runs there.
needs_query = pytest.mark.skipif(
    recomposed_conv._top_saved_tensors_hooks is None,
    reason='this torch has no query for active saved-tensor hooks, so layers train through '
           'the Function (test_doconv_layer.py); test_torch_without_the_query covers it')

def _cpu_half_matmul() -> bool:
    try:
        torch.ones(1, 1, 1, dtype=torch.float16).bmm(torch.ones(1, 1, 1, dtype=torch.float16))
    except RuntimeError:  # torch 2.1
        return False
    return True


needs_half = pytest.mark.skipif(not _cpu_half_matmul(),
                                reason='this torch has no float16 matmul on the CPU')

# (in, out, groups): plain and depthwise (with multiplier 2) take this path; grouped convs with
# several channels per group do not.
CHANNEL_MAJOR = [(4, 6, 1), (4, 4, 4), (4, 8, 4)]
GROUPED = [(4, 6, 2), (68, 4, 2)]


def on_gpu_path(monkeypatch, layer: DOConv2d, keep_small: bool = False) -> DOConv2d:
    """``layer`` training as it would on a GPU (the launch-light composer's device); unless
    ``keep_small``, its W' is recomposed in backward however small (the tests' kernels are
    tiny: kept by default)."""
    monkeypatch.setattr(layer, '_training_composer', lambda: BATCHED_COMPOSER)
    if not keep_small:
        monkeypatch.setattr(recomposed_conv, 'KEEP_MAX_BYTES', -1)
    return layer


# Every training path: the CPU's (the Function, blocked composer) and a GPU's (the Function with
# the launch-light composer; the autograd ops, W' recomposed in backward).
EVERY_PATH = ['cpu', 'function', pytest.param('recomposed', marks=needs_query)]


def on_path(monkeypatch, layer: DOConv2d, path: str) -> DOConv2d:
    """``layer`` training through ``path`` (one of EVERY_PATH)."""
    if path == 'function':
        use_batched_function(monkeypatch, layer)
    elif path == 'recomposed':
        on_gpu_path(monkeypatch, layer)
    return layer


def record_paths(monkeypatch) -> list:
    """A list that gets 'recomposed' or 'function' for every training conv that runs."""
    taken = []
    recomposed = recomposed_conv.recomposed_conv2d
    monkeypatch.setattr('do_conv_mm.doconv.recomposed_conv2d',
                        lambda *a: taken.append('recomposed') or recomposed(*a))
    apply = composed_conv._ComposedConv2d.apply
    monkeypatch.setattr(composed_conv._ComposedConv2d, 'apply',
                        lambda *a: taken.append('function') or apply(*a))
    return taken


@needs_query
@pytest.mark.parametrize('cin,cout,groups', CHANNEL_MAJOR + GROUPED)
@pytest.mark.parametrize('d_mul', [9, 12])
def test_taken_exactly_where_it_applies(monkeypatch, cin, cout, groups, d_mul):
    """Channel-major layouts at D_mul = kh·kw take it; grouped layouts, D_mul > kh·kw and
    training under others' saved-tensor hooks (save_on_cpu, non-reentrant checkpointing) take
    the Function; every one of them computes the formula (float64)."""
    layer = on_gpu_path(monkeypatch, randomise(DOConv2d(cin, cout, 3, padding=1, groups=groups,
                                                        dtype=torch.float64, D_mul=d_mul)))
    taken = record_paths(monkeypatch)
    x = torch.randn(2, cin, 5, 5, dtype=torch.float64)
    expected = formula_gradients(layer, [x], lambda ys: ys[0].square().sum())
    applies = (groups == 1 or cin == groups) and d_mul == 9
    runs = {
        'plain': lambda: layer(x),
        'save_on_cpu': lambda: _under(torch.autograd.graph.save_on_cpu(), layer, x),
        'checkpoint': lambda: checkpoint(layer, x, use_reentrant=False),
    }
    for name, run in runs.items():
        taken.clear()
        got = torch.autograd.grad(run().square().sum(), list(layer.parameters()))
        if applies and name == 'plain':
            assert taken == ['recomposed']
        else:  # checkpointing runs the layer again in backward, under its hooks again
            assert taken == ['function'] * (2 if name == 'checkpoint' else 1), name
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=ATOL64, rtol=0)


def _under(context, layer, x):
    with context:
        return layer(x)


@needs_query
@pytest.mark.parametrize('cin,cout,groups', CHANNEL_MAJOR)
@pytest.mark.parametrize('case', ['contiguous', 'channels_last input', 'channels_last model',
                                  'unbatched', 'strided, dilated, reflect-padded'])
@pytest.mark.parametrize('keep', [False, True], ids=['recomposed', 'kept'])
def test_matches_formula(monkeypatch, cin, cout, groups, case, keep):
    """Output and the gradients of input, weight, D and bias equal autograd of the formula
    (float64; see ATOL64), for the memory layouts and conv arguments a model may bring, W'
    recomposed in backward or (small kernels) kept."""
    kwargs = dict(stride=2, dilation=2, padding=2, padding_mode='reflect') \
        if case.startswith('strided') else dict(padding=1)
    layer = on_gpu_path(monkeypatch, randomise(DOConv2d(cin, cout, 3, groups=groups,
                                                        dtype=torch.float64, **kwargs)), keep)
    x = torch.randn(2, cin, 7, 6, dtype=torch.float64)
    if case == 'channels_last input':
        x = x.to(memory_format=torch.channels_last)
    if case == 'channels_last model':
        layer.to(memory_format=torch.channels_last)
    if case == 'unbatched':
        x = x[0]
    x.requires_grad_()
    taken = record_paths(monkeypatch)
    y = layer(x)
    assert taken == ['recomposed']
    got = torch.autograd.grad(y.square().sum(), [x] + list(layer.parameters()))

    kernel = compose_kernel(layer.weight, layer.D, None, groups)
    padded = F.pad(x, [2] * 4, mode='reflect') if 'reflect' in case else x
    ref = F.conv2d(padded, kernel, layer.bias, layer.stride,
                   0 if 'reflect' in case else layer.padding, layer.dilation, groups)
    expected = torch.autograd.grad(ref.square().sum(), [x] + list(layer.parameters()))
    torch.testing.assert_close(y, ref, atol=ATOL64, rtol=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=0)


# kernel, dilation, padding, padding_mode: 'same' with an even total padding dilation·(k - 1)
# (symmetric), odd in both or one dimension (one more at the bottom / right), 'valid', and
# 'same' under a non-'zeros' padding mode.
STRING_PADDINGS = [((3, 3), 1, 'same', 'zeros'), ((2, 4), 1, 'same', 'zeros'),
                   ((4, 3), (1, 2), 'same', 'zeros'), ((3, 2), 2, 'same', 'zeros'),
                   ((3, 3), 1, 'valid', 'zeros'), ((3, 4), 1, 'same', 'reflect')]


@pytest.mark.parametrize('path', EVERY_PATH)
@pytest.mark.parametrize('kernel,dilation,padding,padding_mode', STRING_PADDINGS)
def test_string_padding_trains_on_the_training_paths(monkeypatch, path, kernel, dilation,
                                                     padding, padding_mode):
    """padding='same' / 'valid' layers train through the training paths (not the expression),
    padded exactly as nn.Conv2d pads them: output and every gradient equal nn.Conv2d's own
    forward on the composed kernel (float64)."""
    layer = randomise(DOConv2d(4, 6, kernel, padding=padding, dilation=dilation,
                               padding_mode=padding_mode, dtype=torch.float64))
    on_path(monkeypatch, layer, path)
    taken = record_paths(monkeypatch)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert taken == ['recomposed' if path == 'recomposed' else 'function']
    got = torch.autograd.grad(y.square().sum(), [x] + list(layer.parameters()))

    composed = compose_kernel(layer.weight, layer.D, None, 1)
    ref = torch.nn.Conv2d._conv_forward(layer, x, composed, layer.bias)  # torch pads
    expected = torch.autograd.grad(ref.square().sum(), [x] + list(layer.parameters()))
    assert y.shape == ref.shape == (2, 6) + ((7, 8) if padding == 'same' else (5, 6))
    torch.testing.assert_close(y, ref, atol=ATOL64, rtol=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL64, rtol=0)


# Older torch (2.1) cannot tell the Function's backward that its gradients are batched.
needs_batched_query = pytest.mark.skipif(
    composed_conv._is_batched is composed_conv._no_batched_query,
    reason='this torch cannot tell a batched gradient (is_grads_batched) in a backward')


@pytest.mark.parametrize('path', [pytest.param('cpu', marks=needs_batched_query),
                                  pytest.param('function', marks=needs_batched_query),
                                  pytest.param('recomposed', marks=needs_query)])
@pytest.mark.parametrize('cin,cout,groups,d_mul', [(4, 6, 1, 9), (4, 8, 4, 9), (4, 6, 2, 9),
                                                   (4, 6, 1, 12)])
def test_batched_gradients(monkeypatch, path, cin, cout, groups, d_mul):
    """``autograd.grad(..., is_grads_batched=True)`` (what vectorised jacobians and hessians
    run) equals one backward per vector (float64). The Function's backward took vmap into its
    composers' ``out=`` writes and failed; nn.Conv2d passes."""
    layer = on_path(monkeypatch, randomise(DOConv2d(cin, cout, 3, padding=1, groups=groups,
                                                    dtype=torch.float64, D_mul=d_mul)), path)
    x = torch.randn(2, cin, 5, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    vectors = torch.randn((3,) + y.shape, dtype=torch.float64)
    wrt = [x] + list(layer.parameters())
    batched = torch.autograd.grad(y, wrt, vectors, retain_graph=True, is_grads_batched=True)
    for i, vector in enumerate(vectors):
        one = torch.autograd.grad(y, wrt, vector, retain_graph=True)
        for b, o in zip(batched, one):
            torch.testing.assert_close(b[i], o, atol=ATOL64, rtol=0)


@pytest.mark.parametrize('path', EVERY_PATH)
@pytest.mark.parametrize('cin,cout,groups,d_mul', [(4, 6, 1, 9), (4, 6, 2, 12)])
def test_bias_edited_before_backward(monkeypatch, path, cin, cout, groups, d_mul):
    """No gradient depends on the bias value, and nn.Conv2d lets it change in place between
    forward and backward (an optimizer step between two backwards): so does every path, with
    the gradients of the forward that ran (the Function saved the bias and refused)."""
    layer = on_path(monkeypatch, randomise(DOConv2d(cin, cout, 3, padding=1, groups=groups,
                                                    dtype=torch.float64, D_mul=d_mul)), path)
    x = torch.randn(2, cin, 5, 5, dtype=torch.float64, requires_grad=True)
    wrt = [x] + list(layer.parameters())
    loss = layer(x).square().sum()
    expected = torch.autograd.grad(loss, wrt, retain_graph=True)
    with torch.no_grad():
        layer.bias.add_(1)
    for g, e in zip(torch.autograd.grad(loss, wrt), expected):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


@pytest.mark.parametrize('path', ['cpu', 'function'])
@pytest.mark.parametrize('cin,cout,groups', [(4, 6, 1), (4, 6, 2), (68, 4, 2)])
@pytest.mark.parametrize('dtype', [torch.float32, pytest.param(torch.float16, marks=needs_half)],
                         ids=['fp32', 'fp16'])
def test_function_backward_inside_autocast(monkeypatch, path, cin, cout, groups, dtype):
    """The Function's backward called inside an autocast region composes in the parameters'
    precision all the same: gradients bit-identical to a backward outside it (the conv's
    backward is no autocast op). Before, the composition's matmuls ran in bf16 there, and an
    fp16 layer with D_mul > kh·kw failed on its dtypes."""
    layer = on_path(monkeypatch, randomise(DOConv2d(cin, cout, 3, padding=1, groups=groups,
                                                    D_mul=12)).to(dtype), path)
    x = torch.randn(2, cin, 6, 6, dtype=dtype)
    params = list(layer.parameters())
    taken = record_paths(monkeypatch)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = layer(x).float().square().sum()
        inside = torch.autograd.grad(loss, params, retain_graph=True)
    outside = torch.autograd.grad(loss, params)
    assert taken == ['function']
    for i, o in zip(inside, outside):
        assert i.dtype == dtype
        torch.testing.assert_close(i, o, atol=0, rtol=0)


def record_composed_kernels(monkeypatch) -> list:
    """A list that gets a weakref to every W' the autograd path composes (forward, backward)."""
    kernels = []
    compose = recomposed_conv.compose_channel_major

    def recording(*args):
        kernel = compose(*args)
        kernels.append(weakref.ref(kernel))
        return kernel

    monkeypatch.setattr(recomposed_conv, 'compose_channel_major', recording)
    return kernels


@needs_query
def test_keeps_no_kernel_between_forward_and_backward(monkeypatch):
    """The conv keeps a marker, not W': the forward's W' is freed when forward returns, the
    backward's when the conv's backward is done; memory is that of a plain conv."""
    layer = on_gpu_path(monkeypatch, randomise(DOConv2d(8, 8, 3, padding=1)))
    kernels = record_composed_kernels(monkeypatch)
    y = layer(torch.randn(2, 8, 6, 6))
    assert len(kernels) == 1 and kernels[0]() is None
    y.sum().backward()
    assert len(kernels) == 2 and kernels[1]() is None
    assert layer.D.grad is not None and layer.weight.grad is not None


@needs_query
def test_small_kernels_are_kept_instead(monkeypatch):
    """W' of at most KEEP_MAX_BYTES is saved by the conv (no hooks, nothing recomposed:
    backward is the bmm's two gradients and the sum of dL/dweight's shares) and freed by its
    backward; one byte more and it is recomposed."""
    layer = on_gpu_path(monkeypatch, randomise(DOConv2d(8, 8, 3, padding=1)), keep_small=True)
    kernel_bytes = 8 * 8 * 9 * 4
    kernels = record_composed_kernels(monkeypatch)
    for limit, recomposed in ((kernel_bytes, False), (kernel_bytes - 1, True)):
        monkeypatch.setattr(recomposed_conv, 'KEEP_MAX_BYTES', limit)
        kernels.clear()
        y = layer(torch.randn(2, 8, 6, 6))
        assert (kernels[0]() is None) == recomposed
        y.sum().backward()
        assert len(kernels) == (2 if recomposed else 1) and kernels[-1]() is None
    monkeypatch.setattr(recomposed_conv, 'KEEP_MAX_BYTES', kernel_bytes)
    forward, backward = kernels_of_a_training_step(layer, 8)
    assert sorted(forward.kernels) == ['add', 'bmm']
    assert sorted(backward.kernels) == ['add', 'bmm', 'bmm']


@needs_query
@pytest.mark.parametrize('cin,cout,groups', CHANNEL_MAJOR)
def test_kernel_counts(monkeypatch, cin, cout, groups):
    """Kernels per layer and training step beyond the conv, counted at ATen's dispatcher on CPU
    tensors (the calls a GPU launches): forward a bmm and an add; backward the same two to
    recompose W', the bmm's two gradient matmuls and one add of dL/dweight's two shares."""
    layer = on_gpu_path(monkeypatch, randomise(DOConv2d(cin, cout, 3, padding=1, groups=groups)))
    forward, backward = kernels_of_a_training_step(layer, cin)
    assert sorted(forward.kernels) == ['add', 'bmm']
    assert sorted(backward.kernels) == ['add', 'add', 'bmm', 'bmm', 'bmm']


@needs_query
@pytest.mark.parametrize('cin,cout,groups', CHANNEL_MAJOR)
def test_autocast_inside(monkeypatch, cin, cout, groups):
    """Under autocast W' is composed in fp32 and cast once, the conv runs in bf16 and the
    parameter gradients come back in fp32. Reference: the same bf16 conv of the fp32-composed
    kernel (bf16 keeps 8 mantissa bits: 2e-2)."""
    layer = on_gpu_path(monkeypatch, randomise(DOConv2d(cin, cout, 3, padding=1,
                                                        groups=groups)))
    taken = record_paths(monkeypatch)
    x = torch.randn(2, cin, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x)
    assert taken == ['recomposed'] and y.dtype == torch.bfloat16
    (y.float() ** 2).sum().backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(g.dtype == torch.float32 for g in grads)
    kernel = layer.composed_weight()
    ref = F.conv2d(x.bfloat16(), kernel.bfloat16(), layer.bias.bfloat16(), 1, 1, 1, groups)
    expected = torch.autograd.grad((ref.float() ** 2).sum(), list(layer.parameters()))
    torch.testing.assert_close(y.float(), ref.float(), atol=0, rtol=0)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=2e-2 * e.abs().max().item(), rtol=2e-2)


@needs_query
def test_backward_inside_autocast(monkeypatch):
    """A backward called inside an autocast region (on the CPU it runs under it) recomposes W'
    in the parameters' dtype, so the conv's backward gets the kernel it expects (a bf16 one
    would fail on its dtypes). torch runs the other backward matmuls under that autocast, so the
    reference is the plain expression's backward in the same region: equal to 1e-6 relative
    (fp32 rounding; both differ from a backward outside autocast by ~4e-3)."""
    layer = on_gpu_path(monkeypatch, randomise(DOConv2d(4, 6, 3, padding=1)))
    x = torch.randn(2, 4, 6, 6)
    params = list(layer.parameters())
    taken = record_paths(monkeypatch)
    loss = layer(x).square().sum()
    expression = F.conv2d(x, layer.composed_weight(), layer.bias, 1, 1).square().sum()
    assert taken == ['recomposed']
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = torch.autograd.grad(loss, params)
        expected = torch.autograd.grad(expression, params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6 * e.abs().max().item(), rtol=1e-6)


@needs_query
@pytest.mark.parametrize('keep', [False, True], ids=['recomposed', 'kept'])
def test_double_backward(monkeypatch, keep):
    """create_graph=True: the recomposed W' is differentiable, so second-order gradients
    (gradient penalties) equal those of the plain expression; so does a kept one."""
    layer = on_gpu_path(monkeypatch, randomise(DOConv2d(3, 4, 3, padding=1,
                                                        dtype=torch.float64)), keep)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    taken = record_paths(monkeypatch)
    assert_penalty_gradients_match_expression(layer, x)
    assert taken == ['recomposed']


@needs_query
@pytest.mark.parametrize('edited', ['weight', 'D', 'input', 'D, weight frozen',
                                    'weight, D frozen'])
def test_in_place_edit_before_backward_is_refused(monkeypatch, edited):
    """Editing the conv's input, weight or D in place between forward and backward would make
    backward use other values than the forward's. Autograd checks no tensor saved under hooks,
    so the path checks them itself: refused as for a plain conv, before any gradient is
    accumulated. A partly frozen layer's autograd saves the trainable parameter nowhere: the
    path still refuses (the first version recomposed W' from the edited D, no error)."""
    layer = on_gpu_path(monkeypatch, randomise(DOConv2d(4, 6, 3, padding=1)))
    name, _, frozen = edited.partition(', ')
    if frozen:
        getattr(layer, frozen.split()[0]).requires_grad_(False)
    leaf = torch.randn(2, 4, 5, 5, requires_grad=True)
    x = leaf * 1  # the conv saves this one
    taken = record_paths(monkeypatch)
    loss = layer(x).sum()
    assert taken == ['recomposed']
    with torch.no_grad():
        (x if name == 'input' else getattr(layer, name)).mul_(2)
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        loss.backward()
    assert leaf.grad is None and all(p.grad is None for p in layer.parameters())


@needs_query
@pytest.mark.parametrize('frozen', ['weight', 'D', 'bias'])
def test_partly_frozen_layer(monkeypatch, frozen):
    """A frozen weight, D or bias gets no gradient; the others get the formula's (float64);
    retain_graph and a second backward accumulate exactly twice the gradients."""
    layer = on_gpu_path(monkeypatch, randomise(DOConv2d(4, 6, 3, padding=1,
                                                        dtype=torch.float64)))
    getattr(layer, frozen).requires_grad_(False)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    trained = [p for p in layer.parameters() if p.requires_grad]
    expected = dict(zip(map(id, trained), formula_gradients(
        layer, [x], lambda ys: ys[0].square().sum(), trained)))
    loss = layer(x).square().sum()
    loss.backward(retain_graph=True)
    loss.backward()
    assert getattr(layer, frozen).grad is None
    for p in trained:
        torch.testing.assert_close(p.grad, 2 * expected[id(p)], atol=2 * ATOL64, rtol=0)


def test_environment_chooses_the_function_and_rejects_unknown_values():
    """DO_CONV_MM_GPU_TRAINING=function sends a channel-major layer through the Function; an
    unknown value stops the import with a message naming the accepted ones."""
    probe = ('import torch, do_conv_mm.composed_conv as c; from do_conv_mm import DOConv2d; '
             'from do_conv_mm.compose_batched import BATCHED_COMPOSER as B; '
             'l = DOConv2d(4, 4, 3); l._training_composer = lambda: B; taken = []; '
             'a = c._ComposedConv2d.apply; '
             'c._ComposedConv2d.apply = lambda *x: taken.append(1) or a(*x); '
             'l(torch.randn(1, 4, 5, 5)).sum().backward(); print(len(taken))')
    env = dict(os.environ, DO_CONV_MM_GPU_TRAINING='function')
    out = subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ['1'], out.stderr
    env['DO_CONV_MM_GPU_TRAINING'] = 'fast'
    out = subprocess.run([sys.executable, '-c', 'import do_conv_mm'], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "DO_CONV_MM_GPU_TRAINING='fast'" in out.stderr and '"function"' in out.stderr


def test_torch_without_the_query(monkeypatch):
    """Where torch cannot say whether saved-tensor hooks are active, nothing is recomposed
    through hooks (ours could bypass a checkpoint's): the layer trains through the Function."""
    monkeypatch.setattr(recomposed_conv, '_top_saved_tensors_hooks', None)
    weight = torch.zeros(4, 4, 3, 3)
    assert not recomposed_conv.recomposable(weight, None, 1)
