"""Tokenizers that work offline: GPT-2's byte-pair encoding (the released FS-DFM checkpoints'
vocabulary, V = 50257, end of text 50256) from the ranks file shipped in the package, a byte
tokenizer (V = 256) for tiny experiments, and byte-level BPEs of any vocabulary size trained
with Hugging Face ``tokenizers`` (:func:`train_bpe`) and loaded from their ``tokenizer.json``.

Every tokenizer has ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``eos_id``,
``vocab_size`` and ``name``.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
GPT2_RANKS = ASSETS / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation pattern (contractions, letters, numbers, other symbols, white space).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOS = "<|endoftext|>"


class GPT2Tokenizer:
    """GPT-2's tokenizer through ``tiktoken``, built from the bundled ranks file."""

    name = "gpt2"

    def __init__(self, ranks_file: Path = GPT2_RANKS):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(ranks_file), expected_hash=GPT2_RANKS_SHA256)
        self.eos_id = len(ranks)  # 50256
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={GPT2_EOS: self.eos_id},
        )
        self.vocab_size = self.encoding.n_vocab  # 50257

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; "<|endoftext|>" in the text is the end-of-text token."""
        return self.encoding.encode(text, allowed_special={GPT2_EOS})

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids))


class ByteTokenizer:
    """UTF-8 bytes as tokens: V = 256, end of text = 0 (the NUL byte, absent from text)."""

    name = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        ids = list(ids)
        if any(not 0 <= i < 256 for i in ids):
            raise ValueError("byte tokens must be in [0, 256)")
        return bytes(ids).decode("utf-8", errors="replace")


BPE_EOS = GPT2_EOS  # the same end-of-text marker as GPT-2's, so texts can hold it alike


class BPETokenizer:
    """A byte-level BPE saved by Hugging Face ``tokenizers`` (see :func:`train_bpe`): every
    string round-trips, "<|endoftext|>" is the end-of-text token. ``name`` is the path it was
    loaded from, so ``get_tokenizer(tok.name)`` loads it again."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        self.name = str(path)
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises a bare Exception for unreadable files
            if isinstance(error, OSError):
                raise
            raise ValueError(f"{file} is not a Hugging Face tokenizer.json: {error}") from None
        eos_id = self.tokenizer.token_to_id(BPE_EOS)
        if eos_id is None:
            raise ValueError(f"{file} has no {BPE_EOS} token")
        self.eos_id = eos_id
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; "<|endoftext|>" in the text is the end-of-text token."""
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def train_bpe(text_files, vocab_size: int, out_path: str | Path) -> BPETokenizer:
    """Trains a byte-level BPE of ``vocab_size`` tokens (end of text included) on UTF-8 text
    files and saves it as ``out_path`` (a tokenizer.json; a directory gets one inside).

    Byte level, like GPT-2's: the 256 byte symbols are all in the vocabulary whatever the
    corpus, so any string encodes and decodes back unchanged, and GPT-2's pre-tokenisation
    (words with their leading space, numbers, punctuation runs) keeps merges within words.
    "<|endoftext|>" is token 0. Merges need a pair to occur at least twice, so a small corpus
    can give fewer than ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 257:
        raise ValueError(f"vocab_size must exceed the 256 bytes and end of text, got {vocab_size}")
    out = Path(out_path)
    if out.is_dir():
        out = out / "tokenizer.json"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BPE_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(f) for f in text_files], trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    return BPETokenizer(out)


@cache
def get_tokenizer(name: str = "gpt2"):
    """The tokenizer "gpt2" or "byte", offline (the GPT-2 ranks file is checked by sha256), or
    a :class:`BPETokenizer` from a path to its tokenizer.json or to a directory holding one."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    path = Path(name)
    if path.is_file() or (path / "tokenizer.json").is_file():
        return BPETokenizer(path)
    raise ValueError(
        f"unknown tokenizer {name!r}: choose 'gpt2', 'byte' or a path to a tokenizer.json "
        "(or to a directory holding one)"
    )


class HuggingFaceTokenizer:
    """A Hugging Face ``transformers`` tokenizer (``PreTrainedTokenizerBase``, e.g. from
    ``AutoTokenizer``) seen through fsdfm's interface: encode without special tokens (fsdfm
    adds none), decode as given, ``eos_id`` the tokenizer's ``eos_token_id`` (None when it has
    none: nothing is then cut at an end of text), ``vocab_size`` its full length (added tokens
    included)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        self.eos_id = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def as_tokenizer(tokenizer):
    """fsdfm's tokenizers as they are; a Hugging Face tokenizer (it has ``eos_token_id`` and
    ``encode`` / ``decode``) wrapped in :class:`HuggingFaceTokenizer`."""
    if all(hasattr(tokenizer, a) for a in ("encode", "decode", "eos_id")):
        return tokenizer
    if all(hasattr(tokenizer, a) for a in ("encode", "decode", "eos_token_id")):
        return HuggingFaceTokenizer(tokenizer)
    raise TypeError(
        "tokenizer must be an fsdfm tokenizer (encode, decode, eos_id) or a Hugging Face one "
        f"(encode, decode, eos_token_id), got {type(tokenizer).__name__}"
    )


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class HFTokenizerAdapter:
    """The slice of a Hugging Face tokenizer's interface that evaluation code uses (calling it on
    a batch of texts, ``batch_decode``, ``eos_token_id``, ``pad_token_id``), over an fsdfm
    tokenizer, so that `transformers` models can score text without downloading a tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.pad_token_id = tokenizer.eos_id
        self.vocab_size = tokenizer.vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(
        self, texts, *, return_tensors=None, padding=False, truncation=False, max_length=None
    ):
        """{"input_ids", "attention_mask"}: lists, or int64 tensors with return_tensors="pt"
        (right-padded with the pad id when ``padding`` is true)."""
        single = isinstance(texts, str)
        ids = [self.tokenizer.encode(t) for t in ([texts] if single else texts)]
        if truncation and max_length is not None:
            ids = [i[:max_length] for i in ids]
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if padding or return_tensors == "pt":
            width = max((len(i) for i in ids), default=0)
            if not padding and any(len(i) != width for i in ids):
                raise ValueError("texts of different lengths need padding=True")
            mask = [[1] * len(i) + [0] * (width - len(i)) for i in ids]
            ids = [i + [self.pad_token_id] * (width - len(i)) for i in ids]
        else:
            mask = [[1] * len(i) for i in ids]
        if return_tensors == "pt":
            import torch

            ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        if single and return_tensors is None:
            ids, mask = ids[0], mask[0]
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eos_token_id]
        return self.tokenizer.decode(ids)

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]
