"""``brainiac predict``: a registered task model on new scans, preprocessed exactly like its training volumes.

A task model version records the preprocessing settings of its training volumes (``model/preprocess.json`` beside the
model, see :func:`brainiac.jobs.finetune.run.finetune`), so a scan given here goes through the same
:func:`~brainiac.ingestion.preprocess.preprocess_scan` (reorient, N4, registration to MNI152, atlas mask, crop,
z-score) onto the same ``fixed`` grid, with no catalog and no Ray. Channels follow the task spec's ``sequences``.
Segmentation masks are mapped back through the registration onto the input's own grid (its shape, affine and
qform/sform), so they overlay the scan in any viewer whatever its orientation or voxel size.

Before predicting, each input can be checked by the registry's ``brainiac-sequence@champion`` (when there is one): a
file whose predicted sequence is confidently not the one the task expects (say a T1w passed as ``--flair``) is an error.

Only champions serve: a version that does not hold the ``champion`` alias (refused at promotion, or never judged) is
refused with the reason, unless the caller asks for any version on purpose; its predictions are then marked
``champion=False`` and their headline says NOT CHAMPION, so they are never read as results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from brainiac.jobs.config import Config
from brainiac.models.tasks.spec import TaskSpec, task_spec
from brainiac.platform.errors import UserError

if TYPE_CHECKING:
    import nibabel as nib
    from torch import nn

    from brainiac.ingestion.preprocess import PreprocessConfig, PreprocessResult

__all__ = [
    "SEQUENCE_MODEL",
    "Prediction",
    "flag_of",
    "model_preprocess_config",
    "predict_scans",
    "preprocess_file",
    "read_scan",
    "serving_status",
]

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
"""The alias of the version that passed every promotion gate (``promote.champion_alias``'s default)."""

SEQUENCE_MODEL = f"models:/brainiac-sequence@{CHAMPION_ALIAS}"
"""The model that checks each input's sequence before a task model sees it."""

SEQUENCE_CHECK_PROBABILITY = 0.5
"""An input is rejected when the sequence model's top class is another sequence with more than this probability."""

NO_PREPROCESS = "model {model} records no preprocess config; re-register it with brainiac finetune"

Inputs = Sequence["str | Path | Mapping[str, str | Path]"]


def flag_of(sequence: str) -> str:
    """The command-line flag that passes a file of ``sequence`` (``FLAIR`` → ``--flair``)."""
    return f"--{sequence.lower()}"


@dataclass
class Prediction:
    """One case's prediction, in the task's own terms."""

    task: str
    kind: str
    model: str
    """Registered name/version that predicted (aliases move, versions do not)."""
    inputs: dict[str, str]
    """Sequence → input file, in the model's channel order."""
    preprocess_version: str
    qc_pass: bool = True
    qc_reason: str | None = None
    value: float | None = None
    """Regression: the prediction in ``units``."""
    units: str = ""
    probability: float | None = None
    """Binary: probability of the positive class."""
    label: str | None = None
    """Binary: the decision (positive when ``probability`` > 0.5); multiclass: the most probable class."""
    probabilities: dict[str, float] = field(default_factory=dict)
    """Multiclass: class → probability."""
    tumour_volume_ml: float | None = None
    """Segmentation: volume of the mask on the input's own grid."""
    mask_path: str | None = None
    """Segmentation: the mask NIfTI, on the input's grid (same shape and affine)."""
    sequence_check: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Sequence → what the sequence model said of that input (``predicted``, ``probability``)."""
    json_path: str | None = None
    headline: str = ""
    """One human line: the value with its units, the probability and decision, or the tumour volume and mask."""
    champion: bool = True
    """Whether the model was its task's champion; ``False`` only when any version was allowed on purpose."""
    not_champion: str | None = None
    """Why the model is not the champion (refused at promotion with the reasons, or never promoted)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs.


def read_scan(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI scan, header and voxels, and check that it is one 3-D volume.

    Raises:
        UserError: a missing file, a file that is not a readable NIfTI, or a 4-D series of several volumes.
    """
    import nibabel as nib

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"scan {path} does not exist")
    if not p.is_file():
        raise UserError(f"scan {path} is not a file")
    try:
        img = nib.load(p)
    except Exception as exc:  # nibabel raises several types (ImageFileError, gzip/zlib, struct errors)
        raise UserError(f"{path} is not a readable NIfTI file ({_first_line(exc)})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise UserError(f"{path} is a {type(img).__name__}, not a NIfTI file (.nii or .nii.gz)")
    shape = img.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise UserError(f"{path} has shape {tuple(shape)}; predict takes one 3-D volume per file")
    return img


def _voxels(img: nib.Nifti1Image, path: str) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # a truncated or corrupt payload only shows when decoded
        raise UserError(f"{path}: the voxels cannot be read ({_first_line(exc)})") from exc
    return data[..., 0] if data.ndim == 4 else data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _as_cases(spec: TaskSpec, inputs: Inputs) -> list[dict[str, str]]:
    """One ``{sequence: file}`` per case, in the spec's channel order, or a :class:`UserError` that says which flag is
    missing or superfluous."""
    flags = " ".join(f"{flag_of(s)} FILE" for s in spec.sequences)
    cases: list[dict[str, str]] = []
    for item in inputs:
        if isinstance(item, Mapping):
            given = {str(k): str(v) for k, v in item.items() if v is not None}
        elif spec.per_scan or len(spec.sequences) == 1:
            given = {spec.sequences[0] if not spec.per_scan else "scan": str(item)}
        else:
            raise UserError(f"task {spec.name} takes one scan per sequence: give {flags} instead of positional scans")
        if spec.per_scan:
            if len(given) != 1:
                raise UserError(f"task {spec.name} reads one scan per case; give the scans as positional arguments")
            cases.append({"scan": next(iter(given.values()))})
            continue
        missing = [s for s in spec.sequences if s not in given]
        if missing:
            raise UserError(
                f"task {spec.name} needs {' '.join(flag_of(s) for s in missing)} (it reads {', '.join(spec.sequences)})"
            )
        extra = [s for s in given if s not in spec.sequences]
        if extra:
            raise UserError(
                f"task {spec.name} reads only {', '.join(spec.sequences)}; drop {' '.join(flag_of(s) for s in extra)}"
            )
        cases.append({s: given[s] for s in spec.sequences})
    if not cases:
        raise UserError(f"no scan given; task {spec.name} needs " + ("SCAN..." if len(spec.sequences) == 1 else flags))
    return cases


def _paths(inputs: Inputs) -> list[str]:
    out: list[str] = []
    for item in inputs:
        values = item.values() if isinstance(item, Mapping) else [item]
        out.extend(str(v) for v in values if v is not None)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The model and its preprocessing.


@dataclass
class _Model:
    """A loaded task model version with what predicting needs."""

    label: str
    spec: TaskSpec
    module: nn.Module
    preprocess: PreprocessConfig
    mean: float
    std: float


def model_preprocess_config(version, tracking_uri: str) -> PreprocessConfig | None:
    """The :class:`PreprocessConfig` a registered model version records (``model/preprocess.json`` of its run), or
    ``None`` when it records none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from brainiac.ingestion.preprocess import PreprocessConfig

    if not version.run_id:
        return None
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(version.run_id, "model/preprocess.json", tmp)
        except (MlflowException, OSError):
            return None
        data = json.loads(Path(path).read_text())
    return PreprocessConfig.from_record(data)


def _resolve(uri: str, tracking_uri: str):
    """The registered version ``uri`` names and its task spec.

    Raises:
        UserError: no such model, alias or version, or a version that is not a fine-tuned task model.
    """
    from brainiac.models.export import model_version

    mv = model_version(uri, tracking_uri)
    if "task" not in mv.tags:
        raise UserError(f"{uri} carries no 'task' tag: it is not a fine-tuned task model")
    return mv, task_spec(mv.tags["task"])


def _load(mv, spec: TaskSpec, tracking_uri: str, info: Callable[[str], None]) -> _Model:
    """Load a resolved task model version with its recorded preprocessing.

    Raises:
        UserError: the version records no preprocessing, or its model cannot be read back (no weights and spec, as
            for a model logged as a pickle; weights that are not plain tensors or do not fit the spec).
    """
    from brainiac.models.export import load_model_artifacts

    label = f"{mv.name}/{mv.version}"
    cfg = model_preprocess_config(mv, tracking_uri)
    if cfg is None:
        raise UserError(NO_PREPROCESS.format(model=label))
    recorded = mv.tags.get("preprocess_version", "")
    if recorded and cfg.version() != recorded:  # same settings, other code revision (PIPELINE_REVISION)
        info(f"warning: {label} was trained on preprocess version {recorded}; its settings hash to {cfg.version()} "
             "under this code revision, so inputs may differ slightly from its training volumes")  # fmt: skip
    # Weights + typed spec, rebuilt and loaded strictly; a version logged as a pickle is refused, never unpickled.
    module = load_model_artifacts(f"models:/{mv.name}/{mv.version}", tracking_uri).module
    return _Model(
        label, spec, module, cfg, float(mv.tags.get("target_mean", 0.0)), float(mv.tags.get("target_std", 1.0))
    )


def _sequence_checker(tracking_uri: str, info: Callable[[str], None]) -> _Model | None:
    """The registry's sequence model, or ``None`` (with one info line) when it has none that can check."""
    from brainiac.models.export import model_version

    try:
        mv = model_version(SEQUENCE_MODEL, tracking_uri)
    except UserError:
        info(f"no {SEQUENCE_MODEL} in the registry: input sequences are not checked")
        return None
    if mv.tags.get("task") != "sequence":
        info(f"{SEQUENCE_MODEL} is not a sequence task model: input sequences are not checked")
        return None
    try:
        return _load(mv, task_spec("sequence"), tracking_uri, info)
    except UserError as exc:  # the check is a courtesy: a broken checker must not block the task model
        info(f"{exc}: input sequences are not checked")
        return None


def serving_status(mv, tracking_uri: str, alias: str = CHAMPION_ALIAS) -> str | None:
    """``None`` when the version ``mv`` holds ``alias`` (the champion: it passed every promotion gate), else one line
    saying which version was asked for, why it is not served (refused at promotion with the reasons, never judged) and
    what the champion is, if any.

    A registered version is only a candidate: a quickstart segmenter with Dice 0.095, rightly refused by its gate, still
    had ``@challenger`` and was used to report a tumour volume. Predicting only with champions keeps the promotion gates
    meaningful.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    aliases = client.get_registered_model(mv.name).aliases or {}
    champion = aliases.get(alias)
    if champion is not None and str(champion) == str(mv.version):
        return None
    decision = mv.tags.get("promotion.decision")
    if decision == "rejected":
        reasons = mv.tags.get("promotion.reasons", "no reasons recorded")
        why = f"it was refused at promotion ({reasons[:400]}{'…' if len(reasons) > 400 else ''})"
    elif decision:
        why = f"its promotion decision is '{decision}'"
    else:
        why = "it was never promoted (brainiac promote decides which version serves)"
    has = f"the {alias} is v{champion}" if champion is not None else f"{mv.name} has no {alias}"
    return f"{mv.name} v{mv.version} is not the {alias}: {why}; {has}"


def preprocess_file(path: str | Path, cfg: PreprocessConfig) -> tuple[nib.Nifti1Image, PreprocessResult]:
    """Read one scan and run the single-scan pipeline on it, on one thread like the preprocess job (the same scan gives
    the same volume as its catalog row). The result keeps the ``fixed`` grid outputs and the transform; the
    whole-brain crop and its mask are dropped.

    Raises:
        UserError: the file is not a readable 3-D NIfTI, or its voxels are unusable (NaN, all zero, constant).
    """
    from brainiac.ingestion.preprocess import VoxelDefect, preprocess_scan

    img = read_scan(path)
    try:
        result = preprocess_scan(_voxels(img, str(path)), img.affine, cfg)
    except VoxelDefect as exc:
        raise UserError(f"{path}: {exc}") from exc
    except ValueError as exc:
        raise UserError(f"{path}: {_first_line(exc)}") from exc
    # Models read the fixed cube only; the whole-brain crop is dropped, so many scans can wait in memory together.
    empty = np.zeros((0, 0, 0), np.uint8)
    return img, dataclasses.replace(result, whole=empty.astype(np.float16), mask=empty, labels_whole={})


# ----------------------------------------------------------------------------------------------------------------------
# Predicting.


def _stem(path: str) -> str:
    name = Path(path).name
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE) or "scan"


def _unique(stem: str, taken: set[str]) -> str:
    out, n = stem, 1
    while out in taken:
        n += 1
        out = f"{stem}_{n}"
    taken.add(out)
    return out


def _native_mask(probability: np.ndarray, result: PreprocessResult, img: nib.Nifti1Image) -> np.ndarray:
    """The fixed-grid foreground (probability > 0.5) mapped back onto the input's own grid (nearest neighbour)."""
    from brainiac.ingestion.preprocess import to_native

    matrix = np.asarray(result.transform["matrix"], dtype=np.float64).reshape(4, 4)
    mask = (probability > 0.5).astype(np.uint8)
    return to_native(mask, result.fixed_affine, matrix, img.shape[:3], img.affine, nearest=True)


def _save_mask(mask: np.ndarray, img: nib.Nifti1Image, path: Path, task: str) -> None:
    """Write ``mask`` with the input's header: same shape, affine, qform and sform (codes included)."""
    header = img.header.copy()
    out = type(img)(mask.astype(np.uint8), img.affine, header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1.0, 0.0)
    out.set_qform(img.get_qform(), code=int(img.header["qform_code"]))
    out.set_sform(img.get_sform(), code=int(img.header["sform_code"]))
    out.header["descrip"] = f"brainiac predict {task} mask"[:79].encode()
    out.header["cal_min"], out.header["cal_max"] = 0, 1
    out.to_filename(str(path))


def _headline(p: Prediction, spec: TaskSpec, name: str) -> str:
    what = spec.name.replace("_", " ")
    if spec.kind == "regression":
        return f"{name}: {what} {p.value:.1f} {spec.units}".rstrip()
    if spec.kind == "binary":
        positive = spec.classes[1] if spec.classes else f"> {spec.threshold:g} {spec.units}".rstrip()
        return f"{name}: {what} P({positive}) = {p.probability:.3f} → {p.label}"
    if spec.kind == "multiclass":
        ranked = sorted(p.probabilities.items(), key=lambda kv: -kv[1])
        return f"{name}: {what} {p.label} ({', '.join(f'{c} {v:.2f}' for c, v in ranked)})"
    return f"{name}: tumour volume {p.tumour_volume_ml:.1f} mL · mask {p.mask_path}"


def _check_sequences(
    checker: _Model, case: dict[str, str], prepared: dict[str, tuple[Any, PreprocessResult]], cfg: PreprocessConfig
) -> dict[str, dict[str, Any]]:
    """Run the sequence model on every input of a case; a confident other sequence is a :class:`UserError`."""
    from brainiac.models.tasks.inference import TargetScale, predict

    out: dict[str, dict[str, Any]] = {}
    classes = checker.spec.classes
    for sequence, path in case.items():
        result = prepared[sequence][1]
        if checker.preprocess.version() != cfg.version():
            result = preprocess_file(path, checker.preprocess)[1]
        x = result.fixed.astype(np.float32)[None, None]
        probabilities = predict(checker.module, checker.spec, x, TargetScale())[0]
        top = int(np.argmax(probabilities))
        out[sequence] = {"predicted": classes[top], "probability": float(probabilities[top]), "model": checker.label}
        if classes[top] != sequence and float(probabilities[top]) > SEQUENCE_CHECK_PROBABILITY:
            raise UserError(
                f"{path} looks like {classes[top]} (p={probabilities[top]:.2f} by {checker.label}), not the {sequence} "
                f"passed as {flag_of(sequence)}; give the right file or pass --no-sequence-check"
            )
    return out


def predict_scans(
    cfg: Config,
    model_uri: str,
    inputs: Inputs,
    *,
    out_dir: str | Path = "brainiac-predictions",
    sequence_check: bool = True,
    info: Callable[[str], None] | None = None,
    any_version: bool = False,
) -> list[Prediction]:
    """Predict with the registered task model ``model_uri`` on new scans and write the results to ``out_dir``.

    Args:
        cfg: the run config (only ``tracking`` is read: no catalog, no Ray).
        model_uri: ``models:/brainiac-<task>@ALIAS`` or ``models:/NAME/VERSION``.
        inputs: the cases. A path is one scan (tasks of one sequence, and the sequence task); a mapping
            ``{sequence: path}`` is one multi-sequence case, e.g. ``{"FLAIR": a, "T1ce": b}`` for ``idh``.
        out_dir: one ``<scan>.json`` per case (and ``<scan>_mask.nii.gz`` for segmentation) is written here.
        sequence_check: check each input with the registry's ``brainiac-sequence@champion``, when it has one.
        info: where informational lines go (default: the log).
        any_version: predict with a version that is not the champion (to inspect a refused candidate); a warning
            names why it is not, and every prediction is marked ``champion=False`` with NOT CHAMPION in its headline.

    Returns:
        One :class:`Prediction` per case, in the order given.

    Raises:
        UserError: a missing or unreadable file, a missing sequence flag, an unknown model, a model that is not a task
            model or records no preprocessing, a model that is not its task's champion (unless ``any_version``), or an
            input whose sequence is confidently not the expected one.
    """
    from brainiac.models.tasks.inference import TargetScale, predict
    from brainiac.platform.tracking import use_tracking

    say = info or log.info
    for path in _paths(inputs):  # cheap checks first: a typo should not wait for the registry
        read_scan(path)
    tracking_uri = use_tracking(cfg.tracking)
    version, spec = _resolve(model_uri, tracking_uri)
    cases = _as_cases(spec, inputs)
    model = _load(version, spec, tracking_uri, say)
    not_champion = serving_status(version, tracking_uri)
    if not_champion is not None:
        if not any_version:
            raise UserError(f"{not_champion}. Predict serves champions only; pass --any-version to inspect it anyway")
        say(f"WARNING: {not_champion}. Its outputs below are NOT results of a champion")
    checker = None
    if sequence_check and spec.name != "sequence":
        checker = _sequence_checker(tracking_uri, say)

    prepared: list[dict[str, tuple[Any, PreprocessResult]]] = []
    checks: list[dict[str, dict[str, Any]]] = []
    for case in cases:  # every input is preprocessed and checked before anything is written
        by_sequence = {s: preprocess_file(path, model.preprocess) for s, path in case.items()}
        prepared.append(by_sequence)
        checks.append(_check_sequences(checker, case, by_sequence, model.preprocess) if checker else {})

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    scale = TargetScale(model.mean, model.std)
    taken: set[str] = set()
    predictions: list[Prediction] = []
    for case, by_sequence, check in zip(cases, prepared, checks, strict=True):
        results = [by_sequence[s][1] for s in case]
        x = np.stack([r.fixed.astype(np.float32) for r in results])[None]
        y = predict(model.module, spec, x, scale)[0]
        failed = [f"{s}: {r.qc['qc_reason']}" for s, r in zip(case, results, strict=True) if not r.qc["qc_pass"]]
        p = Prediction(task=spec.name, kind=spec.kind, model=model.label,
                       inputs={s: str(Path(v).expanduser().resolve()) for s, v in case.items()},
                       preprocess_version=model.preprocess.version(), qc_pass=not failed,
                       qc_reason="; ".join(failed) or None, units=spec.units, sequence_check=check,
                       champion=not_champion is None, not_champion=not_champion)  # fmt: skip
        first = next(iter(case.values()))
        stem = _unique(_stem(first), taken)
        if spec.kind == "regression":
            p.value = float(y)
        elif spec.kind == "binary":
            p.probability = float(y)
            decision = p.probability > 0.5
            if spec.classes:
                p.label = spec.classes[int(decision)]
            else:
                p.label = f"{'>' if decision else '≤'} {spec.threshold:g} {spec.units}".rstrip()
        elif spec.kind == "multiclass":
            p.probabilities = {c: float(v) for c, v in zip(spec.classes, y, strict=True)}
            p.label = spec.classes[int(np.argmax(y))]
        else:
            img, result = by_sequence[spec.sequences[0]]
            mask = _native_mask(np.asarray(y), result, img)
            mask_path = out / f"{stem}_mask.nii.gz"
            _save_mask(mask, img, mask_path, spec.name)
            voxel_ml = abs(float(np.linalg.det(np.asarray(img.affine)[:3, :3]))) / 1000.0
            p.tumour_volume_ml = float(np.count_nonzero(mask)) * voxel_ml
            p.mask_path = str(mask_path)
        p.headline = _headline(p, spec, Path(first).name)
        if not_champion is not None:
            p.headline = f"NOT CHAMPION ({model.label}, not a result): {p.headline}"
        p.json_path = str(out / f"{stem}.json")
        Path(p.json_path).write_text(json.dumps(p.as_dict(), indent=2, ensure_ascii=False) + "\n")
        if failed:
            say(f"warning: {Path(first).name} failed preprocessing QC ({p.qc_reason}); treat its prediction with care")
        predictions.append(p)
    return predictions
