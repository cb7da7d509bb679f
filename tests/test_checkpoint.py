"""fsdfm.checkpoint: released-style .pth files (DFM and FS-DFM layouts, nesting, prefixes, the
weights choice), refusal of pickles with code, the safetensors directory format (exact round
trip, atomic writes) and clear errors."""

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from fsdfm.checkpoint import convert, load, read_state_dict, save
from fsdfm.model import FSDFMTransformer, ModelConfig, config_from_state_dict

V, L = 61, 7
SMALL = {"vocab_size": V, "dim": 64, "n_blocks": 2, "n_heads": 2, "cond_dim": 32, "seq_len": 1024}


def random_state_dict(seed: int, student: bool, **changes) -> OrderedDict:
    """A state dict with the real key names and random values everywhere."""
    cfg = ModelConfig(**{**SMALL, "step_conditioned": student, **changes})
    model = FSDFMTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1 if "norm" in name else 0))
    return model.state_dict()


def optimizer_state(sd) -> dict:
    """What an AdamW state dict looks like: ints, floats, lists and tensors."""
    return {
        "state": {
            i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(v)}
            for i, v in enumerate(list(sd.values())[:3])
        },
        "param_groups": [
            {"lr": 1e-5, "betas": (0.9, 0.95), "weight_decay": 0.03, "params": [0, 1, 2]}
        ],
    }


def prefixed(sd, prefix) -> OrderedDict:
    return OrderedDict((prefix + k, v) for k, v in sd.items())


def logits_of(model, x, t=0.3, h=0.25):
    with torch.no_grad():
        return model(x, t, h)


def reference_model(sd) -> FSDFMTransformer:
    model = FSDFMTransformer(config_from_state_dict(sd))
    model.load_state_dict(sd)
    return model.eval()


@pytest.fixture
def x():
    return torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def fsdfm_file(tmp_path):
    """An FS-DFM file: student, EMA and teacher differ; the teacher's keys carry _orig_mod."""
    student = random_state_dict(1, True)
    ema = random_state_dict(2, True)
    teacher = random_state_dict(3, False)
    state = {
        "step": 1000,
        "epoch": 3,
        "train_sampler": {"epoch": 3, "seed": 0},
        "test_sampler": {"epoch": 0, "seed": 0},
        "teacher_model": prefixed(teacher, "_orig_mod."),
        "teacher_optimizer": optimizer_state(teacher),
        "student_model": prefixed(student, "_orig_mod.module."),
        "student_optimizer": optimizer_state(student),
        "student_ema_model": ema,
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(state, path)
    return path, {"student": student, "ema": ema, "teacher": teacher}


def assert_same_weights(model, sd):
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


# ----------------------------------------------------------------------------------------------
# Released layouts


def test_dfm_file_loads(tmp_path, x):
    sd = random_state_dict(0, False)
    path = tmp_path / "dfm.pth"
    torch.save({"model": sd, "optimizer": optimizer_state(sd), "step": 7, "epoch": 1}, path)
    model = load(path)
    assert not model.training
    assert model.config == ModelConfig(**SMALL)
    assert model.tokenizer_name is None  # not GPT-2's vocabulary
    assert_same_weights(model, sd)
    torch.testing.assert_close(
        logits_of(model, x), logits_of(reference_model(sd), x), rtol=0, atol=0
    )
    assert load(path, weights="model").config == model.config
    for wrong in ("ema", "student", "teacher"):
        with pytest.raises(ValueError, match=r"DFM checkpoint without .*\['model'\]"):
            load(path, weights=wrong)
    with pytest.raises(ValueError, match="weights must be None or one of"):
        load(path, weights="best")


def test_fsdfm_file_weights_choice(fsdfm_file, x):
    path, sds = fsdfm_file
    default = load(path)
    assert default.config.step_conditioned
    assert_same_weights(default, sds["ema"])  # the EMA is the default
    for choice in ("ema", "student", "teacher"):
        model = load(path, weights=choice)
        assert_same_weights(model, sds[choice])  # prefixes stripped
        assert model.config.step_conditioned == (choice != "teacher")
        assert model.config == config_from_state_dict(sds[choice])
        ref = reference_model(sds[choice])
        torch.testing.assert_close(logits_of(model, x), logits_of(ref, x), rtol=0, atol=0)
    outs = [logits_of(load(path, weights=c), x) for c in ("ema", "student", "teacher")]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    with pytest.raises(ValueError, match=r"FS-DFM checkpoint without 'model'.*'ema'"):
        load(path, weights="model")


def test_nested_entries_and_defaults_without_ema(tmp_path):
    student = random_state_dict(4, True)
    teacher = random_state_dict(5, False)
    state = {
        "epoch": 2,
        "checkpoint": {
            "models": {"student_model": prefixed(student, "module."), "teacher_model": teacher},
            "optimizers": {"student": optimizer_state(student)},
        },
    }
    path = tmp_path / "nested.pth"
    torch.save(state, path)
    assert_same_weights(load(path), student)  # no EMA: the student is the default
    assert_same_weights(load(path, weights="teacher"), teacher)
    with pytest.raises(ValueError, match="without 'student_ema_model'"):
        load(path, weights="ema")
    sd, cfg = read_state_dict(path, weights="teacher")
    assert set(sd) == set(teacher) and not cfg.step_conditioned


def test_bare_state_dict_and_legacy_format(tmp_path, x):
    sd = random_state_dict(6, False)
    path = tmp_path / "bare.pth"
    torch.save(prefixed(sd, "_orig_mod."), path, _use_new_zipfile_serialization=False)
    model = load(path)
    assert_same_weights(model, sd)


def test_mask_source_detected_from_50258(tmp_path, x):
    sd = random_state_dict(7, True, vocab_size=50258, dim=32, n_heads=2, n_blocks=1, cond_dim=16)
    path = tmp_path / "mask.pth"
    torch.save({"student_model": sd}, path)
    model = load(path)
    cfg = model.config
    assert cfg.source == "mask" and cfg.vocab_size == 50258 and cfg.mask_id == 50257
    assert (cfg.dim, cfg.n_heads, cfg.n_blocks, cfg.cond_dim) == (32, 2, 1, 16)
    assert model.tokenizer_name == "gpt2"
    assert load(path, source="uniform").config.source == "uniform"
    # A uniform-source GPT-2 model stays uniform.
    sd = random_state_dict(8, False, vocab_size=50257, dim=32, n_heads=2, n_blocks=1, cond_dim=16)
    torch.save({"model": sd}, path)
    assert load(path).config.source == "uniform"


def test_dtype_device_and_seq_len(fsdfm_file, x):
    path, sds = fsdfm_file
    model = load(path, dtype=torch.bfloat16, device="cpu", seq_len=L)
    assert model.config.seq_len == L
    assert model.vocab_embed.weight.dtype == torch.bfloat16
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.vocab_embed.weight, sds["ema"]["vocab_embed.weight"].bfloat16())
    assert logits_of(model, x).dtype == torch.bfloat16  # the weights' dtype, no fp32 copy
    with pytest.raises(TypeError, match="floating-point"):
        load(path, dtype=torch.int8)


def test_loaded_weights_are_not_file_backed(fsdfm_file):
    """The model owns its tensors: rewriting the file in place does not touch it."""
    path, sds = fsdfm_file
    model = load(path, weights="student")
    path.write_bytes(b"\0" * path.stat().st_size)
    assert_same_weights(model, sds["student"])


# ----------------------------------------------------------------------------------------------
# Refusing code


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CreatesAFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class PlainObject:
    pass


@pytest.mark.parametrize("payload", [RunsACommand, CreatesAFile])
@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_with_code_is_refused(tmp_path, payload, legacy):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    sd = random_state_dict(0, False)
    torch.save(
        {"model": sd, "extra": payload(marker)}, path, _use_new_zipfile_serialization=not legacy
    )
    with pytest.raises(
        ValueError, match="objects other than tensors.*refused, nothing in it was executed"
    ):
        load(path)
    assert not marker.exists(), "the pickle's code ran"


def test_arbitrary_object_is_refused(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"model": random_state_dict(0, False), "args": PlainObject()}, path)
    with pytest.raises(ValueError, match="PlainObject.*refused, nothing in it was executed"):
        load(path)


# ----------------------------------------------------------------------------------------------
# Errors


def test_missing_key(tmp_path):
    sd = random_state_dict(0, False)
    del sd["blocks.1.mlp.2.bias"]
    path = tmp_path / "missing.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.mlp.2.bias'\]") as info:
        load(path)
    assert str(path) in str(info.value)


def test_unexpected_key(tmp_path):
    sd = random_state_dict(0, False)
    sd["blocks.0.condition_fuser.weight"] = torch.zeros(32, 64)  # a student layer in a teacher
    path = tmp_path / "unexpected.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.0.condition_fuser.weight'\]"):
        load(path)


def test_wrong_shape(tmp_path):
    sd = random_state_dict(0, False)
    sd["blocks.0.mlp.0.weight"] = torch.zeros(200, 64)
    path = tmp_path / "shape.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(
        ValueError, match=r"'blocks.0.mlp.0.weight' has shape \(200, 64\).*expects \(256, 64\)"
    ):
        load(path)


def test_unknown_layout(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weights": {"w": torch.ones(2)}, "epoch": 1, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(
        ValueError, match=r"unknown checkpoint layout.*\['epoch', 'optimizer', 'weights'\]"
    ):
        load(path)
    torch.save([torch.ones(2)], path)
    with pytest.raises(ValueError, match="unknown checkpoint layout.*list"):
        load(path)


def test_state_dict_without_the_embedding(tmp_path):
    sd = random_state_dict(0, False)
    del sd["vocab_embed.weight"]
    path = tmp_path / "noembed.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match="lacks 'vocab_embed.weight'"):
        load(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path, legacy):
    path = tmp_path / "truncated.pth"
    sd = random_state_dict(0, False)
    torch.save({"model": sd}, path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load(path)
    assert str(path) in str(info.value)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere.pth"):
        load(tmp_path / "nowhere.pth")


# ----------------------------------------------------------------------------------------------
# The safetensors directory

SAVED_FILES = ["README.md", "config.json", "model.safetensors"]  # a model card, weights, config


def test_save_load_round_trip_is_exact(fsdfm_file, tmp_path, x):
    path, _ = fsdfm_file
    model = load(path, seq_len=L)
    out = save(model, tmp_path / "saved", tokenizer="gpt2")
    assert sorted(p.name for p in out.iterdir()) == SAVED_FILES
    config = json.loads((out / "config.json").read_text())
    assert config["tokenizer"] == "gpt2" and config["format_version"] == 2
    assert config["files"] == {"model.safetensors": sha256(out / "model.safetensors")}
    assert config["seq_len"] == L and config["step_conditioned"] is True
    back = load(out)
    assert back.config == model.config and back.tokenizer_name == "gpt2"
    assert_same_weights(back, model.state_dict())
    for k, v in back.state_dict().items():
        assert v.dtype == model.state_dict()[k].dtype
    torch.testing.assert_close(logits_of(back, x), logits_of(model, x), rtol=0, atol=0)
    # Saving again over the directory works, and keeps the tokenizer by default.
    save(back, out)
    assert load(out).tokenizer_name == "gpt2"
    assert sorted(p.name for p in out.iterdir()) == SAVED_FILES


def test_bf16_round_trip(tmp_path):
    model = FSDFMTransformer(ModelConfig(**{**SMALL, "step_conditioned": True}))
    model.to(torch.bfloat16)
    save(model, tmp_path / "bf16")
    back = load(tmp_path / "bf16")
    assert back.vocab_embed.weight.dtype == torch.bfloat16 == back.dtype
    assert back.device == torch.device("cpu")
    assert load(tmp_path / "bf16", dtype=torch.float32).dtype == torch.float32
    assert back.rotary_emb.inv_freq.dtype == torch.float32
    assert_same_weights(back, model.state_dict())
    assert back.tokenizer_name is None


def test_saved_files_follow_the_umask(tmp_path):
    # safetensors creates files 0600; a saved model (e.g. the bundled one, installed for other
    # users) must be readable like any file the user writes.
    old = os.umask(0o022)
    try:
        save(FSDFMTransformer(ModelConfig(**SMALL)), tmp_path / "m")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o644, name


def test_save_unwraps_compiled_models(tmp_path):
    model = FSDFMTransformer(ModelConfig(**SMALL))
    wrapped = torch.compile(model, backend="eager")
    save(wrapped, tmp_path / "wrapped")
    assert_same_weights(load(tmp_path / "wrapped"), model.state_dict())
    with pytest.raises(TypeError, match="FSDFMTransformer"):
        save(torch.nn.Linear(2, 2), tmp_path / "linear")


def test_convert(fsdfm_file, tmp_path, x):
    path, sds = fsdfm_file
    out = convert(path, tmp_path / "converted", weights="teacher")
    model = load(out)
    assert_same_weights(model, sds["teacher"])
    assert not model.config.step_conditioned
    assert json.loads((out / "config.json").read_text())["tokenizer"] is None


def test_directory_errors(tmp_path):
    model = FSDFMTransformer(ModelConfig(**SMALL))
    out = save(model, tmp_path / "d")
    with pytest.raises(ValueError, match="holding one model"):
        load(out, weights="ema")
    config = json.loads((out / "config.json").read_text())

    (out / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(ValueError, match=r"config.json: unknown ModelConfig keys \['n_layers'\]"):
        load(out)
    (out / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load(out)
    (out / "config.json").write_text(json.dumps({**config, "n_blocks": 3}))
    with pytest.raises(ValueError, match="record different configs"):
        load(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(out)
    (out / "config.json").write_text(json.dumps(config))
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors does not match the sha256"):
        load(out)
    unchecked = {k: v for k, v in config.items() if k != "files"}
    (out / "config.json").write_text(json.dumps({**unchecked, "format_version": 1}))
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors"):
        load(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load(out)
    with pytest.raises(FileExistsError):
        save(model, out / "config.json")


def test_lone_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    sd = random_state_dict(9, True)
    save_file(dict(prefixed(sd, "module.")), str(tmp_path / "w.safetensors"))
    assert_same_weights(load(tmp_path / "w.safetensors"), sd)


def sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_damaged_weights_are_refused_naming_the_file(tmp_path):
    """1,000 bytes overwritten inside the tensor data would load as NaN weights without the
    checksum; with it, load names the file."""
    out = save(FSDFMTransformer(ModelConfig(**SMALL)), tmp_path / "m")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3000:-2000] = b"\xff" * 1000
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{weights} does not match the sha256 recorded"):
        load(out)


def test_failed_save_leaves_no_temporary_files(tmp_path, monkeypatch):
    import os

    model = FSDFMTransformer(ModelConfig(**SMALL))
    out = save(model, tmp_path / "d")
    before = (out / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)  # writing config.json fails
    with pytest.raises(OSError, match="disk full"):
        save(FSDFMTransformer(ModelConfig(**{**SMALL, "n_blocks": 1})), out)
    assert sorted(p.name for p in out.iterdir()) == SAVED_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"], "no temporary directory left"
    assert (out / "model.safetensors").read_bytes() == before  # the old model is intact
    load(out)


@pytest.mark.parametrize("with_foreign_file", [False, True])
def test_save_over_a_model_is_old_or_new_at_every_fault(tmp_path, monkeypatch, with_foreign_file):
    """Saving a model of another shape over an existing one, with a failure injected at each
    file operation in turn (write, fsync, rename, exchange, removal): afterwards the directory
    loads as the old model or the new one, never a mix, and no temporary is left. With a file of
    the user's in the directory the model's files are replaced one at a time: a failure between
    two renames is then reported by load (checksums), never loaded."""
    import os

    import fsdfm._io as io_module

    old_model = FSDFMTransformer(ModelConfig(**SMALL))
    new_model = FSDFMTransformer(ModelConfig(**{**SMALL, "n_blocks": 1, "dim": 32, "n_heads": 1}))
    real = {"replace": os.replace, "rename": os.rename, "fsync": os.fsync,
            "exchange": io_module.exchange}  # fmt: skip
    outcomes = set()
    for fault in range(1, 40):
        target = tmp_path / f"case{fault}" / "model"
        save(old_model, target)
        if with_foreign_file:
            (target / "NOTES.md").write_text("mine")
        calls = {"n": 0}

        def failing(name, calls=calls, fault=fault):
            def call(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == fault:
                    raise OSError(f"injected fault in {name}")
                return real[name](*args, **kwargs)

            return call

        for name in ("replace", "rename", "fsync"):
            monkeypatch.setattr(os, name, failing(name))
        monkeypatch.setattr(io_module, "exchange", failing("exchange"))
        import fsdfm.checkpoint as ckpt

        monkeypatch.setattr(ckpt, "exchange", io_module.exchange)
        try:
            save(new_model, target)
            failed = False
        except OSError:
            failed = True
        monkeypatch.undo()
        leftovers = [p.name for p in target.parent.rglob("*") if ".tmp-" in p.name]
        assert not leftovers, f"fault {fault}: temporaries left: {leftovers}"
        try:
            loaded = load(target)
        except ValueError as error:
            assert with_foreign_file and "does not match the sha256" in str(error), error
            outcomes.add("reported")
            continue
        shape = loaded.config.dim
        assert shape in (SMALL["dim"], 32), f"fault {fault}: a mix"
        assert shape == 32 or failed, f"fault {fault}: a save that succeeded left the old model"
        outcomes.add("new" if shape == 32 else "old")
        if with_foreign_file:
            assert (target / "NOTES.md").read_text() == "mine"
        if calls["n"] < fault:  # every operation of the save ran: all faults were tried
            break
    else:
        raise AssertionError("the save makes more file operations than the faults tried")
    assert {"old", "new"} <= outcomes


def test_bpe_tokenizer_travels_with_the_model(tmp_path):
    """A model saved with a BPE tokenizer carries its tokenizer.json; the directory can move."""
    pytest.importorskip("tokenizers")
    import shutil

    import fsdfm
    from fsdfm.tokenizer import train_bpe

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    tok = train_bpe([text], 300, tmp_path / "bpe" / "tokenizer.json")
    config = fsdfm.ModelConfig(
        vocab_size=tok.vocab_size, dim=32, n_blocks=1, n_heads=1, cond_dim=16, seq_len=8
    )
    model = fsdfm.FSDFMTransformer(config)
    fsdfm.save(model, tmp_path / "saved", tokenizer=tok)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "saved", moved)
    shutil.rmtree(tmp_path / "bpe")
    loaded = fsdfm.load(moved)
    assert loaded.tokenizer_name == str(moved / "tokenizer.json")
    again = fsdfm.get_tokenizer(loaded.tokenizer_name)
    assert again.encode("the lazy fox") == tok.encode("the lazy fox")
    (moved / "tokenizer.json").unlink()
    with pytest.raises(
        FileNotFoundError, match="tokenizer.json, recorded in config.json, is missing"
    ):
        fsdfm.load(moved)


def test_bundled_default_model():
    """The shipped model: safetensors under 40 MB, stored in bf16, its BPE beside it; loaded on
    the CPU in fp32 (CPU bf16 matmuls are slow) unless a dtype is asked for."""
    from fsdfm.checkpoint import DEFAULT_MODEL
    from fsdfm.tokenizer import get_tokenizer

    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size < 40 * 2**20, size
    stored, config = read_state_dict("default")
    assert stored["vocab_embed.weight"].dtype == torch.bfloat16
    assert config.step_conditioned and config.source == "uniform"
    model = load("default")
    assert model.vocab_embed.weight.dtype == torch.float32
    assert torch.equal(model.vocab_embed.weight, stored["vocab_embed.weight"].float())
    assert load("default", dtype=torch.bfloat16).vocab_embed.weight.dtype == torch.bfloat16
    tokenizer = get_tokenizer(model.tokenizer_name)
    assert tokenizer.vocab_size == config.vocab_size == 8192


KILLED_SAVER = """
import sys, torch, fsdfm
from fsdfm.model import FSDFMTransformer, ModelConfig
small = dict(vocab_size=300, dim=64, n_blocks=2, n_heads=2, cond_dim=32, seq_len=64)
models = [FSDFMTransformer(ModelConfig(**small)),
          FSDFMTransformer(ModelConfig(**{**small, "n_blocks": 1, "dim": 32, "n_heads": 1}))]
print("ready", flush=True)
i = 0
while True:
    fsdfm.save(models[i % 2], sys.argv[1])
    i += 1
"""


@pytest.mark.slow
def test_kill_9_during_repeated_saves_leaves_the_old_or_the_new_model(tmp_path):
    """A process saving two models of different shapes in turn over one directory, killed with
    SIGKILL at random moments: the directory always loads, as one model or the other, and the
    next save clears what the killed one left."""
    import random
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "model"
    rng = random.Random(0)
    shapes = set()
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(target)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            assert proc.stdout.readline().strip() == b"ready"
            while not (target / "config.json").exists():
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        shapes.add(load(target).config.dim)
    assert shapes <= {32, 64}, shapes
    save(FSDFMTransformer(ModelConfig(**SMALL)), target)
    assert not [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_save_removes_only_its_own_stale_temporaries(tmp_path):
    """Beside the model directory, only a killed writer's temporaries of that directory go: a
    user's file with '.tmp-' in its name and another target's temporary stay."""
    kept = [tmp_path / "notes.tmp-backup", tmp_path / "other.tmp-99999999-abcdef12"]
    for path in kept:
        path.write_text("mine")
    stale = tmp_path / "model.tmp-99999999-abcdef12"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    save(FSDFMTransformer(ModelConfig(**SMALL)), tmp_path / "model")
    assert all(path.read_text() == "mine" for path in kept)
    assert not stale.exists()


# ----------------------------------------------------------------------------------------------
# Hugging Face conventions: save_pretrained / from_pretrained, a model card, hub ids (offline)


def _hub_cache(tmp_path, model, repo="fsdfm-tests/tiny") -> Path:
    """A Hugging Face cache holding ``repo`` at a fake commit, as snapshot_download leaves it."""
    owner, name = repo.split("/")
    root = tmp_path / "hub" / f"models--{owner}--{name}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    model.save_pretrained(root / "snapshots" / commit, tokenizer="byte")
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def test_save_pretrained_and_from_pretrained(tmp_path):
    model = FSDFMTransformer(ModelConfig(**{**SMALL, "step_conditioned": True}))
    out = model.save_pretrained(tmp_path / "m", tokenizer="byte")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: fsdfm\npipeline_tag: text-generation\n")
    assert "FS-DFM student" in card and "| dim | " in card and "`byte`" in card
    back = FSDFMTransformer.from_pretrained(out, dtype=torch.bfloat16)
    assert back.dtype == torch.bfloat16 and back.tokenizer_name == "byte"
    assert_same_weights(FSDFMTransformer.from_pretrained(out), model.state_dict())
    # The card is the user's to edit: it is not checksummed, and saving again keeps it.
    (out / "README.md").write_text("# my notes\n")
    load(out)
    model.save_pretrained(out)
    assert (out / "README.md").read_text() == "# my notes\n"
    assert not (model.save_pretrained(tmp_path / "bare", card=False) / "README.md").exists()


def test_load_hub_id_from_the_cache_offline(tmp_path, monkeypatch):
    """A hub id is read through huggingface_hub's cache; offline, nothing is downloaded, and a
    repository that is not cached is named in one line."""
    from huggingface_hub import constants

    model = FSDFMTransformer(ModelConfig(**SMALL))
    cache = _hub_cache(tmp_path, model)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    back = load("fsdfm-tests/tiny", cache_dir=cache)
    assert_same_weights(back, model.state_dict())
    assert back.tokenizer_name == "byte"
    assert_same_weights(
        FSDFMTransformer.from_pretrained(
            "fsdfm-tests/tiny", cache_dir=cache, local_files_only=True
        ),
        model.state_dict(),
    )
    with pytest.raises(FileNotFoundError, match="fsdfm-tests/absent is neither a local path"):
        load("fsdfm-tests/absent", cache_dir=cache)
    # A local directory of the same name wins over the hub.
    model.save_pretrained(tmp_path / "fsdfm-tests" / "tiny2")
    assert load("fsdfm-tests/tiny2").config == model.config
