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

Also profiles where the overhead goes (composition forward/backward per layer, composition.py).
Writes bench/results/train_overhead.md.
"""
from bench_utils import add_common_args, command_line, environment_lines, fmt_med, md_table, \
    median_iqr, paired_ratios, quartiles, setup_run, write_markdown, results_name, \
    interleaved_times  # first: sets OMP_WAIT_POLICY before torch loads OpenMP

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

import mm_models  # noqa: E402

TARGET_TIME, TARGET_MEM = 1.02, 1.05
PROBE_TAG = 'MEMORY_PROBE '


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
                        help='fresh subprocesses per variant for peak memory')
    parser.add_argument('--no-profile', action='store_true', help='skip the composition profile')
    parser.add_argument('--memory-probe', choices=['plain', 'doconv'],
                        help=argparse.SUPPRESS)  # internal: run in a fresh subprocess
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.mem_reps = 3, 1, 1
    for name in ('batch', 'size', 'reps', 'mem_reps'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}.')
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
    model = mm_models.build_model(name, variant == 'doconv', device)
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


def run_memory_probe(args, name: str, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-probe', variant, '--models', name,
           '--batch', str(args.batch), '--size', str(args.size), '--device', args.device,
           '--threads', str(args.threads), '--out-dir', args.out_dir]
    if args.amp:
        cmd.append('--amp')
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(PROBE_TAG):
            return json.loads(line[len(PROBE_TAG):])
    raise RuntimeError(f'memory probe {name}/{variant} failed (exit {proc.returncode}):\n'
                       f'{proc.stderr[-3000:]}')


def measure_memory(args, name: str) -> dict:
    """{variant: [probe results]}, subprocesses interleaved plain, doconv, doconv, plain, ..."""
    out = {'plain': [], 'doconv': []}
    for r in range(args.mem_reps):
        for variant in (['plain', 'doconv'] if r % 2 == 0 else ['doconv', 'plain']):
            res = run_memory_probe(args, name, variant)
            print(f'  memory {name}/{variant}: peak {res["peak_mib"]:.0f} MiB, above start '
                  f'{res["above_start_mib"]:.0f} MiB ({res["method"]})', flush=True)
            out[variant].append(res)
    return out


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


def time_section(name, wall, cpu, device) -> (str, dict):
    rows, summary = [], {}
    kinds = [('wall-clock', wall)] + ([('process CPU', cpu)] if device.type == 'cpu' else [])
    for kind, times in kinds:
        ratios = paired_ratios(times, 'plain')
        med, iqr = median_iqr(ratios['doconv'])
        summary[kind] = med
        rows.append([kind, fmt_med(times['plain']), fmt_med(times['doconv']),
                     f'{med:.4f} (IQR {iqr:.4f})', time_verdict(ratios['doconv'], TARGET_TIME)])
    table = md_table(['time', 'plain s/step', 'DO-Conv s/step', 'ratio DO-Conv / plain',
                      'target'], rows)
    return table, summary


def memory_section(mem) -> (str, dict):
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
    return table + f'\n\nMethod: {mem["plain"][0]["method"]}, {len(mem["plain"])} fresh ' \
                   f'process(es) per variant.', summary


def main(argv=None):
    args = parse_args(argv)
    device = setup_run(args)
    if args.memory_probe:
        print(PROBE_TAG + json.dumps(memory_probe(args, device)), flush=True)
        return
    from composition import profile_model, profile_tables
    sections = [
        'DO-Conv vs plain conv, one training step (mmengine `train_step`: preprocess, forward, '
        'loss, backward, SGD step), model-zoo configs, identical weights, synthetic batch of '
        f'{args.batch} images {args.size}×{args.size}. Targets (issue 5): time ratio ≤ '
        f'{TARGET_TIME}, peak-memory ratio ≤ {TARGET_MEM}.',
        '## Setup\n\n' + '\n'.join([
            f'- Command: {command_line(sys.argv)}',
            f'- Timing: {args.warmup} warm-up + {args.reps} timed rounds per variant, '
            f'interleaved ABBA in one process; median (IQR); ratio = median of per-round ratios.',
            '- DO-Conv placement: Faster R-CNN backbone + neck (RPNHead takes no conv_cfg, '
            'Shared2FCBBoxHead has no convs); PSPNet backbone + decode head + auxiliary head '
            '(conv_seg stays plain). Faster R-CNN keeps its config\'s frozen stem + stage 1 '
            '(those DO-Conv layers compose without autograd). D ~ N(0, 0.01²).',
            '- CUDA: `--device cuda` (fp32) and `--device cuda --amp` (AmpOptimWrapper, fp16); '
            + ('this run is on the GPU.' if device.type == 'cuda' else
               'this run is on the CPU (process CPU time is reported next to wall-clock).'),
        ] + environment_lines(args, device)),
    ]
    summary_rows = []
    for name in args.models:
        title = mm_models.TITLES[name]
        print(f'== {title}: timing', flush=True)
        twins = mm_models.build_twins(name, device)
        data = mm_models.synthetic_batch(name, args.batch, args.size)
        steps = {v: mm_models.train_step_fn(m, data, mm_models.optim_wrapper(m, args.amp))
                 for v, m in twins.items()}
        wall, cpu = interleaved_times(steps, args.reps, args.warmup, device)
        t_table, t_sum = time_section(name, wall, cpu, device)
        layers = mm_models.doconv_layers(twins['doconv'])
        body = [f'## {title}', f'{len(layers)} DO-Conv layers with D '
                f'({sum(m.D.numel() for m in layers)} D parameters).',
                '### Step time\n\n' + t_table]
        implied = float('nan')
        if not args.no_profile:
            print(f'== {title}: composition profile', flush=True)
            plain_step = median_iqr(wall['plain'])[0]
            prof = profile_model(twins['doconv'], device, reps=3 if args.quick else 5)
            package_path = next(iter(prof.values()))
            implied = 1 + (package_path['fwd'] + package_path['bwd']) / plain_step
            body.append('### Where the overhead goes: kernel composition per step\n\n'
                        'Forward + backward of the composition alone, per trained DO-Conv layer '
                        '(median of repetitions, summed), and the step-time ratio it implies on '
                        'its own (1 + composition / plain step).\n\n'
                        + '\n\n'.join(profile_tables(prof, plain_step)))
        del twins, steps
        gc.collect()
        print(f'== {title}: peak memory', flush=True)
        m_table, m_sum = memory_section(measure_memory(args, name))
        body.append('### Peak memory\n\n' + m_table)
        sections.append('\n\n'.join(body))
        summary_rows.append([title, f'{t_sum["wall-clock"]:.4f}',
                             f'{t_sum.get("process CPU", float("nan")):.4f}', f'{implied:.4f}',
                             f'{m_sum["peak"]:.4f}', f'{m_sum["peak above start"]:.4f}'])
    sections.insert(1, '## Summary (ratios DO-Conv / plain, medians)\n\n' + md_table(
        ['model', 'step time (wall)', 'step time (CPU)',
         'step time implied by the composition alone', 'peak memory',
         'peak memory above start'], summary_rows)
        + f'\n\nTargets: time ≤ {TARGET_TIME}, memory ≤ {TARGET_MEM}.')
    out = results_name('train_overhead', args.models, DEFAULT_MODELS)
    write_markdown(os.path.join(args.out_dir, out), 'Training overhead of DO-Conv', sections)


if __name__ == '__main__':
    main()
