# FCN HRNetV2-W18 80k Cityscapes 512×1024 with DO-Conv: every k×k conv of the HRNet backbone
# (stem, branch blocks, the strided 3×3s of the fuse layers) through conv_cfg; the FCN head of
# this recipe is 1×1 only.
_base_ = 'mmseg::hrnet/fcn_hr18_4xb2-80k_cityscapes-512x1024.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

conv_cfg = dict(type='DOConv')
model = dict(backbone=dict(conv_cfg=conv_cfg), decode_head=dict(conv_cfg=conv_cfg))
