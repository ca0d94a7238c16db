# Plain-conv image classifier on the bundled toy classification set (64 px; background + 3 shape
# classes, see do_conv_mm/toy_cls_data.py); trains on 2 CPU cores in about a minute. Twin of
# cls_r18-tiny-doconv_toy.py, which changes nothing but the convs.
# Its backbone is exactly the toy detectors' (mmpretrain ResNet-18 layout, 16 stem/base channels,
# pytorch style): the checkpoint's backbone.* keys are those of
# retinanet_r18-tiny[-doconv]_fpn_toy.py's backbone, so a detector starts from it with
# init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.').
_base_ = 'mmpretrain::_base_/default_runtime.py'
default_scope = 'mmpretrain'

# Generated on demand (do_conv_mm.toy_cls_data.ensure_toy_cls_data; tools/make_toy_data.py --cls).
toy_cls_data_root = '{{ fileDirname }}/../../data/toy_cls'
classes = ('background', 'circle', 'square', 'triangle')
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='ResNet',
        depth=18,
        stem_channels=16,
        base_channels=16,
        num_stages=4,
        out_indices=(3, ),
        norm_cfg=norm_cfg,
        style='pytorch'),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=len(classes),
        in_channels=128,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, )))

# ---------------------------------------------------------------- data
data_preprocessor = dict(
    num_classes=len(classes),
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type='CustomDataset',
        data_root=toy_cls_data_root,
        data_prefix='train',
        classes=classes,
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=50,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CustomDataset',
        data_root=toy_cls_data_root,
        data_prefix='val',
        classes=classes,
        pipeline=test_pipeline))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# ---------------------------------------------------------------- schedule
max_epochs = 6
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict()
test_cfg = dict()
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=25),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min=1e-4)
]
auto_scale_lr = dict(base_batch_size=32)

# ---------------------------------------------------------------- runtime
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=25),
    checkpoint=dict(type='CheckpointHook', interval=max_epochs))
log_processor = dict(window_size=25, by_epoch=True)
randomness = dict(seed=0)
