# UNet-S5-D16 + FCN 160k Cityscapes 512×1024 with DO-Conv: every k×k conv of the UNet encoder and
# decoder and of the FCN decode / auxiliary heads, through conv_cfg.
_base_ = 'mmseg::unet/unet-s5-d16_fcn_4xb4-160k_cityscapes-512x1024.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

conv_cfg = dict(type='DOConv')
model = dict(
    # The base backbone sets conv_cfg=None, and mmengine merges a dict into None only with
    # _delete_=True (else: "conv_cfg ... cannot inherit from base"). The heads have no conv_cfg
    # in the base: there _delete_ would not be consumed and would reach the layer.
    backbone=dict(conv_cfg=dict(_delete_=True, type='DOConv')),
    decode_head=dict(conv_cfg=conv_cfg),
    auxiliary_head=dict(conv_cfg=conv_cfg))
