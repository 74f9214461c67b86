"""Same image, other bytes: copies cropped (even into the brain), reoriented and re-typed are found; other brains not."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

from brainiac.ingestion.duplicates import candidate_pairs, find_duplicates


def _brain(seed: int, shape=(60, 70, 50)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.normal(size=shape), 3) * 400 + 500
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    head = ((zz - 30) / 26) ** 2 + ((yy - 35) / 31) ** 2 + ((xx - 25) / 22) ** 2 < 1
    return (img * head + rng.normal(0, 5, shape)).astype(np.float32)


def _row(path, data, affine, dataset, subject):
    nib.save(nib.Nifti1Image(data, affine), path)
    return {"scan_id": str(path), "dataset": dataset, "subject_id": subject, "sequence": "T1w",
            "affine": affine.reshape(-1).tolist(), "shape": list(data.shape), "image_uri": str(path)}  # fmt: skip


def test_cropped_flipped_retyped_copy_is_found_and_other_brains_are_not(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    original = _brain(0)
    # The copy: cropped 2/3/5 voxels into the head on the low side, stored with the first axis flipped, as int16.
    crop = original[2:, 3:, 5:]
    flipped = crop[::-1].round().astype(np.int16)
    copy_affine = affine @ np.array([[-1, 0, 0, crop.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    copy_affine[:3, 3] += affine[:3, :3] @ np.array([2, 3, 5])
    rows = [
        _row(tmp_path / "a.nii.gz", original, affine, "brats", "s1"),
        _row(tmp_path / "b.nii.gz", flipped, copy_affine, "upenn", "s9"),
        _row(tmp_path / "c.nii.gz", _brain(1), affine, "upenn", "s2"),  # another person on the same grid
        _row(tmp_path / "d.nii.gz", _brain(2), affine, "brats", "s3"),
    ]
    assert len(candidate_pairs(rows)) >= 3  # header-level candidates include the look-alikes
    groups = find_duplicates(rows)
    assert [g.scan_ids for g in groups] == [(str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"))]
