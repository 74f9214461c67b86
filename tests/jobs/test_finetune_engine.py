"""The fine-tuning engine on equal terms (#19, defects 7 and 10): a linear probe solved to convergence on cached features
(where 30 Adam steps -- the old linear strategy -- stay far from the optimum), warmup + cosine per step for every
gradient-trained strategy, layer-wise learning-rate decay for ``full``, class-balanced losses, and an F1 operating point
chosen on validation and carried in the head's bias. Tiny encoders and synthetic arrays: no catalog, seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brainiac.jobs.finetune.engine import (
    TargetScale,
    _features,
    _loss_fn,
    _set_operating_point,
    class_weights,
    f1_threshold,
    lr_schedule,
    predict,
    score,
    train_trial,
)
from brainiac.models.backbones import build_backbone
from brainiac.models.config import BackboneConfig
from brainiac.models.tasks.model import TaskModel, build_task_model, encoder_of, parameter_groups
from brainiac.models.tasks.probe import LAMBDAS, fit_probe
from brainiac.models.tasks.spec import task_spec

HP = {"lr": 1e-3, "weight_decay": 1e-4, "dropout": 0.1, "encoder_lr_mult": 1.0, "freeze_depth": 0, "seed": 0}


def _blobs(n: int = 60, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two linearly separable Gaussian classes (means ±2 on every axis), the second one a minority (1/3)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(np.float64)
    x = rng.normal(size=(n, d)) + 2.0 * (2 * y[:, None] - 1)
    return x, y


def _standardised_objective(fit, f: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float):
    """The probe's penalised logistic objective at its solution, written in the standardised space it is solved in
    (the probe returns weights folded back onto raw features), with its parameters as leaf tensors for autograd."""
    f_t = torch.as_tensor(f)
    mean, std = f_t.mean(0), f_t.std(0, unbiased=False)
    z = (f_t - mean) / std
    weight = (fit.weight.double() * std).requires_grad_(True)
    bias = (fit.bias.double() + fit.weight.double() @ mean).requires_grad_(True)
    wt = torch.as_tensor(w)
    per_case = F.binary_cross_entropy_with_logits((z @ weight.T + bias)[:, 0], torch.as_tensor(y), reduction="none")
    objective = (wt * per_case).sum() / wt.sum() + 0.5 * lam * (weight**2).sum() + 0.5e-6 * (bias**2).sum()
    return objective, weight, bias, z


def test_logistic_probe_converges_where_thirty_adam_steps_do_not():
    """L-BFGS reaches a stationary point of the penalised, class-weighted objective (gradient ~ 0); the old linear
    strategy's budget -- 30 Adam steps at lr 1e-3 from a fresh head -- ends with an objective far above it."""
    x, y = _blobs()
    w = np.where(y == 1, len(y) / (2 * y.sum()), len(y) / (2 * (1 - y).sum()))
    lam = 1e-2
    fit = fit_probe("logistic", x, y, sample_weights=w, penalty=lam)
    objective, weight, bias, z = _standardised_objective(fit, x, y, w, lam)
    objective.backward()
    assert float(torch.cat([weight.grad.reshape(-1), bias.grad]).abs().max()) < 1e-5
    # The old way on the same objective.
    head_w = torch.zeros_like(weight).requires_grad_(True)
    head_b = torch.zeros_like(bias).requires_grad_(True)
    adam = torch.optim.Adam([head_w, head_b], lr=1e-3)
    wt, yt = torch.as_tensor(w), torch.as_tensor(y)
    for _ in range(30):
        per_case = F.binary_cross_entropy_with_logits((z @ head_w.T + head_b)[:, 0], yt, reduction="none")
        loss = (wt * per_case).sum() / wt.sum() + 0.5 * lam * (head_w**2).sum()
        adam.zero_grad()
        loss.backward()
        adam.step()
    assert float(loss.detach()) > float(objective.detach()) + 0.3
    # On separable features the converged probe classifies the training draw perfectly.
    assert np.all(((x @ fit.weight.double().numpy().T + fit.bias.double().numpy())[:, 0] > 0) == (y == 1))


@pytest.mark.parametrize("d", [5, 40])  # primal (features < cases) and dual (features > cases) systems
def test_ridge_probe_is_the_closed_form_solution(d):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
    y = x[:, 0] - 0.5 * x[:, 1] + 0.1 * rng.normal(size=20)
    lam = 0.3
    fit = fit_probe("ridge", x, y, penalty=lam)
    z = (x - x.mean(0)) / x.std(0)
    zc, yc = z - z.mean(0), y - y.mean()
    beta = np.linalg.solve(zc.T @ zc / len(y) + lam * np.eye(d), zc.T @ yc / len(y))
    expected = z @ beta + y.mean()
    got = x @ fit.weight.double().numpy()[0] + float(fit.bias)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_cox_probe_is_a_stationary_point_and_orders_risk():
    from brainiac.models.tasks.losses import cox_partial_likelihood_loss

    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 3))
    time = np.exp(-x[:, 0] + 0.3 * rng.normal(size=40))  # higher x0, shorter survival
    event = (rng.uniform(size=40) < 0.8).astype(float)
    lam = 1e-2
    fit = fit_probe("cox", x, time, raw=np.stack([time, event], 1), penalty=lam)
    assert float(fit.weight[0, 0]) > 0  # risk rises with x0
    f_t = torch.as_tensor(x)
    mean, std = f_t.mean(0), f_t.std(0, unbiased=False)
    beta = (fit.weight.double()[0] * std).requires_grad_(True)
    objective = cox_partial_likelihood_loss(((f_t - mean) / std) @ beta, torch.as_tensor(time), torch.as_tensor(event))
    (objective + 0.5 * lam * (beta**2).sum()).backward()
    assert float(beta.grad.abs().max()) < 1e-5


def test_probe_penalty_is_chosen_by_inner_cv_or_falls_back_on_tiny_draws():
    x, y = _blobs(n=30)
    fit = fit_probe("logistic", x, y, seed=0)
    assert set(fit.cv_scores) == set(LAMBDAS) and fit.penalty in LAMBDAS
    assert all(math.isfinite(v) for v in fit.cv_scores.values())
    one_per_class = fit_probe("logistic", x[:2], np.array([0.0, 1.0]))
    assert one_per_class.cv_scores == {} and one_per_class.penalty == 1.0


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}])
    sched = lr_schedule(opt, total_steps=20, warmup_fraction=0.2)
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    head = np.array([s[0] for s in seen])
    np.testing.assert_allclose(head[:4], [0.25, 0.5, 0.75, 1.0])
    cosine = [0.5 * (1 + math.cos(math.pi * k / 16)) for k in range(16)]
    np.testing.assert_allclose(head[4:], cosine, atol=1e-12)
    assert np.all(np.diff(head[4:]) < 0) and head[-1] < 0.01
    np.testing.assert_allclose([s[1] for s in seen], head * 0.1)  # group ratios (layer-wise decay) are kept
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # after the last step


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_layer_decay_gives_earlier_encoder_layers_lower_learning_rates(kind):
    torch.manual_seed(0)
    backbone = BackboneConfig.tiny(kind, num_layers=3)
    model = build_task_model(task_spec("brain_age"), backbone, build_backbone(backbone), "full")
    groups = parameter_groups(model, 1e-3, 0.0, 1.0, "full", layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    encoder = encoder_of(model)
    if kind == "vit":
        vit = encoder.vit
        rates = [lr_of[id(vit.patch_embedding.patch_embeddings.weight)]] + [
            lr_of[id(b.mlp.linear1.weight)] for b in vit.blocks
        ]
        top = lr_of[id(vit.norm.weight)]
        np.testing.assert_allclose([*rates, top], [1e-3 * 0.5 ** (4 - d) for d in range(5)])
    else:
        net = encoder.net
        rates = [lr_of[id(net.conv1.weight)]] + [
            lr_of[id(next(getattr(net, f"layer{i}").parameters()))] for i in range(1, 5)
        ]
        np.testing.assert_allclose(rates, [1e-3 * 0.5 ** (5 - d) for d in range(5)])
    assert lr_of[id(model.head.weight)] == 1e-3  # the head at the full rate
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    scratch = parameter_groups(model, 1e-3, 0.0, 1.0, "scratch", layer_decay=0.5)
    assert {g["lr"] for g in scratch} == {1e-3}  # scratch: every parameter at lr


def _volumes(y: np.ndarray, sequences: int, seed: int) -> np.ndarray:
    """Tiny 32³ volumes whose brightness carries the label (so features separate the classes)."""
    rng = np.random.default_rng(seed)
    x = (
        rng.normal(size=(len(y), sequences, 32, 32, 32)) * 0.5
        + 1.5 * np.asarray(y, dtype=np.float64)[:, None, None, None, None]
    )
    return x.astype(np.float16)


def test_linear_strategy_fits_the_probe_on_frozen_features_and_keeps_the_encoder_bit_identical():
    """``linear``: the head equals the class-balanced probe fitted on the frozen encoder's features; every encoder
    weight is bit-identical and none requires grad; the driver gets one report per epoch, the last at max_epochs."""
    torch.manual_seed(0)
    backbone = BackboneConfig.tiny()
    state = {k: v.clone() for k, v in build_backbone(backbone).state_dict().items()}
    spec = task_spec("idh")  # binary, scored by AUC and F1
    train_y = np.array([1.0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], dtype=np.float32)  # imbalanced 1:3
    val_y = np.array([0.0, 1, 0, 1, 0, 0], dtype=np.float32)
    arrays = {"train_x": _volumes(train_y, 2, 0), "train_y": train_y, "train_raw": train_y.astype(np.float64),
              "val_x": _volumes(val_y, 2, 1), "val_y": val_y, "val_raw": val_y.astype(np.float64)}  # fmt: skip
    reports = []
    fit = train_trial(spec, backbone, state, HP, arrays, strategy="linear", max_epochs=3, batch_size=4, augment=True,
                      report=lambda m, model, scale: reports.append((m, model.head.weight.clone())))  # fmt: skip
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3]
    assert torch.equal(reports[-1][1], fit.model.head.weight)
    assert {"val_auc", "val_f1", "probe_penalty", "decision_threshold"} <= set(reports[-1][0])
    encoder = encoder_of(fit.model)
    assert all(not p.requires_grad for p in encoder.parameters())
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key
    # The head is the probe of the frozen features with balanced class weights (then its bias moved to the threshold).
    features = _features(fit.model, arrays["train_x"], 4)
    w = class_weights(spec, train_y)
    assert w.tolist() == [12 / (2 * 9), 12 / (2 * 3)]
    expected = fit_probe("logistic", features, train_y, sample_weights=w[train_y.astype(int)], seed=0)
    torch.testing.assert_close(fit.model.head.weight, expected.weight)
    assert reports[-1][0]["probe_penalty"] == expected.penalty


def test_full_and_scratch_train_under_the_schedule_and_full_moves_the_encoder():
    torch.manual_seed(0)
    backbone = BackboneConfig.tiny()
    state = {k: v.clone() for k, v in build_backbone(backbone).state_dict().items()}
    spec = task_spec("sequence")
    y = np.array([0, 1, 2, 3, 0, 1], dtype=np.int64)
    arrays = {"train_x": _volumes(y, 1, 0), "train_y": y, "train_raw": y.astype(np.float64),
              "val_x": _volumes(y[:4], 1, 1), "val_y": y[:4], "val_raw": y[:4].astype(np.float64)}  # fmt: skip
    for strategy in ("full", "scratch"):
        fit = train_trial(spec, backbone, state, {**HP, "layer_decay": 0.75}, arrays, strategy=strategy, max_epochs=2,
                          batch_size=2, augment=False)  # fmt: skip
        lrs = [h["lr"] for h in fit.history]
        assert 0 < lrs[0] < HP["lr"] and lrs[-1] == pytest.approx(0.0, abs=1e-12), strategy  # cosine ends at 0
    moved = encoder_of(fit.model).state_dict()
    assert any(not torch.equal(v, state[k]) for k, v in moved.items())


def test_class_weights_balance_ce_and_bce():
    """Each class carries the same total weight: the weighted loss is the mean of the per-class mean losses."""
    idh, sequence = task_spec("idh"), task_spec("sequence")
    y = torch.tensor([0.0] * 8 + [1.0] * 2)
    out = torch.randn(10, 1)
    w = class_weights(idh, y.numpy())
    assert w.tolist() == [10 / 16, 10 / 4]
    per_case = F.binary_cross_entropy_with_logits(out[:, 0], y, reduction="none")
    expected = (per_case[:8].mean() + per_case[8:].mean()) / 2
    torch.testing.assert_close(_loss_fn(idh, w)(out, y, y), expected)
    yc = torch.tensor([0] * 6 + [1] * 3 + [2])  # class 3 absent from the draw: weight 0
    wc = class_weights(sequence, yc.numpy())
    assert wc[3] == 0 and wc[0] * 6 == pytest.approx(wc[2] * 1)
    logits = torch.randn(10, 4)
    per = F.cross_entropy(logits, yc, reduction="none")
    expected = (per[:6].mean() + per[6:9].mean() + per[9:].mean()) / 3
    torch.testing.assert_close(_loss_fn(sequence, wc)(logits, yc, yc), expected)
    assert class_weights(task_spec("brain_age"), np.ones(3)) is None


def test_f1_operating_point_is_chosen_on_data_and_carried_in_the_head_bias():
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.9])
    y = np.array([0, 0, 1, 1, 1])
    t = f1_threshold(p, y)
    assert 0.2 < t < 0.3
    assert f1_threshold(p, np.zeros(5)) == 0.5  # one class: nothing to choose
    torch.manual_seed(0)
    backbone = BackboneConfig.tiny()
    spec = task_spec("idh")
    model = build_task_model(spec, backbone, build_backbone(backbone), "linear")
    assert isinstance(model, TaskModel)
    x = _volumes(np.array([0, 1, 0, 1, 1, 0]), 2, 3)
    yy = np.array([0, 1, 0, 1, 1, 0], dtype=np.float64)
    before = predict(model, spec, x, TargetScale())
    t = f1_threshold(before, yy)
    _set_operating_point(model, spec, t)
    after = predict(model, spec, x, TargetScale())
    np.testing.assert_array_equal(after > 0.5, before > t)
    s_before, s_after = score(spec, before, yy, yy), score(spec, after, yy, yy)
    assert s_after["auc"] == pytest.approx(s_before["auc"])
    assert s_after["f1"] >= s_before["f1"]
