"""Losses of the fine-tuning engine that torch does not provide."""

from __future__ import annotations

import torch

__all__ = ["cox_partial_likelihood_loss"]


def cox_partial_likelihood_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over the events of the batch.

    The survival task's Cox option trains the network's scalar output as a log hazard ratio ``risk`` without modelling
    the baseline hazard (Cox 1972, "Regression models and life-tables", J. R. Stat. Soc. B 34:187-220; used as a deep
    network loss by DeepSurv, Katzman et al. 2018, BMC Med. Res. Methodol. 18:24). For each case i with an event,

        l_i = risk_i - log sum_{j : time_j >= time_i} exp(risk_j),

    i.e. the log-probability that i, rather than anyone else still at risk, is the one who fails at time_i. Censored
    cases only enter through the risk sets. Tied times are handled with Breslow's approximation: every case tied with
    i is in i's risk set. The loss is ``-sum(l_i) / number_of_events``.

    Cases are sorted by time descending so that the risk-set sums are a ``logcumsumexp`` (O(n log n), numerically
    stable); for a group of tied times, every member takes the cumulative value at the group's last position.

    Args:
        risk: (n,) predicted log hazard ratios (higher = shorter expected survival). A trailing singleton dimension
            (n, 1) is accepted.
        time: (n,) observed times (event or censoring).
        event: (n,) 1 when the event was observed, 0 when censored.

    Returns:
        A scalar tensor, differentiable with respect to ``risk``. When the batch has no event the likelihood is empty
        and the loss is 0, still connected to ``risk`` so that ``backward()`` works (with zero gradient).
    """
    if risk.ndim == 2 and risk.shape[1] == 1:
        risk = risk[:, 0]
    if risk.ndim != 1:
        raise ValueError(f"risk must be (n,) or (n, 1), got shape {tuple(risk.shape)}")
    time = torch.as_tensor(time, device=risk.device).reshape(-1)
    event = torch.as_tensor(event, device=risk.device).reshape(-1)
    if not (len(time) == len(event) == len(risk)):
        raise ValueError(f"risk, time and event must have the same length, got {len(risk)}, {len(time)}, {len(event)}")
    event = event.to(risk.dtype)
    n_events = event.sum()
    if n_events.item() == 0:
        return (risk * 0.0).sum()

    order = torch.argsort(time, descending=True, stable=True)
    risk_s = risk[order]
    event_s = event[order]
    neg_time_s = -time[order]  # ascending
    # Last position of each tied-time group: its cumulative sum covers every case with time >= this time.
    group_end = torch.searchsorted(neg_time_s.contiguous(), neg_time_s.contiguous(), right=True) - 1
    log_risk_set = torch.logcumsumexp(risk_s, dim=0)[group_end]
    log_lik = (risk_s - log_risk_set) * event_s
    return -log_lik.sum() / n_events
