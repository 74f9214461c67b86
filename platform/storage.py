"""One place that turns a URI (local path or ``s3://bucket/prefix``) into the clients every library wants.

deltalake wants ``storage_options`` in object_store's vocabulary, s3fs/fsspec wants constructor keywords, and Ray Data /
pyarrow want a ``pyarrow.fs.FileSystem`` plus a path without scheme. Deriving all three from one :class:`StorageLocation`
keeps a catalog on local disk and a catalog on S3 (AWS, MinIO, moto) the same code path.

Options come from, in order: the explicit mapping given (``catalog.storage_options`` in the config), else the environment
(``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_ALLOW_HTTP``). Secrets never appear in ``repr`` or ``str``.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from brainiac.platform.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs
    from fsspec import AbstractFileSystem  # by name: the method StorageLocation.fsspec shadows the module in the class

__all__ = [
    "DELTA_RETRY_OPTIONS",
    "S3_MAX_ATTEMPTS",
    "S3_OPTION_KEYS",
    "StorageLocation",
    "s3_options_from_env",
    "storage_error_message",
]

S3_OPTION_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ALLOW_HTTP",
    "AWS_CONDITIONAL_PUT",
    "AWS_S3_ALLOW_UNSAFE_RENAME",
)
"""Options understood for S3; the names are deltalake's (object_store's), the other clients are derived from them."""

_SECRET_OPTION_KEYS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


DELTA_RETRY_OPTIONS = {
    "max_retries": "12",
    "retry_timeout": "120s",
    "backoff_config.init_backoff": "1s",
    "backoff_config.max_backoff": "20s",
}
"""object_store's retry settings for Delta reads and commits on S3 (overridable through ``catalog.storage_options``)."""

S3_MAX_ATTEMPTS = 10
"""Attempts per request of the fsspec (botocore) and pyarrow S3 clients."""

_CREDENTIAL_MARKERS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "lacked the necessary privileges", "AccessDenied")
_UNREACHABLE_MARKERS = ("error sending request", "Connection refused", "connection refused", "dns error",
                        "Could not connect", "EndpointConnectionError", "Connect timeout")  # fmt: skip


def storage_error_message(exc: BaseException) -> str | None:
    """One line for an object-store failure that is not a bug: credentials refused (the user's to fix) or a store that
    stayed unreachable through every retry; ``None`` for anything else. Never quotes a secret (only the error's kind)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        text += f" {type(cause).__name__}: {cause}"
    if any(m in text for m in _CREDENTIAL_MARKERS):
        return (
            "the object store refused the credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
            "catalog.storage_options)"
        )
    if any(m in text for m in _UNREACHABLE_MARKERS):
        return "the object store stayed unreachable through every retry; nothing after the last commit was written"
    return None


def s3_options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """S3 options taken from ``AWS_*`` environment variables (``AWS_DEFAULT_REGION`` counts as ``AWS_REGION``)."""
    env = os.environ if environ is None else environ
    opts = {k: env[k] for k in S3_OPTION_KEYS if env.get(k)}
    if "AWS_REGION" not in opts and env.get("AWS_DEFAULT_REGION"):
        opts["AWS_REGION"] = env["AWS_DEFAULT_REGION"]
    return opts


def _normalize_options(options: Mapping[str, str]) -> dict[str, str]:
    opts = {str(k).upper(): str(v) for k, v in options.items()}
    unknown = sorted(set(opts) - set(S3_OPTION_KEYS))
    if unknown:
        raise UserError(f"unknown storage option(s) {', '.join(unknown)}; known: {', '.join(S3_OPTION_KEYS)}")
    endpoint = opts.get("AWS_ENDPOINT_URL", "")
    if endpoint.startswith("http://"):
        opts.setdefault("AWS_ALLOW_HTTP", "true")
    opts.setdefault("AWS_REGION", "us-east-1")
    return opts


@dataclass(frozen=True)
class StorageLocation:
    """A directory-like location on local disk or in an S3 bucket, with the options to reach it.

    Build one with :meth:`resolve`; then ``delta_storage_options()`` feeds deltalake, ``fsspec()`` gives an s3fs or local
    filesystem, and ``pyarrow_filesystem()`` with ``path`` feeds Ray Data and pyarrow.

    Example:
        >>> loc = StorageLocation.resolve("s3://lake/catalog", {"AWS_ENDPOINT_URL": "http://127.0.0.1:5555"})
        >>> loc.join("scans").uri
        's3://lake/catalog/scans'
    """

    uri: str
    """Normalized URI: an absolute local path, or ``s3://bucket/prefix`` without a trailing slash."""
    options: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def resolve(cls, uri: str | os.PathLike[str], options: Mapping[str, str] | None = None) -> StorageLocation:
        """Normalize ``uri`` and attach storage options (explicit ones, else ``AWS_*`` from the environment for S3).

        Raises:
            UserError: for an empty URI, an unsupported scheme, an S3 URI without a bucket, or an unknown option.
        """
        text = os.fspath(uri).strip()
        if not text:
            raise UserError("empty storage URI; give a local directory or s3://bucket/prefix")
        if text.startswith("s3a://"):
            text = "s3://" + text[len("s3a://") :]
        parsed = urlparse(text)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise UserError(f"S3 URI '{text}' has no bucket; expected s3://bucket/prefix")
            prefix = posixpath.normpath(parsed.path).strip("/") if parsed.path.strip("/") else ""
            norm = f"s3://{parsed.netloc}/{prefix}".rstrip("/")
            opts = _normalize_options(options if options else s3_options_from_env())
            return cls(norm, opts)
        if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
            path = parsed.path if parsed.scheme == "file" else text
            return cls(str(Path(path).expanduser().resolve()), {})
        raise UserError(f"unsupported storage scheme '{parsed.scheme}://' in '{text}'; use a local path or s3://")

    # -- identity ------------------------------------------------------------------------------------------------------
    @property
    def scheme(self) -> Literal["file", "s3"]:
        return "s3" if self.uri.startswith("s3://") else "file"

    @property
    def is_remote(self) -> bool:
        return self.scheme != "file"

    @property
    def path(self) -> str:
        """Path as fsspec and pyarrow want it: ``bucket/prefix`` for S3, the absolute path locally."""
        return self.uri[len("s3://") :] if self.is_remote else self.uri

    @property
    def bucket(self) -> str | None:
        return self.path.split("/", 1)[0] if self.is_remote else None

    def join(self, *parts: str) -> StorageLocation:
        """A location below this one, with the same options."""
        clean = [p.strip("/") for p in parts if p and p.strip("/")]
        if any(p == ".." or p.startswith("../") or "/../" in p for p in clean):
            raise UserError(f"refusing to join a path that climbs out of {self}: {parts}")
        if self.is_remote:
            return StorageLocation("/".join([self.uri, *clean]), self.options)
        return StorageLocation(str(Path(self.uri, *clean)), self.options)

    def __str__(self) -> str:
        return self.uri

    def redacted_options(self) -> dict[str, str]:
        """Options safe to print or log: secrets are replaced with ``***``."""
        return {k: ("***" if k in _SECRET_OPTION_KEYS else v) for k, v in self.options.items()}

    # -- clients -------------------------------------------------------------------------------------------------------
    def delta_storage_options(self) -> dict[str, str] | None:
        """``storage_options`` for deltalake (``DeltaTable``, ``write_deltalake``) and Ray's ``read_delta``, with a retry
        policy that rides out an object store unreachable for up to about two minutes (object_store's default gives up
        after ~3-7 s, failing a commit mid-job); the user's own settings win."""
        if not self.is_remote:
            return None
        return {**DELTA_RETRY_OPTIONS, **self.options}

    def fsspec(self) -> AbstractFileSystem:
        """An fsspec filesystem (s3fs for S3). Use it with :attr:`path`-style paths."""
        return self._fsspec

    @cached_property
    def _fsspec(self) -> AbstractFileSystem:
        import fsspec

        if not self.is_remote:
            return fsspec.filesystem("file")
        import s3fs

        o = self.options
        client_kwargs = {"region_name": o.get("AWS_REGION")}
        if o.get("AWS_ENDPOINT_URL"):
            client_kwargs["endpoint_url"] = o["AWS_ENDPOINT_URL"]
        return s3fs.S3FileSystem(
            config_kwargs={"retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}},
            key=o.get("AWS_ACCESS_KEY_ID"),
            secret=o.get("AWS_SECRET_ACCESS_KEY"),
            token=o.get("AWS_SESSION_TOKEN"),
            client_kwargs=client_kwargs,
            anon=False,
        )

    def pyarrow_filesystem(self) -> pyarrow.fs.FileSystem:
        """A pyarrow filesystem for Ray Data readers and pyarrow datasets; pair it with :attr:`path`."""
        import pyarrow.fs as pafs

        if not self.is_remote:
            return pafs.LocalFileSystem()
        o = self.options
        endpoint = o.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, object] = {
            "access_key": o.get("AWS_ACCESS_KEY_ID"),
            "secret_key": o.get("AWS_SECRET_ACCESS_KEY"),
            "session_token": o.get("AWS_SESSION_TOKEN"),
            "region": o.get("AWS_REGION"),
        }
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or endpoint
            kwargs["scheme"] = parsed.scheme or "https"
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)
        return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})

    # -- small conveniences ----------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.fsspec().exists(self.path))

    def makedirs(self) -> None:
        """Create the directory (locally) or make sure the bucket exists (S3 has no directories)."""
        fs = self.fsspec()
        if self.is_remote:
            if not fs.exists(self.bucket):
                raise UserError(
                    f"S3 bucket '{self.bucket}' does not exist or is not reachable at {self.options.get('AWS_ENDPOINT_URL', 'AWS')}"
                )
            return
        fs.makedirs(self.path, exist_ok=True)

    def read_text(self) -> str:
        with self.fsspec().open(self.path, "r") as fh:
            return fh.read()

    def write_text(self, text: str) -> None:
        fs = self.fsspec()
        if not self.is_remote:
            fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        with fs.open(self.path, "w") as fh:
            fh.write(text)
