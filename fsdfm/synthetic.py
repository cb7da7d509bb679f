"""Synthetic laws with a known answer, for measuring few-step samplers exactly (the small
reproductions of the paper's claim in docs/results.md, and the tests):

- :func:`checkerboard_law`, :func:`checkerboard_scores`: the 2-D checkerboard of the paper's
  figure as a law over V^2 and the scores of samples against it (total variation per cell and
  per block, with the floor that sampling noise alone gives, and the mass on the black squares);
- :class:`ExactPosterior`: the exact denoiser p_{1|t}(x^i | x_t) of a small joint law, a model
  that knows the answer: what any few-step sampler reaches with a perfect teacher;
- :class:`MarkovChain`: a random Markov chain of order 1 or 2 over V symbols, its samples, its
  exact log-probability (for :func:`fsdfm.metrics.exact_nll`) and its pair law;
- :class:`MarkovPosterior`: the exact denoiser of an order-1 chain by forward-backward, for
  any length: the exact cap of any solver at any step count is one ``fsdfm.sample`` call;
- :func:`symbol_tokenizer`, :func:`write_sequences`: the symbols of these problems as a
  tokenizer and training sequences as a token file, so that ``fsdfm pretrain`` trains on them.
  The CPU-sized model presets for them are ``toy-pairs`` and ``toy-chain``
  (:data:`fsdfm.model.PRESETS`).
"""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import torch

from fsdfm.data import write_token_file
from fsdfm.metrics import entropy_bits, total_variation

__all__ = [
    "ExactPosterior",
    "MarkovChain",
    "MarkovPosterior",
    "checkerboard_law",
    "checkerboard_scores",
    "symbol_tokenizer",
    "tv_noise_floor",
    "write_sequences",
]


# ----------------------------------------------------------------------------------------------
# The checkerboard


def checkerboard_law(vocab_size: int = 128, squares: int = 8) -> torch.Tensor:
    """The law [V, V] (float64) of (x, y) uniform on the black squares of a ``squares`` x
    ``squares`` checkerboard laid over the V x V grid: cell (x, y) is black when
    (x // s + y // s) is even, s = V / squares cells per square side. Half the cells are black,
    and both marginals are uniform: only the joint law tells the board from noise."""
    if vocab_size % squares:
        raise ValueError(f"squares = {squares} must divide vocab_size = {vocab_size}")
    side = vocab_size // squares
    block = torch.arange(vocab_size) // side
    black = (block[:, None] + block[None, :]) % 2 == 0
    return black.double() / black.sum()


def _coarsen(law: torch.Tensor, factor: int) -> torch.Tensor:
    V = law.shape[0]
    return law.reshape(V // factor, factor, V // factor, factor).sum((1, 3))


def tv_noise_floor(law: torch.Tensor, n: int, *, repeats: int = 3, seed: int = 0) -> float:
    """Mean total variation between ``law`` (any shape) and the empirical law of n exact draws
    from it: what a perfect sampler scores with n samples."""
    flat = law.double().flatten()
    g = torch.Generator().manual_seed(seed)
    tvs = []
    for _ in range(repeats):
        counts = torch.bincount(
            torch.multinomial(flat, n, replacement=True, generator=g), minlength=flat.numel()
        )
        tvs.append(0.5 * float((counts.double() / n - flat).abs().sum()))
    return sum(tvs) / len(tvs)


def checkerboard_scores(
    tokens: torch.Tensor, law: torch.Tensor, *, block: int = 8
) -> dict[str, float]:
    """Scores of samples [n, 2] against the checkerboard ``law`` [V, V]:

    tv: total variation per cell (V^2 cells; needs n >> V^2 / 2 samples before it falls near 0),
    tv_block: per block of ``block`` x ``block`` cells (less sampling noise),
    tv_floor, tv_block_floor: what exact draws of the same n score (the sampling-noise floor),
    black: the share of samples on black squares (1 for the law, 1/2 for independent uniform
    coordinates: the marginals alone cannot place a point)."""
    if tokens.dim() != 2 or tokens.shape[1] != 2:
        raise ValueError(f"checkerboard samples are [n, 2], got {tuple(tokens.shape)}")
    n = tokens.shape[0]
    coarse = _coarsen(law, block)
    return {
        "tv": total_variation(tokens, law),
        "tv_floor": tv_noise_floor(law, n),
        "tv_block": total_variation(torch.div(tokens, block, rounding_mode="floor"), coarse),
        "tv_block_floor": tv_noise_floor(coarse, n),
        "black": float((law[tokens[:, 0], tokens[:, 1]] > 0).double().mean()),
    }


# ----------------------------------------------------------------------------------------------
# Exact denoisers


class ExactPosterior:
    """The exact posterior marginals p_{1|t}(x^i | x_t) of the mixture path (kappa_t = t) for a
    small joint law q over V^L: a callable ``model(x_t, t, h) -> logits [B, L, V(+1)]`` that
    ignores h. Sampling it with any solver shows what that solver reaches with a perfect teacher.

    q: target probabilities [V] * L (a tensor of L dimensions of size V). With ``source="mask"``
    the vocabulary gains the mask token (id V), whose logit is -inf. ``clean``: positions known to
    hold data (a prompt), observed exactly rather than through the path. ``calls`` counts calls.
    """

    def __init__(self, q: torch.Tensor, source: str = "uniform", clean: tuple[int, ...] = ()):
        self.q = q.double() / q.double().sum()
        self.clean = torch.zeros(q.dim(), dtype=torch.bool)
        self.clean[list(clean)] = True
        self.L, self.V = q.dim(), q.shape[0]
        self.source = source
        self.states = torch.tensor(list(itertools.product(range(self.V), repeat=self.L)))
        self.calls = 0

    def to(self, device) -> ExactPosterior:
        """Move the tables, so that the oracle runs (and can be captured) on a GPU."""
        self.q, self.states, self.clean = (v.to(device) for v in (self.q, self.states, self.clean))
        return self

    @property
    def vocab_size(self) -> int:
        return self.V + 1 if self.source == "mask" else self.V

    def __call__(self, x_t, t, h):
        self.calls += 1
        kappa = t.double()[:, None, None]  # kappa_t = t
        match = x_t[:, None, :] == self.states[None]  # [B, S, L]
        if self.source == "uniform":
            factor = torch.where(match, kappa + (1 - kappa) / self.V, (1 - kappa) / self.V)
        else:
            masked = (x_t == self.V)[:, None, :]
            factor = torch.where(match, kappa, torch.where(masked, 1 - kappa, 0.0))
        factor = torch.where(self.clean, match.double(), factor)
        post = factor.prod(-1) * self.q.flatten()[None]  # [B, S]
        total = post.sum(-1, keepdim=True)
        # With the mask source a sampler that draws positions independently can reveal tokens
        # that the law never shows together (total = 0), where the posterior is undefined: the
        # masked positions then fall back to their prior marginals, and a revealed position is
        # its own posterior under any law (the mask path reveals x_1 itself).
        prior = self.q.flatten()[None].expand_as(post)
        post = torch.where(total > 0, post / total.clamp_min(1e-300), prior)
        onehot = torch.nn.functional.one_hot(self.states, self.V).double()  # [S, L, V]
        marginals = torch.einsum("bs,slv->blv", post, onehot)
        if self.source == "mask":
            revealed = (x_t != self.V)[..., None]
            own = torch.nn.functional.one_hot(x_t.clamp_max(self.V - 1), self.V).double()
            marginals = torch.where(revealed, own, marginals)
            marginals = torch.cat([marginals, torch.zeros_like(marginals[..., :1])], -1)
        return torch.log(marginals).float()

    def joint_index(self, x: torch.Tensor) -> torch.Tensor:
        """Flat index of each sequence x [B, L] in q.flatten()."""
        weights = self.V ** torch.arange(self.L - 1, -1, -1, device=x.device)
        return (x * weights).sum(-1)

    def product_of_marginals(self) -> torch.Tensor:
        out = torch.ones(())
        for i in range(self.L):
            dims = [d for d in range(self.L) if d != i]
            m = self.q.sum(dims) if dims else self.q
            out = out[..., None] * m
        return out.flatten()


class MarkovPosterior:
    """The exact posterior marginals p_{1|t}(x^i | x_t) of the mixture path (kappa_t = t) for an
    order-1 :class:`MarkovChain`, by forward-backward: a callable ``model(x_t, t, h) -> logits
    [B, L, V(+1)]`` that ignores h, exact for any L (``ExactPosterior`` enumerates V^L states).
    Sampling it with a solver at a step count gives that solver's exact cap there: what a
    perfect teacher reaches when the positions of a step are drawn independently.

    With x_t observed through the path, position i emits e_i(a) = P(x_t^i | x_1^i = a):
    kappa [a = x_t^i] + (1 - kappa) / V (uniform source), or kappa [a = x_t^i] for a revealed
    token and 1 - kappa for the mask (mask source, mask id V, whose logit is -inf). Then, with
    the chain's uniform start pi and transitions P,

        alpha_1 = pi * e_1,   alpha_i = (alpha_{i-1} P) * e_i,
        beta_L = 1,           beta_i = P (e_{i+1} * beta_{i+1}),
        p_{1|t}(x^i = a | x_t) = alpha_i(a) beta_i(a) / sum_b alpha_i(b) beta_i(b),

    each vector renormalised as it goes (the scale cancels), batched over B in float64: 2 L
    products of [B, V] by [V, V] per call. ``calls`` counts the calls.
    """

    def __init__(self, chain: MarkovChain, source: str = "uniform"):
        if chain.order != 1:
            raise ValueError(
                f"MarkovPosterior needs an order-1 chain (forward-backward over V states), got "
                f"order {chain.order}"
            )
        if source not in ("uniform", "mask"):
            raise ValueError(f"source must be 'uniform' or 'mask', got {source!r}")
        self.chain, self.source = chain, source
        self.V, self.L = chain.vocab_size, chain.seq_len
        self.P = chain.table.double()
        self.calls = 0

    def to(self, device) -> MarkovPosterior:
        """Move the transition table (the calls then run where x_t is)."""
        self.P = self.P.to(device)
        return self

    @property
    def vocab_size(self) -> int:
        return self.V + 1 if self.source == "mask" else self.V

    def emissions(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """e [B, L, V]: P(x_t^i | x_1^i = a) under the path at time t (kappa_t = t)."""
        kappa = t.double().to(x_t.device)[:, None, None]
        own = torch.nn.functional.one_hot(x_t.clamp_max(self.V - 1), self.V).double()
        if self.source == "uniform":
            return kappa * own + (1 - kappa) / self.V
        masked = (x_t == self.V)[..., None]
        return torch.where(masked, (1 - kappa).expand_as(own), kappa * own)

    def posterior(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """p_{1|t}(x^i = a | x_t) [B, L, V] in float64."""
        B, L = x_t.shape
        if L != self.L:
            raise ValueError(f"x_t has length {L}, the chain {self.L}")
        e = self.emissions(x_t, t)
        P = self.P.to(x_t.device)
        alpha = torch.empty(B, L, self.V, dtype=torch.float64, device=x_t.device)
        a = e[:, 0] / self.V
        alpha[:, 0] = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
        for i in range(1, L):
            a = (alpha[:, i - 1] @ P) * e[:, i]
            alpha[:, i] = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
        post = torch.empty_like(alpha)
        beta = torch.ones(B, self.V, dtype=torch.float64, device=x_t.device)
        for i in range(L - 1, -1, -1):
            g = alpha[:, i] * beta
            post[:, i] = g / g.sum(-1, keepdim=True).clamp_min(1e-300)
            if i:
                beta = (e[:, i] * beta) @ P.T
                beta = beta / beta.sum(-1, keepdim=True).clamp_min(1e-300)
        return post

    def __call__(self, x_t, t, h=None):
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
        logits = self.posterior(x_t, t).log().float()
        if self.source == "mask":
            logits = torch.cat([logits, torch.full_like(logits[..., :1], -math.inf)], -1)
        return logits


# ----------------------------------------------------------------------------------------------
# A random Markov chain (order 1 or 2)


class MarkovChain:
    """A random Markov chain of order k (1 or 2) over V symbols: x_1..x_k uniform, then
    x_i ~ P(. | x_{i-k}, ..., x_{i-1}) for i = k+1..L, each conditional drawn from a symmetric
    Dirichlet(``concentration``) (small = peaked rows = low entropy).

    ``sample(n, generator)`` -> int64 [n, L]; ``log_prob(tokens [n, L])`` -> [n] natural logs
    (for :func:`fsdfm.metrics.exact_nll`); ``entropy_rate``: the expected entropy (nats) of a
    transition of a sample, averaged over positions k+1..L (the law of the context is propagated
    exactly from the uniform start), so that the chain's own samples score
    (k ln V + (L - k) entropy_rate) / L nats per token in expectation (``expected_nll``)."""

    def __init__(
        self, vocab_size: int, seq_len: int, *, order: int = 2, concentration: float = 0.1, seed=0
    ):
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        if vocab_size < 2 or seq_len <= order:
            raise ValueError(
                f"need vocab_size >= 2 and seq_len > order, got {vocab_size} and {seq_len}"
            )
        import numpy as np

        # Dirichlet rows as normalised Gamma draws, from NumPy's seeded generator (torch's Gamma
        # sampler only draws from the global RNG).
        w = np.random.default_rng(seed).gamma(concentration, size=(vocab_size,) * (order + 1))
        w = torch.from_numpy(w)
        self.table = w / w.sum(-1, keepdim=True)  # [V]*(k+1): P(c | context)
        self.log_table = self.table.clamp_min(1e-300).log()
        self.vocab_size, self.seq_len, self.order = vocab_size, seq_len, order

    def _transitions(self):
        """The law [V]*(k+1) of (context, next symbol) at each position i = k+1..L of a sample,
        propagated exactly from the uniform start."""
        k, V = self.order, self.vocab_size
        context = torch.full((V,) * k, V**-k, dtype=torch.float64)
        for _ in range(self.seq_len - k):
            joint = context.unsqueeze(-1) * self.table
            yield joint
            context = joint.sum(0)  # the next context: (x_{i-k+1}, ..., x_i)

    @functools.cached_property
    def entropy_rate(self) -> float:
        total = sum(float(-(joint * self.log_table).sum()) for joint in self._transitions())
        return total / (self.seq_len - self.order)

    @functools.cached_property
    def pair_law(self) -> torch.Tensor:
        """[V, V]: the law of a pair of neighbours (x_{i-1}, x_i) of a sample, averaged over the
        L - 1 positions i (exact, propagated from the uniform start)."""
        V = self.vocab_size
        # Order 2: the first pair is the uniform start, the others end a transition.
        pairs = torch.full((V, V), V**-2.0, dtype=torch.float64) if self.order == 2 else 0.0
        for joint in self._transitions():
            pairs = pairs + joint.reshape(-1, V, V).sum(0)
        return pairs / (self.seq_len - 1)

    def pair_tv(self, tokens: torch.Tensor) -> float:
        """Total variation between the pooled neighbour pairs of samples [n, L] and
        :attr:`pair_law`: small only when the samples follow the chain's transitions at their
        right frequencies (a sampler that repeats the likeliest transitions scores a low NLL but
        a high pair_tv). Pairs of one sample are dependent, so compare it with the chain's own
        samples of the same n, not with a multinomial floor."""
        tokens = tokens.cpu()
        V = self.vocab_size
        index = (tokens[:, :-1] * V + tokens[:, 1:]).flatten()
        counts = torch.bincount(index, minlength=V * V).double()
        return 0.5 * float((counts / counts.sum() - self.pair_law.flatten()).abs().sum())

    @functools.cached_property
    def transition_entropy(self) -> float:
        """H(x_i | x_{i-1}) of the pooled neighbour pairs (bits): the exact value of
        :func:`fsdfm.metrics.transition_entropy` on infinitely many samples."""
        return entropy_bits(self.pair_law) - entropy_bits(self.pair_law.sum(0))

    @property
    def expected_nll(self) -> float:
        k, L = self.order, self.seq_len
        return (k * math.log(self.vocab_size) + (L - k) * self.entropy_rate) / L

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        V, L, k = self.vocab_size, self.seq_len, self.order
        x = torch.empty(n, L, dtype=torch.long)
        x[:, :k] = torch.randint(0, V, (n, k), generator=generator)
        for i in range(k, L):
            rows = self.table[tuple(x[:, i - k + j] for j in range(k))]
            x[:, i] = torch.multinomial(rows, 1, generator=generator)[:, 0]
        return x

    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        k, L = self.order, tokens.shape[1]
        tokens = tokens.cpu()
        first = -k * math.log(self.vocab_size)
        steps = self.log_table[tuple(tokens[:, j : L - k + j] for j in range(k + 1))]
        return first + steps.sum(-1)


# ----------------------------------------------------------------------------------------------
# Symbols as tokens


def symbol_tokenizer(vocab_size: int, directory: str | Path) -> Path:
    """A word-level tokenizer.json of ``vocab_size`` symbols ``s0``, ``s1``, ... in
    ``directory`` (written once). The problems' symbols have no text, but a token file must name
    a tokenizer whose vocabulary is V; the last symbol is named ``<|endoftext|>``, which fsdfm's
    tokenizer loader requires, and is an ordinary symbol here."""
    from tokenizers import Tokenizer, models

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        vocab = {f"s{i}": i for i in range(vocab_size - 1)}
        vocab["<|endoftext|>"] = vocab_size - 1
        path.parent.mkdir(parents=True, exist_ok=True)
        Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>")).save(str(path))
    return path


def write_sequences(tokens: torch.Tensor, path: str | Path, tokenizer: Path, vocab_size: int):
    """Training sequences [n, L] as one token file (written once): with ``--seq-len L`` the
    blocks of fsdfm.data are exactly the rows."""
    path = Path(path)
    if not path.with_suffix(".json").is_file():
        write_token_file(
            path, [tokens.flatten().numpy()], tokenizer=str(tokenizer), vocab_size=vocab_size
        )
    return path
