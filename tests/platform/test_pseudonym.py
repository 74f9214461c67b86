"""Pseudonym key: created once (0600) outside the catalog, stable pseudonyms, fingerprint binding per catalog."""

from __future__ import annotations

import stat

import pytest

from brainiac.platform.errors import UserError
from brainiac.platform.pseudonym import (
    KEY_ENV,
    Pseudonymizer,
    bind_catalog_key,
    config_dir,
    load_or_create_key,
)
from brainiac.platform.storage import StorageLocation


@pytest.fixture
def fresh_config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINIAC_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.delenv(KEY_ENV, raising=False)
    return tmp_path / "cfg"


def test_key_is_created_once_with_mode_0600(fresh_config_dir):
    key = load_or_create_key()
    path = config_dir() / "pseudonym.key"
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key() == key and len(key) == 64


def test_world_readable_key_is_refused(fresh_config_dir):
    load_or_create_key()
    (config_dir() / "pseudonym.key").chmod(0o644)
    with pytest.raises(UserError, match="readable by others"):
        load_or_create_key()


def test_env_key_wins_and_must_be_long(fresh_config_dir, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k" * 32)
    assert load_or_create_key() == b"k" * 32
    assert not (fresh_config_dir / "pseudonym.key").exists()
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(UserError, match="too short"):
        load_or_create_key()


def test_pseudonyms_are_stable_keyed_and_dataset_scoped():
    a, b = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    sid = a.subject_id("ADNI", "002_S_0295")
    assert sid == a.subject_id("ADNI", "002_S_0295") and sid.startswith("sub-") and len(sid) == 24
    assert "0295" not in sid
    assert sid != b.subject_id("ADNI", "002_S_0295")
    assert sid != a.subject_id("OASIS-3", "002_S_0295")


def test_catalog_records_fingerprint_and_refuses_another_key(tmp_path):
    catalog = StorageLocation.resolve(tmp_path / "catalog")
    first, second = Pseudonymizer(b"x" * 32), Pseudonymizer(b"y" * 32)
    fp = bind_catalog_key(catalog, first)
    text = catalog.join("_brainiac/identity.json").read_text()
    assert fp in text and "x" * 32 not in text
    assert bind_catalog_key(catalog, first) == fp
    with pytest.raises(UserError, match="was built with pseudonym key"):
        bind_catalog_key(catalog, second)


@pytest.mark.timeout(120)
def test_fingerprint_binding_on_s3(s3_bucket, s3_options):
    catalog = StorageLocation.resolve(f"s3://{s3_bucket}/catalog", s3_options)
    bind_catalog_key(catalog, Pseudonymizer(b"x" * 32))
    with pytest.raises(UserError, match="was built with pseudonym key"):
        bind_catalog_key(catalog, Pseudonymizer(b"z" * 32))
