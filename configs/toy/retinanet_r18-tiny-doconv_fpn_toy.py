# DO-Conv twin of retinanet_r18-tiny_fpn_toy.py: identical recipe, DO-Conv in every conv that
# takes conv_cfg (backbone, FPN, head's stacked convs). retina_cls/retina_reg stay plain.
_base_ = './retinanet_r18-tiny_fpn_toy.py'

custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)
conv_cfg = dict(type='DOConv')
model = dict(
    backbone=dict(conv_cfg=conv_cfg),
    neck=dict(conv_cfg=conv_cfg),
    bbox_head=dict(conv_cfg=conv_cfg))
