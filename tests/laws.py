"""Exact laws of the sampling ops in float64, and goodness-of-fit tests against them."""

import math

import numpy as np
import torch
from scipy import stats


def kept_by_controls(s: torch.Tensor, top_k=None, top_p=None, skip=None) -> torch.Tensor:
    """Which tokens top-k / top-p keep, from scaled logits s [..., V] in float64, one row at a
    time in plain Python: top-k keeps s >= the k-th largest; top-p keeps s >= the value at
    which the descending cumulative mass (of what top-k kept) first reaches top_p. ``skip``
    ([..., V] bool) is left out of both."""
    flat = s.reshape(-1, s.shape[-1])
    skip_flat = None if skip is None else skip.reshape(-1, s.shape[-1])
    kept = torch.ones_like(flat, dtype=torch.bool)
    for r in range(flat.shape[0]):
        values = [
            (float(v), x)
            for x, v in enumerate(flat[r].tolist())
            if skip_flat is None or not bool(skip_flat[r, x])
        ]
        values.sort(key=lambda vx: -vx[0])
        floor = -math.inf
        if top_k and top_k < len(values):
            floor = values[top_k - 1][0]
        if top_p is not None and top_p < 1:
            m = values[0][0]
            pool = [v for v, _ in values if v >= floor]
            total = sum(math.exp(v - m) for v in pool)
            acc = 0.0
            for v in pool:
                acc += math.exp(v - m)
                if acc >= top_p * total:
                    floor = max(floor, v)
                    break
        kept[r] = flat[r] >= floor
    return kept.reshape(s.shape)


def _probs(logits, temperature, barrier, top_k=None, top_p=None, skip=None):
    s = logits.double() / temperature
    p = torch.softmax(s, dim=-1)
    reachable = s >= s.amax(-1, keepdim=True) - barrier
    if top_k or (top_p is not None and top_p < 1):
        reachable &= kept_by_controls(s, top_k, top_p, skip)
    return p, reachable


def jump_law(
    logits, x_t, rate_scale, h, *, barrier=math.inf, temperature=1.0, top_k=None, top_p=None
):
    """P(x_next = x) [B, L, V] of one jump_step (SPEC 2.1 / 2.3; controls as in fsdfm.ops)."""
    p, reachable = _probs(logits, temperature, barrier, top_k, top_p)
    B, L, V = p.shape
    rate = torch.as_tensor(rate_scale, dtype=torch.float64).expand(B)[:, None]
    step = torch.as_tensor(h, dtype=torch.float64).expand(B)[:, None]
    onehot = torch.nn.functional.one_hot(x_t.cpu(), V).bool().to(p.device)
    allowed = reachable & ~onehot
    mass = (p * allowed).sum(-1)
    stay = torch.exp(-step.to(p.device) * rate.to(p.device).clamp_min(0) * mass)
    dest = torch.where(allowed, p, 0.0) / mass.clamp_min(1e-300)[..., None]
    law = (1 - stay)[..., None] * dest
    return law + onehot * stay[..., None]


def sample_law(logits, *, exclude=None, barrier=math.inf, temperature=1.0, top_k=None, top_p=None):
    """P(token = x) [B, L, V] of one sample_categorical."""
    skip = torch.zeros(logits.shape, dtype=torch.bool)
    if isinstance(exclude, torch.Tensor):
        skip = skip.scatter(-1, exclude[..., None].cpu(), True)
    elif exclude is not None:
        skip[..., exclude] = True
    p, reachable = _probs(logits, temperature, barrier, top_k, top_p, skip)
    w = torch.where(reachable & ~skip.to(p.device), p, 0.0)
    return w / w.sum(-1, keepdim=True)


def chisquare_rows(samples: torch.Tensor, law: torch.Tensor, *, min_expected: float = 5.0):
    """Pooled chi-square test that samples [R, N] of N rows follow law [N, V] (R draws per row).

    Per row, categories are merged in order of decreasing probability so that each bin expects at
    least ``min_expected`` draws; the statistics and degrees of freedom of the rows are added (the
    sum of independent chi-squares). Draws of zero-probability tokens fail at once.
    Returns (p_value, statistic, dof).
    """
    samples = samples.cpu().numpy()
    law = law.cpu().double().numpy()
    R = samples.shape[0]
    stat, dof = 0.0, 0
    for n in range(law.shape[0]):
        counts = np.bincount(samples[:, n], minlength=law.shape[1])
        if counts.shape[0] > law.shape[1]:
            raise AssertionError(f"row {n}: token id {samples[:, n].max()} outside the vocabulary")
        impossible = counts[law[n] == 0].sum()
        if impossible:
            raise AssertionError(f"row {n}: {impossible} draws of zero-probability tokens")
        order = np.argsort(-law[n], kind="stable")
        expected = law[n][order] * R
        observed = counts[order]
        bins_e, bins_o, acc_e, acc_o = [], [], 0.0, 0
        for e, o in zip(expected, observed, strict=True):
            acc_e += e
            acc_o += o
            if acc_e >= min_expected:
                bins_e.append(acc_e)
                bins_o.append(acc_o)
                acc_e, acc_o = 0.0, 0
        if bins_e:
            bins_e[-1] += acc_e
            bins_o[-1] += acc_o
        if len(bins_e) < 2:
            continue
        bins_e, bins_o = np.array(bins_e), np.array(bins_o)
        stat += float(((bins_o - bins_e) ** 2 / bins_e).sum())
        dof += len(bins_e) - 1
    if dof == 0:
        return 1.0, stat, dof
    return float(stats.chi2.sf(stat, dof)), stat, dof


def correlated_law(V: int, L: int, seed: int = 0) -> torch.Tensor:
    """A joint law over V^L with strong dependence between positions (far from its product of
    marginals): what an exact sampler must reproduce and a factorised one cannot."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand([V] * L, generator=g, dtype=torch.float64) * 0.2
    for a in range(V):
        q[(a,) * L] += 1.0 + a  # mass on the diagonal: the tokens agree
    return q / q.sum()
