"""The options of a training run (``fsdfm pretrain`` / ``fsdfm distill``): :class:`TrainConfig`,
read from the defaults, a YAML file and command-line flags (later sources win), with one table of
:class:`~fsdfm.options.Option` behind the flags, their ``--help``, the YAML keys and the errors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fsdfm.distill import LEVEL_LAWS, METHODS, STUDENT_INITS, TEACHER_TYPES
from fsdfm.model import PRESETS
from fsdfm.options import Option, coerce
from fsdfm.path import SOURCES

__all__ = [
    "LOSSES",
    "MODES",
    "MUTABLE_KEYS",
    "OPTIONS",
    "TOKENIZERS",
    "TrainConfig",
    "check_config",
    "config_from_sources",
]

MODES = ("pretrain", "distill")
LOSSES = ("ce", "gkl")
TOKENIZERS = ("gpt2", "byte")
# Keys that may change between a run and its resumption (they do not change what is computed).
# grad_accum splits each step's batch into passes: the same batch, so the same losses.
MUTABLE_KEYS = frozenset(
    {"save_every", "eval_every", "log_every", "stop_at", "device", "grad_accum"}
)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run; None means "resolve a default" (see :func:`fsdfm.training.train`).

    batch_size is global (all processes together), the batch of one optimizer step; grad_accum
    splits each process's rows into that many passes whose gradients add up (the same losses
    as the whole batch at once, in less memory); steps is the length of the LR schedule (a
    finished run resumed with a larger steps continues, the schedule recomputed); stop_at
    stops (and saves) after that step without changing the schedule; eval_every = 0 never
    evaluates; grid (distillation) is 1 / the smallest step size, a power of two."""

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
    grad_accum: int = 1
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
    levels: str = "weighted"
    student_init: str = "teacher"
    method: str = "fsdfm"
    couplings: str | None = None
    coupling_count: int = 65536
    coupling_steps: int = 256
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


def _finite(value) -> str | None:
    return None if math.isfinite(value) else "expected a finite number"


def _option(name: str, kind, help: str) -> Option:
    return Option(name, kind, help, check=_finite if kind is float else None)


_TABLE = [
    _option("data", str, "a text file, a directory of *.txt files, or a token file (.bin/.npy)"),
    _option("out", str, "output directory; running again on it resumes"),
    _option("teacher", str, "the pre-trained DFM teacher (fsdfm directory or .pth)"),
    _option("teacher_type", TEACHER_TYPES, "shortcut teacher: rk4 (default) or heun"),
    _option(
        "tokenizer",
        str,
        "gpt2, byte, or a BPE tokenizer.json (default: gpt2; the teacher's for distill)",
    ),
    _option("preset", tuple(PRESETS), f"model size: {', '.join(PRESETS)} (default 0.17B)"),
    _option("seq_len", int, "tokens per sequence (default: the preset's / the teacher's)"),
    _option("dropout", float, "dropout (default: the preset's 0.1 / the teacher's)"),
    _option("source", SOURCES, "uniform (default) or mask; distill: the teacher's"),
    _option("loss", LOSSES, "data loss: ce (pretrain default) or gkl (distill default)"),
    _option("batch_size", int, "global batch, sequences per step over all processes (32)"),
    _option(
        "grad_accum",
        int,
        "passes per step that split the batch: the same step in less memory (1)",
    ),
    _option(
        "steps",
        int,
        "optimizer steps, the length of the LR schedule (10000); a larger value extends a run",
    ),
    _option("lr", float, "peak learning rate (3e-4 pretrain, 1e-5 distill)"),
    _option("min_lr_ratio", float, "the cosine ends at this fraction of lr (0.1)"),
    _option("warmup", int, "linear warm-up steps (default min(10000, steps // 10))"),
    _option("weight_decay", float, "AdamW weight decay (0.03)"),
    _option("beta1", float, "AdamW beta1 (0.9)"),
    _option("beta2", float, "AdamW beta2 (0.95)"),
    _option("grad_clip", float, "gradient-norm clip, 0 = off (1.0)"),
    _option("ema", float, "EMA decay (pretrain: off unless given; distill: 0.9995)"),
    _option("grid", int, "1 / the smallest step size, a power of two (1024)"),
    _option(
        "levels",
        LEVEL_LAWS,
        "step-size law: weighted (P(h) ~ 1/h, the paper's), uniform, or curriculum (a coarser "
        "level opens every 1/K of the run)",
    ),
    _option(
        "student_init",
        STUDENT_INITS,
        "the student's step-size layers: teacher (it starts equal to the teacher) or random "
        "(the authors')",
    ),
    _option(
        "method",
        METHODS,
        "fsdfm (the paper's step-size distillation) or redi (rectified couplings: the model "
        "retrained on the pairs (x_0, x_1) of the teacher's own sampler)",
    ),
    _option(
        "couplings",
        str,
        "a couplings file to train on: redi's pairs (default: OUT/couplings.safetensors, made "
        "from the teacher); with fsdfm, the path of every row runs between a pair's x_0 and x_1 "
        "(the distillation of a rectified model on its own coupling)",
    ),
    _option("coupling_count", int, "redi: pairs made from the teacher (65536)"),
    _option("coupling_steps", int, "redi: the teacher's sampling steps per pair (256)"),
    _option("seed", int, "random seed (0)"),
    _option("device", ("cpu", "cuda"), "cpu or cuda (default: cuda when available)"),
    _option("save_every", int, "checkpoint every N steps (1000)"),
    _option("eval_every", int, "held-out loss every N steps, 0 = never (500)"),
    _option("log_every", int, "metrics line every N steps (10)"),
    _option("val_fraction", float, "share of the blocks held out (0.01, at least one block)"),
    _option("val_batches", int, "batches per held-out evaluation (8)"),
    _option("stop_at", int, "stop after this step, keeping the schedule of --steps"),
]
_ONLY = {"teacher": ("distill",), "teacher_type": ("distill",), "grid": ("distill",),
         "levels": ("distill",), "student_init": ("distill",), "method": ("distill",),
         "couplings": ("distill",), "coupling_count": ("distill",),
         "coupling_steps": ("distill",),
         "preset": ("pretrain",)}  # fmt: skip
# Every option of TrainConfig but ``mode``, and the modes it belongs to.
OPTIONS: dict[str, tuple[Option, tuple[str, ...]]] = {
    option.name: (option, _ONLY.get(option.name, MODES)) for option in _TABLE
}


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
    the teacher are resolved by :func:`fsdfm.training.train`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    values = {}
    sources = []
    if config_file is not None:
        sources.append((_read_yaml(config_file), f"{config_file}: key "))
    sources.append((flags or {}, None))
    for data, prefix in sources:
        for key, value in data.items():
            entry = OPTIONS.get(key)
            where = f"{prefix}{key}" if prefix else "--" + str(key).replace("_", "-")
            if entry is None:
                raise ValueError(f"{where}: unknown option; the options are {', '.join(OPTIONS)}")
            option, modes = entry
            if mode not in modes:
                raise ValueError(f"{where}: is an option of fsdfm {modes[0]}, not {mode}")
            values[key] = coerce(option, value, where)
    config = TrainConfig(mode=mode, **values)
    check_config(config)
    return config


def _set_flags(c: TrainConfig, keys: tuple[str, ...]) -> list[str]:
    """The flags of the options among ``keys`` that ``c`` sets away from their defaults."""
    return [OPTIONS[k][0].flag for k in keys if getattr(c, k) != getattr(TrainConfig, k)]


def check_config(c: TrainConfig) -> None:
    """The checks that involve ranges and several options; ValueError naming the option."""
    if c.data is None:
        raise ValueError("no training data: pass --data PATH")
    if c.out is None:
        raise ValueError("no output directory: pass --out DIR")
    if c.mode == "distill" and c.teacher is None:
        raise ValueError("fsdfm distill needs --teacher (the pre-trained DFM model)")
    positive = ("batch_size", "grad_accum", "steps", "seq_len", "save_every", "log_every",
                "val_batches", "coupling_count", "coupling_steps")  # fmt: skip
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
    fsdfm_only = _set_flags(c, ("teacher_type", "grid", "levels", "student_init"))
    if c.method == "redi" and fsdfm_only:
        raise ValueError(f"{fsdfm_only[0]} is an option of --method fsdfm, not redi")
    own = _set_flags(c, ("coupling_count", "coupling_steps"))
    if own and (c.method != "redi" or c.couplings is not None):
        raise ValueError(
            f"{own[0]} sets the couplings --method redi makes from its teacher (not with "
            f"--method fsdfm or --couplings FILE)"
        )
    if c.couplings is not None and c.mode != "distill":
        raise ValueError("--couplings is an option of fsdfm distill")
    if c.couplings is not None and not Path(c.couplings).is_file():
        raise ValueError(f"--couplings {c.couplings}: no such file")
    if c.grid < 2 or c.grid & (c.grid - 1):
        raise ValueError(f"grid must be a power of two >= 2, got {c.grid}")
    if c.tokenizer is not None and c.tokenizer not in TOKENIZERS:
        if not (Path(c.tokenizer).is_file() or (Path(c.tokenizer) / "tokenizer.json").is_file()):
            raise ValueError(
                f"tokenizer must be gpt2, byte or a path to a tokenizer.json, got {c.tokenizer!r}"
            )
    if c.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
