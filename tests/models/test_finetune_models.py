"""Fine-tuning models: UNETR on the pretrained ViT, linear-probe freezing, strict import of BrainIAC's checkpoints."""

from __future__ import annotations

from collections.abc import Set
from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import ViT
from torch import nn

from brainiac.models.backbones import ViTEncoder, build_backbone, freeze, is_frozen
from brainiac.models.config import BackboneConfig
from brainiac.models.export import load_encoder
from brainiac.models.import_brainiac import (
    convert_brainiac_checkpoint,
    import_brainiac_checkpoint,
    map_brainiac_keys,
)
from brainiac.models.tasks.segmentation import (
    build_unetr,
    decoder_parameters,
    encoder_parameters,
    freeze_encoder,
)
from brainiac.platform.errors import UserError


def _unetr_backbone(**overrides: object) -> BackboneConfig:
    return BackboneConfig.tiny("vit", num_layers=12, **overrides)  # ViT-B's depth: skips read blocks 3, 6, 9


def _pretrained(cfg: BackboneConfig, seed: int = 0) -> ViTEncoder:
    torch.manual_seed(seed)
    enc = build_backbone(cfg)
    assert isinstance(enc, ViTEncoder)
    with torch.no_grad():  # move the LayerNorms off their (1, 0) init so a skipped copy cannot pass by accident
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return enc


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _batch(seed: int = 0, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 32, 32, 32, generator=g)
    y = (torch.rand(n, 1, 32, 32, 32, generator=g) > 0.7).float()
    return x, y


# --- UNETR -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_unetr_vit_is_bit_identical_to_the_encoder_and_segments(pooling: str) -> None:
    cfg = _unetr_backbone(pooling=pooling)
    enc = _pretrained(cfg)
    unetr = build_unetr(enc, cfg, out_channels=2)
    src, dst = enc.vit.state_dict(), unetr.vit.state_dict()
    assert set(src) == set(dst)  # the CLS token too: the blocks run with it, as in pretraining
    assert all(torch.equal(dst[k], src[k]) for k in dst)
    # Copied, not shared: training the UNETR must not move the encoder it came from.
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(unetr.vit.parameters(), enc.vit.parameters(), strict=False))
    unetr.eval()
    x, _ = _batch()
    with torch.no_grad():
        out = unetr(x)
        patch_tokens = enc.eval().forward_features(x).tokens
    assert out.shape == (2, 2, 32, 32, 32)
    # UNETR's ViT computes the encoder's patch tokens (with the CLS token in the blocks, stripped afterwards).
    torch.testing.assert_close(unetr.vit_tokens(x)[0], patch_tokens)
    assert {id(p) for p in encoder_parameters(unetr)} == {id(p) for p in unetr.vit.parameters()}
    assert len(encoder_parameters(unetr)) + len(decoder_parameters(unetr)) == len(list(unetr.parameters()))


def _decode(unetr: nn.Module, x_in: torch.Tensor, final: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
    """UNETR's decoder on given patch-token states (final normed state and per-block outputs), as MONAI wires it."""
    proj = unetr.proj_feat
    skips = [unetr.encoder2, unetr.encoder3, unetr.encoder4]
    enc2, enc3, enc4 = (m(proj(hidden[i])) for m, i in zip(skips, unetr.skip_layers, strict=True))
    dec3 = unetr.decoder5(proj(final), enc4)
    return unetr.out(unetr.decoder2(unetr.decoder3(unetr.decoder4(dec3, enc3), enc2), unetr.encoder1(x_in)))


def test_unetr_blocks_see_the_cls_token_the_encoder_was_pretrained_with() -> None:
    """Every block's patch tokens in the UNETR equal the encoder's own: the CLS token they attend to is kept.

    Defect 6 of issue 19: UNETR's ViT was built without the CLS token, so from block 0 on its patch tokens differed
    from the pretrained encoder's, and the decoder's skips (blocks 3, 6, 9) and final state read the wrong features.
    """
    cfg = _unetr_backbone(pooling="cls")
    enc = _pretrained(cfg)
    with torch.no_grad():
        enc.vit.cls_token.normal_(0.0, 1.0)  # a pretrained CLS token, not MONAI's zero init, so dropping it shows
    unetr = build_unetr(enc, cfg).eval()
    x, _ = _batch()
    with torch.no_grad():
        ref = enc.eval().forward_features(x)
        out, hidden = unetr.vit(x)
        n = ref.tokens.shape[1]
        assert out.shape[1] == n + 1 and all(h.shape[1] == n + 1 for h in hidden)  # CLS first, then the patches
        assert len(hidden) == len(ref.hidden_states) == 12
        for got, want in zip(hidden, ref.hidden_states, strict=True):
            torch.testing.assert_close(got[:, 1:], want)
        torch.testing.assert_close(out[:, 1:], ref.tokens)
        # ... and the decoder reads exactly those pretrained patch features (CLS stripped before the reshape).
        torch.testing.assert_close(unetr(x), _decode(unetr, x, ref.tokens, ref.hidden_states))


def test_unetr_weights_saved_without_cls_token_load_strictly_and_compute_as_before() -> None:
    """A segmenter saved before the CLS token was kept still loads with ``strict=True`` and gives its old outputs."""
    cfg = _unetr_backbone(pooling="cls")
    saved = build_unetr(_pretrained(cfg, seed=1), cfg).state_dict()
    legacy = {k: v for k, v in saved.items() if k != "vit.cls_token"}  # the old model had no such key
    model = build_unetr(_pretrained(cfg, seed=2), cfg)
    assert model.has_cls_token
    model.load_state_dict(legacy, strict=True)
    assert not model.has_cls_token and "vit.cls_token" not in model.state_dict()
    # What the old UNETR computed: MONAI's ViT without a CLS token on the same weights, then the same decoder.
    old_vit = ViT(
        in_channels=1, img_size=cfg.img_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
        mlp_dim=cfg.mlp_dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads, proj_type="conv",
        pos_embed_type=cfg.pos_embed_type, classification=False, spatial_dims=3, qkv_bias=cfg.qkv_bias,
    )  # fmt: skip
    old_vit.load_state_dict({k[4:]: v for k, v in legacy.items() if k.startswith("vit.")}, strict=True)
    model.eval()
    x, _ = _batch(3)
    with torch.no_grad():
        final, hidden = old_vit.eval()(x)
        torch.testing.assert_close(model(x), _decode(model, x, final, hidden))
    # A current state (with the token) keeps it, and a mean-pooled encoder never had one.
    fresh = build_unetr(_pretrained(cfg, seed=2), cfg)
    fresh.load_state_dict(saved, strict=True)
    assert fresh.has_cls_token and torch.equal(fresh.vit.cls_token, saved["vit.cls_token"])
    mean_cfg = _unetr_backbone(pooling="mean")
    assert not build_unetr(_pretrained(mean_cfg), mean_cfg).has_cls_token


def test_unetr_at_the_encoder_depth_reads_skips_at_quarter_depths() -> None:
    """A 2-block tiny encoder feeds a UNETR too (skips from blocks 0, 1, 1); ViT-B's 12 give MONAI's 3, 6, 9."""
    cfg = BackboneConfig.tiny("vit")
    unetr = build_unetr(_pretrained(cfg), cfg)
    assert len(unetr.vit.blocks) == 2 and unetr.skip_layers == (0, 1, 1)
    assert unetr(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)
    assert build_unetr(_pretrained(_unetr_backbone()), _unetr_backbone()).skip_layers == (3, 6, 9)


def test_unetr_rejects_encoders_it_cannot_hold() -> None:
    cfg = BackboneConfig.tiny("vit", patch_size=8)  # UNETR's decoder is built for 16³ patches
    with pytest.raises(UserError, match="patch_size=16"):
        build_unetr(_pretrained(cfg), cfg)
    resnet_cfg = BackboneConfig.tiny("resnet")
    with pytest.raises(UserError, match="ViT"):
        build_unetr(build_backbone(resnet_cfg), resnet_cfg)  # type: ignore[arg-type]
    # An encoder whose weights do not fit (wider than the config says) names the keys.
    wide = _unetr_backbone(hidden_size=60, num_heads=3)
    with pytest.raises(UserError, match=r"shape mismatch: blocks\.0\."):
        build_unetr(_pretrained(wide), _unetr_backbone())


@pytest.mark.parametrize("strategy", ["linear", "full"])
def test_linear_strategy_leaves_unetr_vit_bit_identical(strategy: str) -> None:
    cfg = _unetr_backbone(dropout_rate=0.1)
    unetr = build_unetr(_pretrained(cfg), cfg, out_channels=1, feature_size=8)
    if strategy == "linear":
        freeze_encoder(unetr)
        assert is_frozen(unetr.vit)
    vit_before, dec_before = _snapshot(unetr.vit), [p.detach().clone() for p in decoder_parameters(unetr)]
    unetr.train()
    assert unetr.vit.training == (strategy == "full")  # a frozen encoder stays in eval mode (dropout off)
    params = [p for p in unetr.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    loss_fn = DiceCELoss(sigmoid=True)
    for step in range(3):
        x, y = _batch(step, n=1)
        opt.zero_grad()
        loss = loss_fn(unetr(x), y)
        loss.backward()
        opt.step()
    decoder_moved = any(not torch.equal(a, b) for a, b in zip(dec_before, decoder_parameters(unetr), strict=True))
    assert decoder_moved
    if strategy == "linear":
        assert _same(vit_before, _snapshot(unetr.vit))
        assert all(p.grad is None for p in unetr.vit.parameters())
    else:  # control: the same loop does move an unfrozen encoder, so the check above can fail
        assert not _same(vit_before, _snapshot(unetr.vit))


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_frozen_encoder_with_linear_head_stays_bit_identical(kind: str) -> None:
    cfg = BackboneConfig.tiny(kind, dropout_rate=0.1) if kind == "vit" else BackboneConfig.tiny(kind)
    torch.manual_seed(0)
    enc = freeze(build_backbone(cfg))
    model = nn.Sequential(enc, nn.Dropout(0.2), nn.Linear(enc.feature_dim, 3))
    before = _snapshot(enc)  # ResNet: BatchNorm running statistics are buffers and must not move either
    head_before = _snapshot(model[2])
    model.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert model[2].training
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        x, _ = _batch(step)
        y = torch.tensor([step % 3, (step + 1) % 3])
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert _same(before, _snapshot(enc))
    assert not _same(head_before, _snapshot(model[2]))
    assert not enc.training


# --- BrainIAC checkpoint import ----------------------------------------------------------------------------------------


def _official_vit(cfg: BackboneConfig, classification: bool = False) -> ViT:
    """A MONAI ViT built the way BrainIAC's ViTBackboneNet builds it, at tiny sizes."""
    torch.manual_seed(1)
    vit = ViT(
        in_channels=1,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        mlp_dim=cfg.mlp_dim,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        classification=classification,
        save_attn=True,
    )
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return vit


def _write(path: Path, state: dict[str, torch.Tensor], lightning: bool = True) -> Path:
    obj: object = {"state_dict": state, "epoch": 18, "global_step": 1234, "hyper_parameters": {"lr": 5e-4}}
    torch.save(obj if lightning else state, path)
    return path


MEAN = BackboneConfig.tiny("vit", pooling="mean")


def _check_equal(enc: ViTEncoder, vit: ViT, dropped: Set[str] = frozenset()) -> None:
    ours = {k: v for k, v in enc.vit.state_dict().items() if k not in dropped}
    src = {k: v for k, v in vit.state_dict().items() if k not in dropped}
    assert set(ours) == set(src)
    assert all(torch.equal(ours[k], src[k]) for k in src)


def test_import_lightning_simclr_checkpoint(tmp_path: Path) -> None:
    vit = _official_vit(MEAN)
    path = _write(tmp_path / "BrainIAC.ckpt", {f"backbone.{k}": v for k, v in vit.state_dict().items()})
    enc = import_brainiac_checkpoint(path, MEAN)
    _check_equal(enc, vit)
    x, _ = _batch()
    with torch.no_grad():  # and it computes what the official ViT computes, mean-pooled
        torch.testing.assert_close(enc.eval()(x), vit.eval()(x)[0].mean(dim=1))


def test_import_finetuned_checkpoint_ignores_head_explicitly(tmp_path: Path) -> None:
    vit = _official_vit(MEAN)
    state = {f"model.backbone.backbone.{k}": v for k, v in vit.state_dict().items()}
    state["model.classifier.fc.weight"] = torch.randn(1, MEAN.hidden_size)
    state["model.classifier.fc.bias"] = torch.randn(1)
    km = map_brainiac_keys(state, ViTEncoder(MEAN).state_dict())
    assert km.ok and set(km.ignored) == {"model.classifier.fc.weight", "model.classifier.fc.bias"}
    assert km.mapped["model.backbone.backbone.norm.weight"] == "vit.norm.weight"
    _check_equal(import_brainiac_checkpoint(_write(tmp_path / "ft.ckpt", state), MEAN), vit)


def test_import_bare_ddp_state_dict_from_monai_13(tmp_path: Path) -> None:
    """MONAI < 1.4 had no norm_cross_attn: those (unused) LayerNorms are filled with the identity, explicitly."""
    vit = _official_vit(MEAN)
    state = {f"module.{k}": v for k, v in vit.state_dict().items() if "norm_cross_attn" not in k}
    enc = import_brainiac_checkpoint(_write(tmp_path / "old.pt", state, lightning=False), MEAN)
    km = map_brainiac_keys(state, enc.state_dict())
    assert sorted(km.filled) == sorted(
        f"vit.blocks.{i}.norm_cross_attn.{p}" for i in range(MEAN.num_layers) for p in ("weight", "bias")
    )
    _check_equal(enc, vit, dropped={k for k in vit.state_dict() if "norm_cross_attn" in k})
    for i in range(MEAN.num_layers):
        ln = enc.vit.blocks[i].norm_cross_attn
        assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and torch.equal(ln.bias, torch.zeros_like(ln.bias))


def test_import_with_cls_token_and_monai_head(tmp_path: Path) -> None:
    cfg = BackboneConfig.tiny("vit", pooling="cls")
    vit = _official_vit(cfg, classification=True)
    path = _write(tmp_path / "cls.ckpt", {f"backbone.{k}": v for k, v in vit.state_dict().items()})
    enc = import_brainiac_checkpoint(path, cfg)
    _check_equal(enc, vit, dropped={k for k in vit.state_dict() if k.startswith("classification_head.")})
    with pytest.raises(UserError, match="pooling: cls"):
        import_brainiac_checkpoint(path, MEAN)


def test_import_missing_key_is_named(tmp_path: Path) -> None:
    state = {f"backbone.{k}": v for k, v in _official_vit(MEAN).state_dict().items()}
    del state["backbone.blocks.1.mlp.linear1.weight"]
    with pytest.raises(UserError, match=r"missing: vit\.blocks\.1\.mlp\.linear1\.weight") as err:
        import_brainiac_checkpoint(_write(tmp_path / "m.ckpt", state), MEAN)
    assert "unexpected" not in str(err.value)


def test_import_renamed_key_is_named(tmp_path: Path) -> None:
    state = {f"backbone.{k}": v for k, v in _official_vit(MEAN).state_dict().items()}
    state["backbone.final_norm.weight"] = state.pop("backbone.norm.weight")
    with pytest.raises(UserError) as err:
        import_brainiac_checkpoint(_write(tmp_path / "r.ckpt", state), MEAN)
    assert "unexpected: backbone.final_norm.weight" in str(err.value)
    assert "missing: vit.norm.weight" in str(err.value)


def test_import_cls_pooling_needs_a_cls_token(tmp_path: Path) -> None:
    state = {f"backbone.{k}": v for k, v in _official_vit(MEAN).state_dict().items()}
    with pytest.raises(UserError, match=r"no CLS token.*pooling: mean"):
        import_brainiac_checkpoint(_write(tmp_path / "c.ckpt", state), BackboneConfig.tiny("vit", pooling="cls"))


def test_import_wrong_sizes_and_duplicates_are_errors(tmp_path: Path) -> None:
    vit = _official_vit(MEAN)
    state = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    with pytest.raises(UserError, match="shape mismatch"):
        import_brainiac_checkpoint(
            _write(tmp_path / "s.ckpt", state), BackboneConfig.tiny("vit", pooling="mean", mlp_dim=64)
        )
    with pytest.raises(UserError, match=r"missing: vit\.blocks\.2\."):
        import_brainiac_checkpoint(
            _write(tmp_path / "d.ckpt", state), BackboneConfig.tiny("vit", pooling="mean", num_layers=3)
        )
    # A checkpoint holding the ViT twice (e.g. BrainIAC's unused frozen copy next to the trained one) is ambiguous.
    both = {**state, **{f"model.backbone.{k}": v for k, v in vit.state_dict().items()}}
    with pytest.raises(UserError, match="reached twice"):
        import_brainiac_checkpoint(_write(tmp_path / "two.ckpt", both), MEAN)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        import_brainiac_checkpoint(tmp_path / "junk.ckpt", MEAN)


def test_convert_writes_a_loadable_export(tmp_path: Path) -> None:
    vit = _official_vit(MEAN)
    path = _write(tmp_path / "BrainIAC.ckpt", {f"backbone.{k}": v for k, v in vit.state_dict().items()})
    out = convert_brainiac_checkpoint(path, tmp_path / "export", MEAN)
    enc, backbone = load_encoder(str(out))
    assert backbone == MEAN
    assert isinstance(enc, ViTEncoder)
    _check_equal(enc, vit)


def test_load_encoder_takes_an_official_checkpoint_file_through_the_key_map(tmp_path: Path) -> None:
    """``--init FILE`` (what fine-tuning passes on) imports BrainIAC's format strictly into the configured backbone."""
    from brainiac.models.export import load_encoder

    vit = _official_vit(MEAN)
    path = _write(tmp_path / "BrainIAC.ckpt", {f"backbone.{k}": v for k, v in vit.state_dict().items()})
    encoder, backbone = load_encoder(str(path), backbone=MEAN)
    assert backbone == MEAN
    _check_equal(encoder, vit)
    with pytest.raises(UserError, match="pooling"):
        load_encoder(str(path), backbone=BackboneConfig.tiny("vit", pooling="cls"))


def test_segmentation_augmentation_moves_image_and_mask_together() -> None:
    """Every flip moves image and mask along the same spatial axis (an image flipped along another axis than its mask
    trains the segmenter on wrong labels)."""
    from brainiac.jobs.finetune.engine import _augment_segmentation

    g = torch.Generator().manual_seed(0)
    y = torch.zeros(16, 8, 10, 12, dtype=torch.uint8)
    y[:, 1:3, 2:7, 8:11] = 1  # an asymmetric block: every flip moves it
    x = (y.float() * 10).unsqueeze(1).repeat(1, 2, 1, 1, 1)  # two channels, both showing the mask
    ax, ay = _augment_segmentation(x.clone(), y.clone(), g)
    assert (ay != y).any(), "no sample was flipped"
    for channel in range(2):
        assert torch.equal(ax[:, channel] > 5, ay.bool())
