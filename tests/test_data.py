"""fsdfm.data: tokenising and caching text, token files, blocks and the held-out split, and the
deterministic, resumable, rank-sharded sampler."""

import json
import os

import numpy as np
import pytest
import torch

from fsdfm.data import (
    Blocks,
    BlockSampler,
    derive_seed,
    prepare_tokens,
    rank_rows,
    write_token_file,
)
from fsdfm.tokenizer import get_tokenizer


def test_directory_documents_in_sorted_order_with_eos(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("bb")
    (corpus / "a.txt").write_text("a")
    (corpus / "sub" / "c.txt").write_text("c\n")
    (corpus / "ignored.md").write_text("not text data")
    stream = prepare_tokens(corpus, "byte", tmp_path / "cache")
    # a.txt, b.txt, sub/c.txt, each followed by the byte tokenizer's end of text (0)
    assert stream.tokens.tolist() == [97, 0, 98, 98, 0, 99, 10, 0]
    assert stream.tokens.dtype == np.uint16 and stream.tokenizer == "byte"
    assert stream.vocab_size == 256


def test_gpt2_text_and_literal_end_of_text(tmp_path):
    text = tmp_path / "one.txt"
    text.write_text("Hello world<|endoftext|>Bye")
    stream = prepare_tokens(text, "gpt2", tmp_path / "cache")
    tok = get_tokenizer("gpt2")
    assert stream.tokens.tolist() == tok.encode("Hello world") + [50256] + tok.encode("Bye") + [
        50256
    ]


def test_cache_is_reused_when_unchanged_and_rebuilt_when_changed(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abc")
    cache = tmp_path / "cache"
    first = prepare_tokens(text, "byte", cache)
    built = first.path.stat().st_mtime_ns
    again = prepare_tokens(text, "byte", cache)
    assert again.key == first.key and again.path.stat().st_mtime_ns == built  # not rewritten
    assert prepare_tokens(text, "gpt2", cache).key != first.key  # the tokenizer is in the key

    text.write_text("abcd")  # size changes
    changed = prepare_tokens(text, "byte", cache)
    assert changed.key != first.key and changed.tokens.tolist() == [97, 98, 99, 100, 0]
    stat = text.stat()
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, new mtime
    assert prepare_tokens(text, "byte", cache).key != changed.key


def test_incomplete_cache_is_rebuilt(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("xyz")
    cache = tmp_path / "cache"
    stream = prepare_tokens(text, "byte", cache)
    stream.path.with_suffix(".json").unlink()  # as if killed before the sidecar landed
    stream.path.write_bytes(b"\x01")
    assert prepare_tokens(text, "byte", cache).tokens.tolist() == [120, 121, 122, 0]


def test_token_files_bin_and_npy(tmp_path):
    path = write_token_file(
        tmp_path / "toks.bin", [[5, 6, 7], [8]], tokenizer="byte", vocab_size=256
    )
    meta = json.loads((tmp_path / "toks.json").read_text())
    assert meta == {
        "format": "fsdfm-tokens",
        "version": 1,
        "dtype": "uint16",
        "tokenizer": "byte",
        "vocab_size": 256,
        "num_tokens": 4,
    }
    stream = prepare_tokens(path, None, tmp_path / "cache")
    assert stream.tokens.tolist() == [5, 6, 7, 8] and stream.tokenizer == "byte"
    assert not (tmp_path / "cache").exists()  # a token file is used in place
    with pytest.raises(ValueError, match="tokenised with 'byte', not 'gpt2'"):
        prepare_tokens(path, "gpt2", tmp_path / "cache")

    np.save(tmp_path / "arr.npy", np.arange(10, dtype=np.uint32))
    with pytest.raises(FileNotFoundError, match="no sidecar"):
        prepare_tokens(tmp_path / "arr.npy", None, tmp_path / "cache")
    (tmp_path / "arr.json").write_text(
        json.dumps({**meta, "dtype": "uint32", "tokenizer": "gpt2", "num_tokens": 10})
    )
    assert prepare_tokens(tmp_path / "arr.npy", "gpt2", tmp_path / "c").tokens.tolist() == list(
        range(10)
    )
    with pytest.raises(ValueError, match="outside"):
        write_token_file(tmp_path / "bad.bin", [[256]], tokenizer="byte", vocab_size=256)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data at"):
        prepare_tokens(tmp_path / "missing.txt", "byte", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*.txt files"):
        prepare_tokens(tmp_path / "empty", "byte", tmp_path / "cache")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    stream = prepare_tokens(short, "byte", tmp_path / "cache")
    with pytest.raises(ValueError, match="fewer than one block"):
        Blocks(stream, 64, 0.01)


def test_blocks_and_held_out_split(tmp_path):
    path = write_token_file(
        tmp_path / "t.bin", [list(range(1, 104))], tokenizer="byte", vocab_size=256
    )
    stream = prepare_tokens(path, None, tmp_path)
    blocks = Blocks(stream, 10, 0.25)  # 103 tokens -> 10 blocks, the tail of 3 dropped
    assert (blocks.n_train, blocks.n_val) == (8, 2)
    assert list(blocks.val_indices()) == [8, 9]
    batch = blocks.get([9, 0])
    assert batch.dtype == torch.int64 and batch.tolist() == [
        list(range(91, 101)),
        list(range(1, 11)),
    ]
    assert Blocks(stream, 10, 0.001).n_val == 1  # at least one block
    assert Blocks(stream, 10, 0.0).n_val == 0
    assert Blocks(stream, 100, 0.5).n_val == 0  # a single block trains


def test_sampler_epochs_are_permutations_and_resume_exactly():
    sampler = BlockSampler(10, 4, seed=3)
    draws = [sampler.next_batch() for _ in range(5)]  # 20 indices = two epochs
    flat = torch.cat(draws).tolist()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # each epoch has its own order

    sampler = BlockSampler(10, 4, seed=3)
    for _ in range(3):
        sampler.next_batch()
    state = sampler.state_dict()
    assert state == {"epoch": 1, "index": 2}
    resumed = BlockSampler(10, 4, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(), draws[3]) and torch.equal(
        resumed.next_batch(), draws[4]
    )
    other = BlockSampler(10, 4, seed=4)
    assert not all(torch.equal(other.next_batch(), d) for d in draws)


def test_rank_rows_partition_the_global_batch():
    rows = [rank_rows(12, r, 3) for r in range(3)]
    assert [list(range(12))[s] for s in rows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="not divisible"):
        rank_rows(10, 0, 3)


def test_derive_seed_is_stable():
    assert derive_seed(0, "noise", 5) == derive_seed(0, "noise", 5)
    assert derive_seed(0, "noise", 5) != derive_seed(0, "noise", 6)
    assert 0 <= derive_seed("x") < 2**63
