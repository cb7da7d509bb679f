"""Training: pre-training the DFM teacher (SPEC 4.1) and FS-DFM distillation (SPEC 4.2).

``fsdfm pretrain`` / ``fsdfm distill`` (or :func:`train` with a :class:`TrainConfig`) train on
:mod:`fsdfm.data` blocks and write to the output directory OUT::

    OUT/config.yaml     the resolved configuration (every key; see TrainConfig)
    OUT/metrics.jsonl   one JSON object per logged step: step, loss, lr, tokens_per_s, grad_norm
                        (distillation adds loss_data, loss_distill, frac_distill), and val_loss
                        (val_loss_ema with EMA) at the evaluation steps
    OUT/model/          the trained weights, a ``fsdfm.save`` directory: ``fsdfm.load(OUT/"model")``
    OUT/model_ema/      the EMA weights (with EMA on), the same format
    OUT/state.pt        the training state (weights, EMA, optimiser, data position, step, config),
                        written with torch.save, read with ``weights_only=True``
    OUT/data/           the token cache of text inputs (fsdfm.data)

Every file is written under a temporary name, fsynced and renamed into place, so a process killed
at any instant leaves the last complete checkpoint loadable. Running the same command on the same
OUT resumes from ``state.pt``; the configuration must be the same except for ``MUTABLE_KEYS``.

Pre-training (SPEC 4.1): per sequence t ~ U[0, 1), x_0 from the source, x_t from the mixture path
(kappa_t = t), and with p = softmax(logits) in fp32 the per-token loss is either the cross-entropy
-ln p(x_1), or the generalized KL of discrete flow matching

    l = (kdot/(1 - k)) (1 - p(x_1))              where x_t = x_1,
    l = -(kdot/(1 - k)) (p(x_t) + ln p(x_1))     elsewhere            (1 - k clamped at 1e-8),

averaged over the tokens of a sequence, then over the sequences.

Distillation (SPEC 4.2): the student starts from the teacher (:func:`student_from_teacher`). Per
sequence a step size h = 2^-k, k = 0..K (grid = 2^K, 1024 by default), with P(h) proportional to
1/h, and t = j / grid uniform on the grid with t + h <= 1 (:func:`sample_step_sizes`). Sequences
with the smallest h (1/grid) are trained on data with the data loss (generalized KL by default);
every other sequence with the forward KL(p_teacher || p_student) on the same (x_t, t, h), where the
target is the shortcut teacher (:func:`shortcut_teacher`) built from an EMA copy of the student.
The batch is reordered so the data rows come first: the two groups are contiguous slices of the
student's logits and the shortcut teacher runs on the distilled rows only. Nothing else runs: no
frozen pre-trained teacher forward and no generator (rate) tensors (SPEC 6).

Optimisation: AdamW (betas (0.9, 0.95), weight decay 0.03) on every parameter, linear warm-up to
lr then a cosine to min_lr_ratio * lr (:func:`learning_rate`), gradient clipping at 1.0, optional
EMA (ema <- decay ema + (1 - decay) param after every step). On CUDA the model runs its blocks in
bf16 autocast (fsdfm.model); losses are computed in fp32 from the float32 logits.

Randomness: every draw of step s comes from generators seeded with derive_seed(seed, purpose, s)
(the noise of the global batch: t, h, x_0, the path and the teacher's jumps) or, for dropout, from
the global torch generator reseeded with derive_seed(seed, "dropout", s, rank) at the start of the
step. The data order is a function of (seed, epoch). So the only random state to checkpoint is the
data position, and a resumed run draws exactly what an uninterrupted one would (Python's and
NumPy's generators are not used). :func:`train` restores the caller's global torch RNG on return.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) a process group is formed (nccl on CUDA, gloo on
CPU) and the model wrapped in DistributedDataParallel. ``batch_size`` is the global batch: every
rank builds the same global noisy batch and trains on its rows [r B/W, (r+1) B/W), so with dropout
0 a W-process run follows the single-process run up to floating-point reduction order. Only rank 0
writes files; logged losses are averaged over ranks.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fsdfm import ops
from fsdfm.checkpoint import fsync_path, load, save
from fsdfm.data import Blocks, BlockSampler, derive_seed, prepare_tokens, rank_rows
from fsdfm.model import PRESETS, FSDFMTransformer, ModelConfig
from fsdfm.path import SOURCES, MixturePath, PolynomialSchedule, sample_source
from fsdfm.tokenizer import get_tokenizer

__all__ = [
    "MUTABLE_KEYS",
    "TrainConfig",
    "add_arguments",
    "config_from_sources",
    "cross_entropy",
    "forward_kl",
    "generalized_kl",
    "learning_rate",
    "main",
    "sample_step_sizes",
    "shortcut_teacher",
    "student_from_teacher",
    "train",
]

STATE_FORMAT = "fsdfm-train-state"
STATE_VERSION = 1
MODES = ("pretrain", "distill")
LOSSES = ("ce", "gkl")
TEACHER_TYPES = ("rk4", "heun")
TOKENIZERS = ("gpt2", "byte")
# Keys that may change between a run and its resumption (they do not change what is computed).
MUTABLE_KEYS = frozenset({"save_every", "eval_every", "log_every", "stop_at", "device"})


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run; None means "resolve a default" (see :func:`train`).

    batch_size is global (all processes together); steps is the length of the LR schedule;
    stop_at stops (and saves) after that step without changing the schedule; eval_every = 0
    never evaluates; grid (distillation) is 1 / the smallest step size, a power of two."""

    mode: str = "pretrain"
    data: str | None = None
    out: str | None = None
    teacher: str | None = None
    teacher_type: str = "rk4"
    tokenizer: str | None = None
    preset: str | None = None
    seq_len: int | None = None
    dropout: float | None = None
    source: str | None = None
    loss: str | None = None
    batch_size: int = 32
    steps: int = 10000
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema: float | None = None
    grid: int = 1024
    seed: int = 0
    device: str | None = None
    save_every: int = 1000
    eval_every: int = 500
    log_every: int = 10
    val_fraction: float = 0.01
    val_batches: int = 8
    stop_at: int | None = None

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Option:
    kind: object  # int, float, str, or a tuple of allowed strings
    help: str
    modes: tuple[str, ...] = MODES


_OPTIONS: dict[str, _Option] = {
    "data": _Option(str, "a text file, a directory of *.txt files, or a token file (.bin/.npy)"),
    "out": _Option(str, "output directory; running again on it resumes"),
    "teacher": _Option(str, "the pre-trained DFM teacher (fsdfm directory or .pth)", ("distill",)),
    "teacher_type": _Option(TEACHER_TYPES, "shortcut teacher: rk4 (default) or heun", ("distill",)),
    "tokenizer": _Option(
        str, "gpt2, byte, or a BPE tokenizer.json (default: gpt2; the teacher's for distill)"
    ),
    "preset": _Option(
        tuple(PRESETS), f"model size: {', '.join(PRESETS)} (default 0.17B)", ("pretrain",)
    ),
    "seq_len": _Option(int, "tokens per sequence (default: the preset's / the teacher's)"),
    "dropout": _Option(float, "dropout (default: the preset's 0.1 / the teacher's)"),
    "source": _Option(SOURCES, "uniform (default) or mask; distill: the teacher's"),
    "loss": _Option(LOSSES, "data loss: ce (pretrain default) or gkl (distill default)"),
    "batch_size": _Option(int, "global batch, sequences per step over all processes (32)"),
    "steps": _Option(int, "optimizer steps, the length of the LR schedule (10000)"),
    "lr": _Option(float, "peak learning rate (3e-4 pretrain, 1e-5 distill)"),
    "min_lr_ratio": _Option(float, "the cosine ends at this fraction of lr (0.1)"),
    "warmup": _Option(int, "linear warm-up steps (default min(10000, steps // 10))"),
    "weight_decay": _Option(float, "AdamW weight decay (0.03)"),
    "beta1": _Option(float, "AdamW beta1 (0.9)"),
    "beta2": _Option(float, "AdamW beta2 (0.95)"),
    "grad_clip": _Option(float, "gradient-norm clip, 0 = off (1.0)"),
    "ema": _Option(float, "EMA decay (pretrain: off unless given; distill: 0.9995)"),
    "grid": _Option(int, "1 / the smallest step size, a power of two (1024)", ("distill",)),
    "seed": _Option(int, "random seed (0)"),
    "device": _Option(("cpu", "cuda"), "cpu or cuda (default: cuda when available)"),
    "save_every": _Option(int, "checkpoint every N steps (1000)"),
    "eval_every": _Option(int, "held-out loss every N steps, 0 = never (500)"),
    "log_every": _Option(int, "metrics line every N steps (10)"),
    "val_fraction": _Option(float, "share of the blocks held out (0.01, at least one block)"),
    "val_batches": _Option(int, "batches per held-out evaluation (8)"),
    "stop_at": _Option(int, "stop after this step, keeping the schedule of --steps"),
}


def _coerce(name: str, value, where: str):
    """``value`` (from YAML or a flag's text) as the option's type; ValueError naming it."""
    kind = _OPTIONS[name].kind
    if value is None:
        return None
    if isinstance(kind, tuple) or kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        if isinstance(kind, tuple) and value not in kind:
            raise ValueError(f"{where}: must be one of {', '.join(kind)}; got {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    try:
        if kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value)
        number = float(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{where}: expected {what}, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return number


def _read_yaml(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option: value")
    return data


def config_from_sources(mode: str, config_file: str | None = None, flags: dict | None = None):
    """The :class:`TrainConfig` of ``mode`` from the defaults, then the YAML ``config_file``
    (keys = option names, underscored), then ``flags`` (option name -> value or text): later
    sources override earlier ones. Values are checked here; defaults that depend on the data or
    the teacher are resolved by :func:`train`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    values = {}
    sources = []
    if config_file is not None:
        sources.append((_read_yaml(config_file), f"{config_file}: key"))
    sources.append((flags or {}, "--"))
    for data, prefix in sources:
        for key, value in data.items():
            option = _OPTIONS.get(key)
            where = f"{prefix}{key}" if prefix != "--" else "--" + key.replace("_", "-")
            if option is None:
                raise ValueError(f"{where}: unknown option; the options are {', '.join(_OPTIONS)}")
            if mode not in option.modes:
                raise ValueError(f"{where}: is an option of fsdfm {option.modes[0]}, not {mode}")
            values[key] = _coerce(key, value, where)
    config = TrainConfig(mode=mode, **values)
    _check(config)
    return config


def _check(c: TrainConfig) -> None:
    if c.data is None:
        raise ValueError("no training data: pass --data PATH")
    if c.out is None:
        raise ValueError("no output directory: pass --out DIR")
    if c.mode == "distill" and c.teacher is None:
        raise ValueError("fsdfm distill needs --teacher (the pre-trained DFM model)")
    positive = ("batch_size", "steps", "seq_len", "save_every", "log_every", "val_batches")
    for key in (*positive, "stop_at"):
        value = getattr(c, key)
        if value is not None and value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    for key in ("warmup", "eval_every", "weight_decay", "grad_clip"):
        value = getattr(c, key)
        if value is not None and value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    if c.lr is not None and not c.lr > 0:
        raise ValueError(f"lr must be positive, got {c.lr}")
    for key in ("beta1", "beta2", "min_lr_ratio"):
        if not 0 <= getattr(c, key) <= 1:
            raise ValueError(f"{key} must be in [0, 1], got {getattr(c, key)}")
    if c.dropout is not None and not 0 <= c.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {c.dropout}")
    if not 0 <= c.val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5], got {c.val_fraction}")
    if c.ema is not None:
        low_ok = c.ema >= 0 if c.mode == "distill" else c.ema > 0
        if not (low_ok and c.ema < 1):
            span = "[0, 1)" if c.mode == "distill" else "(0, 1)"
            raise ValueError(f"ema (the EMA decay) must be in {span}, got {c.ema}")
    if c.grid < 2 or c.grid & (c.grid - 1):
        raise ValueError(f"grid must be a power of two >= 2, got {c.grid}")
    if c.tokenizer is not None and c.tokenizer not in TOKENIZERS:
        from pathlib import Path

        if not (Path(c.tokenizer).is_file() or (Path(c.tokenizer) / "tokenizer.json").is_file()):
            raise ValueError(
                f"tokenizer must be gpt2, byte or a path to a tokenizer.json, got {c.tokenizer!r}"
            )
    if c.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")


def _metavar(name: str, kind) -> str:
    if isinstance(kind, tuple):
        return "|".join(kind)
    return {int: "N", float: "X"}.get(kind, name.upper())


def add_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    """The options of ``mode`` as flags (``--seq-len`` for seq_len ...) plus ``--config``. Flags
    hold text; :func:`config_from_sources` checks them, so every mistake is a one-line error."""
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="options as YAML (underscored keys); flags win"
    )
    for name, option in _OPTIONS.items():
        if mode in option.modes:
            parser.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                default=argparse.SUPPRESS,
                metavar=_metavar(name, option.kind),
                help=option.help,
            )


def main(args: argparse.Namespace, mode: str) -> Path:
    """Run ``fsdfm pretrain`` / ``fsdfm distill`` from parsed arguments."""
    flags = {k: v for k, v in vars(args).items() if k in _OPTIONS}
    return train(config_from_sources(mode, args.config, flags))


# ----------------------------------------------------------------------------------------------
# Losses (fp32, from the logits)


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


def learning_rate(
    step: int, *, lr: float, steps: int, warmup: int, min_lr_ratio: float = 0.1
) -> float:
    """The LR of optimizer step ``step`` (0-based): lr (step + 1) / warmup during the warm-up,
    then lr_min + (lr - lr_min) (1 + cos(pi (step - warmup) / (steps - warmup))) / 2, with
    lr_min = min_lr_ratio lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    low = min_lr_ratio * lr
    return low + (lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Distillation: step sizes, the student's initialisation, the shortcut teacher


def sample_step_sizes(
    n: int, grid: int = 1024, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(h, t), float64 [n] on the CPU: h = 2^-k, k in 0..K (grid = 2^K) with P(h) = (1/h) / sum
    over the h of 1/h, i.e. P(k) = 2^k / (2^(K+1) - 1); t = j / grid with j uniform on
    {0, .., grid - grid h}, so that t + h <= 1."""
    levels = grid.bit_length() - 1
    weights = 2.0 ** torch.arange(levels + 1, dtype=torch.float64)
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    slots = grid - torch.div(grid, 2**k, rounding_mode="floor") + 1  # number of allowed j
    u = torch.rand(n, dtype=torch.float64, generator=generator)
    j = (u * slots).floor()
    return 2.0 ** (-k.double()), j / grid


def student_from_teacher(teacher: FSDFMTransformer, **config_changes) -> FSDFMTransformer:
    """A step-conditioned student with the teacher's weights (SPEC 4.2); ``config_changes``
    (e.g. seq_len, dropout) go to its ModelConfig. A teacher that is already a student is copied.

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
        student = FSDFMTransformer(teacher.config.replace(**config_changes))
        student.load_state_dict(teacher.state_dict())
        student.tokenizer_name = teacher.tokenizer_name
        return student
    student = FSDFMTransformer(teacher.config.replace(step_conditioned=True, **config_changes))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    new_layers = ("dt_embedding.", "time_condition_fuser.", "condition_fuser.")
    if unexpected or not all(any(p in k for p in new_layers) for k in missing):
        raise ValueError(
            f"the teacher's weights do not fit a student of its shape (unexpected: "
            f"{sorted(unexpected)[:4]}, missing: {sorted(missing)[:4]})"
        )
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
    (ops.jump_step with rate_scale = alpha(s, h/2), SPEC 2.1):

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
    jump = ops.jump_step if ops.native_available(device) else ops.jump_step_ref

    def evaluate(x: Tensor, s: Tensor) -> Tensor:
        return model(x, s.float(), half32).float()

    def step(logits: Tensor, x: Tensor, s: Tensor) -> Tensor:
        rate = schedule.cumulative_scalar(s, half).float()
        return jump(logits, x, rate, half32, generator=generator, validate=False)

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


# ----------------------------------------------------------------------------------------------
# Files


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename over ``path``."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files left by a killed run (ours and fsdfm.save's are named *.tmp-<pid>-*)."""
    for directory in (out, out / "model", out / "model_ema", out / "data"):
        if directory.is_dir():
            for stale in directory.glob("*.tmp-*"):
                stale.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# The run


class _Processes:
    """The process group under torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_name == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.group = self.world > 1
        if self.group:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device_name == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.group:
            torch.distributed.barrier()

    def sum(self, tensor: Tensor) -> Tensor:
        if self.group:
            torch.distributed.all_reduce(tensor)
        return tensor

    def close(self) -> None:
        if self.group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(config: TrainConfig) -> Path:
    """Run (or resume) the training that ``config`` describes; returns the output directory.

    Defaults resolved here: tokenizer (gpt2, a token file's own, or the teacher's), seq_len and
    dropout (the preset's or the teacher's), source (uniform or the teacher's), loss (ce for
    pre-training, gkl for distillation), lr (3e-4 / 1e-5), warmup (min(10000, steps // 10)), ema
    (distillation: 0.9995), device (cuda when available)."""
    _check(config)
    device_name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    procs = _Processes(device_name)
    try:
        devices = [procs.device] if procs.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return _Run(config.replace(device=device_name), procs).run()
    finally:
        procs.close()


class _Run:
    def __init__(self, config: TrainConfig, procs: _Processes):
        self.procs = procs
        self.device = procs.device
        self.out = Path(config.out).resolve()
        if procs.main:
            if self.out.exists() and not self.out.is_dir():
                raise FileExistsError(f"--out {self.out} exists and is not a directory")
            self.out.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(self.out)
        procs.barrier()

        teacher = None
        if config.mode == "distill":
            teacher = load(config.teacher)
        config = self._resolve_paths(config)

        # Data: rank 0 tokenises (or finds the cache), then the others open it.
        wanted = config.tokenizer or (teacher.tokenizer_name if teacher is not None else None)
        data = Path(config.data)
        if wanted is None and not (data.is_file() and data.suffix in (".bin", ".npy")):
            if teacher is not None:
                raise ValueError(f"{config.teacher} names no tokenizer: pass --tokenizer")
            wanted = "gpt2"
        stream = None
        if procs.main:
            stream = prepare_tokens(data, wanted, self.out / "data", progress=True)
        procs.barrier()
        if stream is None:
            stream = prepare_tokens(data, wanted, self.out / "data")
        tokenizer = get_tokenizer(stream.tokenizer)
        if stream.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"{data} declares a vocabulary of {stream.vocab_size} but {stream.tokenizer} has "
                f"{tokenizer.vocab_size}"
            )
        self.config = config = self._resolve(config, teacher, stream.tokenizer)
        self.tokenizer_name = stream.tokenizer
        self.data_key = stream.key
        self.blocks = Blocks(stream, config.seq_len, config.val_fraction)
        self.sampler = BlockSampler(self.blocks.n_train, config.batch_size, config.seed)
        self.rows = rank_rows(config.batch_size, procs.rank, procs.world)

        # Model, EMA, optimiser.
        torch.manual_seed(derive_seed(config.seed, "init"))
        if teacher is not None:
            if teacher.config.real_vocab_size != tokenizer.vocab_size:
                raise ValueError(
                    f"the teacher's vocabulary ({teacher.config.real_vocab_size} real tokens) "
                    f"does not match the {stream.tokenizer} tokenizer ({tokenizer.vocab_size})"
                )
            model = student_from_teacher(teacher, seq_len=config.seq_len, dropout=config.dropout)
            del teacher
        else:
            vocab = tokenizer.vocab_size + (1 if config.source == "mask" else 0)
            model = FSDFMTransformer(
                ModelConfig.preset(
                    config.preset,
                    vocab_size=vocab,
                    seq_len=config.seq_len,
                    dropout=config.dropout,
                    source=config.source,
                )
            )
        model.tokenizer_name = self.tokenizer_name
        self.model = model.to(self.device).train()
        self.ema = None
        if config.ema is not None:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            weight_decay=config.weight_decay,
        )
        self.step = 0
        self._resume_or_start()

        self.wrapped = self.model
        if procs.group:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self.path = MixturePath()
        self.schedule = self.path.schedule
        self.noise_cpu = torch.Generator()
        self.noise_device = torch.Generator(self.device)

    # -- configuration -------------------------------------------------------------------------
    @staticmethod
    def _resolve_paths(config: TrainConfig) -> TrainConfig:
        keys = ["data", "out", "teacher"]
        if config.tokenizer not in (None, *TOKENIZERS):  # a BPE tokenizer given by path
            keys.append("tokenizer")
        absolute = {
            key: str(Path(getattr(config, key)).resolve())
            for key in keys
            if getattr(config, key) is not None
        }
        return config.replace(**absolute)

    @staticmethod
    def _resolve(config: TrainConfig, teacher, tokenizer: str) -> TrainConfig:
        if teacher is not None:
            base = teacher.config
            if config.source is not None and config.source != base.source:
                raise ValueError(
                    f"the teacher was trained with the {base.source} source, not {config.source}"
                )
            defaults = {"lr": 1e-5, "loss": "gkl", "ema": 0.9995, "source": base.source}
        else:
            preset = config.preset or "0.17B"
            base = ModelConfig.preset(preset)
            defaults = {"preset": preset, "lr": 3e-4, "loss": "ce", "source": "uniform"}
        defaults.update(
            seq_len=base.seq_len,
            dropout=base.dropout,
            warmup=min(10000, config.steps // 10),
        )
        changes = {k: v for k, v in defaults.items() if getattr(config, k) is None}
        return config.replace(tokenizer=tokenizer, **changes)

    # -- checkpoints -------------------------------------------------------------------------------
    def _resume_or_start(self) -> None:
        state_path = self.out / "state.pt"
        if not state_path.is_file():
            if self.procs.main:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
                self._write_config()
            return
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"{state_path} is not an fsdfm training state (version 1)")
        old, new = state["config"], self.config.to_dict()
        changed = [k for k in new if k not in MUTABLE_KEYS and old.get(k) != new[k]]
        if changed:
            what = "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
            raise ValueError(
                f"{self.out} holds a run with another configuration ({what}); resume with the "
                "same options or use a new --out"
            )
        if state["data_key"] != self.data_key:
            raise ValueError(
                f"the data changed since {self.out} was started (files modified?); use a new --out"
            )
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        if self.procs.main:
            self._write_config()
            self._truncate_metrics()

    def _write_config(self) -> None:
        import yaml

        text = yaml.safe_dump(self.config.to_dict(), sort_keys=False).encode()
        _atomic_write(self.out / "config.yaml", lambda f: f.write(text))

    def _truncate_metrics(self) -> None:
        """Drop the lines a killed run logged after its last checkpoint."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if record.get("step", math.inf) <= self.step:
                kept.append(line + "\n")
        data = "".join(kept).encode()
        _atomic_write(path, lambda f: f.write(data))

    def _save(self) -> None:
        if not self.procs.main:
            return
        save(self.model, self.out / "model", tokenizer=self.tokenizer_name)
        if self.ema is not None:
            save(self.ema, self.out / "model_ema", tokenizer=self.tokenizer_name)
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "step": self.step,
            "config": self.config.to_dict(),
            "data_key": self.data_key,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
        }
        _atomic_write(self.out / "state.pt", lambda f: torch.save(state, f))

    # -- one step --------------------------------------------------------------------------------
    def _seed_step(self, step: int) -> None:
        self.noise_cpu.manual_seed(derive_seed(self.config.seed, "noise", step))
        self.noise_device.manual_seed(derive_seed(self.config.seed, "noise-device", step))
        torch.manual_seed(derive_seed(self.config.seed, "dropout", step, self.procs.rank))

    def _noisy(self, x_1: Tensor, t: Tensor, g_device: torch.Generator) -> Tensor:
        """x_t [B, L] from data x_1 [B, L] at times t [B] (float32 on the device)."""
        B, L = x_1.shape
        x_0 = sample_source(
            self.config.source,
            B,
            L,
            self.model.config.vocab_size,
            device=self.device,
            generator=g_device,
        )
        return self.path.sample(x_0, x_1, t, generator=g_device)

    def _data_loss(self, logits: Tensor, x_1: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The data loss per sequence [b]: cross-entropy or generalized KL, token mean."""
        if self.config.loss == "ce":
            return cross_entropy(logits, x_1).mean(-1)
        return generalized_kl(logits, x_1, x_t, t, self.schedule).mean(-1)

    def _pretrain_loss(self, x_1: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, stats [6]) on this rank's rows of the global batch x_1 [B, L]."""
        B = x_1.shape[0]
        t = torch.rand(B, generator=self.noise_cpu).to(self.device, non_blocking=True)
        x_t = self._noisy(x_1, t, self.noise_device)
        r = self.rows
        per_seq = self._data_loss(self.wrapped(x_t[r], t[r]), x_1[r], x_t[r], t[r])
        total = per_seq.sum()
        zero = total.new_zeros(())
        n = float(per_seq.shape[0])
        stats = torch.stack([total, total.new_tensor(n), total, total.new_tensor(n), zero, zero])
        return total / n, stats.detach()

    def _distill_loss(self, x_1: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, stats [6]): data rows (h = 1/grid) first with the data loss, then the distilled
        rows with KL(shortcut teacher || student)."""
        B = x_1.shape[0]
        h, t = sample_step_sizes(B, self.config.grid, self.noise_cpu)  # CPU: no device sync
        x_t = self._noisy(x_1, t.float().to(self.device, non_blocking=True), self.noise_device)
        r = self.rows
        h, t = h[r], t[r]
        is_distilled = h > 1.0 / self.config.grid
        order = torch.argsort(is_distilled.to(torch.uint8), stable=True)
        n_data = int((~is_distilled).sum())
        h, t = h[order], t[order]
        order = order.to(self.device, non_blocking=True)
        x_t, x_1 = x_t[r][order], x_1[r][order]
        t32 = t.float().to(self.device, non_blocking=True)
        logits = self.wrapped(x_t, t32, h.float().to(self.device, non_blocking=True))
        n = logits.shape[0]
        zero = logits.new_zeros(())
        data_sum = distill_sum = zero
        if n_data:
            d = slice(0, n_data)
            data_sum = self._data_loss(logits[d], x_1[d], x_t[d], t32[d]).sum()
        if n_data < n:
            s = slice(n_data, n)
            target = shortcut_teacher(
                self.ema,
                x_t[s],
                t[s],
                h[s],
                self.config.teacher_type,
                schedule=self.schedule,
                generator=self.noise_device,
            )
            distill_sum = forward_kl(target, logits[s]).mean(-1).sum()
            del target
        total = data_sum + distill_sum
        stats = torch.stack(
            [
                total,
                zero + n,
                data_sum,
                zero + n_data,
                distill_sum,
                zero + (n - n_data),
            ]
        )
        return total / n, stats.detach()

    def _train_step(self) -> tuple[Tensor, Tensor | None]:
        c = self.config
        lr = learning_rate(
            self.step, lr=c.lr, steps=c.steps, warmup=c.warmup, min_lr_ratio=c.min_lr_ratio
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._seed_step(self.step)
        x_1 = self.blocks.get(self.sampler.next_batch(), self.device)
        objective = self._distill_loss if c.mode == "distill" else self._pretrain_loss
        loss, stats = objective(x_1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if c.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                ema_params = list(self.ema.parameters())
                torch._foreach_lerp_(ema_params, list(self.model.parameters()), 1.0 - c.ema)
        self.step += 1
        return stats, grad_norm

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def _validate(self, model: FSDFMTransformer) -> float:
        """The data loss on the held-out blocks (distillation: at h = 1/grid), with the same noise
        at every evaluation (fixed seeds), so that values are comparable across steps."""
        c = self.config
        was_training = model.training
        model.eval()
        g_cpu = torch.Generator().manual_seed(derive_seed(c.seed, "val"))
        g_dev = torch.Generator(self.device).manual_seed(derive_seed(c.seed, "val-device"))
        indices = list(self.blocks.val_indices())[: c.val_batches * c.batch_size]
        total, count = 0.0, 0
        for start in range(0, len(indices), c.batch_size):
            x_1 = self.blocks.get(indices[start : start + c.batch_size], self.device)
            n = x_1.shape[0]
            t = torch.rand(n, generator=g_cpu).to(self.device, non_blocking=True)
            x_t = self._noisy(x_1, t, g_dev)
            h = 1.0 / c.grid if c.mode == "distill" else None
            total += float(self._data_loss(model(x_t, t, h), x_1, x_t, t).sum())
            count += n
        model.train(was_training)
        return total / count

    # -- loop --------------------------------------------------------------------------------------
    def run(self) -> Path:
        c, procs = self.config, self.procs
        end = min(c.steps, c.stop_at or c.steps)
        if self.step >= end:
            if procs.main:
                print(f"fsdfm {c.mode}: {self.out} is already at step {self.step}", file=sys.stderr)
            return self.out
        tokens_per_step = c.batch_size * c.seq_len
        if procs.main:
            params = sum(p.numel() for p in self.model.parameters())
            what = f"resuming at step {self.step}" if self.step else "starting"
            print(
                f"fsdfm {c.mode}: {what}; {params / 1e6:.2f}M parameters, "
                f"{self.blocks.n_train} training and {self.blocks.n_val} held-out blocks of "
                f"{c.seq_len} tokens, {procs.world} process(es) on {self.device.type}",
                file=sys.stderr,
            )
        from tqdm.auto import tqdm

        bar = tqdm(
            total=end,
            initial=self.step,
            unit="step",
            desc=f"fsdfm {c.mode}",
            disable=None if procs.main else True,
            dynamic_ncols=True,
        )
        metrics = open(self.out / "metrics.jsonl", "a") if procs.main else None
        timer, timed_steps = time.perf_counter(), 0
        try:
            while self.step < end:
                stats, grad_norm = self._train_step()
                timed_steps += 1
                bar.update(1)
                # Logging and evaluation follow the schedule's steps, not where this invocation
                # stops (--stop-at), so that interrupted and uninterrupted runs log the same lines.
                final = self.step == c.steps
                evaluate = c.eval_every and (self.step % c.eval_every == 0 or final)
                if self.step % c.log_every == 0 or evaluate or final:
                    record = self._record(stats, grad_norm)
                    elapsed = time.perf_counter() - timer
                    record["tokens_per_s"] = timed_steps * tokens_per_step / max(elapsed, 1e-9)
                    if evaluate and procs.main and self.blocks.n_val:
                        record["val_loss"] = self._validate(self.model)
                        if self.ema is not None:
                            record["val_loss_ema"] = self._validate(self.ema)
                    if metrics is not None:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}"
                    )
                    timer, timed_steps = time.perf_counter(), 0
                if self.step % c.save_every == 0 or self.step == end:
                    self._save()
                    timer, timed_steps = time.perf_counter(), 0
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        if procs.main:
            print(
                f"fsdfm {c.mode}: step {self.step}; model in {self.out / 'model'}", file=sys.stderr
            )
        return self.out

    def _record(self, stats: Tensor, grad_norm: Tensor | None) -> dict:
        """The logged values of the step just taken, averaged over the ranks (one sync)."""
        values = [float(v) for v in self.procs.sum(stats.double().clone())]
        total, n, data_sum, n_data, distill_sum, n_distill = values
        record = {
            "step": self.step,
            "loss": total / n,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if self.config.mode == "distill":
            record["loss_data"] = data_sum / n_data if n_data else None
            record["loss_distill"] = distill_sum / n_distill if n_distill else None
            record["frac_distill"] = n_distill / n
        return record
