"""Sampling from a discrete flow-matching model: the solvers of SPEC 2 behind `fsdfm.sample`.

Time grid for ``steps = N``: t_k = k / N, h = 1 / N, k = 0..N-1, one model call per step. Every
step but the last moves the tokens with the chosen solver; the last collapses (SPEC 2.2):

- ``"cumulative"`` (FS-DFM, SPEC 2.1): ``jump_step`` with rate_scale = alpha(t, h), the cumulative
  scalar of the schedule;
- ``"euler"`` (SPEC 2.4): ``jump_step`` with rate_scale = 1 / h. The jump probability is
  1 - exp(-h lambda) exactly (the reference caps h lambda at 50, a change below 2e-22) and there is
  no 1e-9 floor under the rates; with the mask source only still-masked positions move;
- ``"dfm"`` (SPEC 2.5): draw x_hat ~ p and move to it with probability
  1 - exp(-h kappa_dot / (1 - kappa)) (no move when x_hat is the current token); with the mask
  source x_hat is drawn without the mask token and only still-masked positions move;
- ``"dilated"`` (mask source only, :mod:`fsdfm.dilation`): a planned step. Positions are revealed
  in the dilated order, far-apart ones first, round(M kappa_{t+h}) - round(M kappa_t) of a row's
  M generated positions in the step from t, each drawn from p without the mask token; the others
  stay. Where the revealed positions of a step are conditionally independent given x_t (for
  chain-like laws: separated by revealed positions) the step loses nothing to factorisation;
- last step: every position (uniform source) or every still-masked position (mask source, the mask
  token's probability removed) is drawn from p.

Positions outside ``edit_mask`` (and a ``prompt`` prefix) are frozen (SPEC 2.6). The loop has
static shapes and no host synchronisation: the native kernels mark a row they cannot sample (NaN
logits, nothing reachable) with -1, which is accumulated on the device and reported once, after
the loop.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fsdfm import dilation, head, ops, path
from fsdfm._args import model_device, positive_int, resolve_device
from fsdfm.path import PolynomialSchedule, check_source, sample_source
from fsdfm.progress import Progress

SOLVERS = ("cumulative", "euler", "dfm", "dilated")


@dataclass(frozen=True)
class _Setup:
    batch_size: int
    seq_len: int
    vocab_size: int  # the model's output size (V + 1 with a mask source)
    source: str
    device: torch.device

    @property
    def mask_id(self) -> int | None:
        return path.mask_id(self.source, self.vocab_size)

    @property
    def real_vocab(self) -> int:
        return path.real_vocab_size(self.source, self.vocab_size)


def _logits_of(model, x, t, h, setup: _Setup | None, step: int) -> torch.Tensor:
    """Call the model and check what it returns (metadata only: no synchronisation). This is the
    one check of the logits in a step: the draws are called on them as they are."""
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
            f"model returned logits of shape {tuple(logits.shape)} at step {int(step)}, "
            f"expected {want}"
        )
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        logits = logits.float()
    return logits


def _resolve_setup(model, batch_size, seq_len, source, vocab_size, device) -> _Setup:
    config = getattr(model, "config", None)
    if config is not None:
        trained = getattr(config, "source", "uniform")
        # The model's own source and vocabulary are facts about its training, not choices: a
        # uniform model's last id is a real token, a mask model's is the mask.
        if source is not None and check_source(source) != trained:
            raise ValueError(
                f"source={source!r} but this model was trained with the {trained!r} source "
                "(leave source=None)"
            )
        if vocab_size is not None and vocab_size != config.vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size!r} but this model has {config.vocab_size} outputs "
                "(leave vocab_size=None)"
            )
        seq_len = config.seq_len if seq_len is None else seq_len
        vocab_size, source = config.vocab_size, trained
    if seq_len is None:
        raise ValueError("seq_len is required for a model without a config")
    positive_int(batch_size, "batch_size")
    positive_int(seq_len, "seq_len")
    if config is not None and seq_len > config.seq_len:
        raise ValueError(f"seq_len = {seq_len} exceeds the model's seq_len = {config.seq_len}")
    if vocab_size is not None:
        positive_int(vocab_size, "vocab_size")
    source = check_source("uniform" if source is None else source)
    device = resolve_device(device) if device is not None else model_device(model)
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
        name = "prompt" if prompt is not None else "init"
        ops.check_token_range(init[~edit_mask], setup.real_vocab, name)
    return init, edit_mask


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
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    return_trajectory: bool = False,
    callback: Callable | None = None,
    progress: bool = False,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
    schedule: PolynomialSchedule | None = None,
    cuda_graph: bool = False,
    fused_head: str | bool = "auto",
):
    """Generate token sequences [B, L] from a discrete flow-matching model in ``steps`` calls.

    model: an fsdfm model (its ``config`` gives seq_len, vocab_size and source) or any callable
        ``model(x_t, t, h)`` with x_t int64 [B, L], t and h float [B] (h: this step's size),
        returning logits [B, L, V]. A model that ignores h (a DFM teacher) works the same way.
        For a bare callable ``seq_len`` is required, ``source`` defaults to "uniform" and V is
        ``vocab_size`` or, if that is not given, read off one extra call on an all-zero input.
    solver: "cumulative" (FS-DFM), "euler", "dfm" or, for a mask-source model, "dilated" (see
        the module docstring).
    prompt: int64 [P] or [B, P], a frozen prefix. init / edit_mask: int64 / bool [B, L]; where
        edit_mask is False the init tokens stay, where True tokens are generated.
    temperature, barrier: of p = softmax(logits / temperature) and the energy barrier (SPEC 2.3).
        temperature=0 is the T -> 0 limit: every draw takes the argmax (greedy).
    top_k, top_p, min_p: Hugging Face's sampling controls, applied to p in every step and in the
        collapse (see :mod:`fsdfm.ops`): rates to the tokens they remove are zero, and the
        collapse draws from p restricted to the kept tokens. min_p is the barrier -ln(min_p).
    generator: a torch.Generator on the model's device: the same seed gives the same tokens.
    backend: "native" (fsdfm._C), "reference" (the *_ref ops) or "auto" (native when built).
    return_trajectory: also return the states [n + 1, B, L] (x_0, then after each of the n
        steps taken: ``steps`` unless the callback finished early).
    callback: ``callback(step, t, x)`` after each step (step = 1..steps, t the time reached).
        Returning True finishes early: the next model call is the last step (the collapse), so
        the result is a complete sample in fewer calls. Anything else (None) goes on.
    progress: show progress on stderr (a bar on a terminal, plain lines elsewhere).
    device: where to sample for a bare callable (default: the model's parameters, else CPU).
    schedule: the path's schedule (default kappa_t = t).
    cuda_graph: on CUDA with the native backend, capture one step in a CUDA graph and replay it
        for every step but the last (the model must be capturable: no host synchronisation).
    fused_head: True to draw from the model's final hidden states with the fused head
        (:mod:`fsdfm.head`: no [B, L, V] logits are made; the same law, other draws), which needs
        an fsdfm model (``head_inputs``); False for the logits path; "auto" (the default): the
        fused head for fsdfm models with the native backend, the logits path otherwise. The
        fused head makes the row a tile at a time, so top_k, top_p and temperature=0, which
        need the whole row first, take the logits path ("auto") or are refused (True).
    """
    states = sample_iter(
        model, steps, batch_size=batch_size, seq_len=seq_len, source=source, solver=solver,
        prompt=prompt, init=init, edit_mask=edit_mask, temperature=temperature, barrier=barrier,
        top_k=top_k, top_p=top_p, min_p=min_p, generator=generator, backend=backend,
        callback=callback, progress=progress, vocab_size=vocab_size, device=device,
        schedule=schedule, cuda_graph=cuda_graph, fused_head=fused_head,
    )  # fmt: skip
    trajectory = [state.x for state in states]
    if return_trajectory:
        return trajectory[-1], torch.stack(trajectory)
    return trajectory[-1]


class SampleStep(NamedTuple):
    """The state of a sampling run after ``step`` of ``steps`` model calls (step 0: the source
    noise x_0, before any call). ``t`` is the time reached; ``last`` marks the final state, after
    the collapse."""

    step: int
    steps: int
    t: float
    x: torch.Tensor
    last: bool


def sample_iter(model: Callable, steps: int = 8, **kwargs) -> Iterator[SampleStep]:
    """:func:`sample` one step at a time: yields a :class:`SampleStep` for x_0 and after every
    step, the last one (``last=True``) holding the sample, for streaming and live display. Takes
    the arguments of :func:`sample` but ``return_trajectory``. Every yielded ``x`` is the
    sampler's own tensor: reading it (``.tolist()``, printing) synchronises with the device, so
    a loop that only wants the result should call :func:`sample`. Rows that could not be
    sampled are reported when the iteration ends (a consumer that stops early skips that check).
    """
    if "return_trajectory" in kwargs:
        raise TypeError("sample_iter yields every state: it takes no return_trajectory")
    return _iterate(_prepare(model, steps, **kwargs))  # checked now, not at the first next()


@dataclass
class _Run:
    """A checked sampling call (see ``sample``), ready to iterate."""

    model: Callable
    setup: _Setup
    draw: ops.Kernels
    steps: int
    solver: str
    schedule: PolynomialSchedule
    frozen: tuple  # (prompt, init, edit_mask) as given
    opts: dict
    callback: Callable | None
    progress: bool
    cuda_graph: bool


def _prepare(
    model, steps=8, *, batch_size=1, seq_len=None, source=None, solver="cumulative", prompt=None,
    init=None, edit_mask=None, temperature=1.0, barrier=math.inf, top_k=None, top_p=None,
    min_p=None, generator=None, backend="auto", callback=None, progress=False, vocab_size=None,
    device=None, schedule=None, cuda_graph=False, fused_head="auto",
) -> _Run:  # fmt: skip
    positive_int(steps, "steps")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    controls = ops.sampling_controls(temperature, barrier, top_k, top_p, min_p)
    schedule = _check_schedule(schedule)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    setup = _resolve_setup(model, batch_size, seq_len, source, vocab_size, device)
    if solver == "dilated" and setup.source != "mask":
        raise ValueError(
            "solver='dilated' needs a mask-source model (it reveals masked positions in a planned "
            f"order), this one has the {setup.source!r} source"
            + (" (pass source='mask')" if getattr(model, "config", None) is None else "")
        )
    ops.check_generator(generator, setup.device, "sampling runs")
    draw = ops.Kernels(backend, setup.device)
    fused = _fused_head(fused_head, model, draw, controls)
    if cuda_graph and (setup.device.type != "cuda" or not draw.native):
        raise ValueError("cuda_graph=True needs sampling on CUDA with the native backend")
    if not draw.native and setup.device.type == "cuda":
        warnings.warn(
            "fsdfm.sample on CUDA with the reference ops: every step synchronises with the host "
            "(build the CUDA kernels for the native backend)",
            stacklevel=3,
        )
    opts = {"controls": controls, "generator": generator, "fused": fused}
    return _Run(model, setup, draw, steps, solver, schedule, (prompt, init, edit_mask), opts,
                callback, progress, cuda_graph)  # fmt: skip


def _check_schedule(schedule):
    if schedule is None:
        return PolynomialSchedule()
    needed = ("kappa", "cumulative_scalar", "euler_scalar", "dfm_rate")
    if not all(callable(getattr(schedule, name, None)) for name in needed):
        raise TypeError(
            f"schedule must be a PolynomialSchedule (or have {', '.join(needed)}), got {schedule!r}"
        )
    return schedule


def _fused_head(fused_head, model, draw: ops.Kernels, controls: ops.Controls) -> bool:
    """Whether the loop draws from the model's hidden states (see ``sample``)."""
    if not (fused_head == "auto" or isinstance(fused_head, bool)):
        raise ValueError(f"fused_head must be 'auto', True or False, got {fused_head!r}")
    capable = callable(getattr(model, "head_inputs", None))
    if fused_head is True and not capable:
        raise ValueError(
            "fused_head=True needs an fsdfm model (with head_inputs); this model only gives logits"
        )
    whole_row = controls.filters or controls.greedy
    if fused_head is True and whole_row:
        raise ValueError(
            "fused_head=True cannot apply top_k, top_p or temperature=0 (they need the whole "
            "logits row before the draw); use fused_head='auto' or False"
        )
    return (
        capable and not whole_row and (fused_head is True or (fused_head == "auto" and draw.native))
    )


def _on_device(device: torch.device):
    """CUDA streams and graphs act on the current device: make it the sampling device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _iterate(run: _Run) -> Iterator[SampleStep]:
    """The sampling loop (see ``sample_iter``). The work between two yields runs without
    gradients and on the sampling device, the consumer's code between them in its own modes (a
    context held across a yield would leak into it). Sampling never needs gradients: without
    no_grad every step would keep the model's activations alive for a backward pass that never
    comes."""
    setup, steps, generator = run.setup, run.steps, run.opts["generator"]

    def working():
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(_on_device(setup.device))
        return stack

    B, L = setup.batch_size, setup.seq_len
    with working():
        if setup.vocab_size is None:
            probe = torch.zeros(B, L, dtype=torch.long, device=setup.device)
            t0 = torch.zeros(B, device=setup.device)
            V = _logits_of(run.model, probe, t0, t0 + 1.0 / steps, None, 0).shape[2]
            setup = _Setup(B, L, V, setup.source, setup.device)
        init, edit_mask = _frozen_layout(setup, *run.frozen)
        x = sample_source(
            setup.source, B, L, setup.vocab_size, device=setup.device, generator=generator
        )
        if edit_mask is not None:
            x = torch.where(edit_mask, x, init)
        loop = _Loop(run.model, setup, run.draw, run.solver, run.schedule, steps, edit_mask,
                     run.opts)  # fmt: skip
        if run.cuda_graph and steps > 1:
            loop.capture(x)
    yield SampleStep(0, steps, 0.0, x, False)
    with Progress(steps, f"fsdfm {run.solver}", enabled=run.progress) as bar:
        finish = False
        for k in range(steps):
            last = finish or k == steps - 1
            with working():
                x = loop.step(x, k, last=last)
            t = 1.0 if last else (k + 1) * loop.dt
            bar.update(steps - k if last else 1)
            if run.callback is not None and run.callback(k + 1, t, x) is True:
                finish = True  # the next step jumps to t = 1 (after the last, moot)
            yield SampleStep(k + 1, steps, t, x, last)
            if last:
                break
    loop.raise_if_invalid()


class _Loop:
    """One step of the sampler as device work only (no host synchronisation), so that it can run
    eagerly or be captured once in a CUDA graph and replayed: the step's time and number live in
    tensors, and rows the kernels could not sample are accumulated in `invalid` / `first_bad`.
    The per-sequence scalars of the solvers are computed from these tensors in float64."""

    def __init__(self, model, setup: _Setup, draw: ops.Kernels, solver, schedule, steps,
                 edit_mask, opts):  # fmt: skip
        self.model, self.setup, self.draw = model, setup, draw
        self.solver, self.schedule, self.edit_mask = solver, schedule, edit_mask
        self.steps, self.dt = steps, 1.0 / steps  # the grid t_k = k dt, in float64 on the host
        self.controls = opts["controls"]
        self.generator, self.fused = opts["generator"], opts["fused"]
        device, B = setup.device, setup.batch_size
        self.t = torch.zeros(B, device=device)
        self.h = torch.full((B,), self.dt, dtype=torch.float64, device=device)
        self.h32 = self.h.float()  # the model's h and the jump's
        self.step_no = torch.zeros((), dtype=torch.long, device=device)
        # The first step that produced a row the kernels could not sample, -1 while none did.
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.graph = None  # a captured (non-final) step, replayed on the static tokens `x`
        self.x = None
        if solver == "dilated":
            self.rank, self.count = dilation.reveal_ranks(edit_mask, B, setup.seq_len, device)

    def step(self, x: torch.Tensor, k: int, last: bool) -> torch.Tensor:
        """Tokens after step k + 1 (of time t = k h) from the tokens x before it."""
        self.t.fill_(k * self.dt)
        self.step_no.fill_(k + 1)
        if self.graph is not None and not last:
            self.x.copy_(x)  # the graph reads its static buffer
            self.graph.replay()
            return self.x.clone()
        try:
            return self._advance(x, last)
        except ops.InvalidRowsError as error:  # the references validate every step at once
            raise ops.InvalidRowsError(f"model output at step {k + 1}: {error}") from error

    def _advance(self, x: torch.Tensor, last: bool) -> torch.Tensor:
        if self.fused:
            source = _HiddenStates(self, *self.model.head_inputs(x, self.t, self.h32))
        else:
            logits = _logits_of(self.model, x, self.t, self.h32, self.setup, self.step_no)
            source = _Logits(self, logits)
        x_new = self._collapse(source, x) if last else self._move(source, x)
        if self.draw.native:
            # Only generated positions count: a frozen one keeps its token whatever its logits.
            unsampled = x_new < 0 if self.edit_mask is None else (x_new < 0) & self.edit_mask
            self.first_bad.copy_(
                torch.where((self.first_bad < 0) & unsampled.any(), self.step_no, self.first_bad)
            )
            x_new = x_new.clamp_min(0)  # keeps the next model call in range; reported at the end
        return x_new if self.edit_mask is None else torch.where(self.edit_mask, x_new, x)

    def _move(self, source, x):
        """One step of the solver from time t (all steps but the last). With the mask source
        the Euler and DFM solvers move only still-masked positions (SPEC 2.4, 2.5): a revealed
        token stays, and the DFM draw x_hat never is the mask; the dilated solver reveals this
        step's share of its plan."""
        mask = self.setup.mask_id
        if self.solver == "dilated":
            # Both ends of the step from the integer step number, so that this step's upper
            # count and the next step's lower one are the same float and round alike (k dt and
            # k dt + dt can differ by an ulp and split a .5 tie). A revealed token stays.
            kappa = self.schedule.kappa
            k = self.step_no.double()
            ends = kappa((k - 1) / self.steps), kappa(k / self.steps)
            now = dilation.revealed_now(self.rank, self.count, *ends) & (x == mask)
            return torch.where(now, source.categorical(mask), x)
        t, h = self.t.double(), self.h
        if self.solver == "cumulative":
            return source.jump(x, self.schedule.cumulative_scalar(t, h).float())
        movable = True if mask is None else x == mask
        if self.solver == "euler":
            moved = source.jump(x, self.schedule.euler_scalar(h).float())
            return moved if mask is None else torch.where(movable, moved, x)
        # dfm: move to a fresh draw x_hat with probability 1 - exp(-h kappa_dot / (1 - kappa)).
        x_hat = source.categorical(-1 if mask is None else mask)
        p_move = -torch.expm1(-h * self.schedule.dfm_rate(t))[:, None]
        u = torch.rand(x.shape, device=x.device, generator=self.generator, dtype=torch.float64)
        # A -1 (a row the kernel could not sample) is passed on where the position could move.
        return torch.where(((u < p_move) | (x_hat < 0)) & movable, x_hat, x)

    def _collapse(self, source, x):
        """The last step: every position (uniform source) or every masked one (mask source)."""
        if self.setup.mask_id is None:
            return source.categorical(-1)
        drawn = source.categorical(self.setup.mask_id)
        return torch.where(x == self.setup.mask_id, drawn, x)

    def capture(self, x: torch.Tensor) -> None:
        """Capture one (non-final) step on static buffers. A warm-up step runs first on a side
        stream (allocations, library handles); its tokens and flags are discarded, but it draws
        from the generator, so graph runs and eager runs of one seed differ (each reproducible)."""
        self.x = x.clone()

        def body():
            self.x.copy_(self._advance(self.x, last=False))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):
            body()
        self.first_bad.fill_(-1)
        self.graph = graph

    def raise_if_invalid(self) -> None:
        """The one host synchronisation of the loop, after it."""
        first_bad = int(self.first_bad)
        if first_bad >= 0:
            # A temperature this small overflows float32 for logits of ordinary size.
            temperature = self.controls.temperature
            tiny = (
                f" (or temperature = {temperature:g} is so small that logits / temperature "
                "overflows float32)"
                if 0 < temperature < 1e-30
                else ""
            )
            raise ops.InvalidRowsError(
                f"model output at step {first_bad} had a row with NaN or +inf logits, all -inf, "
                f"or no token within the barrier{tiny}: no distribution to sample from"
            )


class _Logits:
    """The draws of a step from materialised logits [B, L, V]."""

    def __init__(self, loop: _Loop, logits: torch.Tensor):
        self.loop, self.logits = loop, logits

    def jump(self, x, rate_scale):
        lp = self.loop
        return lp.draw.jump(self.logits, x, rate_scale, lp.h32, lp.controls, lp.generator)

    def categorical(self, exclude_token: int):
        lp = self.loop
        return lp.draw.categorical(self.logits, exclude_token, lp.controls, lp.generator)


class _HiddenStates:
    """The draws of a step from the final hidden states with the fused head (no logits)."""

    def __init__(self, loop: _Loop, hidden, weight, bias):
        self.loop, self.inputs = loop, (hidden, weight, bias)

    def jump(self, x, rate_scale):
        lp = self.loop
        return head.jump(lp.draw, *self.inputs, x, rate_scale, lp.h32, lp.controls,
                         lp.generator)  # fmt: skip

    def categorical(self, exclude_token: int):
        lp = self.loop
        return head.categorical(lp.draw, *self.inputs, exclude_token, lp.controls,
                                lp.generator)  # fmt: skip
