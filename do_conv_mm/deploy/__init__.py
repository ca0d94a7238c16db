"""Fold DO-Conv training checkpoints into plain-conv deploy checkpoints (+ the deploy config).

Invariants of :func:`fold_checkpoint` / :func:`fold_checkpoints`:

* Folding uses the model built from CONFIG: the checkpoint must strict-load into it (missing,
  unexpected or mis-shaped keys are refused), then :func:`do_conv_mm.fold_doconv` replaces every
  DOConv2d by its plain Conv2d and the folded model's ``state_dict`` is written. Its keys are the
  training keys minus ``.D`` / ``.weight_extra``; it strict-loads into the deploy config.
* Reads full mmengine training checkpoints, slim ``{meta, state_dict}`` ones, bare state dicts and
  EMA checkpoints. mmengine's EMAHook saves the averaged weights as ``state_dict`` and the raw
  ones as ``ema_state_dict`` (it swaps them at save): ``state_dict`` is deployed, the EMA
  weights where there are any, as mmdet's / mmseg's test tools use them; ``ema_state_dict`` is
  folded too and kept; ``use_ema`` refuses a checkpoint without EMA.
  Optimizer, message hub and scheduler states are dropped. The output is
  ``{meta, state_dict[, ema_state_dict]}`` and loads with ``torch.load(weights_only=True)``
  without any allow-list (meta is reduced to plain Python types).
* Writes are atomic (temporary file in the destination directory, then ``os.replace``); on any
  error nothing is written and the inputs are never modified. Expected problems raise
  :class:`FoldError` with one line naming the problem and the fix.

The steps live in their own modules: :mod:`.fold_model` (CONFIG, model), :mod:`.checkpoint_match`
(which weights, checked), :mod:`.checkpoint_fold` (the folded checkpoint dict),
:mod:`.output_checks` / :mod:`.fold_outputs` (what may be written where), :mod:`.atomic_write`
(staged writes), :mod:`.fold_run` (one checkpoint at a time), :mod:`.fold_progress` (display).
"""
import os
from typing import Callable, List, Optional, Sequence, Union

from mmengine.config import Config

from .atomic_write import StagedFiles, save_atomically
from .checkpoint_fold import fold_checkpoint_dict
from .checkpoint_match import checkpoint_weights
from ..deploy_config import make_deploy_config
from ..deploy_verify import DEFAULT_ATOL, DEFAULT_RTOL, OutputDiff
from .fold_errors import FoldError, FoldVerificationError
from .fold_model import PathLike, build_model
from .fold_outputs import default_out_config, deploy_config_header, preflight, reload_config
from .fold_progress import ProgressBar, summary_line
from .fold_run import FoldResult, FoldRun
from .output_checks import check_checkpoint_output

__all__ = ['FoldError', 'FoldVerificationError', 'FoldResult', 'fold_checkpoint',
           'fold_checkpoints', 'fold_checkpoint_dict', 'checkpoint_weights', 'build_model',
           'make_deploy_config', 'OutputDiff', 'DEFAULT_ATOL', 'DEFAULT_RTOL',
           # for the other tools that write checkpoints (tools/extract_backbone.py,
           # tools/convert_reference_checkpoint.py)
           'check_checkpoint_output', 'save_atomically']


def fold_checkpoints(config: Union[Config, PathLike],
                     checkpoints: Sequence[PathLike],
                     out_dir: PathLike,
                     *,
                     outs: Optional[Sequence[PathLike]] = None,
                     out_config: Optional[PathLike] = None,
                     use_ema: bool = False,
                     verify: bool = False,
                     image: Optional[PathLike] = None,
                     verify_size: Sequence[int] = (128, 128),
                     atol: float = DEFAULT_ATOL,
                     rtol: float = DEFAULT_RTOL,
                     cfg_options: Optional[dict] = None,
                     progress: bool = False,
                     overwrite: bool = False,
                     log: Callable[[str], None] = print) -> List[FoldResult]:
    """Fold several checkpoints of one config; each goes to ``out_dir/<its file name>``.

    ``outs`` overrides the output paths (one per checkpoint). The deploy config goes to
    ``out_config`` (default ``out_dir/<config stem>_deploy.py``) and is written once, after the
    checkpoints. Each checkpoint is written atomically; with ``verify`` a checkpoint whose outputs
    differ beyond ``atol + rtol * max|ref|`` is not written. A failing checkpoint does not stop
    the others; the call then raises :class:`FoldError` listing the failures (with the deploy
    config written if any checkpoint succeeded). ``progress`` shows a rich progress bar. An
    existing file at an output path is replaced only if the fold wrote it (a folded checkpoint,
    a deploy config with its first-line mark: a rerun), or with ``overwrite``.
    """
    checkpoints = [os.fspath(c) for c in checkpoints]
    if not checkpoints:
        raise FoldError('no CHECKPOINT given; pass at least one .pth file.')
    out_dir = os.fspath(out_dir)
    outs = ([os.fspath(o) for o in outs] if outs is not None else
            [os.path.join(out_dir, os.path.basename(c)) for c in checkpoints])
    out_config = os.fspath(out_config) if out_config else default_out_config(config, out_dir)
    preflight(config, checkpoints, outs, out_config, overwrite)
    verify_kwargs = dict(image=None if image is None else os.fspath(image), size=verify_size,
                         atol=atol, rtol=rtol)
    if image is not None and not os.path.isfile(os.fspath(image)):
        raise FoldError(f'--image {os.fspath(image)!r} does not exist or is not a file; pass an '
                        f'image file, or leave --image out to verify with random input.')

    run = FoldRun(config, cfg_options, out_config, log)
    config_stage = StagedFiles()
    results: List[FoldResult] = []
    failures: List[str] = []
    try:
        deploy_cfg_file = config_stage.config(run.deploy_cfg, out_config,
                                              deploy_config_header(out_config))
        reload_config(deploy_cfg_file)
        with ProgressBar(progress, len(checkpoints)) as advance:
            for checkpoint, out in zip(checkpoints, outs):
                staged = StagedFiles()
                try:
                    result = run.fold_one(checkpoint, out, staged, deploy_cfg_file, use_ema,
                                          verify, verify_kwargs)
                    if result.verify is not None and not all(d.ok for d in result.verify):
                        bad = [d for d in result.verify if not d.ok]
                        raise FoldVerificationError(
                            f'{os.path.basename(checkpoint)}: verify failed, {len(bad)} output(s) '
                            f'beyond tolerance (worst {bad[0].name}: max abs '
                            f'{max(d.max_abs for d in bad):.3e}); nothing was written. Check '
                            f'that CONFIG is the training config, or loosen --rtol/--atol.',
                            result.verify)
                    staged.commit()
                    results.append(result)
                    log(summary_line(result))
                except FoldError as error:
                    if len(checkpoints) == 1:
                        raise
                    failures.append(str(error))
                    log(f'failed: {error}')
                finally:
                    staged.discard()  # (nothing left to discard after a commit)
                    advance()
        if results:
            config_stage.commit()
            log(f'deploy config: {out_config}')
    finally:
        config_stage.discard()
    if failures:
        raise FoldError(f'{len(failures)} of {len(checkpoints)} checkpoints failed (the others '
                        f'were written): ' + ' | '.join(failures))
    return results


def fold_checkpoint(config: Union[Config, PathLike],
                    checkpoint: PathLike,
                    out: PathLike,
                    *,
                    out_config: Optional[PathLike] = None,
                    **kwargs) -> FoldResult:
    """Fold one DO-Conv checkpoint into ``out`` and write the deploy config.

    ``out_config`` defaults to ``<dir of out>/<config stem>_deploy.py``. Keyword arguments are
    those of :func:`fold_checkpoints` (``use_ema``, ``verify``, ``image``, ``verify_size``,
    ``atol``, ``rtol``, ``cfg_options``, ``log``). Raises :class:`FoldError` (nothing written).
    """
    out = os.fspath(out)
    out_dir = os.path.dirname(os.path.abspath(out))
    return fold_checkpoints(config, [checkpoint], out_dir, outs=[out], out_config=out_config,
                            **kwargs)[0]
