"""Helpers for tests/test_training.py: running the tools, reading their logs, a rank-dump hook.

Imported by the tests and, through ``custom_imports``, by the training subprocesses (the tests
put this directory on PYTHONPATH), where it registers :class:`DOConvParamDumpHook`.
"""
import contextlib
import glob
import io
import json
import os
import os.path as osp
import socket
import subprocess
import sys
from typing import Tuple

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TESTS = osp.join(REPO, 'tests')


def tool_env(threads: int = 2) -> dict:
    """Environment for tool subprocesses: repo + tests importable, bounded CPU threads."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [REPO, TESTS] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env['OMP_NUM_THREADS'] = str(threads)
    env.setdefault('PYTHONWARNINGS', 'ignore')
    return env


def run(cmd, timeout: float = 300, threads: int = 2, env_extra=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repo; on failure raise with the tail of its output."""
    env = tool_env(threads)
    env.update(env_extra or {})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise AssertionError(f'{" ".join(map(str, cmd))} failed ({proc.returncode}):\n{tail}')
    return proc


def run_tool(tool: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, osp.join(REPO, 'tools', tool), *map(str, args)], **kwargs)


def tool_module(tool: str):
    """tools/<tool>.py imported as a module, to call its ``main(argv)`` in this process where a
    test uses the tool's result rather than its process (no second interpreter to start and no
    second import of torch / mmdet / mmseg). Loaded under a unique name: tools/test.py would
    clash with the stdlib's ``test`` package."""
    import importlib.util
    name = 'do_conv_mm_tools_' + osp.splitext(tool)[0]
    spec = importlib.util.spec_from_file_location(name, osp.join(REPO, 'tools', tool))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_tool(tool: str, *args) -> Tuple[str, str]:
    """tools/<tool>.py's ``main(ARGS)`` in this process (:func:`tool_module`): its (stdout,
    stderr). A failure (a non-zero exit code returned, or ``sys.exit('error: ...')``) fails
    the calling test with the output's tail."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = tool_module(tool).main([str(a) for a in args])
        except SystemExit as exit:
            result = exit.code
    failed = isinstance(result, str) or (isinstance(result, int) and result != 0)
    assert not failed, f'{tool} failed ({result}):\n{(out.getvalue() + err.getvalue())[-4000:]}'
    return out.getvalue(), err.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def logged_scalars(work_dir: str) -> list:
    """Every line of the runs' ``vis_data/scalars.json`` in ``work_dir``, oldest run first."""
    records = []
    for path in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def train_losses(work_dir: str) -> list:
    """(iter, loss) of every logged training iteration."""
    return [(r['iter'], r['loss']) for r in logged_scalars(work_dir) if 'loss' in r]


def doconv_params(model: torch.nn.Module) -> dict:
    """Copies of every DOConv layer's D and weight, keyed by parameter name."""
    from do_conv_mm import DOConv2d
    if is_model_wrapper(model):
        model = model.module
    params = {}
    for name, module in model.named_modules():
        if isinstance(module, DOConv2d) and module.D is not None:
            params[f'{name}.D'] = module.D.detach().clone()
            params[f'{name}.weight'] = module.weight.detach().clone()
    return params


@HOOKS.register_module()
class DOConvParamDumpHook(Hook):
    """Saves each rank's DOConv parameters before and after training to the work dir.

    Files: ``doconv_params_rank{R}_{init,final}.pth`` (plain tensor dicts).
    """
    priority = 'LOWEST'

    def _dump(self, runner, tag: str) -> None:
        path = osp.join(runner.work_dir, f'doconv_params_rank{get_rank()}_{tag}.pth')
        torch.save(doconv_params(runner.model), path)

    def before_train(self, runner) -> None:
        self._dump(runner, 'init')

    def after_train(self, runner) -> None:
        self._dump(runner, 'final')
