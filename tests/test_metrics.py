"""Quality metrics: entropy, generative perplexity (against a hand computation with a tiny
random GPT-2), exact NLL and total variation."""

import math

import pytest
import torch

from fsdfm.metrics import exact_nll, generative_perplexity, total_variation, unigram_entropy


def test_unigram_entropy():
    tokens = torch.tensor([[1, 1, 1, 1], [0, 1, 2, 3], [5, 5, 7, 7]])
    torch.testing.assert_close(
        unigram_entropy(tokens), torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64)
    )
    with pytest.raises(TypeError, match="int64"):
        unigram_entropy(tokens.int())


def tiny_gpt2(vocab=50):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_generative_perplexity_by_hand():
    lm = tiny_gpt2()
    tokens = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(1))
    out = generative_perplexity(tokens, lm, batch_size=2, device="cpu")
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=tokens).logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]  # tokens 2..L
    torch.testing.assert_close(out["per_sample"], nll.mean(1).exp(), rtol=1e-5, atol=0)
    assert out["mean"] == pytest.approx(float(nll.mean(1).exp().mean()), rel=1e-5)
    assert out["corpus"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    assert out["corpus"] <= out["mean"] + 1e-9  # Jensen: mean of exp >= exp of mean
    with pytest.raises(ValueError, match="outside the scorer's vocabulary"):
        generative_perplexity(tokens + 50, lm)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        generative_perplexity(tokens[:, :1], lm)


def test_exact_nll_and_total_variation():
    law = torch.tensor([[0.5, 0.25], [0.125, 0.125]])
    tokens = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]] * 2)
    logp = lambda x: torch.log(law[x[:, 0], x[:, 1]])  # noqa: E731
    out = exact_nll(tokens, logp)
    assert out["mean"] == pytest.approx(-(math.log(0.5) + math.log(0.25) + 2 * math.log(0.125)) / 4)
    assert out["per_token"] == pytest.approx(out["mean"] / 2)
    assert total_variation(tokens, law) == pytest.approx(0.5 * (0.25 + 0 + 0.125 + 0.125))
    assert total_variation(torch.tensor([[0, 0]] * 4), law) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not V\\^L"):
        total_variation(tokens, torch.ones(5))
