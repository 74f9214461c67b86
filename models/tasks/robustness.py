"""Robustness: the task metrics under MRI artifacts of increasing strength (issue 7, "Evaluation, robustness").

:data:`ARTIFACTS` is an ordered registry of named corruptions. Each one acts on a single volume (one sequence of one
case), is parameterised by one ``strength`` (0 = the input unchanged, larger = stronger) and is deterministic for a
given seed. :func:`corrupt` applies one to a batch ``(n, S, D, H, W)``, channel by channel and case by case, each with
its own random stream derived from ``(seed, artifact, case, channel)``: the same seed gives the same corruption, and
the strengths of one sweep share their random draws (a stronger setting is the same artifact, scaled up).

The volumes are z-scored over the brain and 0 outside it, so they are an affine image of the magnitude image (up to
percentile clipping). The magnitude-type artifacts (contrast, bias field, Rician noise) therefore act on the offset from
the volume's minimum, ``x - min(x)``, and shift back: that keeps the noise model and the multiplicative field physical
while leaving the z-score's units in place. By default the zero background outside the brain stays zero (the
preprocessing masks the brain after the z-score, so it would mask an acquisition artifact too).

=================== =========================================================================================
``contrast``        gamma ``1 + strength`` on the min–max range (MONAI ``AdjustContrast``)
``bias_field``      smooth multiplicative field ``exp(b)``, ``b`` a degree-3 Legendre polynomial field (MONAI
                    ``RandBiasField``, fixed per seed) scaled to ``max |b| = strength``
``gibbs``           k-space truncation, ``alpha = strength`` (MONAI ``GibbsNoise``)
``rician_noise``    Rician noise of std ``strength ×`` the foreground std (MONAI ``RandRicianNoise``)
``motion_ghosting`` every ``k``-th k-space line along one axis scaled by ``1 - strength`` (TorchIO-style ghosting,
                    NumPy FFT: MONAI has spikes but no ghosting), the k-space centre kept
``resolution_drop`` area downsampling by ``1 + strength`` and trilinear upsampling back to the grid
=================== =========================================================================================

:func:`robustness_table` evaluates a model under every artifact × strength with the fine-tuning engine's
:func:`~brainiac.models.tasks.inference.predict` and :func:`~brainiac.models.tasks.inference.score`, and
:func:`robustness_plot` draws metric vs strength.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch import nn

    from brainiac.models.tasks.inference import TargetScale
    from brainiac.models.tasks.spec import TaskSpec

__all__ = ["ARTIFACTS", "Artifact", "corrupt", "robustness_plot", "robustness_table"]

Corruption = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Artifact:
    """One named corruption of a single volume ``(D, H, W)`` and its default sweep of strengths."""

    name: str
    apply: Corruption
    """``(volume float32 (D, H, W), strength > 0, rng) -> corrupted volume``; strength 0 never reaches it."""
    strengths: tuple[float, ...]
    """Default sweep, starting at 0 (the clean baseline)."""
    description: str


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _foreground(x: np.ndarray) -> np.ndarray:
    """Brain voxels: the non-zero ones where at least 5 % of the volume is exactly 0 (the preprocessed volumes' background
    outside the brain), else every voxel."""
    mask = x != 0
    return mask if mask.any() and (~mask).mean() >= 0.05 else np.ones_like(mask)


def _contrast(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import AdjustContrast

    out = AdjustContrast(gamma=1.0 + strength)(torch.from_numpy(x))
    return np.asarray(out, dtype=np.float32)


def _bias_field(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import RandBiasField

    # MONAI's RandBiasField with its coefficients fixed by the seed; applied to ones it returns exp(field) itself.
    transform = RandBiasField(degree=3, coeff_range=(-1.0, 1.0), prob=1.0, dtype=np.float64)
    transform.set_random_state(seed=_seed(rng))
    field = np.log(np.asarray(transform(np.ones((1, *x.shape), dtype=np.float64)))[0])
    peak = np.abs(field).max()
    field = field * (strength / peak) if peak > 0 else field
    low = x.min()
    return ((x - low) * np.exp(field) + low).astype(np.float32)


def _gibbs(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import GibbsNoise

    out = GibbsNoise(alpha=float(np.clip(strength, 0.0, 1.0)))(torch.from_numpy(x)[None])
    return np.asarray(out, dtype=np.float32)[0]


def _rician_noise(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import RandRicianNoise

    std = strength * float(x[_foreground(x)].std())
    transform = RandRicianNoise(prob=1.0, mean=0.0, std=std, sample_std=False, dtype=np.float32)
    transform.set_random_state(seed=_seed(rng))
    low = x.min()
    out = np.asarray(transform(torch.from_numpy(x - low)[None], randomize=True), dtype=np.float32)[0]
    return out + low


def _motion_ghosting(x: np.ndarray, strength: float, rng: np.random.Generator, num_ghosts: int = 4) -> np.ndarray:
    # TorchIO's RandomGhosting: every num_ghosts-th plane of k-space along the phase-encoding axis is damped by
    # (1 - intensity), which puts ghosts of the object at multiples of N / num_ghosts; the centre plane is restored.
    axis = int(rng.integers(0, x.ndim))
    k = np.fft.fftshift(np.fft.fftn(x))
    centre_index = x.shape[axis] // 2
    centre = np.take(k, [centre_index], axis=axis).copy()
    index: list[Any] = [slice(None)] * x.ndim
    index[axis] = slice(None, None, num_ghosts)
    k[tuple(index)] *= 1.0 - strength
    index[axis] = slice(centre_index, centre_index + 1)
    k[tuple(index)] = centre
    return np.fft.ifftn(np.fft.ifftshift(k)).real.astype(np.float32)


def _resolution_drop(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    factor = 1.0 + strength
    t = torch.from_numpy(x)[None, None]
    low = [max(1, round(s / factor)) for s in x.shape]
    down = F.interpolate(t, size=low, mode="area")
    up = F.interpolate(down, size=x.shape, mode="trilinear", align_corners=False)
    return up[0, 0].numpy().astype(np.float32)


ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in (
        Artifact("contrast", _contrast, (0.0, 0.1, 0.25, 0.5), "gamma 1 + strength on the min-max range"),
        Artifact("bias_field", _bias_field, (0.0, 0.2, 0.4, 0.8), "multiplicative exp(field), max |field| = strength"),
        Artifact("gibbs", _gibbs, (0.0, 0.2, 0.4, 0.6), "k-space truncation, alpha = strength"),
        Artifact("rician_noise", _rician_noise, (0.0, 0.05, 0.1, 0.2), "Rician noise, std = strength x foreground std"),
        Artifact("motion_ghosting", _motion_ghosting, (0.0, 0.25, 0.5, 0.9), "k-space ghosting, intensity = strength"),
        Artifact("resolution_drop", _resolution_drop, (0.0, 0.5, 1.0, 2.0), "down/up-sampling by 1 + strength"),
    )
}
"""The artifacts, in report order."""


def corrupt(
    inputs: np.ndarray, artifact: str, strength: float, seed: int = 0, *, keep_background: bool = True
) -> np.ndarray:
    """``inputs`` (n, S, D, H, W) with ``artifact`` at ``strength`` applied to each volume; a float32 copy.

    Strength 0 returns the input unchanged (as float32). The random draws depend only on ``seed``, the artifact, the
    case index and the channel, never on ``strength``.

    With ``keep_background`` (default), a volume with a zero background (the preprocessed volumes: 0 outside the
    brain, at least 5 % of the voxels) keeps it: the artifact is masked by the brain as preprocessing would mask an
    artifact of the acquisition. A volume without one is corrupted everywhere.

    Raises:
        KeyError: unknown artifact (the message lists the known ones).
    """
    if artifact not in ARTIFACTS:
        raise KeyError(f"unknown artifact {artifact!r}; known: {', '.join(ARTIFACTS)}")
    x = np.asarray(inputs, dtype=np.float32)
    if x.ndim != 5:
        raise ValueError(f"expected inputs of shape (n, S, D, H, W), got {x.shape}")
    out = x.copy()
    if strength == 0:
        return out
    apply = ARTIFACTS[artifact].apply
    tag = zlib.crc32(artifact.encode())
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            rng = np.random.default_rng([seed, tag, i, c])
            corrupted = apply(x[i, c], float(strength), rng)
            if keep_background:
                corrupted = np.where(_foreground(x[i, c]), corrupted, x[i, c])
            out[i, c] = corrupted
    return out


def _strengths_for(name: str, strengths: Sequence[float] | Mapping[str, Sequence[float]] | None) -> list[float]:
    if strengths is None:
        return list(ARTIFACTS[name].strengths)
    if isinstance(strengths, Mapping):
        return list(strengths.get(name, ARTIFACTS[name].strengths))
    return list(strengths)


def robustness_table(
    model: nn.Module,
    spec: TaskSpec,
    inputs: np.ndarray,
    targets: np.ndarray,
    raw: np.ndarray,
    scale: TargetScale,
    artifacts: Sequence[str] | None = None,
    strengths: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    seed: int = 0,
    keep_background: bool = True,
) -> list[dict[str, Any]]:
    """The spec's metrics under each artifact at each strength: rows ``{artifact, strength, <metric>: value}``.

    Args:
        model, spec, scale: as for :func:`~brainiac.models.tasks.inference.predict`.
        inputs: clean test inputs (n, S, D, H, W); ``targets`` and ``raw`` as for
            :func:`~brainiac.models.tasks.inference.score`.
        artifacts: names from :data:`ARTIFACTS` (default: all, in registry order).
        strengths: one list for every artifact, a mapping per artifact name, or ``None`` for each artifact's default.
        seed, keep_background: as for :func:`corrupt`.

    Returns:
        One row per artifact × strength, in order. Strength-0 rows are the clean evaluation (computed once).
    """
    from brainiac.models.tasks.inference import predict, score

    names = list(ARTIFACTS) if artifacts is None else list(artifacts)
    unknown = [a for a in names if a not in ARTIFACTS]
    if unknown:
        raise KeyError(f"unknown artifacts {unknown}; known: {', '.join(ARTIFACTS)}")
    clean: dict[str, float] | None = None
    rows: list[dict[str, Any]] = []
    for name in names:
        for strength in _strengths_for(name, strengths):
            if strength == 0:
                if clean is None:
                    clean = score(spec, predict(model, spec, np.asarray(inputs, dtype=np.float32), scale), targets, raw)
                metrics = clean
            else:
                corrupted = corrupt(inputs, name, strength, seed, keep_background=keep_background)
                metrics = score(spec, predict(model, spec, corrupted, scale), targets, raw)
            rows.append({"artifact": name, "strength": float(strength), **metrics})
    return rows


def robustness_plot(rows: Sequence[Mapping[str, Any]], spec: TaskSpec, path: str | Path) -> Path:
    """PNG of metric vs strength: one panel per metric of ``spec``, one line per artifact. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = list(spec.metrics)
    fig = Figure(figsize=(4.5 * len(metrics), 3.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    artifacts = list(dict.fromkeys(str(r["artifact"]) for r in rows))
    for ax, metric in zip(axes, metrics, strict=True):
        for name in artifacts:
            points = sorted((float(r["strength"]), float(r.get(metric, np.nan))) for r in rows if r["artifact"] == name)
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel("artifact strength")
        ax.set_ylabel(metric)
        ax.set_title(f"{spec.name}: {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path
