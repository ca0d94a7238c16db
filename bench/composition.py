"""Where DO-Conv's training overhead goes: kernel composition forward/backward, per layer.

A DO-Conv layer convolves with W' = compose(W, D), a tensor of the plain kernel's shape, so the
convolution itself costs what the plain one costs; the extra work per training step is composing
W' (forward) and back-propagating through the composition (backward), once per layer and step,
independent of batch size and resolution. This module times exactly that, on the DO-Conv layers of
a real model (only those that train: frozen layers compose without autograd, a small cost left out
here), for the package's
``compose_kernel`` and for candidate implementations prototyped here.

Standalone: ``python bench/composition.py --model faster_rcnn`` writes
bench/results/composition.md (per-candidate totals, top layers, exactness check).
"""
from bench_utils import add_common_args, command_line, environment_lines, md_table, median_iqr, \
    setup_run, synchronize, write_markdown  # first: sets OMP_WAIT_POLICY before torch loads

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from do_conv_mm import compose_kernel  # noqa: E402
from do_conv_mm.compose_batched import BATCHED_COMPOSER  # noqa: E402
from do_conv_mm import compose_blocked  # noqa: E402
from do_conv_mm.compose_blocked import KEEP_MIN_BYTES, BlockedComposer  # noqa: E402
from do_conv_mm.composition import full_W  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Candidate compositions (same contract as do_conv_mm.compose_kernel)
# ------------------------------------------------------------------------------------------------
def compose_einsum(weight, D, weight_extra=None, groups=1):
    """Reference: the formula as one einsum (the issue's '1.023x' implementation), groups == 1."""
    if groups != 1:
        raise NotImplementedError('compose_einsum prototype handles groups == 1 only')
    O, C, kh, kw = weight.shape
    W = weight.reshape(O, C, kh * kw)
    if weight_extra is not None:
        W = torch.cat([W, weight_extra], dim=2)
    return weight + torch.einsum('ocs,cms->ocm', W, D).reshape(O, C, kh, kw)


def compose_strided_bmm(weight, D, weight_extra=None, groups=1):
    """Prototype: one bmm over strided views, no explicit permute copies.

    delta (C, O, K) = W.transpose(0, 1) (C, O, S) @ D.transpose(1, 2) (C, S, K); both operands
    are strided views a BLAS can read directly (row stride C*S resp. a transposed matrix), and the
    final ``weight + delta.transpose(0, 1)`` writes the (O, C, K) layout in the same pass as the
    addition. groups == 1 only (every DO-Conv in the R50 models has groups == 1).
    """
    if groups != 1:
        raise NotImplementedError('compose_strided_bmm prototype handles groups == 1 only')
    O, C, kh, kw = weight.shape
    W = weight.reshape(O, C, kh * kw)
    if weight_extra is not None:
        W = torch.cat([W, weight_extra], dim=2)
    delta = torch.bmm(W.transpose(0, 1), D.transpose(1, 2))  # (C, O, K)
    return weight + delta.transpose(0, 1).reshape(O, C, kh, kw)


class _ComposeFunction(torch.autograd.Function):
    """Prototype: composition with a hand-written backward, computed in the (C, K, O) layout.

    ``weight.reshape(O, C·K).t().view(C, K, O)`` is a free strided view whose matrices a BLAS
    reads as transposed operands, so W is never copied into a permuted layout. Forward:
    W't = Wt + D @ Wt as one ``baddbmm`` into a fresh (C, K, O) buffer, then one 2-D transpose
    to (O, C, kh, kw). Backward: one 2-D transpose of the incoming gradient g_t, dD = g_t @ Wt^T
    (``bmm``), dWt = g_t + D^T @ g_t (``baddbmm``), one transpose back. Saves only ``weight`` and
    ``D`` (the parameters themselves: no extra memory). groups == 1 and D_mul == kh*kw only.
    """

    @staticmethod
    def forward(ctx, weight, D):
        O, C, kh, kw = weight.shape
        Wt = weight.reshape(O, C * kh * kw).t().view(C, kh * kw, O)
        out = torch.baddbmm(Wt, D, Wt)  # (C, K, O)
        ctx.save_for_backward(weight, D)
        return out.view(C * kh * kw, O).t().contiguous().view(O, C, kh, kw)

    @staticmethod
    def backward(ctx, grad):
        weight, D = ctx.saved_tensors
        O, C, kh, kw = weight.shape
        K = kh * kw
        Wt = weight.reshape(O, C * K).t().view(C, K, O)
        g = grad.reshape(O, C * K).t().contiguous().view(C, K, O)
        grad_D = torch.bmm(g, Wt.transpose(1, 2))  # (C, K, K)
        grad_Wt = torch.baddbmm(g, D.transpose(1, 2), g)  # (C, K, O)
        return grad_Wt.view(C * K, O).t().contiguous().view(O, C, kh, kw), grad_D


def compose_function(weight, D, weight_extra=None, groups=1):
    """The autograd.Function prototype (groups == 1, D_mul == kh*kw)."""
    if groups != 1 or weight_extra is not None:
        raise NotImplementedError('compose_function prototype: groups == 1, D_mul == kh*kw')
    return _ComposeFunction.apply(weight, D)


class _TrainingPathCompose(torch.autograd.Function):
    """The composition half of DOConv2d's training Function, with the layer's composer
    (do_conv_mm.compose_blocked on CPU, compose_batched elsewhere): W' composed forward; backward
    gets the kernel the conv backward would use and turns dL/dW' into the parameter gradients."""

    @staticmethod
    def forward(ctx, weight, D, weight_extra, groups, composer):
        ctx.save_for_backward(weight, D, weight_extra)
        ctx.groups, ctx.composer = groups, composer
        kernel, ctx.token = composer.compose(weight, D, weight_extra, groups)
        return kernel

    @staticmethod
    def backward(ctx, grad):
        weight, D, weight_extra = ctx.saved_tensors
        ctx.composer.kernel_for_backward(ctx.token, weight, D, weight_extra, ctx.groups)
        return (*ctx.composer.backward(grad, weight, D, weight_extra, ctx.groups, ctx.token,
                                       ctx.needs_input_grad[:3]), None, None)


_COMPOSERS: Dict[tuple, BlockedComposer] = {}


def compose_training_path(weight, D, weight_extra=None, groups=1):
    """What a training step runs (on CPU one composer per kernel shape, as one per layer)."""
    if weight.device.type == 'cpu':
        composer = _COMPOSERS.setdefault((tuple(weight.shape), weight.dtype), BlockedComposer())
    else:
        composer = BATCHED_COMPOSER
    return _TrainingPathCompose.apply(weight, D, weight_extra, groups, composer)


@contextlib.contextmanager
def keep_min_bytes(value: int):
    """Temporarily set compose_blocked.KEEP_MIN_BYTES (the size from which W' is kept)."""
    old, compose_blocked.KEEP_MIN_BYTES = compose_blocked.KEEP_MIN_BYTES, value
    try:
        yield
    finally:
        compose_blocked.KEEP_MIN_BYTES = old


_KEEP_ALL: Dict[tuple, BlockedComposer] = {}


def compose_keep_every_kernel(weight, D, weight_extra=None, groups=1):
    """The CPU training path with every W' kept (KEEP_MIN_BYTES = 0): backward reuses the
    forward's kernel instead of recomposing it, for W'-sized memory per layer."""
    composer = _KEEP_ALL.setdefault((tuple(weight.shape), weight.dtype), BlockedComposer())
    with keep_min_bytes(0):
        return _TrainingPathCompose.apply(weight, D, weight_extra, groups, composer)


def compose_grouped_conv(weight, D, weight_extra=None, groups=1):
    """Prototype: W' as a grouped 1×1 convolution, groups == 1 only. With the O kernels as the
    batch and W's C·S columns as channels, ``conv1d(W (O, C·S, 1), P (C·K, S, 1), groups=C)``
    is (O, C·K): W' in kernel layout with no transposes; autograd's conv backward gives dL/dD
    and dL/dW in one call."""
    if groups != 1:
        raise NotImplementedError('compose_grouped_conv prototype handles groups == 1 only')
    O, C, kh, kw = weight.shape
    P = D + torch.eye(kh * kw, D.shape[2], dtype=D.dtype, device=D.device)
    W = full_W(weight, weight_extra).reshape(O, -1, 1)
    return F.conv1d(W, P.reshape(C * kh * kw, -1, 1), groups=C).view(O, C, kh, kw)


def compose_batched_path(weight, D, weight_extra=None, groups=1):
    """The launch-light CUDA composer (do_conv_mm.compose_batched), run on this device."""
    return _TrainingPathCompose.apply(weight, D, weight_extra, groups, BATCHED_COMPOSER)


def handles(fn: Callable, layer) -> bool:
    """The package's compositions take any layer; the prototypes only groups == 1, S == K."""
    return fn in (compose_kernel, compose_training_path, compose_keep_every_kernel,
                  compose_batched_path) or (
        layer.groups == 1 and layer.weight_extra is None)

KEPT_FROM_BYTES = {compose_training_path: KEEP_MIN_BYTES, compose_keep_every_kernel: 0}
CANDIDATES: Dict[str, Callable] = {
    'training path (do_conv_mm): blocked, large W\' kept, in-place backward':
        compose_training_path,
    'training path with every W\' kept (no recomposition in backward)': compose_keep_every_kernel,
    'batched (do_conv_mm\'s CUDA path): strided bmm, nothing kept': compose_batched_path,
    'compose_kernel + autograd (do_conv_mm, compile/trace/autocast path)': compose_kernel,
    'einsum (reference)': compose_einsum,
    'strided bmm (prototype)': compose_strided_bmm,
    'autograd.Function, 2-D transposes (prototype)': compose_function,
    'grouped 1×1 conv, C groups (prototype)': compose_grouped_conv,
}


# ------------------------------------------------------------------------------------------------
# Timing on a model's layers
# ------------------------------------------------------------------------------------------------
def trained_layers(model: torch.nn.Module):
    """(name, layer) of DO-Conv layers whose composition runs in training (D or W trainable)."""
    from do_conv_mm import DOConv2d
    out = []
    for name, m in model.named_modules():
        if isinstance(m, DOConv2d) and m.D is not None and any(
                p.requires_grad for p in m._doconv_parameters()):
            out.append((name, m))
    return out


def _leaf(t: Optional[torch.Tensor]):
    return None if t is None else t.detach().clone().requires_grad_(True)


def saved_bytes(fn: Callable, layer) -> int:
    """Bytes the composition graph keeps for backward beyond its inputs (weight, D, extra)."""
    inputs = [_leaf(layer.weight), _leaf(layer.D), _leaf(layer.weight_extra)]
    own = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs, layer.groups)
    return total


def time_layer(fn: Callable, layer, reps: int, device: torch.device):
    """Median seconds of (forward, backward) of ``fn`` on fresh leaf copies of a layer's params."""
    weight, D, extra = _leaf(layer.weight), _leaf(layer.D), _leaf(layer.weight_extra)
    grad = torch.randn(layer.weight.shape, device=weight.device, dtype=weight.dtype)
    fwd, bwd = [], []
    for r in range(reps + 1):  # first round is warm-up
        synchronize(device)
        t0 = time.perf_counter()
        out = fn(weight, D, extra, layer.groups)
        synchronize(device)
        g = grad.clone()  # the in-place backward may overwrite its incoming gradient
        t1 = time.perf_counter()
        out.backward(g)
        synchronize(device)
        t2 = time.perf_counter()
        if r:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        weight.grad = D.grad = None
        if extra is not None:
            extra.grad = None
    return median_iqr(fwd)[0], median_iqr(bwd)[0]


def profile_model(model: torch.nn.Module, device: torch.device, reps: int = 5,
                  candidates: Optional[Dict[str, Callable]] = None) -> Dict[str, dict]:
    """Per candidate: total forward/backward seconds per step and per-layer rows.

    Candidates run interleaved per layer (A, B, C, A, B, C...) so drift hits them alike.
    """
    candidates = CANDIDATES if candidates is None else candidates
    layers = trained_layers(model)
    result = {c: dict(fwd=0.0, bwd=0.0, saved=0, kept=0, layers=[]) for c in candidates}
    for name, layer in layers:
        for cname, fn in candidates.items():
            if not handles(fn, layer):
                continue
            f, b = time_layer(fn, layer, reps, device)
            result[cname]['fwd'] += f
            result[cname]['bwd'] += b
            result[cname]['saved'] += saved_bytes(fn, layer)
            if layer.weight.nbytes >= KEPT_FROM_BYTES.get(fn, float('inf')):
                result[cname]['kept'] += layer.weight.nbytes  # held from step to step
            result[cname]['layers'].append((name, tuple(layer.weight.shape), f, b))
    return result


def check_exact(model: torch.nn.Module) -> List[str]:
    """Max |candidate - compose_kernel| over the model's layers, and of their gradients."""
    lines = []
    layers = trained_layers(model)
    for cname, fn in CANDIDATES.items():
        if fn is compose_kernel:
            continue
        worst_out = worst_grad = 0.0
        for _, layer in layers:
            if not handles(fn, layer):
                continue
            ref_in = [_leaf(layer.weight), _leaf(layer.D), _leaf(layer.weight_extra)]
            new_in = [_leaf(layer.weight), _leaf(layer.D), _leaf(layer.weight_extra)]
            g = torch.randn(layer.weight.shape, device=layer.weight.device)
            ref = compose_kernel(*ref_in, layer.groups)
            new = fn(*new_in, layer.groups)
            ref.backward(g)
            new.backward(g.clone())
            worst_out = max(worst_out, (ref - new).abs().max().item())
            for a, b in zip(ref_in, new_in):
                if a is not None:
                    worst_grad = max(worst_grad, (a.grad - b.grad).abs().max().item())
        lines.append(f'- {cname}: max |W\' difference| {worst_out:.2e}, max |gradient '
                     f'difference| {worst_grad:.2e} (float32 summation-order rounding)')
    return lines


def profile_tables(result: Dict[str, dict], step_seconds: Optional[float] = None,
                   top: int = 5) -> List[str]:
    """Markdown: candidate totals (and the step-time share they imply), then the top layers."""
    rows = []
    for cname, r in result.items():
        total = r['fwd'] + r['bwd']
        row = [cname, len(r['layers']), f'{r["fwd"] * 1e3:.1f}', f'{r["bwd"] * 1e3:.1f}',
               f'{total * 1e3:.1f}', f'{r["saved"] / 2**20:.0f}', f'{r["kept"] / 2**20:.0f}']
        if step_seconds:
            row.append(f'{1 + total / step_seconds:.4f}')
        rows.append(row)
    header = ['composition', 'layers', 'forward ms/step', 'backward ms/step', 'total ms/step',
              'saved for backward, MiB', 'kept across steps, MiB']
    if step_seconds:
        header.append(f'implied step-time ratio (plain step {step_seconds:.2f} s)')
    out = [md_table(header, rows)]
    ref = next(iter(result.values()))
    worst = sorted(ref['layers'], key=lambda x: -(x[2] + x[3]))[:top]
    out.append(f'Most expensive layers ({next(iter(result))}):\n\n' + md_table(
        ['layer', 'weight shape', 'forward ms', 'backward ms'],
        [[n, 'x'.join(map(str, s)), f'{f * 1e3:.2f}', f'{b * 1e3:.2f}'] for n, s, f, b in worst]))
    return out


def main(argv=None):
    import mm_models
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='faster_rcnn', choices=sorted(mm_models.MODEL_ZOO))
    parser.add_argument('--reps', type=int, default=7)
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps = 3
    device = setup_run(args)
    model = mm_models.build_twins(args.model, device)['doconv']
    result = profile_model(model, device, args.reps)
    sections = [
        f'Kernel composition cost per training step on the trained DO-Conv layers of '
        f'{mm_models.TITLES[args.model]} (frozen layers compose without autograd and are left '
        f'out). '
        f'Medians of {args.reps} repetitions per layer, summed over layers.',
        '## Setup\n\n' + '\n'.join([f'- Command: {command_line(sys.argv)}']
                                   + environment_lines(args, device)),
        '## Cost per candidate\n\n' + '\n\n'.join(profile_tables(result)),
        '## Exactness of the prototypes vs compose_kernel\n\n' + '\n'.join(check_exact(model)),
    ]
    write_markdown(os.path.join(args.out_dir, 'composition.md'),
                   'DO-Conv kernel composition cost', sections)


if __name__ == '__main__':
    main()
