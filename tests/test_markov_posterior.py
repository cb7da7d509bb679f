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
