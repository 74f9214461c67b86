"""The GPU training path, checked on the CPU: no host synchronisation in the batched augmentation, the patch embedding
as a GEMM with the Conv3d's own weights (old checkpoints load strictly and give the same features), a bf16 residual
stream under autocast, the torch.compile'd step equal to the eager one, and the asynchronous step API."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViT
from torch.utils._python_dispatch import TorchDispatchMode

from brainiac.models.augment import BatchedViewAugment
from brainiac.models.backbones import ViTEncoder
from brainiac.models.config import AugmentConfig, BackboneConfig, ProjectionConfig, SSLConfig
from brainiac.models.simclr import PreparedViews, SimCLRModel, SimCLRStep, build_optimizer
from brainiac.models.train_config import OptimConfig

aten = torch.ops.aten

ALL_ON = AugmentConfig(
    affine_p=1.0, flip_p=1.0, gamma_p=1.0, contrast_p=1.0, bias_field_p=1.0, gibbs_p=1.0, noise_p=1.0, smooth_p=1.0,
    dropout_p=1.0,
)  # fmt: skip
HALF = AugmentConfig(
    affine_p=0.5, flip_p=0.5, gamma_p=0.5, contrast_p=0.5, bias_field_p=0.5, gibbs_p=0.5, noise_p=0.5, smooth_p=0.5,
    dropout_p=0.5,
)  # fmt: skip


class HostSyncs(TorchDispatchMode):
    """Records every aten op that makes the host wait for a CUDA device: data-dependent output sizes (``nonzero``,
    ``masked_select``, boolean-mask indexing), and reading a value back (``item``, ``bool()``, ``tolist()`` all reach
    ``_local_scalar_dense``). On the CPU nothing waits, but the same ops are dispatched, so this sees what a GPU would
    block on."""

    SYNCING = frozenset({aten.nonzero, aten.masked_select, aten._local_scalar_dense, aten._unique2, aten.unique_dim})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in self.SYNCING or (packet is aten.repeat_interleave and "output_size" not in kwargs):
            self.seen.append(str(func))
        if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ()):
                self.seen.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


@pytest.mark.parametrize("cfg", [ALL_ON, HALF], ids=["all-on", "half"])
def test_batched_augmentation_never_waits_for_the_device(cfg: AugmentConfig) -> None:
    """No sync-causing op is dispatched (the pre-#21 code dispatched ``nonzero`` per step and ``item`` for dropout), and
    the whole pipeline runs on the meta device, where any data-dependent shape or value read raises."""
    aug = BatchedViewAugment(cfg)
    x = torch.randn(6, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with HostSyncs() as syncs:
        out = aug(x, torch.Generator().manual_seed(1))
        aug.pair(x, x, torch.Generator().manual_seed(2))
    assert syncs.seen == []
    assert out.shape == x.shape and torch.isfinite(out).all()
    meta = aug(torch.empty(6, 1, 16, 16, 16, device="meta"))
    assert meta.shape == (6, 1, 16, 16, 16) and meta.device.type == "meta"


def test_the_sync_detector_sees_the_old_selection_pattern() -> None:
    """The detector is not vacuous: the pre-#21 ``mask.nonzero()`` / ``if mask.any()`` selection is caught."""
    mask = torch.tensor([True, False, True])
    x = torch.randn(3, 4)
    with HostSyncs() as syncs:
        sel = mask.nonzero().squeeze(1)
        if sel.numel() and mask.any():
            x[sel] = x[sel] * 2
    assert any("nonzero" in s for s in syncs.seen) and any("_local_scalar_dense" in s for s in syncs.seen)
    with HostSyncs() as syncs:
        x[mask] = 0.0
    assert syncs.seen


def test_masked_steps_leave_unchosen_samples_bit_for_bit() -> None:
    """Every step now runs on the whole batch; a sample a step did not draw keeps its exact values."""
    aug = BatchedViewAugment(HALF)
    x = torch.randn(8, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    params = aug.sample_params(8, (16, 16, 16), generator=torch.Generator().manual_seed(3))
    none = {name: torch.zeros_like(getattr(params, name)) for name in (
        "affine", "flip", "bias", "gamma", "contrast", "gibbs", "smooth", "noise", "dropout")}  # fmt: skip
    import dataclasses

    params = dataclasses.replace(params, **none)
    torch.testing.assert_close(aug.apply(x, params, torch.Generator().manual_seed(4)), x, rtol=0, atol=0)


def test_smoothing_with_a_sigma_per_sample_and_axis_equals_a_zero_padded_conv() -> None:
    aug = BatchedViewAugment(AugmentConfig(smooth_sigma=(0.5, 1.5)))
    x = torch.randn(3, 1, 12, 14, 10, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([[0.5, 1.0, 1.5], [1.5, 0.7, 0.5], [1.0, 1.0, 1.0]])
    radius = 6  # ceil(4 · 1.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    expected = []
    for i in range(3):
        y = x[i : i + 1]
        for axis in range(3):
            k = torch.exp(-0.5 * (t / sigma[i, axis]) ** 2)
            k = k / k.sum()
            shape, pad = [1, 1, 1, 1, 1], [0, 0, 0]
            shape[2 + axis], pad[axis] = 2 * radius + 1, radius
            y = torch.nn.functional.conv3d(y, k.view(shape), padding=tuple(pad))
        expected.append(y)
    torch.testing.assert_close(aug._smooth(x, sigma), torch.cat(expected), rtol=1e-5, atol=1e-5)


# --- ViT: patch embedding as a GEMM, old checkpoints, bf16 residual stream ---------------------------------------------


def _monai_vit(cfg: BackboneConfig) -> ViT:
    """The network the encoder wrapped before #21, with MONAI's own Conv3d patch embedding and forward."""
    return ViT(
        in_channels=cfg.in_channels, img_size=cfg.img_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
        mlp_dim=cfg.mlp_dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads, proj_type="conv",
        pos_embed_type=cfg.pos_embed_type, classification=cfg.pooling == "cls", spatial_dims=3,
        post_activation="none", qkv_bias=cfg.qkv_bias,
    )  # fmt: skip


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_patch_embedding_gemm_equals_monai_conv3d_with_the_same_weights(pooling: str) -> None:
    torch.manual_seed(0)
    encoder = ViTEncoder(BackboneConfig.tiny(pooling=pooling)).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        reference = encoder.vit.patch_embedding(x)  # MONAI: Conv3d, flatten, + position embedding
        torch.testing.assert_close(encoder.embed(x), reference, rtol=1e-5, atol=1e-5)
        out, hidden = encoder.vit(x)  # MONAI's whole forward
        got = encoder.forward_features(x)
    if pooling == "cls":
        torch.testing.assert_close(got.features, out[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.hidden_states[-1], hidden[-1][:, 1:], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.features, out.mean(dim=1), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_saved_before_the_change_loads_strictly_and_gives_the_same_features() -> None:
    """The parameter names and shapes are MONAI's (the Conv3d kernel stays a (hidden, C, p, p, p) tensor)."""
    cfg = BackboneConfig.tiny()
    torch.manual_seed(3)
    old = _monai_vit(cfg).eval()
    state = {f"vit.{k}": v for k, v in old.state_dict().items() if not k.startswith("classification_head.")}
    assert state["vit.patch_embedding.patch_embeddings.weight"].shape == (48, 1, 16, 16, 16)
    torch.manual_seed(4)  # different initial weights, so equality below comes from the load
    encoder = ViTEncoder(cfg).eval()
    encoder.load_state_dict(state, strict=True)
    x = torch.randn(3, 1, 32, 32, 32)
    del old.classification_head  # what ViTEncoder removed before #21 too; MONAI's forward then returns every token
    with torch.no_grad():
        old_tokens, _ = old(x)  # MONAI's own forward, Conv3d patch embedding
        torch.testing.assert_close(encoder(x), old_tokens[:, 0], rtol=1e-5, atol=1e-5)
    assert set(encoder.state_dict()) == set(state)


def test_the_residual_stream_stays_bf16_under_autocast() -> None:
    """The fp32 position embedding and CLS token are cast to the tokens' dtype; before #21 the first addition promoted
    every block's input and output to fp32."""
    torch.manual_seed(0)
    encoder = ViTEncoder(BackboneConfig.tiny()).train()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder.forward_features(x)
        embedded = encoder.embed(x)
    assert embedded.dtype == torch.bfloat16
    assert all(h.dtype == torch.bfloat16 for h in out.hidden_states)
    out.features.float().sum().backward()
    assert encoder.vit.patch_embedding.patch_embeddings.weight.grad is not None
    assert encoder.vit.patch_embedding.position_embeddings.grad.dtype == torch.float32


# --- the step: torch.compile, async results, prepared views, fused AdamW ---------------------------------------------


def _engine(compile: bool, backend: str = "aot_eager") -> tuple[SimCLRModel, SimCLRStep]:
    torch.manual_seed(1)
    model = SimCLRModel(BackboneConfig.tiny(), ProjectionConfig(hidden_dim=32, out_dim=16))
    optim = OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.05)
    ssl = SSLConfig(temperature=0.2, gather_distributed=False)
    step = SimCLRStep(
        model, ssl, optim, AugmentConfig(), 10, torch.device("cpu"), compile=compile, compile_backend=backend
    )
    step.generator.manual_seed(5)
    return model, step


def test_compile_defaults_to_cuda_only() -> None:
    _, step = _engine(compile=None)  # type: ignore[arg-type]
    assert step.compiled is False and step.run_model is step.model


def test_compiled_step_matches_the_eager_step() -> None:
    """Three optimiser steps (augmentation, forward, NT-Xent, backward, AdamW) compiled and eager: same losses and
    weights. The ``aot_eager`` backend runs what the GPU path runs up to code generation: dynamo's graph capture of the
    model (patch GEMM, bf16 casts, MONAI blocks, einops) and AOTAutograd's joint forward/backward graph. Inductor's own
    CPU kernels took 206 s to compile for this tiny model on the 2-core test machine, so they are left to
    ``bench/gpu.sh`` (which compares compiled and eager on the GPU)."""
    backend = "aot_eager"
    x1 = torch.randn(3, 4, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    x2 = x1 + 0.1 * torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model, step = _engine(compiled, backend)
        losses = [step.micro_step(a, b).loss for a, b in zip(x1, x2, strict=True)]
        runs[compiled] = (losses, {k: v.clone() for k, v in model.state_dict().items()})
    (eager_losses, eager_state), (comp_losses, comp_state) = runs[False], runs[True]
    assert comp_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    for name, value in eager_state.items():
        torch.testing.assert_close(comp_state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(eager_state["head.mlp.0.weight"], _engine(False)[0].state_dict()["head.mlp.0.weight"])


def test_unsynced_steps_return_device_tensors_equal_to_synced_ones() -> None:
    x1 = torch.randn(2, 4, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    x2 = torch.randn(2, 4, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    _, synced = _engine(False)
    _, lazy = _engine(False)
    for a, b in zip(x1, x2, strict=True):
        r_sync = synced.micro_step(a, b)
        r_lazy = lazy.micro_step(lazy.prepare(a, b), sync=False)
        assert isinstance(r_sync.loss, float) and isinstance(r_lazy.loss, torch.Tensor) and r_lazy.loss.ndim == 0
        assert float(r_lazy.loss) == pytest.approx(r_sync.loss, rel=1e-6)
        assert float(r_lazy.top1) == pytest.approx(r_sync.top1, rel=1e-6)


def test_prepared_views_are_both_views_augmented_and_concatenated() -> None:
    _, step = _engine(False)
    a, b = torch.randn(3, 1, 32, 32, 32).half(), torch.randn(3, 1, 32, 32, 32).half()
    views = step.prepare(a, b)
    assert isinstance(views, PreparedViews) and views.pairs == 3 and views.ready is None
    assert views.x.shape == (6, 1, 32, 32, 32) and views.x.dtype == torch.float32
    with pytest.raises(ValueError, match="both views"):
        step.micro_step(a)


def test_adamw_is_fused_only_where_every_parameter_is_on_cuda() -> None:
    model = SimCLRModel(BackboneConfig.tiny(), ProjectionConfig(hidden_dim=32, out_dim=16))
    assert not build_optimizer(model, OptimConfig(lr=1e-3)).defaults.get("fused")
    assert build_optimizer(model, OptimConfig(lr=1e-3), fused=True).defaults["fused"] is True  # CPU has a fused AdamW
