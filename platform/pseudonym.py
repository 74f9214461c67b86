"""Keyed subject pseudonyms: HMAC-SHA256 of (dataset, source subject id) under a key kept outside every catalog.

A catalog must never hold a source subject id (it can be a hospital number), yet re-ingesting a dataset must give the
same pseudonym so that splits stay stable. A keyed HMAC does both: without the key, pseudonyms cannot be reversed or
recomputed from guessed ids. The key lives in the user's config directory (created on first use, mode 0600) unless
``BRAINIAC_PSEUDONYM_KEY`` provides it (e.g. from a cluster secret). A catalog records only the key's fingerprint, and
opening it with another key is an error rather than a silent second set of subject ids.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from brainiac.platform.errors import UserError
from brainiac.platform.storage import StorageLocation

__all__ = ["KEY_ENV", "Pseudonymizer", "bind_catalog_key", "config_dir", "load_or_create_key"]

KEY_ENV = "BRAINIAC_PSEUDONYM_KEY"
IDENTITY_FILE = "_brainiac/identity.json"
"""Catalog-level file (outside every Delta table) that records the pseudonym key's fingerprint."""


def config_dir() -> Path:
    """The user's brainiac config directory: ``$BRAINIAC_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/brainiac``, else
    ``~/.config/brainiac``."""
    if os.environ.get("BRAINIAC_CONFIG_DIR"):
        return Path(os.environ["BRAINIAC_CONFIG_DIR"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "brainiac"


def load_or_create_key() -> bytes:
    """The pseudonym key: ``$BRAINIAC_PSEUDONYM_KEY`` if set, else the key file, created (mode 0600) on first use."""
    env = os.environ.get(KEY_ENV)
    if env:
        if len(env) < 16:
            raise UserError(f"{KEY_ENV} is too short ({len(env)} characters); use at least 16 random characters")
        return env.encode()
    path = config_dir() / "pseudonym.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process won the race; read its key
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UserError(f"pseudonym key {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    key = path.read_text().strip()
    if len(key) < 16:
        raise UserError(f"pseudonym key file {path} is empty or truncated; restore it from backup")
    return key.encode()


def fingerprint(key: bytes) -> str:
    """A public fingerprint of the key (it reveals nothing usable about the key or the pseudonyms)."""
    return hashlib.sha256(b"brainiac-pseudonym-key-fingerprint\x00" + key).hexdigest()[:16]


@dataclass(frozen=True)
class Pseudonymizer:
    """Maps (dataset, source subject id) to a stable pseudonym ``sub-<20 hex>``."""

    key: bytes

    @classmethod
    def from_environment(cls) -> Pseudonymizer:
        return cls(load_or_create_key())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def subject_id(self, dataset: str, source_subject: str) -> str:
        """Pseudonym of a source subject; the dataset is part of the message so equal ids in two datasets differ."""
        if not dataset or not source_subject:
            raise ValueError(f"dataset and source subject must be non-empty, got {dataset!r}, {source_subject!r}")
        msg = f"{dataset}\x1f{source_subject}".encode()
        return "sub-" + hmac.new(self.key, msg, hashlib.sha256).hexdigest()[:20]


def bind_catalog_key(catalog: StorageLocation, pseudonymizer: Pseudonymizer) -> str:
    """Record the key fingerprint in a new catalog, or check it against an existing one.

    Returns:
        The fingerprint.

    Raises:
        UserError: the catalog was built with another key; mixing keys would split every subject in two.
    """
    ident = catalog.join(IDENTITY_FILE)
    fp = pseudonymizer.fingerprint
    if ident.exists():
        stored = json.loads(ident.read_text()).get("pseudonym_key_fingerprint")
        if stored != fp:
            raise UserError(
                f"catalog {catalog} was built with pseudonym key {stored}, but the current key is {fp}; "
                f"set {KEY_ENV} or restore {config_dir() / 'pseudonym.key'} to the original key"
            )
        return fp
    ident.write_text(json.dumps({"pseudonym_key_fingerprint": fp, "format": 1}, indent=2) + "\n")
    return fp
