"""Training data: text or token files -> a memory-mapped token stream -> packed blocks of
``seq_len`` tokens, a held-out split, and a deterministic, resumable, rank-sharded batch sampler.

Inputs (the ``--data`` of ``fsdfm pretrain`` / ``fsdfm distill``):

- a text file, or a directory of text files (every ``*.txt`` below it, recursively, in sorted
  order of relative path). Each file is one document: it is read as UTF-8 (undecodable bytes
  become U+FFFD), tokenised whole, and followed by the tokenizer's end-of-text id. With the GPT-2
  tokenizer a literal ``<|endoftext|>`` in the text is the end-of-text token as well, so a single
  file can hold many documents separated that way;
- a token file, ``NAME.bin`` (raw ids, native byte order) or ``NAME.npy`` (a 1-D NumPy array),
  with the sidecar ``NAME.json``::

      {"format": "fsdfm-tokens", "version": 1, "dtype": "uint16" | "uint32",
       "tokenizer": "gpt2" | "byte", "vocab_size": V, "num_tokens": N}

  The stream is used as is: it already holds the end-of-text ids where documents end. This is
  also the cache format, so a cached file can be passed as ``--data`` to another run.

Cache: text is tokenised once into ``CACHE/<key>.bin`` + ``CACHE/<key>.json`` (the format above),
where key = sha256(tokenizer, and every input file's absolute path, size and mtime_ns); a later
run with unchanged inputs re-uses it, a changed file (size or mtime) gives a new key and a
rebuild. Both files are written under temporary names and renamed into place, the sidecar last,
so an interrupted build is never mistaken for a complete one.

Blocks: the stream of N tokens is cut into n = N // L non-overlapping blocks of L = seq_len tokens
(the tail shorter than L is dropped; a block may span a document boundary). The held-out split is
the last n_val = max(1, floor(val_fraction n)) blocks (none when n = 1 or val_fraction = 0).

Sampler: epoch e visits the n_train training blocks in the order of
``torch.randperm(n_train, generator seeded with derive_seed(seed, "data", e))``; the global batch of
a step is the next B indices, running over into the next epoch. The position (epoch, index) is the
whole state (:meth:`BlockSampler.state_dict`). With W ranks, rank r takes rows
[r B / W, (r + 1) B / W) of every global batch, so the union over ranks is the single-process batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fsdfm._io import Staging
from fsdfm.progress import tracked

__all__ = [
    "TOKEN_FORMAT",
    "BlockSampler",
    "Blocks",
    "TokenStream",
    "derive_seed",
    "prepare_tokens",
    "rank_rows",
    "write_token_file",
]

TOKEN_FORMAT = "fsdfm-tokens"
TOKEN_FORMAT_VERSION = 1
TOKEN_FILE_SUFFIXES = (".bin", ".npy")
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, stable across processes and Python versions
    (unlike ``hash()``): every random stream of a run is seeded from (seed, purpose, step, ...)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class TokenStream:
    """A 1-D memory-mapped token stream and what it was tokenised with.

    tokens: np.ndarray [N] of uint16 / uint32 (read-only memory map); key: a fingerprint of the
    input (the cache key for text, a hash of path, size and mtime for a token file)."""

    tokens: np.ndarray
    tokenizer: str
    vocab_size: int
    key: str
    path: Path

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def write_token_file(
    path: str | os.PathLike, documents, *, tokenizer: str, vocab_size: int
) -> Path:
    """Write ``documents`` (an iterable of id sequences, each written as is: append the
    end-of-text id yourself) as the token file ``path`` (.bin) and its sidecar, atomically.
    Returns the .bin path."""
    path = Path(path)
    if path.suffix != ".bin":
        raise ValueError(f"a token file is written as .bin, got {path}")
    dtype = _token_dtype(vocab_size)
    count = 0

    def write_tokens(f) -> None:
        nonlocal count
        for ids in documents:
            array = np.asarray(ids, dtype=np.int64)
            if array.size and (array.min() < 0 or array.max() >= vocab_size):
                raise ValueError(f"token ids outside [0, {vocab_size}) for {tokenizer}")
            array.astype(_DTYPES[dtype]).tofile(f)
            count += int(array.size)

    with Staging() as stage:
        stage.write(path, write_tokens)
        meta = {
            "format": TOKEN_FORMAT,
            "version": TOKEN_FORMAT_VERSION,
            "dtype": dtype,
            "tokenizer": tokenizer,
            "vocab_size": vocab_size,
            "num_tokens": count,
        }
        sidecar = (json.dumps(meta, indent=2) + "\n").encode()
        stage.write(_sidecar(path), lambda f: f.write(sidecar))
        stage.commit()  # in order: the sidecar goes last, it marks the file complete
    return path


def _read_sidecar(path: Path) -> dict:
    side = _sidecar(path)
    if not side.is_file():
        raise FileNotFoundError(
            f"token file {path} has no sidecar {side.name} (JSON with format, dtype, tokenizer, "
            "vocab_size, num_tokens: see fsdfm.data)"
        )
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{side} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != TOKEN_FORMAT:
        raise ValueError(f"{side}: 'format' must be {TOKEN_FORMAT!r}")
    if meta.get("dtype") not in _DTYPES:
        raise ValueError(f"{side}: 'dtype' must be one of {sorted(_DTYPES)}")
    for key in ("vocab_size", "num_tokens"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise ValueError(f"{side}: {key!r} must be a non-negative integer")
    if not isinstance(meta.get("tokenizer"), str):
        raise ValueError(f"{side}: 'tokenizer' must be a tokenizer name")
    return meta


def _open_token_file(path: Path, key: str) -> TokenStream:
    meta = _read_sidecar(path)
    dtype = _DTYPES[meta["dtype"]]
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.ndim != 1 or tokens.dtype != dtype:
            raise ValueError(
                f"{path} holds a {tokens.dtype} array of shape {tokens.shape}; the sidecar "
                f"says a 1-D {meta['dtype']} stream"
            )
    elif meta["num_tokens"] == 0:
        tokens = np.zeros(0, dtype=dtype)  # numpy cannot map an empty file
    else:
        tokens = np.memmap(path, dtype=dtype, mode="r")
    if tokens.shape[0] != meta["num_tokens"]:
        raise ValueError(
            f"{path} holds {tokens.shape[0]} tokens but its sidecar says {meta['num_tokens']} "
            "(truncated?)"
        )
    return TokenStream(tokens, meta["tokenizer"], meta["vocab_size"], key, path)


def _text_files(data: Path) -> list[Path]:
    if data.is_file():
        return [data]
    files = sorted(
        (p for p in data.rglob("*.txt") if p.is_file()),
        key=lambda p: p.relative_to(data).as_posix(),
    )
    if not files:
        raise ValueError(f"no *.txt files under {data}")
    return files


def tokenizer_identity(tokenizer: str) -> str:
    """What makes two tokenizer names the same tokenizer: the name of a named one ("gpt2",
    "byte"), the sha256 of the tokenizer.json of one given by path (a BPE), wherever it lies."""
    path = Path(tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    if tokenizer in ("gpt2", "byte") or not file.is_file():
        return tokenizer
    return "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()


def _fingerprint(files: list[Path], tokenizer: str) -> str:
    entries = []
    for f in files:
        stat = f.stat()
        entries.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    document = json.dumps(
        {
            "version": TOKEN_FORMAT_VERSION,
            "tokenizer": tokenizer_identity(tokenizer),
            "files": entries,
        }
    )
    return hashlib.sha256(document.encode()).hexdigest()[:20]


def prepare_tokens(
    data: str | os.PathLike,
    tokenizer: str | None,
    cache_dir: str | os.PathLike,
    *,
    progress: bool = False,
) -> TokenStream:
    """The token stream of ``data`` (see the module docstring), tokenising text into
    ``cache_dir`` unless an up-to-date cache is there.

    tokenizer: "gpt2", "byte" or a BPE tokenizer.json path for text (required); for a token file
    None accepts the sidecar's, a name must match it."""
    from fsdfm.tokenizer import get_tokenizer

    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"no data at {data}")
    if data.is_file() and data.suffix in TOKEN_FILE_SUFFIXES:
        stat = data.stat()
        key = hashlib.sha256(
            json.dumps([str(data.resolve()), stat.st_size, stat.st_mtime_ns]).encode()
        ).hexdigest()[:20]
        stream = _open_token_file(data, key)
        if tokenizer is not None and tokenizer_identity(stream.tokenizer) != tokenizer_identity(
            tokenizer
        ):
            raise ValueError(f"{data} was tokenised with {stream.tokenizer!r}, not {tokenizer!r}")
        return stream
    if tokenizer is None:
        raise ValueError("text data needs a tokenizer: gpt2, byte or a BPE tokenizer.json")
    tok = get_tokenizer(tokenizer)
    files = _text_files(data)
    key = _fingerprint(files, tokenizer)
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{key}.bin"
    if not _sidecar(target).is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)

        def documents():
            shown = tracked(files, "tokenising", unit="file", enabled=progress and len(files) > 1)
            for f in shown:
                yield [*tok.encode(f.read_text(encoding="utf-8", errors="replace")), tok.eos_id]

        write_token_file(target, documents(), tokenizer=tokenizer, vocab_size=tok.vocab_size)
    return _open_token_file(target, key)


class Blocks:
    """The stream as n = N // seq_len blocks [n, seq_len] and its train / held-out split.

    ``n_train`` blocks [0, n_train) train, the last ``n_val`` are held out."""

    def __init__(self, stream: TokenStream, seq_len: int, val_fraction: float):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        n = len(stream) // seq_len
        if n == 0:
            raise ValueError(
                f"{stream.path} holds {len(stream)} tokens, fewer than one block of seq_len = "
                f"{seq_len}"
            )
        self.stream = stream
        self.seq_len = seq_len
        self.blocks = stream.tokens[: n * seq_len].reshape(n, seq_len)
        self.n_val = 0 if n == 1 or val_fraction == 0 else min(n - 1, max(1, int(val_fraction * n)))
        self.n_train = n - self.n_val

    def get(self, indices, device: torch.device | str = "cpu") -> torch.Tensor:
        """Blocks ``indices`` (block numbers, training blocks from 0, held-out ones from
        ``n_train``) as int64 [len(indices), seq_len] on ``device`` (pinned and copied without
        blocking to a GPU)."""
        array = np.asarray(self.blocks[np.asarray(indices, dtype=np.int64)], dtype=np.int64)
        batch = torch.from_numpy(array)
        device = torch.device(device)
        if device.type == "cuda":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch

    def val_indices(self) -> range:
        return range(self.n_train, self.n_train + self.n_val)


class BlockSampler:
    """Global batches of training-block indices, epoch by epoch in a seeded random order.

    ``next_batch()`` -> int64 [batch_size]; ``state_dict()`` / ``load_state_dict()`` hold the
    position (epoch, index), so that a resumed run draws the batches an uninterrupted one would."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int):
        if n_blocks < 1 or batch_size < 1:
            raise ValueError(f"need n_blocks, batch_size >= 1, got {n_blocks}, {batch_size}")
        self.n_blocks, self.batch_size, self.seed = n_blocks, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    def _permutation(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", self.epoch))
            self._order = (self.epoch, torch.randperm(self.n_blocks, generator=g))
        return self._order[1]

    def next_batch(self) -> torch.Tensor:
        parts, needed = [], self.batch_size
        while needed:
            take = self._permutation()[self.index : self.index + needed]
            parts.append(take)
            needed -= len(take)
            self.index += len(take)
            if self.index == self.n_blocks:
                self.epoch, self.index = self.epoch + 1, 0
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = state["epoch"], state["index"]
        if not (isinstance(epoch, int) and isinstance(index, int) and 0 <= index < self.n_blocks):
            raise ValueError(f"bad sampler state {state} for {self.n_blocks} blocks")
        self.epoch, self.index = epoch, index


def rank_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s rows of a global batch: [r B / W, (r + 1) B / W)."""
    if batch_size % world_size:
        raise ValueError(
            f"the global batch size {batch_size} is not divisible by the {world_size} processes"
        )
    share = batch_size // world_size
    return slice(rank * share, (rank + 1) * share)
