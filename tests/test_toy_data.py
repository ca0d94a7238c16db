"""Toy data: deterministic, valid COCO / mmseg annotations, loadable with the toy configs."""
import json
import os
import os.path as osp

import numpy as np
import pytest

from do_conv_mm.toy_data import (CLASSES, DEFAULT_ROOT, SEG_CLASSES, ensure_toy_data,
                                 ensure_toy_data_for_config, generate_toy_data, is_complete)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY_CONFIGS = osp.join(REPO, 'configs', 'toy')
DET_CONFIGS = ['retinanet_r18-tiny_fpn_toy.py', 'retinanet_r18-tiny-doconv_fpn_toy.py']
SEG_CONFIGS = ['fpn_r18-tiny_toy.py', 'fpn_r18-tiny-doconv_toy.py']
SMALL = dict(num_train=12, num_val=4, img_size=96)


def _tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = osp.join(dirpath, name)
            with open(path, 'rb') as f:
                out[osp.relpath(path, root)] = f.read()
    return out


def _read_png(path):
    import cv2
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


@pytest.fixture(scope='module')
def small_root(tmp_path_factory):
    return generate_toy_data(str(tmp_path_factory.mktemp('toy') / 'data'), **SMALL)


def test_generation_is_byte_identical_and_prefix_stable(tmp_path, small_root):
    again = generate_toy_data(str(tmp_path / 'again'), **SMALL)
    first, second = _tree(small_root), _tree(again)
    # 3 PNGs per scene + 2 COCO jsons + the marker.
    assert len(first) == 3 * (SMALL['num_train'] + SMALL['num_val']) + 3
    assert first == second
    # Each scene has its own RNG: fewer images give a prefix of the same images.
    fewer = generate_toy_data(str(tmp_path / 'fewer'), num_train=5, num_val=2, img_size=96)
    for name in ('coco/train/000004.png', 'seg/ann_dir/val/000001.png'):
        assert _tree(fewer)[name] == first[name]


def test_coco_annotations_are_valid(small_root):
    from pycocotools import mask as mask_utils
    for split in ('train', 'val'):
        with open(osp.join(small_root, 'coco', 'annotations', f'instances_{split}.json')) as f:
            coco = json.load(f)
        assert [c['name'] for c in coco['categories']] == list(CLASSES)
        images = {im['id']: im for im in coco['images']}
        assert len(images) == SMALL[f'num_{split}']
        assert len({a['id'] for a in coco['annotations']}) == len(coco['annotations'])
        assert len(coco['annotations']) >= len(images)  # every scene has >= 1 shape
        for ann in coco['annotations']:
            im = images[ann['image_id']]
            x, y, w, h = ann['bbox']
            assert ann['category_id'] in (1, 2, 3) and ann['iscrowd'] == 0
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= im['width'] and y + h <= im['height']
            assert ann['area'] > 0 and ann['segmentation']
            for poly in ann['segmentation']:
                assert len(poly) >= 6 and len(poly) % 2 == 0
            # The polygon rasterises onto pixels the seg label map gives the same class. Measured
            # agreement is 100% on the default data; 95% leaves room for pycocotools' boundary
            # rounding, while a wrong class or an offset polygon scores far lower.
            rle = mask_utils.merge(
                mask_utils.frPyObjects(ann['segmentation'], im['height'], im['width']))
            poly_mask = mask_utils.decode(rle).astype(bool)
            labels = _read_png(osp.join(small_root, 'seg', 'ann_dir', split, im['file_name']))
            agree = (labels[poly_mask] == ann['category_id']).mean()
            assert agree >= 0.95, (split, ann['id'], agree)
            ys, xs = np.nonzero(poly_mask)
            assert xs.min() >= x - 1 and xs.max() <= x + w and ys.min() >= y - 1 \
                and ys.max() <= y + h  # polygon inside its box, up to one boundary pixel


def test_seg_label_maps_hold_only_valid_ids(small_root):
    seen = set()
    for split in ('train', 'val'):
        img_dir = osp.join(small_root, 'seg', 'img_dir', split)
        ann_dir = osp.join(small_root, 'seg', 'ann_dir', split)
        assert sorted(os.listdir(img_dir)) == sorted(os.listdir(ann_dir))
        for name in os.listdir(ann_dir):
            labels = _read_png(osp.join(ann_dir, name))
            image = _read_png(osp.join(img_dir, name))
            assert labels.dtype == np.uint8 and labels.shape == image.shape[:2]
            assert set(np.unique(labels)) <= set(range(len(SEG_CLASSES)))
            seen |= set(np.unique(labels).tolist())
    assert seen == set(range(len(SEG_CLASSES)))  # every class occurs somewhere


def test_idempotent_and_refuses_to_overwrite(tmp_path):
    root = generate_toy_data(str(tmp_path / 'toy'), num_train=2, num_val=1, img_size=64)
    marker = osp.join(root, 'toy_data.json')
    stamp = os.stat(marker).st_mtime_ns
    assert generate_toy_data(root, num_train=2, num_val=1, img_size=64) == root
    assert ensure_toy_data(root) == root
    assert os.stat(marker).st_mtime_ns == stamp  # nothing rewritten
    with pytest.raises(ValueError, match='--force'):
        generate_toy_data(root, num_train=3, num_val=1, img_size=64)
    assert is_complete(root) and os.stat(marker).st_mtime_ns == stamp
    generate_toy_data(root, num_train=3, num_val=1, img_size=64, force=True)
    assert is_complete(root, None) and osp.isfile(osp.join(root, 'coco', 'train', '000002.png'))
    # A file, or a directory holding something else, is never touched, even with force.
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'keep.txt').write_text('mine')
    for force in (False, True):
        with pytest.raises(ValueError, match='not a toy dataset'):
            generate_toy_data(str(other), force=force)
        with pytest.raises(ValueError, match='is a file'):
            generate_toy_data(str(other / 'keep.txt'), force=force)
    assert os.listdir(other) == ['keep.txt'] and (other / 'keep.txt').read_text() == 'mine'
    # Missing files are detected; regenerating then needs force.
    os.remove(osp.join(root, 'seg', 'ann_dir', 'train', '000001.png'))
    assert not is_complete(root)
    with pytest.raises(ValueError, match='incomplete toy dataset'):
        ensure_toy_data(root, num_train=3, num_val=1, img_size=64)
    generate_toy_data(root, num_train=3, num_val=1, img_size=64, force=True)
    assert is_complete(root)
    # Bad settings are rejected before anything is written.
    with pytest.raises(ValueError, match='num_train must be a positive int'):
        generate_toy_data(str(tmp_path / 'bad'), num_train=0)
    assert not osp.exists(tmp_path / 'bad')


@pytest.mark.parametrize('name', DET_CONFIGS + SEG_CONFIGS)
def test_toy_configs_point_at_default_root(name):
    from mmengine import Config
    cfg = Config.fromfile(osp.join(TOY_CONFIGS, name))
    assert osp.normpath(cfg.toy_data_root) == DEFAULT_ROOT
    assert osp.normpath(cfg.train_dataloader.dataset.data_root).startswith(DEFAULT_ROOT)


def _build_dataset(cfg_name, split, root, scope):
    """Build ``split``'s dataset of a toy config, re-rooted at ``root``, in registry ``scope``."""
    from mmengine import Config
    from mmengine.registry import DATASETS, DefaultScope
    cfg = Config.fromfile(osp.join(TOY_CONFIGS, cfg_name))
    assert ensure_toy_data_for_config(Config(dict(toy_data_root=root))) == root
    ds_cfg = cfg[f'{split}_dataloader'].dataset
    sub = 'coco' if scope == 'mmdet' else 'seg'
    ds_cfg.data_root = osp.join(root, sub) + '/'
    with DefaultScope.overwrite_default_scope(scope):  # scoped: leaves other tests' scope alone
        return DATASETS.build(ds_cfg), cfg


@pytest.mark.parametrize('name', DET_CONFIGS)
@pytest.mark.parametrize('split', ['train', 'val'])
def test_det_dataset_loads_through_config(name, split, small_root):
    import mmdet.datasets  # noqa: F401  (registers mmdet's datasets and transforms)
    ds, cfg = _build_dataset(name, split, small_root, 'mmdet')
    assert ds.metainfo['classes'] == CLASSES and len(ds) > 0
    sample = ds[0]
    size = cfg.img_scale  # the pipeline resizes the 96 px test images to the configs' 128 px
    assert tuple(sample['inputs'].shape) == (3, size[1], size[0])
    gt = sample['data_samples'].gt_instances
    assert len(gt) > 0 and gt.labels.max() < len(CLASSES)
    boxes = gt.bboxes.tensor
    assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.max() <= max(size)


@pytest.mark.parametrize('name', SEG_CONFIGS)
@pytest.mark.parametrize('split', ['train', 'val'])
def test_seg_dataset_loads_through_config(name, split, small_root):
    import mmseg.datasets  # noqa: F401  (registers mmseg's datasets and transforms)
    ds, cfg = _build_dataset(name, split, small_root, 'mmseg')
    assert ds.metainfo['classes'] == SEG_CLASSES
    assert len(ds) == SMALL[f'num_{split}']
    sample = ds[0]
    size = cfg.crop_size  # the pipeline resizes the 96 px test images to the configs' 128 px
    assert tuple(sample['inputs'].shape) == (3, size[1], size[0])
    labels = sample['data_samples'].gt_sem_seg.data
    # The test pipeline loads labels after Resize: mmseg evaluates at the original resolution.
    label_hw = (size[1], size[0]) if split == 'train' else (SMALL['img_size'], ) * 2
    assert tuple(labels.shape) == (1, ) + label_hw
    assert set(labels.unique().tolist()) <= set(range(len(SEG_CLASSES)))


@pytest.mark.parametrize('plain,doconv', [DET_CONFIGS, SEG_CONFIGS])
def test_doconv_twin_differs_only_by_convs(plain, doconv):
    """Same recipe: the DO-Conv config minus its DO-Conv keys equals the plain one."""
    from mmengine import Config
    plain_cfg = Config.fromfile(osp.join(TOY_CONFIGS, plain)).to_dict()
    do_cfg = Config.fromfile(osp.join(TOY_CONFIGS, doconv)).to_dict()
    assert do_cfg.pop('custom_imports') == dict(imports=['do_conv_mm'],
                                                allow_failed_imports=False)
    assert do_cfg.pop('conv_cfg') == dict(type='DOConv')
    components = [k for k, v in do_cfg['model'].items()
                  if isinstance(v, dict) and 'conv_cfg' in v]
    assert len(components) == 3  # backbone, neck and head all opt in
    for key in components:
        assert do_cfg['model'][key].pop('conv_cfg') == dict(type='DOConv')
        assert 'conv_cfg' not in plain_cfg['model'][key]
    assert do_cfg == plain_cfg
