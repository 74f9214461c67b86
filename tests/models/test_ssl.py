"""NT-Xent, the projection head and the retrieval metric on one process."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import ContrastiveLoss

from brainiac.models.augment import BatchedViewAugment
from brainiac.models.backbones import build_backbone
from brainiac.models.config import AugmentConfig, BackboneConfig, ProjectionConfig, SSLConfig
from brainiac.models.ssl import NTXentLoss, ProjectionHead, gather_with_grad, positive_pair_top1


def _reference_ntxent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR eq. 1 written out anchor by anchor."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n2 = z.shape[0]
    b = n2 // 2
    total = z.new_zeros(())
    for i in range(n2):
        pos = (i + b) % n2
        sims = torch.stack([z[i] @ z[k] / t for k in range(n2) if k != i])
        total = total - (z[i] @ z[pos] / t - torch.logsumexp(sims, 0))
    return total / n2


def test_loss_matches_simclr_reference_and_monai() -> None:
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    loss = NTXentLoss(temperature=0.3)(z1, z2)
    torch.testing.assert_close(loss, _reference_ntxent(z1, z2, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ContrastiveLoss(temperature=0.3)(z1, z2), rtol=1e-5, atol=1e-5)


def test_identical_views_give_lower_loss_than_random_views() -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(8, 16, generator=gen)
    loss_fn = NTXentLoss(temperature=0.1)
    same = loss_fn(z, z)
    rand = loss_fn(z, torch.randn(8, 16, generator=gen))
    assert 0 <= same.item() < rand.item()
    # Random views sit near chance: each anchor picks its positive among 2B - 1 candidates.
    assert rand.item() > 0.5 * math.log(2 * 8 - 1)


def test_gradients_are_finite_and_reductions_agree() -> None:
    z1 = torch.randn(4, 8, requires_grad=True)
    z2 = torch.randn(4, 8, requires_grad=True)
    per_row = NTXentLoss(0.5, reduction="none")(z1, z2)
    assert per_row.shape == (8,)
    torch.testing.assert_close(per_row.mean(), NTXentLoss(0.5)(z1, z2))
    torch.testing.assert_close(per_row.sum(), NTXentLoss(0.5, reduction="sum")(z1, z2))
    per_row.mean().backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_low_precision_inputs_are_computed_in_fp32() -> None:
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    loss = NTXentLoss(0.1)(z1.bfloat16(), z2.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, NTXentLoss(0.1)(z1.bfloat16().float(), z2.bfloat16().float()))


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan"), float("inf"), "0.1"])
def test_temperature_is_validated(temperature: object) -> None:
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=temperature)  # type: ignore[arg-type]


def test_reduction_and_shapes_are_validated() -> None:
    with pytest.raises(ValueError, match="reduction"):
        NTXentLoss(reduction="max")  # type: ignore[arg-type]
    loss_fn = NTXentLoss()
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(3, 8\)"):
        loss_fn(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"\(4, 8, 2\)"):
        loss_fn(torch.randn(4, 8, 2), torch.randn(4, 8, 2))


def test_from_config_and_gather_is_identity_without_process_group() -> None:
    loss_fn = NTXentLoss.from_config(SSLConfig(temperature=0.2, gather_distributed=True))
    assert loss_fn.temperature == 0.2 and loss_fn.gather_distributed
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x
    # Without a process group the gathered loss is the local loss.
    torch.testing.assert_close(loss_fn(x, x + 1), NTXentLoss(0.2)(x, x + 1))


def test_positive_pair_top1() -> None:
    z = torch.randn(6, 10)
    assert positive_pair_top1(z, z).item() == 1.0
    assert positive_pair_top1(z, 2 * z + 0.001 * torch.randn(6, 10)).item() == 1.0
    assert positive_pair_top1(z, z.roll(1, dims=0)).item() == 0.0
    with pytest.raises(ValueError, match=r"\(6, 10\) and \(5, 10\)"):
        positive_pair_top1(z, z[:5])


@pytest.mark.parametrize("layers", [2, 3])
def test_projection_head(layers: int) -> None:
    head = ProjectionHead(48, ProjectionConfig(hidden_dim=32, out_dim=16, num_layers=layers))
    out = head(torch.randn(4, 48))
    assert out.shape == (4, 16)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == layers
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules()) == layers - 1
    with pytest.raises(ValueError, match=r"\(B, 48\).*\(4, 47\)"):
        head(torch.randn(4, 47))
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(48, ProjectionConfig(num_layers=4))


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_simclr_step_on_tiny_encoder_learns(kind: str) -> None:
    """The pieces fit: augment → encoder → head → NT-Xent; a few steps on one batch lower the loss."""
    torch.manual_seed(0)
    encoder = build_backbone(BackboneConfig.tiny(kind))
    head = ProjectionHead(encoder.feature_dim, ProjectionConfig(hidden_dim=32, out_dim=16))
    model = torch.nn.Sequential(encoder, head)
    loss_fn = NTXentLoss(temperature=0.2)
    gen = torch.Generator().manual_seed(0)
    crops = torch.randn(4, 1, 32, 32, 32, generator=gen)
    view1, view2 = BatchedViewAugment(AugmentConfig()).pair(crops, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = loss_fn(model(view1), model(view2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
