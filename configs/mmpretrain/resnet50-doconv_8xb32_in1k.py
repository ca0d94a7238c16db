# ResNet-50 ImageNet-1k (8×32, 100 epochs) with DO-Conv: every k×k conv of the backbone (7×7 stem,
# 16 bottleneck 3×3s; the 1×1s stay plain). The head is Linear. Its backbone keys (D included) are
# those of the configs/mmdet R50 backbones, so its checkpoint initialises them with
# init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.').
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

model = dict(backbone=dict(conv_cfg=dict(type='DOConv')))
