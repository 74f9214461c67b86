"""PHI audit: a cohort with names, IDs, birth dates, institutions and free text planted in folder names, file names,
sidecars, NIfTI headers and DICOM tags goes through ingest, preprocess and a pretraining run logged to MLflow; every
Delta table of the catalog, every staged file name and header, every MLflow param, tag, metric name and artifact, and
every log line the jobs wrote are searched for each planted value, and none is found. The identified zone, which only
ingest reads, must hold them (else the audit would prove nothing)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

PLANTED_TEXT = [
    "Jane_Doe",
    "JaneDoe",
    "Jane Doe",
    "19650807",
    "1965-08-07",
    "Elsewhere",
    "Cohen",
    "7787823",
    "19780807",
    "Gadavist",
]
"""Values planted by the test itself (the generator's own DICOM identities are added from the files)."""


def _rename_subject(root: Path, old: str, new: str) -> Path:
    """Rename a BIDS subject folder and every file in it (``sub-<old>`` → ``sub-<new>``) and its participants row."""
    folder = root / f"sub-{old}"
    target = root / f"sub-{new}"
    folder.rename(target)
    for path in sorted(target.rglob("*"), key=lambda p: -len(p.parts)):
        if f"sub-{old}" in path.name:
            path.rename(path.with_name(path.name.replace(f"sub-{old}", f"sub-{new}")))
    tsv = root / "participants.tsv"
    tsv.write_text(tsv.read_text().replace(f"sub-{old}", f"sub-{new}"))
    return target


def _plant_bids(root: Path) -> None:
    subject = sorted(p.name for p in root.glob("sub-*"))[0].removeprefix("sub-")
    folder = _rename_subject(root, subject, "JaneDoe")
    image = sorted(folder.rglob("*_T1w.nii.gz"))[0]
    img = nib.load(image)
    img = nib.Nifti1Image(img.get_fdata(dtype="float32"), img.affine, img.header)
    img.header["descrip"] = b"Jane Doe 19650807"
    img.header["aux_file"] = b"Elsewhere"
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"PatientName=Jane Doe DOB 1965-08-07"))
    nib.save(img, image)  # gzip member header: the file name (sub-JaneDoe_...) is in it
    sidecar = image.with_name(image.name.replace(".nii.gz", ".json"))
    meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    meta.update(
        {
            "PatientName": "Jane Doe",
            "InstitutionName": "St Elsewhere Hospital",
            "AcquisitionDateTime": "1965-08-07T09:30:12",
            "ImageComments": "Jane Doe follow-up, DOB 19650807",
        }
    )
    sidecar.write_text(json.dumps(meta))
    tsv = root / "participants.tsv"
    lines = tsv.read_text().splitlines()
    lines[0] += "\tpatient_name"
    lines[1:] = [line + ("\tJane Doe" if "JaneDoe" in line else "\tn/a") for line in lines[1:]]
    tsv.write_text("\n".join(lines) + "\n")


def _plant_dicom(root: Path) -> set[str]:
    """Free text on allow-listed tags, one patient folder named after the patient; returns the generator's own PHI."""
    import pydicom

    values: set[str] = set()
    patient = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("PAT"))[0]
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName"):
            value = str(ds.get(tag, "") or "")
            if len(value) >= 6:
                values.add(value)
        if patient in path.parents:
            ds.ContrastBolusAgent = "Gadavist 10ml for Cohen^Mei"
            ds.SoftwareVersions = "DOB 19780807"
            ds.ReceiveCoilName = "Cohen head coil"
            ds.save_as(path)
    patient.rename(patient.with_name("Cohen_Mei_7787823"))
    return values


def _tables(catalog_dir: Path) -> list[Path]:
    return sorted(p.parent for p in catalog_dir.rglob("_delta_log"))


def _session_log_sizes() -> dict[Path, int]:
    """Each file of the running Ray session's log folder with its current size (an offset to audit from)."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return {p: p.stat().st_size for p in session.rglob("*") if p.is_file()}


def _hits(text: str, secrets: list[str]) -> list[str]:
    low = text.lower()
    return sorted({s for s in secrets if s.lower() in low})


@pytest.fixture(scope="module")
def audited(tmp_path_factory, ray_session, pseudonym_key):
    """The planted cohort through ingest → preprocess → a short pretraining run; what the jobs printed and logged."""
    from brainiac.ingestion.ingest import ingest
    from brainiac.ingestion.prepare import preprocess
    from brainiac.ingestion.synthetic import generate_cohort
    from brainiac.jobs.config import load_config
    from brainiac.jobs.pretrain.run import pretrain

    base = tmp_path_factory.mktemp("phi")
    cohort = generate_cohort(base / "gen", subjects=6, seed=23, preset="tiny", cohorts=["bids", "dicom"])
    bids = base / "Jane_Doe_1965_study"
    dicom = base / "Cohen_Mei_7787823_export"
    shutil.move(cohort.out_dir / cohort.cohorts["bids"], bids)
    shutil.move(cohort.out_dir / cohort.cohorts["dicom"], dicom)
    _plant_bids(bids)
    anat = sorted((bids / "sub-JaneDoe").rglob("anat"))[0]
    (anat / "sub-JaneDoe_ses-01_run-9_T1w.nii.gz").write_bytes(b"")  # quarantined: its row must not name her
    generator_phi = _plant_dicom(dicom)

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep(logging.DEBUG)  # our own loggers at DEBUG, libraries at INFO (fsspec's DEBUG names every file)
    root_logger, ours = logging.getLogger(), logging.getLogger("brainiac")
    previous = root_logger.level, ours.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)
    ours.setLevel(logging.DEBUG)
    started = time.time()
    log_offsets = _session_log_sizes()  # the session's Ray logs hold other tests' lines: audit only what follows
    overrides = [
        f"catalog.uri={base / 'catalog'}",
        f"tracking.uri=sqlite:///{base / 'mlflow.db'}",
        "catalog.allowed_access=[open, registered, restricted]",
    ]
    try:
        cfg = load_config("tiny", overrides)
        summaries = [
            ingest(cfg, [str(bids)], dataset="synth-lifespan-bids", progress=False),
            ingest(cfg, [str(dicom)], dataset="synth-gbm-dicom", progress=False),
        ]
        volumes = preprocess(cfg, progress=False)
        pcfg = load_config(
            "pretrain/tiny",
            [*overrides, f"pretrain.storage_path={base / 'runs'}", "pretrain.max_steps=4", "pretrain.num_workers=1",
             "pretrain.checkpoint_every=2", "pretrain.eval_pairs=8", "pretrain.run_name=phi-audit"],
        )  # fmt: skip
        trained = pretrain(pcfg, progress=False)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(previous[0])
        ours.setLevel(previous[1])
    secrets = PLANTED_TEXT + sorted(generator_phi)
    printed = [repr(s) for s in summaries] + [repr(volumes), repr(trained)]
    return {"base": base, "cfg": cfg, "secrets": secrets, "logs": records + printed, "started": started,
            "log_offsets": log_offsets,
            "summaries": summaries, "volumes": volumes}  # fmt: skip


def test_the_planted_identifiers_reached_ingest(audited) -> None:
    """The audit is only meaningful if the identifiers were there to leak: the identified zone holds them."""
    base = audited["base"]
    zone = base / "catalog-identified"
    text = "\n".join(json.dumps(DeltaTableRows(p), default=str) for p in _tables(zone))
    assert {"Jane_Doe", "JaneDoe", "Cohen"} <= set(_hits(text, audited["secrets"]))
    assert sum(s.inserted for s in audited["summaries"]) > 0 and audited["volumes"].processed > 0


def DeltaTableRows(path: Path) -> list[dict]:
    from deltalake import DeltaTable

    return DeltaTable(str(path)).to_pyarrow_table().to_pylist()


def test_no_catalog_table_holds_a_planted_identifier(audited) -> None:
    catalog = audited["base"] / "catalog"
    tables = _tables(catalog)
    assert {"scans", "quarantine", "volumes", "splits"} <= {p.name for p in tables}
    for table in tables:
        rows = DeltaTableRows(table)
        text = json.dumps([{k: v for k, v in r.items() if not isinstance(v, bytes)} for r in rows], default=str)
        assert not _hits(text, audited["secrets"]), f"{table.name}: {_hits(text, audited['secrets'])}"
    names = "\n".join(str(p.relative_to(catalog)) for p in catalog.rglob("*"))
    assert not _hits(names, audited["secrets"]), "a file name under the catalog"


def test_staged_images_carry_no_identifier_in_gzip_or_nifti_headers(audited) -> None:
    staged = sorted((audited["base"] / "catalog" / "raw").rglob("*.nii*"))
    assert staged
    for path in staged:
        data = path.read_bytes()
        head = gzip.decompress(data)[:4096] if path.suffix == ".gz" else data[:4096]
        text = (data[:512] + head).decode("latin-1")
        assert not _hits(text, audited["secrets"]), path.name


def test_mlflow_params_tags_metrics_and_artifacts_hold_no_identifier(audited, tmp_path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=audited["cfg"].tracking.uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs
    for run in runs:
        text = json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)])
        assert not _hits(text, audited["secrets"]), f"run {run.info.run_id}: {_hits(text, audited['secrets'])}"
        out = tmp_path / run.info.run_id
        client.download_artifacts(run.info.run_id, "", str(out))
        for path in out.rglob("*"):
            if path.is_file():
                text = path.read_bytes().decode("latin-1")
                assert not _hits(text + str(path), audited["secrets"]), path.name
    for version in client.search_model_versions():
        assert not _hits(json.dumps([version.tags, version.source, version.description]), audited["secrets"])


def test_logs_hold_no_identifier(audited) -> None:
    import ray

    lines = audited["logs"]
    assert lines
    leaking = [line[:300] for line in lines if _hits(line, audited["secrets"])]
    assert not leaking, leaking[:5]
    session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    written = [p for p in session.rglob("*") if p.is_file() and os.path.getmtime(p) >= audited["started"] - 1]
    assert written
    for path in written:
        # Only the bytes written since the audited run began: the shared session's logs also hold earlier tests' lines,
        # whose numbers (sizes, ids) can contain a planted 7-digit MRN by chance.
        with path.open("rb") as fh:
            fh.seek(audited["log_offsets"].get(path, 0))
            text = fh.read().decode("utf-8", "replace")
        assert not _hits(text, audited["secrets"]), path.name
