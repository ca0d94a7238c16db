"""Does DO-Conv help a small CNN on real data? Plain conv vs DO-Conv on scikit-learn's digits.

Data: ``sklearn.datasets.load_digits`` (1797 real 8×8 handwritten digits, shipped inside
scikit-learn, nothing downloaded), one fixed stratified train/test split (75/25, random_state=0).
Optionally only a stratified fraction of the training split is used (``--train-fractions``).

Model: 4 conv3×3-BN-ReLU layers (32, 32, pool, 64, 64), global average pool, linear classifier.
The twins differ only in the conv class (``nn.Conv2d`` vs ``do_conv_mm.DOConv2d``, default
D_mul = 9). Per seed they start from identical weights (the DO-Conv twin strict-loads the plain
twin's state dict, D = 0, so both compute the same function at step 0), see the same mini-batch
order (one shared shuffling generator seed) and use the same recipe (SGD momentum 0.9, cosine LR,
weight decay on every parameter, no augmentation; a fraction of the data is trained for
proportionally more epochs). ``--threads`` defaults to 1 here: the
tensors are tiny, and extra threads only add synchronisation. Only the parameterisation differs.

Writes bench/results/digits_study.md, digits_curves.png and digits_study.json (raw curves).
"""
from bench_utils import (add_common_args, command_line, environment_lines,  # first: sets
                         md_table, mean_std, paired_test,  # OMP_WAIT_POLICY before torch
                         setup_run, write_markdown)  # loads OpenMP

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, default=10, help='number of seeds (>= 5; default 10)')
    parser.add_argument('--epochs', type=int, default=20, help='training epochs (default 20)')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--lr', type=float, default=0.05)
    parser.add_argument('--weight-decay', type=float, default=5e-4)
    parser.add_argument('--train-fractions', type=float, nargs='+', default=[1.0, 0.1],
                        help='fractions of the training split to train on (default 1.0 0.1)')
    # Tiny 8×8 tensors: one thread is fastest, and immune to oversubscription on a busy machine.
    add_common_args(parser, threads=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 5, 10
    if args.amp:
        parser.error('--amp does not apply to the digits study (8×8 inputs, fp32 recipe).')
    if args.seeds < 5:
        parser.error(f'--seeds must be >= 5 for a mean ± std to mean anything, got {args.seeds}.')
    for frac in args.train_fractions:
        if not 0 < frac <= 1:
            parser.error(f'--train-fractions values must be in (0, 1], got {frac}.')
    return args


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def load_split(device: torch.device):
    """(x_train, y_train, x_test, y_test): x (N, 1, 8, 8) float32 standardised with train stats."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.images, digits.target, test_size=0.25,
                                              stratify=digits.target, random_state=0)
    x_tr = torch.tensor(x_tr, dtype=torch.float32).unsqueeze(1)
    x_te = torch.tensor(x_te, dtype=torch.float32).unsqueeze(1)
    mean, std = x_tr.mean(), x_tr.std()
    to = dict(device=device)
    return ((x_tr - mean) / std).to(**to), torch.tensor(y_tr).to(**to), \
        ((x_te - mean) / std).to(**to), torch.tensor(y_te).to(**to)


def subsample(x, y, fraction: float):
    """A stratified ``fraction`` of (x, y), fixed (random_state=0) for every seed."""
    if fraction >= 1:
        return x, y
    from sklearn.model_selection import train_test_split
    idx = torch.arange(len(y))
    keep, _ = train_test_split(idx.numpy(), train_size=fraction, stratify=y.cpu().numpy(),
                               random_state=0)
    keep = torch.as_tensor(keep, device=x.device)
    return x[keep], y[keep]


# ------------------------------------------------------------------------------------------------
# Model and training
# ------------------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """(N, 1, 8, 8) -> (N, 10) logits; ``conv`` is the 3×3 conv class (Conv2d or DOConv2d)."""

    def __init__(self, conv=nn.Conv2d):
        super().__init__()
        widths = [(1, 32), (32, 32), (32, 64), (64, 64)]
        layers = []
        for i, (cin, cout) in enumerate(widths):
            layers += [conv(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
            if i == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def epoch_budget(epochs: int, fraction: float) -> int:
    """Epochs on a ``fraction`` of the data: ``epochs / fraction``, i.e. about equal SGD steps."""
    return max(1, round(epochs / fraction))


def make_twins(seed: int, device: torch.device):
    """Plain and DO-Conv models with identical weights (D = 0: same function at step 0)."""
    from do_conv_mm import DOConv2d
    torch.manual_seed(seed)
    plain = DigitsCNN(nn.Conv2d).to(device)
    doconv = DigitsCNN(DOConv2d).to(device)
    doconv.load_state_dict(plain.state_dict())  # plain source: D stays zero
    return {'plain': plain, 'doconv': doconv}


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train_curves(model, data, args, seed: int, epochs: int):
    """Train with the shared recipe; returns per-epoch train loss, test accuracy, seconds."""
    x_tr, y_tr, x_te, y_te = data
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                          weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(y_tr) / args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)  # same mini-batch order for both twins
    losses, accs = [], []
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=order).to(y_tr.device)
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / len(perm))
        accs.append(accuracy(model, x_te, y_te))
    return losses, accs, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def plot_curves(results, args, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fracs = list(results)
    fig, axes = plt.subplots(2, len(fracs), figsize=(5.5 * len(fracs), 7), squeeze=False)
    colors = {'plain': 'tab:blue', 'doconv': 'tab:red'}
    labels = {'plain': 'plain conv', 'doconv': 'DO-Conv'}
    for col, frac in enumerate(fracs):
        for row, key in enumerate(('loss', 'acc')):
            ax = axes[row][col]
            for variant in ('plain', 'doconv'):
                runs = torch.tensor([r[key] for r in results[frac][variant]], dtype=torch.float64)
                epochs = range(1, runs.shape[1] + 1)
                if key == 'acc':  # arithmetic mean ± std
                    mid, std = runs.mean(0) * 100, runs.std(0) * 100
                    low, high = mid - std, mid + std
                else:  # loss on a log axis: geometric mean ×/÷ geometric std
                    logs = runs.clamp_min(1e-12).log()
                    mid, spread = logs.mean(0).exp(), logs.std(0).exp()
                    low, high = mid / spread, mid * spread
                ax.plot(epochs, mid, color=colors[variant], label=labels[variant])
                ax.fill_between(epochs, low, high, color=colors[variant], alpha=0.2)
            ax.set_xlabel('epoch')
            ax.set_ylabel('train loss' if key == 'loss' else 'test accuracy (%)')
            if key == 'loss':
                ax.set_yscale('log')
            else:
                ax.set_ylim(80, 100)
            stat = 'mean ± std' if key == 'acc' else 'geometric mean ×/÷ geometric std'
            ax.set_title(f'digits, {frac:.0%} of train split, {stat} over {args.seeds} seeds',
                         fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f'wrote {path}')


def main(argv=None):
    args = parse_args(argv)
    device = setup_run(args)
    x_tr, y_tr, x_te, y_te = load_split(device)
    results = {}
    for frac in args.train_fractions:
        xs, ys = subsample(x_tr, y_tr, frac)
        data = (xs, ys, x_te, y_te)
        epochs = epoch_budget(args.epochs, frac)
        results[frac] = {'plain': [], 'doconv': []}
        for seed in range(args.seeds):
            twins = make_twins(seed, device)
            order = ['plain', 'doconv'] if seed % 2 == 0 else ['doconv', 'plain']  # interleave
            for variant in order:
                losses, accs, secs = train_curves(twins[variant], data, args, seed, epochs)
                results[frac][variant].append(dict(loss=losses, acc=accs, secs=secs))
            print(f'train fraction {frac:g}, seed {seed}: plain '
                  f'{results[frac]["plain"][-1]["acc"][-1]:.4f}, DO-Conv '
                  f'{results[frac]["doconv"][-1]["acc"][-1]:.4f}', flush=True)

    rows, seed_rows, tests = [], [], []
    for frac, res in results.items():
        final = {v: [r['acc'][-1] * 100 for r in res[v]] for v in res}
        best = {v: [max(r['acc']) * 100 for r in res[v]] for v in res}
        secs = {v: [r['secs'] for r in res[v]] for v in res}
        diff = [d - p for p, d in zip(final['plain'], final['doconv'])]
        wins = sum(d > 0 for d in diff), sum(d == 0 for d in diff), sum(d < 0 for d in diff)
        for v, name in (('plain', 'plain conv'), ('doconv', 'DO-Conv')):
            m, s = mean_std(final[v])
            bm, bs = mean_std(best[v])
            rows.append([f'{frac:.0%} ({len(subsample(x_tr, y_tr, frac)[1])} images, '
                         f'{epoch_budget(args.epochs, frac)} epochs)', name,
                         f'{m:.2f} ± {s:.2f}', f'{bm:.2f} ± {bs:.2f}',
                         f'{statistics.median(secs[v]):.2f}'])
        dm, ds = mean_std(diff)
        tests.append(f'- {frac:.0%} of the train split: DO-Conv − plain final accuracy = '
                     f'{dm:+.2f} ± {ds:.2f} points (per-seed pairs; DO-Conv better / tie / worse '
                     f'in {wins[0]} / {wins[1]} / {wins[2]} of {len(diff)} seeds); '
                     f'{paired_test(final["plain"], final["doconv"])}.')
        for seed, (p, d) in enumerate(zip(final['plain'], final['doconv'])):
            seed_rows.append([f'{frac:.0%}', seed, f'{p:.2f}', f'{d:.2f}', f'{d - p:+.2f}'])

    with open(os.path.join(args.out_dir, 'digits_study.json'), 'w') as f:
        json.dump({f'{frac:g}': res for frac, res in results.items()}, f)  # raw curves
    png = os.path.join(args.out_dir, 'digits_curves.png')
    plot_curves(results, args, png)
    n_test = len(y_te)
    sections = [
        'Plain conv vs DO-Conv twins on scikit-learn\'s digits (real 8×8 handwritten digits, '
        f'{len(y_tr)} train / {n_test} test images, fixed stratified split). Identical initial '
        'weights, mini-batch order and recipe per seed; only the conv parameterisation differs. '
        f'One test image is {100 / n_test:.2f} accuracy points.',
        '## Setup\n\n' + '\n'.join([
            f'- Command: {command_line(sys.argv)}',
            '- Model: 4× conv3×3-BN-ReLU (32, 32, maxpool, 64, 64), global average pool, linear; '
            'DO-Conv with D_mul = 9 (default), D = 0 at init.',
            f'- Recipe: {args.epochs} epochs on the full train split and {args.epochs} / fraction '
            f'on a fraction (about the same number of SGD steps), batch {args.batch_size}, '
            f'SGD lr {args.lr} momentum '
            f'0.9, weight decay {args.weight_decay} (all parameters, D included), cosine schedule '
            f'per step, no augmentation; seeds 0..{args.seeds - 1}.',
        ] + environment_lines(args, torch.device(args.device))),
        '## Test accuracy (%), mean ± std over seeds\n\n' + md_table(
            ['train data', 'variant', 'final-epoch accuracy', 'best-epoch accuracy',
             'median train seconds'], rows)
        + '\n\nBest-epoch accuracy peeks at the test set and is shown only as a curve summary; '
          'the final-epoch number is the result.',
        '## Paired comparison\n\n' + '\n'.join(tests),
        '## Curves\n\n![training curves](digits_curves.png)\n\nPer epoch: training loss '
        '(log scale; geometric mean ×/÷ geometric std over seeds) and test accuracy '
        '(mean ± std). Raw per-seed curves: [digits_study.json](digits_study.json).',
        '## Per seed (final-epoch accuracy, %)\n\n' + md_table(
            ['train data', 'seed', 'plain', 'DO-Conv', 'difference'], seed_rows),
    ]
    write_markdown(os.path.join(args.out_dir, 'digits_study.md'),
                   'DO-Conv vs plain conv on scikit-learn digits', sections)


if __name__ == '__main__':
    main()
