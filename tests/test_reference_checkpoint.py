"""Checkpoints of the public reference DO-Conv code (W, D, d_diag) -> do_conv_mm's layout.

The reference layout and forward are re-stated here from their description (module docstring of
do_conv_mm/reference_checkpoint.py), independently of the converter: ``reference_kernel`` is the
textbook einsum over the reference's reshaped W, not the converter's bmm.
"""
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config

from training_helpers import REPO, tool_env

from do_conv_mm import DOConv2d
from do_conv_mm.checkpoint import CheckpointError
from do_conv_mm.deploy import build_model
from do_conv_mm.pretrained import check_pretrained_inits
from do_conv_mm.reference_checkpoint import (ReferenceCheckpointError, binds_true_channels,
                                             convert_reference_state_dict, reference_identity)

sys.path.insert(0, osp.join(REPO, 'tools'))
import convert_reference_checkpoint as convert_cli  # noqa: E402
from test_fold_tool import seeded_model  # noqa: E402

TOY_DOCONV = osp.join(REPO, 'configs/toy/retinanet_r18-tiny-doconv_fpn_toy.py')
TOY_PLAIN = osp.join(REPO, 'configs/toy/retinanet_r18-tiny_fpn_toy.py')


def reference_layer(cout, cin, kernel, groups, D_mul, gen, dtype=torch.float64, d_scale=0.3):
    """Random trained-looking reference parameters: W (O, Cg, S), D (C, K, S), d_diag."""
    taps = kernel[0] * kernel[1]
    return {'W': torch.randn(cout, cin // groups, D_mul, generator=gen, dtype=dtype),
            'D': d_scale * torch.randn(cin, taps, D_mul, generator=gen, dtype=dtype),
            'd_diag': reference_identity(taps, D_mul, cin, dtype)}


def reference_kernel(W, D, d_diag, groups, kernel):
    """The reference's composed kernel: einsum('ims,ois->oim') over W.reshape(O / g, C, S)."""
    O, Cg, S = W.shape
    Wr = W.reshape(O // groups, D.shape[0], S)
    return torch.einsum('ims,ois->oim', D + d_diag, Wr).reshape(O, Cg, *kernel)


LAYERS = {  # (cin, cout, kernel, groups, D_mul)
    '3x3': (6, 8, (3, 3), 1, 9),
    '3x3-Dmul12': (6, 8, (3, 3), 1, 12),
    '3x3-Dmul18-two-identities': (6, 8, (3, 3), 1, 18),
    '5x5': (4, 5, (5, 5), 1, 25),
    '1x3-non-square': (4, 6, (1, 3), 1, 4),
    'depthwise-Dmul11': (6, 6, (3, 3), 6, 11),
    'grouped': (8, 6, (3, 3), 2, 9),
    'depthwise-multiplier-Dmul11': (6, 12, (3, 3), 6, 11),
}
REBASED = {'grouped', 'depthwise-multiplier-Dmul11'}  # the reference binds D to other channels


@pytest.mark.parametrize('name', list(LAYERS))
def test_converted_layer_computes_the_reference_function(name):
    """Loaded strictly into DOConv2d, the converted weights give the reference layer's outputs
    (float64, train and eval paths: 1e-12, a few dozen rounded products of O(1) terms). D is
    kept where the reference binds it to the channels the kernel reads (groups = 1, depthwise
    without multiplier); elsewhere the layer is rebased (its kernel, D = 0)."""
    cin, cout, kernel, groups, D_mul = LAYERS[name]
    gen = torch.Generator().manual_seed(0)
    ref = {f'conv.{k}': v for k, v in
           reference_layer(cout, cin, kernel, groups, D_mul, gen).items()}
    ref['conv.bias'] = torch.randn(cout, generator=gen, dtype=torch.float64)
    converted, layers = convert_reference_state_dict(ref, {'conv': kernel})
    assert [(layer.name, layer.kernel_size, layer.groups, layer.D_mul, layer.how)
            for layer in layers] == \
        [('conv', kernel, groups, D_mul, 'rebased' if name in REBASED else 'exact')]
    assert not any(k.endswith(('.W', '.d_diag')) for k in converted)
    layer = DOConv2d(cin, cout, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=groups,
                     D_mul=D_mul).double()
    layer.load_state_dict({k[len('conv.'):]: v for k, v in converted.items()}, strict=True)
    x = torch.randn(2, cin, 9, 9, generator=gen, dtype=torch.float64)
    expected = F.conv2d(x, reference_kernel(ref['conv.W'], ref['conv.D'], ref['conv.d_diag'],
                                            groups, kernel),
                        ref['conv.bias'], padding=layer.padding, groups=groups)
    scale = expected.abs().max()
    assert (layer(x) - expected).abs().max() <= 1e-12 * scale
    layer.eval()
    with torch.no_grad():
        assert (layer(x) - expected).abs().max() <= 1e-12 * scale
    if name in REBASED:
        assert torch.equal(layer.D, torch.zeros_like(layer.D))  # the same function, D = 0
    else:
        assert layer.D.abs().max() > 0.1  # the trained D is carried, not folded away


@pytest.mark.parametrize('name', list(LAYERS))
def test_plain_conversion_gives_a_plain_conv_the_reference_function(name):
    """``plain=True``: only the composed kernel, loaded strictly into nn.Conv2d (float64: 1e-12)."""
    cin, cout, kernel, groups, D_mul = LAYERS[name]
    gen = torch.Generator().manual_seed(6)
    ref = reference_layer(cout, cin, kernel, groups, D_mul, gen)
    converted, layers = convert_reference_state_dict({f'conv.{k}': v for k, v in ref.items()},
                                                     {'conv': kernel}, plain=True)
    assert [layer.how for layer in layers] == ['folded'] and list(converted) == ['conv.weight']
    conv = torch.nn.Conv2d(cin, cout, kernel, groups=groups, bias=False).double()
    conv.load_state_dict({'weight': converted['conv.weight']}, strict=True)
    x = torch.randn(2, cin, 7, 7, generator=gen, dtype=torch.float64)
    expected = F.conv2d(x, reference_kernel(ref['W'], ref['D'], ref['d_diag'], groups, kernel),
                        groups=groups)
    assert (conv(x) - expected).abs().max() <= 1e-12 * expected.abs().max()


def test_reference_binding_is_the_true_one_only_for_dense_and_plain_depthwise():
    """(o·Cg + i) mod C against (o // Og)·Cg + i, the channel entry (o, i) reads."""
    assert binds_true_channels(8, 6, 1) and binds_true_channels(6, 6, 6)
    assert not binds_true_channels(12, 6, 6)  # depthwise, channel multiplier 2
    assert not binds_true_channels(6, 8, 2) and not binds_true_channels(64, 64, 32)  # ResNeXt
    assert not binds_true_channels(4, 4, 2)


def test_groups_one_gives_the_reference_P_bit_for_bit_in_fp32():
    """D + I of the converted layer is the reference's D + d_diag exactly (fp32, |D| < 1/2):
    the same composition matrix, not one rounded differently."""
    gen = torch.Generator().manual_seed(1)
    ref = reference_layer(16, 8, (3, 3), 1, 12, gen, torch.float32)
    ref['D'] = torch.rand(ref['D'].shape, generator=gen) * 0.98 - 0.49
    converted, _ = convert_reference_state_dict({f'c.{k}': v for k, v in ref.items()})
    identity = torch.cat([torch.eye(9), torch.zeros(9, 3)], dim=1)
    assert torch.equal(converted['c.D'] + identity, ref['D'] + ref['d_diag'])
    assert torch.equal(converted['c.weight'].reshape(16, 8, 9), ref['W'][..., :9])
    assert torch.equal(converted['c.weight_extra'], ref['W'][..., 9:])


def test_rebased_grouped_layer_still_trains_every_D_entry():
    """A rebased layer keeps W's extra columns as weight_extra, so D's extra columns get
    gradients (with zeros there, D = 0 would be a saddle they never leave)."""
    gen = torch.Generator().manual_seed(2)
    ref = reference_layer(6, 6, (3, 3), 3, 12, gen, torch.float32)
    converted, _ = convert_reference_state_dict({f'c.{k}': v for k, v in ref.items()})
    layer = DOConv2d(6, 6, 3, padding=1, groups=3, D_mul=12, bias=False)
    layer.load_state_dict({k[2:]: v for k, v in converted.items()})
    layer(torch.randn(2, 6, 8, 8, generator=gen)).square().sum().backward()
    assert (layer.D.grad.abs() > 0).all()


def test_missing_or_renamed_d_diag():
    """``D_diag`` (another spelling in copies of the reference) is read like ``d_diag``; a
    checkpoint without it gets the reference's rule, eye repeated then zero-padded."""
    gen = torch.Generator().manual_seed(3)
    ref = reference_layer(4, 4, (3, 3), 1, 20, gen)
    expected, _ = convert_reference_state_dict({f'c.{k}': v for k, v in ref.items()})
    renamed = {'c.W': ref['W'], 'c.D': ref['D'], 'c.D_diag': ref['d_diag']}
    without = {'c.W': ref['W'], 'c.D': ref['D']}
    for state, rebuilt in ((renamed, False), (without, True)):
        converted, layers = convert_reference_state_dict(state)
        assert layers[0].diag_rebuilt is rebuilt
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], expected[k]) for k in expected)
    assert torch.equal(ref['d_diag'][0, :, 9:18], torch.eye(9))  # the rule: eye repeated ...
    assert not ref['d_diag'][0, :, 18:].any()  # ... then S % K zero columns


def test_other_entries_kept_in_order_and_wrapper_prefix_dropped():
    gen = torch.Generator().manual_seed(4)
    ref = reference_layer(4, 4, (3, 3), 1, 9, gen)
    state = {'module.stem.weight': torch.ones(4, 3, 1, 1), 'module.conv.W': ref['W'],
             'module.conv.D': ref['D'], 'module.conv.d_diag': ref['d_diag'],
             'module.proj.W': torch.ones(5, 4, 1), 'module.bn.running_mean': torch.zeros(4)}
    converted, layers = convert_reference_state_dict(state)
    assert list(converted) == ['stem.weight', 'conv.weight', 'conv.D', 'proj.weight',
                               'bn.running_mean']
    assert converted['proj.weight'].shape == (5, 4, 1, 1)  # a 1×1 reference layer: plain
    assert [(layer.groups, layer.how) for layer in layers] == [(1, 'exact'), (None, '1x1')]


@pytest.mark.parametrize('state, message', [
    ({'conv.weight': torch.ones(4, 4, 3, 3)}, 'no reference DO-Conv layer'),
    ({'conv.weight': torch.ones(4, 4, 3, 3), 'conv.D': torch.zeros(4, 9, 9)},
     "already in do_conv_mm's layout"),
    ({'conv.W': torch.ones(4, 4, 3), 'conv.D': torch.zeros(4, 3, 3)}, 'pass --config'),
    ({'conv.W': torch.ones(4, 4, 9), 'conv.D': torch.zeros(4, 9, 12)}, 'does not fit W'),
    ({'conv.W': torch.ones(4, 3, 9), 'conv.D': torch.zeros(4, 9, 9)}, 'does not fit W'),
    ({'conv.W': torch.ones(4, 4, 9)}, 'conv.D is missing'),
    ({'conv.W': torch.ones(4, 4, 9), 'conv.D': torch.zeros(4, 9, 9),
      'conv.d_diag': torch.zeros(4, 9, 3)}, 'not D\'s'),
])
def test_inconsistent_state_dicts_are_refused(state, message):
    with pytest.raises(ReferenceCheckpointError, match=message):
        convert_reference_state_dict(state)


def test_kernel_size_from_the_model_must_match_the_taps():
    state = {'conv.W': torch.ones(4, 4, 9), 'conv.D': torch.zeros(4, 9, 9)}
    with pytest.raises(ReferenceCheckpointError, match='the model\'s layer is 1×3'):
        convert_reference_state_dict(state, {'conv': (1, 3)})


# ------------------------------------------------------------------------------------------------
# tools/convert_reference_checkpoint.py on a reference-trained ResNet (torchvision key names, as
# the reference's ImageNet models have them; mmdet's ResNet names its layers the same way).
# ------------------------------------------------------------------------------------------------
def reference_resnet_checkpoint(D_mul_extra: int = 0, seed: int = 0):
    """A reference-layout training checkpoint for the toy detector's DO-Conv ResNet-18 backbone,
    as DataParallel saves it, and the plain backbone with the reference's composed kernels."""
    gen = torch.Generator().manual_seed(seed)
    plain = seeded_model(Config.fromfile(TOY_PLAIN), seed).backbone
    doconv = build_model(Config.fromfile(TOY_DOCONV)).backbone
    layers = {name: m for name, m in doconv.named_modules() if isinstance(m, DOConv2d)}
    with torch.no_grad():
        for m in plain.modules():  # trained-looking BN statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
    state, plain_state = {}, dict(plain.state_dict())
    for key, value in plain.state_dict().items():
        name = key.rsplit('.', 1)[0]
        if name in layers and key.endswith('.weight') and layers[name].D is not None:
            m = layers[name]
            ref = reference_layer(m.out_channels, m.in_channels, m.kernel_size, m.groups,
                                  m.D_mul + D_mul_extra, gen, torch.float32, d_scale=0.05)
            ref['W'] *= value.std()
            state.update({f'module.{name}.{k}': v for k, v in ref.items()})
            plain_state[key] = reference_kernel(ref['W'], ref['D'], ref['d_diag'], m.groups,
                                                m.kernel_size)
        elif name in layers and key.endswith('.weight'):
            state[f'module.{name}.W'] = value.reshape(value.shape[0], value.shape[1], 1)
        else:
            state[f'module.{key}'] = value
    plain.load_state_dict(plain_state)
    checkpoint = {'epoch': 90, 'arch': 'resnet18', 'best_acc1': torch.tensor(71.5),
                  'state_dict': state}
    return checkpoint, plain, len(layers)


def test_tool_converts_a_reference_resnet_that_mmengine_then_loads(tmp_path, capsys):
    """Reference checkpoint -> tool (--config checks a complete load) -> the detector's
    init_cfg=Pretrained through mmengine's init_weights: its backbone computes what the reference
    network computed (fp32: 1e-5 of the largest output, sums of up to 9·128 rounded products)."""
    checkpoint, plain, n_layers = reference_resnet_checkpoint()
    plain.eval()
    path, out = tmp_path / 'ref.pth', tmp_path / 'converted' / 'r18.pth'
    torch.save(checkpoint, path)
    assert convert_cli.main([str(path), str(out), '--config', TOY_DOCONV]) == 0
    printed = capsys.readouterr().out
    assert 'loads completely into the backbone of retinanet_r18-tiny-doconv_fpn_toy.py' in printed
    assert "conv_cfg=dict(type='DOConv')" in printed

    cfg = Config.fromfile(TOY_DOCONV)
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=str(out))
    detector = build_model(cfg)
    assert 'D of 17 DO-Conv layer(s)' in check_pretrained_inits(detector)[0]
    detector.init_weights()
    backbone = detector.backbone
    backbone.eval()  # mmdet's ResNet.train returns None
    assert sum(isinstance(m, DOConv2d) for m in backbone.modules()) == n_layers
    assert max(m.D.abs().max() for m in backbone.modules()
               if isinstance(m, DOConv2d) and m.D is not None) > 0.05
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for got, want in zip(backbone(x), plain(x)):
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_tool_plain_weights_load_into_the_plain_backbone(tmp_path, capsys):
    """--plain with the plain twin config: a complete load, and the plain backbone then computes
    the reference network (it is built from the same composed kernels: fp32, 1e-5)."""
    checkpoint, plain, _ = reference_resnet_checkpoint(seed=1)
    plain.eval()
    path, out = tmp_path / 'ref.pth', tmp_path / 'plain.pth'
    torch.save(checkpoint, path)
    assert convert_cli.main([str(path), str(out), '--plain', '--config', TOY_PLAIN]) == 0
    printed = capsys.readouterr().out
    assert '17 folded to plain kernels, 3 1×1 (plain)' in printed
    assert 'loads completely into the backbone of retinanet_r18-tiny_fpn_toy.py' in printed
    backbone = build_model(Config.fromfile(TOY_PLAIN)).backbone
    backbone.load_state_dict(torch.load(out, weights_only=True)['state_dict'], strict=True)
    backbone.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for got, want in zip(backbone(x), plain(x)):
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_tool_refuses_without_writing(tmp_path):
    """A D_mul the config does not build, and a checkpoint already in our layout: one error line
    naming the fix, exit 1, nothing written."""
    checkpoint, _, _ = reference_resnet_checkpoint(D_mul_extra=3)
    path, out = tmp_path / 'ref.pth', tmp_path / 'out.pth'
    torch.save(checkpoint, path)
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools/convert_reference_checkpoint.py'),
                           str(path), str(out), '--config', TOY_DOCONV], cwd=REPO, env=tool_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith('error: ')
    assert 'conv1.D' in proc.stderr and 'D_mul 52 vs 49' in proc.stderr and not out.exists()

    assert convert_cli.main([str(path), str(out), '--config', TOY_DOCONV, '--part',
                             'decode_head']) == 1  # a detector has no decode_head
    assert not out.exists()

    ours = tmp_path / 'ours.pth'
    torch.save({'state_dict': build_model(Config.fromfile(TOY_DOCONV)).state_dict()}, ours)
    assert convert_cli.main([str(ours), str(out)]) == 1
    assert not out.exists()


def test_tool_finds_the_weights_where_training_scripts_put_them():
    """``state_dict`` (mmengine, the ImageNet example), ``model`` (many other scripts) or a bare
    state dict; anything else is one CheckpointError naming the top-level keys."""
    weights = {'conv.W': torch.ones(4, 4, 1)}
    for checkpoint in ({'state_dict': weights, 'epoch': 3}, {'model': weights, 'epoch': 3},
                       weights):
        assert list(convert_cli.reference_weights(checkpoint)) == ['conv.W']
    with pytest.raises(CheckpointError, match='keys: epoch, optimizer'):
        convert_cli.reference_weights({'epoch': 3, 'optimizer': {}})


def test_tool_never_replaces_its_input_or_a_file_it_did_not_write(tmp_path):
    """OUT = CHECKPOINT is refused (the reference checkpoint would be gone); an existing file the
    tool did not write is kept unless --force; its own output is replaced (a rerun)."""
    checkpoint, _, _ = reference_resnet_checkpoint()
    path, out, other = tmp_path / 'ref.pth', tmp_path / 'out.pth', tmp_path / 'other.pth'
    torch.save(checkpoint, path)
    torch.save({'state_dict': {'x': torch.ones(1)}}, other)
    before = {p: p.read_bytes() for p in (path, other)}
    assert convert_cli.main([str(path), str(path)]) == 1
    assert convert_cli.main([str(path), str(other)]) == 1
    assert {p: p.read_bytes() for p in (path, other)} == before
    assert convert_cli.main([str(path), str(out)]) == 0
    assert convert_cli.main([str(path), str(out)]) == 0  # its own output: a rerun replaces it
    assert convert_cli.main([str(path), str(other), '--force']) == 0
    assert 'converted_from' in torch.load(other, weights_only=True)['meta']


def test_config_options_without_config_are_refused(capsys):
    """--part / --cfg-options did nothing without --config (silently): an argparse error now."""
    for extra in (['--part', 'decode_head'], ['--cfg-options', 'model.backbone.depth=50']):
        with pytest.raises(SystemExit) as exit_info:
            convert_cli.parse_args(['in.pth', 'out.pth', *extra])
        assert exit_info.value.code == 2 and 'pass --config too' in capsys.readouterr().err
    assert convert_cli.parse_args(['in.pth', 'out.pth']).part == 'backbone'
