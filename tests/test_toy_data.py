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


@pytest.mark.parametrize('plain,doconv,n_components', [
    DET_CONFIGS + [3], SEG_CONFIGS + [3],
    ['cls_r18-tiny_toy.py', 'cls_r18-tiny-doconv_toy.py', 1]])
def test_doconv_twin_differs_only_by_convs(plain, doconv, n_components):
    """Same recipe: the DO-Conv config minus its DO-Conv keys equals the plain one."""
    from mmengine import Config
    plain_cfg = Config.fromfile(osp.join(TOY_CONFIGS, plain)).to_dict()
    do_cfg = Config.fromfile(osp.join(TOY_CONFIGS, doconv)).to_dict()
    assert do_cfg.pop('custom_imports') == dict(imports=['do_conv_mm'],
                                                allow_failed_imports=False)
    assert do_cfg.pop('conv_cfg') == dict(type='DOConv')
    components = [k for k, v in do_cfg['model'].items()
                  if isinstance(v, dict) and 'conv_cfg' in v]
    assert len(components) == n_components  # detectors/segmentors: backbone, neck and head
    for key in components:
        assert do_cfg['model'][key].pop('conv_cfg') == dict(type='DOConv')
        assert 'conv_cfg' not in plain_cfg['model'][key]
    assert do_cfg == plain_cfg


@pytest.mark.parametrize('doconv,pretrained,checkpoint,prefix', [
    ('retinanet_r18-tiny-doconv_fpn_toy.py', 'retinanet_r18-tiny-doconv-pretrained_fpn_toy.py',
     'work_dirs/cls_r18-tiny-doconv_toy/epoch_6.pth', 'backbone.'),
    ('fpn_r18-tiny-doconv_toy.py', 'fpn_r18-tiny-doconv-pretrained_toy.py',
     'work_dirs/cls_r18v1c-tiny-doconv_toy/backbone.pth', None)])
def test_pretrained_toy_configs_differ_only_by_the_backbone_init(doconv, pretrained, checkpoint,
                                                                 prefix):
    """The pretrained configs are their DO-Conv twin plus the backbone's init_cfg, pointing where
    the README's commands (tools/train.py with the classifier config's default work dir, then
    tools/extract_backbone.py for the deep stem) put the checkpoint."""
    from mmengine import Config
    base = Config.fromfile(osp.join(TOY_CONFIGS, doconv)).to_dict()
    cfg = Config.fromfile(osp.join(TOY_CONFIGS, pretrained)).to_dict()
    init_cfg = cfg['model']['backbone'].pop('init_cfg')
    assert init_cfg == dict(type='Pretrained', checkpoint=checkpoint,
                            **({'prefix': prefix} if prefix else {}))
    base['model']['backbone'].pop('init_cfg', None)
    assert cfg == base


# ------------------------------------------------------------------------------------------------
# Classification set (do_conv_mm/toy_cls_data.py, mmpretrain CustomDataset layout)
# ------------------------------------------------------------------------------------------------
CLS_SMALL = dict(num_train=16, num_val=8, img_size=48)


def test_cls_generation_is_deterministic_balanced_and_prefix_stable(tmp_path):
    from do_conv_mm.toy_cls_data import CLS_CLASSES, generate_toy_cls_data, render_crop
    a = _tree(generate_toy_cls_data(str(tmp_path / 'a'), **CLS_SMALL))
    b = _tree(generate_toy_cls_data(str(tmp_path / 'b'), **CLS_SMALL))
    assert a == b
    bigger = _tree(generate_toy_cls_data(str(tmp_path / 'c'), **dict(CLS_SMALL, num_train=20)))
    assert all(bigger[k] == v for k, v in a.items() if k != 'toy_cls_data.json')
    images = [k for k in a if k.endswith('.png')]
    assert len(images) == 24
    for split, count in (('train', 16), ('val', 8)):
        for cls in CLS_CLASSES:  # balanced: label = index % 4
            assert sum(k.startswith(osp.join(split, cls, '')) for k in images) == count // 4
    image, label = render_crop(0, 'train', 5, 48)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and label == 1
    assert np.array_equal(image[..., ::-1], _read_png(str(tmp_path / 'a' / 'train' / 'circle'
                                                          / '000005.png')))
    # Different splits and seeds draw different images.
    assert not np.array_equal(render_crop(0, 'val', 5, 48)[0], image)
    assert not np.array_equal(render_crop(1, 'train', 5, 48)[0], image)


def test_cls_labelled_shape_dominates_the_distractors():
    """The labelled shape is large and central: background images differ from shape images in
    the share of saturated pixels at the centre (what a classifier has to find)."""
    from do_conv_mm.toy_cls_data import render_crop
    import cv2

    def central_saturation(index):
        image, _ = render_crop(0, 'train', index, 64)
        hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
        return float((hsv[24:40, 24:40, 1] > 140).mean())

    background = [central_saturation(i) for i in range(0, 80, 4)]
    shapes = [central_saturation(i) for i in range(80) if i % 4]
    assert np.median(shapes) > 0.9 and np.median(background) < 0.2


def test_cls_refuses_foreign_directories_and_other_settings(tmp_path):
    from do_conv_mm.toy_cls_data import ensure_toy_cls_data, generate_toy_cls_data
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'mine.txt').write_text('keep me')
    with pytest.raises(ValueError, match='not a toy dataset'):
        generate_toy_cls_data(str(foreign), **CLS_SMALL)
    assert (foreign / 'mine.txt').read_text() == 'keep me'
    root = generate_toy_cls_data(str(tmp_path / 'data'), **CLS_SMALL)
    with pytest.raises(ValueError, match='other settings'):
        generate_toy_cls_data(root, **dict(CLS_SMALL, seed=3))
    assert ensure_toy_cls_data(root) == root  # any complete generation is accepted
    with pytest.raises(ValueError, match='img_size must be >= 32'):
        generate_toy_cls_data(str(tmp_path / 'x'), img_size=16)
    assert not (tmp_path / 'x').exists()


def test_cls_configs_load_the_set_with_their_class_order(tmp_path):
    pytest.importorskip('mmpretrain')
    from mmengine.config import Config
    from mmengine.registry import DATASETS, DefaultScope
    from do_conv_mm.toy_cls_data import CLS_CLASSES, generate_toy_cls_data
    root = generate_toy_cls_data(str(tmp_path / 'cls'), **CLS_SMALL)
    for name in ('cls_r18-tiny_toy.py', 'cls_r18-tiny-doconv_toy.py',
                 'cls_r18v1c-tiny-doconv_toy.py'):
        cfg = Config.fromfile(osp.join(TOY_CONFIGS, name))
        assert osp.normpath(cfg.toy_cls_data_root) == osp.join(REPO, 'data', 'toy_cls')
        for loader, count in (('train_dataloader', 16), ('val_dataloader', 8)):
            dataset_cfg = dict(cfg[loader].dataset, data_root=root)
            with DefaultScope.overwrite_default_scope('mmpretrain'):
                import mmpretrain.datasets  # noqa: F401
                dataset = DATASETS.build(dataset_cfg)
            assert len(dataset) == count and tuple(dataset.CLASSES) == CLS_CLASSES
            for index in range(count):  # label = class folder = generated index % 4
                sample = dataset[index]['data_samples']
                label = int(sample.gt_label)
                assert osp.basename(osp.dirname(sample.img_path)) == CLS_CLASSES[label]
                assert int(osp.basename(sample.img_path)[:6]) % 4 == label
            item = dataset[5]
            assert tuple(item['inputs'].shape) == (3, 48, 48)


def test_make_toy_data_tool_reports_an_unwritable_destination_in_one_line(tmp_path):
    """An OUT under a file (or without permission) was a 15-line OSError traceback."""
    import subprocess
    import sys
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'make_toy_data.py'),
                           '--out', str(blocker / 'toy'), '--num-train', '2', '--num-val', '1'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith('error: cannot write the toy data')
