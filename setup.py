from setuptools import find_packages, setup


def read_version():
    namespace = {}
    with open('do_conv_mm/version.py') as f:
        exec(f.read(), namespace)
    return namespace['__version__']


setup(
    name='do_conv_mm',
    version=read_version(),
    description='DO-Conv (depthwise over-parameterised convolution) for OpenMMLab',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['do_conv_mm', 'do_conv_mm.*']),
    python_requires='>=3.8',
    install_requires=['torch>=1.13', 'mmengine>=0.10.0,<1.0', 'mmcv>=2.0.0,<2.2.0'],
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
