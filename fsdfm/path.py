"""The probability path of discrete flow matching (SPEC 1) and the per-step scalars of the solvers.

Schedule kappa_t = t^n (polynomial, n = 1 by default), kappa_dot_t = n t^(n-1). Mixture path, token
by token: x_t^i = x_1^i with probability kappa_t, else x_0^i, with one t per sequence ([B],
broadcast over L). Sources: ``uniform`` (every token uniform over the V real tokens) or ``mask``
(every token the mask id, the last index of a vocabulary of V + 1).

Per-step scalars, for a step of size h from time t (floats, or [B] tensors):
- cumulative scalar (FS-DFM, SPEC 2.1): alpha(t, h) = (ln(1 - kappa_t) - ln(1 - kappa_{t+h})) / h,
  with 1 - kappa clamped at EPS = 1e-8;
- Euler (SPEC 2.4): 1 / h;
- DFM rate (SPEC 2.5): kappa_dot_t / (1 - kappa_t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 1e-8
SOURCES = ("uniform", "mask")


def _one_minus(x):
    """1 - x clamped at EPS, for floats and tensors alike."""
    if isinstance(x, torch.Tensor):
        return (1 - x).clamp_min(EPS)
    return max(1.0 - x, EPS)


def _log(x):
    return torch.log(x) if isinstance(x, torch.Tensor) else math.log(x)


@dataclass(frozen=True)
class PolynomialSchedule:
    """kappa_t = t^n: the share of target tokens at time t."""

    n: float = 1.0

    def __post_init__(self):
        if not (self.n > 0 and math.isfinite(self.n)):
            raise ValueError(f"the schedule exponent n must be positive and finite, got {self.n}")

    def kappa(self, t):
        return t**self.n

    def kappa_dot(self, t):
        return self.n * t ** (self.n - 1)

    def cumulative_scalar(self, t, h):
        """alpha(t, h): the average DFM rate kappa_dot/(1 - kappa) over [t, t + h] (SPEC 2.1)."""
        return (_log(_one_minus(self.kappa(t))) - _log(_one_minus(self.kappa(t + h)))) / h

    @staticmethod
    def euler_scalar(h):
        """1 / h: the plain Euler generator's scale (SPEC 2.4)."""
        return 1.0 / h

    def dfm_rate(self, t):
        """kappa_dot_t / (1 - kappa_t): the DFM baseline's jump rate toward its draw (SPEC 2.5)."""
        return self.kappa_dot(t) / _one_minus(self.kappa(t))


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    return source


def mask_id(source: str, vocab_size: int) -> int | None:
    """The mask token of a model with ``vocab_size`` outputs: its last id with the mask source,
    None with the uniform source."""
    return vocab_size - 1 if source == "mask" else None


def real_vocab_size(source: str, vocab_size: int) -> int:
    """V, the real tokens among a model's ``vocab_size`` outputs (all but the mask)."""
    return vocab_size - 1 if source == "mask" else vocab_size


def sample_source(
    source: str,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_0 [B, L] int64. ``vocab_size`` is the model's: V real tokens for ``uniform``, V + 1 with
    the mask id V for ``mask``."""
    check_source(source)
    if source == "mask":
        if vocab_size < 2:
            raise ValueError(f"a mask source needs a vocabulary of at least 2, got {vocab_size}")
        mask = mask_id(source, vocab_size)
        return torch.full((batch_size, seq_len), mask, dtype=torch.long, device=device)
    return torch.randint(0, vocab_size, (batch_size, seq_len), device=device, generator=generator)


@dataclass(frozen=True)
class MixturePath:
    """x_t from (x_0, x_1, t): each token is x_1's with probability kappa_t, else x_0's."""

    schedule: PolynomialSchedule = PolynomialSchedule()

    def sample(
        self,
        x_0: torch.Tensor,
        x_1: torch.Tensor,
        t: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x_0, x_1 [B, L] int64, t [B] float in [0, 1] -> x_t [B, L]."""
        if x_0.shape != x_1.shape or x_0.dim() != 2:
            raise ValueError(
                f"x_0 and x_1 must both be [B, L], got {tuple(x_0.shape)} and {tuple(x_1.shape)}"
            )
        if t.shape != (x_0.shape[0],):
            raise ValueError(f"t must have shape [B] = [{x_0.shape[0]}], got {tuple(t.shape)}")
        u = torch.rand(x_0.shape, device=x_0.device, generator=generator)
        take_target = u < self.schedule.kappa(t.to(u.dtype))[:, None]
        return torch.where(take_target, x_1, x_0)
