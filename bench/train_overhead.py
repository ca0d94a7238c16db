"""Training cost of DO-Conv: step time and peak memory vs plain conv, model-zoo R50 models.

Models: Faster R-CNN R50-FPN (mmdet, DO-Conv on backbone + neck) and PSPNet R50-D8 (mmseg,
SyncBN -> BN, DO-Conv on backbone + decode head + auxiliary head), built from the packaged
model-zoo configs (see mm_models.py). Twins hold identical weights (DO-Conv warm-started from the
plain state dict, then D ~ N(0, 0.01²) so composition is real work). Synthetic batch (default
2 images of 512×512 with random boxes / label maps); a step is mmengine's ``train_step``:
preprocess, forward, loss, backward, SGD step.

Time: both twins in this process, interleaved ABBA, ``--warmup`` untimed rounds, ``--reps`` timed
rounds; medians, IQRs and the median of per-round ratios, for wall-clock and process CPU time.

Peak memory: one fresh subprocess per variant and repetition (a process's peak cannot be reset
for one variant without the other's allocations leaking into it). On CPU the subprocess reads the
kernel's peak resident set size (VmHWM in /proc/self/status), reset with /proc/self/clear_refs
after a warm-up step, so the peak is that of one steady-state training step (optimizer state
present); it also reports the peak above the resident size before the first step (the training
working set: activations, gradients, optimizer state). On CUDA it reads
``torch.cuda.max_memory_allocated`` after resetting it the same way.

``--function-twin`` adds a third twin, the DO-Conv model with every layer training through the
Function (``DO_CONV_MM_GPU_TRAINING=function``), timed in the same rounds: on a GPU it compares
the default path (autograd ops for groups == 1 / depthwise layers) with the Function at model
scale in one run (memory is probed for the default path only).

Also profiles where the overhead goes: composition forward/backward per layer (composition.py;
``--no-profile`` skips it) and, with ``--op-profile`` (default on CUDA), one torch.profiler step
per twin (operators by self CPU time, call counts, device time).

CUDA (``--device cuda [--amp]``): wall-clock time bracketed by synchronize and CUDA-event time per
step, GC off inside timed steps, cudnn.benchmark as the recipe's ``env_cfg``. Faster R-CNN runs as
the full model where mmcv's RoIAlign/NMS run on the device (compiled ops, or mmcv-lite + the bench
shim, bench/mmcv_ext_shim.py); otherwise without its RoI head, labelled so. ``--deadline`` bounds
the run: timing stops early (marked partial) and results are written after every model.

Writes bench/results/train_overhead[_<models>][_cuda[_amp]|_bf16].md.
"""
from bench_utils import add_common_args, command_line, environment_lines, fmt_med, md_table, \
    median_iqr, paired_ratios, precision_label, quartiles, setup_run, synchronize, \
    write_markdown, results_name, \
    interleaved_times  # first: sets OMP_WAIT_POLICY before torch loads OpenMP

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402

import mm_models  # noqa: E402

TARGET_TIME, TARGET_MEM = 1.02, 1.05
PROBE_TAG = 'MEMORY_PROBE '
SUMMARY_TAG = 'TRAIN_OVERHEAD_SUMMARY '  # last line with it: the run's summary as JSON


DEFAULT_MODELS = ['faster_rcnn', 'pspnet']


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS,
                        choices=sorted(mm_models.MODEL_ZOO))
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, default=512, help='square image side (default 512)')
    parser.add_argument('--reps', type=int, default=10, help='timed rounds per variant')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first')
    parser.add_argument('--mem-reps', type=int, default=2,
                        help='fresh subprocesses per variant for peak memory (0: skip)')
    parser.add_argument('--mem-parallel', action='store_true',
                        help='run the plain and DO-Conv memory subprocesses of a repetition at '
                             'the same time (each measures its own process; saves time)')
    parser.add_argument('--no-profile', action='store_true', help='skip the composition profile')
    parser.add_argument('--op-profile', action='store_true', default=None,
                        help='one torch.profiler step per twin, top operators by self CPU time '
                             '(default: on with --device cuda, off on the CPU)')
    parser.add_argument('--no-op-profile', dest='op_profile', action='store_false',
                        help='skip the operator profile (also on CUDA)')
    parser.add_argument('--deadline', type=float, default=None,
                        help='time.time() by which the run should be done: each model gets an '
                             'equal share of what is left; timing stops early (results marked '
                             'partial) rather than overrun')
    parser.add_argument('--function-twin', action='store_true',
                        help='also time a DO-Conv twin whose layers all train through the '
                             'Function (the GPU path\'s alternative), in the same rounds')
    parser.add_argument('--memory-probe', choices=['plain', 'doconv'],
                        help=argparse.SUPPRESS)  # internal: run in a fresh subprocess
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.mem_reps = 3, 1, 1
    for name in ('batch', 'size', 'reps'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}.')
    if args.mem_reps < 0:
        parser.error(f'--mem-reps must be >= 0, got {args.mem_reps}.')
    return args


# ------------------------------------------------------------------------------------------------
# Peak memory, one variant per fresh process
# ------------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'/proc/self/status has no {field} line; peak RSS needs Linux.')


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def memory_probe(args, device) -> dict:
    """In this (fresh) process: build one variant, warm-up step, then peak of one step (MiB)."""
    name, variant = args.models[0], args.memory_probe
    torch.backends.cudnn.benchmark = mm_models.recipe_cudnn_benchmark(name)
    model = mm_models.build_model(name, variant == 'doconv', device, size=args.size)
    if variant == 'doconv':
        mm_models.randomize_D(model)
    data = mm_models.synthetic_batch(name, args.batch, args.size)
    step = mm_models.train_step_fn(model, data, mm_models.optim_wrapper(model, args.amp))
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return dict(peak_mib=peak / 2**20, above_start_mib=(peak - before) / 2**20,
                    method='torch.cuda.max_memory_allocated')
    before = _proc_status_kb('VmRSS')
    step()
    reset = _reset_peak_rss()
    step()
    peak = _proc_status_kb('VmHWM')
    return dict(peak_mib=peak / 1024, above_start_mib=(peak - before) / 1024,
                method='VmHWM after clear_refs reset' if reset else 'VmHWM of the whole process')


def _probe_cmd(args, name: str, variant: str) -> list:
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-probe', variant, '--models', name,
           '--batch', str(args.batch), '--size', str(args.size), '--device', args.device,
           '--threads', str(args.threads), '--out-dir', args.out_dir]
    return cmd + (['--amp'] if args.amp else [])


def _probe_result(name: str, variant: str, proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f'memory probe {name}/{variant} killed after {timeout:.0f} s '
                           f'(time guard)') from None
    for line in out.splitlines():
        if line.startswith(PROBE_TAG):
            return json.loads(line[len(PROBE_TAG):])
    raise RuntimeError(f'memory probe {name}/{variant} failed (exit {proc.returncode}):\n'
                       f'{err[-3000:]}')


def measure_memory(args, name: str, deadline: Optional[float] = None) -> dict:
    """{variant: [probe results]}: fresh subprocesses, in the order plain, doconv, doconv, plain,
    ... (with --mem-parallel each repetition's pair runs at once). Probes still running at the
    deadline are killed; ``'error'`` then says so and the lists hold what finished."""
    out = {'plain': [], 'doconv': [], 'error': None}
    for r in range(args.mem_reps):
        order = ['plain', 'doconv'] if r % 2 == 0 else ['doconv', 'plain']
        groups = [order] if args.mem_parallel else [[v] for v in order]
        for group in groups:
            left = None if deadline is None else deadline - time.time()
            if left is not None and left <= 0:
                out['error'] = out['error'] or 'time guard: memory probes not all run'
                return out
            procs = {v: subprocess.Popen(_probe_cmd(args, name, v), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True) for v in group}
            for variant, proc in procs.items():
                left = 600.0 if deadline is None else deadline - time.time()
                try:
                    res = _probe_result(name, variant, proc, left)
                except RuntimeError as err:
                    out['error'] = str(err)
                    continue
                print(f'  memory {name}/{variant}: peak {res["peak_mib"]:.0f} MiB, above start '
                      f'{res["above_start_mib"]:.0f} MiB ({res["method"]})', flush=True)
                out[variant].append(res)
    return out


# ------------------------------------------------------------------------------------------------
# Where the time goes: one profiled step per twin
# ------------------------------------------------------------------------------------------------
def _self_device_us(evt) -> float:
    for attr in ('self_device_time_total', 'self_cuda_time_total'):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def op_profile(steps: Dict[str, Callable[[], None]], device, rows: int = 15) -> str:
    """One ``torch.profiler`` step per twin (after the timed rounds, so warm): the operators
    behind the difference (largest extra self CPU time, DO-Conv - plain) and each twin's top
    operators by self CPU time, with call counts and device time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda'
                                           else [])
    stats, tables, kernel_ms = {}, {}, {}
    for variant, step in steps.items():
        step()
        synchronize(device)
        with profile(activities=activities) as prof:
            step()
            synchronize(device)
        averages = prof.key_averages()
        stats[variant] = {e.key: (e.count, e.self_cpu_time_total / 1e3, _self_device_us(e) / 1e3)
                          for e in averages}
        # device time once: the kernels' and copies' own entries (ops report theirs as well)
        kernel_ms[variant] = sum(_self_device_us(e) for e in averages
                                 if str(getattr(e, 'device_type', '')).endswith('CUDA')) / 1e3
        tables[variant] = averages.table(sort_by='self_cpu_time_total', row_limit=rows,
                                         max_name_column_width=60)
    totals = []
    for variant, st in stats.items():
        calls = sum(c for k, (c, _, _) in st.items() if k.startswith('aten::'))
        cpu_ms = sum(v[1] for v in st.values())
        totals.append([variant, calls, f'{cpu_ms:.1f}', f'{kernel_ms[variant]:.1f}'])
    names = set(stats['plain']) | set(stats['doconv'])
    zero = (0, 0.0, 0.0)
    delta = sorted(names, key=lambda k: stats['doconv'].get(k, zero)[1]
                   - stats['plain'].get(k, zero)[1], reverse=True)[:rows]
    diff_rows = []
    for k in delta:
        p, d = stats['plain'].get(k, zero), stats['doconv'].get(k, zero)
        diff_rows.append([f'`{k}`', p[0], d[0], f'{p[1]:.2f}', f'{d[1]:.2f}', f'{d[1] - p[1]:+.2f}',
                          f'{p[2]:.2f}', f'{d[2]:.2f}'])
    parts = [
        'One profiled step per twin (`torch.profiler`, activities '
        f'{"CPU + CUDA" if device.type == "cuda" else "CPU"}), taken after the timed rounds. '
        'Self CPU time is the host time spent in each operator itself (dispatch, launches, '
        'CPU kernels); device time is the GPU kernel time it launched. Profiling adds overhead, '
        'so the totals exceed the timed step.',
        md_table(['twin', 'aten calls', 'self CPU total ms', 'GPU kernel total ms'], totals),
        '#### Largest extra self CPU time, DO-Conv - plain\n\n' + md_table(
            ['operator', 'calls plain', 'calls DO-Conv', 'self CPU ms plain',
             'self CPU ms DO-Conv', 'Δ self CPU ms', 'device ms plain', 'device ms DO-Conv'],
            diff_rows)]
    for variant, table in tables.items():
        parts.append(f'#### Top operators by self CPU time: {variant}\n\n```\n{table.strip()}\n```')
    return '\n\n'.join(parts)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def verdict(ratio: float, target: float) -> str:
    return f'{"meets" if ratio <= target else "misses"} ≤ {target}'


def time_verdict(ratios, target: float) -> str:
    """Verdict on the median paired ratio, flagged when the quartiles straddle the target (the
    round-to-round noise is then larger than the margin, and more rounds or a quieter machine
    are needed to settle it)."""
    q1, med, q3 = quartiles(ratios)
    if q1 <= target < q3:
        return f'{verdict(med, target)} at the median; inconclusive (quartiles {q1:.3f}-{q3:.3f})'
    return verdict(med, target)


FUNCTION_TWIN = 'doconv_function'  # --function-twin's variant name


def function_twin(doconv_model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the DO-Conv twin (same weights) whose layers all train through the Function."""
    twin = copy.deepcopy(doconv_model)
    for layer in mm_models.doconv_layers(twin):
        layer._recompose_in_autograd = False
    return twin


def time_section(name, wall, cpu, device, events=None) -> (str, dict):
    """Table rows per clock and DO-Conv twin; summary keys '<clock>' etc. for the default twin,
    '<clock> function' etc. for the Function twin where it ran."""
    rows, summary = [], {}
    kinds = [('wall-clock', wall)]
    if device.type == 'cuda' and events:
        kinds.append(('CUDA events', events))
    if device.type == 'cpu':
        kinds.append(('process CPU', cpu))
    twins = [('doconv', '', 'DO-Conv')] + (
        [(FUNCTION_TWIN, ' function', 'DO-Conv, all layers through the Function')]
        if FUNCTION_TWIN in wall else [])
    for kind, times in kinds:
        ratios = paired_ratios(times, 'plain')
        for variant, suffix, label in twins:
            med, iqr = median_iqr(ratios[variant])
            delta_ms = (median_iqr(times[variant])[0] - median_iqr(times['plain'])[0]) * 1e3
            summary[kind + suffix] = med
            summary[kind + suffix + ' iqr'] = iqr
            summary[kind + suffix + ' delta ms'] = delta_ms
            rows.append([kind, label, fmt_med(times['plain']), fmt_med(times[variant]),
                         f'{med:.4f} (IQR {iqr:.4f})', f'{delta_ms:+.1f}',
                         time_verdict(ratios[variant], TARGET_TIME)])
    table = md_table(['time', 'twin', 'plain s/step', 'DO-Conv s/step', 'ratio DO-Conv / plain',
                      'Δ ms/step (medians)', 'target'], rows)
    return table, summary


def memory_section(mem) -> (str, dict):
    if not mem['plain'] or not mem['doconv']:
        why = mem.get('error') or 'not measured (--mem-reps 0)'
        return f'Not measured: {why}', {}
    rows, summary = [], {}
    for key, label in (('peak_mib', 'peak'), ('above_start_mib', 'peak above start')):
        p = [r[key] for r in mem['plain']]
        d = [r[key] for r in mem['doconv']]
        ratio = median_iqr(d)[0] / median_iqr(p)[0]
        summary[label] = ratio
        spread = lambda v: f'{median_iqr(v)[0]:.0f} (range {min(v):.0f}-{max(v):.0f})'  # noqa
        rows.append([label, spread(p), spread(d), f'{ratio:.4f}', verdict(ratio, TARGET_MEM)])
    table = md_table(['memory', 'plain MiB', 'DO-Conv MiB', 'ratio DO-Conv / plain', 'target'],
                     rows)
    note = f'\n\nNote: {mem["error"]}' if mem.get('error') else ''
    return table + f'\n\nMethod: {mem["plain"][0]["method"]}, {len(mem["plain"])} fresh ' \
                   f'process(es) per variant.' + note, summary


def results_file(args, device) -> str:
    """train_overhead[_<models>].md on the CPU (bf16 AMP: ..._bf16.md); ..._cuda.md and
    ..._cuda_amp.md on a GPU."""
    stem = results_name('train_overhead', args.models, DEFAULT_MODELS)[:-len('.md')]
    if device.type == 'cuda':
        stem += '_cuda' + ('_amp' if args.amp else '')
    elif args.amp:
        stem += '_bf16'
    return stem + '.md'


def resolve_model(name: str, device) -> (str, str):
    """(model actually run, note). Faster R-CNN needs RoIAlign/NMS on ``device``; where mmcv
    cannot serve them it runs without its RoI head (``faster_rcnn_rpn``), labelled so."""
    if name != 'faster_rcnn':
        return name, ''
    usable, how = mm_models.detector_ops(device)
    if usable:
        return name, f'Full model; RoIAlign and NMS from {how}.'
    return 'faster_rcnn_rpn', (
        f'**Run without its RoI head** (mmdet `RPN` detector: backbone + neck + RPN head, RPN '
        f'losses), because mmcv\'s RoIAlign/NMS cannot run on {device.type} here ({how}). The '
        f'DO-Conv layers (backbone + neck) are all there; the step lacks the RoI head\'s work, so '
        f'the ratio is not the full model\'s.')


def run_model(args, name: str, device, deadline: Optional[float]) -> (List[str], dict):
    """Time, profile and measure one model; returns (Markdown body parts, summary dict)."""
    ran, note = resolve_model(name, device)
    title = mm_models.TITLES[ran]
    summary = dict(model=name, ran=ran, title=title, note=note, reps_requested=args.reps)
    body = [f'## {title}'] + ([note] if note else [])
    torch.backends.cudnn.benchmark = mm_models.recipe_cudnn_benchmark(ran)
    if device.type == 'cuda':
        body.append(f'cudnn.benchmark = {torch.backends.cudnn.benchmark} (the recipe\'s '
                    f'`env_cfg.cudnn_benchmark`), for both twins and the memory probes.')
    profile_reserve = 15.0 if args.op_profile else 0.0
    if args.mem_reps:
        print(f'== {title}: peak memory', flush=True)
        mem_deadline = None if deadline is None else deadline - profile_reserve - 10.0
        mem = measure_memory(args, ran, mem_deadline)
    else:
        mem = {'plain': [], 'doconv': [], 'error': None}
    print(f'== {title}: timing', flush=True)
    twins = mm_models.build_twins(ran, device, size=args.size)
    if args.function_twin:
        twins[FUNCTION_TWIN] = function_twin(twins['doconv'])
    data = mm_models.synthetic_batch(ran, args.batch, args.size)
    steps = {v: mm_models.train_step_fn(m, data, mm_models.optim_wrapper(m, args.amp))
             for v, m in twins.items()}
    events = {} if device.type == 'cuda' else None
    timing_deadline = None if deadline is None else deadline - profile_reserve
    wall, cpu = interleaved_times(steps, args.reps, args.warmup, device, events=events,
                                  deadline=timing_deadline, gc_off=device.type == 'cuda')
    rounds = len(wall['plain'])
    summary['rounds'] = rounds
    t_table, t_sum = time_section(ran, wall, cpu, device, events)
    summary.update(t_sum)
    summary['plain ms'] = median_iqr(wall['plain'])[0] * 1e3
    summary['doconv ms'] = median_iqr(wall['doconv'])[0] * 1e3
    if FUNCTION_TWIN in wall:
        summary['function ms'] = median_iqr(wall[FUNCTION_TWIN])[0] * 1e3
    layers = mm_models.doconv_layers(twins['doconv'])
    partial = '' if rounds >= args.reps else (
        f'\n\n**Partial**: {rounds} of {args.reps} timed rounds (the time guard stopped it).')
    body += [f'{len(layers)} DO-Conv layers with D ({sum(m.D.numel() for m in layers)} D '
             f'parameters).',
             f'### Step time\n\n{rounds} timed round(s) after {args.warmup} warm-up round(s).'
             + partial + '\n\n' + t_table]
    implied = float('nan')
    if not args.no_profile:
        print(f'== {title}: composition profile', flush=True)
        try:
            from composition import profile_model, profile_tables
            plain_step = median_iqr(wall['plain'])[0]
            prof = profile_model(twins['doconv'], device, reps=3 if args.quick else 5)
            package_path = next(iter(prof.values()))
            implied = 1 + (package_path['fwd'] + package_path['bwd']) / plain_step
            body.append('### Where the overhead goes: kernel composition per step\n\n'
                        'Forward + backward of the composition alone, per trained DO-Conv layer '
                        '(median of repetitions, summed), and the step-time ratio it implies on '
                        'its own (1 + composition / plain step).\n\n'
                        + '\n\n'.join(profile_tables(prof, plain_step)))
        except Exception as err:  # noqa: BLE001 - report, keep the timing results
            body.append(f'### Composition profile\n\nFailed: `{type(err).__name__}: {err}`')
    summary['implied'] = implied
    if args.op_profile:
        print(f'== {title}: operator profile', flush=True)
        try:
            body.append('### Where the time goes: operators of one step\n\n'
                        + op_profile(steps, device))
        except Exception as err:  # noqa: BLE001 - report, keep the timing results
            body.append(f'### Operator profile\n\nFailed: `{type(err).__name__}: {err}`')
    del twins, steps
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    m_table, m_sum = memory_section(mem)
    body.append('### Peak memory\n\n' + m_table)
    summary.update({'mem ' + k: v for k, v in m_sum.items()})
    return body, summary


def summary_row(s: dict) -> list:
    def f(key):
        value = s.get(key)
        return 'n/a' if value is None or value != value else f'{value:.4f}'
    title = s.get('title', s['model'])
    if s.get('error'):
        return [title, 'failed', 'failed', 'n/a', 'n/a', 'n/a', 'n/a', 'n/a']
    if s.get('rounds', s['reps_requested']) < s['reps_requested']:
        title += f' (partial: {s["rounds"]}/{s["reps_requested"]} rounds)'
    return [title, f('wall-clock'), f('CUDA events') if 'CUDA events' in s else f('process CPU'),
            f'{s.get("wall-clock delta ms", float("nan")):+.1f}', f('implied'), f('mem peak'),
            f('mem peak above start'), f('wall-clock function')]


def main(argv=None):
    args = parse_args(argv)
    device = setup_run(args, cpu_amp=True)
    if args.op_profile is None:
        args.op_profile = device.type == 'cuda'
    if args.memory_probe:
        print(PROBE_TAG + json.dumps(memory_probe(args, device)), flush=True)
        return
    out = os.path.join(args.out_dir, results_file(args, device))
    intro = (
        'DO-Conv vs plain conv, one training step (mmengine `train_step`: preprocess, forward, '
        'loss, backward, SGD step), model-zoo configs, identical weights, synthetic batch of '
        f'{args.batch} images {args.size}×{args.size}. Targets (issue 5): time ratio ≤ '
        f'{TARGET_TIME}, peak-memory ratio ≤ {TARGET_MEM}.')
    setup_lines = [
        f'- Command: {command_line(sys.argv)}',
        f'- Timing: {args.warmup} warm-up + {args.reps} timed rounds per variant, '
        f'interleaved ABBA in one process; median (IQR); ratio = median of per-round ratios.'
        + (' On CUDA: wall-clock time bracketed by `torch.cuda.synchronize` and CUDA-event time '
           'of each step; Python\'s GC off inside timed steps.' if device.type == 'cuda' else ''),
        '- DO-Conv placement: Faster R-CNN backbone + neck (RPNHead takes no conv_cfg, '
        'Shared2FCBBoxHead has no convs); PSPNet backbone + decode head + auxiliary head '
        '(conv_seg stays plain). Faster R-CNN keeps its config\'s frozen stem + stage 1 '
        '(those DO-Conv layers compose without autograd). D ~ N(0, 0.01²). SyncBN → BN.',
        '- CUDA: `--device cuda` (fp32) and `--device cuda --amp` (AmpOptimWrapper, fp16); '
        + ('this run is on the GPU.' if device.type == 'cuda' else
           'this run is on the CPU (process CPU time is reported next to wall-clock'
           + ('; --amp on the CPU = bf16 autocast via BF16AmpOptimWrapper' if args.amp else '')
           + ').'),
    ]
    sections, summaries, failed = [], [], []

    def flush():
        rows = [summary_row(s) for s in summaries]
        second = 'step time (CUDA events)' if device.type == 'cuda' else 'step time (CPU)'
        table = md_table(['model', 'step time (wall)', second, 'Δ wall ms/step',
                          'step time implied by the composition alone', 'peak memory',
                          'peak memory above start',
                          'step time (wall), all layers through the Function'], rows)
        done = len(summaries) == len(args.models)
        head = '' if done else (f'**Incomplete run**: {len(summaries)} of {len(args.models)} '
                                f'models done when this file was written.\n\n')
        doc = [intro, '## Summary (ratios DO-Conv / plain, medians)\n\n' + head + table
               + f'\n\nTargets: time ≤ {TARGET_TIME}, memory ≤ {TARGET_MEM}.',
               '## Setup\n\n' + '\n'.join(setup_lines + environment_lines(args, device))]
        write_markdown(out, 'Training overhead of DO-Conv', doc + sections)
        print(SUMMARY_TAG + json.dumps(dict(file=out, precision=precision_label(args, device),
                                            device=str(device), models=summaries)),
              flush=True)

    for i, name in enumerate(args.models):
        model_deadline = None if args.deadline is None else \
            time.time() + (args.deadline - time.time()) / (len(args.models) - i)
        try:
            body, summary = run_model(args, name, device, model_deadline)
        except Exception as err:  # noqa: BLE001 - keep the other models' results
            import traceback
            failed.append(name)
            summary = dict(model=name, title=mm_models.TITLES.get(name, name),
                           reps_requested=args.reps, error=f'{type(err).__name__}: {err}')
            body = [f'## {mm_models.TITLES.get(name, name)}',
                    'Failed:\n\n```\n' + traceback.format_exc()[-2500:] + '\n```']
            traceback.print_exc()
        sections.append('\n\n'.join(body))
        summaries.append(summary)
        gc.collect()
        flush()
    if failed:
        raise SystemExit(f'train_overhead: failed for {", ".join(failed)} (see {out}).')


if __name__ == '__main__':
    main()
