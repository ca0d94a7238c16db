import os.path as osp
import shutil
import sys

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def read_version():
    namespace = {}
    with open('do_conv_mm/version.py', encoding='utf-8') as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def ship_deploy_configs():
    """A wheel carries configs/deploy as do_conv_mm/.mim/configs/deploy, where the package
    looks when it has no checkout beside it (OpenMMLab packages ship their configs in .mim the
    same way); an editable install reads the checkout's own."""
    source = osp.join(HERE, 'configs', 'deploy')
    if not ({'bdist_wheel', 'sdist'} & set(sys.argv)) or not osp.isdir(source):
        return
    target = osp.join(HERE, 'do_conv_mm', '.mim', 'configs', 'deploy')
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns('__pycache__'))


ship_deploy_configs()
setup(
    name='do_conv_mm',
    version=read_version(),
    description='DO-Conv (depthwise over-parameterised convolution) for OpenMMLab',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['do_conv_mm', 'do_conv_mm.*']),
    package_data={'do_conv_mm': ['.mim/configs/deploy/*.py']},
    python_requires='>=3.8',
    # torch (>= 1.13) and mmcv (2.x; 2.0-2.1 for mmdet 3.3 / mmseg 1.2) are not listed, as
    # OpenMMLab's own packages list neither: pip would replace a working CUDA torch, or build
    # mmcv 2.1.0 from source over a compiled mmcv. Importing do_conv_mm checks both and names
    # the fix (do_conv_mm/stack_check.py); tools/install.sh installs them where missing.
    install_requires=['mmengine>=0.10.0,<1.0'],
    extras_require={
        'mmdet': ['mmdet>=3.0.0,<3.4'],
        'mmseg': ['mmsegmentation>=1.0.0,<1.3', 'ftfy', 'regex'],
        # DO-Conv pretraining (configs/mmpretrain, toy classifiers). mmpretrain imports
        # torchvision, deliberately not listed: an unpinned torchvision would pull the newest
        # torch over yours. Install the release built for your torch (2.13 -> 0.28).
        'mmpretrain': ['mmpretrain>=1.0.0,<1.3'],
        'tests': ['pytest', 'onnx', 'scikit-learn', 'matplotlib'],
        # mmdeploy + ONNX Runtime. Install into its own venv (bash tools/install_deploy.sh):
        # mmdeploy pins protobuf<=3.20.2, so onnx is held at 1.17.0 there, which would
        # downgrade the main stack's onnx/protobuf if installed next to it.
        'deploy': ['mmdeploy==1.3.1', 'onnxruntime==1.23.2', 'onnx==1.17.0', 'protobuf==3.20.2'],
    },
    license='Apache-2.0',
)
