"""The fused head: a sampling step straight from the final hidden states, without the logits.

With hidden states y [B, L, d] (after the final layer's adaLN), the output layer's weight
W [V, d] and bias b [V], the logits are l = y W^T + b [B, L, V]: at GPT-2's vocabulary and
B L = 32K positions, 1.6 G numbers written and read back every step. The fused ops compute the
same step as :func:`fsdfm.ops.jump_step` / :func:`fsdfm.ops.sample_categorical` on those logits
while making them a vocabulary tile at a time (a tile product, then its softmax statistics and
one exact draw from its allowed tokens, merged into a running winner with probability
tile-mass / mass-so-far: row_math.h, ``HeadRow``), so that no [B, L, V] tensor exists:

- ``head_jump_step(y, W, b, x_t, rate_scale, h)``: stay at x_t with probability exp(-h lambda),
  lambda = max(rate_scale, 0) sum_{reachable x != x_t} p(x), else x ~ p on the reachable x != x_t;
- ``head_sample_categorical(y, W, b, exclude=None)``: x ~ p on the reachable tokens other than
  ``exclude`` (one token id or None),

with p = softmax(l / temperature) and the energy barrier as in :mod:`fsdfm.ops`. The law is that
of the unfused op on ``torch.nn.functional.linear(y, W, b)`` computed in the inputs' dtype (which
is what ``<op>_ref`` does), not the same draws: the tiles take their own noise. A finite barrier
needs each row's maximum first and costs a second product. Each op is
``torch.ops.fsdfm.<op>`` (CPU and CUDA kernels, fake kernels below).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fsdfm import ops
from fsdfm._args import per_sequence

__all__ = [
    "head_jump_step",
    "head_jump_step_ref",
    "head_sample_categorical",
    "head_sample_categorical_ref",
]


def _check_head(hidden, weight, bias) -> tuple[int, int, int]:
    """(B, L, V) after the checks of the three tensors."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        ops.check_has_data(t, name)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, L, d], got {tuple(hidden.shape)}")
    if hidden.dtype not in ops._FLOATS:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    d = hidden.shape[2]
    if weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [V, d] with d = {d}, got {tuple(weight.shape)}")
    others = [("weight", weight)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            what = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(
                f"bias must be None or have shape [V] = [{weight.shape[0]}], got {what}"
            )
        others.append(("bias", bias))
    for name, t in others:
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} is {t.dtype} but hidden is {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    return hidden.shape[0], hidden.shape[1], weight.shape[0]


def _prepare(hidden, weight, bias, barrier, temperature, generator):
    B, L, V = _check_head(hidden, weight, bias)
    ops.check_scalars(barrier, temperature)
    ops.check_generator(generator, hidden.device)
    return B, L, V


def _prepare_jump(hidden, weight, bias, x_t, rate_scale, h, barrier, temperature, generator,
                  validate):  # fmt: skip
    B, L, V = _prepare(hidden, weight, bias, barrier, temperature, generator)
    ops._check_tokens(x_t, B, L, hidden.device, "x_t")
    if validate:
        ops.check_token_range(x_t, V, "x_t")
    rate_scale = ops.rate_scale_of(rate_scale, B, hidden.device, validate)
    h = per_sequence(h, B, hidden.device, "h", check_values=validate)
    return rate_scale, h


def _exclude_token(exclude, V: int) -> int:
    if exclude is None:
        return -1
    if isinstance(exclude, bool) or not isinstance(exclude, int):
        raise TypeError(f"exclude must be None or one token id, got {exclude!r}")
    if not 0 <= exclude < V:
        raise ValueError(f"exclude must be a token id in [0, {V}), got {exclude}")
    return exclude


def _raise_invalid(out, hidden, weight, bias, nothing_left: str, temperature: float) -> None:
    """The kernels' -1 rows as an error that says what is wrong (from the offending row's
    logits, recomputed)."""
    bad = out < 0
    if bool(bad.any()):
        b, pos = (int(i) for i in bad.nonzero()[0])
        row = F.linear(hidden[b, pos], weight, bias)[None, None]
        ops._raise_invalid_rows(out[b, pos][None, None], row, f"logits of hidden[{b}, {pos}]",
                                nothing_left, temperature)  # fmt: skip


def head_jump_step(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x_t: torch.Tensor,
    rate_scale: float | torch.Tensor,
    h: float | torch.Tensor,
    *,
    barrier: float = math.inf,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """x_next [B, L]: :func:`fsdfm.ops.jump_step` on the logits hidden @ weight^T + bias,
    computed a vocabulary tile at a time."""
    rate_scale, h = _prepare_jump(
        hidden, weight, bias, x_t, rate_scale, h, barrier, temperature, generator, validate
    )
    ops._require_native(hidden.device)
    out = torch.ops.fsdfm.head_jump_step(
        hidden, weight, bias, x_t, rate_scale, h, float(barrier), float(temperature), generator
    )
    if validate:
        _raise_invalid(out, hidden, weight, bias, "", temperature)
    return out


def head_sample_categorical(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    exclude: int | None = None,
    barrier: float = math.inf,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """tokens [B, L]: :func:`fsdfm.ops.sample_categorical` on the logits hidden @ weight^T +
    bias, computed a vocabulary tile at a time; ``exclude`` is None or one token id."""
    _, _, V = _prepare(hidden, weight, bias, barrier, temperature, generator)
    token = _exclude_token(exclude, V)
    ops._require_native(hidden.device)
    out = torch.ops.fsdfm.head_sample_categorical(
        hidden, weight, bias, token, float(barrier), float(temperature), generator
    )
    if validate:
        _raise_invalid(out, hidden, weight, bias, ops._NOTHING_LEFT, temperature)
    return out


if ops._IMPORT_ERROR is None:

    @torch.library.register_fake("fsdfm::head_jump_step")
    def _head_jump_step_fake(hidden, weight, bias, x_t, rate_scale, h, barrier, temperature,
                             generator):  # fmt: skip
        return hidden.new_empty(hidden.shape[:2], dtype=torch.int64)

    @torch.library.register_fake("fsdfm::head_sample_categorical")
    def _head_sample_categorical_fake(hidden, weight, bias, exclude_token, barrier, temperature,
                                      generator):  # fmt: skip
        return hidden.new_empty(hidden.shape[:2], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# References: the unfused path, logits materialised in the inputs' dtype.


def head_jump_step_ref(
    hidden, weight, bias, x_t, rate_scale, h, *, barrier=math.inf, temperature=1.0,
    generator=None, validate=True,
) -> torch.Tensor:  # fmt: skip
    """Reference of :func:`head_jump_step`: ``jump_step_ref(F.linear(hidden, weight, bias))``."""
    rate_scale, h = _prepare_jump(
        hidden, weight, bias, x_t, rate_scale, h, barrier, temperature, generator, validate
    )
    logits = F.linear(hidden, weight, bias)
    controls = ops.Controls(float(temperature), float(barrier))
    return ops._jump_reference(logits, x_t, rate_scale, h, controls, generator, validate)


def head_sample_categorical_ref(
    hidden, weight, bias=None, *, exclude=None, barrier=math.inf, temperature=1.0,
    generator=None, validate=True,
) -> torch.Tensor:  # fmt: skip
    """Reference of :func:`head_sample_categorical`: ``sample_categorical_ref`` of the logits."""
    _, _, V = _prepare(hidden, weight, bias, barrier, temperature, generator)
    token = _exclude_token(exclude, V)
    logits = F.linear(hidden, weight, bias)
    controls = ops.Controls(float(temperature), float(barrier))
    return ops._categorical_reference(logits, None, token, controls, generator, validate)


# ---------------------------------------------------------------------------------------------
# The draws of one sampling loop (fsdfm.sample), on checked arguments.


def jump(draw: ops.Kernels, hidden, weight, bias, x_t, rate_scale, h, controls: ops.Controls,
         generator) -> torch.Tensor:  # fmt: skip
    """:func:`head_jump_step` with the backend of ``draw`` and no argument checks. ``controls``
    must be ones the fused head does (no top-k / top-p, temperature > 0)."""
    if draw.native:
        return torch.ops.fsdfm.head_jump_step(
            hidden, weight, bias, x_t, rate_scale, h, controls.barrier, controls.temperature,
            generator,
        )  # fmt: skip
    return draw.jump(F.linear(hidden, weight, bias), x_t, rate_scale, h, controls, generator)


def categorical(draw: ops.Kernels, hidden, weight, bias, exclude_token, controls: ops.Controls,
                generator) -> torch.Tensor:  # fmt: skip
    """:func:`head_sample_categorical` with the backend of ``draw`` and no argument checks."""
    if draw.native:
        return torch.ops.fsdfm.head_sample_categorical(
            hidden, weight, bias, exclude_token, controls.barrier, controls.temperature, generator
        )
    return draw.categorical(F.linear(hidden, weight, bias), exclude_token, controls, generator)
