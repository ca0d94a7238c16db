"""How DO-Conv's training overhead scales with batch size and resolution.

Kernel composition runs once per layer and step, whatever the batch and image size, while the
convolutions grow with both; so the extra seconds per step should stay about constant and the time
ratio should fall towards 1 as the work per step grows. Measured on a cheaper model than
train_overhead.py: the ResNet-50 backbone alone as configured in Faster R-CNN R50-FPN (mmdet
ResNet, frozen stem + stage 1, norm_eval), plain vs ``conv_cfg=dict(type='DOConv')``, identical
weights, D ~ N(0, 0.01²). Step = forward, loss = sum of the four stage outputs' means,
backward, SGD step. Every (batch, size) point is timed interleaved (ABBA) in one process.

Writes bench/results/overhead_scaling.md, overhead_scaling.png and overhead_scaling.json.
"""
from bench_utils import add_common_args, command_line, environment_lines, md_table, median_iqr, \
    paired_ratios, quartiles, setup_run, write_markdown, \
    interleaved_times  # first: sets OMP_WAIT_POLICY before torch loads OpenMP

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

import mm_models  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[128, 256, 384, 512],
                        help='image sides at --base-batch (default 128 256 384 512)')
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 2, 4],
                        help='batch sizes at --base-size (default 1 2 4)')
    parser.add_argument('--base-batch', type=int, default=2)
    parser.add_argument('--base-size', type=int, default=256)
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.sizes, args.batches = 2, [128, 256], [1, 2]
    return args


def backbone_twins(device):
    """Plain / DO-Conv R50 backbones of the Faster R-CNN config, identical weights."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope
    register_all_modules(init_default_scope=False)
    base = mm_models.model_cfg('faster_rcnn', doconv=False).backbone
    twins = {}
    for variant in ('plain', 'doconv'):
        cfg = copy.deepcopy(base)
        if variant == 'doconv':
            cfg.conv_cfg = dict(type='DOConv')
        torch.manual_seed(0)
        with DefaultScope.overwrite_default_scope('mmdet'):
            twins[variant] = MODELS.build(cfg).to(device)
        twins[variant].train()
    twins['doconv'].load_state_dict(twins['plain'].state_dict())
    mm_models.randomize_D(twins['doconv'])
    return twins


def step_fn(model, x, opt, amp: bool = False):
    """One step; with ``amp`` (CUDA): fp16 autocast forward and a GradScaler, as AMP training."""
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp)

    def step():
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
            loss = sum(out.float().mean() for out in model(x))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def measure(args, device, twins, batch, size):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    opts = {v: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4,
                               momentum=0.9) for v, m in twins.items()}
    steps = {v: step_fn(m, x, opts[v], args.amp) for v, m in twins.items()}
    print(f'== batch {batch}, {size}x{size}', flush=True)
    wall, _ = interleaved_times(steps, args.reps, args.warmup, device)
    ratio_q = quartiles(paired_ratios(wall, 'plain')['doconv'])
    extra = [d - p for p, d in zip(wall['plain'], wall['doconv'])]
    return dict(batch=batch, size=size, pixels=batch * size * size,
                plain=median_iqr(wall['plain']), doconv=median_iqr(wall['doconv']),
                ratio=ratio_q, extra=quartiles(extra))


def plot(points, composition_s, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for series, marker, label in (('size', 'o', 'resolution sweep'),
                                  ('batch', 's', 'batch sweep')):
        pts = sorted((p for p in points if p['series'] == series), key=lambda p: p['pixels'])
        xs = [p['pixels'] / 1e6 for p in pts]
        for ax, key, scale in ((axes[0], 'ratio', 1.0), (axes[1], 'extra', 1e3)):
            med = [p[key][1] * scale for p in pts]
            err = [[(p[key][1] - p[key][0]) * scale for p in pts],
                   [(p[key][2] - p[key][1]) * scale for p in pts]]
            ax.errorbar(xs, med, yerr=err, marker=marker, capsize=3, label=label)
            for p, x, y in zip(pts, xs, med):
                ax.annotate(f'{p["batch"]}×{p["size"]}²', (x, y), fontsize=7,
                            textcoords='offset points', xytext=(4, 4))
    axes[0].axhline(1.0, color='gray', lw=0.8)
    axes[0].set_ylabel('step time ratio DO-Conv / plain (median, IQR)')
    axes[1].axhline(composition_s * 1e3, color='tab:red', ls='--',
                    label='composition fwd+bwd alone')
    axes[1].set_ylabel('extra time per step, ms (median, IQR)')
    for ax in axes:
        ax.set_xlabel('pixels per step (batch × H × W), millions')
        ax.set_xscale('log')
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({round(p['pixels'] / 1e6, 2) for p in points}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle('DO-Conv training overhead vs work per step (ResNet-50 backbone, CPU)',
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f'wrote {path}')


def main(argv=None):
    from composition import compose_training_path, profile_model
    args = parse_args(argv)
    device = setup_run(args)
    twins = backbone_twins(device)
    grid = [('size', args.base_batch, s) for s in args.sizes]
    grid += [('batch', b, args.base_size) for b in args.batches if b != args.base_batch]
    points = []
    for series, batch, size in grid:
        point = measure(args, device, twins, batch, size)
        point['series'] = series
        points.append(point)
    measured = sorted(points, key=lambda p: p['pixels'])
    for p in measured:  # the base point belongs to both sweeps (plot only)
        if p['series'] == 'size' and p['size'] == args.base_size:
            points.append(dict(p, series='batch'))
            break
    prof = profile_model(twins['doconv'], device, reps=3 if args.quick else 5,
                         candidates={'training path': compose_training_path})['training path']
    composition_s = prof['fwd'] + prof['bwd']
    with open(os.path.join(args.out_dir, 'overhead_scaling.json'), 'w') as f:
        json.dump(dict(points=measured, composition_s=composition_s), f, indent=1)  # raw numbers
    png = os.path.join(args.out_dir, 'overhead_scaling.png')
    plot(points, composition_s, png)
    rows = [[p['batch'], f'{p["size"]}×{p["size"]}', f'{p["pixels"] / 1e6:.2f}',
             f'{p["plain"][0]:.3f} ({p["plain"][1]:.3f})',
             f'{p["doconv"][0]:.3f} ({p["doconv"][1]:.3f})',
             f'{p["ratio"][1]:.4f} ({p["ratio"][2] - p["ratio"][0]:.4f})',
             f'{p["extra"][1] * 1e3:.0f} ({(p["extra"][2] - p["extra"][0]) * 1e3:.0f})']
            for p in measured]
    sections = [
        'Training-step overhead of DO-Conv as the work per step grows, on the ResNet-50 backbone '
        'alone (Faster R-CNN\'s backbone config; cheaper than the full detectors of '
        '[train_overhead.md](train_overhead.md)). Composition cost is fixed per step, so the '
        'extra milliseconds should stay flat and the ratio should fall with batch × resolution.',
        '## Setup\n\n' + '\n'.join([
            f'- Command: {command_line(sys.argv)}',
            f'- {args.warmup} warm-up + {args.reps} timed rounds per point and variant, '
            f'interleaved ABBA; wall-clock; median (IQR).',
            '- Step: forward, loss = Σ mean(stage outputs), backward, SGD step (momentum 0.9).',
        ] + environment_lines(args, device)),
        '## Results\n\n![overhead scaling](overhead_scaling.png)\n\n' + md_table(
            ['batch', 'image', 'Mpixels/step', 'plain s/step (IQR)', 'DO-Conv s/step (IQR)',
             'ratio (IQR)', 'extra ms/step (IQR)'], rows)
        + f'\n\nComposition forward + backward alone ({len(prof["layers"])} trained layers, '
          f'medians summed): '
          f'{composition_s * 1e3:.0f} ms per step.',
    ]
    write_markdown(os.path.join(args.out_dir, 'overhead_scaling.md'),
                   'DO-Conv training overhead vs batch size and resolution', sections)


if __name__ == '__main__':
    main()
