"""Loading and saving FS-DFM / DFM models (SPEC 3): released ``.pth`` files and our own format.

Two formats are read by :func:`load`:

- a released-style ``.pth`` torch pickle, read ONLY with ``torch.load(weights_only=True)`` (a file
  holding anything but tensors and plain containers is refused, never executed). The weights lie
  under ``model`` (a DFM file) or ``student_model``, ``student_ema_model`` and ``teacher_model``
  (an FS-DFM file), possibly nested inside other entries, next to optimiser states, counters and
  so on; ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) key prefixes are stripped. A bare
  state dict (``torch.save(model.state_dict())``) is read as ``model``. The config is read off the
  shapes (:func:`fsdfm.model.config_from_state_dict`);
- a directory written by :func:`save`: ``model.safetensors`` (no pickle) and ``config.json`` (the
  :class:`~fsdfm.model.ModelConfig` fields, ``tokenizer``, the format version and, from version
  2, the sha256 of every file of the model, checked on load), with a model card (``README.md``,
  not checksummed: it is there to be edited). A lone ``.safetensors`` file is read like a bare
  state dict;
- a Hugging Face hub id ("owner/name") of a repository holding such a directory, fetched with
  ``huggingface_hub`` into its cache (which honours ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``;
  ``local_files_only=True`` never touches the network).

:func:`convert` turns a released file into such a directory.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from fsdfm._args import resolve_device
from fsdfm._io import (
    Staging,
    exchange,
    fsync_path,
    remove_stale_temporaries,
    sha256_of,
    temporary_name,
)
from fsdfm.model import GPT2_VOCAB, FSDFMTransformer, ModelConfig, config_from_state_dict

__all__ = [
    "FORMAT_VERSION",
    "WEIGHT_CHOICES",
    "convert",
    "load",
    "model_card",
    "read_state_dict",
    "save",
]

FORMAT = "fsdfm"
CARD_FILE = "README.md"  # the model card: written by save, never checksummed
FORMAT_VERSION = 2  # 2: config.json records the files' sha256
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"  # a BPE tokenizer saved with the model
DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"  # fsdfm.load("default")
NAMED_TOKENIZERS = ("gpt2", "byte")
ROTARY_KEY = "rotary_emb.inv_freq"

# `weights=` choice -> the entry of a released file that holds those weights.
WEIGHT_CHOICES = {
    "ema": "student_ema_model",
    "student": "student_model",
    "teacher": "teacher_model",
    "model": "model",
}
_DEFAULT_ORDER = ("ema", "student", "model", "teacher")  # the first present is the default
_ENTRY_TO_CHOICE = {entry: choice for choice, entry in WEIGHT_CHOICES.items()}
_PREFIXES = ("_orig_mod.", "module.")
_MAX_DEPTH = 4  # how deep the named entries are searched for in nested dicts


# ----------------------------------------------------------------------------------------------
# load


def load(
    path: str | os.PathLike,
    *,
    weights: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seq_len: int | None = None,
    source: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> FSDFMTransformer:
    """An :class:`~fsdfm.model.FSDFMTransformer` in eval mode from a checkpoint.

    path: a released-style ``.pth`` file, a directory written by :func:`save`, a
        ``.safetensors`` state dict, "default" (the model bundled in the package), or a Hugging
        Face hub id ("owner/name", when no such local path exists) of a repository that holds a
        saved directory; ``revision``, ``cache_dir`` and ``local_files_only`` go to
        ``huggingface_hub.snapshot_download`` (only the model's own files are fetched).
    weights: which model of a ``.pth`` file: "ema" (the student's EMA, the default where
        present), "student", "teacher" or, for a DFM file, "model" (its only model, the default).
        A directory holds one model: None.
    dtype: cast the floating-point weights (e.g. torch.bfloat16; the rotary frequencies stay
        fp32). None keeps the stored dtype (fp32 where a file mixes dtypes), except for the
        bundled model away from CUDA: it is stored in bf16 to stay small, and CPU bf16 matmuls
        are about 3x slower than fp32 ones, so it comes in fp32 there.
    device: where the model goes (default CPU).
    seq_len, source: override the config (a ``.pth`` file does not record them: seq_len
        defaults to 1024, source to "mask" for a vocabulary of 50258 and "uniform" otherwise).

    The model's ``tokenizer_name`` is the directory's ``tokenizer``, or for a ``.pth`` file
    "gpt2" when the vocabulary is GPT-2's (50257 real tokens), else None.
    """
    if device is not None:
        device = resolve_device(device)
    if str(path) == "default" and dtype is None and torch.device(device or "cpu").type != "cuda":
        dtype = torch.float32
    path = _default_if_named(path)
    if not path.exists() and _is_hub_id(str(path)):
        path = _from_hub(str(path), revision, cache_dir, local_files_only)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    state_dict, config, tokenizer, where = _read(path, weights, seq_len, source)
    model = _build(config, state_dict, where, dtype)
    model.tokenizer_name = tokenizer
    if device is not None:
        model.to(device)
    return model.eval()


def _default_if_named(path) -> Path:
    """ "default" names the model bundled in the package (fsdfm/assets/default)."""
    if str(path) != "default":
        return Path(path)
    if not (DEFAULT_MODEL / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"the bundled default model is not in this installation ({DEFAULT_MODEL}); "
            "pass a model path (see scripts/train_default.sh for how it is made)"
        )
    return DEFAULT_MODEL


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _is_hub_id(name: str) -> bool:
    """ "owner/name", as the hub spells repository ids (a relative path of two parts that does
    not exist locally reads the same: it is tried on the hub, and the error says both)."""
    return _HUB_ID.fullmatch(name) is not None and ".." not in name


def _from_hub(repo_id: str, revision, cache_dir, local_files_only: bool) -> Path:
    """The local snapshot of a hub repository's model files (downloaded unless cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, CARD_FILE],
        )
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{repo_id} is neither a local path nor a hub repository in the local cache, and "
            f"the hub cannot be reached (offline: {error.__class__.__name__})"
        ) from None
    except HfHubHTTPError as error:
        raise FileNotFoundError(
            f"{repo_id} is neither a local path nor a hub repository fsdfm can read: {error}"
        ) from None
    return Path(folder)


def read_state_dict(
    path: str | os.PathLike, *, weights: str | None = None
) -> tuple[dict[str, Tensor], ModelConfig]:
    """(state dict, config) from any checkpoint :func:`load` reads, without building a model: the
    state dict has SPEC 3's names (prefixes stripped), on CPU, in the stored dtypes."""
    state_dict, config, _, _ = _read(_default_if_named(path), weights, None, None)
    return state_dict, config


def _read(path: Path, weights, seq_len, source):
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if weights is not None and weights not in WEIGHT_CHOICES:
        raise ValueError(
            f"weights must be None or one of {sorted(WEIGHT_CHOICES)}, got {weights!r}"
        )
    if path.is_dir():
        if weights not in (None, "model"):
            raise ValueError(
                f"{path} is a saved model directory holding one model: weights must be None, "
                f"got {weights!r}"
            )
        state_dict, config, tokenizer = _read_directory(path)
        changes = {k: v for k, v in (("seq_len", seq_len), ("source", source)) if v is not None}
        config = config.replace(**changes) if changes else config
        return state_dict, config, tokenizer, str(path)

    if path.suffix == ".safetensors":
        if weights not in (None, "model"):
            raise ValueError(f"{path} holds one state dict: weights must be None, got {weights!r}")
        state_dict, _ = _read_safetensors(path)
        entry, where = "model", str(path)
    else:
        obj = _torch_load(path)
        entry, state_dict = _select(obj, weights, path)
        where = f"{path} [{entry}]"
    state_dict = _strip_prefixes(state_dict, where)
    try:
        config = config_from_state_dict(
            state_dict, seq_len=1024 if seq_len is None else seq_len, source=source
        )
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    tokenizer = "gpt2" if config.real_vocab_size == GPT2_VOCAB else None
    return state_dict, config, tokenizer, where


def _torch_load(path: Path):
    """torch.load with weights_only=True (mmap for zip files: only the tensors used are read)."""
    try:
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" (it references {found.group(1)})" if found else ""
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers{what}: refused, "
            "nothing in it was executed. Only weights-only checkpoints are loaded."
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise ValueError(
            f"{path} is not a readable torch checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None


def _is_state_dict(value) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())
    )


def _find_entries(obj) -> dict[str, Mapping]:
    """The named model state dicts in a loaded file: {entry: state dict}, shallowest first."""
    if _is_state_dict(obj):
        return {"model": obj}
    found: dict[str, Mapping] = {}
    queue = deque([(obj, 0)])
    while queue:
        node, depth = queue.popleft()
        if not isinstance(node, Mapping):
            continue
        for key, value in node.items():
            if key in _ENTRY_TO_CHOICE and _is_state_dict(value):
                found.setdefault(key, value)
            elif isinstance(value, Mapping) and depth < _MAX_DEPTH:
                queue.append((value, depth + 1))
    return found


def _select(obj, weights: str | None, path: Path) -> tuple[str, Mapping]:
    found = _find_entries(obj)
    if not found:
        top = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"{path}: unknown checkpoint layout: no model state dict under 'model' (DFM) or "
            f"'student_model' / 'student_ema_model' / 'teacher_model' (FS-DFM); top-level "
            f"keys found: {top}"
        )
    available = [c for c in _DEFAULT_ORDER if WEIGHT_CHOICES[c] in found]
    choice = available[0] if weights is None else weights
    if choice not in available:
        kind = "an FS-DFM" if "model" not in available else "a DFM"
        raise ValueError(
            f"{path} is {kind} checkpoint without {WEIGHT_CHOICES[choice]!r}: weights must be "
            f"None or one of {available}, got {weights!r}"
        )
    entry = WEIGHT_CHOICES[choice]
    return entry, found[entry]


def _strip_prefixes(state_dict: Mapping, where: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise ValueError(f"{where}: two keys become {name!r} once prefixes are stripped")
        out[name] = value
    return out


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {error}"
        ) from None


def _read_directory(path: Path) -> tuple[dict[str, Tensor], ModelConfig, str | None]:
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{path} is not a saved fsdfm model: {needed.name} is missing "
                f"(a directory needs {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    data = dict(data)
    fmt, version = data.pop("format", None), data.pop("format_version", None)
    if fmt != FORMAT:
        raise ValueError(f"{config_path}: format is {fmt!r}, expected {FORMAT!r}")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: format_version {version!r} is not supported (this fsdfm reads "
            f"versions up to {FORMAT_VERSION}; upgrade fsdfm)"
        )
    checksums = data.pop("files", None) if version >= 2 else None
    if version >= 2 and not (
        isinstance(checksums, dict) and all(isinstance(v, str) for v in checksums.values())
    ):
        raise ValueError(f"{config_path}: 'files' must map file names to their sha256")
    for name, digest in (checksums or {}).items():
        file = path / name
        if name not in (WEIGHTS_FILE, TOKENIZER_FILE) or not file.is_file():
            raise FileNotFoundError(f"{path}: {name}, recorded in {CONFIG_FILE}, is missing")
        if sha256_of(file) != digest:
            raise ValueError(
                f"{file} does not match the sha256 recorded in {CONFIG_FILE}: the file is damaged "
                "or from another save (save or convert the model again)"
            )
    tokenizer = data.pop("tokenizer", None)
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise ValueError(f"{config_path}: tokenizer must be a string or null, got {tokenizer!r}")
    if tokenizer is not None and tokenizer not in NAMED_TOKENIZERS:
        # A model names its own tokenizer file, inside its directory: a path elsewhere would
        # make loading depend on (and read) files the directory does not hold.
        file = path / tokenizer
        if Path(tokenizer).name != tokenizer or not file.resolve().parent.samefile(path):
            raise ValueError(
                f"{config_path}: tokenizer must be gpt2, byte or a file name inside the model "
                f"directory, got {tokenizer!r}"
            )
        if not file.is_file():
            raise FileNotFoundError(f"{path}: the tokenizer file {tokenizer!r} is missing")
        tokenizer = str(file)
    try:
        config = ModelConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: {error}") from None
    state_dict, metadata = _read_safetensors(weights_path)
    if "config" in metadata:
        if _json_or_none(metadata["config"]) != config.to_dict():
            raise ValueError(
                f"{path}: {CONFIG_FILE} and {WEIGHTS_FILE} record different configs (an "
                "interrupted save, or files from two models?)"
            )
    elif version >= 2:  # save always records the config beside the weights
        raise ValueError(
            f"{weights_path} lacks the config that fsdfm.save records with the weights: it was "
            f"replaced by another file (load a bare state dict as {WEIGHTS_FILE} by its path)"
        )
    _check_config_against_weights(config, state_dict, config_path)
    return state_dict, config, tokenizer


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _check_config_against_weights(config: ModelConfig, state_dict, config_path: Path) -> None:
    """Every field of ``config`` that the weights' shapes determine must agree with them, so
    that a hand-edited config.json is caught by name (the source and seq_len leave no trace in
    the weights: only the recorded metadata can vouch for those)."""
    try:
        implied = config_from_state_dict(
            state_dict, seq_len=config.seq_len, dropout=config.dropout, source=config.source
        )
    except ValueError:
        return  # weights of another layout: _build names the missing and unexpected keys
    for field in ("vocab_size", "dim", "n_blocks", "n_heads", "cond_dim", "step_conditioned"):
        said, found = getattr(config, field), getattr(implied, field)
        if said != found:
            raise ValueError(
                f"{config_path} says {field} = {said!r} but the weights have {field} = {found!r}"
            )


def _build(
    config: ModelConfig, state_dict: Mapping, where: str, dtype: torch.dtype | None
) -> FSDFMTransformer:
    """The model with exactly these weights; clear errors for missing / unexpected keys and
    wrong shapes. The tensors are copied (never left backed by the file)."""
    with torch.device("meta"):
        model = FSDFMTransformer(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    for key, want in expected.items():
        got = state_dict.get(key)
        if got is None:
            continue
        if tuple(got.shape) != tuple(want.shape):
            problems.append(
                f"{key!r} has shape {tuple(got.shape)} in the checkpoint but the model "
                f"({_describe(config)}) expects {tuple(want.shape)}"
            )
        elif not got.is_floating_point():
            problems.append(f"{key!r} has dtype {got.dtype}, expected floating point")
    if problems:
        raise ValueError(f"{where}: the weights do not fit the model: " + "; ".join(problems))

    stored = {v.dtype for k, v in state_dict.items() if k != ROTARY_KEY}
    target = dtype if dtype is not None else (stored.pop() if len(stored) == 1 else torch.float32)
    weights = {}
    for key, value in state_dict.items():
        want = torch.float32 if key == ROTARY_KEY else target
        # .to() copies when the dtype changes; clone otherwise (file-backed mmap tensors).
        weights[key] = value.to(want) if value.dtype != want else value.clone()
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def _describe(config: ModelConfig) -> str:
    kind = "student" if config.step_conditioned else "teacher"
    return (
        f"{kind}, V {config.vocab_size}, d {config.dim}, {config.n_blocks} blocks, "
        f"{config.n_heads} heads, c {config.cond_dim}"
    )


def _listing(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > n else ''}]"


# ----------------------------------------------------------------------------------------------
# save / convert


def _unwrap(model):
    """The FSDFMTransformer inside torch.compile / DDP wrappers."""
    while not isinstance(model, FSDFMTransformer):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or inner is model:
            raise TypeError(f"save needs an FSDFMTransformer, got {type(model).__name__}")
        model = inner
    return model


def _tokenizer_name(tokenizer, model) -> str | None:
    if tokenizer is None:
        return getattr(model, "tokenizer_name", None)
    if isinstance(tokenizer, str):
        return tokenizer
    for attribute in ("name_or_path", "name"):
        name = getattr(tokenizer, attribute, None)
        if isinstance(name, str) and name:
            return name
    raise TypeError(
        f"tokenizer must be a name (str), None or an object with a name, got {tokenizer!r}"
    )


def _bpe_file(name: str | None) -> Path | None:
    """The tokenizer.json behind a tokenizer name that is a path (a BPE), else None."""
    if name is None or name in NAMED_TOKENIZERS:
        return None
    path = Path(name)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer {name!r} is neither gpt2, byte nor a tokenizer.json")
    return file


def save(model, directory: str | os.PathLike, *, tokenizer=None, card: bool = True) -> Path:
    """Write ``model`` to ``directory`` (created if needed): ``model.safetensors`` (the exact
    tensors, in their dtypes), ``config.json`` (the config, ``tokenizer``, the format version
    and the sha256 of the files, which :func:`load` checks; the config is also in the
    safetensors metadata) and, with ``card``, a model card ``README.md`` (Hugging Face's
    front matter, the config, how to load and sample; an existing card is kept). Returns the
    directory; upload it as a hub repository and ``fsdfm.load("owner/name")`` reads it.

    Nothing is lost: the new model is written, fsynced and hashed in a temporary directory
    beside ``directory``, which then replaces it in one atomic step (a new directory is renamed
    into place; an existing one is exchanged with it, Linux's renameat2, and the old model
    removed), so a reader or a crash sees the old model or the new one, never a mix. Where the
    directory holds other files too, or the file system cannot exchange directories, the files
    are replaced one at a time, config.json last: a crash in between leaves files whose
    checksums disagree, which :func:`load` reports rather than loading a mix.

    tokenizer: the tokenizer's name (e.g. "gpt2"), an object with ``name_or_path`` / ``name``,
        or None for the model's ``tokenizer_name``. A BPE tokenizer (a path to its
        tokenizer.json) is copied into the directory, and :func:`load` gives its copy.
    """
    model = _unwrap(model)
    name = _tokenizer_name(tokenizer, model)
    # A BPE tokenizer given by path travels with the model: its tokenizer.json is copied into
    # the directory and recorded by that relative name, so the directory can be moved.
    bpe = _bpe_file(name)
    bpe_bytes = bpe.read_bytes() if bpe is not None else None
    if bpe is not None:
        name = TOKENIZER_FILE
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    remove_stale_temporaries(directory.parent, target=directory.name)

    config = model.config.to_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config),
    }

    old_card = directory / CARD_FILE
    card_text = (
        (old_card.read_text() if old_card.is_file() else model_card(model.config, name))
        if card
        else None
    )

    def write_files(stage: Staging, where: Path) -> None:
        """Stage the files in ``where``, config.json last with the others' checksums."""
        if bpe_bytes is not None:
            stage.write(where / TOKENIZER_FILE, lambda f: f.write(bpe_bytes))
        stage.write_path(
            where / WEIGHTS_FILE, lambda tmp: _save_safetensors(tensors, tmp, metadata)
        )
        files = {target.name: sha256_of(tmp) for tmp, target in stage.staged()}
        if card_text is not None:
            stage.write(where / CARD_FILE, lambda f: f.write(card_text.encode()))
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **config,
            "tokenizer": name,
            "files": files,
        }
        text = (json.dumps(document, indent=2) + "\n").encode()
        stage.write(where / CONFIG_FILE, lambda f: f.write(text))

    if _only_model_files(directory):
        fresh = temporary_name(directory)
        fresh.mkdir()
        try:
            with Staging() as stage:
                write_files(stage, fresh)
                stage.commit()
            fsync_path(fresh)
            if not directory.exists():
                os.rename(fresh, directory)
                fsync_path(directory.parent)
                return directory
            if exchange(fresh, directory):  # `fresh` now holds the old model
                fsync_path(directory.parent)
                return directory
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
    directory.mkdir(exist_ok=True)
    with Staging() as stage:
        write_files(stage, directory)
        stage.commit()
    return directory


def model_card(config: ModelConfig, tokenizer: str | None) -> str:
    """A Hugging Face model card for a saved model: front matter (library, pipeline, tags) and
    what a reader needs: the config, the tokenizer and how to load and sample."""
    kind = "FS-DFM student (step-conditioned)" if config.step_conditioned else "DFM teacher"
    rows = "\n".join(f"| {k} | {v} |" for k, v in config.to_dict().items())
    return f"""---
library_name: fsdfm
pipeline_tag: text-generation
tags:
- discrete-flow-matching
- fs-dfm
- few-step-generation
---

# fsdfm model: {kind}

A discrete flow-matching language model in the format of
[fsdfm](https://arxiv.org/abs/2509.20624) (FS-DFM, few-step discrete flow matching): it writes
all {config.seq_len} tokens of a sequence at once and refines them in a few steps.
Tokenizer: `{tokenizer}`. Files: `model.safetensors` (weights), `config.json` (config and
checksums, checked on load).

```python
import fsdfm

model = fsdfm.load("path/or/owner-name")  # a local directory or a Hugging Face hub id
tokenizer = fsdfm.get_tokenizer(model.tokenizer_name)
print(fsdfm.generate(model, tokenizer, "Once upon a time", steps=8, seed=0)[0])
```

| config | value |
|---|---|
{rows}
"""


def _save_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors' save_file, with its I/O failures (a read-only or full disk) as the OSError
    that every other writer raises, not a SafetensorError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        errno_ = int(code.group(1))
        raise OSError(errno_, os.strerror(errno_), str(path)) from error


def _only_model_files(directory: Path) -> bool:
    """Whether ``directory`` is absent or holds nothing but a saved model's files, so that it
    can be replaced as a whole."""
    if not directory.exists():
        return True
    ours = {WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, CARD_FILE}
    return all(entry.name in ours and entry.is_file() for entry in directory.iterdir())


def convert(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    weights: str | None = None,
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Load a released ``.pth`` (``weights`` as in :func:`load`) and :func:`save` it as a
    safetensors directory. tokenizer: None keeps the inferred one ("gpt2" for GPT-2's
    vocabulary); dtype optionally casts the weights. Returns the directory."""
    model = load(src, weights=weights, dtype=dtype)
    return save(model, out_dir, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------
# Hugging Face's entry points on the model class. They are attached here, not defined in
# fsdfm.model, because loading and saving sit above the model: the model module never imports
# this one.


def _from_pretrained(cls, name_or_path, **kwargs) -> FSDFMTransformer:
    """:func:`fsdfm.checkpoint.load`: a saved directory, a released ``.pth``, "default" or a
    Hugging Face hub id; keyword arguments as there (device, dtype, revision, ...)."""
    return load(name_or_path, **kwargs)


def _save_pretrained(self, directory, *, tokenizer=None, card: bool = True) -> Path:
    """:func:`fsdfm.checkpoint.save`: safetensors weights, config.json with checksums and a
    model card README.md (kept if the directory has one). Returns the directory."""
    return save(self, directory, tokenizer=tokenizer, card=card)


FSDFMTransformer.from_pretrained = classmethod(_from_pretrained)
FSDFMTransformer.save_pretrained = _save_pretrained
