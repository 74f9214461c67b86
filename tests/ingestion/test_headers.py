"""Header harvest: geometry and content id from one streamed read, and every defect mapped to its quarantine reason."""

from __future__ import annotations

import gzip
import hashlib

import nibabel as nib
import numpy as np
import pytest

from brainiac.ingestion.headers import HarvestError, harvest_nifti
from brainiac.platform.storage import StorageLocation


def _write(path, data, affine, gz=True):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)
    return StorageLocation.resolve(path)


def test_geometry_and_content_id(tmp_path):
    affine = np.array([[0, 0, -1.2, 90], [-0.9, 0, 0, 100], [0, 0.9, 0, -80], [0, 0, 0, 1.0]])
    loc = _write(tmp_path / "a.nii.gz", np.arange(24 * 20 * 16, dtype=np.int16).reshape(24, 20, 16), affine)
    facts = harvest_nifti(loc)
    assert facts.scan_id == hashlib.sha256((tmp_path / "a.nii.gz").read_bytes()).hexdigest()
    assert facts.shape == (24, 20, 16) and facts.dtype == "int16"
    assert facts.spacing_mm == pytest.approx((0.9, 0.9, 1.2))
    assert np.allclose(np.array(facts.affine).reshape(4, 4), affine)
    assert facts.axcodes == "PSL" and facts.sform_code == 1
    plain = harvest_nifti(_write(tmp_path / "a.nii", np.zeros((4, 4, 4), np.float32) + 1, np.eye(4)))
    assert plain.axcodes == "RAS" and plain.shape == (4, 4, 4)


def test_4d_with_one_volume_counts_as_3d(tmp_path):
    facts = harvest_nifti(_write(tmp_path / "b.nii.gz", np.ones((5, 6, 7, 1), np.float32), np.eye(4)))
    assert facts.shape == (5, 6, 7)


def _case(tmp_path, name):
    good = tmp_path / "good.nii.gz"
    _write(good, np.ones((8, 8, 8), np.int16), np.eye(4))
    path = tmp_path / name
    if name == "empty.nii.gz":
        path.write_bytes(b"")
    elif name == "truncated.nii.gz":
        path.write_bytes(good.read_bytes()[:-20])
    elif name == "shortpayload.nii.gz":
        raw = gzip.decompress(good.read_bytes())
        path.write_bytes(gzip.compress(raw[:-100]))
    elif name == "text.nii.gz":
        path.write_bytes(b"hello, this is not an image at all" * 20)
    elif name == "slice2d.nii.gz":
        _write(path, np.ones((8, 8), np.int16), np.eye(4))
    elif name == "series4d.nii.gz":
        _write(path, np.ones((8, 8, 8, 3), np.int16), np.eye(4))
    elif name == "singular.nii.gz":
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((8, 8, 8))
        hdr.set_data_dtype(np.int16)
        hdr.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
        hdr["vox_offset"] = 352
        raw = hdr.binaryblock + b"\0" * 4 + np.ones((8, 8, 8), np.int16).tobytes()
        path.write_bytes(gzip.compress(raw))
    return StorageLocation.resolve(path)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty.nii.gz", "empty_file"),
        ("truncated.nii.gz", "truncated"),
        ("shortpayload.nii.gz", "truncated"),
        ("text.nii.gz", "not_nifti"),
        ("slice2d.nii.gz", "not_3d"),
        ("series4d.nii.gz", "not_3d"),
        ("singular.nii.gz", "singular_affine"),
        ("missing.nii.gz", "missing_file"),
    ],
)
def test_defects_map_to_reasons(tmp_path, name, reason):
    with pytest.raises(HarvestError) as info:
        harvest_nifti(_case(tmp_path, name))
    assert info.value.reason == reason
