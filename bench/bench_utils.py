"""Shared benchmark plumbing: device/thread setup, interleaved timing, robust stats, Markdown.

Every benchmark in ``bench/`` compares variants *in one process, interleaved*: each repetition
times every variant once, and the order alternates between repetitions (ABBA...), so slow drift
of the machine (other processes, thermal state) hits all variants alike. Reported numbers are
medians with the inter-quartile range (IQR) beside them; ratios are medians of the per-repetition
ratios against the reference variant, so they pair measurements taken moments apart.

Import this module before torch: it sets ``OMP_WAIT_POLICY=PASSIVE`` (unless already set) so idle
OpenMP threads sleep instead of spinning. On a shared, oversubscribed CPU spinning threads steal
the cores the working ones need (measured here: a small CNN step 14x slower with spinning); on a
dedicated machine set ``OMP_WAIT_POLICY=ACTIVE`` to get the usual default back.
"""
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.metadata as metadata  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence  # noqa: E402

import torch  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


# ------------------------------------------------------------------------------------------------
# Command line and environment
# ------------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser,
                    threads: int = 2) -> argparse.ArgumentParser:
    """--device, --amp, --threads, --quick, --out-dir: the same shape in every benchmark."""
    parser.add_argument('--device', default='cpu',
                        help='torch device to run on, e.g. cpu (default), cuda, cuda:1')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision (fp16 autocast, loss scaling); needs --device cuda')
    parser.add_argument('--threads', type=int, default=threads,
                        help=f'torch intra-op threads (torch.set_num_threads); default {threads}')
    parser.add_argument('--quick', action='store_true',
                        help='fewer repetitions: a smoke run in a few minutes, noisier numbers')
    parser.add_argument('--out-dir', default=RESULTS_DIR,
                        help=f'where the Markdown/PNG results go (default {RESULTS_DIR})')
    return parser


def setup_run(args: argparse.Namespace, cpu_amp: bool = False) -> torch.device:
    """Apply --threads, validate --device / --amp; returns the device.

    ``cpu_amp``: the benchmark can run --amp on the CPU as bfloat16 autocast (no loss scaling);
    otherwise --amp is CUDA-only.
    """
    if args.threads < 1:
        raise SystemExit(f'--threads must be >= 1, got {args.threads}.')
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise SystemExit(f'--device {args.device!r} is not a torch device ({err}); '
                         f'use cpu or cuda[:N].') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'--device {args.device} asked for CUDA, but torch {torch.__version__} '
                         f'sees no CUDA device here; run with --device cpu.')
    if device.type not in ('cpu', 'cuda'):
        raise SystemExit(f'--device {args.device}: only cpu and cuda are supported.')
    if getattr(args, 'amp', False) and device.type != 'cuda' and not cpu_amp:
        raise SystemExit('--amp (fp16 autocast + loss scaling) is a CUDA measurement; '
                         'add --device cuda or drop --amp.')
    os.makedirs(args.out_dir, exist_ok=True)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings cover it (no-op on CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return 'not installed'


def mmcv_version() -> str:
    """mmcv's version, saying so when it is mmcv-lite (no compiled ops) and whether the bench
    shim (bench/mmcv_ext_shim.py) stands in for its ops."""
    if _version('mmcv') != 'not installed':
        return _version('mmcv')
    if _version('mmcv-lite') == 'not installed':
        return 'not installed'
    try:
        import mmcv._ext as ext
        shim = ' + bench shim' if getattr(ext, 'DO_CONV_MM_SHIM', False) else ''
    except ImportError:
        shim = ''
    return f'{_version("mmcv-lite")} (mmcv-lite, no compiled ops{shim})'


def precision_label(args: argparse.Namespace, device: torch.device) -> str:
    if not getattr(args, 'amp', False):
        return 'fp32'
    if device.type == 'cuda':
        return 'AMP (fp16 autocast, loss scaling)'
    return 'AMP (bf16 autocast, no loss scaling)'


def environment_lines(args: argparse.Namespace, device: torch.device) -> List[str]:
    """Markdown bullet lines describing machine, software and run settings."""
    extra = []
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        hw = (f'{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB, '
              f'{props.multi_processor_count} SMs, compute capability {props.major}.{props.minor})'
              f', CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}')
        extra = [f'- CUDA settings: cudnn.benchmark={torch.backends.cudnn.benchmark} (at the '
                 f'end of the run), TF32 convolutions={torch.backends.cudnn.allow_tf32}, TF32 '
                 f'matmul={torch.backends.cuda.matmul.allow_tf32}']
    else:
        hw = f'{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs'
    try:
        load = ', '.join(f'{x:.2f}' for x in os.getloadavg())
    except OSError:
        load = 'n/a'
    precision = precision_label(args, device)
    pkgs = ', '.join(f'{d} {mmcv_version() if d == "mmcv" else _version(d)}' for d in
                     ('torch', 'mmengine', 'mmcv', 'mmdet', 'mmsegmentation', 'do_conv_mm',
                      'scikit-learn'))
    return [
        f'- Date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}',
        f'- Machine: {platform.node()}, {platform.platform()}; {hw}',
        f'- Python {platform.python_version()}; {pkgs}',
        f'- Device: {device}; precision: {precision}; torch threads: {torch.get_num_threads()}; '
        f'OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY")}',
        f'- Load average (1/5/15 min) at the end of the run: {load}',
    ] + extra


# ------------------------------------------------------------------------------------------------
# Interleaved timing and statistics
# ------------------------------------------------------------------------------------------------
def interleaved_times(steps: Dict[str, Callable[[], None]], reps: int, warmup: int,
                      device: torch.device, progress: bool = True,
                      events: Optional[Dict[str, List[float]]] = None,
                      deadline: Optional[float] = None, gc_off: bool = False):
    """Time each callable ``reps`` times, interleaved, after ``warmup`` untimed rounds.

    Round r runs the variants in insertion order when r is even and reversed when r is odd
    (ABBA...), so a variant is never systematically first or last. Returns two dicts of seconds
    per call, ``(wall, cpu)``: wall-clock time, and the CPU time of this process over the call
    (``time.process_time``, all threads). On a shared machine the CPU time is the steadier one:
    it does not count time the process waited for a core. On CUDA only wall time is meaningful.

    ``events`` (CUDA only): a dict filled with seconds between CUDA events recorded on the
    current stream right before and after each call (device-side time of the step, launch gaps
    included). ``deadline`` (``time.time()`` value): no round starts after it, except that one
    warm-up and one timed round always run; fewer than ``reps`` rounds then come back (the caller
    reports them as partial). ``gc_off``: Python's garbage collector is off during each timed
    call and runs between rounds.
    """
    names = list(steps)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    use_events = events is not None and device.type == 'cuda'
    if use_events:
        events.update({name: [] for name in names})
    r = 0
    while r < warmup + reps:
        if deadline is not None and time.time() >= deadline:
            if r >= warmup + 1:
                break  # at least one timed round is done
            if 1 <= r < warmup:
                r = warmup  # one warm-up round is done: skip to one timed round
        order = names if r % 2 == 0 else names[::-1]
        if gc_off:
            gc.collect()
        for name in order:
            synchronize(device)
            if use_events:
                ev0 = torch.cuda.Event(enable_timing=True)
                ev1 = torch.cuda.Event(enable_timing=True)
                ev0.record()
            if gc_off:
                gc.disable()
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                steps[name]()
                if use_events:
                    ev1.record()
                synchronize(device)
            finally:
                if gc_off:
                    gc.enable()
            if r >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                if use_events:
                    events[name].append(ev0.elapsed_time(ev1) / 1000.0)
        if progress:
            tag = 'warm-up' if r < warmup else f'rep {r - warmup + 1}/{reps}'
            last = ', '.join(f'{n} {wall[n][-1]:.3f}s (cpu {cpu[n][-1]:.3f}s)' for n in names
                             if r >= warmup)
            print(f'  [{tag}] {last}', flush=True)
        r += 1
    return wall, cpu


def quartiles(values: Sequence[float]):
    """(q1, median, q3) with linear interpolation; a single value gives (v, v, v)."""
    vals = sorted(values)
    if len(vals) == 1:
        return vals[0], vals[0], vals[0]
    q1, q2, q3 = statistics.quantiles(vals, n=4, method='inclusive')
    return q1, q2, q3


def median_iqr(values: Sequence[float]):
    """(median, IQR = q3 - q1)."""
    q1, q2, q3 = quartiles(values)
    return q2, q3 - q1


def paired_ratios(times: Dict[str, List[float]], reference: str) -> Dict[str, List[float]]:
    """Per-repetition ratios t_variant / t_reference (the pairs were timed moments apart)."""
    ref = times[reference]
    return {name: [a / b for a, b in zip(vals, ref)] for name, vals in times.items()}


def fmt_med(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    """'median (IQR x)' formatted with ``digits`` decimals after multiplying by ``scale``."""
    med, iqr = median_iqr([v * scale for v in values])
    return f'{med:.{digits}f} (IQR {iqr:.{digits}f})'


# ------------------------------------------------------------------------------------------------
# Markdown output
# ------------------------------------------------------------------------------------------------
def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are str()-ed."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def write_markdown(path: str, title: str, sections: Sequence[str]) -> None:
    """Write ``# title`` and the sections, via a temporary file (no half-written results)."""
    text = f'# {title}\n\n' + '\n\n'.join(s.strip('\n') for s in sections) + '\n'
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)
    print(f'wrote {path}')


def results_name(stem: str, models: Sequence[str], default: Sequence[str]) -> str:
    """``stem.md`` for the default model set (in any order), else ``stem_<model>_<model>.md``
    (runs split by model do not overwrite each other)."""
    if sorted(models) == sorted(default):
        return f'{stem}.md'
    return f'{stem}_' + '_'.join(models) + '.md'


def command_line(argv: Sequence[str]) -> str:
    """The command that produced a result file, as a Markdown code span."""
    return '`python ' + ' '.join(argv) + '`'


def mean_std(values: Sequence[float]):
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_test(a: Sequence[float], b: Sequence[float]) -> str:
    """Two-sided paired t-test and Wilcoxon signed-rank p-values of b - a (scipy)."""
    try:
        from scipy import stats
    except ImportError:
        return 'scipy not installed'
    diffs = [y - x for x, y in zip(a, b)]
    if all(d == 0 for d in diffs):
        return 'all paired differences are 0'
    t_p = stats.ttest_rel(b, a).pvalue
    w_p = stats.wilcoxon(diffs).pvalue
    return f'paired t-test p = {t_p:.3f}, Wilcoxon p = {w_p:.3f}'
