"""NT-Xent with cross-rank negatives on 2 gloo processes equals one process on the concatenated batch.

What equality means here. Let N = world·B and ℓ_i the loss of anchor i. One process computes L = mean over all 2N
anchors. Rank r computes L_r = mean over its 2B anchors, so mean_r(L_r) = L. Because the gather's backward sums the
gradients every rank's loss sends to each block, rank r's input gradient is ∂(Σ_r' L_r')/∂x_r = world · ∂L/∂x_r, and
after DDP averages the parameter gradients they equal ∂L/∂θ of the single process exactly. A naive gather (no backward)
misses the cross-rank terms; the test shows that it does, so the comparison is not vacuous.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from brainiac.models.ssl import NTXentLoss

HERE = Path(__file__).resolve().parent
WORLD = 2
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_worker():
    """Import the worker under a plain module name, so spawned children can unpickle its entry point."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import ntxent_rank_worker

    return ntxent_rank_worker


def _single_process(worker) -> dict[str, torch.Tensor]:
    x1, x2, layer = worker.make_problem()
    x1.requires_grad_(True)
    x2.requires_grad_(True)
    z1, z2 = layer(torch.cat([x1, x2])).chunk(2)
    per_row = NTXentLoss(worker.TEMPERATURE, reduction="none")(z1, z2)
    loss = per_row.mean()
    loss.backward()
    return {
        "loss": loss.detach(),
        "per_row": per_row.detach(),
        "x1_grad": x1.grad,
        "x2_grad": x2.grad,
        "weight_grad": layer.weight.grad,
        "bias_grad": layer.bias.grad,
    }


@pytest.mark.timeout(120)
def test_gathered_ntxent_matches_single_process(tmp_path: Path) -> None:
    worker = _import_worker()
    mp.spawn(worker.run, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ref = _single_process(worker)
    n = worker.GLOBAL_BATCH
    b = n // WORLD

    for r, res in enumerate(ranks):
        exact = res["exact"]
        local = slice(r * b, (r + 1) * b)
        # The rank's loss is the single-process loss averaged over that rank's anchors (its view-1 and view-2 rows).
        rows = torch.cat([torch.arange(r * b, (r + 1) * b), torch.arange(n + r * b, n + (r + 1) * b)])
        torch.testing.assert_close(exact["loss"], ref["per_row"][rows].mean(), **TOL)
        # Input gradients: world × the single-process gradient of this rank's block (losses summed over ranks).
        torch.testing.assert_close(exact["x1_grad"], WORLD * ref["x1_grad"][local], **TOL)
        torch.testing.assert_close(exact["x2_grad"], WORLD * ref["x2_grad"][local], **TOL)
        # Parameter gradients after DDP's averaging: exactly the single-process ones, identical on every rank.
        torch.testing.assert_close(exact["weight_grad"], ref["weight_grad"], **TOL)
        torch.testing.assert_close(exact["bias_grad"], ref["bias_grad"], **TOL)

    mean_loss = torch.stack([res["exact"]["loss"] for res in ranks]).mean()
    torch.testing.assert_close(mean_loss, ref["loss"], **TOL)

    # Negative control: the same forward with a gather that has no backward gives the same loss but wrong gradients.
    for res in ranks:
        torch.testing.assert_close(res["naive"]["loss"], res["exact"]["loss"], **TOL)
        gap = (res["naive"]["weight_grad"] - ref["weight_grad"]).abs().max().item()
        assert gap > 1e-3, f"naive gather should lose the cross-rank gradient terms, max gap {gap}"

    for res in ranks:
        assert "same shape on every rank" in res["mismatch"] and "(2, 6)" in res["mismatch"]
