"""Export an mmdet / mmseg model with mmdeploy to ONNX and check it in ONNX Runtime.

    python tools/deploy_onnx.py CONFIG CHECKPOINT OUT_DIR [--deploy-cfg CFG | --dynamic]
                                [--verify] [--eval] [--image IMG] [--shape H W]

CONFIG + CHECKPOINT: a DO-Conv training config and its checkpoint (folded first, through the fold
tool's API: OUT_DIR gets the folded checkpoint and the deploy config), or an already folded pair
(deploy config + folded checkpoint) or any plain pair. An unfolded DO-Conv checkpoint with a config
without DO-Conv is refused. OUT_DIR gets end2end.onnx (mmdeploy's end-to-end model: detections /
segmentation logits), raw_outputs.onnx (the dense head's raw maps), the mmdeploy deploy config and
SDK meta, and deploy_report.json (ops, differences, timings, metrics). The graphs hold standard
ONNX ops only (checked). Runs where the deploy extra is installed: bash tools/install_deploy.sh,
then .venv-deploy/bin/python tools/deploy_onnx.py ...

--verify: exit 1 (writing nothing) unless ONNX Runtime's outputs match the PyTorch model's on the
test pipeline's input (criteria: python tools/deploy_onnx.py -h, README "Deployment").
--eval: also run the config's test set through both and print both metrics.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from do_conv_mm.runner_setup import CfgOptionsAction  # noqa: E402

TOLERANCE_HELP = (
    'Criteria (fp32): a dense output (raw head map, segmentation logits) passes when '
    'max|ORT - PyTorch| <= ATOL + RTOL * max|PyTorch| (ORT and PyTorch differ by summation order '
    'only, measured <= ~1e-6 of the scale; a wrong export is ~1e-1); every detection must have a '
    'counterpart of the same label with |score diff| <= SCORE_ATOL and box coordinates within '
    'BOX_ATOL px, except at a score tie (at the score threshold or the last kept score); '
    'segmentation labels may differ only where the top-2 logits tie within the dense tolerance.')


def parse_args(argv=None):
    from do_conv_mm.deploy_verify import DEFAULT_ATOL, DEFAULT_RTOL
    from do_conv_mm.onnx_deploy import DEFAULT_BOX_ATOL, DEFAULT_SCORE_ATOL
    from do_conv_mm.runner_setup import positive_int
    parser = argparse.ArgumentParser(
        description='Fold (if needed), export with mmdeploy to ONNX, run in ONNX Runtime and '
        'compare with PyTorch.', epilog=TOLERANCE_HELP)
    parser.add_argument('config', help='DO-Conv training config, or the deploy/plain config of a '
                        'folded/plain checkpoint')
    parser.add_argument('checkpoint', help='checkpoint (.pth) of CONFIG')
    parser.add_argument('out_dir', help='output directory (created; files in it are replaced)')
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--deploy-cfg', help='mmdeploy deploy config (default: '
                       'configs/deploy/{detection,segmentation}_onnxruntime_static.py)')
    group.add_argument('--dynamic', action='store_true', help='use the shipped dynamic-shape '
                       'deploy config instead of the static one')
    parser.add_argument('--verify', action='store_true', help='exit non-zero (writing nothing) '
                        'when ONNX Runtime and PyTorch outputs differ beyond tolerance')
    parser.add_argument('--eval', action='store_true', help='evaluate PyTorch and ONNX Runtime on '
                        'the config\'s test set and print both metrics')
    parser.add_argument('--image', help='export/verify input image (default: the test set\'s '
                        'first image, else a seeded random image)')
    parser.add_argument('--shape', type=positive_int, nargs=2, metavar=('H', 'W'),
                        help='static configs: export at H x W (the pipeline resizes to it; '
                        'detectors then pad to the config\'s size divisor, e.g. 32: 100 150 '
                        'exports 128 x 160); dynamic configs take any size. Also the size of the '
                        'random input where the test set has no image (default 128 128)')
    parser.add_argument('--atol', type=float, default=DEFAULT_ATOL,
                        help=f'dense absolute tolerance (default {DEFAULT_ATOL:g})')
    parser.add_argument('--rtol', type=float, default=DEFAULT_RTOL,
                        help=f'dense tolerance relative to max|output| (default {DEFAULT_RTOL:g})')
    parser.add_argument('--score-atol', type=float, default=DEFAULT_SCORE_ATOL,
                        help=f'detection score tolerance (default {DEFAULT_SCORE_ATOL:g})')
    parser.add_argument('--box-atol', type=float, default=DEFAULT_BOX_ATOL,
                        help=f'detection box tolerance in pixels (default {DEFAULT_BOX_ATOL:g})')
    parser.add_argument('--runs', type=int, default=5, help='timed runs per runtime (median)')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override settings of CONFIG, key=value')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import do_conv_mm  # noqa: F401  (safe checkpoint globals, DOConv registry)
    from do_conv_mm.onnx_deploy import DeployError, deploy_onnx
    try:
        report = deploy_onnx(args.config, args.checkpoint, args.out_dir,
                             deploy_cfg=args.deploy_cfg, dynamic=args.dynamic, image=args.image,
                             shape=args.shape, verify=args.verify, evaluate=args.eval,
                             cfg_options=args.cfg_options, atol=args.atol, rtol=args.rtol,
                             score_atol=args.score_atol, box_atol=args.box_atol, runs=args.runs)
    except DeployError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    state = 'PASS' if report['verify_ok'] else 'DIFFERENCES beyond tolerance (see above)'
    print(f'ONNX Runtime vs PyTorch: {state}; wrote {args.out_dir} '
          f'(end2end.onnx, raw_outputs.onnx, deploy_report.json)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
