"""Typed run configuration: nested dataclasses loaded from YAML, environment defaults and dotted CLI overrides.

One :class:`~brainiac.jobs.config.Config` object travels from the command line to the job (torchtitan's ``JobConfig``
style); this module holds the foundation's own sections and the loader, and knows no section of a layer above it. Precedence, lowest
first: dataclass defaults < environment (``BRAINIAC_CATALOG``, ``BRAINIAC_STORAGE_OPTIONS``, ``MLFLOW_TRACKING_URI``,
``RAY_ADDRESS``) < YAML file (a shipped config by name, e.g. ``tiny``, or a path) < ``--set section.key=value`` overrides
< explicit CLI flags such as ``--catalog``.

Every value is checked on load: an unknown key, a wrong type or a value out of range raises :class:`ConfigError` naming the
dotted key, so a typo never silently falls back to a default. Range limits live in field metadata (``ge``, ``gt``, ``le``,
``lt``) next to the field they guard.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from brainiac.platform.errors import ConfigError
from brainiac.platform.fields import bounds

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "CatalogConfig",
    "ClusterConfig",
    "IngestConfig",
    "SynthConfig",
    "TrackingConfig",
    "apply_overrides",
    "config_to_dict",
    "from_dict",
    "load_typed",
    "read_yaml_mapping",
    "redact_uri_credentials",
    "shipped_yaml_names",
    "with_values",
]

DEFAULT_DATA_DIR = "brainiac-data"
"""Where the embedded defaults keep their state, relative to the working directory."""

SECRET_KEYS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "SESSION", "KEY", "CREDENTIAL", "AUTH")
"""Substrings of option names whose values are redacted whenever a config is printed or logged (``*_account_key``,
``AWS_SECRET_ACCESS_KEY``, ``*_token`` ...)."""

_URI_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]+)@")


def redact_uri_credentials(text: str) -> str:
    """``https://user:pass@host/...`` → ``https://user:***@host/...`` (any scheme, anywhere in ``text``)."""
    return _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def _env_json(name: str) -> dict[str, str]:
    raw = os.environ.get(name)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"environment variable {name} is not valid JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"environment variable {name} must be a JSON object of storage options")
    return {str(k): str(v) for k, v in value.items()}


@dataclass
class CatalogConfig:
    """Where the Delta Lake catalog lives and how to reach it."""

    uri: str = field(default_factory=lambda: os.environ.get("BRAINIAC_CATALOG") or f"{DEFAULT_DATA_DIR}/catalog")
    """Local directory or ``s3://bucket/prefix`` holding the catalog's Delta tables. Env: ``BRAINIAC_CATALOG``."""

    storage_options: dict[str, str] = field(default_factory=lambda: _env_json("BRAINIAC_STORAGE_OPTIONS"))
    """Object-store options in deltalake's vocabulary (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ...). Empty means: take
    ``AWS_*`` from the environment. Env: ``BRAINIAC_STORAGE_OPTIONS`` (a JSON object)."""

    allowed_access: list[Literal["open", "registered", "restricted"]] = field(
        default_factory=lambda: ["open", "registered"]
    )
    """Access levels (from the dataset cards) this job may read. Every read of the catalog, SQL included, sees only the
    datasets whose scans are all at these levels; jobs read those and print what they left out, so DUA-restricted data
    never flows into a job that was not configured for it. An in-process filter, not a security boundary: storage
    credentials read every file (docs/access.md shows the IAM policy that enforces the levels)."""

    datasets: list[str] = field(default_factory=list)
    """Datasets a job reads (``--dataset NAME``, repeatable); empty: every dataset it may read. Naming a dataset the
    catalog does not hold, or one at a level outside ``allowed_access``, is an error."""


@dataclass
class TrackingConfig:
    """MLflow tracking and registry."""

    uri: str = field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DATA_DIR}/mlflow.db"
    )
    """MLflow tracking URI: an ``http://`` server or a ``sqlite:///`` file. Env: ``MLFLOW_TRACKING_URI``."""

    experiment: str = "brainiac"
    """Experiment that runs are logged under."""


@dataclass
class ClusterConfig:
    """How a job reaches Ray."""

    address: str = field(default_factory=lambda: os.environ.get("RAY_ADDRESS") or "local")
    """``local`` starts Ray in-process (never joins a stray cluster); ``auto`` or ``host:port`` or ``ray://`` connects.
    Env: ``RAY_ADDRESS``."""

    num_cpus: int | None = field(default=None, metadata=bounds(ge=1))
    """Logical CPUs of a local Ray. More than the physical cores keeps Train, Tune and Data from starving each other."""

    object_store_memory_mb: int | None = field(default=None, metadata=bounds(ge=64))
    """Object-store size of a local Ray in MiB; ``None`` lets Ray choose."""

    include_dashboard: bool = False
    """Start the dashboard with a local Ray (it binds 127.0.0.1). Without it, a local Ray collects no metrics or task
    events (nothing would read them)."""

    workers_per_cpu: int = field(default=2, metadata=bounds(ge=1, le=8))
    """Idle worker processes a local Ray keeps per logical CPU (Ray's ``num_workers_soft_limit``, which by default
    keeps one). The pretraining stream runs ``pretrain.data_tasks_per_cpu`` map tasks per CPU; workers above the limit
    are killed when idle, and every new pass would pay their torch/MONAI import again. A cluster started with
    ``ray start`` takes it from ``RAY_num_workers_soft_limit`` on each node (infra/cluster-launcher/cluster.env)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    """Level of Ray's own driver-side logging."""


@dataclass
class IngestConfig:
    """How ``brainiac ingest`` commits what it harvests."""

    commit_scans: int = field(default=4096, metadata=bounds(ge=1))
    """Harvested scans per commit to ``scans`` and ``quarantine``: a crash keeps every commit made before it, and the
    driver holds at most about this many rows."""

    skip_unchanged: bool = True
    """Skip reading a NIfTI file the catalog already holds from this ingest version when its size is the same and it
    was not modified since its row was written (a re-ingest of an unchanged pool then reads no file). ``false``
    re-reads and re-hashes every file (for a store whose modification times cannot be trusted)."""

    identified_uri: str = field(default_factory=lambda: os.environ.get("BRAINIAC_IDENTIFIED", ""))
    """The identified zone: real source paths ↔ keyed source ids and the full quarantine, read only by ingest (the
    catalog itself holds pseudonyms and content ids only). Empty: ``<catalog.uri>-identified``. On a cloud store, give it
    its own bucket or prefix and credentials. Env: ``BRAINIAC_IDENTIFIED``."""

    identified_storage_options: dict[str, str] = field(default_factory=dict)
    """Object-store options for the identified zone (its own credentials); empty: those of the catalog."""


@dataclass
class SynthConfig:
    """The synthetic multi-site cohort (``brainiac synth``); the generator is ``brainiac.ingestion.synthetic``."""

    subjects: int = field(default=40, metadata=bounds(ge=1, le=100_000))
    """Subjects in total, spread over the cohorts."""

    preset: Literal["tiny", "small", "full"] = "tiny"
    """Voxel size and volume sizes: ``tiny`` (~3 mm, tests), ``small`` (2 mm, quickstart), ``full`` (1 mm, realistic)."""

    cohorts: list[str] = field(default_factory=lambda: ["bids", "brats", "adni", "dicom", "stroke"])
    """Which cohorts to write, each in its own real layout."""

    anatomy_variation: float | None = field(default=None, metadata=bounds(ge=0.0, le=2.0))
    """Strength of the inter-subject anatomy (head size and shape, children's heads, non-linear deformation, atrophy,
    ventricles, tumour mass effect): ``None`` takes the preset's (1.0), 0 gives every subject the template's anatomy
    under a pose and a scale (the generator before version 2), 2 doubles the deformations."""


# --------------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the key.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``. Only lossless conversions are made."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own message is the most precise
            return _coerce(value, candidates[0], key)
        for arg in candidates:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, choices))}; got {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a hint is a class, never a dataclass instance
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' is a section and expects a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, Sequence, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"config key '{key}' expects a path, got {value!r}")
    raise TypeError(f"config key '{key}' has a type the loader does not support: {tp!r}")


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None or not meta:
        return
    values = value if isinstance(value, list | tuple) else [value]
    for v in values:
        if "ge" in meta and v < meta["ge"]:
            raise ConfigError(f"config key '{key}' must be >= {meta['ge']}, got {v!r}")
        if "gt" in meta and v <= meta["gt"]:
            raise ConfigError(f"config key '{key}' must be > {meta['gt']}, got {v!r}")
        if "le" in meta and v > meta["le"]:
            raise ConfigError(f"config key '{key}' must be <= {meta['le']}, got {v!r}")
        if "lt" in meta and v >= meta["lt"]:
            raise ConfigError(f"config key '{key}' must be < {meta['lt']}, got {v!r}")


def _unknown_key_error(key: str, name: str, known: Sequence[str]) -> ConfigError:
    hint = difflib.get_close_matches(name, known, n=1)
    suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key '{key}'{suggestion}")


# Bound so that dataclasses.fields and dataclasses.replace accept it: every config section is a dataclass.
T = typing.TypeVar("T", bound="DataclassInstance")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key, type and range.

    Args:
        cls: the dataclass to build.
        data: plain data, typically parsed YAML.
        prefix: dotted path of ``cls`` inside the root config, used in error messages.

    Raises:
        ConfigError: for an unknown key, a value of the wrong type or a value out of range; the message names the key.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key_error(key, str(name), list(fields))
        kwargs[name] = _coerce(value, hints[name], key)
        _check_range(kwargs[name], fields[name].metadata, key)
    obj = cls(**kwargs)
    for name, f in fields.items():  # defaults (including env-derived ones) are checked too
        if name not in kwargs:
            _check_range(getattr(obj, name), f.metadata, f"{prefix}.{name}" if prefix else name)
    return obj


def with_values(cfg: T, values: Mapping[str, Any]) -> T:
    """A copy of ``cfg`` with dotted keys set to already-typed values (what CLI flags carry), built with
    :func:`dataclasses.replace` so each section's ``__post_init__`` checks run again. Values are checked against the
    field's type and range but never re-parsed as text: ``--catalog 0123`` stays the string ``"0123"`` and a path
    named ``on`` stays a path. ``None`` values (flags not given) are skipped.

    Example:
        >>> from brainiac.jobs.config import load_config
        >>> cfg = with_values(load_config("tiny"), {"catalog.uri": "0123", "pretrain.max_steps": 5})
        >>> cfg.catalog.uri, cfg.pretrain.max_steps
        ('0123', 5)

    Raises:
        ConfigError: an unknown key, or a value of the wrong type or out of range; the message names the key.
    """
    for key, value in values.items():
        if value is not None:
            cfg = _replace_path(cfg, key.split("."), value, key)
    return cfg


def _replace_path(obj: T, parts: Sequence[str], value: Any, key: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(obj) if f.init}
    name = parts[0]
    if name not in fields:
        raise _unknown_key_error(key, name, list(fields))
    if len(parts) == 1:
        typed = _coerce(value, typing.get_type_hints(type(obj))[name], key)
        _check_range(typed, fields[name].metadata, key)
    else:
        section = getattr(obj, name)
        if not dataclasses.is_dataclass(section) or isinstance(section, type):  # a section holds an instance
            raise ConfigError(f"config key '{'.'.join(key.split('.')[: len(key.split('.')) - len(parts) + 1])}' "
                              "is a value, not a section")  # fmt: skip
        typed = _replace_path(section, parts[1:], value, key)
    return dataclasses.replace(obj, **{name: typed})


def config_to_dict(obj: Any, *, redact: bool = True) -> Any:
    """Plain-data view of a config for YAML output and MLflow params. Secret-looking values are redacted."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name), redact=redact) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {
            str(k): (
                "***" if redact and any(s in str(k).upper() for s in SECRET_KEYS) else config_to_dict(v, redact=redact)
            )
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [config_to_dict(v, redact=redact) for v in obj]
    if isinstance(obj, Path):
        obj = str(obj)
    if redact and isinstance(obj, str):
        return redact_uri_credentials(obj)
    return obj


# --------------------------------------------------------------------------------------------------------------------
# Files and overrides.

# The foundation names no package above it, not even as data: whoever loads a config says which package ships the YAML
# (brainiac.jobs.config passes the run configs' package, ingestion its dataset cards, models its task specs).


def shipped_yaml_names(package: str) -> list[str]:
    """Names (without ``.yaml``) of the YAML files shipped as package data in ``package``, one folder deep
    (``tiny``, ``pretrain/tiny``)."""
    names = []
    for entry in resources.files(package).iterdir():
        if entry.name.endswith(".yaml"):
            names.append(entry.name[:-5])
        elif entry.is_dir() and not entry.name.startswith("_"):
            names.extend(f"{entry.name}/{p.name[:-5]}" for p in entry.iterdir() if p.name.endswith(".yaml"))
    return sorted(names)


def read_yaml_mapping(source: str | Path, package: str, kind: str = "config") -> tuple[dict[str, Any], str]:
    """A YAML mapping from a path, or from a file shipped in ``package`` (a dotted package name) by name; returns
    ``(data, origin)``.

    Raises:
        ConfigError: the file or name does not exist, is not YAML, or is not a mapping (the message says which ``kind``).
    """
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{kind} file not found: {path}")
        text, origin = path.read_text(), str(path)
    else:
        ref = resources.files(package).joinpath(*f"{source}.yaml".split("/"))
        if not ref.is_file():
            raise ConfigError(
                f"unknown {kind} '{source}'; shipped: {', '.join(shipped_yaml_names(package))}, or give a .yaml path"
            )
        text, origin = ref.read_text(), f"{source} (shipped)"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{kind} {origin} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} {origin} must be a mapping at the top level")
    return data, origin


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _identity(source: str | Path) -> str:
    path = Path(source)
    return str(path.resolve()) if path.suffix in (".yaml", ".yml") or path.exists() else str(source)


def _load_with_bases(source: str | Path, package: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a config and, recursively, the configs named by its ``base:`` key (a name shipped in ``package`` or a
    relative path)."""
    seen = (*seen, _identity(source))
    data, origin = read_yaml_mapping(source, package)
    base = data.pop("base", None)
    if base is None:
        return data
    base_source: str | Path = str(base)
    if Path(str(base)).suffix in (".yaml", ".yml") and not Path(str(base)).is_absolute():
        base_source = Path(str(source)).parent / str(base)
    if _identity(base_source) in seen:
        raise ConfigError(f"config {origin} has a circular 'base' chain through {base}")
    return _deep_merge(_load_with_bases(base_source, package, seen), data)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to plain config data; values are parsed as YAML scalars or lists."""
    out = _deep_merge({}, data)
    for text in overrides:
        parts, value = _parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def load_typed(cls: type[T], source: str | Path | None = None, overrides: Sequence[str] = (), *, package: str) -> T:
    """Load a config of dataclass ``cls``: a name shipped in ``package`` (a dotted package name whose YAML files are
    package data) or a YAML path (``None`` = defaults), then ``overrides``, then validate everything. The root of a
    job's config is :class:`brainiac.jobs.config.Config`, whose :func:`~brainiac.jobs.config.load_config` calls this
    with the run configs' package; the foundation itself knows no section and no package above it.

    Raises:
        ConfigError: the file is missing or malformed, or a key is unknown, mistyped or out of range.
    """
    data = _load_with_bases(source, package) if source is not None else {}
    data = apply_overrides(data, overrides)
    # Plain "str" values given where the root expects a section read as a section error, not a crash.
    return from_dict(cls, data)
