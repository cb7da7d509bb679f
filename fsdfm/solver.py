"""Sampling from a discrete flow-matching model: the solvers of SPEC 2 behind `fsdfm.sample`.

Time grid for ``steps = N``: t_k = k / N, h = 1 / N, k = 0..N-1, one model call per step. Every
step but the last moves the tokens with the chosen solver; the last collapses (SPEC 2.2):

- ``"cumulative"`` (FS-DFM, SPEC 2.1): ``jump_step`` with rate_scale = alpha(t, h), the cumulative
  scalar of the schedule;
- ``"euler"`` (SPEC 2.4): ``jump_step`` with rate_scale = 1 / h. The jump probability is
  1 - exp(-h lambda) exactly (the reference caps h lambda at 50, a change below 2e-22) and there is
  no 1e-9 floor under the rates;
- ``"dfm"`` (SPEC 2.5): draw x_hat ~ p and move to it with probability
  1 - exp(-h kappa_dot / (1 - kappa)) (no move when x_hat is the current token);
- last step: every position (uniform source) or every still-masked position (mask source, the mask
  token's probability removed) is drawn from p.

Positions outside ``edit_mask`` (and a ``prompt`` prefix) are frozen (SPEC 2.6). The loop has
static shapes and no host synchronisation: the native kernels mark a row they cannot sample (NaN
logits, nothing reachable) with -1, which is accumulated on the device and reported once, after
the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fsdfm import ops
from fsdfm.path import PolynomialSchedule, check_source, sample_source

SOLVERS = ("cumulative", "euler", "dfm")
BACKENDS = ("auto", "native", "reference")


@dataclass(frozen=True)
class _Setup:
    batch_size: int
    seq_len: int
    vocab_size: int  # the model's output size (V + 1 with a mask source)
    source: str
    device: torch.device

    @property
    def mask_id(self) -> int | None:
        return self.vocab_size - 1 if self.source == "mask" else None

    @property
    def real_vocab(self) -> int:
        return self.vocab_size - 1 if self.source == "mask" else self.vocab_size


def _model_device(model) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return None


def _logits_of(model, x, t, h, setup: _Setup | None, step: int) -> torch.Tensor:
    """Call the model and check what it returns (metadata only: no synchronisation)."""
    logits = model(x, t, h)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"model must return floating-point logits, got {type(logits).__name__}"
            + (f" of {logits.dtype}" if isinstance(logits, torch.Tensor) else "")
        )
    B, L = x.shape
    if (
        logits.dim() != 3
        or logits.shape[:2] != (B, L)
        or (setup is not None and logits.shape[2] != setup.vocab_size)
    ):
        want = f"[{B}, {L}, {setup.vocab_size if setup else 'V'}]"
        raise ValueError(
            f"model returned logits of shape {tuple(logits.shape)} at step {step}, expected {want}"
        )
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        logits = logits.float()
    return logits


def _resolve_setup(model, batch_size, seq_len, source, vocab_size, device) -> _Setup:
    config = getattr(model, "config", None)
    if config is not None:
        seq_len = config.seq_len if seq_len is None else seq_len
        vocab_size = config.vocab_size if vocab_size is None else vocab_size
        source = getattr(config, "source", "uniform") if source is None else source
    if seq_len is None:
        raise ValueError("seq_len is required for a model without a config")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    source = check_source("uniform" if source is None else source)
    device = torch.device(device) if device is not None else _model_device(model)
    return _Setup(batch_size, seq_len, vocab_size, source, device or torch.device("cpu"))


def _frozen_layout(setup: _Setup, prompt, init, edit_mask):
    """(init tokens, edit mask) as [B, L] tensors, or (None, None) when everything is generated."""
    B, L, device = setup.batch_size, setup.seq_len, setup.device
    if init is not None and edit_mask is None:
        raise ValueError("init needs edit_mask (True where tokens are generated)")
    if edit_mask is not None:
        if not isinstance(edit_mask, torch.Tensor) or edit_mask.dtype != torch.bool:
            raise TypeError("edit_mask must be a bool tensor [B, L]")
        if tuple(edit_mask.shape) != (B, L):
            raise ValueError(
                f"edit_mask must have shape [B, L] = [{B}, {L}], got {tuple(edit_mask.shape)}"
            )
        edit_mask = edit_mask.to(device)
        if init is None and prompt is None:
            raise ValueError("edit_mask needs init (the tokens of the frozen positions)")
    if init is not None:
        if not isinstance(init, torch.Tensor) or init.dtype != torch.int64:
            raise TypeError("init must be an int64 tensor [B, L]")
        if tuple(init.shape) != (B, L):
            raise ValueError(f"init must have shape [B, L] = [{B}, {L}], got {tuple(init.shape)}")
        init = init.to(device)
    if prompt is not None:
        if not isinstance(prompt, torch.Tensor) or prompt.dtype != torch.int64:
            raise TypeError("prompt must be an int64 tensor [P] or [B, P]")
        if prompt.dim() == 1:
            prompt = prompt.expand(B, -1)
        if prompt.dim() != 2 or prompt.shape[0] != B:
            raise ValueError(
                f"prompt must have shape [P] or [B, P] with B = {B}, got {tuple(prompt.shape)}"
            )
        P = prompt.shape[1]
        if P > L:
            raise ValueError(f"prompt has {P} tokens, longer than seq_len = {L}")
        init = torch.zeros(B, L, dtype=torch.long, device=device) if init is None else init.clone()
        init[:, :P] = prompt.to(device)
        edit_mask = (
            torch.ones(B, L, dtype=torch.bool, device=device)
            if edit_mask is None
            else edit_mask.clone()
        )
        edit_mask[:, :P] = False
    if init is not None:
        frozen = init[~edit_mask]
        if frozen.numel() and bool(((frozen < 0) | (frozen >= setup.real_vocab)).any()):
            bad = frozen[(frozen < 0) | (frozen >= setup.real_vocab)][0].item()
            name = "prompt" if prompt is not None else "init"
            raise ValueError(
                f"{name} holds token id {bad}, outside the vocabulary [0, {setup.real_vocab})"
            )
    return init, edit_mask


class _Ops:
    """The two draws the solvers need, from the native kernels or the references."""

    def __init__(self, backend: str, device: torch.device):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        native = ops.native_available(device)
        if backend == "native" and not native:
            raise RuntimeError(
                f"backend='native' but fsdfm._C has no kernels for {device.type}; "
                "build the extension or use backend='reference'"
            )
        self.native = backend == "native" or (backend == "auto" and native)
        # The references synchronise anyway, so they validate (and raise) at once.
        self.jump_step = ops.jump_step if self.native else ops.jump_step_ref
        self.sample_categorical = (
            ops.sample_categorical if self.native else ops.sample_categorical_ref
        )
        self.kw = {"validate": not self.native}


def sample(
    model: Callable,
    steps: int = 8,
    *,
    batch_size: int = 1,
    seq_len: int | None = None,
    source: str | None = None,
    solver: str = "cumulative",
    prompt: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    edit_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    barrier: float = math.inf,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    return_trajectory: bool = False,
    callback: Callable | None = None,
    progress: bool = False,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
    schedule: PolynomialSchedule | None = None,
):
    """Generate token sequences [B, L] from a discrete flow-matching model in ``steps`` calls.

    model: an fsdfm model (its ``config`` gives seq_len, vocab_size and source) or any callable
        ``model(x_t, t, h)`` with x_t int64 [B, L], t and h float [B] (h: this step's size),
        returning logits [B, L, V]. A model that ignores h (a DFM teacher) works the same way.
        For a bare callable ``seq_len`` is required, ``source`` defaults to "uniform" and V is
        ``vocab_size`` or, if that is not given, read off one extra call on an all-zero input.
    solver: "cumulative" (FS-DFM), "euler" or "dfm" (see the module docstring).
    prompt: int64 [P] or [B, P], a frozen prefix. init / edit_mask: int64 / bool [B, L]; where
        edit_mask is False the init tokens stay, where True tokens are generated.
    temperature, barrier: of p = softmax(logits / temperature) and the energy barrier (SPEC 2.3).
    generator: a torch.Generator on the model's device: the same seed gives the same tokens.
    backend: "native" (fsdfm._C), "reference" (the *_ref ops) or "auto" (native when built).
    return_trajectory: also return the states [steps + 1, B, L] (x_0, then after each step).
    callback: ``callback(step, t, x)`` after each step (step = 1..steps, t the time reached).
    progress: show a tqdm bar.
    device: where to sample for a bare callable (default: the model's parameters, else CPU).
    schedule: the path's schedule (default kappa_t = t).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if math.isnan(barrier) or barrier < 0:
        raise ValueError(f"barrier must be >= 0 (math.inf disables it), got {barrier!r}")
    schedule = schedule or PolynomialSchedule()
    setup = _resolve_setup(model, batch_size, seq_len, source, vocab_size, device)
    if generator is not None and generator.device.type != setup.device.type:
        raise ValueError(f"generator is for {generator.device} but sampling runs on {setup.device}")
    draw = _Ops(backend, setup.device)
    B, L = setup.batch_size, setup.seq_len
    h = 1.0 / steps
    h_vec = torch.full((B,), h, device=setup.device)
    if setup.vocab_size is None:
        probe = torch.zeros(B, L, dtype=torch.long, device=setup.device)
        V = _logits_of(model, probe, torch.zeros_like(h_vec), h_vec, None, 0).shape[2]
        setup = _Setup(B, L, V, setup.source, setup.device)
    init, edit_mask = _frozen_layout(setup, prompt, init, edit_mask)

    x = sample_source(
        setup.source, B, L, setup.vocab_size, device=setup.device, generator=generator
    )
    if edit_mask is not None:
        x = torch.where(edit_mask, x, init)
    trajectory = [x] if return_trajectory else None
    invalid = torch.zeros((), dtype=torch.bool, device=setup.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=setup.device)
    opts = {"barrier": barrier, "temperature": temperature, "generator": generator, **draw.kw}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"fsdfm {solver}", unit="step")
    for k in range(steps):
        t = k * h
        t_vec = torch.full((B,), t, device=setup.device)
        try:
            logits = _logits_of(model, x, t_vec, h_vec, setup, k + 1)
            if k < steps - 1:
                x_new = _move(draw, solver, schedule, logits, x, t, h, opts, generator)
            else:
                x_new = _collapse(draw, setup, logits, x, opts)
        except ValueError as error:  # the references validate every step
            if "logits[" in str(error):
                raise ValueError(f"model output at step {k + 1}: {error}") from error
            raise
        if draw.native:
            bad = (x_new < 0).any()
            first_bad = torch.where(bad & ~invalid, k + 1, first_bad)
            invalid = invalid | bad
            x_new = x_new.clamp_min(0)  # keep the next model call in range; reported below
        x = x_new if edit_mask is None else torch.where(edit_mask, x_new, x)
        if trajectory is not None:
            trajectory.append(x)
        if callback is not None:
            callback(k + 1, t + h, x)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if draw.native and bool(invalid):
        raise ValueError(
            f"model output at step {int(first_bad)} had a row with NaN or +inf logits, all -inf, "
            "or no token within the barrier: no distribution to sample from"
        )
    if trajectory is not None:
        return x, torch.stack(trajectory)
    return x


def _move(draw: _Ops, solver, schedule, logits, x, t, h, opts, generator):
    """One step of the solver from time t (all steps but the last)."""
    if solver == "cumulative":
        return draw.jump_step(logits, x, schedule.cumulative_scalar(t, h), h, **opts)
    if solver == "euler":
        return draw.jump_step(logits, x, schedule.euler_scalar(h), h, **opts)
    # dfm: move to a fresh draw x_hat with probability 1 - exp(-h kappa_dot / (1 - kappa)).
    x_hat = draw.sample_categorical(logits, **opts)
    p_move = -math.expm1(-h * schedule.dfm_rate(t))
    u = torch.rand(x.shape, device=x.device, generator=generator)
    # A -1 (a row the kernel could not sample) is passed on even where no move happens.
    return torch.where((u < p_move) | (x_hat < 0), x_hat, x)


def _collapse(draw: _Ops, setup: _Setup, logits, x, opts):
    """The last step: draw every position (uniform source) or every masked one (mask source)."""
    if setup.mask_id is None:
        return draw.sample_categorical(logits, **opts)
    drawn = draw.sample_categorical(logits, exclude=setup.mask_id, **opts)
    return torch.where(x == setup.mask_id, drawn, x)
