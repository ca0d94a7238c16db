"""Pretraining study on the toy data: classification plain vs DO-Conv, then detection fine-tuned
from each pretrained backbone.

Usage (from the repository root):
    python bench/pretrain_study.py [--cls-seeds 0 1 2 3 4] [--det-seeds 0 1 2] [--jobs 2]
                                   [--work-dir work_dirs/pretrain_study] [--rerun]
                                   [--out bench/results/pretrain_study.md]

1. Classification: the toy classifier twins (configs/toy/cls_r18-tiny[-doconv]_toy.py) train from
   scratch with each seed; val top-1 accuracy.
2. Fine-tuning: the toy detector trains from the classifier of the same seed (its full
   ``backbone.*``, loaded through ``init_cfg=dict(type='Pretrained', prefix='backbone.')``):
   ``doconv<-doconv`` DO-Conv detector from the DO-Conv classifier (trained D),
   ``doconv<-plain`` DO-Conv detector from the plain classifier (D = 0 at the start),
   ``plain<-plain`` plain detector from the plain classifier; val bbox mAP. Opt-in arms
   ``doconv<-doconv,D-no-wd`` / ``doconv<-plain,D-no-wd``: the same with D excluded from the
   detector's AdamW weight decay; ``doconv<-doconv-folded``: from the DO-Conv classifier folded
   (its function, as plain weights, D = 0). ``--arms`` lists them.
Each run is a subprocess of bench/toy_twins.py's ``--run-one`` (mmengine Runner,
``randomness=dict(seed=SEED)``, OMP_NUM_THREADS=1), ``--jobs`` at a time; results land in
``WORK_DIR/<arm>/seed<SEED>/result.json`` and finished runs are reused unless ``--rerun``.
Differences are paired by seed (same data order and head init across arms of a seed) and tested
with a two-sided paired t-test and Wilcoxon signed-rank test.
"""
import argparse
import os
import os.path as osp
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(HERE)
sys.path.insert(0, HERE)
from bench_utils import mean_std, paired_test  # noqa: E402
from toy_twins import _load_result  # noqa: E402

CLS = dict(plain='configs/toy/cls_r18-tiny_toy.py', doconv='configs/toy/cls_r18-tiny-doconv_toy.py')
DET = dict(plain='configs/toy/retinanet_r18-tiny_fpn_toy.py',
           doconv='configs/toy/retinanet_r18-tiny-doconv_fpn_toy.py')
CLS_METRIC, DET_METRIC = 'accuracy/top1', 'coco/bbox_mAP'
# arm -> (detector variant, classifier variant it starts from, extra config lines)
NO_D_DECAY = ("optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.D': dict(decay_mult=0.0)}))"
              "\n")
ARMS = {'doconv<-doconv': ('doconv', 'doconv', ''), 'doconv<-plain': ('doconv', 'plain', ''),
        'plain<-plain': ('plain', 'plain', ''),
        # Opt-in (--arms): the same two DO-Conv arms with D excluded from AdamW's weight decay.
        'doconv<-doconv,D-no-wd': ('doconv', 'doconv', NO_D_DECAY),
        'doconv<-plain,D-no-wd': ('doconv', 'plain', NO_D_DECAY),
        # Opt-in: from the DO-Conv classifier folded (W' as the plain weight, D = 0): the same
        # starting function as doconv<-doconv, without the trained over-parameterisation.
        'doconv<-doconv-folded': ('doconv', 'doconv-folded', '')}
DEFAULT_ARMS = ['doconv<-doconv', 'doconv<-plain', 'plain<-plain']


def _result(run_dir, metric):
    """A finished run's result dict, or None (bench/toy_twins.py writes and reads them)."""
    return _load_result(osp.join(run_dir, 'result.json'), metric)


def _checkpoint(run_dir):
    with open(osp.join(run_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def _finetune_config(run_dir, detector, start, extra=''):
    """A config file: ``detector`` whose backbone starts from classifier checkpoint ``start``
    (plus ``extra`` config lines)."""
    path = osp.join(run_dir, 'finetune.py')
    with open(path, 'w') as f:
        f.write(f'_base_ = {osp.join(REPO, DET[detector])!r}\n'
                f'model = dict(backbone=dict(init_cfg=dict(_delete_=True, type=\'Pretrained\', '
                f'checkpoint={start!r}, prefix=\'backbone.\')))\n' + extra)
    return path


def _folded(checkpoint, out):
    """``checkpoint``'s weights with every DO-Conv folded (W' as weight, no D), saved to
    ``out``: loaded into DO-Conv layers it starts them at D = 0 with the same function."""
    import torch
    from do_conv_mm import fold_state_dict, load_checkpoint_file
    weights = load_checkpoint_file(checkpoint)['state_dict']
    torch.save(dict(state_dict=fold_state_dict(weights), meta=dict(folded_from=checkpoint)), out)
    return out


def _train(config, seed, run_dir, metric, rerun, timeout):
    """Run (or reuse) one training; return its result dict."""
    if not rerun and _result(run_dir, metric) is not None:
        return _result(run_dir, metric)
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    with open(osp.join(run_dir, 'stdout.log'), 'w') as log:
        proc = subprocess.run([sys.executable, osp.join(HERE, 'toy_twins.py'), '--run-one',
                               config, str(seed), run_dir], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
    result = _result(run_dir, metric)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f'{config} seed {seed} failed (exit {proc.returncode}); see '
                           f'{osp.join(run_dir, "stdout.log")}')
    print(f'{osp.relpath(run_dir, REPO)}: {metric} = {result["metrics"][metric]:.4f} '
          f'({result["wall_s"]:.0f} s)', flush=True)
    return result


def _table(title, rows, seeds, scale, digits=2):
    lines = [title, '', '| variant | mean ± std | ' + ' | '.join(f'seed {s}' for s in seeds)
             + ' |', '|---|---|' + '---|' * len(seeds)]
    for name, values in rows.items():
        mean, std = mean_std([v * scale for v in values])
        lines.append(f'| {name} | {mean:.{digits}f} ± {std:.{digits}f} | '
                     + ' | '.join(f'{v * scale:.{digits}f}' for v in values) + ' |')
    return lines


def _paired_line(label, a, b, scale):
    diffs = [(y - x) * scale for x, y in zip(a, b)]
    mean, std = mean_std(diffs)
    return (f'{label}, paired by seed: {mean:+.2f} ± {std:.2f} '
            f'({", ".join(f"{d:+.2f}" for d in diffs)}); {paired_test(a, b)}.')


def write_report(cls_results, det_results, args):
    import torch
    cls_seeds, det_seeds = args.cls_seeds, args.det_seeds
    lines = ['# Toy pretraining study: classification, then detection from the pretrained '
             'backbones', '',
             f'Generated by `python bench/pretrain_study.py --cls-seeds '
             f'{" ".join(map(str, cls_seeds))} --det-seeds {" ".join(map(str, det_seeds))} '
             + (f'--arms {" ".join(repr(a) for a in args.arms)} '
                if args.arms != DEFAULT_ARMS else '')
             + f'--jobs {args.jobs}` on {time.strftime("%Y-%m-%d")}; {platform.machine()}, torch '
             f'{torch.__version__}, CPU only, 1 thread per run, {args.jobs} run(s) at a time. '
             'Data: the toy classification set (800 train / 200 val, 64 px, 4 classes) and the '
             'toy detection set (200 / 50, 128 px, 3 classes), both generated, both small: '
             'differences of a point or two are within seed noise unless the tests say '
             'otherwise.', '']
    cls = {v: [cls_results[(v, s)]['metrics'][CLS_METRIC] for s in cls_seeds] for v in CLS}
    lines += _table('## 1. Classification: val top-1 accuracy (%)', cls, cls_seeds, 1.0)
    lines += ['', f'Configs: `{CLS["plain"]}` / `{CLS["doconv"]}` (6 epochs from scratch).', '',
              _paired_line('DO-Conv minus plain', cls['plain'], cls['doconv'], 1.0), '']
    det = {arm: [det_results[(arm, s)]['metrics'][DET_METRIC] for s in det_seeds]
           for arm in args.arms}
    lines += _table('## 2. Detection fine-tuned from the pretrained backbones: val bbox mAP '
                    '(x100)', det, det_seeds, 100.0)
    lines += ['', 'Arms are `detector<-classifier`: the detector config '
              f'(`{DET["doconv"]}` or `{DET["plain"]}`, 12 epochs) with '
              "`backbone.init_cfg=dict(type='Pretrained', checkpoint=<classifier of the same "
              "seed>, prefix='backbone.')`. `doconv<-plain` starts with D = 0 (the plain "
              'function), `doconv<-doconv` from the pretrained D. Where run: `,D-no-wd` arms '
              'exclude every D from the detector\'s AdamW weight decay; `doconv<-doconv-folded` '
              'starts from the DO-Conv classifier folded (its function as plain weights, '
              'D = 0).', '']
    if 'doconv<-doconv' in det and 'doconv<-plain' in det:
        lines.append(_paired_line('- doconv<-doconv minus doconv<-plain (what the pretrained D '
                                  'adds)', det['doconv<-plain'], det['doconv<-doconv'], 100.0))
    if 'doconv<-doconv' in det and 'plain<-plain' in det:
        lines.append(_paired_line('- doconv<-doconv minus plain<-plain (DO-Conv end to end vs '
                                  'plain end to end)', det['plain<-plain'],
                                  det['doconv<-doconv'], 100.0))
    if 'doconv<-doconv,D-no-wd' in det and 'doconv<-plain,D-no-wd' in det:
        lines.append(_paired_line('- the same with D excluded from the detector\'s AdamW weight '
                                  'decay (`paramwise_cfg.custom_keys={\'.D\': '
                                  'dict(decay_mult=0)}`)', det['doconv<-plain,D-no-wd'],
                                  det['doconv<-doconv,D-no-wd'], 100.0))
    if 'doconv<-doconv-folded' in det and 'doconv<-doconv' in det:
        lines.append(_paired_line('- doconv<-doconv minus doconv<-doconv-folded (the same '
                                  'starting function; trained D vs D = 0 on the folded weights)',
                                  det['doconv<-doconv-folded'], det['doconv<-doconv'], 100.0))
    if 'doconv<-doconv,D-no-wd' in det and 'doconv<-doconv' in det:
        lines.append(_paired_line('- doconv<-doconv without minus with weight decay on D',
                                  det['doconv<-doconv'], det['doconv<-doconv,D-no-wd'], 100.0))
    lines += ['', f'With n paired seeds the exact two-sided Wilcoxon p cannot fall below 2 / 2^n '
              f'({2 / 2 ** len(det_seeds):.3f} for the {len(det_seeds)} detection seeds, '
              f'{2 / 2 ** len(cls_seeds):.3f} for the {len(cls_seeds)} classification seeds). '
              'The arms of a seed share the data order and the detector head init, but their '
              'backbones come from two different classifier runs, so the differences mix what D '
              'adds with run-to-run variation of pretraining.', '']
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write('\n'.join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description='Toy pretraining study (plain vs DO-Conv)')
    parser.add_argument('--cls-seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    parser.add_argument('--det-seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--arms', nargs='+', choices=list(ARMS), default=DEFAULT_ARMS,
                        help='default: the three without ",D-no-wd" (those exclude D from the '
                        'detector\'s weight decay)')
    parser.add_argument('--jobs', type=int, default=2, help='runs at a time (1 thread each)')
    parser.add_argument('--work-dir', default=osp.join(REPO, 'work_dirs', 'pretrain_study'))
    parser.add_argument('--out', default=osp.join(HERE, 'results', 'pretrain_study.md'))
    parser.add_argument('--rerun', action='store_true', help='retrain finished runs')
    parser.add_argument('--timeout', type=float, default=3600, help='seconds per run')
    args = parser.parse_args(argv)
    missing = sorted(set(args.det_seeds) - set(args.cls_seeds))
    if missing:
        parser.error(f'--det-seeds {missing} need classifiers: add them to --cls-seeds')
    sys.path.insert(0, REPO)
    from do_conv_mm.toy_cls_data import ensure_toy_cls_data
    from do_conv_mm.toy_data import ensure_toy_data
    ensure_toy_data()  # once, before the subprocesses would race for them
    ensure_toy_cls_data()

    def cls_job(key):
        variant, seed = key
        run_dir = osp.join(args.work_dir, f'cls_{variant}', f'seed{seed}')
        return _train(osp.join(REPO, CLS[variant]), seed, run_dir, CLS_METRIC, args.rerun,
                      args.timeout)

    def det_job(key):
        arm, seed = key
        detector, classifier, extra = ARMS[arm]
        run_dir = osp.join(args.work_dir, arm.replace('<-', '_from_').replace(',', '_'),
                           f'seed{seed}')
        os.makedirs(run_dir, exist_ok=True)
        start = _checkpoint(osp.join(args.work_dir, f'cls_{classifier.split("-")[0]}',
                                     f'seed{seed}'))
        if classifier.endswith('-folded'):
            start = _folded(start, osp.join(run_dir, 'classifier_folded.pth'))
        return _train(_finetune_config(run_dir, detector, start, extra), seed, run_dir,
                      DET_METRIC, args.rerun, args.timeout)

    cls_keys = [(v, s) for s in args.cls_seeds for v in CLS]
    det_keys = [(arm, s) for s in args.det_seeds for arm in args.arms]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        cls_results = dict(zip(cls_keys, pool.map(cls_job, cls_keys)))
        det_results = dict(zip(det_keys, pool.map(det_job, det_keys)))
    write_report(cls_results, det_results, args)
    print(f'report written to {args.out}')


if __name__ == '__main__':
    main()
