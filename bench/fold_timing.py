"""How long the fold tool takes on an R50 detector checkpoint, and where the time goes.

Makes a training-style DO-Conv checkpoint of Faster R-CNN R50-FPN (the project config
configs/mmdet/faster-rcnn_r50-doconv_fpn_1x_coco.py: DO-Conv in backbone, neck and RPN conv;
random D ~ N(0, 0.01²); ``meta`` + ``state_dict`` + SGD ``optimizer`` state with momentum
buffers, as mmengine's Runner saves it), then runs the command-line tool
``python tools/fold_doconv.py CONFIG CKPT OUT`` ``--reps`` times, each in a fresh process, as a
user would. Reports the end-to-end wall time and the tool's own per-stage timings (load, fold,
save: it prints them); the remainder is interpreter start, imports, config parsing and building
the model. One run with ``--verify`` shows what verification adds.

Writes bench/results/fold_timing.md.
"""
from bench_utils import add_common_args, command_line, environment_lines, md_table, median_iqr, \
    setup_run, write_markdown  # first: sets OMP_WAIT_POLICY before torch loads OpenMP

import argparse  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'mmdet', 'faster-rcnn_r50-doconv_fpn_1x_coco.py')
TOOL = os.path.join(REPO, 'tools', 'fold_doconv.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default=CONFIG, help='DO-Conv training config (default: '
                        'the project Faster R-CNN R50-FPN config)')
    parser.add_argument('--reps', type=int, default=3, help='tool runs (fresh processes)')
    parser.add_argument('--no-verify-run', action='store_true',
                        help='skip the extra run with --verify')
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps = 1
    return args


def make_checkpoint(config: str, path: str) -> dict:
    """Save a Runner-style DO-Conv checkpoint of ``config``; returns facts about it."""
    from mmengine.config import Config
    from do_conv_mm.deploy import build_model
    import mm_models
    torch.manual_seed(0)
    model = build_model(Config.fromfile(config))
    n_layers = mm_models.randomize_D(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    for group in optimizer.param_groups:
        for p in group['params']:
            optimizer.state[p]['momentum_buffer'] = torch.randn_like(p) * 1e-3
    ckpt = dict(meta=dict(epoch=12, iter=87960, seed=0, mmengine_version='0.10.7'),
                state_dict=model.state_dict(), optimizer=optimizer.state_dict())
    torch.save(ckpt, path)
    n_params = sum(v.numel() for v in ckpt['state_dict'].values())
    return dict(layers=n_layers, params=n_params, mib=os.path.getsize(path) / 2**20)


def run_tool(args, ckpt: str, out: str, verify: bool = False) -> dict:
    cmd = [sys.executable, TOOL, args.config, ckpt, out]
    if verify:
        cmd.append('--verify')
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
               OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    stages = {k: float(v) for k, v in re.findall(r'(\w+) ([0-9.]+)s', proc.stdout)}
    if not {'load', 'fold', 'save'} <= set(stages):
        raise RuntimeError(f'could not read the stage timings from the tool output:\n'
                           f'{proc.stdout[-2000:]}')
    os.remove(out)
    return dict(total=total, **stages)


def main(argv=None):
    args = parse_args(argv)
    device = setup_run(args)
    if device.type != 'cpu':
        raise SystemExit('fold_timing.py measures the CPU fold tool; use --device cpu.')
    if not os.path.isfile(TOOL):
        raise SystemExit(f'{TOOL} not found; this benchmark times the fold tool.')
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, 'faster-rcnn_r50-doconv_fpn_1x_coco_epoch_12.pth')
        facts = make_checkpoint(args.config, ckpt)
        print(f'checkpoint: {facts}', flush=True)
        runs = []
        for r in range(args.reps):
            runs.append(run_tool(args, ckpt, os.path.join(tmp, 'folded.pth')))
            print(f'  run {r + 1}: {runs[-1]}', flush=True)
        verify = None
        if not args.no_verify_run:
            verify = run_tool(args, ckpt, os.path.join(tmp, 'folded.pth'), verify=True)
            print(f'  --verify run: {verify}', flush=True)
    total = median_iqr([r['total'] for r in runs])[0]
    rows = []
    for key, label in (('load', 'load checkpoint (torch.load, safe unpickler)'),
                       ('fold', 'fold DO-Conv kernels (float64 composition)'),
                       ('save', 'save deploy checkpoint (+ re-read check)')):
        vals = [r[key] for r in runs]
        med = median_iqr(vals)[0]
        rows.append([label, f'{med:.2f} (range {min(vals):.2f}-{max(vals):.2f})',
                     f'{med / total:.0%}'])
    other = [r['total'] - r['load'] - r['fold'] - r['save'] for r in runs]
    rows.append(['other: interpreter start, imports, config, model build, deploy config',
                 f'{median_iqr(other)[0]:.2f} (range {min(other):.2f}-{max(other):.2f})',
                 f'{median_iqr(other)[0] / total:.0%}'])
    rows.append(['**total (wall, end to end)**',
                 f'**{total:.2f}** (range {min(r["total"] for r in runs):.2f}-'
                 f'{max(r["total"] for r in runs):.2f})', '100%'])
    io = median_iqr([r['load'] + r['save'] for r in runs])[0]
    fold = median_iqr([r['fold'] for r in runs])[0]
    sections = [
        'The fold tool (`tools/fold_doconv.py`, helper-4) on a Faster R-CNN R50-FPN DO-Conv '
        f'training checkpoint ({facts["layers"]} DO-Conv layers with D, '
        f'{facts["params"] / 1e6:.1f} M state-dict values, {facts["mib"]:.0f} MiB file with '
        'optimizer state). Each run is a fresh `python tools/fold_doconv.py CONFIG CKPT OUT` '
        'process.',
        '## Setup\n\n' + '\n'.join([f'- Command: {command_line(sys.argv)}',
                                   f'- Config: `{os.path.relpath(args.config, REPO)}`',
                                   f'- {args.reps} runs; median (range).']
                                  + environment_lines(args, device)),
        '## Where the time goes (seconds)\n\n' + md_table(['stage', 'seconds', 'share'], rows)
        + f'\n\nFolding vs checkpoint I/O: fold {fold:.2f} s vs load + save {io:.2f} s '
          f'(fold = {fold / (fold + io):.0%} of the two).',
    ]
    if verify:
        sections.append(
            f'## With --verify\n\nOne run with `--verify` (builds the deploy model and compares '
            f'outputs on a 128×128 input): total {verify["total"]:.2f} s, of which verify '
            f'{verify.get("verify", float("nan")):.2f} s.')
    write_markdown(os.path.join(args.out_dir, 'fold_timing.md'), 'Fold tool timing', sections)


if __name__ == '__main__':
    main()
