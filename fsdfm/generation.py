"""Text in, text out: `fsdfm.generate`, in the manner of Hugging Face `generate`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fsdfm._args import check_vocabulary, model_device, positive_int, seeded_generator
from fsdfm.solver import sample, sample_iter
from fsdfm.tokenizer import as_tokenizer


@dataclass(frozen=True)
class Completion:
    """One generated sequence: its text as ``generate`` returns it, the prompt's ids and the
    generated ids (cut at the end of text, max_new_tokens and stop strings as the text is)."""

    text: str
    prompt_ids: list[int]
    new_ids: list[int]


def generate(model, tokenizer, prompt: str | list[str] | None = None, **kwargs) -> list[str]:
    """Generate texts with ``fsdfm.sample``; returns ``len(prompts) * num_return_sequences``
    strings (the samples of the first prompt first).

    tokenizer: an fsdfm tokenizer (``fsdfm.get_tokenizer``) or any Hugging Face tokenizer
        (``transformers.AutoTokenizer`` / ``PreTrainedTokenizerFast``): the prompt is encoded
        without special tokens, and its ``eos_token_id`` is the end of text.
    prompt: a string, a list of strings (each a frozen prefix of its own length) or None
        (unconditional generation).
    steps: model calls (default 8).
    max_new_tokens: tokens generated after each prompt, as in transformers (each sequence is
        then its prompt plus that many tokens). max_length: tokens per sequence, prompt
        included (default: the model's ``config.seq_len``). Give one or neither.
    do_sample: False is greedy decoding (temperature 0: every draw takes the argmax).
    temperature, top_k, top_p, min_p: the sampling controls of ``fsdfm.sample`` (names and
        meaning as in transformers); with do_sample=False leave them unset.
    num_return_sequences: samples per prompt.
    stop: a string or a list of strings: each continuation ends before the first of them
        (the stop string itself is not returned).
    return_full_text: True (default): the prompt followed by its continuation; False: the
        continuation only (transformers' text-generation pipeline has the same switch).
    stop_at_eos: cut each continuation at its first end-of-text token.
    seed: seed a fresh generator on the sampling device (or pass ``generator=`` yourself).
    Anything else goes to ``fsdfm.sample`` (solver, barrier, backend, callback, generator, ...).
    """
    return [c.text for c in complete(model, tokenizer, prompt, **kwargs)]


def complete(
    model,
    tokenizer,
    prompt: str | list[str] | None = None,
    *,
    steps: int = 8,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    num_return_sequences: int = 1,
    do_sample: bool = True,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    stop: str | list[str] | None = None,
    return_full_text: bool = True,
    stop_at_eos: bool = True,
    seed: int | None = None,
    on_step=None,
    **sample_kwargs,
) -> list[Completion]:
    """:func:`generate` with the token ids of every sequence (:class:`Completion`).
    ``on_step(state)``, if given, sees every :class:`~fsdfm.solver.SampleStep` of the run, x_0
    included (live display; see ``fsdfm.sample_iter``)."""
    prompts = [prompt] if prompt is None or isinstance(prompt, str) else list(prompt)
    if not prompts or not all(p is None or isinstance(p, str) for p in prompts):
        raise TypeError("prompt must be a string, a non-empty list of strings, or None")
    positive_int(num_return_sequences, "num_return_sequences")
    stops = _stop_strings(stop)
    for name, flag in (("do_sample", do_sample), ("return_full_text", return_full_text)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if not do_sample:
        given = [n for n, v in (("temperature", temperature), ("top_k", top_k),
                                ("top_p", top_p), ("min_p", min_p)) if v is not None]  # fmt: skip
        if given:
            raise ValueError(
                f"do_sample=False is greedy decoding: {', '.join(given)} does not apply "
                "(leave it unset, or use do_sample=True)"
            )
        temperature = 0.0
    controls = {
        "temperature": 1.0 if temperature is None else temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
    }
    tokenizer = as_tokenizer(tokenizer)
    config = getattr(model, "config", None)
    _check_tokenizer(tokenizer, config)
    encoded = [tokenizer.encode(p) if p else [] for p in prompts]
    longest = max(len(e) for e in encoded)
    length, new = _lengths(max_new_tokens, max_length, longest, config)
    rows = [e for e in encoded for _ in range(num_return_sequences)]
    B = len(rows)
    init = torch.zeros(B, length, dtype=torch.long)
    edit_mask = torch.ones(B, length, dtype=torch.bool)
    for i, ids in enumerate(rows):
        init[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        edit_mask[i, : len(ids)] = False
    frozen = {"init": init, "edit_mask": edit_mask} if longest else {}
    if seed is not None:
        if sample_kwargs.get("generator") is not None:
            raise ValueError("pass seed or generator, not both")
        device = sample_kwargs.get("device") or model_device(model) or "cpu"
        sample_kwargs["generator"] = seeded_generator(seed, device)
    kwargs = {"batch_size": B, "seq_len": length, **frozen, **controls, **sample_kwargs}
    if on_step is None:
        x = sample(model, steps, **kwargs)
    else:
        for state in sample_iter(model, steps, **kwargs):
            on_step(state)
            x = state.x
    tokens = x.tolist()
    out = []
    for ids, prefix in zip(tokens, rows, strict=True):
        continuation = ids[len(prefix) :]
        if new is not None:
            continuation = continuation[:new]
        if stop_at_eos and tokenizer.eos_id in continuation:
            continuation = continuation[: continuation.index(tokenizer.eos_id)]
        out.append(_completion(tokenizer, prefix, continuation, stops, return_full_text))
    return out


def _stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise TypeError(f"stop must be None, a non-empty string or a list of them, got {stop!r}")
    return list(stops)


def _lengths(max_new_tokens, max_length, longest: int, config) -> tuple[int, int | None]:
    """(tokens per sequence, tokens kept per continuation or None for all)."""
    seq_len = getattr(config, "seq_len", None)
    if max_new_tokens is not None:
        if max_length is not None:
            raise ValueError("give max_new_tokens or max_length, not both")
        positive_int(max_new_tokens, "max_new_tokens")
        length = longest + max_new_tokens
        if seq_len is not None and length > seq_len:
            raise ValueError(
                f"max_new_tokens = {max_new_tokens} after a prompt of {longest} tokens needs "
                f"{length} positions, more than the model's seq_len = {seq_len}"
            )
        return length, max_new_tokens
    length = max_length if max_length is not None else seq_len
    if length is None:
        raise ValueError("max_length (or max_new_tokens) is required for a model without a config")
    positive_int(length, "max_length")
    if longest >= length:
        raise ValueError(
            f"a prompt has {longest} tokens: max_length = {length} leaves no room to generate"
        )
    return length, None


def _completion(tokenizer, prefix, continuation, stops, full_text: bool) -> Completion:
    """The text of one sequence. The prompt's text is decoded on its own and the continuation's
    text is what decoding both adds to it (so a character split between them stays whole); a
    stop string then cuts the continuation, and the ids are cut to match."""
    prompt_text = tokenizer.decode(prefix)
    whole = tokenizer.decode(prefix + continuation)
    text = whole[len(prompt_text) :] if whole.startswith(prompt_text) else (
        tokenizer.decode(continuation)
    )  # fmt: skip
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
        continuation = continuation[: _covering(tokenizer, continuation, cut)]
    return Completion(prompt_text + text if full_text else text, prefix, continuation)


def _covering(tokenizer, ids: list[int], chars: int) -> int:
    """The fewest leading ids whose text holds ``chars`` whole characters, in O(log n) decodes
    (a scan would decode n prefixes of up to n ids). A character cut inside its bytes decodes
    to a trailing replacement mark, which does not count; the count of whole characters then
    never falls as the prefix grows (fsdfm's, tiktoken's and Hugging Face's decoders give one
    mark per incomplete character), so the bisection finds the first such prefix."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid]).rstrip("\ufffd")) < chars:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _check_tokenizer(tokenizer, config) -> None:
    """The tokenizer's vocabulary against the model's: other ids would be out of range for one
    of them, or decode to unrelated text."""
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    check_vocabulary(f"tokenizer {name}", getattr(tokenizer, "vocab_size", None), config)
