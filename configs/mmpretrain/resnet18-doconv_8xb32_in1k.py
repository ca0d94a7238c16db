# ResNet-18 ImageNet-1k (8×32, 100 epochs) with DO-Conv: every k×k conv of the backbone (7×7 stem,
# 8 BasicBlocks × two 3×3s; the 1×1 downsamples stay plain). The head is Linear.
_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

model = dict(backbone=dict(conv_cfg=dict(type='DOConv')))
