"""Deterministic toy data: coloured shapes on textured backgrounds, for offline training and tests.

One set of rendered scenes is written twice, in the two layouts OpenMMLab reads:

    <root>/coco/{train,val}/NNNNNN.png                  RGB images (H, W, 3), uint8
    <root>/coco/annotations/instances_{train,val}.json  COCO boxes + polygons (mmdet CocoDataset)
    <root>/seg/img_dir/{train,val}/NNNNNN.png           the same images
    <root>/seg/ann_dir/{train,val}/NNNNNN.png           label maps (H, W) uint8: 0 background, 1..3
    <root>/toy_data.json                                settings + file counts, written last

Shapes have saturated colours whose hue is centred on their class with overlapping ranges, so
colour is a cue and shape (circle / square / triangle, rotated) resolves the overlap; backgrounds
are desaturated.

Invariants: each scene is drawn from its own RNG seeded by (seed, split, index), so generation is
byte-identical on re-run and a smaller ``num_train`` yields a prefix of a larger one. Shapes are
drawn in order; later shapes occlude earlier ones, and a placement is rejected when it would leave
an earlier shape less than ``MIN_VISIBLE`` visible or punch a hole into it (COCO polygons cannot
hold holes). Boxes and areas are those of the *visible* mask; label maps hold the visible class per
pixel. Everything is written into a temporary sibling directory and renamed into place, so ``root``
is either absent or complete.
"""
import json
import os
import os.path as osp
import shutil
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

__all__ = ['CLASSES', 'SEG_CLASSES', 'SEG_PALETTE', 'DEFAULT_ROOT', 'dataset_settings',
           'default_data_dir', 'draw_shape', 'ensure_toy_data', 'ensure_toy_data_for_config',
           'generate_toy_data',
           'is_complete', 'marker_complete', 'render_scene', 'toy_data_missing_for_config',
           'toy_settings', 'write_dataset_atomically']

CLASSES = ('circle', 'square', 'triangle')
SEG_CLASSES = ('background', ) + CLASSES
SEG_PALETTE = [[0, 0, 0], [220, 20, 60], [0, 128, 255], [255, 200, 0]]
FORMAT_VERSION = 2
MARKER = 'toy_data.json'


def default_data_dir(name: str) -> str:
    """<checkout>/data/<name>, where the toy configs look, when the package runs from its
    checkout (an editable install); else ./data/<name>: a wheel installed into site-packages
    never writes there (its configs and tools stay in the checkout)."""
    checkout = osp.dirname(osp.dirname(osp.abspath(__file__)))
    if osp.isdir(osp.join(checkout, 'configs', 'toy')):
        return osp.join(checkout, 'data', name)
    return osp.abspath(osp.join('data', name))


DEFAULT_ROOT = default_data_dir('toy')

HUE_JITTER = 0.25  # shape hue = class / 3 ± this: colour hints at the class, shape must decide
MIN_VISIBLE = 0.5  # an earlier shape must keep at least this share of its pixels visible
MIN_AREA = 24  # pixels; smaller visible regions are rejected
MAX_TRIES = 20  # placements tried per shape before the shape is skipped
_SPLIT_IDS = {'train': 0, 'val': 1}


def dataset_settings(format_version: int, classes, num_train: int, num_val: int,
                     img_size: int, seed: int) -> Dict:
    """Validated settings of a generated set (ValueError on a bad count or an image side below
    32 px, where the shapes no longer fit); stored in its marker file."""
    for name, value in (('num_train', num_train), ('num_val', num_val), ('img_size', img_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive int, got {value!r}')
    if img_size < 32:
        raise ValueError(f'img_size must be >= 32 so shapes fit, got {img_size}')
    return dict(format_version=format_version, num_train=num_train, num_val=num_val,
                img_size=img_size, seed=int(seed), classes=list(classes))


def toy_settings(num_train: int = 200, num_val: int = 50, img_size: int = 128,
                 seed: int = 0) -> Dict:
    """The settings that fully determine a generated dataset (stored in ``toy_data.json``)."""
    return dataset_settings(FORMAT_VERSION, CLASSES, num_train, num_val, img_size, seed)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _hsv_colour(rng: np.random.Generator, sat: Tuple[float, float],
                val: Tuple[float, float], hue: Tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """A random RGB colour (3,) float in [0, 255]; hue (mod 1), saturation, value in the ranges."""
    import colorsys
    h = rng.uniform(*hue) % 1.0
    s = rng.uniform(*sat)
    v = rng.uniform(*val)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background (size, size, 3) float: smooth noise, stripes or a gradient."""
    import cv2
    c0 = _hsv_colour(rng, (0.0, 0.45), (0.2, 0.9))
    c1 = _hsv_colour(rng, (0.0, 0.45), (0.2, 0.9))
    kind = rng.integers(3)
    if kind == 0:  # smooth noise: a coarse random grid upsampled
        cells = int(rng.integers(3, 9))
        grid = rng.uniform(0, 1, size=(cells, cells)).astype(np.float32)
        t = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    else:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        angle = rng.uniform(0, np.pi)
        proj = xx * np.cos(angle) + yy * np.sin(angle)
        if kind == 1:  # stripes
            freq = rng.uniform(3, 10)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * proj + rng.uniform(0, 2 * np.pi))
        else:  # linear gradient
            t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    t = np.clip(t, 0, 1)[..., None]
    return c0 * (1 - t) + c1 * t


def _shape_mask(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """A filled shape of class ``cls`` at a random position/scale/rotation: (size, size) bool."""
    radius = rng.uniform(0.07, 0.24) * size  # circumradius: ~3.4x scale variation
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    start = None if CLASSES[cls] == 'circle' else rng.uniform(0, 2 * np.pi)
    return draw_shape(cls, size, cx, cy, radius, start)


def draw_shape(cls: int, size: int, cx: float, cy: float, radius: float,
               start: Optional[float] = None) -> np.ndarray:
    """Filled shape ``CLASSES[cls]`` with circumradius ``radius`` centred at (cx, cy), its first
    corner at angle ``start`` (polygons): (size, size) bool."""
    import cv2
    canvas = np.zeros((size, size), np.uint8)
    if CLASSES[cls] == 'circle':
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), int(round(radius)), 1, -1,
                   lineType=cv2.LINE_8)
    else:
        corners = 4 if CLASSES[cls] == 'square' else 3
        angles = start + 2 * np.pi * np.arange(corners) / corners
        pts = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)
    return canvas.astype(bool)


def _has_hole(mask: np.ndarray) -> bool:
    """True when the region has an inner contour (a hole), which COCO polygons cannot express."""
    import cv2
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP,
                                           cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0][:, 3] >= 0).any())


def render_scene(seed: int, split: str, index: int, img_size: int = 128
                 ) -> Tuple[np.ndarray, np.ndarray, List[Tuple[int, np.ndarray]]]:
    """Render scene ``index`` of ``split``.

    Returns:
        image: (H, W, 3) uint8 RGB.
        label_map: (H, W) uint8, 0 background, 1 + class index elsewhere (visible class).
        instances: [(class index, visible mask (H, W) bool)] in drawing order.
    """
    rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])
    image = _background(rng, img_size)
    label_map = np.zeros((img_size, img_size), np.uint8)
    owner = np.full((img_size, img_size), -1, np.int32)  # index of the visible shape per pixel
    full_areas: List[int] = []
    classes: List[int] = []
    for _ in range(int(rng.integers(1, 6))):
        cls = int(rng.integers(len(CLASSES)))
        # Neighbouring classes' hue ranges overlap by a third: colour is a cue, not the answer.
        centre = cls / len(CLASSES)
        colour = _hsv_colour(rng, (0.6, 1.0), (0.55, 1.0),
                             (centre - HUE_JITTER, centre + HUE_JITTER))
        for _try in range(MAX_TRIES):
            mask = _shape_mask(rng, cls, img_size)
            if mask.sum() < MIN_AREA:
                continue
            trial = np.where(mask, len(classes), owner)
            if all((trial == k).sum() >= max(MIN_VISIBLE * full_areas[k], MIN_AREA)
                   and not _has_hole(trial == k) for k in range(len(classes))):
                break
        else:
            continue  # no acceptable placement: skip this shape
        owner = trial
        full_areas.append(int(mask.sum()))
        classes.append(cls)
        shade = 1.0 + rng.normal(0, 0.06, size=(img_size, img_size, 1))  # texture on the shape
        image = np.where(mask[..., None], colour * shade, image)
        label_map[mask] = cls + 1
    image = image + rng.normal(0, 6.0, size=image.shape)  # sensor noise over everything
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    instances = [(cls, owner == k) for k, cls in enumerate(classes)]
    return image, label_map, instances


# --------------------------------------------------------------------------------------------
# COCO annotations
# --------------------------------------------------------------------------------------------
def _polygons(mask: np.ndarray) -> List[List[float]]:
    """Outer contours of a hole-free mask as COCO polygons [x0, y0, x1, y1, ...] (>= 3 points)."""
    import cv2
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    # Contours run through pixel centres; +0.5 puts them in COCO's continuous pixel coordinates.
    return [[float(v) + 0.5 for v in c.reshape(-1)] for c in contours if len(c) >= 3]


def _coco_annotation(ann_id: int, image_id: int, cls: int, mask: np.ndarray) -> Optional[Dict]:
    polygons = _polygons(mask)
    if not polygons:
        return None
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    w, h = int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1
    return dict(id=ann_id, image_id=image_id, category_id=cls + 1, bbox=[x0, y0, w, h],
                area=int(mask.sum()), iscrowd=0, segmentation=polygons)


def _write_png(path: str, array: np.ndarray) -> None:
    import cv2
    img = array[..., ::-1] if array.ndim == 3 else array  # cv2 writes BGR
    if not cv2.imwrite(path, np.ascontiguousarray(img)):
        raise OSError(f'could not write {path}')


def _write_split(tmp_root: str, split: str, count: int, settings: Dict) -> None:
    coco_img_dir = osp.join(tmp_root, 'coco', split)
    seg_img_dir = osp.join(tmp_root, 'seg', 'img_dir', split)
    seg_ann_dir = osp.join(tmp_root, 'seg', 'ann_dir', split)
    for d in (coco_img_dir, seg_img_dir, seg_ann_dir):
        os.makedirs(d, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image, label_map, instances = render_scene(settings['seed'], split, index,
                                                   settings['img_size'])
        name = f'{index:06d}.png'
        _write_png(osp.join(coco_img_dir, name), image)
        shutil.copyfile(osp.join(coco_img_dir, name), osp.join(seg_img_dir, name))
        _write_png(osp.join(seg_ann_dir, name), label_map)
        image_id = index + 1
        images.append(dict(id=image_id, file_name=name, height=image.shape[0],
                           width=image.shape[1]))
        for cls, mask in instances:
            ann = _coco_annotation(len(annotations) + 1, image_id, cls, mask)
            if ann is not None:
                annotations.append(ann)
    coco = dict(info=dict(description='do_conv_mm toy shapes', version=FORMAT_VERSION),
                images=images, annotations=annotations,
                categories=[dict(id=i + 1, name=n) for i, n in enumerate(CLASSES)])
    ann_dir = osp.join(tmp_root, 'coco', 'annotations')
    os.makedirs(ann_dir, exist_ok=True)
    with open(osp.join(ann_dir, f'instances_{split}.json'), 'w') as f:
        json.dump(coco, f, separators=(',', ':'))


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
def _expected_files(settings: Dict) -> List[str]:
    files = [osp.join('coco', 'annotations', f'instances_{s}.json') for s in _SPLIT_IDS]
    for split in _SPLIT_IDS:
        for index in range(settings[f'num_{split}']):
            name = f'{index:06d}.png'
            files += [osp.join('coco', split, name), osp.join('seg', 'img_dir', split, name),
                      osp.join('seg', 'ann_dir', split, name)]
    return files


def _read_marker(root: str, marker: str = MARKER) -> Optional[Dict]:
    try:
        with open(osp.join(root, marker)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_complete(root: str, settings: Optional[Dict] = None) -> bool:
    """True when ``root`` holds a finished generation (with ``settings``, if given)."""
    return marker_complete(root, settings, MARKER, FORMAT_VERSION, _expected_files)


def marker_complete(root: str, settings: Optional[Dict], marker: str, format_version: int,
                    expected_files: Callable[[Dict], List[str]]) -> bool:
    """True when ``root``'s ``marker`` file names ``settings`` (any, if None) of this
    ``format_version`` (older generators' sets are incomplete) and every file
    ``expected_files(settings)`` lists exists."""
    found = _read_marker(root, marker)
    if found is None or (settings is not None and found.get('settings') != settings):
        return False
    if found.get('settings', {}).get('format_version') != format_version:
        return False
    return all(osp.isfile(osp.join(root, f)) for f in expected_files(found['settings']))


def generate_toy_data(root: str = DEFAULT_ROOT, num_train: int = 200, num_val: int = 50,
                      img_size: int = 128, seed: int = 0, force: bool = False) -> str:
    """Generate the toy dataset into ``root`` and return ``root``.

    Skips work when ``root`` already holds a complete generation with the same settings. Replaces
    an earlier generation (other settings, or incomplete) only with ``force``, and never replaces a
    file or a non-empty directory without ``toy_data.json`` (ValueError). The new data is built in
    a temporary sibling directory and only then swapped in, so an interrupted run leaves ``root``
    untouched.
    """
    settings = toy_settings(num_train, num_val, img_size, seed)

    def write(tmp_root: str) -> int:
        for split in _SPLIT_IDS:
            _write_split(tmp_root, split, settings[f'num_{split}'], settings)
        return len(_expected_files(settings))

    return write_dataset_atomically(root, settings, write, is_complete, MARKER, force)


def write_dataset_atomically(root: str, settings: Dict, write: Callable[[str], int],
                             complete: Callable[[str, Dict], bool], marker: str,
                             force: bool = False) -> str:
    """Generate a dataset into ``root`` all at once; return ``root`` (absolute).

    ``write(tmp_root)`` writes every file into an empty temporary sibling of ``root`` and returns
    the file count; the marker file (settings + count) is written last and the directory is then
    renamed into place, so ``root`` is either absent or complete. A complete generation with the
    same settings (``complete(root, settings)``) is kept unless ``force``; an earlier generation
    is replaced only with ``force``, and a file or a non-empty directory without ``marker`` never
    (ValueError).
    """
    root = osp.abspath(root)
    if complete(root, settings) and not force:
        return root
    if osp.exists(root):
        found = _read_marker(root, marker)
        if not osp.isdir(root):
            raise ValueError(f'{root} is a file, not a directory; choose another output '
                             'directory for the toy data')
        if found is None and os.listdir(root):
            # Never replaced, even with force: it may be anything (a typo'd --out, the repo).
            raise ValueError(f'{root} holds files that are not a toy dataset (no {marker}); '
                             'choose another output directory, or empty it yourself')
        if found is not None and not force:
            what = ('an incomplete toy dataset' if found.get('settings') == settings else
                    f'toy data generated with other settings {found.get("settings")}')
            raise ValueError(f'{root} already holds {what}; pass force=True (CLI: --force) to '
                             f'regenerate it with {settings}, or choose another output directory')
    parent = osp.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix='.toy_data_tmp_', dir=parent)
    try:
        files = write(tmp_root)
        with open(osp.join(tmp_root, marker), 'w') as f:
            json.dump(dict(settings=settings, files=files), f, indent=2, sort_keys=True)
        if osp.exists(root):
            if complete(root, settings) and not force:  # a concurrent run finished first
                return root
            old = tempfile.mkdtemp(prefix='.toy_data_old_', dir=parent)
            os.replace(root, osp.join(old, 'data'))
            os.replace(tmp_root, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp_root, root)
            except OSError:  # another process created root in the meantime
                if not complete(root, settings):
                    raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return root


def ensure_toy_data(root: str = DEFAULT_ROOT, **settings) -> str:
    """Return ``root``, generating the toy dataset there first if it is missing or incomplete.

    ``settings`` are ``generate_toy_data``'s (num_train, num_val, img_size, seed); left out, any
    complete generation in ``root`` is accepted and the defaults are used only to create one.
    """
    root = osp.abspath(root)
    if settings:
        expected = toy_settings(**settings)
        if is_complete(root, expected):
            return root
    elif is_complete(root):
        return root
    return generate_toy_data(root, **settings)


def _toy_kinds():
    """(config key, ensure(root), is_complete(root)) of each toy dataset a config may name."""
    from .toy_cls_data import ensure_toy_cls_data, is_cls_complete
    return (('toy_data_root', ensure_toy_data, is_complete),
            ('toy_cls_data_root', ensure_toy_cls_data, is_cls_complete))


def _named_roots(cfg):
    """(root, ensure, is_complete) for each toy data root the config names."""
    for key, ensure, complete in _toy_kinds():
        root = cfg.get(key) if hasattr(cfg, 'get') else None
        if root:
            yield osp.normpath(root), ensure, complete


def ensure_toy_data_for_config(cfg) -> Optional[str]:
    """Generate the toy data a config trains on, if it names any; return the first root or None.

    Toy configs (configs/toy/) declare ``toy_data_root`` (detection / segmentation scenes, this
    module) and/or ``toy_cls_data_root`` (classification images, :mod:`do_conv_mm.toy_cls_data`);
    other configs are left alone. ``cfg`` is an mmengine ``Config`` or a dict.
    """
    roots = [ensure(root) for root, ensure, _ in _named_roots(cfg)]
    return roots[0] if roots else None


def toy_data_missing_for_config(cfg) -> List[str]:
    """The toy data roots a config names that are not complete yet (empty: nothing to wait for)."""
    return [root for root, _, complete in _named_roots(cfg) if not complete(root)]
