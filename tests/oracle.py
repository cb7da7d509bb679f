"""A model that knows the answer: the exact posterior marginals p_{1|t}(x^i | x_t) of the mixture
path for a small joint target law q over V^L, with a uniform or a mask source."""

import torch

from fsdfm.evaluation import ExactPosterior

__all__ = ["ExactPosterior", "correlated_law", "total_variation", "tv_noise_floor"]


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
