"""Host-side cost of one DO-Conv layer's training step: what a launch-bound GPU step pays.

A GPU training step whose kernels are short waits on the host: every ATen call costs its
Python and dispatcher time (~µs) before the device sees it. That cost does not depend on the
tensors' sizes, so it is measured here on the CPU with tensors so small (a 4 → 4 channel 3×3
layer on a 2×2 input) that the arithmetic is negligible: per layer and training step (forward,
``.sum().backward()``), median of interleaved rounds, and the extra over a plain nn.Conv2d.

Variants:

* ``plain``: nn.Conv2d.
* ``Function, CUDA composer``: DOConv2d's training Function with the launch-light composer
  (what runs on a GPU; forced here), and ``Function, CPU composer`` (what runs on the CPU).
* Prototypes (not in the package), exact against the formula (checked in float64 here):
  ``autograd, W' saved``: the channel-major composition as autograd ops (one ``bmm``, one
  ``add``) and conv2d, whose backward runs in C++; the conv saves W' for backward (one kernel-
  sized tensor per layer until its backward, in fp32). ``autograd, W' recomposed``: the same,
  but saved-tensor hooks keep only a marker for W' and recompose it in backward (no extra
  memory), as the Function does.

Also counts the ATen calls (dispatcher level, views excluded) per layer in forward and backward.

Writes bench/results/host_overhead.md.
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

VIEW_OPS = {'view', '_unsafe_view', 'transpose', 't', 'permute', 'alias', 'slice', 'select',
            'expand', 'unsqueeze', 'squeeze', 'as_strided', 'detach', 'is_same_size'}


def channel_major_expression(weight, D):
    """W' = weight + Σ_s D[c, m, s]·weight[o, c, s] (groups 1, D_mul = kh·kw) as autograd ops:
    ``bmm(D, W_cmᵀ)`` (C, K, O) and one add reading it through a permuted view."""
    O, C, kh, kw = weight.shape
    flat = weight.view(O, C, kh * kw)
    delta = torch.bmm(D, flat.permute(1, 2, 0))  # (C, K, O)
    return (flat + delta.permute(2, 0, 1)).view(O, C, kh, kw)


class RecomposedKernel:
    """Marker a saved-tensor hook keeps instead of W'."""


def conv_recomposing_in_backward(x, weight, D, bias, padding):
    """conv2d(x, W') whose saved W' is replaced by a marker and recomposed in backward
    (differentiably while backward builds a graph, e.g. ``create_graph=True``)."""
    kernel = channel_major_expression(weight, D)
    marker = RecomposedKernel()

    def pack(tensor):
        return marker if tensor is kernel else tensor

    def unpack(packed):
        if packed is marker:
            return channel_major_expression(weight, D)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return F.conv2d(x, kernel, bias, 1, padding)


class AtenCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEW_OPS:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def variants(channels: int, dtype=torch.float32):
    """{name: step(x)} sharing one set of weights; each step runs forward and backward."""
    torch.manual_seed(0)
    plain = nn.Conv2d(channels, channels, 3, padding=1, dtype=dtype)
    cuda_path = DOConv2d(channels, channels, 3, padding=1, dtype=dtype)
    cuda_path.load_state_dict(plain.state_dict())
    with torch.no_grad():
        cuda_path.D.normal_(std=0.1)
    cuda_path._training_composer = lambda: BATCHED_COMPOSER
    cpu_path = DOConv2d(channels, channels, 3, padding=1, dtype=dtype)
    for name in ('weight', 'D', 'bias'):  # the same Parameters: one set of weights for all
        setattr(cpu_path, name, getattr(cuda_path, name))
    w, D, b = cuda_path.weight, cuda_path.D, cuda_path.bias
    return {
        'plain nn.Conv2d': lambda x: plain(x),
        'DOConv2d: Function, CUDA composer': lambda x: cuda_path(x),
        'DOConv2d: Function, CPU composer': lambda x: cpu_path(x),
        "prototype: autograd, W' saved": lambda x: F.conv2d(
            x, channel_major_expression(w, D), b, 1, 1),
        "prototype: autograd, W' recomposed": lambda x: conv_recomposing_in_backward(
            x, w, D, b, 1),
    }, cuda_path


def check_exact() -> float:
    """Largest difference of every variant's output and gradients from the formula (float64)."""
    steps, layer = variants(6, torch.float64)
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
    parser.add_argument('--reps', type=int, default=30, help='timed rounds (default 30)')
    parser.add_argument('--inner', type=int, default=300,
                        help='layer steps per timed call (default 300)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (default 1)')
    parser.add_argument('--out-dir', default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    worst = check_exact()
    if worst > 1e-12:
        raise SystemExit(f'a variant is not exact: {worst:.3g} from the formula in float64')
    steps, _ = variants(4)
    x = torch.randn(1, 4, 2, 2, requires_grad=True)
    calls = {name: count_calls(step, x) for name, step in steps.items()}

    def repeated(step):
        def run():
            for _ in range(args.inner):
                step(x).sum().backward()
        return run

    wall, cpu = interleaved_times({n: repeated(s) for n, s in steps.items()}, args.reps, 3,
                                  torch.device('cpu'))
    reference = 'plain nn.Conv2d'
    ratios = paired_ratios(cpu, reference)
    plain_us = median_iqr(cpu[reference])[0] / args.inner * 1e6
    rows = []
    for name in steps:
        us, iqr = (v / args.inner * 1e6 for v in median_iqr(cpu[name]))
        forward, backward = calls[name]
        rows.append([name, f'{us:.0f} (IQR {iqr:.0f})', f'{us - plain_us:+.0f}',
                     f'{median_iqr(ratios[name])[0]:.2f}', forward, backward])
    header = ['variant', 'µs per layer step (CPU time)', 'extra over plain, µs', 'ratio',
              'ATen calls forward', 'ATen calls backward']
    about = (f'One layer (4 → 4 channels, 3×3, input 1×4×2×2: negligible arithmetic), forward + '
             f'`.sum().backward()`, {args.inner} steps per timed call, {args.reps} interleaved '
             f'rounds (ABBA) after 3 warm-up rounds; process CPU time, median (IQR). ATen calls: '
             f'counted at the dispatcher (views excluded; `sum` and its backward and the 3 or 4 '
             f'gradient accumulations included, alike for all; allocations such as `empty_like` '
             f'count: they cost host time but launch no GPU kernel). Every DO-Conv variant '
             f'equals the formula in float64 (worst difference '
             f'{worst:.1e} over outputs and gradients of input, weight, D and bias).')
    sections = [about, md_table(header, rows),
                '\n'.join([f'- Command: {command_line(sys.argv)}']
                          + environment_lines(argparse.Namespace(amp=False),
                                              torch.device('cpu')))]
    write_markdown(os.path.join(args.out_dir, 'host_overhead.md'),
                   "Host-side cost of a DO-Conv layer's training step (CPU, negligible compute)",
                   sections)
    for row in rows:
        print(' | '.join(map(str, row)))


if __name__ == '__main__':
    main()
