# The toy DO-Conv segmentor starting from a DO-Conv-pretrained ResNetV1c backbone, D included:
#   python tools/train.py configs/toy/cls_r18v1c-tiny-doconv_toy.py        # pretrain (mmpretrain)
#   python tools/extract_backbone.py work_dirs/cls_r18v1c-tiny-doconv_toy/epoch_6.pth \
#       work_dirs/cls_r18v1c-tiny-doconv_toy/backbone.pth --config THIS_CONFIG
#   python tools/train.py configs/toy/fpn_r18-tiny-doconv-pretrained_toy.py
# The extraction renames mmpretrain's deep-stem keys (stem.N.conv / stem.N.bn) to mmseg's
# (stem.3N / stem.3N+1); the other keys already match. Another checkpoint:
# --cfg-options model.backbone.init_cfg.checkpoint=PATH.
_base_ = './fpn_r18-tiny-doconv_toy.py'

model = dict(
    backbone=dict(
        init_cfg=dict(
            type='Pretrained',
            checkpoint='work_dirs/cls_r18v1c-tiny-doconv_toy/backbone.pth')))
