# ResNeXt-50 32x4d ImageNet-1k (8×32, 100 epochs) with DO-Conv: every k×k conv of the backbone
# (7×7 stem, 16 grouped 3×3s with groups=32, D tied to each conv's real input channel; the 1×1s
# stay plain). The head is Linear.
_base_ = 'mmpretrain::resnext/resnext50-32x4d_8xb32_in1k.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

model = dict(backbone=dict(conv_cfg=dict(type='DOConv')))
