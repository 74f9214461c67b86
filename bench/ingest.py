"""Ingest throughput (scans/s) next to the floor any content-addressed catalog must pay, measured on the same files in
the same run: a bare loop that reads each NIfTI header with nibabel and sha256-hashes the file bytes.

    .venv/bin/python bench/ingest.py --files 200 --shape 160 192 160

Prints the floor per core, ``brainiac ingest`` at 1 and 2 Ray CPUs (discovery + harvest + Delta MERGE, Ray already
started), and the ratios. Target: >= 0.8x the floor per core, near-linear scaling in Ray workers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def make_files(root: Path, n: int, shape: tuple[int, int, int]) -> list[Path]:
    rng = np.random.default_rng(0)
    base = (rng.normal(300, 80, size=shape)).clip(0, 1000).astype(np.int16)
    paths = []
    for i in range(n):
        anat = root / f"sub-{i:04d}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        data = base.copy()
        data[i % shape[0], :, :] += 1  # distinct bytes per file
        path = anat / f"sub-{i:04d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), path)
        paths.append(path)
    (root / "dataset_description.json").write_text('{"Name": "bench", "BIDSVersion": "1.9.0"}')
    return paths


def floor(paths: list[Path]) -> float:
    """Scans/s of nibabel header read + sha256 of the bytes, one core."""
    t = time.perf_counter()
    for p in paths:
        nib.load(p).header.get_data_shape()
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return len(paths) / (time.perf_counter() - t)


def ingest_rate(root: Path, cpus: int) -> float:
    """Run the ingest in a fresh process with a Ray of ``cpus`` CPUs; return scans/s excluding Ray start-up."""
    code = f"""
import time, tempfile, os
os.environ.setdefault("BRAINIAC_PSEUDONYM_KEY", "bench-key-0123456789abcdef")
from brainiac.platform.config import load_config
from brainiac.platform.cluster import init_ray
from brainiac.ingestion.ingest import ingest
cfg = load_config("tiny", ["catalog.uri=" + tempfile.mkdtemp(), "cluster.num_cpus={cpus}"])
init_ray(cfg.cluster)
t = time.perf_counter()
s = ingest(cfg, [{str(root)!r}], dataset="bench", access="open", progress=False)
print(s.inserted / (time.perf_counter() - t))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--shape", type=int, nargs=3, default=(160, 192, 160))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bench"
        paths = make_files(root, args.files, tuple(args.shape))
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        base = floor(paths)
        one = ingest_rate(root, 1)
        two = ingest_rate(root, 2)
    print(f"files: {args.files} x {tuple(args.shape)} int16 .nii.gz, {mb:.1f} MB each, {os.cpu_count()} cores")
    print(f"floor (nibabel header + sha256, 1 core): {base:8.1f} scans/s")
    print(f"brainiac ingest, Ray 1 CPU:              {one:8.1f} scans/s   ratio vs floor {one / base:.2f}x")
    print(
        f"brainiac ingest, Ray 2 CPUs:             {two:8.1f} scans/s   ratio vs floor {two / base:.2f}x, scaling {two / one:.2f}x"
    )


if __name__ == "__main__":
    main()
