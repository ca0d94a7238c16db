"""Generate the bundled toy dataset (COCO detection/instances + mmseg semantic segmentation).

Usage: python tools/make_toy_data.py [--out data/toy] [--force] [--num-train 200] [--num-val 50]
                                     [--img-size 128] [--seed 0]

Idempotent: an output directory that already holds a complete generation with the same settings
is left alone. See do_conv_mm/toy_data.py for the layout.
"""
import argparse
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a bare checkout

from do_conv_mm.toy_data import DEFAULT_ROOT, generate_toy_data, is_complete, toy_settings  # noqa


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Generate the do_conv_mm toy dataset')
    parser.add_argument('--out', default=DEFAULT_ROOT, help='output root (default: data/toy)')
    parser.add_argument('--force', action='store_true',
                        help='regenerate even if the output root already holds data')
    parser.add_argument('--num-train', type=int, default=200, help='training images')
    parser.add_argument('--num-val', type=int, default=50, help='validation images')
    parser.add_argument('--img-size', type=int, default=128, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0, help='generation seed')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        settings = toy_settings(args.num_train, args.num_val, args.img_size, args.seed)
    except ValueError as err:
        sys.exit(f'error: {err}')
    if is_complete(args.out, settings) and not args.force:
        print(f'toy data already complete in {osp.abspath(args.out)} (use --force to regenerate)')
        return
    start = time.perf_counter()
    try:
        root = generate_toy_data(args.out, force=args.force, **{
            k: settings[k] for k in ('num_train', 'num_val', 'img_size', 'seed')})
    except ValueError as err:
        sys.exit(f'error: {err}')
    print(f'toy data written to {root} in {time.perf_counter() - start:.1f} s '
          f'({args.num_train} train / {args.num_val} val images, {args.img_size}px)')


if __name__ == '__main__':
    main()
