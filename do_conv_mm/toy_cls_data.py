"""Deterministic toy classification data: one large shape per image among small distractors.

The classification companion of :mod:`do_conv_mm.toy_data` (same shapes, colours and
backgrounds), in the folder layout of mmpretrain's ``CustomDataset``:

    <root>/train/<class>/NNNNNN.png     RGB images (S, S, 3) uint8, S = img_size (default 64)
    <root>/val/<class>/NNNNNN.png
    <root>/toy_cls_data.json            settings + file count, written last

Classes (CustomDataset sorts folder names, so this is also the label order): ``background``
(distractors only), ``circle``, ``square``, ``triangle`` (one large shape near the centre, radius
0.22-0.38 S, drawn over the distractors). Distractors are 1-3 small shapes (radius 0.06-0.12 S) of
any class anywhere, so the label is the *large* shape's class and colour alone (hue centred on the
class, overlapping its neighbours) does not decide it.

Invariants: image ``index`` of a split has label ``index % 4`` (balanced splits) and is drawn from
its own RNG seeded by (seed, split, index), so generation is byte-identical on re-run and a smaller
``num_train`` yields a prefix of a larger one. ``root`` is either absent or complete
(:func:`do_conv_mm.toy_data.write_dataset_atomically`).
"""
import os
import os.path as osp
from typing import Dict, List, Optional, Tuple

import numpy as np

from .toy_data import (CLASSES, HUE_JITTER, _background, _hsv_colour, _write_png, dataset_settings,
                       default_data_dir, draw_shape, marker_complete, write_dataset_atomically)

__all__ = ['CLS_CLASSES', 'DEFAULT_CLS_ROOT', 'cls_settings', 'ensure_toy_cls_data',
           'generate_toy_cls_data', 'is_cls_complete', 'render_crop']

CLS_CLASSES = ('background', ) + CLASSES  # sorted, as CustomDataset orders its folders
FORMAT_VERSION = 1
MARKER = 'toy_cls_data.json'
DEFAULT_CLS_ROOT = default_data_dir('toy_cls')

MAIN_RADIUS = (0.22, 0.38)  # of the image side: the labelled shape
DISTRACTOR_RADIUS = (0.06, 0.12)  # of the image side: never mistaken for the labelled shape
_SPLIT_IDS = {'train': 100, 'val': 101}  # distinct from toy_data's scene RNG streams


def cls_settings(num_train: int = 800, num_val: int = 200, img_size: int = 64,
                 seed: int = 0) -> Dict:
    """The settings that fully determine a generated set (stored in ``toy_cls_data.json``)."""
    return dataset_settings(FORMAT_VERSION, CLS_CLASSES, num_train, num_val, img_size, seed)


def _paint_shape(rng: np.random.Generator, image: np.ndarray, cls: int, radius: float,
                 centre: Tuple[float, float]) -> np.ndarray:
    """Draw shape ``CLASSES[cls]`` in a class-cued colour with texture over ``image``."""
    size = image.shape[0]
    hue = cls / len(CLASSES)
    colour = _hsv_colour(rng, (0.6, 1.0), (0.55, 1.0), (hue - HUE_JITTER, hue + HUE_JITTER))
    start = None if CLASSES[cls] == 'circle' else rng.uniform(0, 2 * np.pi)
    mask = draw_shape(cls, size, centre[0], centre[1], radius, start)
    shade = 1.0 + rng.normal(0, 0.06, size=(size, size, 1))
    return np.where(mask[..., None], colour * shade, image)


def render_crop(seed: int, split: str, index: int, img_size: int = 64) -> Tuple[np.ndarray, int]:
    """Render image ``index`` of ``split``: ((S, S, 3) uint8 RGB, label into CLS_CLASSES)."""
    rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])
    label = index % len(CLS_CLASSES)
    image = _background(rng, img_size)
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(*DISTRACTOR_RADIUS) * img_size
        centre = rng.uniform(0, img_size, size=2)
        image = _paint_shape(rng, image, int(rng.integers(len(CLASSES))), radius, centre)
    if label > 0:
        radius = rng.uniform(*MAIN_RADIUS) * img_size
        centre = img_size / 2 + rng.uniform(-0.1, 0.1, size=2) * img_size
        image = _paint_shape(rng, image, label - 1, radius, centre)
    image = image + rng.normal(0, 6.0, size=image.shape)  # sensor noise over everything
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def _file_name(split: str, index: int) -> str:
    return osp.join(split, CLS_CLASSES[index % len(CLS_CLASSES)], f'{index:06d}.png')


def _expected_files(settings: Dict) -> List[str]:
    return [_file_name(split, index) for split in _SPLIT_IDS
            for index in range(settings[f'num_{split}'])]


def is_cls_complete(root: str, settings: Optional[Dict] = None) -> bool:
    """True when ``root`` holds a finished generation (with ``settings``, if given)."""
    return marker_complete(root, settings, MARKER, FORMAT_VERSION, _expected_files)


def generate_toy_cls_data(root: str = DEFAULT_CLS_ROOT, num_train: int = 800, num_val: int = 200,
                          img_size: int = 64, seed: int = 0, force: bool = False) -> str:
    """Generate the toy classification set into ``root`` and return ``root``; an existing
    generation is kept or replaced as :func:`~do_conv_mm.toy_data.write_dataset_atomically`
    says."""
    settings = cls_settings(num_train, num_val, img_size, seed)

    def write(tmp_root: str) -> int:
        for split in _SPLIT_IDS:
            for cls in CLS_CLASSES:
                os.makedirs(osp.join(tmp_root, split, cls), exist_ok=True)
            for index in range(settings[f'num_{split}']):
                image, _ = render_crop(seed, split, index, img_size)
                _write_png(osp.join(tmp_root, _file_name(split, index)), image)
        return len(_expected_files(settings))

    return write_dataset_atomically(root, settings, write, is_cls_complete, MARKER, force)


def ensure_toy_cls_data(root: str = DEFAULT_CLS_ROOT, **settings) -> str:
    """Return ``root``, generating the set there first if it is missing or incomplete (settings
    as :func:`generate_toy_cls_data`; left out, any complete generation is accepted)."""
    root = osp.abspath(root)
    if is_cls_complete(root, cls_settings(**settings) if settings else None):
        return root
    return generate_toy_cls_data(root, **settings)

