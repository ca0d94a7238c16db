"""tools/install.sh decides right on fresh, existing-CPU and existing-GPU machines (issues 10, 12).

The decisions are tested without installing anything: ``DOCONV_INSTALL_DRY_RUN=1`` makes the
script print each install command (``would run: ...``) instead of running it, and ``PYTHON``
points it at a fake interpreter that answers the script's probe with the facts of the machine
under test (torch build, GPU, mmcv, ...). A fake ``nvcc`` on PATH stands for a CUDA toolkit.
One more test runs the dry run against this machine's real Python.
"""
import os
import os.path as osp
import stat
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SCRIPT = osp.join(REPO, 'tools', 'install.sh')
STACK = ('mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 ftfy regex pytest onnx '
         'scikit-learn matplotlib')
TORCH = 'python -m pip install torch==2.13.0,!=2.13.0+cpu torchvision==0.28.0'
PRETRAIN = 'python -m pip install mmpretrain==1.2.0'

FRESH = dict(torch='none', torch_in_range='no', torch_imports='no', torch_cuda='none',
             gpu_arch='none', torchvision='none', torchvision_imports='no', mmpretrain='none',
             mmcv='none', mmcv_in_range='no', mmcv_ops='no',
             mmcv_ops_cuda='none', mmcv_other_dists='none', build_tools='no',
             stack_missing=STACK, do_conv_mm_here='no')
# A set-up OpenMMLab GPU machine: CUDA torch, mmcv with CUDA ops, the rest pinned.
GPU_READY = dict(FRESH, torch='2.11.0+cu130', torch_in_range='yes', torch_imports='yes',
                 torch_cuda='13.0', gpu_arch='9.0', mmcv='2.1.0', mmcv_in_range='yes',
                 mmcv_ops='yes', mmcv_ops_cuda='13.0', build_tools='yes', stack_missing='none',
                 torchvision='0.26.0+cu130', torchvision_imports='yes', mmpretrain='1.2.0',
                 do_conv_mm_here='yes')
# A GPU machine with a CUDA torch and nothing else.
GPU_BARE = dict(FRESH, torch='2.11.0+cu130', torch_in_range='yes', torch_imports='yes',
                torch_cuda='13.0', gpu_arch='9.0')


def facts_text(facts: dict) -> str:
    """What the script's probe prints for ``facts``: ``key=value`` lines."""
    return ''.join(f'{k}={v}\n' for k, v in facts.items())


def run_script(env: dict, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def stateful_python(tmp_path, facts: dict, arms: str):
    """A fake interpreter for runs that are not dry: its probe (``python - CHECKOUT STACK...``)
    answers from a state file holding ``facts`` at first; ``arms`` are more bash ``case "$*"``
    arms (a fake mmcv build that copies other facts over ``$STATE``, say). Returns (its path,
    the state file)."""
    state = tmp_path / 'facts.txt'
    state.write_text(facts_text(facts))
    python = tmp_path / 'fake-python'
    python.write_text(f'#!/bin/bash\nSTATE={state}\ncase "$*" in\n  "- "*) cat "$STATE" ;;\n'
                      f'{arms}esac\n')
    python.chmod(0o755)
    return python, state


def dry_run(tmp_path, facts: dict, nvcc: bool = False, env_extra: dict = None):
    """(exit code, install commands it would run, stderr), with ``python`` as a placeholder
    for the fake interpreter's path."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir(exist_ok=True)
    facts_file = tmp_path / 'facts.txt'
    facts_file.write_text(facts_text(facts))
    fake_python = bin_dir / 'fake-python'
    fake_python.write_text(f'#!/bin/sh\ncat {facts_file}\n')
    tools = [fake_python]
    if nvcc:
        tools.append(bin_dir / 'nvcc')
        tools[-1].write_text('#!/bin/sh\necho "nvcc fake"\n')
    for tool in tools:
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(tmp_path),
           'PYTHON': str(fake_python), 'DOCONV_INSTALL_DRY_RUN': '1',
           'CUDA_HOME': str(tmp_path / 'no-cuda')}
    env.update(env_extra or {})
    proc = run_script(env)
    commands = [line[len('would run: '):].replace(str(fake_python), 'python')
                for line in proc.stdout.splitlines() if line.startswith('would run: ')]
    return proc.returncode, commands, proc.stderr


def test_fresh_cpu_machine_installs_the_verified_stack_in_order(tmp_path):
    code, commands, _ = dry_run(tmp_path, FRESH)
    assert code == 0
    assert commands == [
        TORCH,
        'python -m pip install setuptools==80.9.0 wheel ninja',
        'env MAX_JOBS=2 python -m pip install --no-build-isolation mmcv==2.1.0',
        f'python -m pip install {STACK}',
        PRETRAIN,
        'python -m pip install --no-build-isolation --no-deps -e .',
    ]


def test_fresh_machine_with_nvcc_but_no_torch_still_builds_cpu_ops(tmp_path):
    # No torch yet: the torch to be installed (2.13.0 here) decides, and the dry run cannot know
    # it, so the fresh-machine commands stay exactly those of a CPU machine.
    code, commands, _ = dry_run(tmp_path, FRESH, nvcc=True)
    assert code == 0 and 'env MAX_JOBS=2 python -m pip install --no-build-isolation ' \
        'mmcv==2.1.0' in commands and not any('FORCE_CUDA' in c for c in commands)


def test_ready_gpu_environment_is_left_alone(tmp_path):
    code, commands, stderr = dry_run(tmp_path, GPU_READY, nvcc=True)
    assert code == 0 and commands == [] and stderr == ''


def test_cuda_torch_is_kept_and_mmcv_built_with_cuda_ops_for_the_visible_gpu(tmp_path):
    code, commands, _ = dry_run(tmp_path, GPU_BARE, nvcc=True)
    assert code == 0
    assert not any('torch==' in c for c in commands), commands  # torch is never (re)installed
    assert 'env MAX_JOBS=2 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python -m pip install ' \
        '--no-build-isolation mmcv==2.1.0' in commands


def test_explicit_arch_list_and_max_jobs_are_respected(tmp_path):
    code, commands, _ = dry_run(tmp_path, GPU_BARE, nvcc=True,
                                env_extra={'TORCH_CUDA_ARCH_LIST': '8.0;9.0', 'MAX_JOBS': '16'})
    assert code == 0 and 'env MAX_JOBS=16 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=8.0;9.0 python -m ' \
        'pip install --no-build-isolation mmcv==2.1.0' in commands


def test_nvcc_through_cuda_home_counts(tmp_path):
    cuda_bin = tmp_path / 'cuda' / 'bin'
    cuda_bin.mkdir(parents=True)
    (cuda_bin / 'nvcc').write_text('#!/bin/sh\n')
    (cuda_bin / 'nvcc').chmod(0o755)
    _, commands, _ = dry_run(tmp_path, GPU_BARE, env_extra={'CUDA_HOME': str(tmp_path / 'cuda')})
    assert any('FORCE_CUDA=1' in c for c in commands)


def test_cuda_torch_without_nvcc_builds_cpu_ops_and_says_why(tmp_path):
    code, commands, stderr = dry_run(tmp_path, GPU_BARE, nvcc=False)
    assert code == 0
    assert 'env MAX_JOBS=2 python -m pip install --no-build-isolation mmcv==2.1.0' in commands
    assert 'nvcc is not found' in stderr and 'CPU ops only' in stderr


def test_no_visible_gpu_and_no_arch_list_builds_cpu_ops_and_says_how_to_get_cuda(tmp_path):
    # CI and fresh CPU machines of this kind: PyPI's torch is a CUDA build and nvcc is installed,
    # but building CUDA ops for every architecture would take hours.
    code, commands, stderr = dry_run(tmp_path, dict(GPU_BARE, gpu_arch='none'), nvcc=True)
    assert code == 0
    assert 'env MAX_JOBS=2 python -m pip install --no-build-isolation mmcv==2.1.0' in commands
    assert 'no GPU visible and TORCH_CUDA_ARCH_LIST unset' in stderr
    assert 'set TORCH_CUDA_ARCH_LIST' in stderr


def test_no_visible_gpu_with_arch_list_builds_cuda_ops_for_it(tmp_path):
    _, commands, _ = dry_run(tmp_path, dict(GPU_BARE, gpu_arch='none'), nvcc=True,
                             env_extra={'TORCH_CUDA_ARCH_LIST': '8.6'})
    assert 'env MAX_JOBS=2 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=8.6 python -m pip install ' \
        '--no-build-isolation mmcv==2.1.0' in commands


def test_cpu_only_torch_wheel_without_torchvision_is_replaced_by_the_pypi_build(tmp_path):
    # The local torch 2.13.0+cpu wheel (this installer's earlier choice) loads no torchvision.
    facts = dict(GPU_READY, torch='2.13.0+cpu', torch_cuda='none', gpu_arch='none',
                 mmcv_ops_cuda='not available', torchvision='none', torchvision_imports='no',
                 mmpretrain='none')
    code, commands, stderr = dry_run(tmp_path, facts)
    assert code == 0 and commands == [TORCH, PRETRAIN]
    assert 'replacing it by PyPI' in stderr


def test_own_torch_without_torchvision_is_kept_and_mmpretrain_left_out_with_a_warning(tmp_path):
    facts = dict(GPU_READY, torchvision='none', torchvision_imports='no', mmpretrain='none')
    code, commands, stderr = dry_run(tmp_path, facts, nvcc=True)
    assert code == 0 and commands == []
    assert 'mmpretrain' in stderr and 'torchvision release built for your torch' in stderr


def test_mmpretrain_installed_where_torchvision_imports(tmp_path):
    code, commands, _ = dry_run(tmp_path, dict(GPU_READY, mmpretrain='none'), nvcc=True)
    assert code == 0 and commands == [PRETRAIN]


@pytest.mark.parametrize('mmcv_version, ops, rebuilt', [
    ('2.0.1', 'yes', False),   # in range, ops import: kept
    ('2.1.0', 'yes', False),
    ('2.1.0', 'no', True),     # ops do not import (e.g. built for another torch): rebuilt
    ('2.2.0', 'yes', True),    # mmdet 3.3 / mmseg 1.2 refuse mmcv >= 2.2
    ('1.7.2', 'yes', True),
])
def test_installed_mmcv_kept_only_in_range_with_working_ops(tmp_path, mmcv_version, ops, rebuilt):
    in_range = 'yes' if mmcv_version.startswith(('2.0', '2.1')) else 'no'
    facts = dict(GPU_READY, mmcv=mmcv_version, mmcv_in_range=in_range, mmcv_ops=ops)
    code, commands, stderr = dry_run(tmp_path, facts, nvcc=True)
    assert code == 0
    assert any('mmcv==2.1.0' in c for c in commands) == rebuilt, commands
    if rebuilt:  # replaces the installed one, and never from a wheel cached for another torch
        assert any('--force-reinstall --no-deps --no-cache-dir mmcv==2.1.0' in c
                   for c in commands), commands
        # and says why, naming the installed version (it used to replace it silently)
        why = ('is outside 2.0-2.1, the range mmdet 3.3 and mmseg 1.2 accept' if in_range == 'no'
               else "compiled ops do not load beside torch")
        assert f'mmcv {mmcv_version}' in stderr and why in stderr, stderr


@pytest.mark.parametrize('others', ['mmcv-lite', 'mmcv-full', 'mmcv-lite mmcv-full'])
def test_mmcv_lite_or_full_is_uninstalled_before_mmcv_is_built(tmp_path, others):
    """mmcv-lite (2.x without ops) and mmcv-full (1.x) install into the same mmcv/ folder under
    another distribution name: pip would lay mmcv 2.1.0 over them, and uninstalling either later
    would delete mmcv's files. They are removed first, by name."""
    facts = dict(GPU_READY, mmcv='none', mmcv_in_range='no', mmcv_ops='no',
                 mmcv_other_dists=others)
    code, commands, stderr = dry_run(tmp_path, facts, nvcc=True)
    assert code == 0
    uninstall = commands.index(f'python -m pip uninstall -y {others}')
    build = next(i for i, c in enumerate(commands) if c.endswith('mmcv==2.1.0'))
    assert uninstall < build, commands
    assert f'removing {others} first' in stderr


def test_mmcv_without_cuda_ops_on_cuda_torch_is_kept_with_a_warning(tmp_path):
    code, commands, stderr = dry_run(tmp_path, dict(GPU_READY, mmcv_ops_cuda='not available'),
                                     nvcc=True)
    assert code == 0 and commands == []
    assert 'built without CUDA ops' in stderr


def test_cpu_torch_in_range_is_not_replaced_by_the_pinned_one(tmp_path):
    facts = dict(FRESH, torch='2.5.1+cpu', torch_in_range='yes', torch_imports='yes')
    code, commands, _ = dry_run(tmp_path, facts)
    assert code == 0 and commands[0] == 'python -m pip install setuptools==80.9.0 wheel ninja'
    assert not any('torch==' in c for c in commands)
    assert PRETRAIN not in commands  # no torchvision for that torch: mmpretrain left out


@pytest.mark.parametrize('facts', [
    dict(FRESH, torch='1.12.1', torch_in_range='no', torch_imports='yes'),
    dict(FRESH, torch='2.5.1', torch_in_range='yes', torch_imports='no'),
])
def test_unusable_torch_is_an_error_not_a_replacement(tmp_path, facts):
    code, commands, stderr = dry_run(tmp_path, facts)
    assert code == 1 and commands == []
    assert f'torch {facts["torch"]} is installed' in stderr and 'never replaced' in stderr


def test_only_missing_or_off_pin_stack_triggers_the_stack_install(tmp_path):
    _, commands, _ = dry_run(tmp_path, dict(GPU_READY, stack_missing='mmdet==3.3.0'))
    assert commands == [f'python -m pip install {STACK}']
    _, commands, _ = dry_run(tmp_path, dict(GPU_READY, do_conv_mm_here='no'))
    assert commands == ['python -m pip install --no-build-isolation --no-deps -e .']


def test_this_machine_needs_nothing_but_possibly_the_editable_install(tmp_path):
    """The real probe on this machine: the stack is installed (CI runs install.sh first), so at
    most the editable install of this checkout is proposed, and only when do_conv_mm imports
    from elsewhere (e.g. another worktree's editable install)."""
    pytest.importorskip('mmdet')
    env = dict(os.environ, DOCONV_INSTALL_DRY_RUN='1', PYTHON=sys.executable)
    proc = run_script(env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if line.startswith('would run: ')]
    probe = subprocess.run([sys.executable, '-c', 'import do_conv_mm, os; '
                            'print(os.path.realpath(do_conv_mm.__file__))'],
                           cwd='/', env=os.environ, capture_output=True, text=True)
    here = probe.stdout.strip().startswith(osp.realpath(REPO) + os.sep)
    expected = [] if here else [
        f'would run: {sys.executable} -m pip install --no-build-isolation --no-deps -e .']
    assert commands == expected, proc.stdout
    assert ('nothing to install' in proc.stdout) == here


WHEEL_INCLUDE = '/site-packages/nvidia/cu13/include'


def test_toolkit_without_library_headers_builds_with_torchs_nvidia_wheel_headers(tmp_path):
    # nvcc alone (this machine kind: /usr/local/bin/nvcc wraps /usr/local/cuda-13.0/bin/nvcc,
    # and that toolkit has no cusparse.h): CUDA_HOME names the real toolkit, the wheel's headers
    # come after the toolkit's own (-isystem, CPATH).
    facts = dict(GPU_BARE, cuda_home='/usr/local/cuda-13.0', cuda_includes=WHEEL_INCLUDE)
    code, commands, stderr = dry_run(tmp_path, facts, nvcc=True)
    assert code == 0
    assert ('env MAX_JOBS=2 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=/usr/local/cuda-13.0 '
            f'CPATH={WHEEL_INCLUDE} NVCC_APPEND_FLAGS=-isystem {WHEEL_INCLUDE} python -m pip '
            'install --no-build-isolation mmcv==2.1.0') in commands
    assert 'CUDA_HOME=/usr/local/cuda-13.0, the toolkit of the nvcc found' in stderr
    assert f"taking them from torch's nvidia wheels ({WHEEL_INCLUDE})" in stderr


def test_wheel_header_folders_extend_the_users_cpath_and_nvcc_flags(tmp_path):
    # CUDA 12 wheels keep each library's headers in its own folder
    facts = dict(GPU_BARE, cuda_includes='/w/cusparse/include:/w/cublas/include')
    _, commands, _ = dry_run(tmp_path, facts, nvcc=True,
                             env_extra={'CPATH': '/mine', 'NVCC_APPEND_FLAGS': '-lineinfo'})
    build = [c for c in commands if 'mmcv==2.1.0' in c]
    assert len(build) == 1
    assert ' CPATH=/w/cusparse/include:/w/cublas/include:/mine ' in build[0]
    assert (' NVCC_APPEND_FLAGS=-lineinfo -isystem /w/cusparse/include -isystem '
            '/w/cublas/include ') in build[0]
    assert 'CUDA_HOME=' not in build[0]  # torch finds the toolkit itself


def test_library_headers_found_nowhere_build_cpu_ops_and_name_them(tmp_path):
    facts = dict(GPU_BARE, cuda_headers_missing='cusparse.h cusolverDn.h')
    code, commands, stderr = dry_run(tmp_path, facts, nvcc=True)
    assert code == 0
    assert 'env MAX_JOBS=2 python -m pip install --no-build-isolation mmcv==2.1.0' in commands
    assert 'lacks cusparse.h cusolverDn.h' in stderr and 'CPU ops only' in stderr


@pytest.mark.parametrize('nvcc_cuda, cuda_ops', [('12.4', False), ('13.1', True)])
def test_nvcc_of_another_cuda_major_builds_cpu_ops_and_says_which_toolkit(tmp_path, nvcc_cuda,
                                                                          cuda_ops):
    # torch's extension builder raises on a major mismatch (a minor one only warns), minutes
    # into the mmcv build; the script says so before starting and builds the CPU ops
    facts = dict(GPU_BARE, nvcc_cuda=nvcc_cuda)  # torch_cuda 13.0
    code, commands, stderr = dry_run(tmp_path, facts, nvcc=True)
    assert code == 0
    build = [c for c in commands if 'mmcv==2.1.0' in c]
    assert len(build) == 1 and ('FORCE_CUDA=1' in build[0]) == cuda_ops
    warned = f'nvcc is CUDA {nvcc_cuda} but torch 2.11.0+cu130 was built with CUDA 13.0' in stderr
    assert warned == (not cuda_ops)
    if warned:
        assert 'Install the CUDA 13.0 toolkit (or set CUDA_HOME to one)' in stderr


@pytest.mark.parametrize('cuda_ops, nvcc_probed', [(False, True), (True, True), (True, False)])
def test_torch_whose_headers_need_cxx20_builds_mmcv_through_standard_wrappers(tmp_path, cuda_ops,
                                                                              nvcc_probed):
    # torch 2.14's ATen.h refuses anything below C++20 and mmcv 2.1.0's setup.py passes
    # -std=c++17 (seen: the build fails at its first source). Not a dry run: the fake "pip install
    # mmcv" runs the compilers the build env names, and fake c++ / nvcc log what they were given.
    log = tmp_path / 'compilers.log'
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for tool in ('c++', 'nvcc'):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >>{log}\n')
        (bin_dir / tool).chmod(0o755)
    facts = dict(GPU_BARE, torch='2.14.1+cu130', torch_cxx_std='c++20', nvcc_cuda='13.0',
                 nvcc_path=str(bin_dir / 'nvcc'), build_tools='yes', stack_missing='none',
                 torchvision_imports='yes', mmpretrain='1.2.0', do_conv_mm_here='yes')
    if not cuda_ops:
        facts.update(gpu_arch='none', torch_cuda='none')
    if not nvcc_probed:  # the nvcc wrapper then wraps the nvcc torch would find: here on PATH
        del facts['nvcc_path']
    built = tmp_path / 'built.txt'
    built.write_text(facts_text(dict(facts, mmcv='2.1.0', mmcv_in_range='yes', mmcv_ops='yes')))
    fake_python, _ = stateful_python(tmp_path, facts, (
        '  *mmcv==2.1.0*) "$CXX" -O3 -std=c++17 -c a.cpp\n'
        '    [[ -n "${PYTORCH_NVCC:-}" ]] && "$PYTORCH_NVCC" -std=c++17 -c b.cu\n'
        f'    cp {built} "$STATE" ;;\n'))
    env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(tmp_path), 'PYTHON': str(fake_python)}
    if nvcc_probed:
        env['CUDA_HOME'] = str(tmp_path / 'no-cuda')
    proc = run_script(env)
    assert proc.returncode == 0, proc.stderr
    expected = ['c++ -O3 -std=c++20 -c a.cpp'] + (['nvcc -std=c++20 -c b.cu'] if cuda_ops else [])
    assert log.read_text().splitlines() == expected
    assert "torch 2.14.1+cu130's headers need c++20 but mmcv 2.1.0 compiles with -std=c++17" \
        in proc.stderr
    # torch 2.0-2.13 (C++17 headers) and torch < 2.0 (C++14, which mmcv's C++17 satisfies):
    # mmcv's own flags, no wrappers
    for cxx_std in ('c++17', 'c++14', 'none'):
        _, commands, stderr = dry_run(tmp_path, dict(facts, torch_cxx_std=cxx_std), nvcc=True)
        build = [c for c in commands if 'mmcv==2.1.0' in c]
        assert len(build) == 1 and 'CXX=' not in build[0] and 'PYTORCH_NVCC' not in build[0]
        assert 'headers need' not in stderr


def test_installed_numpy_is_kept_by_a_constraint_on_every_install_that_could_move_it(tmp_path):
    # torch 2.1 (numpy 1 ABI) beside numpy 1.26: the newest scikit-learn / onnx would pull numpy
    # 2 in, and torch 2.1 then fails to initialise NumPy (seen here)
    facts = dict(FRESH, torch='2.1.2+cu121', torch_in_range='yes', torch_imports='yes',
                 torch_cuda='12.1', torchvision='0.16.2', torchvision_imports='yes',
                 numpy='1.26.4')
    code, commands, stderr = dry_run(tmp_path, facts)
    assert code == 0
    assert 'keeping the installed numpy 1.26.4' in stderr
    constrained = [c for c in commands if ' -c ' in c]
    assert [c.split(' -c ')[1].split()[1:] for c in constrained] == [
        ['mmcv==2.1.0'], STACK.split(), ['mmpretrain==1.2.0']]
    unconstrained = [c for c in commands if c not in constrained]
    assert all('numpy' not in c for c in unconstrained)
    # without numpy installed (a fresh machine) nothing is constrained
    _, commands, stderr = dry_run(tmp_path, FRESH)
    assert not [c for c in commands if ' -c ' in c] and 'keeping' not in stderr


def test_mmcv_wheel_from_pips_cache_built_for_another_torch_is_rebuilt_without_it(tmp_path):
    # Not a dry run: a fake interpreter whose "pip install mmcv" installs a wheel whose ops do not
    # load (pip's cache), and whose "--no-cache-dir" build loads.
    facts = dict(GPU_READY, mmcv='none', mmcv_in_range='no', mmcv_ops='no', mmcv_ops_cuda='none',
                 gpu_arch='none', torch_cuda='none')
    cached = dict(facts, mmcv='2.1.0', mmcv_in_range='yes')
    rebuilt = dict(cached, mmcv_ops='yes', mmcv_ops_cuda='not available')
    (tmp_path / 'cached.txt').write_text(facts_text(cached))
    (tmp_path / 'rebuilt.txt').write_text(facts_text(rebuilt))
    log = tmp_path / 'pip.log'
    fake_python, state = stateful_python(tmp_path, facts, (
        f'  *--no-cache-dir*mmcv==2.1.0*) echo "$*" >>{log}; cp {tmp_path}/rebuilt.txt "$STATE"'
        ' ;;\n'
        f'  *mmcv==2.1.0*) echo "$*" >>{log}; cp {tmp_path}/cached.txt "$STATE" ;;\n'
        f'  *) echo "$*" >>{log} ;;\n'))
    env = {'PATH': '/usr/bin:/bin', 'HOME': str(tmp_path), 'PYTHON': str(fake_python),
           'CUDA_HOME': str(tmp_path / 'no-cuda')}
    proc = run_script(env)
    assert proc.returncode == 0, proc.stderr
    builds = [line for line in log.read_text().splitlines() if 'mmcv==2.1.0' in line]
    assert len(builds) == 2 and '--no-cache-dir' not in builds[0]
    assert '--force-reinstall --no-deps --no-cache-dir' in builds[1]
    assert 'built against another torch' in proc.stderr
    # a build whose ops still do not load is an error, not a silent success
    state.write_text(facts_text(facts))
    (tmp_path / 'rebuilt.txt').write_text(facts_text(cached))
    proc = run_script(env)
    assert proc.returncode == 1 and 'its compiled ops do not load' in proc.stderr


def _real_probe(tmp_path, toolkit_headers, env_extra=None) -> dict:
    """``install.sh --facts`` with this machine's Python, an nvcc wrapper first on PATH (outside
    its toolkit, as /usr/local/bin/nvcc here) and a fake toolkit holding ``toolkit_headers``."""
    root = tmp_path / 'cuda'
    (root / 'bin').mkdir(parents=True)
    (root / 'include').mkdir()
    for header in toolkit_headers:
        (root / 'include' / header).write_text('')
    nvcc = root / 'bin' / 'nvcc'  # what torch's version check runs: CUDA_HOME/bin/nvcc
    nvcc.write_text('#!/bin/sh\necho "Cuda compilation tools, release 12.8, V12.8.93"\n')
    nvcc.chmod(0o755)
    wrapper = tmp_path / 'wrap' / 'bin' / 'nvcc'
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\necho "#$ _HERE_={root}/bin"\n')  # as `nvcc --dryrun` says
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ('CUDA_HOME', 'CUDA_PATH')}
    env.update(PATH=f'{wrapper.parent}:{os.environ["PATH"]}', **(env_extra or {}))
    return probe_facts(env)


def probe_facts(env: dict) -> dict:
    """``install.sh --facts`` with this machine's Python under ``env``, as a dict."""
    proc = run_script(dict(env, PYTHON=sys.executable), '--facts', timeout=120)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split('=', 1) for line in proc.stdout.splitlines() if '=' in line)


def test_real_probe_finds_the_toolkit_behind_an_nvcc_wrapper_and_the_wheel_headers(tmp_path):
    torch = pytest.importorskip('torch')
    if not torch.version.cuda:
        pytest.skip('needs a CUDA build of torch (PyPI\'s, as installed here): its nvidia wheels')
    facts = _real_probe(tmp_path, ['cuda_runtime_api.h'])
    assert facts['cuda_home'] == str(tmp_path / 'cuda')
    site = osp.dirname(osp.dirname(torch.__file__))
    dirs = facts['cuda_includes'].split(':')
    assert dirs and all(d.startswith(osp.join(site, 'nvidia') + os.sep) for d in dirs), facts
    for header in ('cusparse.h', 'cublas_v2.h', 'cublasLt.h', 'cusolverDn.h'):
        assert any(osp.isfile(osp.join(d, header)) for d in dirs), header
    assert facts['cuda_headers_missing'] == 'none'
    assert facts['nvcc_cuda'] == '12.8'
    # a complete toolkit needs no wheel folders; a CUDA_HOME set by the user is kept
    complete = ['cuda_runtime_api.h', 'cusparse.h', 'cublas_v2.h', 'cublasLt.h', 'cusolverDn.h']
    facts = _real_probe(tmp_path / 'full', complete,
                        env_extra={'CUDA_HOME': str(tmp_path / 'full' / 'cuda')})
    assert facts['cuda_home'] == 'none' and facts['cuda_includes'] == 'none'


def test_real_probe_judges_mmcv_ops_by_their_extension_not_by_mmcvs_imports(tmp_path):
    """mmcv's package imports mmengine; where that is missing (mmcv installed before the rest of
    the stack, as a wheel with --no-deps) the ops are still judged by whether the compiled
    extension loads against this torch, so ops built with CUDA are not rebuilt without them."""
    mmcv = pytest.importorskip('mmcv')
    ops = pytest.importorskip('mmcv.ops')
    ext = [p for p in os.listdir(osp.dirname(mmcv.__file__)) if p.startswith('_ext.')]
    if not ext:
        pytest.skip('needs an mmcv with compiled ops (installed here by tools/install.sh)')
    site = tmp_path / 'site'
    package = site / 'mmcv'
    package.mkdir(parents=True)
    (package / '__init__.py').write_text('import mmengine_is_not_installed\n')
    (package / ext[0]).symlink_to(osp.join(osp.dirname(mmcv.__file__), ext[0]))
    (site / 'mmcv-2.1.0.dist-info').mkdir()
    (site / 'mmcv-2.1.0.dist-info' / 'METADATA').write_text('Name: mmcv\nVersion: 2.1.0\n')
    env = dict(os.environ, PYTHONPATH=str(site))
    facts = probe_facts(env)
    assert facts['mmcv'] == '2.1.0' and facts['mmcv_ops'] == 'yes', facts
    assert facts['mmcv_ops_cuda'] == ops.get_compiling_cuda_version()
    # without the extension (mmcv-lite) there are no ops
    (package / ext[0]).unlink()
    assert probe_facts(env)['mmcv_ops'] == 'no'


def test_deploy_venv_made_from_a_venv_sees_that_venvs_packages_behind_its_own(tmp_path):
    """tools/install_deploy.sh where ``python`` is itself a venv (as many users' environments
    are): --system-site-packages alone would reach only the base interpreter's packages, so the
    deploy venv would miss torch / mmcv / mmdet installed in that venv."""
    main = tmp_path / 'main-venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(main)], check=True,
                   timeout=120)

    def purelib(python) -> str:
        return subprocess.run([str(python), '-c', 'import sysconfig; '
                               'print(sysconfig.get_path("purelib"))'], capture_output=True,
                              text=True, check=True).stdout.strip()

    main_site = purelib(main / 'bin' / 'python')
    with open(osp.join(main_site, 'only_in_main_venv.py'), 'w') as f:
        f.write('WHERE = "main"\n')
    deploy = tmp_path / 'deploy-venv'
    env = dict(os.environ, PATH=f'{main}/bin:{os.environ["PATH"]}',
               DO_CONV_MM_DEPLOY_VENV=str(deploy), DOCONV_INSTALL_DRY_RUN='1')
    proc = subprocess.run(['bash', osp.join(REPO, 'tools', 'install_deploy.sh')], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f'would run: {deploy}/bin/python -m pip install '
                                   '--no-build-isolation -e .[deploy]')

    def where() -> str:
        return subprocess.run([str(deploy / 'bin' / 'python'), '-c',
                               'import only_in_main_venv as m; print(m.WHERE)'], cwd='/',
                              capture_output=True, text=True).stdout.strip()

    assert where() == 'main'
    with open(osp.join(purelib(deploy / 'bin' / 'python'), 'only_in_main_venv.py'), 'w') as f:
        f.write('WHERE = "deploy"\n')  # the deploy venv's own pins stay in front
    assert where() == 'deploy'


def test_real_probe_reads_the_cxx_standard_torchs_headers_demand():
    """torch_cxx_std decides whether mmcv is built through the -std wrappers: it must be read
    from this torch (ATen.h's '#error C++NN or later ... required'), never silently missing."""
    torch = pytest.importorskip('torch')
    facts = probe_facts(dict(os.environ))
    header = osp.join(osp.dirname(torch.__file__), 'include', 'ATen', 'ATen.h')
    with open(header) as f:
        text = f.read()
    demanded = [f'c++{n}' for n in ('17', '20', '23') if f'C++{n} or later' in text]
    assert len(demanded) == 1 and facts['torch_cxx_std'] == demanded[0], facts
