# DO-Conv twin of cls_r18-tiny_toy.py: identical recipe, DO-Conv in every k×k conv of the backbone
# (7×7 stem, BasicBlock 3×3s; 1×1 downsamples stay plain convs). Its checkpoint (D included)
# initialises the toy DO-Conv detector: see README "Pretrain, transfer, fold".
_base_ = './cls_r18-tiny_toy.py'

custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)
conv_cfg = dict(type='DOConv')
model = dict(backbone=dict(conv_cfg=conv_cfg))
