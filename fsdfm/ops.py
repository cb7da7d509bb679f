"""The per-step sampling ops of FS-DFM: fused native kernels and their PyTorch references.

Shapes: logits / probs [B, L, V] (float32, bfloat16 or float16; any strides), current tokens
x_t [B, L] int64, per-sequence scalars (``rate_scale``, ``h``) as a float or a [B] tensor.
With p = softmax(logits / temperature) and the energy barrier (SPEC 2.3) making x reachable iff
p(x) >= max_y p(y) * exp(-barrier):

- ``probs_to_generator``: the explicit generator (jump rates) [B, L, V]
  u(x) = max(rate_scale * (p(x) - delta_{x_t}(x)), 0) for reachable x != x_t, u(x_t) = 0.
- ``jump_step``: one FS-DFM / Euler jump per position, without materialising any [B, L, V]
  tensor: lambda = max(rate_scale, 0) * sum_{reachable x != x_t} p(x); stay with probability
  exp(-h * lambda), else draw from p restricted to the reachable x != x_t. rate_scale = alpha(t, h)
  gives the FS-DFM (cumulative scalar) step, rate_scale = 1 / h the plain Euler step.
- ``sample_categorical``: one draw per position from p restricted to the reachable tokens and
  without the excluded one (the last-step collapse).

Sampling controls (:class:`Controls`, the names of Hugging Face ``generate``) restrict the
destinations the same way the barrier does (rates to a removed token are zero, so lambda shrinks;
the collapse draws from p restricted and renormalised, which is transformers' filtered law):
``top_k`` keeps the tokens at least as probable as the k-th most probable, ``top_p`` the smallest
set of most probable tokens whose mass reaches top_p (within what top-k kept), ties at either
edge kept; ``min_p`` keeps p(x) >= min_p * max p, which is the barrier -ln(min_p) under another
name. The kernels find the top-k / top-p floor without sorting (csrc/fsdfm/row_math.h).
``temperature=0`` is the T -> 0 limit: p puts all its mass on the row's argmax (lowest id among
ties), so a jump goes to the argmax at rate max(rate_scale, 0) unless it is already there, and
the collapse takes the argmax.

Each op ``<op>`` is registered as ``torch.ops.fsdfm.<op>`` (CPU and, when built with CUDA, CUDA
kernels; fake kernels below for torch.compile) and has ``<op>_ref``, the same function written
plainly in PyTorch the way the released FS-DFM code does it (softmax, one-hot, rates and
``torch.multinomial`` in float64, materialised). Both draw from the same law; the native draw is
an exact inverse-CDF with 53-bit uniforms (csrc/fsdfm/row_math.h).

Bad input raises a ``ValueError`` / ``TypeError`` naming the argument (h >= 0, rate_scale any
number but NaN, 1 / temperature finite in float32; meta tensors are refused: there is nothing to
draw from). With ``validate=True`` (the default) the wrappers also check token ids, the values
of tensor ``h`` / ``rate_scale`` and the outputs, which on CUDA synchronises with the host; a
sampling loop passes ``validate=False`` and checks once at the end. The kernels never read
out of bounds: a row they cannot sample (NaN or +inf logits, all -inf, a token id out of range,
nothing left to draw) gets the token -1, which ``validate=True`` turns into an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fsdfm._args import per_sequence

try:
    from fsdfm import _C  # noqa: F401  (registers torch.ops.fsdfm.*)

    _IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # the extension is not built
    _IMPORT_ERROR = error

__all__ = [
    "BACKENDS",
    "Controls",
    "InvalidRowsError",
    "Kernels",
    "check_scalars",
    "check_token_range",
    "jump_step",
    "jump_step_ref",
    "native_available",
    "probs_to_generator",
    "probs_to_generator_ref",
    "sample_categorical",
    "sample_categorical_ref",
    "sampling_controls",
]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INVALID_TOKEN = -1
BACKENDS = ("auto", "native", "reference")


def native_available(device: torch.device | str | None = None) -> bool:
    """Whether the compiled kernels are there (for ``device``'s type, when given)."""
    if _IMPORT_ERROR is not None:
        return False
    if device is None:
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fsdfm::jump_step", key
    )


def _require_native(device: torch.device) -> None:
    if not native_available(device):
        why = (
            f"the extension fsdfm._C is not built ({_IMPORT_ERROR}); run "
            "`python setup.py build_ext --inplace`"
            if _IMPORT_ERROR is not None
            else f"fsdfm._C was built without kernels for {device.type}"
        )
        raise RuntimeError(f"native fsdfm ops unavailable: {why}; the *_ref ops always work")


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the native wrappers and the references.


def _check_rows(t: torch.Tensor, name: str) -> tuple[int, int, int]:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    check_has_data(t, name)
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape [B, L, V], got {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.shape[2] < 1:
        raise ValueError(f"{name} must have V >= 1 entries per row, got {tuple(t.shape)}")
    return t.shape[0], t.shape[1], t.shape[2]


def rate_scale_of(rate_scale, B: int, device: torch.device, validate: bool) -> torch.Tensor:
    """rate_scale as float32 [B]. Any number but NaN: a negative scale makes every rate
    negative, which the clipping max(., 0) of SPEC 2.3 turns into no move at all."""
    return per_sequence(rate_scale, B, device, "rate_scale", low=-math.inf, check_values=validate)


def check_has_data(t: torch.Tensor, name: str) -> None:
    """Meta tensors have shapes but no values, and every op here draws from values (shape
    propagation under torch.compile goes through the fake kernels instead)."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor: sampling needs values (a cpu or cuda tensor)")


def _check_tokens(x: torch.Tensor, B: int, L: int, device: torch.device, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an int64 tensor, got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {x.dtype}")
    if tuple(x.shape) != (B, L):
        raise ValueError(f"{name} must have shape [B, L] = [{B}, {L}], got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {device}")


def check_token_range(x: torch.Tensor, V: int, name: str) -> None:
    if x.numel() and bool(((x < 0) | (x >= V)).any()):
        bad = x[(x < 0) | (x >= V)][0].item()
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {V})")


_SMALLEST_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_scalars(barrier: float, temperature: float, *, greedy_ok: bool = False) -> None:
    """barrier >= 0; temperature positive (or 0, the argmax, where ``greedy_ok``) and at least
    1 / FLT_MAX, below which 1 / temperature overflows float32."""
    if not _is_number(barrier) or math.isnan(barrier) or barrier < 0:
        raise ValueError(f"barrier must be >= 0 (math.inf disables it), got {barrier!r}")
    if greedy_ok and _is_number(temperature) and temperature == 0:
        return
    if not _is_number(temperature) or not (0 < temperature < math.inf):
        what = "0 (argmax) or a positive finite number" if greedy_ok else "a positive finite number"
        raise ValueError(f"temperature must be {what}, got {temperature!r}")
    if temperature < _SMALLEST_TEMPERATURE:
        raise ValueError(
            f"temperature must be at least {_SMALLEST_TEMPERATURE:.3g} (the kernels scale by "
            f"1 / temperature in float32, which overflows below that), got {temperature!r}"
            + (" or 0 for the argmax" if greedy_ok else "")
        )


@dataclass(frozen=True)
class Controls:
    """The checked sampling controls of the draws (see the module docstring); make one with
    :func:`sampling_controls`. ``barrier`` already holds min_p (the smaller of the two)."""

    temperature: float = 1.0  # 0: the argmax
    barrier: float = math.inf
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p is on (each needs the whole row before its floor is known)."""
        return self.top_k > 0 or self.top_p < 1.0

    def op_args(self) -> tuple[float, float, int, float]:
        """(barrier, temperature, top_k, top_p) as the registered ops take them."""
        return float(self.barrier), float(self.temperature), int(self.top_k), float(self.top_p)


def sampling_controls(
    temperature: float = 1.0,
    barrier: float = math.inf,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> Controls:
    """Check the controls and fold ``min_p`` into the barrier: p >= min_p * max p is
    E(x) - min E <= -ln(min_p). None, top_k = 0, top_p = 1 and min_p = 0 each mean off."""
    check_scalars(barrier, temperature, greedy_ok=True)
    if top_k is None:
        top_k = 0
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be None or an integer >= 0 (0 disables it), got {top_k!r}")
    if top_p is None:
        top_p = 1.0
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or lie in (0, 1] (1 disables it), got {top_p!r}")
    if min_p is not None:
        if not _is_number(min_p) or not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be None or lie in [0, 1] (0 disables it), got {min_p!r}")
        if min_p > 0:
            barrier = min(barrier, -math.log(min_p))
    return Controls(float(temperature), float(barrier), top_k, float(top_p))


def check_generator(
    generator: torch.Generator | None, device: torch.device, where: str = "the logits are"
) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be None or a torch.Generator, got {type(generator).__name__}"
        )
    if generator.device.type != device.type:
        raise ValueError(f"generator is for {generator.device} but {where} on {device}")


def _exclusion(
    exclude: int | torch.Tensor | None, B: int, L: int, V: int, device: torch.device
) -> tuple[torch.Tensor | None, int]:
    """``exclude`` as the (tensor, token id) pair of the op schema."""
    if exclude is None:
        return None, -1
    if isinstance(exclude, torch.Tensor):
        _check_tokens(exclude, B, L, device, "exclude")
        return exclude, -1
    if isinstance(exclude, bool) or not isinstance(exclude, int):
        raise TypeError(
            f"exclude must be None, a token id or an int64 [B, L] tensor, got {exclude!r}"
        )
    if not 0 <= exclude < V:
        raise ValueError(f"exclude must be a token id in [0, {V}), got {exclude}")
    return None, exclude


_NOTHING_LEFT = "leaves no token to draw (all excluded or unreachable)"


class InvalidRowsError(ValueError):
    """Rows of logits that give no distribution to sample from (NaN, +inf, all -inf, or
    nothing left after the barrier and the exclusion)."""


def _raise_invalid_rows(
    out: torch.Tensor, logits: torch.Tensor, name: str, nothing_left: str, temperature: float
) -> None:
    """Turn the kernels' -1 rows into an error that says what is wrong with which argument."""
    bad = out < 0
    if not bool(bad.any()):
        return
    b, pos = (int(i) for i in bad.nonzero()[0])
    row = logits[b, pos].float()
    if bool(row.isnan().any()):
        what = "holds NaN"
    elif bool((row == math.inf).any()):
        what = "holds +inf"
    elif bool((row == -math.inf).all()):
        what = "is -inf everywhere"
    elif _invalid_scaled(row, temperature):
        largest = float(row[row.isfinite()].abs().max())
        raise InvalidRowsError(
            f"{name}[{b}, {pos}] / temperature overflows float32 (|logits| up to {largest:g}, "
            f"temperature = {temperature:g}): use a larger temperature"
        )
    else:
        what = nothing_left or "cannot be sampled"
    raise InvalidRowsError(f"{name}[{b}, {pos}] {what}: no distribution to sample from")


def _invalid_scaled(rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """Whether each row of logits / temperature (as the kernels scale them, in float32; the
    logits themselves at temperature 0) holds NaN or +inf or nothing finite: a tiny temperature
    overflows finite logits."""
    scaled = rows.float() * (1.0 / temperature) if temperature else rows.float()
    return (scaled.isnan() | (scaled == math.inf)).any(-1) | ~(scaled > -math.inf).any(-1)


def _prepare_jump(logits, x_t, rate_scale, h, generator, validate):
    B, L, V = _check_rows(logits, "logits")
    _check_tokens(x_t, B, L, logits.device, "x_t")
    check_generator(generator, logits.device)
    if validate:
        check_token_range(x_t, V, "x_t")
    rate_scale = rate_scale_of(rate_scale, B, logits.device, validate)
    h = per_sequence(h, B, logits.device, "h", check_values=validate)
    return rate_scale, h


def _prepare_generator(probs, x_t, rate_scale, barrier, validate):
    B, L, V = _check_rows(probs, "probs")
    _check_tokens(x_t, B, L, probs.device, "x_t")
    check_scalars(barrier, 1.0)
    if validate:
        check_token_range(x_t, V, "x_t")
        if bool(probs.isnan().any()) or bool((probs < 0).any()):
            raise ValueError("probs must be non-negative and free of NaN")
    return rate_scale_of(rate_scale, B, probs.device, validate)


def _prepare_sample(logits, exclude, generator, validate):
    """(exclusion tensor, exclusion token) after the checks of sample_categorical(_ref)."""
    B, L, V = _check_rows(logits, "logits")
    check_generator(generator, logits.device)
    ex_tensor, ex_token = _exclusion(exclude, B, L, V, logits.device)
    if validate and ex_tensor is not None:
        check_token_range(ex_tensor, V, "exclude")
    return ex_tensor, ex_token


# ---------------------------------------------------------------------------------------------
# Native ops.


def probs_to_generator(
    probs: torch.Tensor,
    x_t: torch.Tensor,
    rate_scale: float | torch.Tensor,
    *,
    barrier: float = math.inf,
    validate: bool = True,
) -> torch.Tensor:
    """Jump rates [B, L, V] (dtype of ``probs``):
    u(x) = max(rate_scale * (p(x) - delta_{x_t}(x)), 0) for reachable x != x_t; u(x_t) = 0.

    ``probs`` [B, L, V] must be non-negative (rows need not sum to one); with ``validate`` NaN or
    negative entries raise, otherwise such rows come back as NaN.
    """
    rate_scale = _prepare_generator(probs, x_t, rate_scale, barrier, validate)
    _require_native(probs.device)
    return torch.ops.fsdfm.probs_to_generator(probs, x_t, rate_scale, float(barrier))


def jump_step(
    logits: torch.Tensor,
    x_t: torch.Tensor,
    rate_scale: float | torch.Tensor,
    h: float | torch.Tensor,
    *,
    barrier: float = math.inf,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """x_next [B, L]: stay at x_t with probability exp(-h * lambda), else jump to x ~ p on the
    allowed x != x_t, where p = softmax(logits / temperature), the allowed tokens are those the
    barrier and the controls keep, and lambda = max(rate_scale, 0) * sum_{allowed x != x_t} p(x).
    Fused: one pass over the logits (a few more with top_k / top_p, none of them a sort)."""
    controls = sampling_controls(temperature, barrier, top_k, top_p, min_p)
    rate_scale, h = _prepare_jump(logits, x_t, rate_scale, h, generator, validate)
    _require_native(logits.device)
    out = torch.ops.fsdfm.jump_step(logits, x_t, rate_scale, h, *controls.op_args(), generator)
    if validate:
        _raise_invalid_rows(out, logits, "logits", "", controls.temperature)
    return out


def sample_categorical(
    logits: torch.Tensor,
    *,
    exclude: int | torch.Tensor | None = None,
    barrier: float = math.inf,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """tokens [B, L] drawn from p = softmax(logits / temperature) restricted to the tokens the
    barrier and the controls keep, other than ``exclude`` (None, one token id for all positions,
    or int64 [B, L]; left out before top-k / top-p count); temperature 0 takes the argmax."""
    controls = sampling_controls(temperature, barrier, top_k, top_p, min_p)
    ex_tensor, ex_token = _prepare_sample(logits, exclude, generator, validate)
    _require_native(logits.device)
    out = torch.ops.fsdfm.sample_categorical(
        logits, ex_tensor, ex_token, *controls.op_args(), generator
    )
    if validate:
        _raise_invalid_rows(out, logits, "logits", _NOTHING_LEFT, controls.temperature)
    return out


if _IMPORT_ERROR is None:

    @torch.library.register_fake("fsdfm::probs_to_generator")
    def _probs_to_generator_fake(probs, x_t, rate_scale, barrier):
        return probs.new_empty(probs.shape)

    @torch.library.register_fake("fsdfm::jump_step")
    def _jump_step_fake(logits, x_t, rate_scale, h, barrier, temperature, top_k, top_p,
                        generator):  # fmt: skip
        return logits.new_empty(logits.shape[:2], dtype=torch.int64)

    @torch.library.register_fake("fsdfm::sample_categorical")
    def _sample_categorical_fake(logits, exclude, exclude_token, barrier, temperature, top_k,
                                 top_p, generator):  # fmt: skip
        return logits.new_empty(logits.shape[:2], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# References: the released code's way, materialised, float64 multinomial.


def _reachable(p: torch.Tensor, barrier: float) -> torch.Tensor | None:
    """Mask of tokens with p(x) >= max_y p(y) * exp(-barrier); None when barrier = inf."""
    if barrier == math.inf:
        return None
    return p >= p.amax(dim=-1, keepdim=True) * math.exp(-barrier)


def probs_to_generator_ref(
    probs: torch.Tensor,
    x_t: torch.Tensor,
    rate_scale: float | torch.Tensor,
    *,
    barrier: float = math.inf,
    validate: bool = True,
) -> torch.Tensor:
    """Reference of :func:`probs_to_generator` (one-hot, difference, clip, all materialised)."""
    rate_scale = _prepare_generator(probs, x_t, rate_scale, barrier, validate)
    return _generator_reference(probs, x_t, rate_scale, barrier).to(probs.dtype)


def _generator_reference(probs, x_t, rate_scale, barrier, kept=None) -> torch.Tensor:
    """probs_to_generator_ref on checked arguments, in float32; ``kept`` (a mask) removes the
    destinations that top-k / top-p drop."""
    V = probs.shape[2]
    p = probs.float()
    one_hot = torch.nn.functional.one_hot(x_t, V).float()
    rates = rate_scale[:, None, None] * (p - one_hot)
    for allowed in (_reachable(p, barrier), kept):
        if allowed is not None:
            rates = torch.where(allowed, rates, torch.zeros_like(rates))
    rates = rates.clamp_min(0.0)
    rates.scatter_(-1, x_t[..., None], 0.0)
    return rates


def _control_floor(scaled: torch.Tensor, controls: Controls, skip: torch.Tensor | None):
    """The floor [B, L, 1] of top-k / top-p on the scaled logits, by sorting the rows (what the
    kernels avoid), or None when both are off. ``skip`` (a mask) leaves the draw's exclusion out
    of the count and the mass."""
    if not controls.filters:
        return None
    V = scaled.shape[-1]
    s = scaled if skip is None else scaled.masked_fill(skip, -math.inf)
    n = V - (0 if skip is None else 1)
    floor = torch.full_like(s[..., :1], -math.inf)
    if 0 < controls.top_k < n:
        floor = s.topk(controls.top_k, dim=-1).values[..., -1:]
    if controls.top_p < 1:
        kept = s >= floor
        m = scaled.amax(-1, keepdim=True)
        mass = torch.where(kept, torch.exp((s - m).double()), 0.0)
        values, order = s.masked_fill(~kept, -math.inf).sort(-1, descending=True)
        cumulative = mass.gather(-1, order).cumsum(-1)
        target = controls.top_p * cumulative[..., -1:]
        first = (cumulative < target).sum(-1, keepdim=True).clamp_max(V - 1)
        floor = torch.where(target > 0, torch.maximum(floor, values.gather(-1, first)), floor)
    return floor


def _skip_mask(ex_tensor, ex_token, shape, device) -> torch.Tensor | None:
    """The exclusion of sample_categorical as a mask [B, L, V], or None."""
    if ex_tensor is not None:
        return torch.nn.functional.one_hot(ex_tensor, shape[-1]).bool()
    if ex_token >= 0:
        skip = torch.zeros(shape, dtype=torch.bool, device=device)
        skip[..., ex_token] = True
        return skip
    return None


def _multinomial_rows(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One float64 multinomial draw per row of [N, V] weights."""
    return torch.multinomial(weights.double(), 1, generator=generator).squeeze(-1)


def jump_step_ref(
    logits: torch.Tensor,
    x_t: torch.Tensor,
    rate_scale: float | torch.Tensor,
    h: float | torch.Tensor,
    *,
    barrier: float = math.inf,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Reference of :func:`jump_step`: softmax, the controls' floor by sorting, generator
    tensor, total rate, Bernoulli jump, float64 multinomial over the rates of the jumping
    positions; at temperature 0 torch.argmax and a Bernoulli jump to it."""
    controls = sampling_controls(temperature, barrier, top_k, top_p, min_p)
    rate_scale, h = _prepare_jump(logits, x_t, rate_scale, h, generator, validate)
    return _jump_reference(logits, x_t, rate_scale, h, controls, generator, validate)


def _jump_reference(logits, x_t, rate_scale, h, controls: Controls, generator, validate):
    """jump_step_ref on checked arguments (rate_scale and h float32 [B])."""
    T = controls.temperature
    if validate:
        _raise_invalid_rows(_finite_rows(logits, T), logits, "logits", "", T)
    B, L, V = logits.shape
    u = torch.rand((B, L), generator=generator, dtype=torch.float64, device=logits.device)
    if controls.greedy:
        argmax = logits.float().argmax(-1)  # the first maximal value: the lowest id
        rate = (h * rate_scale.clamp_min(0.0)).double()[:, None]
        p_jump = torch.where(argmax != x_t, -torch.expm1(-rate), 0.0)
        return torch.where(u < p_jump, argmax, x_t)
    scaled = logits.float() / T
    probs = torch.softmax(scaled, dim=-1)
    floor = _control_floor(scaled, controls, None)
    kept = None if floor is None else scaled >= floor
    rates = _generator_reference(probs, x_t, rate_scale, controls.barrier, kept)
    total_rate = rates.sum(dim=-1)
    p_jump = -torch.expm1(-h[:, None].double() * total_rate.double())
    jump = u < p_jump
    x_next = x_t.clone()
    rows = jump.nonzero(as_tuple=True)
    if rows[0].numel():
        x_next[rows] = _multinomial_rows(rates[rows], generator)
    return x_next


def _finite_rows(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """-1 where logits / temperature has NaN / +inf or no finite entry in a row (what the
    kernels report), else 0."""
    return torch.where(_invalid_scaled(logits, temperature), INVALID_TOKEN, 0)


def sample_categorical_ref(
    logits: torch.Tensor,
    *,
    exclude: int | torch.Tensor | None = None,
    barrier: float = math.inf,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Reference of :func:`sample_categorical`: softmax, masks, float64 multinomial (argmax at
    temperature 0)."""
    controls = sampling_controls(temperature, barrier, top_k, top_p, min_p)
    ex_tensor, ex_token = _prepare_sample(logits, exclude, generator, validate)
    return _categorical_reference(logits, ex_tensor, ex_token, controls, generator, validate)


def _categorical_reference(logits, ex_tensor, ex_token, controls: Controls, generator, validate):
    """sample_categorical_ref on checked arguments."""
    B, L, V = logits.shape
    T = controls.temperature
    if validate:
        _raise_invalid_rows(_finite_rows(logits, T), logits, "logits", "", T)
    skip = _skip_mask(ex_tensor, ex_token, logits.shape, logits.device)
    if controls.greedy:
        candidates = logits.float() if skip is None else logits.float().masked_fill(skip, -math.inf)
        best, argmax = candidates.max(-1)
        out = torch.where(best > -math.inf, argmax, INVALID_TOKEN)
        if validate:
            _raise_invalid_rows(out, logits, "logits", _NOTHING_LEFT, T)
        return out
    scaled = logits.float() / T
    probs = torch.softmax(scaled, dim=-1)
    weights = probs
    floor = _control_floor(scaled, controls, skip)
    for remove in (
        None if controls.barrier == math.inf else ~_reachable(probs, controls.barrier),
        None if floor is None else scaled < floor,
        skip,
    ):
        if remove is not None:
            weights = weights.masked_fill(remove, 0.0)
    if validate:
        empty = torch.where(weights.sum(-1) > 0, 0, INVALID_TOKEN)
        _raise_invalid_rows(empty, logits, "logits", _NOTHING_LEFT, T)
    return _multinomial_rows(weights.reshape(B * L, V), generator).reshape(B, L)


# ---------------------------------------------------------------------------------------------
# The draws of one sampling loop.


class Kernels:
    """The two draws of a sampling loop (the jump and the categorical draw) from one backend,
    chosen once per call of ``fsdfm.sample``: "native" (fsdfm._C), "reference" (the *_ref
    functions) or "auto" (native when built for ``device``). The methods take arguments that the
    caller has checked (logits [B, L, V] of a supported dtype, rate_scale and h float32 [B] on
    the logits' device), so that a step does no argument checks and no dispatcher query.

    Native draws mark a row they cannot sample with -1 and never synchronise; reference draws
    synchronise anyway, so they raise :class:`InvalidRowsError` at once (``validate``)."""

    def __init__(self, backend: str, device: torch.device):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        available = native_available(device)
        if backend == "native" and not available:
            raise RuntimeError(
                f"backend='native' but fsdfm._C has no kernels for {device.type}; "
                "build the extension or use backend='reference'"
            )
        self.native = backend == "native" or (backend == "auto" and available)

    def jump(self, logits, x_t, rate_scale, h, controls: Controls, generator) -> torch.Tensor:
        """x_next [B, L]: :func:`jump_step`."""
        if self.native:
            return torch.ops.fsdfm.jump_step(
                logits, x_t, rate_scale, h, *controls.op_args(), generator
            )
        return _jump_reference(logits, x_t, rate_scale, h, controls, generator, True)

    def categorical(self, logits, exclude_token, controls: Controls, generator) -> torch.Tensor:
        """tokens [B, L]: :func:`sample_categorical` with one excluded id (-1: none)."""
        if self.native:
            return torch.ops.fsdfm.sample_categorical(
                logits, None, exclude_token, *controls.op_args(), generator
            )
        return _categorical_reference(logits, None, exclude_token, controls, generator, True)
