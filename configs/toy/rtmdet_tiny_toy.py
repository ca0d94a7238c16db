# Plain-conv RTMDet-tiny on the bundled toy shapes (128 px, 3 classes); 4 epochs (100 iterations)
# on 2 CPU cores. Twin of rtmdet_tiny-doconv_toy.py, which changes nothing but the convs.
# The model is mmdet's RTMDet-tiny (CSPNeXt-tiny, CSPNeXt-PAFPN, RTMDetSepBNHead whose stacked
# convs are shared across the 3 levels: share_conv=True) with BN instead of SyncBN and no
# pretrained backbone; data and pipeline are the toy RetinaNet's (no Mosaic/MixUp), with a
# third of its schedule (an RTMDet-tiny step costs several toy-RetinaNet steps on a CPU).
_base_ = 'mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py'

# Generated on demand by `python tools/make_toy_data.py` (or do_conv_mm.toy_data.ensure_toy_data).
toy_data_root = '{{ fileDirname }}/../../data/toy'
data_root = toy_data_root + '/coco/'
classes = ('circle', 'square', 'triangle')
img_scale = (128, 128)
norm_cfg = dict(type='BN')

model = dict(
    backbone=dict(norm_cfg=norm_cfg, init_cfg=None),  # no ImageNet checkpoint download
    neck=dict(norm_cfg=norm_cfg),
    bbox_head=dict(num_classes=len(classes), norm_cfg=norm_cfg),
    test_cfg=dict(nms_pre=1000, max_per_img=100))

# ---------------------------------------------------------------- data
backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    pin_memory=False,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    pin_memory=False,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# ---------------------------------------------------------------- schedule
max_epochs = 4
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs, dynamic_intervals=None)
optim_wrapper = dict(optimizer=dict(lr=2e-3), clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=25),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min=1e-5)
]
auto_scale_lr = dict(enable=False, base_batch_size=8)

# ---------------------------------------------------------------- runtime
default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=-1))
# RTMDet's EMA of the weights is kept; its PipelineSwitchHook (Mosaic -> plain pipeline at
# epoch 280) has nothing to switch here.
custom_hooks = [
    dict(
        type='EMAHook',
        ema_type='ExpMomentumEMA',
        momentum=0.0002,
        update_buffers=True,
        priority=49)
]
env_cfg = dict(mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0))
log_processor = dict(window_size=25)
randomness = dict(seed=0)
