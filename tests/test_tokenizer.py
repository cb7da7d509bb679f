"""Offline tokenizers: GPT-2 exactly as OpenAI's (from the shipped ranks file), and bytes."""

import pytest

from fsdfm.tokenizer import GPT2_RANKS, GPT2_RANKS_SHA256, get_tokenizer, sha256_of

TEXTS = [
    "Hello world",
    "Ünïcödé ✓ 日本語 — emoji 🤖, two  spaces,\n\ttabs and a trailing space ",
    "<|endoftext|>between<|endoftext|>",
    "",
]


def test_shipped_ranks_file_is_openais():
    assert sha256_of(GPT2_RANKS) == GPT2_RANKS_SHA256


def test_gpt2_known_ids():
    tok = get_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" I'm here, aren't you? 12345") == [
        314,
        1101,
        994,
        11,
        3588,
        470,
        345,
        30,
        17031,
        2231,
    ]
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


@pytest.mark.parametrize("name", ["gpt2", "byte"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(name, text):
    tok = get_tokenizer(name)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer():
    tok = get_tokenizer("byte")
    assert tok.vocab_size == 256 and tok.eos_id == 0
    assert tok.encode("é") == [0xC3, 0xA9]
    with pytest.raises(ValueError, match="byte tokens"):
        tok.decode([256])


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer 'bert'"):
        get_tokenizer("bert")


def test_hf_adapter():
    from fsdfm.tokenizer import HFTokenizerAdapter

    hf = HFTokenizerAdapter(get_tokenizer("gpt2"))
    assert hf.eos_token_id == 50256 and len(hf) == 50257
    batch = hf(["Hello world", "Hello"], return_tensors="pt", padding=True)
    assert batch["input_ids"].tolist() == [[15496, 995], [15496, 50256]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert hf("Hello world")["input_ids"] == [15496, 995]
    assert hf.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["Hello world", "Hello"]
    with pytest.raises(ValueError, match="need padding"):
        hf(["Hello world", "Hello"], return_tensors="pt")
