"""Backbones, projection head and ContrastiveModel: shapes, stems, options, AMP / channels_last."""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from service.config import ModelConfig
from service.models import (
    BACKBONES,
    ContrastiveModel,
    GlobalBatchNorm,
    ProjectionHead,
    SmallCNN,
    build_backbone,
    build_model,
    maybe_convert_sync_batchnorm,
)
from service.models.backbones import model_config_problems
from service.registry.spec import backbone_from_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("arch", "out_dim"), [("small_cnn", 256), ("resnet18", 512)])
def test_backbone_shapes(arch, out_dim):
    torch.manual_seed(0)
    backbone = build_backbone(arch)
    assert backbone.out_dim == out_dim
    features = backbone(torch.randn(4, 3, 32, 32))
    assert features.shape == (4, out_dim) and torch.isfinite(features).all()


def test_resnet50_one_tiny_forward():
    backbone = build_backbone("resnet50").eval()
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 2048)
    assert backbone.out_dim == 2048


def test_cifar_stem_vs_imagenet_stem():
    cifar = build_backbone("resnet18", cifar_stem=True)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity) and isinstance(cifar.fc, nn.Identity)
    imagenet = build_backbone("resnet18", cifar_stem=False)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)
    # The CIFAR stem keeps 4x more spatial resolution into layer1 (32x32 instead of 8x8).
    seen = {}
    for name, model in (("cifar", cifar), ("imagenet", imagenet)):
        model.layer1.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
        model.eval()(torch.zeros(1, 3, 32, 32))
    assert seen["cifar"].shape[-1] == 32 and seen["imagenet"].shape[-1] == 8


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match=r"unknown backbone 'vit'.*resnet18"):
        build_backbone("vit")
    assert set(BACKBONES) == {"small_cnn", "resnet18", "resnet50"}


@pytest.mark.parametrize(
    ("layers", "bn", "n_linear", "n_bn"), [(1, True, 1, 0), (2, True, 2, 1), (3, False, 3, 0)]
)
def test_projection_head_depth(layers, bn, n_linear, n_bn):
    head = ProjectionHead(64, 32, 16, num_layers=layers, batch_norm=bn)
    modules = list(head.modules())
    assert sum(isinstance(m, nn.Linear) for m in modules) == n_linear
    assert sum(isinstance(m, nn.BatchNorm1d) for m in modules) == n_bn
    assert head(torch.randn(5, 64)).shape == (5, 16)
    with pytest.raises(ValueError, match="proj_layers must be >= 1"):
        ProjectionHead(64, 32, 16, num_layers=0)


def test_build_model_from_config_and_backward():
    cfg = ModelConfig(arch="small_cnn", proj_hidden_dim=64, proj_out_dim=32, proj_layers=3)
    model = build_model(cfg)
    x = torch.randn(6, 3, 32, 32)
    z, h = model(x), model.embed(x)
    assert z.shape == (6, 32) and h.shape == (6, 256)
    torch.testing.assert_close(model.head(h), z)  # forward = head(backbone(x))
    z.pow(2).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(arch="resnet18")).eval()
    fast = build_model(ModelConfig(arch="resnet18", channels_last=True)).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-4, rtol=1e-4)


def test_autocast_bf16_forward():
    model = build_model(ModelConfig(arch="small_cnn"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(torch.randn(4, 3, 32, 32))
    assert z.dtype == torch.bfloat16 and z.shape == (4, 128) and torch.isfinite(z.float()).all()


def test_sync_batchnorm_conversion():
    # global BN on every backend (service/models/global_bn.py), not torch's CUDA-only SyncBN
    model = build_model(ModelConfig(arch="small_cnn"))
    n_bn = sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in model.modules())
    assert maybe_convert_sync_batchnorm(model, enabled=False) is model
    synced = maybe_convert_sync_batchnorm(model, enabled=True)
    assert sum(isinstance(m, GlobalBatchNorm) for m in synced.modules()) == n_bn
    assert isinstance(synced, ContrastiveModel)
    assert synced(torch.randn(4, 3, 32, 32)).shape == (4, 128)  # CPU, no process group: plain BN


def test_small_cnn_width_scales_every_stage_and_is_rebuilt_from_the_spec():
    backbone = build_backbone("small_cnn", width=16)
    widths = [m.out_channels for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [16, 32, 64, 128] and backbone.out_dim == 128
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    model = build_model(ModelConfig(width=48))
    assert model.backbone.out_dim == 384
    # A registered encoder records its ModelConfig; the rebuilt backbone has the same shape.
    spec = SimpleNamespace(model_config=asdict(ModelConfig(width=48)), class_path=None)
    rebuilt = backbone_from_spec(spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.backbone.state_dict().items()
    }


def test_width_is_refused_for_fixed_width_backbones():
    assert model_config_problems(ModelConfig(arch="small_cnn", width=48)) == []
    (problem,) = model_config_problems(ModelConfig(arch="resnet18", width=48))
    assert "model.width shapes only the small_cnn backbone" in problem
    assert model_config_problems(ModelConfig(width=0)) == ["model.width must be >= 1, got 0"]


def test_depth_stacks_convs_per_stage_and_keeps_depth_one_checkpoints():
    """``model.depth`` puts that many conv-BN-ReLU layers in each of the four stages; depth 1 is
    the old network, parameter names included (older checkpoints still load)."""
    deep = build_backbone("small_cnn", width=8, depth=2)
    convs = [(m.in_channels, m.out_channels) for m in deep.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(3, 8), (8, 8), (8, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64)]
    assert deep(torch.randn(2, 3, 16, 16)).shape == (2, 64)
    old = SmallCNN((8, 16, 32, 64))
    assert build_backbone("small_cnn", width=8).state_dict().keys() == old.state_dict().keys()
    model = build_model(ModelConfig(width=8, depth=2))
    spec = SimpleNamespace(model_config=asdict(ModelConfig(width=8, depth=2)), class_path=None)
    rebuilt = backbone_from_spec(spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.backbone.state_dict().items()
    }
    (problem,) = model_config_problems(ModelConfig(arch="resnet18", depth=2))
    assert "model.depth shapes only the small_cnn backbone" in problem
    assert model_config_problems(ModelConfig(depth=0)) == ["model.depth must be >= 1, got 0"]
