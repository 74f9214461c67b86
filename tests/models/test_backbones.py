"""Encoders: shapes, real CLS token / mean pooling (never the first patch token), ResNet stem, freezing."""

from __future__ import annotations

import io

import pytest
import torch
from monai.networks.nets import UNETR

from brainiac.models.backbones import ResNetEncoder, ViTEncoder, build_backbone, freeze, is_frozen
from brainiac.models.config import BackboneConfig


@pytest.fixture
def volume() -> torch.Tensor:
    return torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("patch", [16, 8])
def test_vit_shapes(volume: torch.Tensor, pooling: str, patch: int) -> None:
    cfg = BackboneConfig.tiny("vit", pooling=pooling, patch_size=patch)
    enc = build_backbone(cfg).eval()
    assert isinstance(enc, ViTEncoder) and enc.feature_dim == cfg.hidden_size
    out = enc.forward_features(volume)
    n = (32 // patch) ** 3
    assert out.features.shape == (2, cfg.hidden_size)
    assert out.tokens.shape == (2, n, cfg.hidden_size)
    assert out.grid == (32 // patch,) * 3
    assert len(out.hidden_states) == cfg.num_layers
    assert all(h.shape == (2, n, cfg.hidden_size) for h in out.hidden_states)
    torch.testing.assert_close(enc(volume), out.features)


def test_mean_pooling_is_the_mean_of_the_final_token_states(volume: torch.Tensor) -> None:
    enc = build_backbone(BackboneConfig.tiny("vit", pooling="mean")).eval()
    assert not hasattr(enc.vit, "cls_token")
    out = enc.forward_features(volume)
    torch.testing.assert_close(out.tokens, enc.vit.norm(out.hidden_states[-1]))
    torch.testing.assert_close(out.features, out.tokens.mean(dim=1))
    assert not torch.allclose(out.features, out.tokens[:, 0])  # not BrainIAC's first patch token


def test_cls_pooling_uses_a_learned_cls_token_not_the_first_patch_token(volume: torch.Tensor) -> None:
    enc = build_backbone(BackboneConfig.tiny("vit", pooling="cls")).eval()
    names = dict(enc.named_parameters())
    assert "vit.cls_token" in names
    assert not any("classification_head" in name for name in names)  # no untrained head, no DDP unused params
    out = enc.forward_features(volume)
    n_patches = enc.grid[0] ** 3
    assert out.tokens.shape[1] == n_patches  # the CLS token is not among the patch tokens

    # The feature is the CLS position of the transformer's output, computed by hand here.
    vit = enc.vit
    seq = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embedding(volume)], dim=1)
    for blk in vit.blocks:
        seq = blk(seq)
    torch.testing.assert_close(out.features, vit.norm(seq)[:, 0])
    assert not torch.allclose(out.features, out.tokens[:, 0])

    # Same input, same patch embeddings: changing only the CLS token changes the feature.
    patch_tokens = vit.patch_embedding(volume)
    with torch.no_grad():
        vit.cls_token.add_(torch.randn_like(vit.cls_token))
    moved = enc.forward_features(volume)
    torch.testing.assert_close(vit.patch_embedding(volume), patch_tokens)
    assert not torch.allclose(moved.features, out.features)


def test_vit_rejects_wrong_shapes(volume: torch.Tensor) -> None:
    enc = build_backbone(BackboneConfig.tiny("vit"))
    with pytest.raises(ValueError, match=r"32³.*\(2, 1, 16, 16, 16\)"):
        enc(torch.randn(2, 1, 16, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\).*\(2, 2, 32, 32, 32\)"):
        enc(torch.randn(2, 2, 32, 32, 32))
    with pytest.raises(ValueError, match=r"\(32, 32, 32\)"):
        enc(torch.randn(32, 32, 32))


def test_vit_weights_load_strictly_into_unetr() -> None:
    """The segmentation decoder reuses the encoder: its ViT weights must map onto UNETR.vit with strict loading."""
    cfg = BackboneConfig.tiny("vit", num_layers=12, pooling="cls")  # UNETR taps blocks 3, 6, 9: it needs 12
    enc = build_backbone(cfg)
    unetr = UNETR(1, 2, img_size=32, feature_size=8, hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim, num_heads=3)
    state = {k: v for k, v in enc.vit.state_dict().items() if k != "cls_token"}
    unetr.vit.load_state_dict(state, strict=True)


def test_resnet_tiny_with_strided_stem(volume: torch.Tensor) -> None:
    cfg = BackboneConfig.tiny("resnet")
    enc = build_backbone(cfg).eval()
    assert isinstance(enc, ResNetEncoder)
    assert enc.net.conv1.stride == (2, 2, 2) and cfg.conv1_t_stride == 2
    assert enc.net.fc is None
    out = enc.forward_features(volume)
    assert out.features.shape == (2, enc.feature_dim) == (2, 64)
    assert len(out.hidden_states) == 4 and out.hidden_states[-1].shape[1] == enc.feature_dim
    assert out.tokens.shape == (2, 1, enc.feature_dim) and out.grid == (1, 1, 1)
    # Any input size works: the features are a global average.
    assert enc(torch.randn(1, 1, 40, 48, 40)).shape == (1, 64)


@pytest.mark.parametrize(("depth", "dim"), [(10, 512), (18, 512), (50, 2048)])
def test_resnet_feature_dims_on_meta_device(depth: int, dim: int) -> None:
    with torch.device("meta"):
        enc = build_backbone(BackboneConfig(kind="resnet", resnet_depth=depth))
    assert enc.feature_dim == dim


def test_production_default_is_vit_b() -> None:
    with torch.device("meta"):  # no memory, no init cost
        enc = build_backbone(BackboneConfig())
    assert isinstance(enc, ViTEncoder) and enc.feature_dim == 768 and enc.grid == (6, 6, 6)
    assert 85e6 < sum(p.numel() for p in enc.parameters()) < 90e6  # ViT-B, ~88 M as in BrainIAC V2


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_frozen_encoder_gets_no_gradients_and_does_not_change(volume: torch.Tensor, kind: str) -> None:
    enc = build_backbone(BackboneConfig.tiny(kind))
    head = torch.nn.Linear(enc.feature_dim, 3)
    model = torch.nn.Sequential(freeze(enc), head)
    model.train()  # a training loop's model.train() must not wake the frozen encoder's BatchNorm up
    assert is_frozen(enc) and not enc.training and head.training
    before = {k: v.clone() for k, v in enc.state_dict().items()}  # parameters and BN running statistics
    head_before = head.weight.detach().clone()

    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    loss = model(volume).square().mean()
    loss.backward()
    assert all(p.grad is None for p in enc.parameters())
    opt.step()

    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=f"{k} changed")
    assert not torch.equal(head.weight, head_before)

    # Freezing survives pickling (torch.save of a whole model, Ray's object transfer).
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False).train()
    assert is_frozen(restored[0]) and restored[1].training


def test_unknown_kind_is_rejected() -> None:
    cfg = BackboneConfig.tiny("vit")
    cfg.kind = "swin"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="swin"):
        build_backbone(cfg)
