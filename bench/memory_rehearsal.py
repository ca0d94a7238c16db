"""GPU peak-memory ratio, rehearsed on the CPU: live tensor bytes over one training step.

Issue 10's memory target is ``torch.cuda.max_memory_allocated`` over a training step, DO-Conv /
plain <= 1.05. This counts the same quantity on CPU tensors, for the path a GPU takes, forced
here: the DO-Conv twin's groups == 1 and depthwise layers train through autograd ops that
recompose W' in backward (``recomposed_conv``), the others through the training Function with
the launch-light composer (``compose_batched``).
Models: PSPNet R50-D8 and Faster R-CNN R50-FPN twins from the model-zoo configs (mm_models.py),
synthetic batch, mmengine ``train_step`` with SGD (momentum), fp32 and AMP (bf16 autocast here,
as BF16AmpOptimWrapper runs it on the CPU; fp16 on a GPU keeps the same tensors).

    peak = held before the step (parameters, buffers, optimizer state: gradients are None after
           the previous step's zero_grad) + the highest mark of live bytes that the step's ATen
           calls allocate (output storages, counted at the dispatcher, released when the last
           tensor on them goes).

Not counted: temporaries inside one ATen call (cuDNN workspaces, ...), alike for both twins, and
the CUDA caching allocator's 512-byte rounding. The measured step runs twice per variant; the
higher peak is reported, and where the two differ (Faster R-CNN under bf16: proposals vary with
rounding) the table says by how much.

Writes bench/results/memory_rehearsal.md.
"""
from bench_utils import command_line, environment_lines, md_table, write_markdown, \
    RESULTS_DIR  # first: sets OMP_WAIT_POLICY before torch loads OpenMP

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import weakref  # noqa: E402
from typing import Dict  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import mm_models  # noqa: E402
from do_conv_mm import DOConv2d  # noqa: E402
from do_conv_mm.compose_batched import BATCHED_COMPOSER  # noqa: E402

TARGET = 1.05
MB = 2 ** 20


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages that ATen calls allocate while the mode is on, and their peak.

    An output counts when its storage is none of the call's input storages (views and in-place
    or ``out=`` results allocate nothing) and is not counted yet; it stops counting when torch
    frees the storage (a finalizer on the storage object, which torch keeps for its lifetime).
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._counted = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._counted:
                continue
            self._counted.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of parameters, their gradients, buffers and optimizer
    state: what a step starts from."""
    storages = {}
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measure(model, step, optimizer, repeats: int = 2) -> Dict[str, float]:
    """{'held', 'step_peak', 'peak', 'spread'} of a steady-state step: the reading with the
    highest peak of ``repeats`` steps, and (max - min) / max of their peaks."""
    step()  # warm-up: optimizer state, cached identity matrices
    readings = []
    for _ in range(repeats):
        held = held_bytes(model, optimizer)
        with LiveBytes() as live:
            step()
        readings.append(dict(held=held, step_peak=live.peak, peak=held + live.peak))
    peaks = [r['peak'] for r in readings]
    return dict(max(readings, key=lambda r: r['peak']),
                spread=(max(peaks) - min(peaks)) / max(peaks))


def force_cuda_composer(model: torch.nn.Module) -> int:
    """Make every DO-Conv layer train as on a GPU (the launch-light composer's device: autograd
    ops where they apply, else the Function with that composer); returns how many."""
    layers = mm_models.doconv_layers(model)
    for layer in layers:
        layer._training_composer = lambda: BATCHED_COMPOSER
    return len(layers)


def run(name: str, amp: bool, batch: int, size: int) -> Dict:
    twins = mm_models.build_twins(name, size=size)
    layers = force_cuda_composer(twins['doconv'])
    data = mm_models.synthetic_batch(name, batch, size)
    result = dict(model=mm_models.TITLES[name], precision='AMP (bf16)' if amp else 'fp32',
                  layers=layers)
    for variant, model in twins.items():
        wrapper = mm_models.optim_wrapper(model, amp)
        result[variant] = measure(model, mm_models.train_step_fn(model, data, wrapper),
                                  wrapper.optimizer)
        del wrapper
    result['ratio'] = result['doconv']['peak'] / result['plain']['peak']
    return result


def layer_backward_bytes(cin: int = 4096, cout: int = 512, size: int = 8) -> Dict[str, int]:
    """Bytes allocated during one layer's backward (peak live mark): plain conv, DO-Conv on the
    GPU path ('doconv': autograd ops for this groups == 1 layer) and through the Function with
    the launch-light composer ('function'); default shape: PSPNet's 512×4096×3×3 head conv, a
    1×4096×8×8 input."""
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(cin, cout, 3, padding=1)
    doconv = DOConv2d(cin, cout, 3, padding=1)
    force_cuda_composer(doconv)
    x = torch.randn(1, cin, size, size, requires_grad=True)
    peaks = {}
    for name, layer in (('plain', plain), ('doconv', doconv), ('function', doconv)):
        doconv._recompose_in_autograd = name != 'function'
        y = layer(x)
        grad = torch.ones_like(y)
        with LiveBytes() as live:
            y.backward(grad)
        peaks[name] = live.peak
        layer.zero_grad(set_to_none=True)
        x.grad = None
    return dict(peaks, kernel=plain.weight.numel() * plain.weight.element_size())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['pspnet', 'faster_rcnn'],
                        choices=sorted(mm_models.MODEL_ZOO))
    parser.add_argument('--batch', type=int, default=2, help='images per step (default 2)')
    parser.add_argument('--size', type=int, default=512, help='square input size (default 512)')
    parser.add_argument('--threads', type=int, default=2,
                        help='torch intra-op threads (default 2)')
    parser.add_argument('--out-dir', default=RESULTS_DIR,
                        help=f'where the Markdown result goes (default {RESULTS_DIR})')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    rows, spreads = [], []
    for name in args.models:
        for amp in (False, True):
            r = run(name, amp, args.batch, args.size)
            rows.append([
                r['model'], r['precision'], r['layers'],
                f'{r["plain"]["peak"] / MB:.0f}', f'{r["doconv"]["peak"] / MB:.0f}',
                f'{r["ratio"]:.3f}', 'yes' if r['ratio'] <= TARGET else '**no**',
                f'{(r["doconv"]["held"] - r["plain"]["held"]) / MB:+.1f}',
                f'{(r["doconv"]["step_peak"] - r["plain"]["step_peak"]) / MB:+.1f}'])
            print(' | '.join(map(str, rows[-1])), flush=True)
            spreads += [f'{r["model"]}, {r["precision"]}, {variant}: '
                        f'{100 * r[variant]["spread"]:.3f} %'
                        for variant in ('plain', 'doconv') if r[variant]['spread']]
    header = ['model', 'precision', 'DO-Conv layers', 'plain peak (MiB)', 'DO-Conv peak (MiB)',
              f'ratio (target <= {TARGET})', 'within target', 'held: DO-Conv - plain (MiB)',
              'step peak: DO-Conv - plain (MiB)']
    about = (
        f'Batch {args.batch}, {args.size}×{args.size}, one steady-state `train_step` (SGD with '
        'momentum) per twin, the DO-Conv twin on the GPU path (forced on CPU tensors). '
        'Peak = what the step starts from (parameters, buffers, optimizer state) + the highest '
        'mark of live bytes the step allocates, counted at the dispatcher. An estimate of '
        '`torch.cuda.max_memory_allocated`, the GPU check\'s measure; in-op temporaries '
        '(cuDNN workspaces) are not counted. Each variant\'s step ran twice; the higher peak '
        'is shown. "held": parameters and optimizer state (D, its momentum); "step peak": the '
        'step\'s own allocations.')
    args.amp = False  # precision is per row: say so in the environment lines
    environment = [line.replace('precision: fp32', 'precision: per row')
                   for line in environment_lines(args, torch.device('cpu'))]
    layer = layer_backward_bytes()
    layer_line = (
        "One layer's backward (PSPNet's 512×4096×3×3 head conv, kernel "
        f"{layer['kernel'] / MB:.1f} MiB, input 1×4096×8×8): peak live bytes it allocates, "
        f"plain {layer['plain'] / MB:.1f} MiB; DO-Conv on the GPU path (autograd ops) "
        f"{layer['doconv'] / MB:.1f} MiB (dL/dW', the bmm's share of dL/dweight and their sum); "
        f"through the Function {layer['function'] / MB:.1f} MiB (dL/dW' and dL/dweight: the "
        "recomposed W' is freed before dL/dweight is allocated). The model-level peak above "
        "comes before the head's backward, so neither shows there.")
    agreement = ('The two readings of every variant agreed to the byte.' if not spreads else
                 'The two readings agreed to the byte except (spread of the peaks): '
                 + '; '.join(spreads) + '.')
    sections = [about, md_table(header, rows), agreement, layer_line,
                '\n'.join([f'- Command: {command_line(sys.argv)}'] + environment)]
    write_markdown(os.path.join(args.out_dir, 'memory_rehearsal.md'),
                   'GPU peak memory, rehearsed on the CPU (GPU path forced)', sections)


if __name__ == '__main__':
    main()
