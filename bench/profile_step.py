"""Which operators make up DO-Conv's training overhead: torch.profiler, op by op.

Profiles ``--steps`` training steps of the plain and DO-Conv ResNet-50 backbone twins (as in
overhead_scaling.py) after a warm-up step, alternating the twins, and lists the operators whose
total self CPU time grows most from plain to DO-Conv. Complements composition.py (which times
the composition in isolation) by showing the overhead inside a real step, allocation and
gradient-accumulation effects included.

Writes bench/results/profile_step.md.
"""
from bench_utils import add_common_args, command_line, environment_lines, md_table, setup_run, \
    write_markdown  # first: sets OMP_WAIT_POLICY before torch loads OpenMP

import argparse  # noqa: E402
import collections  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from overhead_scaling import backbone_twins, step_fn  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--steps', type=int, default=3, help='profiled steps per twin')
    parser.add_argument('--top', type=int, default=12, help='operators listed')
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 1
    return args


def main(argv=None):
    args = parse_args(argv)
    device = setup_run(args)
    twins = backbone_twins(device)
    x = torch.randn(args.batch, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(0)).to(device)
    steps = {v: step_fn(m, x, torch.optim.SGD([p for p in m.parameters() if p.requires_grad],
                                                 lr=1e-4, momentum=0.9), args.amp)
             for v, m in twins.items()}
    for step in steps.values():
        step()  # warm-up (optimizer state, allocator)
    totals = {v: collections.Counter() for v in steps}
    counts = {v: collections.Counter() for v in steps}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == 'cuda' else [])
    for r in range(args.steps):
        for variant in (['plain', 'doconv'] if r % 2 == 0 else ['doconv', 'plain']):
            with profile(activities=activities) as prof:
                steps[variant]()
            for evt in prof.key_averages():
                totals[variant][evt.key] += evt.self_cpu_time_total / 1e3 / args.steps  # ms
                counts[variant][evt.key] += evt.count / args.steps
    plain_ms, do_ms = sum(totals['plain'].values()), sum(totals['doconv'].values())
    keys = set(totals['plain']) | set(totals['doconv'])
    diff = sorted(keys, key=lambda k: -(totals['doconv'][k] - totals['plain'][k]))[:args.top]
    rows = [[f'`{k}`', f'{counts["plain"][k]:.0f}', f'{counts["doconv"][k]:.0f}',
             f'{totals["plain"][k]:.1f}', f'{totals["doconv"][k]:.1f}',
             f'{totals["doconv"][k] - totals["plain"][k]:+.1f}'] for k in diff]
    sections = [
        f'torch.profiler self CPU time per training step, ResNet-50 backbone twins (batch '
        f'{args.batch}, {args.size}×{args.size}), mean of {args.steps} profiled steps per twin '
        f'after a warm-up step. Profiler overhead inflates small ops alike in both twins.',
        '## Setup\n\n' + '\n'.join([f'- Command: {command_line(sys.argv)}']
                                   + environment_lines(args, device)),
        f'## Totals\n\nSum of self CPU time: plain {plain_ms:.0f} ms, DO-Conv {do_ms:.0f} ms '
        f'(+{do_ms - plain_ms:.0f} ms, ratio {do_ms / plain_ms:.3f}).',
        '## Operators with the largest increase\n\n' + md_table(
            ['operator', 'calls plain', 'calls DO-Conv', 'plain ms', 'DO-Conv ms', 'increase ms'],
            rows),
    ]
    write_markdown(os.path.join(args.out_dir, 'profile_step.md'),
                   'DO-Conv training overhead by operator', sections)


if __name__ == '__main__':
    main()
