"""Quality of generated token sequences (SPEC 5).

- :func:`generative_perplexity`: each sample scored by an autoregressive language model (the
  paper uses GPT-2 large through `transformers`): per sample exp(mean NLL of tokens 2..L); the
  paper's figure is the mean over samples, the corpus-level exp(mean NLL over all scored tokens)
  is given too.
- :func:`unigram_entropy`: per sample, the entropy (bits) of its token histogram. Low entropy
  with low perplexity means degenerate repetition: report both.
- :func:`exact_nll` and :func:`total_variation`: for synthetic sources whose law is known;
  :func:`transition_entropy`: pair entropy minus unigram entropy of the pooled neighbour pairs,
  the joint structure that unigram entropy misses (sharpening shows there).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fsdfm._args import model_device, positive_int, resolve_device, seeded_generator
from fsdfm.losses import generalized_kl
from fsdfm.path import MixturePath, PolynomialSchedule, check_source, sample_source
from fsdfm.progress import tracked


def _check_tokens(tokens: torch.Tensor, name: str = "tokens") -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
        raise TypeError(f"{name} must be an int64 tensor [N, L]")
    if tokens.numel() and int(tokens.min()) < 0:
        raise ValueError(f"{name} holds negative token ids")
    return tokens


def unigram_entropy(tokens: torch.Tensor) -> torch.Tensor:
    """H_n = -sum_v f_v log2 f_v over the token frequencies f of sample n: [N] float64 bits."""
    tokens = _check_tokens(tokens)
    N, L = tokens.shape
    if L == 0:
        return torch.zeros(N, dtype=torch.float64)
    vocab = int(tokens.max()) + 1
    counts = torch.zeros(N, vocab, dtype=torch.float64, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float64))
    f = counts / L
    return -(torch.where(f > 0, f * torch.log2(f), 0.0)).sum(1).cpu()


def load_scorer(lm, device):
    """A causal LM for scoring: ``lm`` itself or ``from_pretrained(lm)`` for a name or path,
    on ``device`` in eval mode."""
    if isinstance(lm, str):
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(lm)
    return lm.to(device).eval()


@torch.no_grad()
def generative_perplexity(
    tokens: torch.Tensor,
    lm,
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict:
    """Score samples [N, L] (token ids of the scorer's vocabulary) with a causal LM.

    lm: a `transformers` causal LM (anything whose call on input_ids returns ``.logits``
        [B, L, V]) or a name/path for ``AutoModelForCausalLM.from_pretrained`` (loaded once).
    Returns {"mean": mean_n exp(nll_n), "corpus": exp(mean of all token NLLs),
    "per_sample": [N] tensor of exp(nll_n)}, with nll_n the mean NLL of tokens 2..L of sample n.
    """
    tokens = _check_tokens(tokens)
    if tokens.shape[1] < 2:
        raise ValueError("samples need at least 2 tokens: the first one is not scored")
    positive_int(batch_size, "batch_size")
    device = resolve_device(device)
    lm = load_scorer(lm, device)
    vocab = getattr(getattr(lm, "config", None), "vocab_size", None)
    if vocab is not None and int(tokens.max()) >= vocab:
        raise ValueError(
            f"tokens hold id {int(tokens.max())}, outside the scorer's vocabulary of {vocab}"
        )
    chunks = tracked(range(0, tokens.shape[0], batch_size), "generative perplexity",
                     unit="batch", enabled=progress)  # fmt: skip
    nll = []
    for start in chunks:
        ids = tokens[start : start + batch_size].to(device)
        logits = lm(input_ids=ids).logits.float()
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
        )
        nll.append(per_token.double().cpu())
    nll = torch.cat(nll)  # [N, L - 1]
    per_sample = nll.mean(1).exp()
    return {
        "mean": float(per_sample.mean()),
        "corpus": math.exp(float(nll.mean())),
        "per_sample": per_sample,
    }


def exact_nll(tokens: torch.Tensor, log_prob: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """NLL of samples under a known law: ``log_prob(tokens [N, L]) -> [N]`` natural-log
    probabilities. Returns {"mean": mean NLL per sequence, "per_token": mean NLL per token,
    "per_sample": [N]} (nats)."""
    tokens = _check_tokens(tokens)
    lp = log_prob(tokens).double()
    if lp.shape != (tokens.shape[0],):
        raise ValueError(f"log_prob must return [N] = [{tokens.shape[0]}], got {tuple(lp.shape)}")
    nll = -lp.cpu()
    return {
        "mean": float(nll.mean()),
        "per_token": float(nll.mean()) / tokens.shape[1],
        "per_sample": nll,
    }


def entropy_bits(law: torch.Tensor) -> float:
    """-sum p log2 p of a (not necessarily normalised) table of probabilities or counts."""
    p = law.double().flatten()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def transition_entropy(tokens: torch.Tensor, vocab_size: int) -> dict:
    """Joint structure that unigram entropy cannot see, from the pooled neighbour pairs of
    samples [N, L]: {"unigram_entropy_pooled": H(x_i), "pair_entropy": H(x_{i-1}, x_i),
    "transition_entropy": their difference, the plug-in H(x_i | x_{i-1})}, in bits. Sharpening
    a sampler's transitions lowers it while the unigram entropy stays; a sampler that draws
    positions independently raises it to the unigram entropy. Plug-in estimates are biased
    low when the pairs are few against V^2: compare with a reference sampled at the same N
    (e.g. the chain's own samples)."""
    tokens = _check_tokens(tokens).cpu()
    positive_int(vocab_size, "vocab_size")
    if tokens.shape[1] < 2:
        raise ValueError("samples need at least 2 tokens to have neighbour pairs")
    if int(tokens.max()) >= vocab_size:
        raise ValueError(f"tokens hold id {int(tokens.max())} >= vocab_size = {vocab_size}")
    V = vocab_size
    pairs = torch.bincount((tokens[:, :-1] * V + tokens[:, 1:]).flatten(), minlength=V * V)
    unigram = torch.bincount(tokens[:, 1:].flatten(), minlength=V)
    h1, h2 = entropy_bits(unigram), entropy_bits(pairs)
    return {"unigram_entropy_pooled": h1, "pair_entropy": h2, "transition_entropy": h2 - h1}


def total_variation(tokens: torch.Tensor, law: torch.Tensor) -> float:
    """TV distance between the empirical law of whole sequences [N, L] and ``law`` over V^L
    (a tensor of L dimensions of size V, or its flattening in row-major order)."""
    tokens = _check_tokens(tokens)
    law = law.double().flatten().cpu()
    L = tokens.shape[1]
    V = round(law.numel() ** (1 / L)) if L else 1
    if V**L != law.numel():
        raise ValueError(f"law has {law.numel()} entries, not V^L for L = {L}")
    if int(tokens.max()) >= V:
        raise ValueError(f"tokens hold id {int(tokens.max())} >= V = {V}")
    index = (tokens.cpu() * V ** torch.arange(L - 1, -1, -1)).sum(1)
    counts = torch.bincount(index, minlength=law.numel()).double()
    return 0.5 * float((counts / counts.sum() - law).abs().sum())


@torch.no_grad()
def elbo(
    model: Callable,
    tokens: torch.Tensor,
    *,
    n_times: int = 32,
    h: float = 1 / 1024,
    source: str | None = None,
    vocab_size: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    schedule=None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict:
    """The DFM likelihood bound (SPEC 5) of held-out blocks ``tokens`` [N, L]:

        -ln p_model(x_1) <= integral over t in [0, 1] of E_{x_t ~ p_t(. | x_1)} sum_i l_i(t),

    with l the generalized KL of :func:`fsdfm.losses.generalized_kl`, which is exactly the KL
    rate between the conditional path's jump process and the model's (rates kappa_dot/(1 - kappa)
    (delta_{x_1} - delta_{x_t}) against kappa_dot/(1 - kappa) (p_theta - delta_{x_t})); both
    start from the same source, so the path KL bounds -ln p_model(x_1), where p_model is the law
    of the model's continuous-time jump process (the limit of many small steps, not of a few-step
    sampler). The bound is tight only when the conditional paths mix into a Markov process: for an
    exact model with a mask source and independent positions it equals the NLL; with a uniform
    source it stays strictly above (a token that jumped may only have jumped to its target).

    The integral is the midpoint rule on t_k = (k + 1/2) / n_times, k < n_times (deterministic,
    no drift, never t = 1 where the rate diverges), with one x_t per block and t_k drawn from the
    mixture path by a generator seeded with ``seed``: the same call gives the same number.

    model: an fsdfm model or a callable ``model(x_t, t, h) -> logits``; h is the step size passed
        to it: a teacher ignores it, a step-conditioned student is evaluated at ``h`` (default the
        smallest trained step, 1/1024, where it is trained on data like a teacher).
    source, vocab_size: of the path (default: the model's config, else the callable's own
        ``source`` and ``vocab_size`` attributes; a bare callable without them needs them:
        ``vocab_size`` counts the mask token with a mask source).
    Returns {"nats_per_token", "perplexity_bound" (= exp of it), "per_time" [n_times] (the
    integrand per token at each t_k), "times"}.
    """
    tokens = _check_tokens(tokens)
    positive_int(n_times, "n_times")
    if not 0 < h <= 1:
        raise ValueError(f"h must be in (0, 1], got {h!r}")
    positive_int(batch_size, "batch_size")
    # An fsdfm model's config, else the callable's own attributes (the exact posteriors of
    # fsdfm.synthetic carry source and vocab_size).
    config = getattr(model, "config", model)
    source = source or getattr(config, "source", None) or "uniform"
    check_source(source)
    vocab_size = vocab_size or getattr(config, "vocab_size", None)
    if vocab_size is None:
        raise ValueError("pass vocab_size for a model without a config or a vocab_size")
    if int(tokens.max()) >= vocab_size - (source == "mask"):
        raise ValueError(f"tokens hold id {int(tokens.max())}, outside the model's vocabulary")
    device = torch.device(device or model_device(model) or "cpu")
    schedule = schedule or PolynomialSchedule()
    path = MixturePath(schedule)
    generator = seeded_generator(seed, device)
    times = (torch.arange(n_times, dtype=torch.float64) + 0.5) / n_times
    N, L = tokens.shape
    per_time = torch.zeros(n_times, dtype=torch.float64, device=device)  # summed on the device
    chunks = tracked(range(0, N, batch_size), "ELBO", unit="batch", enabled=progress)
    for start in chunks:
        x_1 = tokens[start : start + batch_size].to(device)
        B = x_1.shape[0]
        for k, t_k in enumerate(times.tolist()):
            t = torch.full((B,), t_k, device=device)
            x_0 = sample_source(source, B, L, vocab_size, device=device, generator=generator)
            x_t = path.sample(x_0, x_1, t, generator=generator)
            logits = model(x_t, t, torch.full((B,), h, device=device))
            per_time[k] += generalized_kl(logits, x_1, x_t, t, schedule).double().sum()
    per_time = per_time.cpu() / (N * L)
    nats = float(per_time.mean())
    return {
        "nats_per_token": nats,
        "perplexity_bound": math.exp(nats),
        "per_time": per_time,
        "times": times,
    }
