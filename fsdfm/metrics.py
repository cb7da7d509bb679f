"""Quality of generated token sequences (SPEC 5).

- :func:`generative_perplexity`: each sample scored by an autoregressive language model (the
  paper uses GPT-2 large through `transformers`): per sample exp(mean NLL of tokens 2..L); the
  paper's figure is the mean over samples, the corpus-level exp(mean NLL over all scored tokens)
  is given too.
- :func:`unigram_entropy`: per sample, the entropy (bits) of its token histogram. Low entropy
  with low perplexity means degenerate repetition: report both.
- :func:`exact_nll` and :func:`total_variation`: for synthetic sources whose law is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


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


def _load_lm(lm, device):
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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lm = _load_lm(lm, device)
    vocab = getattr(getattr(lm, "config", None), "vocab_size", None)
    if vocab is not None and int(tokens.max()) >= vocab:
        raise ValueError(
            f"tokens hold id {int(tokens.max())}, outside the scorer's vocabulary of {vocab}"
        )
    chunks = range(0, tokens.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="generative perplexity", unit="batch")
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
