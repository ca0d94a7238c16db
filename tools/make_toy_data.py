"""Generate the bundled toy datasets.

Usage: python tools/make_toy_data.py [--out data/toy] [--force] [--num-train 200] [--num-val 50]
                                     [--img-size 128] [--seed 0]
       python tools/make_toy_data.py --cls [--out data/toy_cls] [--num-train 800] [--num-val 200]
                                     [--img-size 64] [--seed 0] [--force]

Without --cls: detection / instance (COCO) + semantic segmentation (mmseg) scenes, see
do_conv_mm/toy_data.py. With --cls: the classification set in mmpretrain's CustomDataset folder
layout, see do_conv_mm/toy_cls_data.py. Idempotent: an output directory that already holds a
complete generation with the same settings is left alone.
"""
import argparse
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a bare checkout

from do_conv_mm.toy_cls_data import (DEFAULT_CLS_ROOT, cls_settings,  # noqa: E402
                                     generate_toy_cls_data, is_cls_complete)
from do_conv_mm.toy_data import DEFAULT_ROOT, generate_toy_data, is_complete, toy_settings  # noqa

# (default root, settings, generate, is_complete, defaults of num_train / num_val / img_size)
KINDS = dict(scenes=(DEFAULT_ROOT, toy_settings, generate_toy_data, is_complete, (200, 50, 128)),
             cls=(DEFAULT_CLS_ROOT, cls_settings, generate_toy_cls_data, is_cls_complete,
                  (800, 200, 64)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Generate the do_conv_mm toy datasets')
    parser.add_argument('--cls', action='store_true',
                        help='the classification set (default: detection/segmentation scenes)')
    parser.add_argument('--out', help='output root (default: data/toy, with --cls data/toy_cls)')
    parser.add_argument('--force', action='store_true',
                        help='regenerate even if the output root already holds data')
    parser.add_argument('--num-train', type=int, help='training images (default 200, --cls 800)')
    parser.add_argument('--num-val', type=int, help='validation images (default 50, --cls 200)')
    parser.add_argument('--img-size', type=int, help='image side in pixels (default 128, --cls 64)')
    parser.add_argument('--seed', type=int, default=0, help='generation seed')
    args = parser.parse_args(argv)
    root, _, _, _, defaults = KINDS['cls' if args.cls else 'scenes']
    args.out = args.out or root
    for name, default in zip(('num_train', 'num_val', 'img_size'), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def main(argv=None):
    args = parse_args(argv)
    _, make_settings, generate, complete, _ = KINDS['cls' if args.cls else 'scenes']
    try:
        settings = make_settings(args.num_train, args.num_val, args.img_size, args.seed)
    except ValueError as err:
        sys.exit(f'error: {err}')
    if complete(args.out, settings) and not args.force:
        print(f'toy data already complete in {osp.abspath(args.out)} (use --force to regenerate)')
        return
    start = time.perf_counter()
    try:
        root = generate(args.out, force=args.force, **{
            k: settings[k] for k in ('num_train', 'num_val', 'img_size', 'seed')})
    except ValueError as err:
        sys.exit(f'error: {err}')
    except OSError as err:  # an unwritable or full destination
        sys.exit(f'error: cannot write the toy data to {osp.abspath(args.out)!r} '
                 f'({err.strerror or err}); pass a writable --out directory.')
    print(f'toy data written to {root} in {time.perf_counter() - start:.1f} s '
          f'({args.num_train} train / {args.num_val} val images, {args.img_size}px)')


if __name__ == '__main__':
    main()
