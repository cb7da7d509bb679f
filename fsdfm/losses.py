"""The training losses of discrete flow matching, per token, in fp32 from the logits (SPEC 4).

With p = softmax(logits) [B, L, V] and one time t per sequence on the mixture path
(kappa_t = t by default, :mod:`fsdfm.path`):

- :func:`cross_entropy`: -ln p(x_1), the denoiser's loss of pre-training (``--loss ce``);
- :func:`generalized_kl`: the generalized KL of discrete flow matching (``--loss gkl``), the KL
  rate between the conditional path's jump process and the model's; its time integral is the
  likelihood bound of :func:`fsdfm.metrics.elbo`;
- :func:`forward_kl`: KL(p_teacher || p_student), FS-DFM's distillation loss (SPEC 4.2).

Each returns [B, L]; the callers average over tokens, then sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fsdfm.path import PolynomialSchedule

__all__ = ["cross_entropy", "forward_kl", "generalized_kl"]


def cross_entropy(logits: Tensor, x_1: Tensor) -> Tensor:
    """-ln p(x_1) per token [B, L] = logsumexp(l) - l[x_1], for logits [B, L, V]."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - logits.gather(-1, x_1[..., None])[..., 0]


def generalized_kl(
    logits: Tensor,
    x_1: Tensor,
    x_t: Tensor,
    t: Tensor,
    schedule: PolynomialSchedule | None = None,
) -> Tensor:
    """The generalized KL of discrete flow matching per token [B, L] (SPEC 4.1), t [B]:

    (kdot/(1 - k)) (1 - p(x_1)) where x_t = x_1, else -(kdot/(1 - k)) (p(x_t) + ln p(x_1)),

    with 1 - k clamped at 1e-8. Only logsumexp and two gathers: no [B, L, V] probabilities."""
    schedule = schedule or PolynomialSchedule()
    logits = logits.float()
    lse = torch.logsumexp(logits, -1)
    log_p1 = logits.gather(-1, x_1[..., None])[..., 0] - lse
    p_t = (logits.gather(-1, x_t[..., None])[..., 0] - lse).exp()
    rate = schedule.dfm_rate(t.float())[:, None]
    return torch.where(x_t == x_1, rate * -torch.expm1(log_p1), -rate * (p_t + log_p1))


def forward_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(p_T || p_S) per token [B, L] = sum_x p_T(x) (ln p_T(x) - ln p_S(x))
    = sum_x p_T(x) (l_T(x) - l_S(x)) - lse(l_T) + lse(l_S), in fp32; the teacher gets no gradient.
    The only [B, L, V] tensor made is p_T (the sums are batched dot products)."""
    target = teacher_logits.detach().float()
    student = student_logits.float()
    lse_t = torch.logsumexp(target, -1)
    p_t = (target - lse_t[..., None]).exp()
    dot_t = torch.einsum("blv,blv->bl", p_t, target)
    dot_s = torch.einsum("blv,blv->bl", p_t, student)
    return dot_t - dot_s - lse_t + torch.logsumexp(student, -1)
