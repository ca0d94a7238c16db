"""do_conv_mm: DO-Conv (depthwise over-parameterised convolution) for OpenMMLab.

Importing the package registers ``DOConv`` (alias ``DOConv2d``) as an mmcv conv layer type, and
``DOConvAdaptivePadding`` / ``DOConvWS``, the DO-Conv twins of mmcv's ``Conv2dAdaptivePadding`` /
``ConvWS``, so
``conv_cfg=dict(type='DOConv')`` works in any mmdet / mmseg / mmpretrain config that imports it
through ``custom_imports=dict(imports=['do_conv_mm'], allow_failed_imports=False)``. The by-name
converter ``DOConvModel`` goes into mmdet's, mmseg's and mmpretrain's ``MODELS`` (whichever are
installed; not mmengine's root, where only conv layers belong).
"""
# First: importing stack_check checks torch and mmcv (no pip requirements) and names the fix.
from .stack_check import check_stack
from .amp import BF16AmpOptimWrapper
from .checkpoint import CheckpointError, allow_mmengine_checkpoint_types, load_checkpoint_file
from .config_check import check_doconv_cfg
from .convert import DOConvModel, convert_to_doconv, register_doconv_model
from .deploy import FoldError, fold_checkpoint, fold_checkpoints, make_deploy_config
from .doconv import DOConv2d, compose_kernel
from .doconv_adaptive_padding import DOConv2dAdaptivePadding
from .doconv_ws import DOConv2dWS
from .fold import count_doconv, fold_doconv, fold_state_dict
from .model_tools import register_model_tools
from .pretrained import (PretrainedMismatchError, backbone_state_dict, check_pretrained_inits,
                         check_pretrained_state_dict)
from .version import __version__

register_model_tools()

__all__ = [
    'DOConv2d', 'DOConv2dAdaptivePadding', 'DOConv2dWS', 'compose_kernel', 'count_doconv',
    'fold_doconv', 'fold_state_dict',
    'DOConvModel', 'check_doconv_cfg', 'convert_to_doconv', 'register_doconv_model',
    'FoldError', 'fold_checkpoint', 'fold_checkpoints', 'make_deploy_config',
    'BF16AmpOptimWrapper', 'CheckpointError', 'allow_mmengine_checkpoint_types',
    'load_checkpoint_file', 'PretrainedMismatchError', 'backbone_state_dict',
    'check_pretrained_inits', 'check_pretrained_state_dict', 'check_stack', '__version__'
]
