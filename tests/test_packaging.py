"""do_conv_mm installs into environments users already have.

* pip never touches torch or mmcv: they are no requirements (OpenMMLab's own packages list
  neither), so a plain ``pip install`` cannot replace a CUDA torch or build mmcv over a compiled
  one; importing the package checks them instead and names the fix.
* A wheel (non-editable install) carries the deploy configs the package defaults to, and writes
  its toy data under the current directory, never into site-packages.
"""
import email
import os
import os.path as osp
import shutil
import subprocess
import sys
import zipfile

import pytest

import do_conv_mm
from do_conv_mm import onnx_deploy, stack_check, toy_data
from do_conv_mm.onnx_deploy import onnx_configs

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    """A wheel of this checkout, built as ``pip install <checkout>`` builds one."""
    source, out = tmp_path_factory.mktemp('source') / 'do_conv_mm', tmp_path_factory.mktemp('wheel')
    # a copy: pip builds in the tree, and the checkout is left as it was
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        '.git', '.venv*', '.gpu_wheels', 'data', 'work_dirs', 'build', '*.egg-info', '.mim',
        '__pycache__', 'results'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                    '-q', '-w', str(out), str(source)], check=True, capture_output=True,
                   text=True)
    (path, ) = out.glob('do_conv_mm-*.whl')
    return zipfile.ZipFile(path)


def test_wheel_requires_neither_torch_nor_mmcv(wheel):
    metadata_name = next(n for n in wheel.namelist() if n.endswith('.dist-info/METADATA'))
    metadata = email.message_from_bytes(wheel.read(metadata_name))
    unconditional = [r for r in metadata.get_all('Requires-Dist') if 'extra ==' not in r]
    assert [r.split('<')[0].split('>')[0] for r in unconditional] == ['mmengine'], unconditional
    assert metadata['Version'] == do_conv_mm.__version__
    assert metadata['License'] == 'Apache-2.0'
    assert any(n.endswith('.dist-info/licenses/LICENSE') or n.endswith('.dist-info/LICENSE')
               for n in wheel.namelist())


def test_wheel_carries_the_deploy_configs_the_package_defaults_to(wheel):
    shipped = {n.split('.mim/configs/deploy/')[1]: wheel.read(n) for n in wheel.namelist()
               if '.mim/configs/deploy/' in n}
    checkout = osp.join(REPO, 'configs', 'deploy')
    expected = {}
    for name in sorted(os.listdir(checkout)):
        if name.endswith('.py'):
            with open(osp.join(checkout, name), 'rb') as f:
                expected[name] = f.read()
    assert shipped == expected
    for task in ('det', 'seg'):
        assert osp.basename(onnx_deploy.default_deploy_config(task)) in shipped


def test_installed_package_finds_its_shipped_deploy_configs(tmp_path, monkeypatch):
    """Without a checkout beside the package, the deploy configs come from its .mim copy; in a
    checkout, the checkout's own, even beside a .mim copy a wheel build left (it may be stale)."""
    package = tmp_path / 'site-packages' / 'do_conv_mm'
    (package / '.mim' / 'configs' / 'deploy').mkdir(parents=True)
    monkeypatch.setattr(onnx_configs, '__file__', str(package / 'onnx_deploy' / 'onnx_configs.py'))
    assert onnx_configs._find_deploy_config_dir() == str(package / '.mim' / 'configs' / 'deploy')
    (package.parent / 'configs' / 'deploy').mkdir(parents=True)
    assert onnx_configs._find_deploy_config_dir() == str(package.parent / 'configs' / 'deploy')


def test_toy_data_goes_to_the_checkout_or_the_current_directory(tmp_path, monkeypatch):
    """Editable (a checkout around the package): <checkout>/data/toy, where the toy configs
    look. Installed from a wheel: ./data/toy, not site-packages."""
    assert toy_data.default_data_dir('toy') == osp.join(REPO, 'data', 'toy')
    package = tmp_path / 'site-packages' / 'do_conv_mm'
    package.mkdir(parents=True)
    monkeypatch.setattr(toy_data, '__file__', str(package / 'toy_data.py'))
    monkeypatch.chdir(tmp_path)
    assert toy_data.default_data_dir('toy_cls') == str(tmp_path / 'data' / 'toy_cls')


@pytest.mark.parametrize('case', ['no mmcv', 'mmcv 1.x', 'old torch'])
def test_import_names_a_missing_or_unsupported_stack_and_the_fix(monkeypatch, case):
    import mmcv
    import torch
    if case == 'no mmcv':
        monkeypatch.setitem(sys.modules, 'mmcv', None)
        expected = 'needs mmcv 2.x .* does not import'
    elif case == 'mmcv 1.x':
        monkeypatch.setattr(mmcv, '__version__', '1.7.2')
        expected = 'found mmcv 1.7.2: uninstall it'
    else:
        monkeypatch.setattr(torch, '__version__', '1.12.1+cu116')
        expected = r'needs torch >= 1.13.0, found 1.12.1\+cu116'
    with pytest.raises(ImportError, match=expected) as error:
        stack_check.check_stack()
    assert 'tools/install.sh' in str(error.value)


def test_supported_or_unknown_stacks_pass(monkeypatch):
    """mmcv 2.0-2.2 (mmpretrain alone takes mmcv < 2.4); a version that cannot be read
    (source builds: 'unknown', none at all) is not judged."""
    import mmcv
    import torch
    for version in ('2.0.0rc4', '2.1.0', '2.2.0', 'unknown'):
        monkeypatch.setattr(mmcv, '__version__', version)
        stack_check.check_stack()
    monkeypatch.delattr(mmcv, '__version__')
    stack_check.check_stack()
    for version in ('2.6.0a0+git1234', '2.6.0a0+ecf3bae40a.nv25.01', 'unknown'):
        monkeypatch.setattr(torch, '__version__', version)
        stack_check.check_stack()


def test_setup_reads_its_files_under_any_locale():
    """setup.py reads README.md (UTF-8) with an explicit encoding: it runs under LC_ALL=C."""
    result = subprocess.run([sys.executable, '-X', 'utf8=0', 'setup.py', '--version'], cwd=REPO,
                            env=dict(os.environ, LC_ALL='C', LANG='C',
                                     PYTHONCOERCECLOCALE='0', PYTHONUTF8='0'),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == do_conv_mm.__version__


def test_missing_relative_config_says_where_it_looked(tmp_path, monkeypatch):
    """Tools run from outside the checkout: the error names the directory a relative config
    path was looked up in."""
    from do_conv_mm.runner_setup import ToolError, load_config
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ToolError, match=rf"config 'configs/toy/x\.py' does not exist \(looked in "
                                        rf"{tmp_path}\); pass a config file such as .* of the "
                                        rf"do_conv_mm checkout"):
        load_config('configs/toy/x.py')
