"""Text in, text out: `fsdfm.generate`, in the manner of Hugging Face `generate`."""

from __future__ import annotations

import torch

from fsdfm._args import check_vocabulary, model_device, positive_int, seeded_generator
from fsdfm.solver import sample


def generate(
    model,
    tokenizer,
    prompt: str | list[str] | None = None,
    *,
    steps: int = 8,
    max_length: int | None = None,
    num_return_sequences: int = 1,
    stop_at_eos: bool = True,
    seed: int | None = None,
    **sample_kwargs,
) -> list[str]:
    """Generate texts with ``fsdfm.sample``; returns ``len(prompts) * num_return_sequences``
    strings, each the prompt followed by its continuation.

    tokenizer: anything with ``encode(str) -> list[int]``, ``decode(list[int]) -> str`` and
        ``eos_id`` (``fsdfm.get_tokenizer`` gives such objects).
    prompt: a string, a list of strings (each a frozen prefix of its own length) or None
        (unconditional generation).
    max_length: tokens per sequence, prompt included (default: the model's ``config.seq_len``).
    stop_at_eos: cut each continuation at its first end-of-text token.
    seed: seed a fresh generator on the sampling device (or pass ``generator=`` yourself).
    sample_kwargs: passed to ``fsdfm.sample`` (solver, temperature, barrier, backend, ...).
    """
    prompts = [prompt] if prompt is None or isinstance(prompt, str) else list(prompt)
    if not prompts or not all(p is None or isinstance(p, str) for p in prompts):
        raise TypeError("prompt must be a string, a non-empty list of strings, or None")
    positive_int(num_return_sequences, "num_return_sequences")
    config = getattr(model, "config", None)
    _check_tokenizer(tokenizer, config)
    length = max_length if max_length is not None else getattr(config, "seq_len", None)
    if length is None:
        raise ValueError("max_length is required for a model without a config")
    encoded = [tokenizer.encode(p) if p else [] for p in prompts]
    longest = max(len(e) for e in encoded)
    if longest >= length:
        raise ValueError(
            f"a prompt has {longest} tokens: max_length = {length} leaves no room to generate"
        )
    rows = [e for e in encoded for _ in range(num_return_sequences)]
    B = len(rows)
    init = torch.zeros(B, length, dtype=torch.long)
    edit_mask = torch.ones(B, length, dtype=torch.bool)
    for i, tokens in enumerate(rows):
        init[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        edit_mask[i, : len(tokens)] = False
    frozen = {"init": init, "edit_mask": edit_mask} if longest else {}
    if seed is not None:
        if sample_kwargs.get("generator") is not None:
            raise ValueError("pass seed or generator, not both")
        device = sample_kwargs.get("device") or model_device(model) or "cpu"
        sample_kwargs["generator"] = seeded_generator(seed, device)
    tokens = sample(model, steps, batch_size=B, seq_len=length, **frozen, **sample_kwargs)
    texts = []
    for i, prefix in enumerate(rows):
        continuation = tokens[i, len(prefix) :].tolist()
        if stop_at_eos and tokenizer.eos_id in continuation:
            continuation = continuation[: continuation.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(prefix + continuation))
    return texts


def _check_tokenizer(tokenizer, config) -> None:
    """The tokenizer's interface, and its vocabulary against the model's: other ids would be out
    of range for one of them, or decode to unrelated text."""
    for needed in ("encode", "decode", "eos_id"):
        if not hasattr(tokenizer, needed):
            raise TypeError(f"tokenizer must have encode, decode and eos_id; it lacks {needed}")
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    check_vocabulary(f"tokenizer {name}", getattr(tokenizer, "vocab_size", None), config)
