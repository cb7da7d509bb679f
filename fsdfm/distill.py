"""FS-DFM distillation (SPEC 4.2): the step-size law, the student's initialisation and the
shortcut teacher.

The student is the teacher's network with the step size h as a second condition
(:func:`student_from_teacher`). Per sequence h = 2^-k, k = 0..K (grid = 2^K) with P(h)
proportional to 1/h, and t = j / grid with t + h <= 1 (:func:`sample_step_sizes`). The smallest
steps are trained on data; every larger step learns, by forward KL, the logits of the shortcut
teacher: two steps of size h/2 taken by an EMA copy of the student itself
(:func:`shortcut_teacher`, RK-4 or Heun weighting), so that one big step agrees with two small
ones at every level of the grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fsdfm import ops
from fsdfm.model import FSDFMTransformer
from fsdfm.path import PolynomialSchedule

__all__ = [
    "LEVEL_LAWS",
    "METHODS",
    "STUDENT_INITS",
    "TEACHER_TYPES",
    "level_names",
    "level_of",
    "level_weights",
    "model_copy",
    "sample_step_sizes",
    "shortcut_teacher",
    "student_from_teacher",
]

TEACHER_TYPES = ("rk4", "heun")
# fsdfm: this module's step-size distillation; redi: rectified couplings (fsdfm.coupling).
METHODS = ("fsdfm", "redi")


LEVEL_LAWS = ("weighted", "uniform", "curriculum")


def level_weights(grid: int, law: str = "weighted", progress: float = 0.0) -> Tensor:
    """The probabilities [K + 1] of the levels k = 0..K (h = 2^-k, grid = 2^K) under ``law``:

    - "weighted" (the paper's): P(k) proportional to 1/h = 2^k, so half the draws are the
      finest level and h = 1 gets 1 / (2 grid - 1) of them;
    - "uniform": every level alike;
    - "curriculum": uniform over the levels open at ``progress`` (the fraction of the run done,
      in [0, 1]): the two finest at first, then one coarser level more every 1/K of the run, so
      that each big step is learnt from smaller ones that have been trained already."""
    K = grid.bit_length() - 1
    k = torch.arange(K + 1, dtype=torch.float64)
    if law == "weighted":
        weights = 2.0**k
    elif law == "uniform":
        weights = torch.ones(K + 1, dtype=torch.float64)
    elif law == "curriculum":
        coarsest = max(0, K - 1 - math.floor(K * min(max(progress, 0.0), 1.0)))
        weights = (k >= coarsest).double()
    else:
        raise ValueError(f"levels must be one of {LEVEL_LAWS}, got {law!r}")
    return weights / weights.sum()


def sample_step_sizes(
    n: int,
    grid: int = 1024,
    generator: torch.Generator | None = None,
    *,
    law: str = "weighted",
    progress: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(h, t), float64 [n] on the CPU: h = 2^-k with k drawn from :func:`level_weights` (by
    default the paper's P(k) = 2^k / (2^(K+1) - 1)); t = j / grid with j uniform on
    {0, .., grid - grid h}, so that t + h <= 1."""
    k = torch.multinomial(level_weights(grid, law, progress), n, replacement=True,
                          generator=generator)  # fmt: skip
    slots = grid - torch.div(grid, 2**k, rounding_mode="floor") + 1  # number of allowed j
    u = torch.rand(n, dtype=torch.float64, generator=generator)
    j = (u * slots).floor()
    return 2.0 ** (-k.double()), j / grid


STUDENT_INITS = ("teacher", "random")


def model_copy(model: FSDFMTransformer, **config_changes) -> FSDFMTransformer:
    """A new model of ``model``'s config (with ``config_changes``), weights and tokenizer."""
    new = FSDFMTransformer(model.config.replace(**config_changes))
    new.load_state_dict(model.state_dict())
    new.tokenizer_name = model.tokenizer_name
    return new


def student_from_teacher(
    teacher: FSDFMTransformer, init: str = "teacher", **config_changes
) -> FSDFMTransformer:
    """A step-conditioned student with the teacher's weights (SPEC 4.2); ``config_changes``
    (e.g. seq_len, dropout) go to its ModelConfig. A teacher that is already a student is copied.
    ``init="random"`` leaves the new step-size layers at their fresh random initialisation, as
    the authors' code does (the student then starts away from the teacher); "teacher" (the
    default) starts them as below.

    The new layers start so that the student computes the teacher's function for every h:
    with t_emb, h_emb the embeddings (each c wide), the teacher conditions every block on
    SiLU(t_emb). The student's time_condition_fuser gets W = [[I, 0], [-I, 0]], b = 0, so
    c_vec = SiLU(W [t_emb; h_emb]) = [SiLU(t_emb); SiLU(-t_emb)], and every condition_fuser gets
    W = [I, -I], b = 0, so it yields SiLU(SiLU(t_emb) - SiLU(-t_emb)) = SiLU(t_emb), because
    SiLU(x) - SiLU(-x) = x (sigma(x) + sigma(-x)) = x. Exact up to the rounding of that
    difference (fp32 on the CPU; under bf16 autocast on CUDA, bf16 rounding). dt_embedding
    keeps its fresh initialisation: h enters through the fuser's h columns, which start at zero
    but receive gradient from the first step."""
    if teacher.config.step_conditioned:
        return model_copy(teacher, **config_changes)
    student = FSDFMTransformer(teacher.config.replace(step_conditioned=True, **config_changes))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    new_layers = ("dt_embedding.", "time_condition_fuser.", "condition_fuser.")
    if unexpected or not all(any(p in k for p in new_layers) for k in missing):
        raise ValueError(
            f"the teacher's weights do not fit a student of its shape (unexpected: "
            f"{sorted(unexpected)[:4]}, missing: {sorted(missing)[:4]})"
        )
    if init not in STUDENT_INITS:
        raise ValueError(f"init must be one of {STUDENT_INITS}, got {init!r}")
    student.tokenizer_name = teacher.tokenizer_name
    if init == "random":
        return student
    c = teacher.config.cond_dim
    eye = torch.eye(c)
    with torch.no_grad():
        fuser = student.time_condition_fuser
        fuser.weight.zero_()
        fuser.weight[:c, :c] = eye
        fuser.weight[c:, :c] = -eye
        fuser.bias.zero_()
        for layer in [*student.blocks, student.output_layer]:
            layer.condition_fuser.weight.copy_(torch.cat([eye, -eye], dim=1))
            layer.condition_fuser.bias.zero_()
    student.tokenizer_name = teacher.tokenizer_name
    return student


@torch.no_grad()
def shortcut_teacher(
    model,
    x_t: Tensor,
    t: Tensor,
    h: Tensor,
    kind: str = "rk4",
    *,
    schedule: PolynomialSchedule | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The shortcut teacher's logits [n, L, V] (fp32) for a step of size h from (x_t, t), made of
    steps of size h/2 by ``model`` (the EMA student, always conditioned on h/2); x_t [n, L], t and
    h [n]. With f(x, s) = model(x, s, h/2) and J(l, x, s) the FS-DFM jump of size h/2 from time s
    (:func:`fsdfm.ops.jump_step` with rate_scale = alpha(s, h/2), SPEC 2.1):

    - "rk4": l1 = f(x_t, t), x1 = J(l1, x_t, t); l2 = f(x1, t + h/2), x2 = J(l2, x1, t + h/2);
      l3 = f(x2, t + h/2), x3 = J(l3, x2, t + h/2); l4 = f(x3, t + h);
      result (l1 + 2 l2 + 2 l3 + l4) / 6 (the jumps are chained, as in the reference);
    - "heun": l1 = f(x_t, t), x1 = J(l1, x_t, t); l2 = f(x1, t + h/2); result (l1 + l2) / 2:
      the two half steps that cover [t, t + h], each evaluated at its own start.

    Averages in fp32, accumulated in place in l1 (the model's output is owned here). The jump
    scalars are computed in float64 from t and h. No gradient."""
    if kind not in TEACHER_TYPES:
        raise ValueError(f"kind must be one of {TEACHER_TYPES}, got {kind!r}")
    schedule = schedule or PolynomialSchedule()
    device = x_t.device
    t = t.to(device=device, dtype=torch.float64)
    half = h.to(device=device, dtype=torch.float64) / 2
    half32 = half.float()
    draw = ops.Kernels("auto", device)

    def evaluate(x: Tensor, s: Tensor) -> Tensor:
        return model(x, s.float(), half32).float()

    def step(logits: Tensor, x: Tensor, s: Tensor) -> Tensor:
        rate = schedule.cumulative_scalar(s, half).float()
        return draw.jump(logits, x, rate, half32, ops.Controls(), generator)

    mid = t + half
    l1 = evaluate(x_t, t)
    x1 = step(l1, x_t, t)
    if kind == "heun":
        return l1.add_(evaluate(x1, mid)).mul_(0.5)
    l2 = evaluate(x1, mid)
    x2 = step(l2, x1, mid)
    l1.add_(l2, alpha=2.0)
    del l2
    l3 = evaluate(x2, mid)
    x3 = step(l3, x2, mid)
    l1.add_(l3, alpha=2.0)
    del l3
    return l1.add_(evaluate(x3, t + 2 * half)).div_(6.0)


def level_names(grid: int) -> list[str]:
    """The step sizes of a grid as names, largest first: "1", "1/2", ..., "1/grid"."""
    return ["1" if k == 0 else f"1/{2**k}" for k in range(grid.bit_length())]


def level_of(h: Tensor, grid: int) -> Tensor:
    """The level k of step sizes h = 2^-k (int64, same shape)."""
    return torch.round(-torch.log2(h.double())).long().clamp(0, grid.bit_length() - 1)
