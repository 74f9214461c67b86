"""Robustness artifacts and tables, saliency maps, the saliency mass ratio and the PNGs, on tiny 32³ models."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from brainiac.jobs.finetune.engine import TargetScale
from brainiac.models.config import BackboneConfig
from brainiac.models.tasks.model import build_task_model
from brainiac.models.tasks.robustness import ARTIFACTS, corrupt, robustness_plot, robustness_table
from brainiac.models.tasks.saliency import mass_ratio, overlay_png, saliency_maps, saliency_method
from brainiac.models.tasks.spec import load_specs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _phantom(n: int = 2, s: int = 2, seed: int = 0) -> np.ndarray:
    """Brain-like volumes: a ball of smooth texture, z-scored inside, 0 outside (as preprocessing leaves them)."""
    rng = np.random.default_rng(seed)
    grid = np.indices((32, 32, 32)) - 15.5
    ball = (grid**2).sum(0) < 12**2
    out = np.zeros((n, s, 32, 32, 32), np.float32)
    for i in range(n):
        for c in range(s):
            v = gaussian_filter(rng.normal(size=(32, 32, 32)), 2)
            out[i, c] = np.where(ball, (v - v[ball].mean()) / v[ball].std(), 0)
    return out


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return _phantom()


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_strength_zero_is_identity(name: str, phantom: np.ndarray) -> None:
    assert ARTIFACTS[name].strengths[0] == 0
    out = corrupt(phantom, name, 0.0, seed=3)
    assert out.dtype == np.float32 and np.array_equal(out, phantom)
    noise = np.random.default_rng(0).normal(size=(1, 1, 32, 32, 32)).astype(np.float32)  # no zero background
    assert np.array_equal(corrupt(noise, name, 0.0), noise)


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_difference_grows_with_strength_and_is_deterministic(name: str, phantom: np.ndarray) -> None:
    strengths = ARTIFACTS[name].strengths
    assert len(strengths) >= 3 and list(strengths) == sorted(strengths)
    outs = [corrupt(phantom, name, s, seed=1) for s in strengths]
    mad = [float(np.abs(o - phantom).mean()) for o in outs]
    assert all(b > a for a, b in itertools.pairwise(mad)), mad
    for o in outs:
        assert o.shape == phantom.shape and o.dtype == np.float32 and np.isfinite(o).all()
        assert np.all(o[phantom == 0] == 0)  # the background outside the brain stays 0 by default
    again = corrupt(phantom, name, strengths[-1], seed=1)
    assert np.array_equal(again, outs[-1])
    assert np.array_equal(phantom, _phantom())  # the input is never modified in place


def test_random_artifacts_depend_on_the_seed(phantom: np.ndarray) -> None:
    for name in ("bias_field", "rician_noise", "motion_ghosting"):
        s = ARTIFACTS[name].strengths[-1]
        assert not np.array_equal(corrupt(phantom, name, s, seed=1), corrupt(phantom, name, s, seed=2)), name
    noise = np.random.default_rng(0).normal(size=(1, 1, 32, 32, 32)).astype(np.float32)
    assert not np.allclose(corrupt(noise, "rician_noise", 0.2, keep_background=False), noise)
    with pytest.raises(KeyError, match="known"):
        corrupt(phantom, "nope", 0.1)


def _tiny(task: str, kind: str = "vit", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_task_model(load_specs()[task], BackboneConfig.tiny(kind), None, "scratch")


def test_robustness_table_and_plot(tmp_path: Path) -> None:
    spec = load_specs()["idh"]
    model = _tiny("idh")
    x = _phantom(n=4, s=len(spec.sequences), seed=1)
    y = np.array([0, 1, 0, 1])
    raw = y.astype(np.float32)
    rows = robustness_table(model, spec, x, y, raw, TargetScale(), strengths=[0.0, 0.3], seed=0)
    assert [(r["artifact"], r["strength"]) for r in rows] == [(a, s) for a in ARTIFACTS for s in (0.0, 0.3)]
    for r in rows:
        assert set(spec.metrics) <= set(r)
    assert len({tuple(r[m] for m in spec.metrics) for r in rows if r["strength"] == 0}) == 1
    path = robustness_plot(rows, spec, tmp_path / "plots" / "robustness.png")
    assert path.read_bytes()[:8] == PNG_MAGIC

    spec = load_specs()["brain_age"]  # regression, per-artifact strengths
    rows = robustness_table(
        _tiny("brain_age"), spec, x[:, :1], np.array([60.0, 70, 65, 75]), np.zeros(4), TargetScale(65.0, 5.0),
        artifacts=["gibbs", "resolution_drop"], strengths={"gibbs": [0.0, 0.5]},
    )  # fmt: skip
    assert [(r["artifact"], r["strength"]) for r in rows] == [("gibbs", 0.0), ("gibbs", 0.5)] + [
        ("resolution_drop", s) for s in ARTIFACTS["resolution_drop"].strengths
    ]
    assert all(np.isfinite(r["mae"]) for r in rows)


@pytest.mark.parametrize(
    ("task", "kind", "method", "expected"),
    [
        ("idh", "vit", "gradcam", "gradient"),  # Grad-CAM needs a conv feature map: a ViT gets input × gradient
        ("idh", "vit", "occlusion", "occlusion"),
        ("sequence", "resnet", "gradcam", "gradcam"),
        ("brain_age", "vit", "occlusion", "occlusion"),
    ],
)
def test_saliency_maps(task: str, kind: str, method: str, expected: str) -> None:
    spec = load_specs()[task]
    model = _tiny(task, kind)
    n = 1 if method == "occlusion" else 2
    x = _phantom(n=n, s=1 if spec.per_scan else len(spec.sequences), seed=2)
    assert saliency_method(model, method) == expected
    model.train()
    maps = saliency_maps(model, spec, x, method, overlap=0.25)
    assert model.training  # the model's mode is restored
    assert maps.shape == (n, 32, 32, 32) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert all(m.max() == pytest.approx(1.0) for m in maps)  # normalised per case (a random model moves its output)
    if expected == "gradcam":  # a map that locates something, not one value upsampled
        assert maps.std() > 0


def _cube(lo: int, size: int) -> np.ndarray:
    mask = np.zeros((32, 32, 32), bool)
    mask[lo : lo + size, lo : lo + size, lo : lo + size] = True
    return mask


def test_mass_ratio() -> None:
    region = _cube(10, 6)
    brain = _cube(4, 24)
    concentrated = np.where(region, 10.0, 0.1)
    ratio = mass_ratio(concentrated, region, np.random.default_rng(0), brain_mask=brain)
    assert ratio > 3
    uniform = np.ones((32, 32, 32))
    assert mass_ratio(uniform, region, 0, brain_mask=brain) == pytest.approx(1.0)
    assert mass_ratio(np.stack([uniform, uniform]), region, 0) == pytest.approx(1.0)
    avoided = np.where(region, 0.0, 1.0)  # saliency everywhere but the region
    assert mass_ratio(avoided, region, 0, brain_mask=brain) == pytest.approx(0.0)
    assert np.isnan(mass_ratio(np.zeros((32, 32, 32)), region, 0))


def test_overlay_png(tmp_path: Path, phantom: np.ndarray) -> None:
    volume = phantom[0, 0]
    saliency = gaussian_filter(np.where(_cube(12, 4), 1.0, 0.0), 2)
    path = overlay_png(volume, saliency, tmp_path / "overlay.png", region=_cube(12, 4), title="case 0")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert overlay_png(volume, saliency, tmp_path / "plain.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="D, H, W"):
        overlay_png(volume, saliency[:-1], tmp_path / "bad.png")
