"""The training loop: pre-training the DFM teacher (SPEC 4.1) and FS-DFM distillation (SPEC 4.2).

``fsdfm pretrain`` / ``fsdfm distill`` (or :func:`train` with a
:class:`~fsdfm.train_config.TrainConfig`) train on :mod:`fsdfm.data` blocks with the losses of
:mod:`fsdfm.losses` and the distillation of :mod:`fsdfm.distill`, and write to the output
directory OUT::

    OUT/config.yaml     the resolved configuration (every key; see TrainConfig)
    OUT/metrics.jsonl   one JSON object per logged step: step, loss, lr, tokens_per_s, grad_norm
                        (distillation adds loss_data, loss_distill, frac_distill), and val_loss
                        (val_loss_ema with EMA) at the evaluation steps
    OUT/model/          the trained weights, a ``fsdfm.save`` directory: ``fsdfm.load(OUT/"model")``
    OUT/model_ema/      the EMA weights (with EMA on), the same format
    OUT/state.pt        the training state (weights, EMA, optimiser, data position, step, config),
                        written with torch.save, read with ``weights_only=True``
    OUT/data/           the token cache of text inputs (fsdfm.data)
    OUT/couplings.safetensors  --method redi: the teacher's (x_0, x_1) pairs (fsdfm.coupling)

Every file is written under a temporary name, fsynced and renamed into place, so a process killed
at any instant leaves the last complete checkpoint loadable. Running the same command on the same
OUT resumes from ``state.pt``; the configuration must be the same except for ``MUTABLE_KEYS``.

Pre-training (SPEC 4.1): per sequence t ~ U[0, 1), x_0 from the source, x_t from the mixture path
(kappa_t = t); the loss is the cross-entropy -ln p(x_1) or the generalized KL
(:mod:`fsdfm.losses`), averaged over the tokens of a sequence, then over the sequences.

Distillation (SPEC 4.2): the student starts from the teacher (:func:`~fsdfm.distill.
student_from_teacher`) and draws (h, t) per sequence (:func:`~fsdfm.distill.sample_step_sizes`).
Sequences with the smallest h (1/grid) are trained on data with the data loss (generalized KL by
default); every other sequence with the forward KL(p_teacher || p_student) on the same
(x_t, t, h), where the target is the shortcut teacher (:func:`~fsdfm.distill.shortcut_teacher`)
built from an EMA copy of the student.
The batch is reordered so the data rows come first: the two groups are contiguous slices of the
student's logits and the shortcut teacher runs on the distilled rows only. Nothing else runs: no
frozen pre-trained teacher forward and no generator (rate) tensors (SPEC 6).

Rectified couplings (``--method redi``, :mod:`fsdfm.coupling`): the model starts as a copy of
the (DFM) teacher and is pre-trained again, with the data loss (cross-entropy by default), on
pairs (x_0, x_1) where x_1 is the teacher's sample from that x_0: x_t from the mixture path
between the pair's own x_0 and x_1 instead of fresh noise. The pairs are
OUT/couplings.safetensors (made by the ranks before the first step: coupling_count pairs,
coupling_steps cumulative steps each, seeded from seed, in parts kept under OUT/couplings.parts/
so that a killed run resumes with the parts made) or the file given by ``--couplings``; their
sha256 is in state.pt, and a run resumed with other pairs is refused. The held-out loss stays the
data loss on held-out text with independent noise (what the rectified model gives up there is
visible). ``--method fsdfm --couplings FILE`` distils a rectified model on its own coupling: data
and distilled rows alike take x_t on the path between a pair's x_0 and x_1 (fresh noise would
undo the rectification at the finest step, where the student learns from data).

Optimisation: AdamW (betas (0.9, 0.95), weight decay 0.03) on every parameter, linear warm-up to
lr then a cosine to min_lr_ratio * lr (:func:`fsdfm.optim.learning_rate`), gradient clipping at
1.0, optional EMA (ema <- decay ema + (1 - decay) param after every step). On CUDA the model
runs its blocks in bf16 autocast (fsdfm.model); losses are computed in fp32 from the logits.

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
writes files, but for the parts of --method redi's couplings, which every rank makes its share
of; logged losses are averaged over ranks.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from fsdfm._args import resolve_device
from fsdfm._io import (
    Staging,
    atomic_write,
    remove_stale_temporaries,
    save_figure,
    sha256_of,
)
from fsdfm.checkpoint import load, save
from fsdfm.coupling import load_couplings, rectified_couplings, save_couplings
from fsdfm.data import Blocks, BlockSampler, derive_seed, prepare_tokens, rank_rows
from fsdfm.distill import (
    level_names,
    level_of,
    model_copy,
    sample_step_sizes,
    shortcut_teacher,
    student_from_teacher,
)
from fsdfm.losses import cross_entropy, forward_kl, generalized_kl
from fsdfm.model import FSDFMTransformer, ModelConfig
from fsdfm.optim import learning_rate
from fsdfm.path import MixturePath, PolynomialSchedule, sample_source
from fsdfm.progress import Progress
from fsdfm.tokenizer import get_tokenizer
from fsdfm.train_config import (
    MUTABLE_KEYS,
    TOKENIZERS,
    TrainConfig,
    check_config,
)

__all__ = ["STATE_FORMAT", "TrainingDiverged", "train"]

STATE_FORMAT = "fsdfm-train-state"
STATE_VERSION = 1
STATE_MANIFEST = "state.json"  # the sha256 of state.pt (and of the one before it)
STATE_KEYS = ("step", "config", "data_key", "model", "ema", "optimizer", "sampler")
COUPLINGS_FILE = "couplings.safetensors"
COUPLINGS_PARTS = "couplings.parts"  # the parts made so far, while the couplings are made
COUPLING_BATCH = 256  # the least sampling batch for couplings (the training batch if larger)
PART_BATCHES = 16  # sampling batches per part: what a killed run can lose


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes, in order): what the
    teacher of a couplings file was, wherever it was loaded from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TrainingDiverged(ValueError):
    """The loss, the gradient norm, a held-out loss or the weights stopped being finite: the run
    stops before it logs or saves anything non-finite, so the last checkpoint stays as it was."""


def _read_state(path: Path) -> tuple[dict, str]:
    """(the training state in ``path`` (state.pt), the file's sha256), checked against the
    sha256 that state.json records and for its structure; a ValueError naming the file
    otherwise."""
    fix = "remove it (and state.json) to start the run over, or use a new --out"
    if not path.is_file():
        raise ValueError(f"{path} is not a file; {fix}")
    manifest = path.with_name(STATE_MANIFEST)
    digest = sha256_of(path)
    if manifest.is_file():
        try:
            known = json.loads(manifest.read_text())["sha256"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{manifest} is damaged; {fix}") from None
        if digest not in known:
            raise ValueError(f"{path} is damaged: its sha256 is not the one {manifest.name} "
                             f"recorded; {fix}")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged file
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"{path} is not a readable training state ({type(error).__name__}: {first[:120]}); "
            f"{fix}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an fsdfm training state; {fix}")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path} is a training state of version {state.get('version')!r}, "
                         f"this fsdfm reads version {STATE_VERSION}; {fix}")  # fmt: skip
    missing = [k for k in STATE_KEYS if k not in state]
    if missing or not isinstance(state["config"], dict):
        raise ValueError(f"{path} lacks {', '.join(missing) or 'a config'}: it is damaged; {fix}")
    return state, digest


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
    check_config(config)
    device_name = resolve_device(config.device, "--device").type
    procs = _Processes(device_name)
    try:
        devices = [procs.device] if procs.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            out = _Run(config.replace(device=device_name), procs).run()
        # Every rank finishes before the group is torn down: a rank that left early made gloo
        # abort the others at exit ("terminate called without an active exception").
        procs.barrier()
        return out
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
            remove_stale_temporaries(
                self.out, self.out / "model", self.out / "model_ema", self.out / "data"
            )
        procs.barrier()

        teacher = load(config.teacher) if config.mode == "distill" else None
        config = self._resolve_paths(config)
        self.given_warmup = config.warmup  # None: derived from steps (see _resume_or_start)
        stream, tokenizer = self._open_data(config, teacher)
        self.config = config = self._resolve(config, teacher, stream.tokenizer)
        self.tokenizer_name = stream.tokenizer
        self.data_key = stream.key
        self.blocks = Blocks(stream, config.seq_len, config.val_fraction)
        # FS-DFM's objective (the shortcut teacher), not pre-training's (also --method redi's).
        self.shortcut = config.mode == "distill" and config.method == "fsdfm"
        self.pairs, self.pairs_sha = None, None
        if config.method == "redi" or config.couplings is not None:
            self.pairs, self.pairs_sha = self._open_couplings(config, teacher)
        rows = self.blocks.n_train if self.pairs is None else self.pairs[0].shape[0]
        self.sampler = BlockSampler(rows, config.batch_size, config.seed)
        self.rows = rank_rows(config.batch_size, procs.rank, procs.world)
        share = self.rows.stop - self.rows.start
        if config.grad_accum > share:
            raise ValueError(
                f"grad_accum = {config.grad_accum} exceeds the {share} sequences per process "
                f"of a batch of {config.batch_size}"
            )

        torch.manual_seed(derive_seed(config.seed, "init"))
        model = self._build_model(config, teacher, tokenizer.vocab_size)
        del teacher
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
        # Distillation: the rows of the global batch drawn at each level of the grid so far.
        self.level_rows = torch.zeros(config.grid.bit_length(), dtype=torch.long)
        self.state_sha: str | None = None  # the sha256 of the state.pt on disk
        self._resume_or_start()
        self.saved_step = self.step  # the step of the checkpoint on disk (0: none yet)

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

    # -- data and model ------------------------------------------------------------------------
    def _open_data(self, config: TrainConfig, teacher):
        """(token stream, tokenizer): rank 0 tokenises (or finds the cache), then the others
        open it."""
        wanted = config.tokenizer or (teacher.tokenizer_name if teacher is not None else None)
        data = Path(config.data)
        if wanted is None and not (data.is_file() and data.suffix in (".bin", ".npy")):
            if teacher is not None:
                raise ValueError(f"{config.teacher} names no tokenizer: pass --tokenizer")
            wanted = "gpt2"
        stream = None
        if self.procs.main:
            stream = prepare_tokens(data, wanted, self.out / "data", progress=True)
        self.procs.barrier()
        if stream is None:
            stream = prepare_tokens(data, wanted, self.out / "data")
        tokenizer = get_tokenizer(stream.tokenizer)
        if stream.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"{data} declares a vocabulary of {stream.vocab_size} but {stream.tokenizer} has "
                f"{tokenizer.vocab_size}"
            )
        return stream, tokenizer

    def _build_model(self, config: TrainConfig, teacher, vocab: int) -> FSDFMTransformer:
        """The student made from the teacher, or a fresh DFM model of the preset."""
        if teacher is not None:
            if teacher.config.real_vocab_size != vocab:
                raise ValueError(
                    f"the teacher's vocabulary ({teacher.config.real_vocab_size} real tokens) "
                    f"does not match the {config.tokenizer} tokenizer ({vocab})"
                )
            changes = {"seq_len": config.seq_len, "dropout": config.dropout}
            if config.method == "redi":  # the teacher itself, retrained on its couplings
                model = model_copy(teacher, **changes)
            else:
                model = student_from_teacher(teacher, init=config.student_init, **changes)
        else:
            model = FSDFMTransformer(
                ModelConfig.preset(
                    config.preset,
                    vocab_size=vocab + (1 if config.source == "mask" else 0),
                    seq_len=config.seq_len,
                    dropout=config.dropout,
                    source=config.source,
                )
            )
        model.tokenizer_name = self.tokenizer_name
        return model

    def _open_couplings(self, config: TrainConfig, teacher) -> tuple[tuple[Tensor, Tensor], str]:
        """((x_0, x_1) int64 [n, L] on the CPU, the file's sha256): the --couplings file, or
        (--method redi) OUT/couplings.safetensors, which the processes make from the teacher
        when it is not there yet (a file made with other settings is refused, not replaced)."""
        own = config.couplings is None
        path = self.out / COUPLINGS_FILE if own else Path(config.couplings)
        if own:  # what the run's own file must have been made from
            wanted = {
                "teacher": config.teacher,
                "teacher_weights": weights_digest(teacher),
                "count": config.coupling_count,
                "steps": config.coupling_steps,
                "solver": "cumulative",
                "seed": derive_seed(config.seed, "couplings"),
            }
            # Every rank sees the same answer: only rank 0 writes the file, after a barrier
            # that all ranks reach only once they have looked.
            if not path.exists():
                self._make_couplings(path, config, teacher, wanted)
            if self.procs.main:  # parts left by a run killed between the rename and their removal
                shutil.rmtree(self.out / COUPLINGS_PARTS, ignore_errors=True)
        self.procs.barrier()
        x_0, x_1, meta = load_couplings(path)
        if own and meta != wanted:
            what = "; ".join(f"{k}: {meta.get(k)!r} -> {v!r}" for k, v in wanted.items()
                             if meta.get(k) != v)  # fmt: skip
            raise ValueError(
                f"{path} holds couplings made otherwise ({what}); use a new --out or remove it"
            )
        if x_1.shape[1] != config.seq_len:
            raise ValueError(
                f"{path}: pairs of {x_1.shape[1]} tokens, but the run has seq_len {config.seq_len}"
            )
        vocab = teacher.config.real_vocab_size
        for name, x in (("x_0", x_0), ("x_1", x_1)):
            if int(x.min()) < 0 or int(x.max()) >= vocab:
                raise ValueError(f"{path}: {name} holds ids outside the vocabulary [0, {vocab})")
        return (x_0, x_1), sha256_of(path)

    def _make_couplings(self, path: Path, config: TrainConfig, teacher, wanted: dict) -> None:
        """Make the teacher's couplings into ``path`` part by part (PART_BATCHES sampling batches
        each, kept under OUT/couplings.parts/ until all are made), so that a killed run resumes
        with the parts it made. Part i is pairs [i P, (i + 1) P) of the one-call result (batch b
        of the whole is always seeded seed + b), so the ranks share the work: all list the parts
        still to make, rank r makes every world-th of them from the r-th, and rank 0 joins them
        once all are made. No rank then waits at a barrier for more than one part of another's
        sampling (a rank 0 that made everything alone could outlast the process group's
        timeout)."""
        batch = max(config.batch_size, COUPLING_BATCH)
        per_part = batch * PART_BATCHES
        n = config.coupling_count
        parts_dir = self.out / COUPLINGS_PARTS
        if self.procs.main:
            parts_dir.mkdir(exist_ok=True)
        self.procs.barrier()
        sizes = [min(per_part, n - start) for start in range(0, n, per_part)]
        parts = [parts_dir / f"part-{i:05d}.safetensors" for i in range(len(sizes))]
        metas = [{**wanted, "part": i, "batch": batch} for i in range(len(sizes))]
        # Every rank lists the same parts: none is written until all have looked.
        missing = [i for i in range(len(sizes))
                   if not parts[i].exists() or load_couplings(parts[i])[2] != metas[i]]  # fmt: skip
        self.procs.barrier()
        mine = missing[self.procs.rank :: self.procs.world]
        bar = Progress(sum(sizes[i] for i in mine), "couplings", unit="pair",
                       enabled=self.procs.main)  # fmt: skip
        try:
            for i in mine:
                teacher.to(self.device).eval()
                pair = rectified_couplings(
                    teacher, sizes[i], steps=config.coupling_steps,
                    batch_size=batch, seq_len=config.seq_len,
                    seed=wanted["seed"] + i * PART_BATCHES, device=self.device,
                )  # fmt: skip
                save_couplings(parts[i], *pair, metas[i])
                bar.update(sizes[i])
        finally:
            bar.close()
            teacher.cpu()
        self.procs.barrier()
        if self.procs.main:
            pairs = [load_couplings(part) for part in parts]  # the ranks share --out
            save_couplings(path, torch.cat([p[0] for p in pairs]),
                           torch.cat([p[1] for p in pairs]), wanted)  # fmt: skip

    # -- configuration -------------------------------------------------------------------------
    @staticmethod
    def _resolve_paths(config: TrainConfig) -> TrainConfig:
        keys = ["data", "out", "teacher", "couplings"]
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
            if (config.method == "redi" or config.couplings is not None) and (
                base.source != "uniform"
            ):
                flag = "--method redi" if config.method == "redi" else "--couplings"
                raise ValueError(
                    f"{flag} needs a teacher of the uniform source ({config.teacher} has the "
                    f"{base.source} source, whose x_0 carries nothing to couple)"
                )
            if config.method == "redi":
                if base.step_conditioned:
                    raise ValueError(
                        f"--method redi rectifies a DFM teacher; {config.teacher} is a "
                        "step-conditioned FS-DFM student"
                    )
                # Pre-training again, on other pairs: its loss and a pre-training-like lr.
                defaults.update(lr=1e-4, loss="ce")
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
        if not state_path.exists():
            if self.procs.main:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
                self._write_config()
            return
        state, self.state_sha = _read_state(state_path)
        # A key missing from an older run's config is an option added since: that run behaved
        # as its default does.
        old = {**TrainConfig().to_dict(), **state["config"]}
        new = self.config.to_dict()
        changed = [k for k in new if k not in MUTABLE_KEYS and old.get(k) != new[k]]
        extended = "steps" in changed and isinstance(state["step"], int)
        if extended:
            # A longer (or shorter, not below the step reached) schedule continues the run.
            if new["steps"] < state["step"]:
                raise ValueError(
                    f"--steps {new['steps']} is below step {state['step']}, which {self.out} "
                    "has reached"
                )
            changed.remove("steps")
        if "warmup" in changed and self.given_warmup is None:
            # A warm-up derived from steps keeps the run's own (it has happened), also when an
            # extended run is resumed again with its new steps.
            changed.remove("warmup")
            self.config = self.config.replace(warmup=old["warmup"])
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
        if state.get("couplings_sha") != self.pairs_sha:
            raise ValueError(
                f"the couplings changed since {self.out} was started (another --couplings file, "
                "or its bytes); use a new --out"
            )
        if not isinstance(state["step"], int) or not 0 <= state["step"] <= self.config.steps:
            raise ValueError(
                f"{state_path}: step {state['step']!r} is outside the run's [0, "
                f"{self.config.steps}]; the file is damaged"
            )
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.load_state_dict(state["sampler"])
            if state.get("level_rows") is not None:  # states before the diagnostics lack it
                self.level_rows = state["level_rows"].clone()
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(
                f"{state_path} does not fit this run ({type(error).__name__}: {first}); the file "
                "is damaged or from another run: use a new --out"
            ) from None
        self.step = state["step"]
        if self.procs.main:
            self._write_config()
            self._truncate_metrics()
            if extended:
                self._say_extended(old, state["step"])

    def _say_extended(self, old: dict, step: int) -> None:
        c = self.config

        def lr_at(steps: int) -> float:
            return learning_rate(step, lr=c.lr, steps=steps, warmup=c.warmup,
                                 min_lr_ratio=c.min_lr_ratio)  # fmt: skip

        print(
            f"fsdfm {c.mode}: --steps {old['steps']} -> {c.steps}: continuing at step {step} "
            f"with the learning-rate schedule recomputed for {c.steps} steps (lr "
            f"{lr_at(old['steps']):.3g} -> {lr_at(c.steps):.3g})",
            file=sys.stderr,
        )

    def _write_config(self) -> None:
        import yaml

        text = yaml.safe_dump(self.config.to_dict(), sort_keys=False).encode()
        atomic_write(self.out / "config.yaml", lambda f: f.write(text))

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
        atomic_write(path, lambda f: f.write(data))

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
            "level_rows": self.level_rows,
            "couplings_sha": self.pairs_sha,
        }
        # state.json lists the sha256 of the new state and of the one it replaces, and is
        # renamed first: a crash between the two renames leaves the old state.pt, which the
        # list still accepts; anything else (a damaged file) is refused on resume.
        manifest_path, state_path = self.out / STATE_MANIFEST, self.out / "state.pt"
        with Staging() as stage:
            stage.write(state_path, lambda f: torch.save(state, f))
            ((tmp, _),) = stage.staged()
            written = sha256_of(tmp)  # read back: what is on disk is what gets recorded
            hashes = [written] + ([self.state_sha] if self.state_sha else [])
            text = json.dumps({"format": STATE_FORMAT, "sha256": hashes}, indent=1).encode()
            atomic_write(manifest_path, lambda f: f.write(text))
            stage.commit()
        self.state_sha = written

    # -- one step --------------------------------------------------------------------------------
    def _seed_step(self, step: int) -> None:
        self.noise_cpu.manual_seed(derive_seed(self.config.seed, "noise", step))
        self.noise_device.manual_seed(derive_seed(self.config.seed, "noise-device", step))
        torch.manual_seed(derive_seed(self.config.seed, "dropout", step, self.procs.rank))

    def _noisy(
        self, x_1: Tensor, t: Tensor, g_device: torch.Generator, x_0: Tensor | None = None
    ) -> Tensor:
        """x_t [B, L] from data x_1 [B, L] at times t [B] (float32 on the device), on the path
        from x_0 (default: a fresh draw of the source; with couplings: the pairs' own)."""
        if x_0 is None:
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

    def _pretrain_batch(self, x_1: Tensor, x_0: Tensor | None = None) -> dict:
        """The step's noise for the whole global batch x_1 [B, L]: times t and noisy x_t (on
        the path from ``x_0`` when given: the couplings of --method redi)."""
        t = torch.rand(x_1.shape[0], generator=self.noise_cpu).to(self.device, non_blocking=True)
        return {"x_1": x_1, "t": t, "x_t": self._noisy(x_1, t, self.noise_device, x_0)}

    def _pretrain_loss(self, batch: dict, rows: slice, n: int) -> tuple[Tensor, Tensor]:
        """(loss, stats [6]) of ``rows`` of the batch, the loss divided by n (the process's
        row count: the passes of a step add up to its mean)."""
        x_1, t, x_t = batch["x_1"][rows], batch["t"][rows], batch["x_t"][rows]
        per_seq = self._data_loss(self.wrapped(x_t, t), x_1, x_t, t)
        total = per_seq.sum()
        zero = total.new_zeros(())
        count = total.new_tensor(float(per_seq.shape[0]))
        stats = torch.stack([total, count, total, count, zero, zero])
        return total / n, stats.detach()

    def _distill_batch(self, x_1: Tensor, x_0: Tensor | None = None) -> dict:
        """The step's draws for the whole global batch: step sizes h, times t (CPU float64,
        no device sync) and noisy x_t (on the path from ``x_0`` when given: --couplings)."""
        c = self.config
        h, t = sample_step_sizes(x_1.shape[0], c.grid, self.noise_cpu, law=c.levels,
                                 progress=self.step / c.steps)  # fmt: skip
        t_device = t.float().to(self.device, non_blocking=True)
        x_t = self._noisy(x_1, t_device, self.noise_device, x_0)
        levels = level_of(h, self.config.grid)
        self.level_rows += torch.bincount(levels, minlength=self.level_rows.numel())
        return {"x_1": x_1, "t": t, "h": h, "x_t": x_t}

    def _distill_loss(self, batch: dict, rows: slice, n: int) -> tuple[Tensor, Tensor]:
        """(loss, stats [6]) of ``rows``: data rows (h = 1/grid) first with the data loss, then
        the distilled rows with KL(shortcut teacher || student); the loss divided by n."""
        h, t = batch["h"][rows], batch["t"][rows]
        is_distilled = h > 1.0 / self.config.grid
        order = torch.argsort(is_distilled.to(torch.uint8), stable=True)
        n_data = int((~is_distilled).sum())
        h, t = h[order], t[order]
        order = order.to(self.device, non_blocking=True)
        x_t, x_1 = batch["x_t"][rows][order], batch["x_1"][rows][order]
        t32 = t.float().to(self.device, non_blocking=True)
        logits = self.wrapped(x_t, t32, h.float().to(self.device, non_blocking=True))
        m = logits.shape[0]
        zero = logits.new_zeros(())
        data_sum = distill_sum = zero
        if n_data:
            d = slice(0, n_data)
            data_sum = self._data_loss(logits[d], x_1[d], x_t[d], t32[d]).sum()
        if n_data < m:
            s = slice(n_data, m)
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
            [total, zero + m, data_sum, zero + n_data, distill_sum, zero + (m - n_data)]
        )
        return total / n, stats.detach()

    def _passes(self) -> list[slice]:
        """This process's rows of the batch in grad_accum consecutive parts (sizes differing
        by at most one)."""
        start, stop = self.rows.start, self.rows.stop
        k = self.config.grad_accum
        bounds = [start + (stop - start) * i // k for i in range(k + 1)]
        return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]

    def _train_step(self) -> tuple[Tensor, Tensor | None]:
        c = self.config
        lr = learning_rate(
            self.step, lr=c.lr, steps=c.steps, warmup=c.warmup, min_lr_ratio=c.min_lr_ratio
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._seed_step(self.step)
        indices = self.sampler.next_batch()
        if self.pairs is not None:
            x_0, x_1 = (p[indices].to(self.device, non_blocking=True) for p in self.pairs)
        else:
            x_0, x_1 = None, self.blocks.get(indices, self.device)
        batch = self._distill_batch(x_1, x_0) if self.shortcut else self._pretrain_batch(x_1, x_0)
        objective = self._distill_loss if self.shortcut else self._pretrain_loss
        self.optimizer.zero_grad(set_to_none=True)
        passes = self._passes()
        n = self.rows.stop - self.rows.start
        stats = None
        for i, rows in enumerate(passes):
            # Across processes the gradients are averaged once, in the step's last pass.
            sync = i == len(passes) - 1 or not hasattr(self.wrapped, "no_sync")
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                loss, part = objective(batch, rows, n)
                loss.backward()
            stats = part if stats is None else stats + part
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
            h = 1.0 / c.grid if model.config.step_conditioned else None
            total += float(self._data_loss(model(x_t, t, h), x_1, x_t, t).sum())
            count += n
        model.train(was_training)
        return total / count

    @torch.no_grad()
    def _diagnostics(self) -> dict:
        """Per level of the grid (:func:`distillation_diagnostics`) on the first held-out
        blocks, with the same times and noise at every evaluation, and the rows drawn so far."""
        c = self.config
        indices = list(self.blocks.val_indices())[: min(c.batch_size, 32)]
        x_1 = self.blocks.get(indices, self.device)
        g_cpu = torch.Generator().manual_seed(derive_seed(c.seed, "diagnostics"))
        g_dev = torch.Generator(self.device).manual_seed(derive_seed(c.seed, "diagnostics-dev"))
        was_training = self.model.training
        self.model.eval()
        levels = distillation_diagnostics(
            self.model, self.ema, x_1, lambda x, t: self._noisy(x, t, g_dev), c.grid,
            c.teacher_type, schedule=self.schedule, generator=g_cpu, device_generator=g_dev,
        )  # fmt: skip
        self.model.train(was_training)
        for row, rows in zip(levels.values(), self.level_rows.tolist(), strict=True):
            row["rows"] = rows
        return levels

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
        bar = Progress(end, f"fsdfm {c.mode}", initial=self.step, enabled=procs.main)
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
                    self._stop_if_diverged(record)
                    elapsed = time.perf_counter() - timer
                    record["tokens_per_s"] = timed_steps * tokens_per_step / max(elapsed, 1e-9)
                    if evaluate and procs.main and self.blocks.n_val:
                        record["val_loss"] = self._validate(self.model)
                        if self.ema is not None:
                            record["val_loss_ema"] = self._validate(self.ema)
                        if self.shortcut:
                            record["levels"] = self._diagnostics()
                        self._stop_if_diverged(record)
                    if metrics is not None:
                        metrics.write(json.dumps(record, allow_nan=False) + "\n")
                        metrics.flush()
                        if "levels" in record:
                            plot_diagnostics(self.out / "metrics.jsonl", self.out / DIAGNOSTICS)
                    shown = {"loss": f"{record['loss']:.4f}"}
                    if "val_loss" in record:
                        shown["val_loss"] = f"{record['val_loss']:.4f}"
                    bar.note(**shown, tokens_per_s=f"{record['tokens_per_s']:,.0f}")
                    timer, timed_steps = time.perf_counter(), 0
                if self.step % c.save_every == 0 or self.step == end:
                    self._stop_if_diverged()
                    self._save()
                    self.saved_step = self.step
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

    def _stop_if_diverged(self, record: dict | None = None) -> None:
        """Raise TrainingDiverged if the logged values (``record``) or, without one, the weights
        (one host synchronisation, before a save; every rank holds the same weights and so
        decides alike) are not finite."""
        if record is not None:
            flat = dict(record)
            for level, values in record.get("levels", {}).items():  # the distillation diagnostics
                flat.update({f"{key} at h = {level}": v for key, v in values.items()})
            bad = {k: v for k, v in flat.items()
                   if isinstance(v, float) and not math.isfinite(v)}  # fmt: skip
            what = ", ".join(f"{k} = {v}" for k, v in bad.items())
        else:
            params = [p for m in (self.model, self.ema) if m is not None for p in m.parameters()]
            finite = bool(torch.stack([p.isfinite().all() for p in params]).all())
            bad, what = (not finite), "the weights hold NaN or inf"
        if not bad:
            return
        kept = (
            f"{self.out} keeps the checkpoint of step {self.saved_step}"
            if self.saved_step
            else "nothing was saved"
        )
        raise TrainingDiverged(
            f"training diverged at step {self.step} ({what}); stopped without logging or saving "
            f"it: {kept} (a lower --lr, a longer --warmup or --grad-clip may help)"
        )

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
        if self.shortcut:
            record["loss_data"] = data_sum / n_data if n_data else None
            record["loss_distill"] = distill_sum / n_distill if n_distill else None
            record["frac_distill"] = n_distill / n
        return record


# ----------------------------------------------------------------------------------------------
# Distillation diagnostics


@torch.no_grad()
def distillation_diagnostics(
    student: FSDFMTransformer,
    ema: FSDFMTransformer,
    x_1: Tensor,
    noisy,
    grid: int,
    kind: str = "rk4",
    *,
    schedule: PolynomialSchedule | None = None,
    generator: torch.Generator | None = None,
    device_generator: torch.Generator | None = None,
) -> dict[str, dict[str, float]]:
    """How far distillation has come, per level of the grid, on held-out blocks x_1 [n, L]:
    for each step size h (largest first) the same x_1 is noised at times t on the grid with
    t + h <= 1 (``noisy(x_1, t)`` gives x_t), and with p_h the student's law at (x_t, t, h)

    - ``kl_target``: E KL(shortcut target_h || p_h), the self-consistency the objective drives
      to zero (the target made by ``ema`` as in training; the finest level, trained on data,
      has none);
    - ``kl_fine``: E KL(p_h || p_{1/grid}), how far a big step's law has moved from the
      finest step's at the same point (0 at the finest level);
    - ``entropy``: the student's mean predictive entropy (nats per token) at h.

    Means over sequences and tokens, in nats. ``generator`` (CPU) draws the times,
    ``device_generator`` the teacher's jumps: fixed seeds give comparable values at every
    evaluation."""
    n, device = x_1.shape[0], x_1.device
    finest = 1.0 / grid
    out = {}
    for name, k in zip(level_names(grid), range(grid.bit_length()), strict=True):
        h_value = 2.0**-k
        slots = grid - grid // 2**k + 1
        j = torch.randint(0, slots, (n,), generator=generator, device="cpu").double()
        t = j / grid
        x_t = noisy(x_1, t.float().to(device))
        t32 = t.float().to(device)
        h = torch.full((n,), h_value, dtype=torch.float64)
        logits = student(x_t, t32, h.float().to(device)).float()
        logp = torch.log_softmax(logits, -1)
        row = {"entropy": float(-(logp.exp() * logp).sum(-1).mean())}
        if h_value > finest:
            target = shortcut_teacher(ema, x_t, t, h, kind, schedule=schedule,
                                      generator=device_generator)  # fmt: skip
            row["kl_target"] = float(forward_kl(target, logits).mean())
            fine = student(x_t, t32, torch.full_like(t32, finest)).float()
            row["kl_fine"] = float(forward_kl(logits, fine).mean())
        else:
            row["kl_fine"] = 0.0
        out[name] = row
    return out


DIAGNOSTICS = "diagnostics.png"  # written beside metrics.jsonl by fsdfm distill


def plot_diagnostics(metrics_path: str | Path, png_path: str | Path) -> Path:
    """The per-level diagnostics of a distillation's metrics.jsonl against the training step:
    self-consistency KL(target_h || student_h), KL(student_h || student_finest), predictive
    entropy and rows drawn, one line per level (log scales where the values span decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    records = [r for r in records if "levels" in r]
    panels = [("kl_target", "KL(target_h || student_h) (nats)"),
              ("kl_fine", "KL(student_h || student_finest) (nats)"),
              ("entropy", "predictive entropy (nats)"), ("rows", "rows drawn so far")]  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    names = list(records[0]["levels"]) if records else []
    # One colour per level from a sequential map (a grid of 1024 has 11 levels, more than the
    # default colour cycle): dark for h = 1, light for the finest.
    colours = plt.cm.viridis([i / max(len(names) - 1, 1) for i in range(len(names))])
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, colour in zip(names, colours, strict=True):
            points = [(r["step"], r["levels"][name].get(key)) for r in records]
            points = [(s, v) for s, v in points if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=2, color=colour,
                        label=f"h = {name}")  # fmt: skip
        values = [v for r in records for row in r["levels"].values()
                  if (v := row.get(key)) is not None and v > 0]  # fmt: skip
        if values and max(values) > 100 * min(values):
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if names:
        axes[0].legend(fontsize=6)
    fig.tight_layout()
    path = save_figure(fig, png_path, dpi=80)  # a reader never sees half a figure
    plt.close(fig)
    return path
