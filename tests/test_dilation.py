"""The dilated solver (fsdfm.dilation): the order, the counts per step, and the law of a planned
sampler checked exactly against an oracle (chi-square at fixed seeds)."""

import itertools

import pytest
import torch
from laws import chisquare_rows, correlated_law

import fsdfm
from fsdfm.dilation import dilated_order, reveal_ranks
from fsdfm.path import PolynomialSchedule
from fsdfm.synthetic import ExactPosterior, MarkovChain, MarkovPosterior


@pytest.mark.parametrize("length", [*range(1, 40), 64, 100, 128, 1024])
def test_the_order_is_a_permutation(length):
    order = dilated_order(length)
    assert sorted(order.tolist()) == list(range(length))
    assert int(order[0]) == 0


def test_each_power_of_two_run_is_evenly_spread():
    """For L = 2^n the first 2^j positions are the multiples of L / 2^j: every position revealed
    after them lies between two that were revealed before it."""
    order = dilated_order(64)
    for j in range(7):
        first = sorted(order[: 2**j].tolist())
        assert first == list(range(0, 64, 64 // 2**j)), j
    assert dilated_order(32)[:8].tolist() == [0, 16, 8, 24, 4, 20, 12, 28]


def test_ranks_skip_frozen_positions():
    generated = torch.tensor([[True] * 8, [False, True, False, True, True, False, True, True]])
    rank, count = reveal_ranks(generated, 2, 8, "cpu")
    assert count.tolist() == [8.0, 5.0]
    assert rank[0].tolist() == torch.argsort(dilated_order(8)).tolist()
    # Keys of positions 1, 3, 4, 6, 7 in 3 bits: 4, 6, 1, 3, 7.
    assert rank[1][generated[1]].tolist() == [2, 3, 0, 1, 4]
    assert bool((rank[1][~generated[1]] >= 5).all())
    everything, n = reveal_ranks(None, 2, 8, "cpu")
    assert torch.equal(everything, rank[[0, 0]]) and n.tolist() == [8.0, 8.0]


class MaskedCounter:
    """A bare mask-source model with flat logits that records how many positions are masked in
    each row at each call."""

    def __init__(self, V):
        self.V, self.masked = V, []

    def __call__(self, x, t, h):
        self.masked.append((x == self.V).sum(1).tolist())
        logits = torch.zeros(*x.shape, self.V + 1)
        logits[..., self.V] = -torch.inf
        return logits


@pytest.mark.parametrize("exponent", [1.0, 2.0])
@pytest.mark.parametrize(("L", "steps"), [(12, 1), (12, 3), (12, 8), (6, 12), (100, 40)])
def test_each_step_reveals_the_schedule_share_once(L, steps, exponent):
    """round(M kappa_t) positions are revealed by time t, and a revealed token never changes:
    (6, 12) and (100, 40) put M kappa on .5 ties, where a step's upper count and the next
    step's lower count must round alike."""
    V = 5
    generated = torch.ones(3, L, dtype=torch.bool)
    generated[1, :4] = False  # a prompt of 4
    generated[2, ::3] = False  # infilling
    model = MaskedCounter(V)
    init = torch.zeros(3, L, dtype=torch.long)
    schedule = PolynomialSchedule(exponent)
    x, states = fsdfm.sample(
        model, steps, batch_size=3, seq_len=L, source="mask", vocab_size=V + 1, init=init,
        edit_mask=generated, solver="dilated", schedule=schedule, return_trajectory=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert bool((x < V).all()) and bool((x[~generated] == 0).all())
    M = generated.sum(1)
    for k, masked in enumerate(model.masked):
        kappa = schedule.kappa(k / steps)
        want = [int(m) - round(int(m) * kappa) for m in M]
        assert masked == want, (k, masked, want)
    revealed = states[:-1] != V
    assert torch.equal(states[1:][revealed], states[:-1][revealed]), "a revealed token changed"


def planned_law(q: torch.Tensor, groups) -> torch.Tensor:
    """The law over V^L (flattened) of drawing the positions of each group in turn, each one
    independently from q(x_i | the positions R revealed before its group): prod over groups G,
    i in G of q(x_i, x_R) / q(x_R)."""
    V, L = q.shape[0], q.dim()

    def marginal(keep, state):
        drop = [d for d in range(L) if d not in keep]
        m = q.sum(drop) if drop else q
        return float(m[tuple(state[d] for d in sorted(keep))])

    law = torch.zeros(V**L, dtype=torch.float64)
    for index, state in enumerate(itertools.product(range(V), repeat=L)):
        p, revealed = 1.0, set()
        for group in groups:
            below = marginal(revealed, state) if revealed else 1.0
            for i in group:
                p *= marginal(revealed | {i}, state) / below if below > 0 else 0.0
            revealed |= set(group)
        law[index] = p
    return law


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_the_samples_follow_the_planned_law(backend):
    """L = 4 in 2 steps: the dilated order is 0, 2, 1, 3, so the first step draws x_0 and x_2
    from their marginals, the second x_1 and x_3 given them. The chi-square against that law
    passes, and the same samples fail against the left-to-right plan {0, 1}, {2, 3}."""
    n, V, L = 20000, 3, 4
    q = correlated_law(V, L, seed=1)
    model = ExactPosterior(q, "mask")
    x = fsdfm.sample(
        model, 2, batch_size=n, seq_len=L, source="mask", vocab_size=V + 1, solver="dilated",
        backend=backend, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    index = model.joint_index(x)[:, None]
    p, stat, dof = chisquare_rows(index, planned_law(q, [(0, 2), (1, 3)])[None])
    assert p > 1e-4, f"chi-square p = {p:.2e} ({stat:.1f} on {dof} dof)"
    p_wrong, *_ = chisquare_rows(index, planned_law(q, [(0, 1), (2, 3)])[None])
    assert p_wrong < 1e-6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_the_planned_law_on_cuda(cuda_graph):
    """The same law on the GPU, eagerly and with the step captured in a CUDA graph (the counts
    come from the device's step number)."""
    n, V, L = 20000, 3, 4
    q = correlated_law(V, L, seed=1)
    model = ExactPosterior(q, "mask").to("cuda")
    x = fsdfm.sample(
        model, 2, batch_size=n, seq_len=L, source="mask", vocab_size=V + 1, solver="dilated",
        cuda_graph=cuda_graph, device="cuda", generator=torch.Generator("cuda").manual_seed(0),
    )  # fmt: skip
    index = model.joint_index(x).cpu()[:, None]
    p, stat, dof = chisquare_rows(index, planned_law(q, [(0, 2), (1, 3)])[None])
    assert p > 1e-4, f"chi-square p = {p:.2e} ({stat:.1f} on {dof} dof)"


def test_frozen_positions_condition_the_plan():
    """With x_0 and x_2 frozen the plan has two positions: x_1 first, then x_3 given it, which
    is the exact conditional law q(x_1, x_3 | x_0, x_2)."""
    n, V, L = 20000, 3, 4
    q = correlated_law(V, L, seed=2)
    model = ExactPosterior(q, "mask", clean=(0, 2))
    init = torch.tensor([2, 0, 1, 0]).expand(n, L).clone()
    generated = torch.tensor([False, True, False, True]).expand(n, L)
    x = fsdfm.sample(
        model, 2, batch_size=n, seq_len=L, source="mask", vocab_size=V + 1, solver="dilated",
        init=init, edit_mask=generated, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert bool((x[:, 0] == 2).all()) and bool((x[:, 2] == 1).all())
    conditional = q[2, :, 1, :].flatten() / q[2, :, 1, :].sum()
    p, stat, dof = chisquare_rows((x[:, 1] * V + x[:, 3])[:, None], conditional[None])
    assert p > 1e-4, f"chi-square p = {p:.2e} ({stat:.1f} on {dof} dof)"


def test_a_markov_chain_is_sampled_almost_exactly_in_few_steps():
    """The point of the order: with the exact posterior of an order-1 chain, 8 dilated steps
    reach the chain's NLL (only the first four, far-apart positions are drawn jointly
    independent) where the path's random order in as many calls stays far above it."""
    chain = MarkovChain(8, 32, order=1, concentration=0.1, seed=0)
    model = MarkovPosterior(chain, "mask")
    kw = dict(batch_size=2000, seq_len=32, source="mask", vocab_size=9)

    def nll(solver):
        x = fsdfm.sample(model, 8, solver=solver, generator=torch.Generator().manual_seed(0), **kw)
        return float(-chain.log_prob(x).mean()) / 32

    dilated, random = nll("dilated"), nll("dfm")
    assert abs(dilated - chain.expected_nll) < 0.03 * chain.expected_nll, dilated
    assert random > 1.15 * chain.expected_nll, random


def test_dilated_needs_the_mask_source():
    q = correlated_law(3, 3)
    with pytest.raises(ValueError, match="solver='dilated' needs a mask-source model"):
        fsdfm.sample(ExactPosterior(q), 4, seq_len=3, vocab_size=3, solver="dilated")
