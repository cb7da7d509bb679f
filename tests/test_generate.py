"""fsdfm.generate: text in, text out, with prompts of different lengths."""

import pytest
import torch

import fsdfm
from fsdfm.tokenizer import get_tokenizer

TARGET = b"the flow lands in few steps."


class Spelling:
    """Logits that spell TARGET position by position (then NUL, the byte tokenizer's EOS)."""

    def __init__(self, length):
        ids = list(TARGET[:length]) + [0] * max(0, length - len(TARGET))
        self.ids = torch.tensor(ids)

    def __call__(self, x, t, h):
        logits = torch.full((*x.shape, 256), -20.0)
        logits[:, torch.arange(x.shape[1]), self.ids[: x.shape[1]]] = 20.0
        return logits


def test_generate_prompts_and_continuations():
    tok = get_tokenizer("byte")
    length = 40
    texts = fsdfm.generate(
        Spelling(length),
        tok,
        ["the ", "xyz"],
        steps=8,
        max_length=length,
        num_return_sequences=2,
        seed=0,
    )
    assert len(texts) == 4
    assert texts[0] == texts[1] == TARGET.decode()  # stops at the first EOS (NUL)
    assert texts[2].startswith("xyz") and texts[2][3:] == TARGET.decode()[3:]
    raw = fsdfm.generate(
        Spelling(length), tok, None, steps=2, max_length=length, stop_at_eos=False, seed=0
    )
    assert raw[0] == TARGET.decode() + "\0" * (length - len(TARGET))


def test_generate_errors():
    tok = get_tokenizer("byte")
    with pytest.raises(ValueError, match="max_length is required"):
        fsdfm.generate(Spelling(8), tok, "a")
    with pytest.raises(ValueError, match="leaves no room"):
        fsdfm.generate(Spelling(8), tok, "abcdefgh", max_length=8)
    with pytest.raises(TypeError, match="prompt must be"):
        fsdfm.generate(Spelling(8), tok, [1, 2], max_length=8)
    with pytest.raises(ValueError, match="num_return_sequences"):
        fsdfm.generate(Spelling(8), tok, "a", max_length=8, num_return_sequences=0)
