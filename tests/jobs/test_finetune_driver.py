"""The fine-tuning driver's checks before and around the sweep: every hyperparameter draw runs on every seed and is
chosen on all of them, an encoder that does not fit the volumes is refused before any trial, and an encoder pretrained
on this task's validation or test subjects is refused (#19, defects 2, 9 and 11)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from brainiac.jobs.config import load_config
from brainiac.jobs.finetune.data import TaskData, load_task_data
from brainiac.jobs.finetune.run import (
    _search_space,
    check_encoder_fits,
    check_pretraining_leakage,
    select_config,
    tune_config,
)
from brainiac.models.config import BackboneConfig
from brainiac.models.export import read_pretraining_record, resolve_encoder_dir
from brainiac.models.tasks.spec import task_spec
from brainiac.platform.catalog import Catalog
from brainiac.platform.errors import UserError


def _report_lr(config):
    """A trivial Tune trainable: one report whose value is the draw's learning rate."""
    from ray import tune

    tune.report({"epoch": 1, "val": config["lr"]})


@pytest.mark.timeout(300)
def test_every_hyperparameter_draw_runs_on_every_seed(ray_session, tmp_path):
    """Defect 2: with seeds as a grid and sampled hyperparameters, each draw must run on all seeds (before, Tune drew
    new values for every seed, so each hyperparameter group held a single seed)."""
    from ray import tune

    cfg = load_config("tiny", ["finetune.trials=3", "finetune.seeds=[0,1,2]", "finetune.strategy=full"])
    space = _search_space(cfg)
    tuner = tune.Tuner(
        tune.with_resources(_report_lr, {"CPU": 0.1}),
        param_space=space,
        tune_config=tune_config(cfg, "val", "max", concurrent=3),
        run_config=tune.RunConfig(name="constant-grid", storage_path=str(tmp_path), verbose=0),
    )
    grid = tuner.fit()
    seeds_by_lr: dict[float, set[int]] = {}
    for result in grid:
        assert result.error is None
        seeds_by_lr.setdefault(result.config["lr"], set()).add(result.config["seed"])
    assert len(grid) == 9
    assert len(seeds_by_lr) == 3 and all(seeds == {0, 1, 2} for seeds in seeds_by_lr.values())


def test_asha_stops_trials_early_only_in_a_one_seed_sweep():
    """ASHA judges each (config, seed) trial alone: with several seeds it left no config complete on all of them."""
    from ray.tune.schedulers import ASHAScheduler

    one_seed = tune_config(load_config("tiny", ["finetune.trials=3"]), "val", "max", concurrent=1)
    seeds = tune_config(load_config("tiny", ["finetune.trials=3", "finetune.seeds=[0,1]"]), "val", "max", concurrent=1)
    assert isinstance(one_seed.scheduler, ASHAScheduler) and seeds.scheduler is None


def test_selection_needs_every_seed_and_averages_them():
    rows = [
        {"hp": ("a",), "seed": 0, "value": 0.9},  # best single value, but seed 1 was stopped early
        {"hp": ("b",), "seed": 0, "value": 0.7},
        {"hp": ("b",), "seed": 1, "value": 0.5},  # mean 0.6
        {"hp": ("c",), "seed": 0, "value": 0.8},
        {"hp": ("c",), "seed": 1, "value": 0.3},  # mean 0.55
    ]
    best, best_rows = select_config(rows, seeds=2, higher_is_better=True)
    assert best == ("b",) and len(best_rows) == 2
    assert select_config(rows, seeds=2, higher_is_better=False)[0] == ("c",)
    assert select_config(rows[:1], seeds=2, higher_is_better=True) is None


def _task_data(shape: tuple[int, ...]) -> TaskData:
    n = 2
    return TaskData(
        spec=task_spec("sequence"), case_ids=["a", "b"], scan_ids=["a", "b"], subjects=["s1", "s2"],
        datasets=["d", "d"], split=["train", "test"], inputs=np.zeros((n, *shape), np.float16),
        targets=np.zeros(n, np.int64), raw=np.zeros(n), preprocess_version="pv1", volumes_version=0,
    )  # fmt: skip


def test_an_encoder_for_another_size_is_refused_naming_both_sizes_and_a_fix():
    """Defect 11: a 32³ encoder on 96³ volumes died in every Tune worker; now the driver says it in one line."""
    vit32 = BackboneConfig(
        kind="vit", img_size=32, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=3
    )
    with pytest.raises(UserError) as err:
        check_encoder_fits(vit32, _task_data((1, 96, 96, 96)), "models:/brainiac-encoder@candidate")
    message = str(err.value)
    assert "32³" in message and "96x96x96" in message and "pv1" in message
    named = re.search(r"brainiac preprocess --config ([\w/-]+)", message)
    assert named and load_config(named.group(1)).preprocess.fixed_size == 32  # the fix it names really is 32³
    assert "brainiac pretrain --config pretrain/vit-b" in message
    with pytest.raises(UserError, match="input channel"):
        check_encoder_fits(vit32, _task_data((2, 32, 32, 32)), "models:/brainiac-encoder@candidate")
    check_encoder_fits(vit32, _task_data((1, 32, 32, 32)), "models:/brainiac-encoder@candidate")  # fits: no error


@pytest.mark.timeout(900)
def test_finetune_refuses_a_misfit_before_any_trial(pipeline):
    from brainiac.jobs.finetune.run import finetune

    cfg = pipeline.pretrain_config("finetune.task=sequence", "finetune.strategy=scratch", "model.img_size=64")
    with pytest.raises(UserError, match="built for 64³ inputs"):
        finetune(cfg, progress=False)


@pytest.mark.timeout(900)
def test_an_encoder_pretrained_on_held_out_subjects_is_refused(pipeline):
    """Defect 9: the encoder records its pretraining split; a task whose val/test subjects it saw is refused."""
    uri = f"sqlite:///{pipeline.root / 'mlflow.db'}"
    record = read_pretraining_record(resolve_encoder_dir(pipeline.encoder.model_uri, uri))
    cfg = pipeline.pretrain_config("finetune.task=sequence")
    catalog = Catalog.open(cfg.catalog.uri)
    assert record is not None and record["catalog"] == catalog.uri and record["splits"] == ["train"]
    assert record["split_seed"] == cfg.splits.seed and record["img_size"] == 32
    data = load_task_data(catalog, cfg, task_spec("sequence"))
    assert {"val", "test"} & set(data.split)
    assert check_pretraining_leakage(catalog, record, data, cfg.splits.seed) == "verified"
    # An encoder pretrained on every split has seen this task's held-out subjects.
    with pytest.raises(UserError, match="validation/test subjects"):
        check_pretraining_leakage(catalog, {**record, "splits": ["train", "val", "test"]}, data, cfg.splits.seed)
    other = check_pretraining_leakage(catalog, {**record, "catalog": "s3://elsewhere/catalog"}, data, cfg.splits.seed)
    assert other.startswith("unverified")
    assert check_pretraining_leakage(catalog, None, data, cfg.splits.seed).startswith("unverified")
