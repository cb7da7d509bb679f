"""A model that knows the answer: the exact posterior marginals p_{1|t}(x^i | x_t) of the mixture
path for a small joint target law q over V^L, with a uniform or a mask source."""

import itertools

import torch


class ExactPosterior:
    """Callable ``model(x_t, t, h) -> logits [B, L, V(+1)]`` (log posterior marginals).

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

    def to(self, device) -> "ExactPosterior":
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
        post = post / post.sum(-1, keepdim=True)
        onehot = torch.nn.functional.one_hot(self.states, self.V).double()  # [S, L, V]
        marginals = torch.einsum("bs,slv->blv", post, onehot)
        if self.source == "mask":
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


def correlated_law(V: int, L: int, seed: int = 0) -> torch.Tensor:
    """A joint law with strong dependence between positions (far from its product of marginals)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand([V] * L, generator=g, dtype=torch.float64) * 0.2
    for a in range(V):
        q[(a,) * L] += 1.0 + a  # mass on the diagonal: the tokens agree
    return q / q.sum()


def total_variation(x_index: torch.Tensor, law: torch.Tensor) -> float:
    counts = torch.bincount(x_index, minlength=law.numel()).double()
    return 0.5 * float((counts / counts.sum() - law).abs().sum())


def tv_noise_floor(law: torch.Tensor, n: int, seed: int = 0, repeats: int = 5) -> float:
    """Mean TV distance of n exact draws from `law`: what sampling noise alone gives."""
    g = torch.Generator().manual_seed(seed)
    tvs = [
        total_variation(torch.multinomial(law, n, replacement=True, generator=g), law)
        for _ in range(repeats)
    ]
    return sum(tvs) / len(tvs)
