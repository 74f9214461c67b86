"""Save and load a pretrained encoder: weights plus the backbone config that rebuilds it, loaded strictly.

An exported encoder is a folder with ``encoder.pt`` (the encoder's ``state_dict``) and ``backbone.yaml`` (its
:class:`~brainiac.models.config.BackboneConfig`). The same folder is a pretraining checkpoint's ``encoder/`` part and the
artifact registered in MLflow as ``brainiac-encoder``, so downstream jobs accept a checkpoint path or
``models:/brainiac-encoder@ALIAS`` alike. Loading is strict: a missing or unexpected key is an error that names the
keys, never the silent partial load that ``strict=False`` gives.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from brainiac.models.backbones import Encoder, build_backbone
from brainiac.models.config import BackboneConfig
from brainiac.platform.errors import UserError

__all__ = ["ENCODER_DIR", "load_encoder", "model_version", "resolve_encoder_dir", "save_encoder"]

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
        raise UserError(f"cannot find {uri}: {str(exc).splitlines()[0]}") from None


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
            raise UserError(f"cannot load encoder {ref}: {str(exc).splitlines()[0]}") from None
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
    state = torch.load(folder / "encoder.pt", map_location=map_location, weights_only=True)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # torch lists the missing and unexpected keys
        raise UserError(
            f"encoder weights at {ref} do not match its backbone: {' '.join(str(exc).split())[:600]}"
        ) from None
    return encoder, backbone
