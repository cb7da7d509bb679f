"""The training losses of discrete flow matching, per token, in fp32 from the logits (SPEC 4).

With p = softmax(logits) [B, L, V] and one time t per sequence on the mixture path
(kappa_t = t by default, :mod:`fsdfm.path`):

- :func:`cross_entropy`: -ln p(x_1), the denoiser's loss of pre-training (``--loss ce``);
- :func:`generalized_kl`: the generalized KL of discrete flow matching (``--loss gkl``), the KL
  rate between the conditional path's jump process and the model's; its time integral is the
  likelihood bound of :func:`fsdfm.metrics.elbo`;
- :func:`forward_kl`: KL(p_teacher || p_student), FS-DFM's distillation loss (SPEC 4.2).

Each returns [B, L] in fp32; the callers average over tokens, then sequences.

Precision and memory: the logits may be bfloat16 (the model's output under autocast). The maths
is done in fp32 a chunk of rows at a time, inside autograd functions that keep only the logits
themselves and per-row scalars for the backward pass (the gradient is recomputed from them), so
no fp32 copy of the [B, L, V] logits is ever held: an fp32 softmax costs twice the bf16 logits
per row chunk, never for the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fsdfm.path import PolynomialSchedule

__all__ = ["cross_entropy", "forward_kl", "generalized_kl", "token_log_probs"]

# fp32 elements per chunk of rows (16 MB of temporaries per chunk).
_CHUNK_ELEMENTS = 1 << 22


def _chunks(rows: int, vocab: int):
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


class _TokenLogProbs(torch.autograd.Function):
    """ln p(index_k) for each index tensor k, p = softmax(logits) in fp32, chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor, *indices: Tensor):
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        lse = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        for rows in _chunks(flat.shape[0], V):
            lse[rows] = torch.logsumexp(flat[rows].float(), -1)
        lse = lse.view(logits.shape[:-1])
        ctx.save_for_backward(logits, lse, *indices)
        return tuple(logits.gather(-1, i[..., None])[..., 0].float() - lse for i in indices)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        logits, lse, *indices = ctx.saved_tensors
        V = logits.shape[-1]
        flat, lse = logits.reshape(-1, V), lse.reshape(-1)
        # d ln p(i) / d logits = onehot(i) - p: the p terms of every index share one softmax.
        terms = [
            (g.reshape(-1, 1).float(), i.reshape(-1, 1))
            for g, i in zip(grads, indices, strict=True)
            if g is not None
        ]
        weight = sum((g[:, 0] for g, _ in terms), torch.zeros_like(lse))
        grad = torch.empty_like(flat)
        for rows in _chunks(flat.shape[0], V):
            # In fp32 until the end: the onehot terms nearly cancel -p where p(i) is near 1.
            chunk = (flat[rows].float() - lse[rows, None]).exp_().mul_(-weight[rows, None])
            for g, index in terms:
                chunk.scatter_add_(-1, index[rows], g[rows])
            grad[rows] = chunk.to(grad.dtype)
        grad = grad.view(logits.shape)
        return (grad, *([None] * len(indices)))


def token_log_probs(logits: Tensor, *indices: Tensor) -> tuple[Tensor, ...]:
    """ln p(i) [B, L] (fp32) at each index tensor i [B, L], p = softmax(logits [B, L, V])."""
    return _TokenLogProbs.apply(logits, *indices)


def cross_entropy(logits: Tensor, x_1: Tensor) -> Tensor:
    """-ln p(x_1) per token [B, L] = logsumexp(l) - l[x_1], for logits [B, L, V]."""
    (log_p1,) = token_log_probs(logits, x_1)
    return -log_p1


def generalized_kl(
    logits: Tensor,
    x_1: Tensor,
    x_t: Tensor,
    t: Tensor,
    schedule: PolynomialSchedule | None = None,
) -> Tensor:
    """The generalized KL of discrete flow matching per token [B, L] (SPEC 4.1), t [B]:

    (kdot/(1 - k)) (1 - p(x_1)) where x_t = x_1, else -(kdot/(1 - k)) (p(x_t) + ln p(x_1)),

    with 1 - k clamped at 1e-8. Only a logsumexp and two gathers: no [B, L, V] probabilities."""
    schedule = schedule or PolynomialSchedule()
    log_p1, log_pt = token_log_probs(logits, x_1, x_t)
    rate = schedule.dfm_rate(t.float())[:, None]
    return torch.where(x_t == x_1, rate * -torch.expm1(log_p1), -rate * (log_pt.exp() + log_p1))


class _ForwardKL(torch.autograd.Function):
    """KL(softmax(teacher) || softmax(student)) per row in fp32, chunk by chunk; the teacher gets
    no gradient. d KL / d l_S = p_S - p_T."""

    @staticmethod
    def forward(ctx, teacher: Tensor, student: Tensor):
        V = student.shape[-1]
        t_flat, s_flat = teacher.reshape(-1, V), student.reshape(-1, V)
        kl = torch.empty(s_flat.shape[0], dtype=torch.float32, device=student.device)
        lse_t, lse_s = torch.empty_like(kl), torch.empty_like(kl)
        for rows in _chunks(s_flat.shape[0], V):
            lt, ls = t_flat[rows].float(), s_flat[rows].float()
            lse_t[rows], lse_s[rows] = torch.logsumexp(lt, -1), torch.logsumexp(ls, -1)
            p_t = (lt - lse_t[rows, None]).exp()
            # sum_x p_T (l_T - l_S) - lse(l_T) + lse(l_S), as batched dot products
            kl[rows] = (p_t * (lt - ls)).sum(-1) - lse_t[rows] + lse_s[rows]
        ctx.save_for_backward(teacher, student, lse_t, lse_s)
        return kl.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl: Tensor):
        teacher, student, lse_t, lse_s = ctx.saved_tensors
        V = student.shape[-1]
        t_flat, s_flat = teacher.reshape(-1, V), student.reshape(-1, V)
        g = grad_kl.reshape(-1).float()
        grad = torch.empty_like(s_flat)
        for rows in _chunks(s_flat.shape[0], V):
            p_s = (s_flat[rows].float() - lse_s[rows, None]).exp()
            p_t = (t_flat[rows].float() - lse_t[rows, None]).exp()
            grad[rows] = ((p_s - p_t) * g[rows, None]).to(grad.dtype)
        return None, grad.view(student.shape)


def forward_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(p_T || p_S) per token [B, L] = sum_x p_T(x) (ln p_T(x) - ln p_S(x))
    = sum_x p_T(x) (l_T(x) - l_S(x)) - lse(l_T) + lse(l_S), in fp32; the teacher gets no
    gradient."""
    return _ForwardKL.apply(teacher_logits.detach(), student_logits)
