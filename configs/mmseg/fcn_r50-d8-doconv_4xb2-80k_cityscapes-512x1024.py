# FCN R50-D8 Cityscapes 512x1024 80k with DO-Conv: every k×k conv of backbone, decode head and
# auxiliary head (their conv_seg predictors are 1×1). Norm stays the base's SyncBN (multi-GPU).
_base_ = 'mmseg::fcn/fcn_r50-d8_4xb2-80k_cityscapes-512x1024.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

conv_cfg = dict(type='DOConv')
model = dict(
    backbone=dict(conv_cfg=conv_cfg),
    decode_head=dict(conv_cfg=conv_cfg),
    auxiliary_head=dict(conv_cfg=conv_cfg))
