"""tools/fold_doconv.py and do_conv_mm.deploy: fold, verify, deploy config, batch, bad input.

Tolerances: folded vs DO-Conv outputs are compared with the tool's own criterion
max|folded - ref| <= atol + rtol * max|ref| at its fp32 defaults (atol 1e-5, rtol 1e-4; see
do_conv_mm/deploy_verify.py): measured differences are ~1e-6 relative, a wrong fold is O(|D|) =
O(0.1). Everything else (keys, shapes, parameter counts, metrics, file bytes) is compared exactly.
"""
import copy
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

import do_conv_mm
from do_conv_mm import deploy
from do_conv_mm.deploy import checkpoint_fold
from do_conv_mm.checkpoint_guard import describe_checkpoint
from do_conv_mm.deploy import FoldVerificationError, build_model, fold_checkpoint
from do_conv_mm.deploy_config import doconv_references, make_deploy_config

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'fold_doconv.py'


def _plain_twin(path: Path) -> Path:
    """The plain twin of a DO-Conv toy config: the same name without '-doconv'."""
    return path.with_name(path.name.replace('-doconv', ''))


TOY_DET = REPO / 'configs/toy/retinanet_r18-tiny-doconv_fpn_toy.py'
TOY_DET_PLAIN = _plain_twin(TOY_DET)
TOY_SEG = REPO / 'configs/toy/fpn_r18-tiny-doconv_toy.py'
# RTMDet-tiny: its head's stacked convs are one module each, shared by the 3 levels.
TOY_RTMDET = REPO / 'configs/toy/rtmdet_tiny-doconv_toy.py'
SHARED_CONV_ALIASES = [f'bbox_head.{branch}_convs.{level}.{i}.conv' for branch in ('cls', 'reg')
                       for level in (1, 2) for i in (0, 1)]
FRCNN = REPO / 'configs/mmdet/faster-rcnn_r50-doconv_fpn_1x_coco.py'
PSPNET = REPO / 'configs/mmseg/pspnet_r50-d8-doconv_4xb2-80k_cityscapes-512x1024.py'

sys.path.insert(0, str(REPO / 'tools'))
import fold_doconv as fold_cli  # noqa: E402


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random non-zero D everywhere, random BN statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, do_conv_mm.DOConv2d) and m.D is not None:
                m.D.normal_(0, 0.1, generator=g)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return model


def seeded_model(cfg: Config, seed: int) -> nn.Module:
    """``build_model(cfg)`` whose initial weights depend on ``seed`` only, not on what ran before
    in this process (the global RNG state is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg)


def training_checkpoint(model: nn.Module, cfg: Config, ema_seed=None) -> dict:
    """What mmengine's Runner saves: meta, state_dict, optimizer, message_hub, schedulers
    (numpy scalars and HistoryBuffers included), optionally EMAHook's ema_state_dict."""
    from mmengine.logging import MessageHub
    hub = MessageHub.get_instance('fold_tool_test')
    hub.update_scalar('train/loss', np.float64(0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ckpt = dict(
        meta=dict(cfg=cfg.pretty_text, epoch=3, iter=30, seed=0, best_score=np.float64(0.25),
                  dataset_meta=dict(classes=('a', 'b'), palette=[(1, 2, 3), (4, 5, 6)])),
        state_dict=model.state_dict(),
        optimizer=optimizer.state_dict(),
        message_hub=hub.state_dict(),
        param_schedulers=[dict(base_values=[0.01], last_step=30)])
    if ema_seed is not None:
        save_as_ema_hook(ckpt, model, randomise(seeded_model(cfg, ema_seed), ema_seed))
    return ckpt


def save_as_ema_hook(ckpt: dict, model: nn.Module, averaged: nn.Module) -> None:
    """What mmengine's EMAHook adds to ``ckpt`` (whose state_dict is ``model``'s) when its
    averaged model holds ``averaged``'s weights: it swaps them, so state_dict gets the averaged
    weights and ema_state_dict ("module.*" keys, "steps") the raw ones. The hook itself."""
    from types import SimpleNamespace
    from mmengine.hooks import EMAHook
    hook = EMAHook()
    runner = SimpleNamespace(model=model)
    hook.before_run(runner)
    hook.ema_model.module.load_state_dict(averaged.state_dict())
    hook.ema_model.steps.fill_(30)
    hook.before_save_checkpoint(runner, ckpt)


def new_checkpoint(config: Path, path: Path, seed: int = 0, ema_seed=None) -> Path:
    return save_new_checkpoint(config, path, seed, ema_seed)[0]


def save_new_checkpoint(config: Path, path: Path, seed: int = 0, ema_seed=None):
    """A randomised DO-Conv training checkpoint of ``config``; returns (path, model)."""
    cfg = Config.fromfile(str(config))
    model = randomise(seeded_model(cfg, seed), seed)
    torch.save(training_checkpoint(model, cfg, ema_seed), path)
    return path, model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plain_model(base: str) -> nn.Module:
    """The stock model-zoo model (no DO-Conv anywhere) of an mmdet:: / mmseg:: config."""
    return build_model(Config.fromstring(f"_base_ = '{base}'\n", '.py'))


def assert_loads_plain(path: Path) -> dict:
    """torch.load(weights_only=True) in a fresh interpreter without do_conv_mm's allow-list."""
    code = ('import sys, torch; c = torch.load(sys.argv[1], weights_only=True); '
            'print(sorted(c))')
    done = subprocess.run([sys.executable, '-c', code, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(path, weights_only=True)


def fold_and_check(config: Path, tmp_path: Path, init_api, stock_base: str):
    """Fold + verify a randomised full model; strict-load checks; returns the result."""
    ckpt, doconv_model = save_new_checkpoint(config, tmp_path / 'train.pth', seed=1)
    out = tmp_path / 'deploy' / 'folded.pth'
    result = fold_checkpoint(str(config), str(ckpt), str(out), verify=True,
                             verify_size=(64, 64), log=print)
    # Outputs match within the stated tolerance, every one of them.
    assert result.verify and all(d.ok for d in result.verify), result.verify
    assert max(d.max_rel for d in result.verify) < deploy.DEFAULT_RTOL
    folded = assert_loads_plain(out)
    assert set(folded) == {'meta', 'state_dict'}
    assert folded['meta']['doconv_folded'] is True
    assert not any(k.endswith(('.D', '.weight_extra')) for k in folded['state_dict'])
    assert doconv_references(Config.fromfile(result.out_config).to_dict()) == []
    # The official inference API builds the deploy config and then holds exactly the folded
    # weights under exactly the folded keys: a strict load.
    api_model = init_api(result.out_config, str(out), device='cpu')
    api_state = api_model.state_dict()
    assert set(api_state) == set(folded['state_dict'])
    assert all(torch.equal(api_state[k], v) for k, v in folded['state_dict'].items())
    # The folded weights strict-load into the *stock* model-zoo model (no DO-Conv anywhere), and
    # the deploy model has exactly its parameter count: inference costs what the plain one does.
    stock = plain_model(stock_base)
    stock.load_state_dict(folded['state_dict'], strict=True)
    assert param_count(api_model) == param_count(stock)
    assert param_count(api_model) < param_count(doconv_model)
    return result


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# deploy config
# ------------------------------------------------------------------------------------------------
def test_make_deploy_config_removes_every_doconv_opt_in():
    cfg = Config(dict(
        custom_imports=dict(imports=['do_conv_mm', 'my_pkg'], allow_failed_imports=False),
        conv_cfg=dict(type='DOConv'),
        model=dict(type='DOConvModel', model_type='MaskRCNN', doconv=dict(include=['rpn_head']),
                   backbone=dict(type='ResNet', conv_cfg=dict(type='DOConv2d', D_mul=12)),
                   heads=[dict(type='H', conv_cfg=dict(type='mmdet.DOConv')),
                          dict(type='H', conv_cfg=None)],
                   mask_head=dict(predictor_cfg=dict(type='DOConv', D_mul=9, bias=True)))))
    before = cfg.to_dict()
    out = make_deploy_config(cfg).to_dict()
    assert cfg.to_dict() == before  # the input config is not modified
    assert out['model'] == dict(
        type='MaskRCNN', backbone=dict(type='ResNet', conv_cfg=None),
        heads=[dict(type='H', conv_cfg=None), dict(type='H', conv_cfg=None)],
        mask_head=dict(predictor_cfg=dict(type='Conv2d', bias=True)))
    assert out['conv_cfg'] is None
    assert out['custom_imports'] == dict(imports=['my_pkg'], allow_failed_imports=False)
    assert doconv_references(out) == []
    only_ours = make_deploy_config(Config(dict(custom_imports=dict(imports=['do_conv_mm']),
                                               model=dict(type='X')))).to_dict()
    assert 'custom_imports' not in only_ours


def test_deploy_config_drops_the_training_runs_state_and_pretrained_inits():
    """A work dir's config dump of a resumed run has resume=True, its load_from and work_dir:
    fine-tuning or testing from the deploy config would resume (mmengine then wants a
    message_hub the folded checkpoint lacks) or write into the training run's directory."""
    dump = Config(dict(model=dict(type='X', conv_cfg=dict(type='DOConv')), resume=True,
                       load_from='work_dirs/run/epoch_3.pth', work_dir='work_dirs/run'))
    out = make_deploy_config(dump).to_dict()
    assert out == dict(model=dict(type='X', conv_cfg=None), resume=False, load_from=None)
    # A Pretrained init (a DO-Conv backbone, which plain convs cannot take: fine-tuning from the
    # deploy config was refused): the folded checkpoint gives the weights; other inits stay.
    pretrained = dict(type='Pretrained', checkpoint='cls_doconv.pth', prefix='backbone.')
    kaiming = dict(type='Kaiming', layer='Conv2d')
    model = dict(type='X', backbone=dict(type='B', init_cfg=pretrained),
                 neck=dict(type='N', init_cfg=[kaiming, pretrained]),
                 head=dict(type='H', init_cfg=kaiming),
                 extra=dict(type='PVT', init_cfg=dict(checkpoint='pvt_l.pth')))  # loads it itself
    out = make_deploy_config(Config(dict(model=model))).to_dict()['model']
    assert out == dict(type='X', backbone=dict(type='B', init_cfg=None),
                       neck=dict(type='N', init_cfg=[kaiming]),
                       head=dict(type='H', init_cfg=kaiming), extra=dict(type='PVT', init_cfg=None))
    assert make_deploy_config(Config(dict(model=dict(type='X')))).to_dict() == dict(
        model=dict(type='X'))  # keys the config does not set stay unset


@pytest.mark.parametrize('config', sorted((REPO / 'configs').glob('*/*doconv*.py')),
                         ids=lambda p: p.name)
def test_deploy_config_of_every_shipped_config_dumps_and_reloads(config, tmp_path):
    cfg = Config.fromfile(str(config))
    assert doconv_references(cfg.to_dict())  # it is a DO-Conv config
    deploy_cfg = make_deploy_config(cfg)
    path = tmp_path / 'deploy.py'
    deploy_cfg.dump(str(path))
    reloaded = Config.fromfile(str(path)).to_dict()
    assert reloaded == deploy_cfg.to_dict()
    assert doconv_references(reloaded) == []
    assert 'do_conv_mm' not in path.read_text()


def _without_none_conv_cfg(node):
    if isinstance(node, dict):
        return {k: _without_none_conv_cfg(v) for k, v in node.items()
                if not (k == 'conv_cfg' and v is None)}
    if isinstance(node, (list, tuple)):
        return type(node)(_without_none_conv_cfg(v) for v in node)
    return node


@pytest.mark.parametrize('doconv', [TOY_DET, TOY_SEG, TOY_RTMDET], ids=['det', 'seg', 'rtmdet'])
def test_deploy_config_of_toy_twin_equals_the_plain_twin(doconv):
    plain = _plain_twin(doconv)
    deploy_cfg = make_deploy_config(Config.fromfile(str(doconv))).to_dict()
    plain_cfg = Config.fromfile(str(plain)).to_dict()
    deploy_cfg.pop('conv_cfg')  # the DO-Conv twin's top-level helper variable, now None
    assert _without_none_conv_cfg(deploy_cfg) == _without_none_conv_cfg(plain_cfg)


# ------------------------------------------------------------------------------------------------
# full models
# ------------------------------------------------------------------------------------------------
def test_fold_and_verify_faster_rcnn(tmp_path):
    from mmdet.apis import init_detector
    result = fold_and_check(FRCNN, tmp_path, init_detector,
                            'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')
    assert result.num_folded == 22  # stem + 16 bottleneck 3x3 + 4 FPN 3x3 + rpn_conv
    names = [d.name for d in result.verify]
    assert any(n.startswith('roi_head') for n in names)
    assert any(n.startswith('rpn_head') for n in names)


def test_fold_and_verify_pspnet(tmp_path):
    from mmseg.apis import init_model
    result = fold_and_check(PSPNET, tmp_path, init_model,
                            'mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py')
    names = [d.name for d in result.verify]
    assert 'decode_head' in names and 'auxiliary_head[0]' in names


def test_shared_convs_fold_once_and_stay_shared():
    """A DOConv2d registered under several names (RTMDet's share_conv head) folds into one plain
    conv at every name, on the model and on tensors alone; no D is left under any alias."""
    cfg = Config.fromfile(str(TOY_RTMDET))
    model = randomise(seeded_model(cfg, 4), seed=4)
    state = model.state_dict()
    assert all(f'{alias}.D' in state for alias in SHARED_CONV_ALIASES)
    folded = do_conv_mm.fold_doconv(model)
    head, folded_head = model.bbox_head, folded.bbox_head
    assert isinstance(head.cls_convs[2][1].conv, do_conv_mm.DOConv2d)  # input untouched
    for convs in (folded_head.cls_convs, folded_head.reg_convs):
        for level in (1, 2):
            for i in (0, 1):
                assert type(convs[0][i].conv) is nn.Conv2d
                assert convs[level][i].conv is convs[0][i].conv
    assert do_conv_mm.count_doconv(folded) == 0
    folded_state = folded.state_dict()
    assert not [k for k in folded_state if k.endswith(('.D', '.weight_extra'))]
    by_tensors = do_conv_mm.fold_state_dict(state)
    assert list(by_tensors) == list(folded_state)
    assert all(torch.equal(by_tensors[k], v) for k, v in folded_state.items())
    alias = by_tensors['bbox_head.reg_convs.2.1.conv.weight']
    assert alias is by_tensors['bbox_head.reg_convs.0.1.conv.weight']  # folded once, shared
    deployed = build_model(make_deploy_config(cfg))
    deployed.load_state_dict(by_tensors, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ref, got in zip(model(x, mode='tensor'), deployed(x, mode='tensor')):
            for a, b in zip(ref, got):
                assert (a - b).abs().max() <= 1e-5 + 1e-4 * a.abs().max()


def test_cli_folds_and_verifies_a_shared_conv_checkpoint(tmp_path, capsys):
    ckpt = new_checkpoint(TOY_RTMDET, tmp_path / 'train.pth', seed=5)
    for extra in ([], ['--verify']):
        out = tmp_path / f'out{len(extra)}' / 'folded.pth'
        assert fold_cli.main([str(TOY_RTMDET), str(ckpt), str(out), *extra]) == 0
        text = capsys.readouterr().out
        assert 'folded 32 DOConv layers' in text
        assert ('verify PASS' in text) == bool(extra)
        # the tools' description of the same checkpoint counts the same 32 layers
        description = describe_checkpoint(do_conv_mm.load_checkpoint_file(str(ckpt)))
        assert description == ('unfolded DO-Conv training checkpoint (32 layers with a D kernel '
                               'under 40 names: convs shared by several modules)'), description
        state = torch.load(out, weights_only=True)['state_dict']
        assert not [k for k in state if k.endswith('.D')]
        assert all(f'{alias}.weight' in state for alias in SHARED_CONV_ALIASES)


def test_verify_fails_on_a_wrong_fold_and_writes_nothing(tmp_path, monkeypatch):
    ckpt = new_checkpoint(TOY_DET, tmp_path / 'train.pth')

    def fold_ignoring_D(model, inplace=False):
        model = copy.deepcopy(model)
        for m in model.modules():
            if isinstance(m, do_conv_mm.DOConv2d) and m.D is not None:
                m.D.data.zero_()
        return do_conv_mm.fold_doconv(model, inplace=True)

    monkeypatch.setattr(checkpoint_fold, 'fold_doconv', fold_ignoring_D)
    with pytest.raises(FoldVerificationError, match='verify failed') as info:
        fold_checkpoint(str(TOY_DET), str(ckpt), str(tmp_path / 'out.pth'), verify=True,
                        log=lambda s: None)
    assert max(d.max_rel for d in info.value.diffs) > 1e-2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['train.pth']


def test_ema_checkpoint_deploys_the_averaged_weights(tmp_path):
    """mmengine's EMAHook saves the averaged weights as state_dict and the raw ones as
    ema_state_dict: the fold deploys the averaged ones (as mmdet's test.py uses them), with or
    without --use-ema, and keeps the raw ones folded. --use-ema refuses a checkpoint without
    EMA. (--use-ema deployed ema_state_dict, the raw weights, before.)"""
    path, raw_model = save_new_checkpoint(TOY_DET, tmp_path / 'train.pth', seed=3, ema_seed=4)
    cfg = Config.fromfile(str(TOY_DET))
    averaged = do_conv_mm.fold_doconv(randomise(seeded_model(cfg, 4), 4)).state_dict()
    raw = do_conv_mm.fold_doconv(raw_model).state_dict()
    assert not torch.equal(averaged['backbone.conv1.weight'], raw['backbone.conv1.weight'])

    for use_ema in (False, True):
        out_path = tmp_path / f'folded_{use_ema}.pth'
        result = fold_checkpoint(str(TOY_DET), str(path), str(out_path), use_ema=use_ema,
                                 verify=True, log=print)
        assert result.kept_ema and result.deployed_weights == 'state_dict (EMA weights)'
        assert all(d.ok for d in result.verify)
        out = torch.load(out_path, weights_only=True)
        assert all(torch.equal(out['state_dict'][k], v) for k, v in averaged.items())
        assert out['ema_state_dict']['steps'] == 30
        assert all(torch.equal(out['ema_state_dict'][f'module.{k}'], v) for k, v in raw.items())

    plain = new_checkpoint(TOY_DET, tmp_path / 'plain.pth', seed=3)
    with pytest.raises(do_conv_mm.FoldError, match='has no EMA weights'):
        fold_checkpoint(str(TOY_DET), str(plain), str(tmp_path / 'x.pth'), use_ema=True)
    only_raw = torch.load(path, weights_only=False)
    del only_raw['state_dict']
    torch.save(only_raw, tmp_path / 'only_raw.pth')
    with pytest.raises(do_conv_mm.FoldError, match='has no "state_dict", only "ema_state_dict"'):
        fold_checkpoint(str(TOY_DET), str(tmp_path / 'only_raw.pth'), str(tmp_path / 'x.pth'))
    assert not (tmp_path / 'x.pth').exists()


def test_slim_and_bare_checkpoints_fold_identically(tmp_path):
    ckpt = new_checkpoint(TOY_DET, tmp_path / 'train.pth', seed=5)
    state = torch.load(ckpt, weights_only=False)['state_dict']
    torch.save(dict(meta=dict(epoch=1), state_dict=state), tmp_path / 'slim.pth')
    torch.save({f'module.{k}': v for k, v in state.items()}, tmp_path / 'bare.pth')
    outs = {}
    for name in ('train', 'slim', 'bare'):
        fold_checkpoint(str(TOY_DET), str(tmp_path / f'{name}.pth'),
                        str(tmp_path / 'out' / f'{name}.pth'), log=lambda s: None)
        outs[name] = torch.load(tmp_path / 'out' / f'{name}.pth', weights_only=True)
    for name in ('slim', 'bare'):
        assert list(outs[name]['state_dict']) == list(outs['train']['state_dict'])
        assert all(torch.equal(outs[name]['state_dict'][k], v)
                   for k, v in outs['train']['state_dict'].items())
    assert outs['train']['meta']['best_score'] == 0.25  # numpy scalar made plain
    assert outs['train']['meta']['dataset_meta']['classes'] == ('a', 'b')


def test_cli_several_checkpoints_to_a_directory(tmp_path, capsys):
    ckpts = [new_checkpoint(TOY_DET, tmp_path / f'epoch_{i}.pth', seed=i) for i in (1, 2)]
    out_dir = tmp_path / 'deploy'
    assert fold_cli.main([str(TOY_DET), *map(str, ckpts), str(out_dir), '--verify',
                          '--shape', '64', '96']) == 0
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == ['epoch_1.pth', 'epoch_2.pth', TOY_DET.stem + '_deploy.py']
    text = capsys.readouterr().out
    assert text.count('verify PASS') == 2 and 'folded 24 DOConv layers' in text
    a, b = (torch.load(out_dir / f'epoch_{i}.pth', weights_only=True)['state_dict']
            for i in (1, 2))
    assert not torch.equal(a['backbone.conv1.weight'], b['backbone.conv1.weight'])


def test_cli_verify_with_an_image_through_the_test_pipeline(tmp_path, capsys):
    from do_conv_mm.toy_data import ensure_toy_data
    root = Path(ensure_toy_data(str(REPO / 'data' / 'toy')))
    image = sorted((root / 'coco' / 'val').glob('*.png'))[0]
    ckpt = new_checkpoint(TOY_DET, tmp_path / 'train.pth', seed=6)
    assert fold_cli.main([str(TOY_DET), str(ckpt), str(tmp_path / 'f.pth'), '--verify',
                          '--image', str(image)]) == 0
    text = capsys.readouterr().out
    assert 'verify PASS' in text and 'head[0][0]' in text


# ------------------------------------------------------------------------------------------------
# round trip through Runner training and tools/test.py on the toy data
# ------------------------------------------------------------------------------------------------
def _train_a_few_iterations(config: Path, work_dir: Path) -> Path:
    """Two Runner iterations from a randomised start (random D, BN statistics): a real full
    training checkpoint whose D are far from 0 and whose predictions are not all one class (a
    few iterations from scratch predict only background, which any fold would reproduce)."""
    from mmengine.runner import Runner
    from do_conv_mm.toy_data import ensure_toy_data_for_config
    cfg = Config.fromfile(str(config))
    ensure_toy_data_for_config(cfg)
    start = new_checkpoint(config, work_dir.parent / 'start.pth', seed=8)
    cfg.load_from = str(start)
    cfg.work_dir = str(work_dir)
    cfg.train_dataloader.dataset.indices = 8
    cfg.train_dataloader.batch_size = 4
    cfg.param_scheduler = []
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=100)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=2)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    Runner.from_cfg(cfg).train()
    return work_dir / 'iter_2.pth'


def _tools_test():
    """tools/test.py as a module (its name clashes with the stdlib's ``test`` package)."""
    spec = importlib.util.spec_from_file_location('do_conv_mm_tools_test', REPO / 'tools/test.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _test_py(config, checkpoint, work_dir: Path, *extra) -> dict:
    """tools/test.py CONFIG CHECKPOINT on the first 12 toy val images; the metrics it saved."""
    metrics = _tools_test().main([str(config), str(checkpoint), '--work-dir', str(work_dir),
                                  *extra, '--cfg-options', 'test_dataloader.dataset.indices=12'])
    saved = json.loads((work_dir / 'test_metrics.json').read_text())['metrics']
    assert saved == pytest.approx({k: float(v) for k, v in metrics.items()})
    return saved


def _fold_trained(config: Path, tmp_path: Path):
    ckpt = _train_a_few_iterations(config, tmp_path / 'train')
    trained = torch.load(ckpt, weights_only=False)
    assert {'optimizer', 'message_hub', 'param_schedulers'} <= set(trained)
    d_max = max(v.abs().max().item() for k, v in trained['state_dict'].items()
                if k.endswith('.D'))
    assert d_max > 1e-2  # the D are not the identity: folding has work to do
    out = tmp_path / 'folded.pth'
    result = fold_checkpoint(str(config), str(ckpt), str(out), verify=True, log=print)
    assert all(d.ok for d in result.verify)
    return ckpt, out, result.out_config


def test_round_trip_trained_toy_rtmdet_gives_identical_metrics(tmp_path, capsys):
    """RTMDet-tiny (shared head convs): train -> tools/fold_doconv.py --verify -> tools/test.py
    on both: identical mAP and the same detections."""
    ckpt = _train_a_few_iterations(TOY_RTMDET, tmp_path / 'train')
    out = tmp_path / 'deploy' / 'folded.pth'
    capsys.readouterr()
    assert fold_cli.main([str(TOY_RTMDET), str(ckpt), str(out), '--verify']) == 0
    assert 'verify PASS' in capsys.readouterr().out
    deploy_config = out.parent / (TOY_RTMDET.stem + '_deploy.py')
    # Barely trained from random D and BN: most regressed distances are negative, and boxes of
    # negative size would be dropped (min_bbox_size 0) - on some seeds every box of every image.
    # Keep them all, so that the metrics compare real detections whatever the start.
    keep_all = ['--cfg-options', 'model.test_cfg.score_thr=0.0', 'model.test_cfg.min_bbox_size=-1']
    before = _test_py(TOY_RTMDET, ckpt, tmp_path / 'before', '--out', str(tmp_path / 'a.pkl'),
                      *keep_all)
    after = _test_py(deploy_config, out, tmp_path / 'after', '--out', str(tmp_path / 'b.pkl'),
                     *keep_all)
    assert before == after and 'coco/bbox_mAP' in before
    preds = []
    for name in ('a.pkl', 'b.pkl'):
        with open(tmp_path / name, 'rb') as f:
            preds.append(pickle.load(f))
    assert all(len(p['pred_instances']['scores']) > 0 for p in preds[0])
    for p, q in zip(*preds):
        a = np.sort(p['pred_instances']['scores'].numpy())[::-1][:90]
        b = np.sort(q['pred_instances']['scores'].numpy())[::-1][:90]
        assert np.allclose(a, b, atol=1e-4)
        # The same boxes, matched by position (near-tied scores may swap their order); the
        # outputs agree to fp32 rounding, ~1e-5 px on this 128 px image. Boxes within a few
        # ulps (1e-6) of the lowest kept score are left out: barely trained, the 100 kept scores
        # lie within 1e-3 of each other, and where two tie at the cut, max_per_img keeps one or
        # the other from a 1-ulp difference (seen: 0.5300624 in both, boxes 8 px apart).
        boxes_a, boxes_b = p['pred_instances']['bboxes'], q['pred_instances']['bboxes']
        scores_b = q['pred_instances']['scores']
        above_cut = scores_b > scores_b.min() + 1e-6
        assert above_cut.sum() >= len(scores_b) - 5
        assert torch.cdist(boxes_b[above_cut], boxes_a,
                           p=float('inf')).min(dim=1).values.max() < 1e-3


def test_round_trip_trained_toy_segmentor_gives_identical_metrics(tmp_path):
    """Runner-trained toy segmentor -> fold -> tools/test.py on both: identical mIoU and maps."""
    ckpt, out, deploy_config = _fold_trained(TOY_SEG, tmp_path)
    before = _test_py(TOY_SEG, ckpt, tmp_path / 'before', '--out', str(tmp_path / 'maps_before'))
    after = _test_py(deploy_config, out, tmp_path / 'after', '--out', str(tmp_path / 'maps_after'))
    assert before == after
    assert 0 < before['mIoU'] < 100 and before['mAcc'] != 25.0  # not a one-class prediction
    maps = sorted((tmp_path / 'maps_before').rglob('*.png'))
    assert len(maps) == 12
    from PIL import Image
    differing = total = 0
    for path in maps:
        a = np.asarray(Image.open(path))
        b = np.asarray(Image.open(tmp_path / 'maps_after' / path.relative_to(
            tmp_path / 'maps_before')))
        differing += int((a != b).sum())
        total += a.size
    # Per-pixel argmax of logits that agree to ~1e-6: only exact near-ties may flip.
    assert differing <= total * 1e-4, (differing, total)
    assert len(np.unique(a)) > 1


def test_round_trip_trained_toy_detector_gives_identical_metrics(tmp_path):
    """Runner-trained toy detector -> fold -> tools/test.py on both: identical mAP, and the same
    detections (score_thr 0 keeps the barely trained detector's low-confidence boxes)."""
    ckpt, out, deploy_config = _fold_trained(TOY_DET, tmp_path)
    keep_all = ['--cfg-options', 'model.test_cfg.score_thr=0.0']
    before = _test_py(TOY_DET, ckpt, tmp_path / 'before', '--out', str(tmp_path / 'before.pkl'),
                      *keep_all)
    after = _test_py(deploy_config, out, tmp_path / 'after', '--out', str(tmp_path / 'after.pkl'),
                     *keep_all)
    assert before == after and 'coco/bbox_mAP' in before
    preds = []
    for name in ('before.pkl', 'after.pkl'):
        with open(tmp_path / name, 'rb') as f:
            preds.append(pickle.load(f))
    assert len(preds[0]) == len(preds[1]) == 12
    assert sum(len(p['pred_instances']['scores']) for p in preds[0]) > 100
    for p, q in zip(*preds):
        # Scores in [0, 1] from logits that agree to ~1e-6 (fp32 fold); the top-100 may swap a
        # near-tie at the cut, so compare the 90 best.
        a = np.sort(p['pred_instances']['scores'].numpy())[::-1][:90]
        b = np.sort(q['pred_instances']['scores'].numpy())[::-1][:90]
        assert np.allclose(a, b, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# bad input: one-line error, non-zero exit, nothing written, input untouched
# ------------------------------------------------------------------------------------------------
def make_marker_dir(path):
    """Called by unpickling an ``Evil``: a directory that proves code from the file ran."""
    os.makedirs(path)


class Evil:
    """A meta entry whose unpickling runs code: ``via`` is called with ``marker``."""

    def __init__(self, marker, via=make_marker_dir):
        self.marker, self.via = marker, via

    def __reduce__(self):
        return self.via, (self.marker, )


def _bad_cases(tmp: Path):
    """name -> (config, checkpoint path, OUT, expected message fragment)."""
    good = new_checkpoint(TOY_DET, tmp / 'good.pth', seed=7)
    state = torch.load(good, weights_only=False)['state_dict']
    cases = {}
    cases['missing'] = (TOY_DET, tmp / 'nope.pth', tmp / 'o.pth', 'does not exist')
    (tmp / 'adir').mkdir()
    cases['directory'] = (TOY_DET, tmp / 'adir', tmp / 'o.pth', 'is a directory')
    (tmp / 'text.pth').write_text('model weights go here\n')
    cases['text'] = (TOY_DET, tmp / 'text.pth', tmp / 'o.pth', 'not a torch checkpoint')
    data = good.read_bytes()
    (tmp / 'truncated.pth').write_bytes(data[:len(data) // 2])
    cases['truncated'] = (TOY_DET, tmp / 'truncated.pth', tmp / 'o.pth', 'truncated or corrupt')
    # Intact zip directory, garbage inside the pickle record (torch keeps no checksum of tensor
    # bytes, so damage there is undetectable by any loader; the pickle stream is checked).
    with zipfile.ZipFile(good) as archive:
        record = next(i for i in archive.infolist() if i.filename.endswith('/data.pkl'))
    local = record.header_offset
    name_len, extra_len = struct.unpack('<HH', data[local + 26:local + 30])
    start = local + 30 + name_len + extra_len
    corrupt = bytearray(data)
    corrupt[start + 2:start + 34] = b'\xff' * 32
    (tmp / 'corrupt.pth').write_bytes(bytes(corrupt))
    cases['corrupt'] = (TOY_DET, tmp / 'corrupt.pth', tmp / 'o.pth', 'corrupt')
    missing = {k: v for k, v in state.items() if not k.startswith('bbox_head.retina_cls')}
    torch.save(dict(state_dict=missing), tmp / 'missing_keys.pth')
    cases['missing keys'] = (TOY_DET, tmp / 'missing_keys.pth', tmp / 'o.pth',
                             f'checkpoint does not match CONFIG: missing_keys.pth (state_dict) vs '
                             f'{TOY_DET.name}: 2 missing key(s) (bbox_head.retina_cls.weight')
    misshaped = dict(state, **{'neck.fpn_convs.0.conv.D': torch.zeros(64, 9, 10)})
    torch.save(dict(state_dict=misshaped), tmp / 'misshaped.pth')
    cases['mis-shaped keys'] = (TOY_DET, tmp / 'misshaped.pth', tmp / 'o.pth',
                                'mis-shaped key(s) (neck.fpn_convs.0.conv.D: checkpoint '
                                '(64, 9, 10) vs CONFIG (64, 9, 9))')
    cases['OUT is CHECKPOINT'] = (TOY_DET, good, good, 'is the same file as the input')
    os.link(good, tmp / 'hardlink.pth')
    cases['OUT is a hard link of CHECKPOINT'] = (TOY_DET, good, tmp / 'hardlink.pth',
                                                 'is the same file as the input')
    (tmp / 'afile').write_text('x')
    cases['OUT under a file'] = (TOY_DET, good, tmp / 'afile' / 'o.pth', 'is a file, not a dir')
    if os.geteuid() == 0:  # root writes anywhere chmod forbids; sysfs refuses even root
        unwritable = Path('/sys/fold_doconv_test.pth')
    else:
        (tmp / 'ro').mkdir()
        (tmp / 'ro').chmod(0o555)
        unwritable = tmp / 'ro' / 'o.pth'
    cases['unwritable OUT'] = (TOY_DET, good, unwritable, 'is not writable')
    torch.save(dict(state_dict=state, meta=dict(hook=Evil(str(tmp / 'PWNED')))),
               tmp / 'evil.pth')
    cases['needs arbitrary code'] = (TOY_DET, tmp / 'evil.pth', tmp / 'o.pth',
                                     'nothing from the file was executed')
    # The same through a function of a module torch blocks outright (os): refused too.
    torch.save(dict(state_dict=state, meta=dict(hook=Evil(str(tmp / 'PWNED'), os.makedirs))),
               tmp / 'evil_os.pth')
    cases['needs os.makedirs'] = (TOY_DET, tmp / 'evil_os.pth', tmp / 'o.pth',
                                  'nothing from the file was executed')
    fold_checkpoint(str(TOY_DET), str(good), str(tmp / 'made' / 'folded.pth'), log=lambda s: None)
    cases['already folded'] = (TOY_DET, tmp / 'made' / 'folded.pth', tmp / 'o.pth',
                               'is already folded')
    new_checkpoint(TOY_RTMDET, tmp / 'rtmdet.pth', seed=9)
    cases['DO-Conv checkpoint of another model'] = (
        TOY_DET, tmp / 'rtmdet.pth', tmp / 'o.pth',
        'is a DO-Conv checkpoint of another model: it has 40 DO-Conv ".D" keys '
        '(backbone.stem.0.conv.D')
    plain = {k: v for k, v in state.items() if not k.endswith('.D')}
    torch.save(dict(state_dict=plain), tmp / 'plain.pth')
    cases['plain checkpoint'] = (TOY_DET, tmp / 'plain.pth', tmp / 'o.pth',
                                 'holds no DO-Conv parameters')
    cases['config without DO-Conv'] = (TOY_DET_PLAIN, good, tmp / 'o.pth',
                                       'builds no DO-Conv layer')
    shutil.copy(good, tmp / 'epoch_12.pth')
    cases['OUT is an existing training checkpoint'] = (
        TOY_DET, good, tmp / 'epoch_12.pth', 'exists and is not a folded checkpoint this tool '
        'wrote; nothing was written. Pass another path, or --force')
    return cases


def test_every_bad_input_is_refused_cleanly(tmp_path, capsys):
    cases = _bad_cases(tmp_path)
    for name, (config, ckpt, out, message) in cases.items():
        inputs = {p: sha(p) for p in tmp_path.rglob('*') if p.is_file()}
        listing = sorted(str(p) for p in tmp_path.rglob('*'))
        code = fold_cli.main([str(config), str(ckpt), str(out)])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith('error:')]
        assert code == 1, name
        assert len(errors) == 1 and message in errors[0], (name, err)
        assert 'Traceback' not in err, name
        # nothing written (no OUT, no deploy config, no temporary file), inputs byte-identical
        assert sorted(str(p) for p in tmp_path.rglob('*')) == listing, name
        assert all(sha(p) == h for p, h in inputs.items()), name
        assert not Path('/sys/fold_doconv_test.pth').exists()
    assert not (tmp_path / 'PWNED').exists()


def test_outputs_replace_only_what_the_fold_wrote(tmp_path, capsys):
    """A rerun replaces the fold's own outputs (folded checkpoint, marked deploy config); an
    existing file it did not write, here a base config named as --out-config (overwriting it
    broke the training config), is refused with nothing written, and --force replaces it."""
    good = new_checkpoint(TOY_DET, tmp_path / 'good.pth', seed=7)
    out, deploy = tmp_path / 'out' / 'folded.pth', tmp_path / 'out' / 'deploy.py'
    args = [str(TOY_DET), str(good), str(out), '--out-config', str(deploy)]
    assert fold_cli.main(args) == 0 and fold_cli.main(args) == 0  # a rerun
    assert deploy.read_text().startswith('# do_conv_mm deploy config: ')
    assert Config.fromfile(str(deploy)).model.type == 'RetinaNet'

    base = tmp_path / 'base.py'
    base.write_text("model = dict(type='RetinaNet')\n")
    before = {p: sha(p) for p in tmp_path.rglob('*') if p.is_file()}
    capsys.readouterr()
    assert fold_cli.main(args[:3] + ['--out-config', str(base)]) == 1
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
    assert f"--out-config {str(base)!r} exists and is not a deploy config this tool wrote" in error
    assert {p: sha(p) for p in tmp_path.rglob('*') if p.is_file()} == before
    assert fold_cli.main(args[:3] + ['--out-config', str(base), '--force']) == 0
    assert base.read_text().startswith('# do_conv_mm deploy config: ')


def test_bad_input_from_the_command_line_exits_non_zero_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), str(TOY_DET), str(tmp_path / 'x.pth'),
                           str(tmp_path / 'o.pth')], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: Checkpoint '")
    assert 'Traceback' not in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('shape', [['0', '0'], ['100', '-3'], ['a', '8']])
def test_verify_shape_must_be_positive_sizes(shape, capsys):
    """--shape 0 0 failed deep inside the model as "a do_conv_mm bug": argparse refuses it now."""
    with pytest.raises(SystemExit) as exit_info:
        fold_cli.parse_args([str(TOY_DET), 'ckpt.pth', 'out.pth', '--verify', '--shape', *shape])
    assert exit_info.value.code == 2
    assert 'argument --shape' in capsys.readouterr().err


def test_cfg_options_item_without_equals_is_an_argparse_error(capsys):
    """mmengine's DictAction raised ValueError (a 27-line traceback); every tool uses
    runner_setup.CfgOptionsAction, which names the item."""
    args = fold_cli.parse_args([str(TOY_DET), 'ckpt.pth', 'out.pth', '--cfg-options',
                                'model.neck.num_outs=5', 'a.b=[1,2]'])
    assert args.cfg_options == {'model.neck.num_outs': 5, 'a.b': [1, 2]}
    args = fold_cli.parse_args([str(TOY_DET), 'ckpt.pth', 'out.pth', '--cfg-options',
                                'x=(0, 1, 2)', 'y=[123.675, 116.28]'])  # spaces between items
    assert args.cfg_options == {'x': (0, 1, 2), 'y': [123.675, 116.28]}
    with pytest.raises(SystemExit) as exit_info:
        fold_cli.parse_args([str(TOY_DET), 'ckpt.pth', 'out.pth', '--cfg-options', 'foo'])
    assert exit_info.value.code == 2
    assert "argument --cfg-options: 'foo' is not KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # mmengine would read '/tmp/ab.pth'
        fold_cli.parse_args([str(TOY_DET), 'c.pth', 'o.pth', '--cfg-options',
                             'load_from=/tmp/a b.pth'])
    assert "deletes spaces inside values (it would read 'load_from=/tmp/ab.pth')" in \
        capsys.readouterr().err


def test_verify_image_must_be_an_image(tmp_path, capsys):
    """A checkpoint given as --image failed in mmcv's pipeline as "a do_conv_mm bug"."""
    not_image = tmp_path / 'ckpt.pth'
    not_image.write_bytes(b'PK\x03\x04 not an image')
    with pytest.raises(SystemExit) as exit_info:
        fold_cli.parse_args([str(TOY_DET), 'c.pth', 'o.pth', '--verify', '--image', str(not_image)])
    assert exit_info.value.code == 2 and 'is not a readable image file' in capsys.readouterr().err
