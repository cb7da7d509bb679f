"""The exact posterior of a Markov chain by forward-backward (fsdfm.synthetic.MarkovPosterior):
equal to the enumeration over all V^L sequences, and usable as a model by fsdfm.sample."""

import itertools

import pytest
import torch

import fsdfm
from fsdfm.synthetic import MarkovChain, MarkovPosterior


def enumerated_posterior(chain, source, x_t, t):
    """p(x_1^i | x_t) [B, L, V] by summing over every sequence, in float64."""
    V, L = chain.vocab_size, chain.seq_len
    states = torch.tensor(list(itertools.product(range(V), repeat=L)))
    prior = chain.log_prob(states).exp()  # [S]
    kappa = t.double()[:, None, None]
    match = x_t[:, None, :] == states[None]  # [B, S, L]
    if source == "uniform":
        factor = torch.where(match, kappa + (1 - kappa) / V, (1 - kappa) / V)
    else:
        masked = (x_t == V)[:, None, :]
        factor = torch.where(match, kappa, torch.where(masked, 1 - kappa, 0.0))
    post = factor.prod(-1) * prior[None]
    post = post / post.sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(states, V).double()
    return torch.einsum("bs,slv->blv", post, onehot)


@pytest.mark.parametrize("source", ["uniform", "mask"])
@pytest.mark.parametrize("V, L, concentration", [(3, 5, 0.3), (4, 4, 1.0), (2, 7, 0.1)])
def test_forward_backward_equals_enumeration(source, V, L, concentration, device):
    chain = MarkovChain(V, L, order=1, concentration=concentration, seed=V + L)
    model = MarkovPosterior(chain, source).to(device)
    g = torch.Generator().manual_seed(0)
    B = 64
    if source == "uniform":
        x_t = torch.randint(0, V, (B, L), generator=g)
    else:
        # Mask-source states are consistent with some x_1: revealed tokens from a real sample.
        x_1 = chain.sample(B, generator=g)
        x_t = torch.where(torch.rand(B, L, generator=g) < 0.5, x_1, V)
    t = torch.rand(B, generator=g)
    # The ends of the path: t = 0 (pure source: all mask for the mask source) and t = 1 (data).
    t[:2] = torch.tensor([0.0, 1.0])
    if source == "mask":
        x_t[0] = V
        x_t[1] = chain.sample(1, generator=g)[0]
    want = enumerated_posterior(chain, source, x_t, t)
    got = model.posterior(x_t.to(device), t.to(device)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    logits = model(x_t.to(device), t.to(device), None).cpu()
    assert logits.shape == (B, L, V + (source == "mask")) and logits.dtype == torch.float32
    if source == "mask":
        assert bool((logits[..., V] == -torch.inf).all())
    assert model.calls == 1


def test_refusals():
    with pytest.raises(ValueError, match="order-1 chain"):
        MarkovPosterior(MarkovChain(3, 4, order=2))
    with pytest.raises(ValueError, match="source must be"):
        MarkovPosterior(MarkovChain(3, 4, order=1), "noise")
    with pytest.raises(ValueError, match="x_t has length 3, the chain 4"):
        MarkovPosterior(MarkovChain(3, 4, order=1)).posterior(
            torch.zeros(1, 3).long(), torch.ones(1)
        )


def test_as_a_model_many_steps_reach_the_chain():
    """Sampled with many small steps the exact posterior gives the chain's own law (NLL near its
    entropy, pair TV near the chain's own samples'); one step draws positions independently."""
    chain = MarkovChain(8, 12, order=1, concentration=0.3, seed=3)
    model = MarkovPosterior(chain)
    n = 4000

    def scores(steps, solver):
        x = fsdfm.sample(model, steps, batch_size=n, seq_len=12, vocab_size=8, solver=solver,
                         generator=torch.Generator().manual_seed(steps))  # fmt: skip
        return float(-chain.log_prob(x).mean()) / 12, chain.pair_tv(x)

    own = chain.sample(n, generator=torch.Generator().manual_seed(9))
    own_tv = chain.pair_tv(own)
    nll, tv = scores(128, "cumulative")
    assert abs(nll - chain.expected_nll) < 0.03 and tv < own_tv + 0.01
    one_nll, one_tv = scores(1, "cumulative")
    assert one_nll > chain.expected_nll + 0.2 and one_tv > tv + 0.05


# ---------------------------------------------------------------------------------------------
# Metrics that see joint structure, and the temperature frontier


def test_transition_entropy():
    from fsdfm.metrics import transition_entropy

    g = torch.Generator().manual_seed(0)
    independent = torch.randint(0, 4, (4000, 16), generator=g)
    t = transition_entropy(independent, 4)
    assert t["unigram_entropy_pooled"] == pytest.approx(2.0, abs=0.01)
    assert t["transition_entropy"] == pytest.approx(2.0, abs=0.01)
    ramp = (torch.arange(16)[None] + torch.randint(0, 4, (500, 1), generator=g)) % 4
    assert transition_entropy(ramp, 4)["transition_entropy"] == pytest.approx(0.0, abs=1e-12)
    chain = MarkovChain(6, 20, order=1, concentration=0.3, seed=1)
    own = transition_entropy(chain.sample(20000, generator=g), 6)["transition_entropy"]
    assert own == pytest.approx(chain.transition_entropy, abs=0.01)
    with pytest.raises(ValueError, match="vocab_size = 4"):
        transition_entropy(ramp + 1, 4)


def test_temperature_frontier_shows_sharpening():
    """With the exact posterior and many steps, T = 1 reproduces the chain; a lower temperature
    lowers the NLL and the transition entropy together: sharpening, not a gain."""
    from fsdfm.evaluation import temperature_frontier
    from fsdfm.metrics import transition_entropy

    chain = MarkovChain(8, 16, order=1, concentration=0.3, seed=2)
    rows = temperature_frontier(
        MarkovPosterior(chain), (1.0, 0.5), steps=64, n_samples=3000, batch_size=3000,
        metric_fns={
            "nll": lambda x: float(-chain.log_prob(x).mean()) / 16,
            "t": lambda x: transition_entropy(x, 8)["transition_entropy"],
        },
        sample_kwargs={"seq_len": 16, "vocab_size": 8}, progress=False,
    )  # fmt: skip
    warm, cold = rows
    assert warm["temperature"] == 1.0 and cold["temperature"] == 0.5
    assert warm["nll"] == pytest.approx(chain.expected_nll, abs=0.03)
    assert warm["t"] == pytest.approx(chain.transition_entropy, abs=0.05)
    assert cold["nll"] < warm["nll"] - 0.03 and cold["t"] < warm["t"] - 0.04, (warm, cold)


def test_temperature_frontier_over_several_step_counts():
    """One row per temperature and step count, named per temperature when the name asks for it,
    each the row that a frontier at that single step count gives (every configuration draws
    from its own seeded generator)."""
    from fsdfm.evaluation import temperature_frontier

    chain = MarkovChain(5, 8, order=1, concentration=0.3, seed=3)
    common = dict(
        n_samples=200, batch_size=200, progress=False,
        metric_fns={"nll": lambda x: float(-chain.log_prob(x).mean()) / 8},
        sample_kwargs={"seq_len": 8, "vocab_size": 5},
    )  # fmt: skip
    name = "exact, T = {temperature:g}"
    rows = temperature_frontier(MarkovPosterior(chain), (1.0, 0.7), steps=(2, 4), name=name,
                                **common)  # fmt: skip
    assert [(r["model"], r["steps"], r["temperature"]) for r in rows] == [
        ("exact, T = 1", 2, 1.0), ("exact, T = 1", 4, 1.0),
        ("exact, T = 0.7", 2, 0.7), ("exact, T = 0.7", 4, 0.7),
    ]  # fmt: skip
    single = temperature_frontier(MarkovPosterior(chain), (0.7,), steps=4, **common)
    assert single[0]["model"] == "frontier" and single[0]["nll"] == rows[3]["nll"]
    assert rows[2]["nll"] != rows[3]["nll"]
