"""Save and load models without pickle: weights as plain tensors, architecture as a typed spec, loaded strictly.

Two kinds of model leave a job. A pretrained *encoder* is a folder with ``encoder.pt`` (the encoder's ``state_dict``)
and ``backbone.yaml`` (its :class:`~brainiac.models.config.BackboneConfig`). The same folder is a pretraining
checkpoint's ``encoder/`` part and the artifact registered in MLflow as ``brainiac-encoder``, so downstream jobs accept a
checkpoint path or ``models:/brainiac-encoder@ALIAS`` alike.

A fine-tuned *task model* is the run artifact folder ``model/`` holding ``weights.pt`` (its ``state_dict``: tensors
only) and ``model_spec.json`` (a :class:`ModelSpec`: spec version, architecture, the task spec, the backbone config
and the input shape); the registered version's source is that folder of the run (:func:`save_model_artifacts`,
:func:`load_model_artifacts`). Nothing is ever unpickled: the spec is JSON, the architecture is looked up in a fixed
table (:data:`ARCHITECTURES`, never an import of a name read from the spec), and the weights are read with
``torch.load(weights_only=True)``, which refuses any object but tensors and plain containers. A model logged as an MLflow
pickle (``mlflow.pytorch.log_model``), from which whoever can write the registry gets code run in ``predict`` and
``promote``, is refused with a message to re-log it.

Loading is strict everywhere: a missing or unexpected key is an error that names the keys, never the silent partial
load that ``strict=False`` gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml

from brainiac.models.backbones import Encoder, build_backbone
from brainiac.models.config import BackboneConfig
from brainiac.models.tasks.spec import TaskSpec
from brainiac.platform.errors import ConfigError, UserError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ARCHITECTURES",
    "ENCODER_DIR",
    "MODEL_DIR",
    "SPEC_FILE",
    "SPEC_VERSION",
    "WEIGHTS_FILE",
    "LoadedModel",
    "ModelSpec",
    "build_model",
    "load_encoder",
    "load_model_artifacts",
    "model_version",
    "read_model_folder",
    "read_pretraining_record",
    "resolve_encoder_dir",
    "save_encoder",
    "save_model_artifacts",
    "write_model_folder",
    "write_pretraining_record",
]

ENCODER_DIR = "encoder"
"""Sub-folder of a pretraining checkpoint (and artifact path in MLflow) that holds the exported encoder."""


def save_encoder(folder: str | Path, encoder: Encoder, backbone: BackboneConfig) -> Path:
    """Write ``encoder.pt`` and ``backbone.yaml`` into ``folder`` (created) and return it."""
    from brainiac.platform.config import config_to_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, folder / "encoder.pt")
    (folder / "backbone.yaml").write_text(yaml.safe_dump(config_to_dict(backbone, redact=False), sort_keys=False))
    return folder


PRETRAINING_RECORD = "pretraining.json"
"""File beside ``encoder.pt`` saying which data the encoder was pretrained on (catalog, split seed, splits, table
versions), so that fine-tuning can refuse a task whose validation or test subjects the encoder has already seen."""


def write_pretraining_record(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` (JSON-serialisable provenance of the pretraining data) as ``pretraining.json`` in ``folder``."""
    path = Path(folder) / PRETRAINING_RECORD
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_pretraining_record(folder: str | Path) -> dict[str, Any] | None:
    """The ``pretraining.json`` of an exported encoder folder, or ``None`` when it has none (an encoder from before
    the record existed, or one imported from elsewhere).

    Raises:
        UserError: the file exists but is not a JSON object.
    """
    path = Path(folder) / PRETRAINING_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise UserError(f"{path} must hold a JSON object")
    return record


def model_version(uri: str, tracking_uri: str | None = None):
    """The registered model version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI names (aliases move, the
    version does not, so jobs record this).

    Raises:
        UserError: not a registry URI, or no such model, alias or version.
    """
    if not uri.startswith("models:/"):
        raise UserError(f"expected a registry URI models:/NAME@ALIAS or models:/NAME/VERSION, got {uri}")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    name, _, alias = uri[len("models:/") :].partition("@")
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        name, _, number = name.partition("/")
        return client.get_model_version(name, number)
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"cannot find {uri}: {str(exc).splitlines()[0]}") from exc


def resolve_encoder_dir(ref: str, tracking_uri: str | None = None) -> Path:
    """A local folder holding ``encoder.pt`` for ``ref``: a folder, a pretraining checkpoint or a ``models:/`` URI.

    Raises:
        UserError: the reference does not exist or holds no exported encoder.
    """
    if ref.startswith("models:/") or ref.startswith("runs:/"):
        import mlflow
        from mlflow.exceptions import MlflowException

        if tracking_uri:  # models:/ URIs resolve through the registry, which must be the same store
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
        except MlflowException as exc:
            raise UserError(f"cannot load encoder {ref}: {str(exc).splitlines()[0]}") from exc
    else:
        path = Path(ref).expanduser()
    for candidate in (path, path / ENCODER_DIR):
        if (candidate / "encoder.pt").is_file() and (candidate / "backbone.yaml").is_file():
            return candidate
    raise UserError(f"no exported encoder (encoder.pt + backbone.yaml) at {ref}")


def load_encoder(
    ref: str, tracking_uri: str | None = None, map_location: str = "cpu", backbone: BackboneConfig | None = None
) -> tuple[Encoder, BackboneConfig]:
    """Rebuild the encoder ``ref`` names and load its weights strictly.

    ``ref`` may also be a single checkpoint *file* in BrainIAC's official format (a MONAI ViT state dict, possibly in a
    Lightning checkpoint with ``backbone.``/``module.`` prefixes): it goes through the explicit key map of
    :mod:`brainiac.models.import_brainiac` into ``backbone`` (BrainIAC V2's ViT-B with mean pooling by default).

    Raises:
        UserError: no encoder there, or the weights do not fit the architecture (missing/unexpected keys are listed).
    """
    from brainiac.platform.config import from_dict

    if Path(ref).expanduser().is_file():
        from brainiac.models.import_brainiac import brainiac_v2_backbone, import_brainiac_checkpoint

        backbone = backbone or brainiac_v2_backbone()
        return import_brainiac_checkpoint(Path(ref).expanduser(), backbone), backbone
    folder = resolve_encoder_dir(ref, tracking_uri)
    backbone = from_dict(BackboneConfig, yaml.safe_load((folder / "backbone.yaml").read_text()) or {}, prefix="model")
    encoder = build_backbone(backbone)
    state = _read_state(folder / "encoder.pt", f"encoder {ref}", map_location)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # torch lists the missing and unexpected keys
        raise UserError(
            f"encoder weights at {ref} do not match its backbone: {' '.join(str(exc).split())[:600]}"
        ) from exc
    return encoder, backbone


# ----------------------------------------------------------------------------------------------------------------------
# Task models: weights + typed spec, never a pickle.

MODEL_DIR = "model"
"""Artifact path of a task model in its MLflow run; the registered version's source is this folder of the run."""

SPEC_FILE = "model_spec.json"
"""The :class:`ModelSpec` of a task model, as JSON."""

WEIGHTS_FILE = "weights.pt"
"""The task model's ``state_dict`` (tensors only), written by ``torch.save`` and read with ``weights_only=True``.
(safetensors would be the other choice; it is not a dependency of this project, so the spec's ``weights_format`` is
``torch`` for now and names the reader.)"""

SPEC_VERSION = 1
"""Version of the :class:`ModelSpec` layout this code writes and reads."""

RELOG = "re-log it with `brainiac finetune` (pickled models are never loaded: unpickling can run any code)"


@dataclass
class ModelSpec:
    """What rebuilds a task model without unpickling anything: the architecture, from which typed configs, for which
    input. Written as ``model_spec.json`` beside the weights."""

    architecture: Literal["task_model", "unetr"]
    """Key into :data:`ARCHITECTURES`: ``task_model`` (encoder, mean over sequences, linear head) or ``unetr``
    (MONAI's UNETR on the ViT encoder, segmentation). Any other value is refused, never imported."""

    task: TaskSpec
    """The task the model was trained for, as it was then (kind, classes and outputs shape the head)."""

    backbone: BackboneConfig
    """The encoder's config (kind, sizes, input size)."""

    input_shape: list[int]
    """One case's input, ``[sequences, D, H, W]``; batches are ``(B, *input_shape)``."""

    strategy: Literal["scratch", "linear", "full"] = "scratch"
    """The fine-tuning strategy (``linear`` rebuilds a frozen encoder); provenance, not shape."""

    weights_format: Literal["torch"] = "torch"
    """How ``weights.pt`` is read: ``torch`` = ``torch.load(weights_only=True)`` of a ``str → Tensor`` mapping."""

    weights_sha256: str = ""
    """sha256 of the weights file, checked before it is read (a truncated or swapped file is an error)."""

    spec_version: int = SPEC_VERSION
    """Layout version of this spec; a spec from a newer layout is refused."""

    @classmethod
    def for_task(
        cls,
        task: TaskSpec,
        backbone: BackboneConfig,
        input_shape: tuple[int, ...] | list[int],
        strategy: Literal["scratch", "linear", "full"] = "scratch",
    ) -> ModelSpec:
        """The spec of a :func:`~brainiac.models.tasks.model.build_task_model` model for ``task``.

        Raises:
            ValueError: ``input_shape`` is not ``[sequences, D, H, W]``.
        """
        shape = [int(v) for v in input_shape]
        if len(shape) != 4:
            raise ValueError(f"input_shape is one case's [sequences, D, H, W], got {shape}")
        architecture: Literal["task_model", "unetr"] = "unetr" if task.kind == "segmentation" else "task_model"
        return cls(architecture=architecture, task=task, backbone=backbone, input_shape=shape, strategy=strategy)

    def to_json(self) -> str:
        from brainiac.platform.config import config_to_dict

        return json.dumps(config_to_dict(self, redact=False), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> ModelSpec:
        """Parse and validate a spec (every key, type and choice, via :func:`~brainiac.platform.config.from_dict`).

        Raises:
            UserError: not JSON, an unknown key or value (an unknown architecture included), or a newer layout.
        """
        from brainiac.platform.config import from_dict

        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: {SPEC_FILE} is not JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise UserError(f"{where}: {SPEC_FILE} is not a JSON object")
        version = data.get("spec_version")
        if version != SPEC_VERSION:
            raise UserError(
                f"{where}: model spec version {version!r}, this brainiac reads version {SPEC_VERSION}; {RELOG}"
            )
        try:
            spec = from_dict(cls, data, prefix="model_spec")
        except ConfigError as exc:
            raise UserError(f"{where}: invalid {SPEC_FILE}: {exc}") from exc
        expected = "unetr" if spec.task.kind == "segmentation" else "task_model"
        if spec.architecture != expected:
            raise UserError(f"{where}: architecture {spec.architecture} does not build a {spec.task.kind} model")
        return spec


def _build_task_model(spec: ModelSpec) -> nn.Module:
    from brainiac.models.tasks.model import build_task_model

    return build_task_model(spec.task, spec.backbone, None, spec.strategy)


ARCHITECTURES = {"task_model": _build_task_model, "unetr": _build_task_model}
"""Architecture name → builder. The only constructors a spec can reach; nothing named in a spec is imported."""


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model of ``spec``'s architecture (weights are loaded separately, strictly).

    Raises:
        UserError: the spec names an architecture outside :data:`ARCHITECTURES`.
    """
    builder = ARCHITECTURES.get(spec.architecture)
    if builder is None:
        raise UserError(f"unknown model architecture '{spec.architecture}'; known: {', '.join(ARCHITECTURES)}")
    return builder(spec)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # torch lists the missing and unexpected keys, and shape mismatches
        raise UserError(f"{where}: weights do not match the model spec: {' '.join(str(exc).split())[:600]}") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_model_folder(folder: str | Path, model: nn.Module, spec: ModelSpec) -> Path:
    """Write ``weights.pt`` and ``model_spec.json`` of ``model`` into ``folder`` (created) and return it.

    The model is checked against its spec first (a fresh model of the spec loads its ``state_dict`` strictly), so what
    is written can be loaded.

    Raises:
        UserError: the model's keys or shapes do not match what the spec builds.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _load_strict(build_model(spec), state, f"model for {spec.task.name}")
    torch.save(state, folder / WEIGHTS_FILE)
    spec = replace(spec, weights_format="torch", weights_sha256=_sha256(folder / WEIGHTS_FILE))
    (folder / SPEC_FILE).write_text(spec.to_json())
    return folder


def save_model_artifacts(
    client: Any, run_id: str, model: nn.Module, spec: ModelSpec, artifact_path: str = MODEL_DIR
) -> str:
    """Log ``model`` (weights + spec) under ``artifact_path`` of run ``run_id`` and return the artifact folder's URI, the
    ``source`` to register a model version from (``client.create_model_version(name, source, run_id)``).

    Args:
        client: an ``mlflow.MlflowClient`` of the tracking store.
        run_id: the run that owns the model.
        model: the task model (its ``state_dict`` is saved, never the object).
        spec: how to rebuild it (:meth:`ModelSpec.for_task`).
        artifact_path: folder in the run's artifacts.
    """
    with tempfile.TemporaryDirectory() as tmp:
        write_model_folder(tmp, model, spec)
        client.log_artifacts(run_id, tmp, artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"


@dataclass
class LoadedModel:
    """A task model rebuilt from its spec, in eval mode, with where it came from."""

    module: nn.Module
    spec: ModelSpec
    label: str
    """``NAME/VERSION`` for a registry reference, else the reference itself."""


def read_model_folder(folder: str | Path, where: str | None = None) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model a local folder of :func:`write_model_folder` holds (eval mode).

    Raises:
        UserError: no spec (a pickled MLflow model), an invalid spec, a weights file that fails its checksum or holds
            anything but tensors, or weights that do not fit the architecture (missing/unexpected keys are listed).
    """
    folder = Path(folder)
    where = where or str(folder)
    if not (folder / SPEC_FILE).is_file():
        pickled = (folder / "MLmodel").is_file()
        raise UserError(
            f"{where} has no {SPEC_FILE}"
            + (" (it is a pickled MLflow model)" if pickled else f" and {WEIGHTS_FILE}")
            + f"; {RELOG}"
        )
    spec = ModelSpec.from_json((folder / SPEC_FILE).read_text(), where)
    return _model_from(spec, folder / WEIGHTS_FILE, where), spec


def _read_state(path: Path, where: str, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """A ``state_dict`` read with ``torch.load(weights_only=True)``: tensors and plain containers only.

    Raises:
        UserError: the file holds anything else (a pickled object, code): refused before anything is constructed.
    """
    import pickle

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise UserError(f"{where}: {path.name} is not a plain state_dict of tensors ({_why(exc)})") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{where}: {path.name} is not a mapping of parameter names to tensors")
    return state


def _model_from(spec: ModelSpec, weights: Path, where: str) -> nn.Module:
    if not weights.is_file():
        raise UserError(f"{where}: {WEIGHTS_FILE} is missing beside {SPEC_FILE}; {RELOG}")
    digest = _sha256(weights)
    if digest != spec.weights_sha256:
        raise UserError(f"{where}: {WEIGHTS_FILE} does not match the checksum in {SPEC_FILE} (sha256 {digest[:12]}…)")
    state = _read_state(weights, where)
    model = build_model(spec)
    _load_strict(model, state, where)
    return model.eval()


def _why(exc: BaseException) -> str:
    """The line of a torch.load error that says what was refused (``Unsupported global: GLOBAL builtins.exec ...``)."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line] or [type(exc).__name__]
    chosen = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])
    return chosen.removeprefix("WeightsUnpickler error:").split(". Please")[0].strip()[:200]


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow's artifact download bar off (two small files; on stderr it would break a CLI's one-line error)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def load_model_artifacts(ref: str, tracking_uri: str | None = None) -> LoadedModel:
    """Rebuild the task model ``ref`` names from its spec and load its weights strictly, without unpickling.

    Args:
        ref: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the version's source is its run's ``model/`` folder),
            ``runs:/RUN_ID/model``, or a local folder written by :func:`write_model_folder`.
        tracking_uri: the tracking and registry store (default: MLflow's current one).

    Raises:
        UserError: no such model, a version logged as a pickle or with no spec (re-log it), an invalid spec or unknown
            architecture, a weights file that is not tensors only, or weights with missing/unexpected keys.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if not ref.startswith(("models:/", "runs:/")):
        return LoadedModel(*read_model_folder(Path(ref).expanduser(), ref), label=ref)
    if tracking_uri:  # artifact URIs of a server (mlflow-artifacts:/) resolve through the tracking store
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    label, base = ref, ref
    if ref.startswith("models:/"):
        mv = model_version(ref, tracking_uri)
        label = f"{mv.name}/{mv.version}"
        client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
        base = client.get_model_version_download_uri(mv.name, mv.version)
    where = f"{ref} ({label})" if label != ref else ref
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
        try:
            spec_path = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{SPEC_FILE}", dst_path=tmp)
        except (MlflowException, OSError) as exc:
            try:
                names = {Path(f.path).name for f in mlflow.artifacts.list_artifacts(artifact_uri=base)}
            except (MlflowException, OSError):
                names = set()
            what = "is a pickled MLflow model with" if "MLmodel" in names else "has"
            raise UserError(f"{where} {what} no {SPEC_FILE}; {RELOG}") from exc
        spec = ModelSpec.from_json(Path(spec_path).read_text(), where)
        try:
            weights = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{WEIGHTS_FILE}", dst_path=tmp)
        except (MlflowException, OSError) as exc:
            raise UserError(f"{where}: {WEIGHTS_FILE} is missing beside {SPEC_FILE}; {RELOG}") from exc
        return LoadedModel(_model_from(spec, Path(weights), where), spec, label)
