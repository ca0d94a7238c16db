"""Fold a DO-Conv training checkpoint into a plain-conv checkpoint plus its deploy config.

    python tools/fold_doconv.py CONFIG CHECKPOINT OUT [--verify]
    python tools/fold_doconv.py CONFIG CKPT1 CKPT2 ... OUT_DIR [--verify]

OUT gets ``{meta, state_dict}`` with every DOConv folded into its plain Conv2d kernel (optimizer
and other training state dropped). An EMA checkpoint's ``state_dict`` holds the EMA weights
(mmengine's EMAHook swaps them in at save) and is deployed; its ``ema_state_dict`` (the raw
weights) is folded and kept; --use-ema refuses a checkpoint without EMA. OUT loads with
``torch.load(weights_only=True)``. The deploy config (the training config with DO-Conv removed)
goes next to OUT as ``<CONFIG stem>_deploy.py`` unless --out-config is given; the pair works
with mmdet's ``init_detector`` / mmseg's ``init_model`` / mmpretrain's ``init_model`` and
``ImageClassificationInferencer``, and tools/test.py. Writes are atomic: on any error nothing is
written and the inputs are untouched. An existing file at OUT or the deploy config's path is
replaced only if this tool wrote it (a rerun), or with --force.
"""
import argparse
import os
import sys
import traceback


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from do_conv_mm.deploy import (DEFAULT_ATOL, DEFAULT_RTOL, FoldError,  # noqa: E402
                               fold_checkpoint, fold_checkpoints)
from do_conv_mm.runner_setup import CfgOptionsAction, positive_int  # noqa: E402

TOLERANCE_HELP = (
    'An output passes --verify when max|folded - DO-Conv| <= ATOL + RTOL * max|DO-Conv output|. '
    'Defaults fit fp32: the fold composes each kernel in float64 and rounds once, the DO-Conv '
    'model composes in fp32, so outputs differ by accumulated rounding only (measured 6e-7 to '
    '1.2e-5 relative on the shipped R50 detectors/segmentors with random D and BN statistics); a '
    'wrong fold differs by O(|D|), ~1e-1.')


def _readable_image(path: str) -> bool:
    import mmcv
    try:
        return os.path.isfile(path) and mmcv.imread(path) is not None
    except Exception:  # mmcv / cv2 raise on some undecodable files
        return False


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Fold DO-Conv checkpoints into plain-conv deploy checkpoints and write the '
        'deploy config.', epilog=TOLERANCE_HELP)
    parser.add_argument('config', help='the DO-Conv training config of the checkpoint(s)')
    parser.add_argument('checkpoint', nargs='+', help='DO-Conv checkpoint(s) (.pth): mmengine '
                        'training or slim checkpoints, bare state dicts, EMA checkpoints')
    parser.add_argument('out', help='output checkpoint file; a directory when several '
                        'checkpoints are given (each keeps its file name) or when OUT is an '
                        'existing directory or ends with "/"')
    parser.add_argument('--out-config', help='where to write the deploy config (default: '
                        '<CONFIG stem>_deploy.py next to OUT)')
    parser.add_argument('--force', action='store_true', help='replace existing files at OUT / '
                        '--out-config even if this tool did not write them (by default only a '
                        'folded checkpoint or deploy config of an earlier fold is replaced)')
    parser.add_argument('--use-ema', action='store_true', help='make sure the EMA weights are '
                        'deployed: mmengine\'s EMAHook saves them as state_dict (deployed by '
                        'default) and the raw weights as ema_state_dict (folded and kept); '
                        'refused for a checkpoint without EMA')
    parser.add_argument('--verify', action='store_true', help='build the DO-Conv model and the '
                        'deploy model, run the same input through both and compare every output; '
                        'exit non-zero (and write nothing) beyond tolerance')
    parser.add_argument('--image', help='verify on this image through the config\'s test '
                        'pipeline (default: a seeded random image of --shape)')
    parser.add_argument('--shape', type=positive_int, nargs=2, default=[128, 128],
                        metavar=('H', 'W'), help='random verify input size (default 128 128)')
    parser.add_argument('--atol', type=float, default=DEFAULT_ATOL,
                        help=f'absolute tolerance for --verify (default {DEFAULT_ATOL:g})')
    parser.add_argument('--rtol', type=float, default=DEFAULT_RTOL,
                        help=f'tolerance relative to each output\'s max |value| for --verify '
                        f'(default {DEFAULT_RTOL:g})')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override settings of CONFIG, key=value (as in tools/train.py)')
    args = parser.parse_args(argv)
    if args.image is not None and not args.verify:
        parser.error('--image only applies with --verify')
    if args.image is not None and not _readable_image(args.image):
        parser.error(f'--image {args.image!r} is not a readable image file; pass a .jpg / .png, '
                     f'or verify on a random input (no --image)')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    kwargs = dict(out_config=args.out_config, use_ema=args.use_ema, verify=args.verify,
                  image=args.image, verify_size=tuple(args.shape), atol=args.atol,
                  rtol=args.rtol, cfg_options=args.cfg_options, overwrite=args.force)
    to_dir = (len(args.checkpoint) > 1 or os.path.isdir(args.out)
              or args.out.endswith(('/', os.sep)))
    try:
        if to_dir:
            if os.path.exists(args.out) and not os.path.isdir(args.out):
                raise FoldError(f'OUT {args.out!r} is a file; with several checkpoints OUT must '
                                f'be a directory (each output keeps its checkpoint\'s file name).')
            fold_checkpoints(args.config, args.checkpoint, args.out,
                             progress=len(args.checkpoint) > 1, **kwargs)
        else:
            fold_checkpoint(args.config, args.checkpoint[0], args.out, **kwargs)
    except FoldError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    except Exception as error:  # not bad input but a bug: still one line (traceback on request)
        if os.environ.get('DO_CONV_MM_TRACEBACK'):
            traceback.print_exc()
        text = ' '.join(str(error).split())[:300] or type(error).__name__
        print(f'error: unexpected {type(error).__name__} while folding: {text}. Outputs not '
              f'completed were not written. This is a do_conv_mm bug: please report it with the '
              f'command (DO_CONV_MM_TRACEBACK=1 prints the traceback).', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
