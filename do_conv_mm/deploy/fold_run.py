"""One fold call's config-level work: CONFIG loaded and built once, then each checkpoint
loaded, folded, staged, re-read and (optionally) verified against the deploy model.
"""
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .atomic_write import StagedFiles
from ..checkpoint import load_checkpoint_file
from .checkpoint_fold import fold_checkpoint_dict
from ..config_loading import first_line_or_type
from ..deploy_config import make_deploy_config
from ..deploy_verify import (OutputDiff, compare_outputs, format_diffs, make_verify_batch,
                            model_outputs)
from .fold_errors import FoldError
from .fold_model import build_model, doconv_layers, load_model_config
from .fold_outputs import load_plain, reload_config

__all__ = ['FoldResult', 'FoldRun']


@dataclass
class FoldResult:
    """What one fold wrote and measured (seconds per stage: load, fold, save, verify)."""
    checkpoint: str
    out: str
    out_config: str
    num_folded: int
    deployed_weights: str  # 'state_dict', or 'state_dict (EMA weights)' for EMA checkpoints
    kept_ema: bool
    seconds: Dict[str, float] = field(default_factory=dict)
    verify: Optional[List[OutputDiff]] = None


class FoldRun:
    """Config-level state shared by every checkpoint of one call."""

    def __init__(self, config, cfg_options, out_config_path: str, log: Callable[[str], None]):
        self.log = log
        self.cfg = load_model_config(config, cfg_options)
        self.config_name = (os.path.basename(self.cfg.filename) if self.cfg.filename
                            else 'CONFIG')
        self.deploy_cfg = make_deploy_config(self.cfg)
        self.out_config = out_config_path
        self.model = build_model(self.cfg)
        if not doconv_layers(self.model):
            raise FoldError(f'{self.config_name} builds no DO-Conv layer (no k×k conv with '
                            f'conv_cfg=dict(type="DOConv") and no DOConvModel conversion), so '
                            f'there is nothing to fold; pass the DO-Conv training config of the '
                            f'checkpoint (mmengine keeps a copy in the training run\'s work dir, '
                            f'next to its checkpoints).')

    def fold_one(self, checkpoint: str, out: str, staged: StagedFiles, deploy_cfg_file: str,
                 use_ema: bool, verify: bool, verify_kwargs: dict) -> FoldResult:
        name = os.path.basename(checkpoint)
        seconds = {}
        start = time.perf_counter()
        try:
            ckpt = load_checkpoint_file(checkpoint)
        except ValueError as error:  # CheckpointError: one line with the fix already
            raise FoldError(str(error)) from None
        seconds['load'] = time.perf_counter() - start
        start = time.perf_counter()
        folded, info = fold_checkpoint_dict(self.model, ckpt, self.deploy_cfg, use_ema, name,
                                            self.config_name)
        del ckpt
        seconds['fold'] = time.perf_counter() - start
        start = time.perf_counter()
        tmp = staged.torch_save(folded, out)
        del folded
        written = load_plain(tmp)
        seconds['save'] = time.perf_counter() - start
        result = FoldResult(checkpoint, out, self.out_config, info['num_folded'],
                            info['deployed_weights'], info['kept_ema'], seconds)
        if verify:
            start = time.perf_counter()
            result.verify = self._verify(written['state_dict'], deploy_cfg_file, **verify_kwargs)
            seconds['verify'] = time.perf_counter() - start
        return result

    def _verify(self, state_dict, deploy_cfg_file: str, image, size, atol, rtol):
        from mmengine.registry import DefaultScope
        deploy_cfg = reload_config(deploy_cfg_file)
        deployed = build_model(deploy_cfg)
        try:
            deployed.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:  # a fold/deploy-config bug, not bad input: still one line
            raise FoldError(f'verify: the folded weights do not load into the deploy model '
                            f'({" ".join(str(error).split())[:300]}); nothing was '
                            f'written. This is a do_conv_mm bug, please report it with the '
                            f'config.') from None
        if doconv_layers(deployed):
            raise FoldError('verify: the deploy model still has DO-Conv layers; nothing was '
                            'written. This is a do_conv_mm bug, please report it with the '
                            'config.')
        with DefaultScope.overwrite_default_scope(self.cfg.get('default_scope')):
            try:
                batch = make_verify_batch(self.model, self.cfg, image, size)
            except (OSError, ValueError, TypeError, KeyError) as error:
                raise FoldError(f'--image {image!r} could not be read through the test pipeline '
                                f'({type(error).__name__}: {first_line_or_type(error)}); pass a '
                                f'readable image file or verify with random input.') from error
            reference, proposals = model_outputs(self.model, batch)
            outputs, _ = model_outputs(deployed, batch, proposals)
        diffs = compare_outputs(reference, outputs, atol, rtol)
        if not diffs:
            raise RuntimeError('verify: the model returned no output tensor to compare')
        self.log(format_diffs(diffs, atol, rtol))
        return diffs
