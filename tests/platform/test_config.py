"""Typed config: shipped YAML, env defaults, dotted overrides, and errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from brainiac.jobs.config import CONFIG_PACKAGE, Config, available_configs, load_config
from brainiac.platform import config as foundation_config
from brainiac.platform.config import (
    config_to_dict,
    from_dict,
    load_typed,
    shipped_yaml_names,
    with_values,
)
from brainiac.platform.errors import ConfigError


def test_shipped_configs_load_and_tiny_extends_default():
    assert {"default", "tiny"} <= set(available_configs())
    tiny = load_config("tiny")
    assert isinstance(tiny, Config)
    assert tiny.cluster.num_cpus == 4 and tiny.cluster.object_store_memory_mb == 256
    assert tiny.tracking.experiment == "brainiac-tiny"
    assert tiny.cluster.log_level == "WARNING"  # inherited from default via `base:`
    assert (tiny.model.img_size, tiny.model.hidden_size, tiny.model.num_layers) == (32, 48, 2)
    assert load_config("default").model.hidden_size == 768  # production: ViT-B


def test_overrides_are_typed_and_win_over_yaml():
    cfg = load_config("tiny", ["cluster.num_cpus=8", "synth.cohorts=[bids, dicom]", "seed=7", "synth.preset=small"])
    assert cfg.cluster.num_cpus == 8
    assert cfg.synth.cohorts == ["bids", "dicom"]
    assert cfg.seed == 7 and cfg.synth.preset == "small"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cluster.num_cpu=3", r"unknown config key 'cluster.num_cpu'; did you mean 'num_cpus'"),
        ("clusterr.num_cpus=3", r"unknown config key 'clusterr'"),
        ("cluster.num_cpus=many", r"'cluster.num_cpus' expects an integer"),
        ("cluster.num_cpus=0", r"'cluster.num_cpus' must be >= 1"),
        ("cluster.include_dashboard=maybe", r"'cluster.include_dashboard' expects true or false"),
        ("synth.preset=huge", r"'synth.preset' must be one of 'tiny', 'small', 'full'"),
        ("cluster=3", r"'cluster' is a section"),
        ("noequals", r"must look like section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_environment_defaults_and_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAINIAC_CATALOG", "s3://lake/catalog")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("BRAINIAC_STORAGE_OPTIONS", '{"AWS_REGION": "eu-west-1", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}')
    cfg = load_config()
    assert cfg.catalog.uri == "s3://lake/catalog"
    assert cfg.tracking.uri == "http://127.0.0.1:5000"
    assert cfg.catalog.storage_options["AWS_REGION"] == "eu-west-1"
    # YAML beats the environment, and --set beats YAML.
    path = tmp_path / "mine.yaml"
    path.write_text("catalog:\n  uri: /data/catalog\n")
    assert load_config(path).catalog.uri == "/data/catalog"
    assert load_config(path, ["catalog.uri=/other"]).catalog.uri == "/other"
    # Secrets never leave through the printable view.
    assert config_to_dict(cfg)["catalog"]["storage_options"]["AWS_SECRET_ACCESS_KEY"] == "***"


def test_bad_environment_json_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BRAINIAC_STORAGE_OPTIONS", "{not json")
    with pytest.raises(ConfigError, match="BRAINIAC_STORAGE_OPTIONS is not valid JSON"):
        load_config()


def test_config_files_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(loop)


def test_the_foundation_loader_is_told_which_package_ships_the_yaml():
    """The run configs' package is named by the jobs layer (``brainiac.jobs.config``), not by the foundation."""
    assert not hasattr(foundation_config, "CONFIG_PACKAGE") and not hasattr(foundation_config, "available_configs")
    assert CONFIG_PACKAGE == "brainiac.jobs.configs"
    assert available_configs() == shipped_yaml_names(CONFIG_PACKAGE) and "pretrain/tiny" in available_configs()
    assert load_typed(Config, "tiny", ["seed=3"], package=CONFIG_PACKAGE) == load_config("tiny", ["seed=3"])
    with pytest.raises(TypeError, match="package"):
        load_typed(Config, "tiny")  # type: ignore[call-arg]
    # A name is looked up in the package given, here the dataset cards' (a run config is not there).
    with pytest.raises(ConfigError, match=r"unknown config 'tiny'; shipped: .*brats"):
        load_typed(Config, "tiny", package="brainiac.ingestion.datasets")


@dataclass
class Opt:
    lr: float = field(default=1e-3, metadata={"gt": 0.0, "le": 1.0})
    sizes: list[int] = field(default_factory=lambda: [1])


@dataclass
class Root:
    opt: Opt = field(default_factory=Opt)


def test_from_dict_floats_ranges_and_nested_lists():
    assert from_dict(Root, {"opt": {"lr": "1e-4"}}).opt.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert from_dict(Root, {"opt": {"lr": 1}}).opt.lr == 1.0
    with pytest.raises(ConfigError, match=r"'opt.lr' must be > 0.0"):
        from_dict(Root, {"opt": {"lr": 0}})
    with pytest.raises(ConfigError, match=r"'opt.sizes\[1\]' expects an integer"):
        from_dict(Root, {"opt": {"sizes": [1, "x"]}})


def test_credentials_are_redacted_in_printed_configs_and_mlflow_params(capsys):
    """URIs with a password and any option naming a key, token, secret or password never print in clear."""
    from brainiac.jobs.config import load_config
    from brainiac.platform.cli.main import main
    from brainiac.platform.tracking import flatten_params

    overrides = [
        "tracking.uri=https://alice:hunter2@mlflow.example.org",
        "catalog.uri=s3://lake/catalog",
    ]
    cfg = load_config("tiny", overrides)
    cfg.catalog.storage_options = {"azure_storage_account_key": "S3CR3TKEY", "AWS_REGION": "eu-west-1"}
    params = flatten_params(cfg)
    assert params["tracking.uri"] == "https://alice:***@mlflow.example.org"
    assert params["catalog.storage_options.azure_storage_account_key"] == "***"
    assert params["catalog.storage_options.AWS_REGION"] == "eu-west-1"
    assert main(["config", "show", "-c", "tiny", "--set", overrides[0], "--set", overrides[1]]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "alice:***@mlflow.example.org" in out


def test_flags_are_set_on_the_typed_config_never_reparsed_as_yaml():
    from brainiac.platform.cli.common import build_config

    # Through "catalog.uri=0123" text, YAML read the octal 83 and the uri became "83"; "on" became a boolean.
    for uri in ("0123", "on", "1e3", "[a]"):
        assert build_config("tiny", None, catalog=uri).catalog.uri == uri
    cfg = build_config("tiny", ["pretrain.max_steps=7", "catalog.uri=/a"], flags={"pretrain.max_steps": 9},
                       catalog="/b", datasets=["yes", "1", "yes"])  # fmt: skip
    assert (cfg.pretrain.max_steps, cfg.catalog.uri, cfg.catalog.datasets) == (9, "/b", ["yes", "1"])
    assert build_config("tiny", ["pretrain.max_steps=7"], flags={"pretrain.max_steps": None}).pretrain.max_steps == 7


def test_with_values_checks_keys_types_and_ranges_and_leaves_the_original_alone():
    base = load_config("tiny")
    cfg = with_values(base, {"finetune.seeds": [3, 4], "preprocess.fixed_size": 16})
    assert cfg.finetune.seeds == [3, 4] and cfg.preprocess.fixed_size == 16
    assert base.finetune.seeds != [3, 4] and base.preprocess.fixed_size == 32  # a copy, not a mutation
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        with_values(base, {"pretrain.max_step": 1})
    with pytest.raises(ConfigError, match=r"'pretrain\.max_steps' expects an integer"):
        with_values(base, {"pretrain.max_steps": "5"})
    with pytest.raises(ConfigError, match=r"'pretrain\.max_steps' must be >= 1"):
        with_values(base, {"pretrain.max_steps": 0})
    with pytest.raises(ConfigError, match=r"'catalog\.uri' is a value, not a section"):
        with_values(base, {"catalog.uri.x": 1})
