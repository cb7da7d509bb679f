"""Issue 14's classes of silent wrong results and unclear errors: each input either works or is
refused in one line that names the argument or the file (the fuzzing is in test_fuzz.py)."""

import json
import math
import os

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import fsdfm
from fsdfm import head, ops
from fsdfm.cli import main
from fsdfm.evaluation import sweep

CONFIG = {"dim": 32, "n_blocks": 1, "n_heads": 2, "cond_dim": 16, "seq_len": 16}
NATIVE = ops.native_available()


def tiny(source="uniform", vocab_size=23, student=True, seed=0) -> fsdfm.FSDFMTransformer:
    torch.manual_seed(seed)
    config = fsdfm.ModelConfig(
        vocab_size=vocab_size, step_conditioned=student, source=source, dropout=0.0, **CONFIG
    )
    return fsdfm.FSDFMTransformer(config).eval()


# -- tensor scalars are checked like the numbers -------------------------------------------------


@pytest.mark.parametrize(
    "which, bad, message",
    [
        ("h", math.nan, r"h must lie in \[0, inf\), got h\[1\] = nan"),
        ("h", -0.5, r"h must lie in \[0, inf\), got h\[1\] = -0.5"),
        ("rate_scale", math.nan, r"rate_scale must be a number \(not NaN\), got rate_scale\[1\]"),
    ],
)
@pytest.mark.parametrize("op", ["jump_step", "jump_step_ref", "head_jump_step"])
def test_tensor_rate_scale_and_h_are_checked_like_numbers(op, which, bad, message):
    """A negative rate_scale stays allowed: SPEC 2.3 clips the rates it makes to zero."""
    if op != "jump_step_ref" and not NATIVE:
        pytest.skip("native ops not built")
    B, L, V, d = 3, 4, 7, 5
    hidden, weight = torch.randn(B, L, d), torch.randn(V, d)
    x_t = torch.zeros(B, L, dtype=torch.long)
    values = {"rate_scale": torch.ones(B), "h": torch.full((B,), 0.5)}
    values[which][1] = bad

    def call(**kw):
        if op == "head_jump_step":
            return head.head_jump_step(hidden, weight, None, x_t, values["rate_scale"],
                                       values["h"], **kw)  # fmt: skip
        return getattr(ops, op)(hidden @ weight.T, x_t, values["rate_scale"], values["h"], **kw)

    with pytest.raises(ValueError, match=message):
        call()
    if op != "jump_step_ref":  # a sampling loop's validate=False reads nothing (no host sync)
        call(validate=False)
    number = (bad, 0.5) if which == "rate_scale" else (1.0, bad)
    with pytest.raises(ValueError, match=message.split(", got")[0]):
        ops.jump_step_ref(hidden @ weight.T, x_t, *number)
    values["rate_scale"] = torch.full((B,), -2.0)
    values["h"] = torch.full((B,), 0.5)
    assert torch.equal(call(), x_t)  # clipped rates: nothing moves


@pytest.mark.parametrize(
    "t, h, name",
    [
        (math.nan, 0.5, "t"),
        (0.5, math.inf, "h"),
        (1.5, 0.5, "t"),
        (-0.1, 0.5, "t"),
        (0.5, -1e-3, "h"),
        (torch.tensor([0.5, math.nan]), 0.5, "t"),
        (0.5, torch.tensor([0.5, math.inf]), "h"),
    ],
)
def test_model_refuses_t_and_h_outside_the_unit_interval(t, h, name):
    model = tiny()
    x = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"{name} must lie in \[0, 1\]"):
        model(x, t, h)
    with pytest.raises(ValueError, match=rf"{name} must lie in \[0, 1\]"):
        model.head_inputs(x, t, h)
    assert torch.isfinite(model(x, 0.0, 1.0)).all() and torch.isfinite(model(x, 1.0, 0.0)).all()


# -- the model's own source and vocabulary --------------------------------------------------------


def test_sample_refuses_another_source_or_vocabulary_than_the_models():
    uniform, mask = tiny("uniform"), tiny("mask")
    with pytest.raises(ValueError, match="source='mask' but this model was trained with the "):
        fsdfm.sample(uniform, 2, source="mask")
    with pytest.raises(ValueError, match="source='uniform' but .* 'mask' source"):
        fsdfm.sample(mask, 2, source="uniform")
    with pytest.raises(ValueError, match="vocab_size=24 but this model has 23 outputs"):
        fsdfm.sample(uniform, 2, vocab_size=24)
    with pytest.raises(ValueError, match="source must be one of"):
        fsdfm.sample(uniform, 2, source="masked")
    # The model's own values, given explicitly, are fine; a bare callable takes any.
    fsdfm.sample(mask, 2, source="mask", vocab_size=23, seq_len=4)
    x = fsdfm.sample(lambda x, t, h: torch.zeros(*x.shape, 5), 2, seq_len=4, source="mask",
                     vocab_size=5)  # fmt: skip
    assert (x < 4).all()  # the mask id 4 never survives


# -- config.json against the weights --------------------------------------------------------------


def strip_metadata(directory):
    weights = directory / "model.safetensors"
    save_file(load_file(weights), weights)
    config = json.loads((directory / "config.json").read_text())
    config.pop("files")
    config["format_version"] = 1  # a format-1 model has no checksums to disagree with
    (directory / "config.json").write_text(json.dumps(config))
    return config


@pytest.mark.parametrize(
    "field, value",
    [("n_heads", 4), ("dim", 64), ("vocab_size", 24), ("n_blocks", 2), ("step_conditioned", False)],
)
def test_config_that_disagrees_with_weights_without_metadata_is_named(tmp_path, field, value):
    out = fsdfm.save(tiny(), tmp_path / "m")
    config = strip_metadata(out)
    fsdfm.load(out)  # the format-1 directory without metadata loads while it agrees
    changes = {field: value, "n_heads": 1} if field == "dim" else {field: value}
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(ValueError, match=rf"config.json says {field} = {value!r} but the weights"):
        fsdfm.load(out)


def test_format_2_weights_must_carry_the_config(tmp_path):
    out = fsdfm.save(tiny(), tmp_path / "m")
    weights = out / "model.safetensors"
    save_file(load_file(weights), weights)
    config = json.loads((out / "config.json").read_text())
    config["files"]["model.safetensors"] = fsdfm.checkpoint.sha256_of(weights)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors lacks the config"):
        fsdfm.load(out)


@pytest.mark.parametrize("name", ["../tokenizer.json", "/etc/hostname", "sub/tokenizer.json"])
def test_tokenizer_path_must_stay_inside_the_model_directory(tmp_path, name):
    out = fsdfm.save(tiny(), tmp_path / "m", tokenizer="byte")
    (tmp_path / "tokenizer.json").write_text("{}")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tokenizer": name}))
    with pytest.raises(ValueError, match="tokenizer must be gpt2, byte or a file name inside"):
        fsdfm.load(out)


def test_tokenizer_symlink_out_of_the_directory_is_refused(tmp_path):
    out = fsdfm.save(tiny(), tmp_path / "m", tokenizer="byte")
    (tmp_path / "elsewhere.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere.json", out / "tok.json")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tokenizer": "tok.json"}))
    with pytest.raises(ValueError, match="a file name inside the model directory"):
        fsdfm.load(out)


# -- vocabularies compared ------------------------------------------------------------------------


def test_tokenizer_of_another_vocabulary_is_named():
    model = fsdfm.load("default")
    with pytest.raises(ValueError, match="tokenizer gpt2 has 50257 tokens but the model has 8192"):
        fsdfm.generate(model, fsdfm.get_tokenizer("gpt2"), "Hello", max_length=16)
    byte_model = tiny(vocab_size=256)
    fsdfm.generate(byte_model, fsdfm.get_tokenizer("byte"), "Hi", max_length=8, steps=1)
    mask_model = tiny("mask", vocab_size=257)  # 256 bytes + the mask
    fsdfm.generate(mask_model, fsdfm.get_tokenizer("byte"), "Hi", max_length=8, steps=1)


def test_cli_tokenizer_of_another_vocabulary_is_one_line(capsys):
    assert main(["sample", "Hi", "--tokenizer", "gpt2", "--length", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer gpt2 has 50257 tokens" in err


def test_scorer_of_another_vocabulary_is_refused():
    def metric(tokens):
        return 1.0

    metric.vocab_size = 50257
    with pytest.raises(ValueError, match="scorer .* 50257 tokens but model 'a' has 23"):
        sweep({"a": tiny()}, steps=[1], metric_fns={"gen_ppl": metric}, n_samples=1,
              progress=False)  # fmt: skip
    metric.vocab_size = 23
    (row,) = sweep({"a": tiny()}, steps=[1], solvers=["cumulative"], metric_fns={"q": metric},
                   n_samples=1, progress=False)  # fmt: skip
    assert row["q"] == 1.0


# -- errors that say what is wrong ----------------------------------------------------------------


def test_unclear_errors_now_name_the_argument(tmp_path):
    model, bytes_model, byte = tiny(), tiny(vocab_size=256), fsdfm.get_tokenizer("byte")
    logits = torch.randn(1, 2, 5, device="meta")
    x_meta = torch.zeros(1, 2, dtype=torch.long, device="meta")
    junk = tmp_path / "junk.json"
    junk.write_text("hello")
    cases = [
        (lambda: fsdfm.sample(model, 2, generator=0), TypeError, "generator must be None or a"),
        (lambda: fsdfm.ModelConfig(vocab_size=0), ValueError, "vocab_size must be a positive"),
        (lambda: fsdfm.ModelConfig(vocab_size=2.5), ValueError, "vocab_size must be a positive"),
        (lambda: fsdfm.sample(model, 2, schedule="x"), TypeError, "schedule must be a Polynomial"),
        (lambda: fsdfm.generate(bytes_model, byte, max_length=4, seed="a"), ValueError, None),
        (lambda: fsdfm.sample(model, 2, temperature=1e-45), ValueError, "temperature must be at"),
        (lambda: ops.jump_step_ref(logits, x_meta, 1.0, 0.5), ValueError, "logits is a meta"),
        (lambda: ops.sample_categorical_ref(logits), ValueError, "logits is a meta tensor"),
        (lambda: fsdfm.get_tokenizer(str(junk)), ValueError, "junk.json is not a Hugging Face"),
        (lambda: fsdfm.sample(model, 2, vocab_size=0, seq_len=2), ValueError, "vocab_size="),
    ]
    if not torch.cuda.is_available():
        cases += [
            (lambda: fsdfm.sample(model, 2, device="cuda"), ValueError, "no CUDA device"),
            (lambda: fsdfm.load("default", device="cuda"), ValueError, "no CUDA device"),
        ]
    for call, error, message in cases:
        with pytest.raises(error, match=message or "seed must be an integer in"):
            call()
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        fsdfm.generate(bytes_model, byte, max_length=4, seed=2**64)
    with pytest.raises(ValueError, match="pass seed or generator, not both"):
        fsdfm.generate(bytes_model, byte, max_length=4, seed=1,
                       generator=torch.Generator())  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_tiny_temperature_that_overflows_is_named(backend):
    if backend == "native" and not NATIVE:
        pytest.skip("native ops not built")
    logits = torch.tensor([[[30.0, 1.0, -2.0]]])
    x_t = torch.zeros(1, 1, dtype=torch.long)
    jump = ops.jump_step if backend == "native" else ops.jump_step_ref
    categorical = ops.sample_categorical if backend == "native" else ops.sample_categorical_ref
    with pytest.raises(ops.InvalidRowsError, match="temperature overflows float32 .* 30, temp"):
        jump(logits, x_t, 1.0, 0.5, temperature=1e-38)
    with pytest.raises(ops.InvalidRowsError, match="use a larger temperature"):
        categorical(logits, temperature=1e-38)
    assert int(categorical(logits, temperature=1e-30)) == 0  # tiny but finite: the argmax


def test_save_reports_io_failures_as_os_errors(tmp_path, monkeypatch):
    import safetensors.torch

    def failing_save_file(tensors, filename, metadata=None):
        raise SafetensorError(
            "Error while serializing: I/O error: Permission denied (os error 13) at path x"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(PermissionError, match="Permission denied"):
        fsdfm.save(tiny(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_cli_bad_tokenizer_file_is_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    assert main(["sample", "--tokenizer", str(junk), "--length", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a Hugging Face tokenizer.json" in err
    assert main(["sample", "--seed", str(2**64)]) == 2
    assert "--seed: must be in [0, 2**64)" in capsys.readouterr().err
