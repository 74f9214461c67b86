"""The pieces of pretraining that need no Ray: view-pair sampling, optimisers and schedule, the step engine's gradient
accumulation, strict encoder export/import, and the pretrain configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainiac.jobs.config import load_config
from brainiac.models.config import AugmentConfig, BackboneConfig, ProjectionConfig, SSLConfig
from brainiac.models.export import load_encoder, save_encoder
from brainiac.models.patches import (
    box_overlap,
    crop_box,
    resize_cube,
    sample_pair_corners,
    view_pairs,
)
from brainiac.models.simclr import LARS, SimCLRModel, SimCLRStep, build_optimizer, warmup_cosine
from brainiac.models.train_config import OptimConfig, PatchConfig, PretrainConfig
from brainiac.platform.errors import ConfigError, UserError


def _brain(shape=(40, 48, 40)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    volume = rng.normal(size=shape).astype(np.float16)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[8:32, 10:38, 8:32] = 1
    volume[mask == 0] = 0
    return volume, mask


def test_view_pairs_are_same_location_crops_within_jitter_and_overlap():
    volume, mask = _brain()
    cfg = PatchConfig(
        patches_per_volume=64, jitter_frac=0.25, min_overlap=0.5, min_brain_fraction=0.3, crop_scale=None
    )  # plain crops: one size for both views
    first, second, corners = view_pairs(volume, mask, 16, cfg, np.random.default_rng(1))
    assert first.shape == second.shape == (64, 1, 16, 16, 16) and first.dtype == np.float16
    shifts = np.abs(corners[:, 0] - corners[:, 1])
    assert shifts.max() <= round(0.25 * 16) and shifts.max() > 0  # jittered, not identical, not far apart
    assert all(box_overlap(a, b, 16) >= 0.5 for a, b in corners)
    assert (corners >= 0).all() and (corners + 16 <= np.array(volume.shape)).all()
    brain = [crop_box(mask, c[0], 16).mean() for c in corners]
    assert min(brain) >= 0.3 * min(1.0, mask.sum() / 16**3)  # first crops hold brain, not background
    for i, (a, b) in enumerate(corners):  # the crops are what the corners say
        np.testing.assert_array_equal(first[i, 0], crop_box(volume, a, 16))
        np.testing.assert_array_equal(second[i, 0], crop_box(volume, b, 16))


def test_each_view_draws_its_own_scale_and_is_its_crop_resized():
    """Issue 19, defect 8: the two views of a pair are random resized crops at independent scales (they shared one)."""
    volume, mask = _brain()  # 40 x 48 x 40: edges from round(0.4 x 48) = 19 to 48
    cfg = PatchConfig(patches_per_volume=64, min_overlap=0.3)
    assert cfg.crop_scale == (0.4, 1.0)  # on by default
    first, second, placed = view_pairs(volume, mask, 16, cfg, np.random.default_rng(2))
    assert first.shape == second.shape == (64, 1, 16, 16, 16) and first.dtype == np.float16
    assert placed.shape == (64, 2, 4)
    e1, e2 = placed[:, 0, 3], placed[:, 1, 3]
    assert min(e1.min(), e2.min()) >= 19 and max(e1.max(), e2.max()) <= 48
    assert (e1 != e2).mean() > 0.8  # independent draws: the two views of a pair rarely share a scale
    assert abs(np.corrcoef(e1, e2)[0, 1]) < 0.4
    assert e1.max() - e1.min() > 20 and e2.max() - e2.min() > 20  # a wide range of scales
    for i, (a, b) in enumerate(placed):
        assert box_overlap(a[:3], b[:3], int(a[3]), int(b[3])) >= 0.3  # the same place
        np.testing.assert_array_equal(first[i, 0], resize_cube(crop_box(volume, a[:3], int(a[3])), 16))
        np.testing.assert_array_equal(second[i, 0], resize_cube(crop_box(volume, b[:3], int(b[3])), 16))
    brain = [crop_box(mask, c[0, :3], int(c[0, 3])).mean() for c in placed]
    assert min(brain) >= 0.3 * min(1.0, mask.sum() / 48**3)  # first crops hold brain
    with pytest.raises(ConfigError, match="crop_scale"):
        PatchConfig(crop_scale=(0.9, 0.5))
    assert load_config("pretrain/tiny", ["patches.crop_scale=null"]).patches.crop_scale is None


def test_scale_one_is_the_whole_volume_fitted_into_the_model_cube():
    """At scale 1 a view shows the whole volume (padded to a cube, as the ``fixed`` cube fine-tuning sees)."""
    volume, mask = _brain()
    cfg = PatchConfig(patches_per_volume=4, crop_scale=(1.0, 1.0), min_overlap=0.0)
    first, second, placed = view_pairs(volume, mask, 16, cfg, np.random.default_rng(0))
    assert (placed[:, :, 3] == 48).all() and (placed[:, :, :3] == np.array([-4, 0, -4])).all()
    cube = crop_box(volume, np.array([-4, 0, -4]), 48)
    assert cube.astype(np.float64).sum() == pytest.approx(volume.astype(np.float64).sum())  # nothing left out
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(cube.astype(np.float32))[None, None], size=(16, 16, 16), mode="trilinear"
    )[0, 0].numpy()
    for view in (*first, *second):
        np.testing.assert_allclose(view[0].astype(np.float32), expected, atol=2e-3)


def test_resize_cube_is_torch_trilinear_both_ways():
    """Downsizing (large crops) and upsizing (small crops) match ``F.interpolate(mode="trilinear")``."""
    rng = np.random.default_rng(0)
    for edge in (7, 16, 23, 40):
        crop = rng.normal(size=(edge, edge, edge)).astype(np.float32)
        want = torch.nn.functional.interpolate(torch.from_numpy(crop)[None, None], size=(16,) * 3, mode="trilinear")
        got = resize_cube(crop, 16)
        assert got.shape == (16, 16, 16) and got.dtype == np.float32
        np.testing.assert_allclose(got, want[0, 0].numpy(), atol=1e-5)
    half = resize_cube(crop.astype(np.float16), 16)
    assert half.dtype == np.float16 and resize_cube(half, 16) is half


def test_view_pairs_are_a_function_of_the_seed():
    volume, mask = _brain()
    cfg = PatchConfig(patches_per_volume=8)
    a = view_pairs(volume, mask, 16, cfg, np.random.default_rng(7))
    b = view_pairs(volume, mask, 16, cfg, np.random.default_rng(7))
    c = view_pairs(volume, mask, 16, cfg, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[2], c[2])


def test_crops_of_a_volume_smaller_than_the_patch_are_centred_and_padded():
    volume, mask = _brain((10, 12, 10))
    corners = sample_pair_corners(mask, 16, 4, PatchConfig(), np.random.default_rng(0))
    assert (corners == np.array([-3, -2, -3])).all()
    crop = crop_box(volume, corners[0, 0], 16)
    assert crop.shape == (16, 16, 16) and crop[0].max() == 0 and np.allclose(crop.sum(), volume.sum(), atol=1)


def test_optimisers_skip_weight_decay_on_biases_and_norms():
    model = SimCLRModel(BackboneConfig.tiny(), ProjectionConfig(hidden_dim=16, out_dim=8))
    adamw = build_optimizer(model, OptimConfig(weight_decay=0.05))
    decayed, plain = adamw.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    plain_ids = {id(p) for p in plain["params"]}
    named = dict(model.named_parameters())
    assert all(id(p) in plain_ids for p in named.values() if p.ndim == 1 and p.requires_grad)  # biases, norms
    assert id(named["encoder.vit.cls_token"]) in plain_ids  # tokens and position embeddings too
    assert all(p.ndim >= 2 for p in decayed["params"])
    lars = build_optimizer(model, OptimConfig(name="lars", lr=0.1))
    assert isinstance(lars, LARS) and [g["lars_adapt"] for g in lars.param_groups] == [True, False]
    # A LARS step moves adapted weights by about lr · trust · ‖w‖, far less than plain SGD's lr · ‖g‖ on a big gradient.
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = LARS([{"params": [w], "lars_adapt": True, "weight_decay": 0.0}], lr=1.0, momentum=0.0, trust_coefficient=0.01)
    w.grad = torch.full((4, 4), 100.0)
    opt.step()
    assert torch.allclose(w, torch.full((4, 4), 1 - 0.01 * 4 / 400 * 100))


def test_warmup_then_cosine_to_the_floor():
    f = warmup_cosine(OptimConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_gradient_accumulation_equals_one_big_batch_without_batch_norm():
    """Two micro-steps of B accumulate the gradient of their mean loss (no BN, so micro-batches are independent)."""
    torch.manual_seed(0)
    projection = ProjectionConfig(hidden_dim=16, out_dim=8, batch_norm=False)
    ssl, aug = SSLConfig(temperature=0.5, gather_distributed=False), AugmentConfig().disabled()
    optim = OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=0.0, weight_decay=0.0)
    x1, x2 = torch.randn(8, 1, 32, 32, 32), torch.randn(8, 1, 32, 32, 32)

    def run(accum: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        model = SimCLRModel(BackboneConfig.tiny(), projection)
        step = SimCLRStep(model, ssl, optim, aug, 10, torch.device("cpu"), grad_accum_steps=accum)
        results = [step.micro_step(a, b) for a, b in zip(x1.chunk(accum), x2.chunk(accum), strict=True)]
        assert all(r is None for r in results[:-1]) and results[-1].samples == 8
        return {k: v.clone() for k, v in model.state_dict().items()}

    one, two = run(1), run(2)
    assert not torch.equal(one["head.mlp.0.weight"], two["head.mlp.0.weight"])  # the per-batch loss differs (negatives)
    torch.manual_seed(1)
    initial = SimCLRModel(BackboneConfig.tiny(), projection).state_dict()
    assert not torch.equal(initial["head.mlp.0.weight"], two["head.mlp.0.weight"])  # and the step did update


def test_encoder_export_round_trip_is_strict(tmp_path):
    torch.manual_seed(0)
    model = SimCLRModel(BackboneConfig.tiny(), ProjectionConfig(hidden_dim=16, out_dim=8))
    save_encoder(tmp_path / "enc", model.encoder, BackboneConfig.tiny())
    encoder, backbone = load_encoder(str(tmp_path / "enc"))
    assert backbone == BackboneConfig.tiny()
    for (k, a), (_, b) in zip(encoder.state_dict().items(), model.encoder.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    state = torch.load(tmp_path / "enc" / "encoder.pt")
    state.pop(next(iter(state)))
    state["stray.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "enc" / "encoder.pt")
    with pytest.raises(UserError, match=r"Missing key.*Unexpected key"):
        load_encoder(str(tmp_path / "enc"))
    with pytest.raises(UserError, match="no exported encoder"):
        load_encoder(str(tmp_path / "nowhere"))


def test_pretrain_configs_ship_and_validate():
    tiny = load_config("pretrain/tiny")
    assert (
        tiny.model.hidden_size == 48
        and tiny.pretrain.num_workers == 2
        and tiny.catalog.allowed_access[-1] == "restricted"
    )
    vit = load_config("pretrain/vit-b")
    assert (vit.model.img_size, vit.model.hidden_size, vit.model.num_layers, vit.model.pooling) == (96, 768, 12, "cls")
    assert vit.pretrain.use_gpu and vit.pretrain.precision == "bf16"
    resnet = load_config("pretrain/resnet50")
    assert resnet.model.kind == "resnet" and resnet.model.resnet_depth == 50 and resnet.model.conv1_t_stride == 2
    assert resnet.optim.name == "lars"
    with pytest.raises(ConfigError, match="reserved"):
        PretrainConfig(alias="latest")
    with pytest.raises(ConfigError, match="run_name"):
        load_config("pretrain/tiny", ["pretrain.run_name=a b"])

    from brainiac.platform.cli.pretrain_cmd import job_config_name

    assert job_config_name("tiny") == "pretrain/tiny" and job_config_name("default") == "default"
    assert job_config_name("my.yaml") == "my.yaml"


def test_vit_b_learning_rate_is_its_per_256_rate_scaled_by_the_global_batch():
    """Issue 19, defect 10: vit-b's 1.5e-4 is a per-256 rate; on its 4,096-pair batch the peak must be 2.4e-3."""
    vit = load_config("pretrain/vit-b")
    assert vit.pretrain.global_batch() == 64 * 64 == 4096
    assert vit.optim.base_lr_per_256 == 1.5e-4 and vit.optim.lr is None
    assert vit.optim.peak_lr(vit.pretrain.global_batch()) == pytest.approx(2.4e-3)
    assert vit.optim.peak_lr(vit.pretrain.global_batch(workers=8)) == pytest.approx(3.0e-4)  # fewer GPUs, lower lr
    resnet = load_config("pretrain/resnet50")
    assert resnet.optim.peak_lr(resnet.pretrain.global_batch()) == pytest.approx(0.6)  # SimCLR: 0.3 x 512 / 256
    # The engine runs at the scaled rate: after warmup the optimiser's lr is base x global batch / 256.
    model = SimCLRModel(BackboneConfig.tiny(), ProjectionConfig(hidden_dim=16, out_dim=8))
    optim = OptimConfig(lr=None, base_lr_per_256=1e-3, warmup_steps=0, min_lr_ratio=1.0)
    engine = SimCLRStep(model, SSLConfig(), optim, AugmentConfig(), 10, torch.device("cpu"), global_batch=1024)
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(4e-3)
    with pytest.raises(ValueError, match="global batch"):
        build_optimizer(model, optim)
    with pytest.raises(ConfigError, match="exactly one"):
        OptimConfig(lr=1e-3, base_lr_per_256=1e-3)
    with pytest.raises(ConfigError, match="exactly one"):
        load_config("pretrain/vit-b", ["optim.lr=1e-3"])  # an explicit lr must not be silently overridden
    assert load_config("pretrain/vit-b", ["optim.lr=1e-3", "optim.base_lr_per_256=null"]).optim.peak_lr(4096) == 1e-3


def test_pretraining_augments_contrast_strongly_in_every_shipped_config():
    """Issue 19, defect 8: SimCLR needs strong per-view intensity changes; the production pretrain configs go beyond
    the mild defaults fine-tuning builds on, for every intensity step (the 60-step tiny config keeps them mild)."""
    mild = AugmentConfig()
    assert load_config("pretrain/tiny").patches.crop_scale is None  # tiny: plain crops, mild intensity (its comment)
    for name in ("vit-b", "resnet50"):
        aug = load_config(f"pretrain/{name}").augment
        assert aug.gamma_p >= 0.8 and aug.contrast_p >= 0.8, name
        assert aug.gamma_range[1] - aug.gamma_range[0] > mild.gamma_range[1] - mild.gamma_range[0]
        assert aug.contrast_range[1] - aug.contrast_range[0] > mild.contrast_range[1] - mild.contrast_range[0]
        assert aug.bias_field_p > mild.bias_field_p and aug.bias_field_coeff[1] > mild.bias_field_coeff[1]
        assert aug.noise_p > mild.noise_p and aug.noise_std > mild.noise_std
        assert aug.smooth_sigma[1] > mild.smooth_sigma[1]
        assert load_config(f"pretrain/{name}").patches.crop_scale == (0.4, 1.0)


def test_flash_attention_computes_the_same_features_with_the_same_weights():
    from brainiac.models.backbones import build_backbone

    torch.manual_seed(0)
    plain = build_backbone(BackboneConfig.tiny())
    fused = build_backbone(BackboneConfig.tiny(flash_attention=True))
    fused.load_state_dict(plain.state_dict(), strict=True)
    assert all(b.attn.use_flash_attention for b in fused.vit.blocks)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="dropout_rate 0"):
        BackboneConfig.tiny(flash_attention=True, dropout_rate=0.1)
    assert load_config("pretrain/vit-b").model.flash_attention
