# Mask R-CNN R50-FPN 1x COCO with DO-Conv: every k×k conv of backbone, neck, RPN and mask head
# (the mask head's 2×2 transposed upsampling conv stays plain: DO-Conv covers forward convs).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

conv_cfg = dict(type='DOConv')
model = dict(
    # RPNHead builds its 3×3 rpn_conv as a plain nn.Conv2d and takes no conv_cfg:
    # DOConvModel converts it by name (state_dict keys unchanged).
    type='DOConvModel',
    model_type='MaskRCNN',
    doconv=dict(include=['rpn_head.rpn_conv']),
    backbone=dict(conv_cfg=conv_cfg),
    neck=dict(conv_cfg=conv_cfg),
    roi_head=dict(
        bbox_head=dict(conv_cfg=conv_cfg),  # Shared2FCBBoxHead: no convs
        mask_head=dict(conv_cfg=conv_cfg)))
