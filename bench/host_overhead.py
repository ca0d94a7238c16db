"""Host-side cost of one DO-Conv layer's training step: what a launch-bound GPU step pays.

A GPU training step whose kernels are short waits on the host: every ATen call costs its
Python and dispatcher time (~µs) before the device sees it. That cost does not depend on the
tensors' sizes, so it is measured here on the CPU with tensors so small (a 4 → 4 channel 3×3
layer on a 2×2 input) that the arithmetic is negligible: per layer and training step (forward,
``.sum().backward()``), median of interleaved rounds, and the extra over a plain nn.Conv2d.
``--device cuda`` times the same on a GPU (wall time, synchronised per timed call), where
``--channels`` / ``--size`` also give a layer whose arithmetic counts.

Variants, one set of weights:

* ``plain``: nn.Conv2d.
* ``GPU path, autograd ops, W' kept``: what a GPU runs for groups == 1 and depthwise layers at
  the default D_mul whose kernel is at most ``recomposed_conv.KEEP_MAX_BYTES`` (1 MiB): W'
  composed by autograd ops whose backward runs in C++, saved by the conv for backward.
* ``GPU path, autograd ops, W' recomposed``: the same for larger kernels (forced here): the conv
  keeps a marker, a saved-tensor hook recomposes W' in backward (no kernel-sized memory kept).
* ``GPU path, Function``: the training Function with the launch-light composer, what a GPU
  runs for grouped layers, D_mul > kh·kw and under others' saved-tensor hooks.
* ``CPU path, Function``: the Function with the CPU composer (forced onto the device).

Every variant is checked exact against the formula in float64. Also counts the ATen calls
(dispatcher level, views excluded) per layer in forward and backward.

Writes bench/results/host_overhead.md (``host_overhead_cuda.md`` with ``--device cuda``; other
layer sizes add ``_<channels>ch_<size>px``).
"""
from bench_utils import command_line, environment_lines, md_table, median_iqr, paired_ratios, \
    write_markdown, interleaved_times, RESULTS_DIR  # first: sets OMP_WAIT_POLICY

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from do_conv_mm import DOConv2d, compose_kernel  # noqa: E402
from do_conv_mm.compose_batched import BATCHED_COMPOSER  # noqa: E402
from do_conv_mm import recomposed_conv  # noqa: E402

VIEW_OPS = {'view', '_unsafe_view', 'transpose', 't', 'permute', 'alias', 'slice', 'select',
            'expand', 'unsqueeze', 'squeeze', 'as_strided', 'detach', 'is_same_size'}


class AtenCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEW_OPS:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def variants(channels: int, device: torch.device, dtype=torch.float32):
    """({name: step(x)}, layer): one set of weights for all; each step runs the layer forward."""
    torch.manual_seed(0)
    plain = nn.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)
    layer = DOConv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)
    layer.load_state_dict(plain.state_dict())
    with torch.no_grad():
        layer.D.normal_(std=0.1)
    layer._training_composer = lambda: BATCHED_COMPOSER  # the GPU's choice on any device
    function_layer = DOConv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)
    cpu_layer = DOConv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)
    for other in (function_layer, cpu_layer):
        for name in ('weight', 'D', 'bias'):  # the same Parameters
            setattr(other, name, getattr(layer, name))
    function_layer._training_composer = lambda: BATCHED_COMPOSER
    function_layer._recompose_in_autograd = False
    cpu_layer._training_composer = lambda: cpu_layer._blocked_composer

    def recomposing(x):
        """The layer as it trains with a kernel over KEEP_MAX_BYTES (decided in forward)."""
        keep = recomposed_conv.KEEP_MAX_BYTES
        recomposed_conv.KEEP_MAX_BYTES = -1
        try:
            return layer(x)
        finally:
            recomposed_conv.KEEP_MAX_BYTES = keep

    kept = layer.weight.numel() * layer.weight.element_size() <= recomposed_conv.KEEP_MAX_BYTES
    return {
        'plain nn.Conv2d': plain,
        "DOConv2d, GPU path: autograd ops, W' kept (kernels <= 1 MiB)"
        if kept else "DOConv2d, GPU path: autograd ops (kernel > 1 MiB: recomposed)": layer,
        "DOConv2d, GPU path: autograd ops, W' recomposed (kernels > 1 MiB)": recomposing,
        'DOConv2d, GPU path: Function (grouped, D_mul > kh·kw)': function_layer,
        'DOConv2d, CPU path: Function, CPU composer': cpu_layer,
    }, layer


def check_exact() -> float:
    """Largest difference of every variant's output and gradients from the formula (float64)."""
    steps, layer = variants(6, torch.device('cpu'), torch.float64)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    params = [x, layer.weight, layer.D, layer.bias]
    reference = F.conv2d(x, compose_kernel(layer.weight, layer.D), layer.bias, 1, 1)
    expected = torch.autograd.grad(reference.square().sum(), params)
    worst = 0.0
    for name, step in steps.items():
        if name.startswith('plain'):
            continue
        out = step(x)
        got = torch.autograd.grad(out.square().sum(), params)
        worst = max([worst, (out - reference).abs().max().item()]
                    + [(g - e).abs().max().item() for g, e in zip(got, expected)])
    return worst


def count_calls(step, x):
    step(x).sum().backward()  # caches (identity matrices)
    with AtenCalls() as forward:
        y = step(x)
    loss = y.sum()
    with AtenCalls() as backward:
        loss.backward()
    return forward.calls, backward.calls


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    parser.add_argument('--channels', type=int, default=4,
                        help='input = output channels of the layer (default 4)')
    parser.add_argument('--size', type=int, default=2, help='input height = width (default 2)')
    parser.add_argument('--batch', type=int, default=1, help='input batch (default 1)')
    parser.add_argument('--reps', type=int, default=30, help='timed rounds (default 30)')
    parser.add_argument('--inner', type=int, default=300,
                        help='layer steps per timed call (default 300)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (default 1)')
    parser.add_argument('--out-dir', default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    worst = check_exact()
    if worst > 1e-12:
        raise SystemExit(f'a variant is not exact: {worst:.3g} from the formula in float64')
    steps, _ = variants(args.channels, device)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device,
                    requires_grad=True)
    calls = {name: count_calls(step, x) for name, step in steps.items()}

    def repeated(step):
        def run():
            for _ in range(args.inner):
                step(x).sum().backward()
        return run

    wall, cpu = interleaved_times({n: repeated(s) for n, s in steps.items()}, args.reps, 3,
                                  device)
    times, clock = (cpu, 'process CPU time') if device.type == 'cpu' else (
        wall, 'wall time, device synchronised before and after each timed call')
    reference = 'plain nn.Conv2d'
    ratios = paired_ratios(times, reference)
    plain_us = median_iqr(times[reference])[0] / args.inner * 1e6
    rows = []
    for name in steps:
        us, iqr = (v / args.inner * 1e6 for v in median_iqr(times[name]))
        forward, backward = calls[name]
        rows.append([name, f'{us:.0f} (IQR {iqr:.0f})', f'{us - plain_us:+.0f}',
                     f'{median_iqr(ratios[name])[0]:.2f}', forward, backward])
    header = ['variant', f'µs per layer step ({device.type})', 'extra over plain, µs', 'ratio',
              'ATen calls forward', 'ATen calls backward']
    shape = f'{args.batch}×{args.channels}×{args.size}×{args.size}'
    negligible = (args.channels, args.size) == (4, 2)
    about = (f'One layer ({args.channels} → {args.channels} channels, 3×3, input {shape}'
             f'{": negligible arithmetic" if negligible else ""}) on {device.type}, forward + '
             f'`.sum().backward()`, {args.inner} steps per timed call, {args.reps} interleaved '
             f'rounds (ABBA) after 3 warm-up rounds; {clock}, median (IQR). ATen calls: '
             f'counted at the dispatcher (views excluded; `sum` and its backward and the 3 or 4 '
             f'gradient accumulations included, alike for all; allocations such as `empty_like` '
             f'count: they cost host time but launch no GPU kernel). Every DO-Conv variant '
             f'equals the formula in float64 on the CPU (worst difference '
             f'{worst:.1e} over outputs and gradients of input, weight, D and bias).')
    sections = [about, md_table(header, rows),
                '\n'.join([f'- Command: {command_line(sys.argv)}']
                          + environment_lines(argparse.Namespace(amp=False), device))]
    name = 'host_overhead' + ('' if device.type == 'cpu' else f'_{device.type}') + (
        '' if negligible and args.batch == 1 else f'_{args.channels}ch_{args.size}px') + '.md'
    write_markdown(os.path.join(args.out_dir, name),
                   f"Host-side cost of a DO-Conv layer's training step ({device.type})", sections)
    for row in rows:
        print(' | '.join(map(str, row)))


if __name__ == '__main__':
    main()
