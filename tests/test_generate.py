"""fsdfm.generate: text in, text out, with prompts of different lengths."""

import pytest
import torch

import fsdfm
from fsdfm.tokenizer import get_tokenizer

TARGET = b"the flow lands in few steps."


class Spelling:
    """Logits that spell ``target`` position by position (then NUL, the byte tokenizer's EOS)."""

    def __init__(self, length, margin=40.0, target=TARGET):
        ids = list(target[:length]) + [0] * max(0, length - len(target))
        self.ids, self.margin = torch.tensor(ids), margin

    def __call__(self, x, t, h):
        logits = torch.full((*x.shape, 256), -self.margin / 2)
        logits[:, torch.arange(x.shape[1]), self.ids[: x.shape[1]]] = self.margin / 2
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
    with pytest.raises(ValueError, match=r"max_length \(or max_new_tokens\) is required"):
        fsdfm.generate(Spelling(8), tok, "a")
    with pytest.raises(ValueError, match="leaves no room"):
        fsdfm.generate(Spelling(8), tok, "abcdefgh", max_length=8)
    with pytest.raises(TypeError, match="prompt must be"):
        fsdfm.generate(Spelling(8), tok, [1, 2], max_length=8)
    with pytest.raises(ValueError, match="num_return_sequences"):
        fsdfm.generate(Spelling(8), tok, "a", max_length=8, num_return_sequences=0)
    with pytest.raises(ValueError, match="max_new_tokens or max_length, not both"):
        fsdfm.generate(Spelling(8), tok, "a", max_length=8, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        fsdfm.generate(Spelling(8), tok, "a", max_new_tokens=0)
    with pytest.raises(TypeError, match="stop must be"):
        fsdfm.generate(Spelling(8), tok, "a", max_length=8, stop=[""])
    with pytest.raises(TypeError, match="do_sample must be"):
        fsdfm.generate(Spelling(8), tok, "a", max_length=8, do_sample="no")
    with pytest.raises(ValueError, match="do_sample=False is greedy decoding: temperature, top_k"):
        fsdfm.generate(Spelling(8), tok, "a", max_length=8, do_sample=False, temperature=0.7,
                       top_k=3)  # fmt: skip
    with pytest.raises(TypeError, match="tokenizer must be an fsdfm tokenizer"):
        fsdfm.generate(Spelling(8), object(), "a", max_length=8)


def test_max_new_tokens_per_prompt():
    """Each continuation has max_new_tokens tokens after its own prompt, as in transformers."""
    tok = get_tokenizer("byte")
    texts = fsdfm.generate(Spelling(40), tok, ["the ", "xyz"], max_new_tokens=5, seed=0)
    assert texts == ["the " + TARGET[4:9].decode(), "xyz" + TARGET[3:8].decode()]
    with pytest.raises(ValueError, match="needs 10 positions, more than the model's seq_len = 8"):
        model = fsdfm.FSDFMTransformer(
            fsdfm.ModelConfig(vocab_size=256, dim=16, n_blocks=1, n_heads=1, cond_dim=8, seq_len=8)
        )
        fsdfm.generate(model, tok, "abcd", max_new_tokens=6)


def test_stop_strings_and_return_full_text():
    tok = get_tokenizer("byte")
    kw = {"max_length": 40, "seed": 0}
    assert fsdfm.generate(Spelling(40), tok, "the ", stop="lands", **kw) == ["the flow "]
    assert fsdfm.generate(Spelling(40), tok, "the ", stop=["steps", "in"], **kw) == [
        "the flow lands "
    ]
    # A stop string inside the prompt does not count: only the continuation is searched.
    assert fsdfm.generate(Spelling(40), tok, "the ", stop="the", **kw) == [TARGET.decode()]
    assert fsdfm.generate(Spelling(40), tok, "the ", return_full_text=False, **kw) == [
        TARGET[4:].decode()
    ]
    (done,) = fsdfm.generation.complete(Spelling(40), tok, "the ", stop="lands", **kw)
    assert done.new_ids == list(b"flow ") and done.prompt_ids == list(b"the ")


def test_greedy_decoding():
    """do_sample=False is temperature 0: the argmax everywhere, whatever the seed."""
    tok = get_tokenizer("byte")
    flat = Spelling(40, margin=2.0)  # sampled, the target byte has p ~ 0.03
    kw = {"max_length": 40, "stop_at_eos": False}
    a = fsdfm.generate(flat, tok, "", do_sample=False, seed=1, **kw)
    b = fsdfm.generate(flat, tok, "", do_sample=False, seed=2, **kw)
    assert a == b == [TARGET.decode() + "\0" * (40 - len(TARGET))]
    assert fsdfm.generate(flat, tok, "", seed=1, **kw) != a


def test_hugging_face_tokenizer_works_like_ours():
    """A transformers tokenizer over the bundled model's tokenizer.json gives the same texts as
    fsdfm's own tokenizer, seed for seed."""
    transformers = pytest.importorskip("transformers")
    model = fsdfm.load("default")
    ours = get_tokenizer(model.tokenizer_name)
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(model.tokenizer_name), eos_token="<|endoftext|>"
    )
    kw = {"max_new_tokens": 24, "seed": 3, "steps": 4, "num_return_sequences": 2}
    want = fsdfm.generate(model, ours, ["Once upon a time", "The"], **kw)
    assert fsdfm.generate(model, theirs, ["Once upon a time", "The"], **kw) == want


def test_stop_cut_keeps_the_fewest_ids_covering_the_text():
    """The ids kept under a stop string are the shortest prefix whose text covers the kept text,
    found by bisection: for every cut, the first prefix that decodes to the kept text, multi-byte
    characters included (a character's first bytes alone decode to a mark, not to it)."""
    tok = get_tokenizer("byte")
    text = "naïve café — 日本語 ok"
    ids = list(text.encode())
    for chars in range(len(text) + 1):
        n = fsdfm.generation._covering(tok, ids, chars)
        assert tok.decode(ids[:n]) == text[:chars], chars
        assert n == 0 or tok.decode(ids[: n - 1]) != text[:chars], chars
    kw = {"max_length": 12, "stop_at_eos": False, "seed": 0}
    (done,) = fsdfm.generation.complete(
        Spelling(12, target="日STOP".encode()), tok, "", stop="STOP", **kw
    )
    assert done.text == "日" and done.new_ids == list("日".encode())
