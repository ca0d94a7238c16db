"""The README's main command: train, evaluate, fold and re-evaluate the DO-Conv toy detector.

    python tools/demo.py [--work-dir work_dirs/demo] [--config CONFIG] [--cfg-options K=V ...]
    (bash tools/demo.sh installs what is missing first, then runs this)

Steps, each through the project's command-line tools (so the demo is also their showcase):
  1. tools/make_toy_data.py                     generate the toy data if missing
  2. tools/train.py CONFIG                       train the DO-Conv detector (mmengine log)
  3. tools/test.py CONFIG CKPT                   evaluate it
  4. tools/fold_doconv.py CONFIG CKPT OUT --verify    fold DO-Conv into plain convs
  5. tools/test.py DEPLOY_CONFIG OUT             evaluate the folded model
and prints both metrics side by side plus the fold's max output difference. ``--cfg-options``
go to train and both tests (e.g. ``train_cfg.max_epochs=1`` for a quick look). A summary is
written to ``<work-dir>/demo_summary.json``.
"""
import argparse
import json
import os.path as osp
import re
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = osp.join('configs', 'toy', 'retinanet_r18-tiny-doconv_fpn_toy.py')
FOLD_TOOL = osp.join(REPO, 'tools', 'fold_doconv.py')
METRICS_FILE = 'test_metrics.json'  # written by tools/test.py into its work dir
# The fold tool's verify summary, e.g. "verify PASS: 9 outputs, worst max abs 1.5e-07, ...".
VERIFY_LINE = re.compile(r'verify (PASS|FAIL)\b.*?worst max abs ([0-9.eE+-]+)')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train, evaluate, fold and re-evaluate the '
                                     'DO-Conv toy detector')
    parser.add_argument('--work-dir', default=osp.join('work_dirs', 'demo'),
                        help='where everything is written (default: work_dirs/demo)')
    parser.add_argument('--config', default=DEFAULT_CONFIG,
                        help=f'DO-Conv training config (default: {DEFAULT_CONFIG})')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='key=value overrides passed to train.py and both test.py runs')
    return parser.parse_args(argv)


def step(number: int, total: int, title: str) -> None:
    print(f'\n=== [{number}/{total}] {title}', flush=True)


def run(cmd, capture: bool = False) -> str:
    """Run a tool with its output streamed live (and returned when ``capture``)."""
    print('$ ' + ' '.join(cmd), flush=True)
    if not capture:
        subprocess.run(cmd, cwd=REPO, check=True)
        return ''
    lines = []
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return ''.join(lines)


def read_metrics(test_work_dir: str) -> dict:
    with open(osp.join(test_work_dir, METRICS_FILE)) as f:
        return json.load(f)['metrics']


def last_checkpoint(work_dir: str) -> str:
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def print_table(doconv: dict, folded: dict, max_diff) -> None:
    """Metrics side by side (rich table; numbers only, e.g. coco/bbox_mAP)."""
    from rich.console import Console
    from rich.table import Table
    table = Table(title='DO-Conv toy detector: trained model vs folded (deploy) model')
    table.add_column('metric')
    table.add_column('DO-Conv', justify='right')
    table.add_column('folded', justify='right')
    table.add_column('difference', justify='right')
    for key, value in doconv.items():
        if not isinstance(value, (int, float)):
            continue
        other = folded.get(key) if folded else None
        table.add_row(key, f'{value:.4f}',
                      '-' if other is None else f'{other:.4f}',
                      '-' if other is None else f'{other - value:+.4f}')
    console = Console()
    if not doconv:
        console.print('[yellow]The evaluation returned no metrics (e.g. no detection above the '
                      'score threshold): train longer.[/yellow]')
    console.print(table)
    if max_diff is not None:
        console.print(f'max output difference, folded vs DO-Conv (fold --verify): '
                      f'{max_diff:.3e}')


def main(argv=None) -> int:
    args = parse_args(argv)
    work_dir = osp.abspath(args.work_dir)
    # The steps run in the repository; a --config the caller gave is relative to the caller.
    config = args.config if args.config == DEFAULT_CONFIG else osp.abspath(args.config)
    options = ['--cfg-options', *args.cfg_options] if args.cfg_options else []
    python = sys.executable
    fold_available = osp.isfile(FOLD_TOOL)
    total = 5 if fold_available else 3
    seconds = {}

    step(1, total, 'toy data')
    run([python, 'tools/make_toy_data.py'])

    step(2, total, f'train {config} (mmengine log lines show progress and ETA)')
    start = time.perf_counter()
    # Log every 5 iterations so the ETA updates often; user options come last and win.
    run([python, 'tools/train.py', config, '--work-dir', work_dir, '--cfg-options',
         'default_hooks.logger.interval=5', *args.cfg_options])
    seconds['train'] = time.perf_counter() - start
    checkpoint = last_checkpoint(work_dir)

    step(3, total, f'evaluate the DO-Conv model ({osp.basename(checkpoint)})')
    start = time.perf_counter()
    run([python, 'tools/test.py', config, checkpoint, '--work-dir',
         osp.join(work_dir, 'test_doconv'), *options])
    seconds['test_doconv'] = time.perf_counter() - start
    doconv_metrics = read_metrics(osp.join(work_dir, 'test_doconv'))

    folded_metrics, max_diff = None, None
    summary = dict(config=config, checkpoint=checkpoint, doconv=doconv_metrics)
    if fold_available:
        folded = osp.join(work_dir, 'folded.pth')
        deploy_config = osp.join(work_dir, 'folded_deploy.py')
        step(4, total, 'fold DO-Conv into plain convolutions (with --verify)')
        start = time.perf_counter()
        # --force: the demo owns its work dir (outputs of an older version carry no fold mark)
        output = run([python, 'tools/fold_doconv.py', config, checkpoint, folded,
                      '--out-config', deploy_config, '--verify', '--force'], capture=True)
        seconds['fold'] = time.perf_counter() - start
        match = VERIFY_LINE.search(output)
        max_diff = float(match.group(2)) if match else None

        step(5, total, 'evaluate the folded model with its deploy config')
        start = time.perf_counter()
        run([python, 'tools/test.py', deploy_config, folded, '--work-dir',
             osp.join(work_dir, 'test_folded'), *options])
        seconds['test_folded'] = time.perf_counter() - start
        folded_metrics = read_metrics(osp.join(work_dir, 'test_folded'))
        summary.update(folded_checkpoint=folded, deploy_config=deploy_config,
                       folded=folded_metrics, max_output_difference=max_diff)
    summary['seconds'] = seconds

    print()
    print_table(doconv_metrics, folded_metrics, max_diff)
    if not fold_available:
        print('fold tool not available (tools/fold_doconv.py missing): fold and folded '
              'evaluation skipped.')
    print('times: ' + ', '.join(f'{k} {v:.0f}s' for k, v in seconds.items()))
    with open(osp.join(work_dir, 'demo_summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    print(f'summary: {osp.join(work_dir, "demo_summary.json")}')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as error:
        sys.exit(f'error: step failed ({" ".join(map(str, error.cmd[1:3]))}, exit status '
                 f'{error.returncode}); see its output above.')
