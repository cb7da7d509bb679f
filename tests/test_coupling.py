"""Rectified couplings (fsdfm.coupling) and ``fsdfm distill --method redi``: the pairs are the
sampler's own, the file round-trips and refuses what it is not, and a model retrained on a
coupling learns it (a deterministic coupling is learnt well enough that one step reproduces
it, which independent pairs cannot give)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fsdfm
from fsdfm import training
from fsdfm.cli import main
from fsdfm.coupling import load_couplings, rectified_couplings, save_couplings
from fsdfm.distill import student_from_teacher
from fsdfm.model import FSDFMTransformer, ModelConfig
from fsdfm.train_config import TrainConfig, config_from_sources
from fsdfm.training import COUPLINGS_FILE, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny DFM teacher on the byte vocabulary (random weights), L = 16."""
    torch.manual_seed(0)
    model = FSDFMTransformer(ModelConfig.preset("tiny", vocab_size=256, seq_len=16))
    return fsdfm.save(model, tmp_path_factory.mktemp("teacher") / "model", tokenizer="byte")


def redi(corpus, out, teacher, **overrides):
    options = {"data": str(corpus), "out": str(out), "teacher": str(teacher), "method": "redi",
               "seq_len": 16, "batch_size": 8, "steps": 8, "log_every": 1, "eval_every": 4,
               "save_every": 3, "device": "cpu", "coupling_count": 12,
               "coupling_steps": 3}  # fmt: skip
    options.update(overrides)
    if options.get("couplings"):  # a given file: the run makes none of its own
        del options["coupling_count"], options["coupling_steps"]
    return config_from_sources("distill", None, options)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_couplings_are_the_samplers_own_pairs(teacher):
    model = fsdfm.load(teacher)
    x_0, x_1 = rectified_couplings(model, 5, steps=3, batch_size=2, seed=7)
    assert x_0.shape == x_1.shape == (5, 16) and x_0.dtype == x_1.dtype == torch.long
    for b, rows in enumerate((slice(0, 2), slice(2, 4), slice(4, 5))):
        n = rows.stop - rows.start
        g = torch.Generator().manual_seed(7 + b)
        last, states = fsdfm.sample(model, 3, batch_size=n, generator=g, return_trajectory=True)
        assert torch.equal(states[0], x_0[rows]) and torch.equal(last, x_1[rows])
    # a batch's pairs do not depend on how many pairs are made
    y_0, y_1 = rectified_couplings(model, 2, steps=3, batch_size=2, seed=7)
    assert torch.equal(y_0, x_0[:2]) and torch.equal(y_1, x_1[:2])
    assert not torch.equal(x_0[:2], x_1[:2])


def test_couplings_need_the_uniform_source():
    model = FSDFMTransformer(ModelConfig.preset("tiny", vocab_size=9, seq_len=4, source="mask"))
    with pytest.raises(ValueError, match="uniform source"):
        rectified_couplings(model, 2, steps=2)
    with pytest.raises(ValueError, match="n, batch_size, steps >= 1"):
        rectified_couplings(model, 0, steps=2)


def test_couplings_file_round_trip_and_refusals(tmp_path):
    x_0 = torch.randint(0, 50, (6, 5))
    x_1 = torch.randint(0, 50, (6, 5))
    path = tmp_path / "pairs.safetensors"
    sha = save_couplings(path, x_0, x_1, {"made": "here", "steps": 3})
    a, b, meta = load_couplings(path)
    assert torch.equal(a, x_0) and torch.equal(b, x_1) and meta == {"made": "here", "steps": 3}
    assert len(sha) == 64 and not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ValueError, match=r"\[n, L\]"):
        save_couplings(path, x_0, x_1[:, :4], {})
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="damaged.safetensors is not a readable couplings file"):
        load_couplings(damaged)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x_0": x_0}, str(other))
    with pytest.raises(ValueError, match="other.safetensors is not a couplings file"):
        load_couplings(other)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_couplings(tmp_path / "missing.safetensors")


def test_redi_run_makes_its_couplings_and_resumes_exactly(corpus, teacher, tmp_path):
    whole = train(redi(corpus, tmp_path / "whole", teacher))
    x_0, x_1, meta = load_couplings(whole / COUPLINGS_FILE)
    assert x_0.shape == (12, 16) and meta["count"] == 12 and meta["steps"] == 3
    lines = metrics(whole)
    assert [m["step"] for m in lines] == list(range(1, 9))
    assert "loss_distill" not in lines[0] and "levels" not in lines[3] and "val_loss" in lines[3]
    saved = (whole / "config.yaml").read_text()
    assert "method: redi" in saved and "loss: ce" in saved and "lr: 0.0001" in saved
    model = fsdfm.load(whole / "model")
    assert not model.config.step_conditioned and model.tokenizer_name == "byte"
    assert not torch.equal(model.state_dict()["vocab_embed.weight"],
                           fsdfm.load(teacher).state_dict()["vocab_embed.weight"])  # fmt: skip

    part = tmp_path / "part"
    train(redi(corpus, part, teacher, stop_at=5))
    train(redi(corpus, part, teacher))
    keys = ("loss", "lr", "grad_norm", "val_loss", "val_loss_ema")
    for a, b in zip(lines, metrics(part), strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
    wa, wb = fsdfm.load(whole / "model").state_dict(), fsdfm.load(part / "model").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # couplings made with other settings are refused, not replaced
    with pytest.raises(ValueError, match=r"couplings made otherwise \(count: 12 -> 13\)"):
        train(redi(corpus, tmp_path / "whole", teacher, coupling_count=13, steps=9))


def test_redi_on_a_given_file_refuses_changed_pairs(corpus, teacher, tmp_path):
    pairs = tmp_path / "pairs.safetensors"
    save_couplings(pairs, torch.randint(0, 256, (10, 16)), torch.randint(0, 256, (10, 16)), {})
    out = tmp_path / "run"
    train(redi(corpus, out, teacher, couplings=str(pairs), stop_at=3))
    assert not (out / COUPLINGS_FILE).exists()
    save_couplings(pairs, torch.randint(0, 256, (10, 16)), torch.randint(0, 256, (10, 16)), {})
    with pytest.raises(ValueError, match="the couplings changed since"):
        train(redi(corpus, out, teacher, couplings=str(pairs)))
    short = tmp_path / "short.safetensors"
    save_couplings(short, torch.randint(0, 256, (10, 8)), torch.randint(0, 256, (10, 8)), {})
    with pytest.raises(ValueError, match="pairs of 8 tokens, but the run has seq_len 16"):
        train(redi(corpus, tmp_path / "r2", teacher, couplings=str(short)))
    wide = tmp_path / "wide.safetensors"
    save_couplings(wide, torch.randint(0, 300, (10, 16)), torch.randint(0, 256, (10, 16)), {})
    with pytest.raises(ValueError, match=r"x_0 holds ids outside the vocabulary \[0, 256\)"):
        train(redi(corpus, tmp_path / "r3", teacher, couplings=str(wide)))


def test_redi_refusals_in_one_line(corpus, teacher, tmp_path, capsys):
    student = fsdfm.save(student_from_teacher(fsdfm.load(teacher)), tmp_path / "student",
                         tokenizer="byte")  # fmt: skip
    with pytest.raises(ValueError, match="rectifies a DFM teacher; .* step-conditioned"):
        train(redi(corpus, tmp_path / "s", student))
    base = ["distill", "--data", str(corpus), "--out", str(tmp_path / "o"),
            "--teacher", str(teacher)]  # fmt: skip
    cases = [
        (
            ["--couplings", str(tmp_path / "nowhere.safetensors"), "--method", "redi"],
            "no such file",
        ),
        (["--couplings", str(corpus)], "is not a readable couplings file"),
        (["--coupling-steps", "8"], "--coupling-steps sets the couplings --method redi makes"),
        (
            ["--method", "redi", "--couplings", str(corpus), "--coupling-count", "8"],
            "--coupling-count sets the couplings",
        ),
        (["--method", "rectified"], "--method"),
        (["--method", "redi", "--coupling-steps", "0"], "coupling_steps must be >= 1"),
        (["--method", "redi", "--levels", "uniform"], "--levels is an option of --method fsdfm"),
    ]
    # a mask-source teacher: its x_0 is all masks, nothing to couple, with either flag
    masked = fsdfm.save(FSDFMTransformer(ModelConfig.preset("tiny", vocab_size=257, seq_len=16,
                                                            source="mask")),
                        tmp_path / "masked", tokenizer="byte")  # fmt: skip
    pairs = tmp_path / "pairs.safetensors"
    save_couplings(pairs, torch.zeros(4, 16, dtype=torch.long), torch.ones(4, 16, dtype=torch.long),
                   {})  # fmt: skip
    cases += [
        (["--teacher", str(masked), "--method", "redi"], "--method redi needs a teacher of the"),
        (["--teacher", str(masked), "--couplings", str(pairs)], "--couplings needs a teacher of"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2  # a second --teacher replaces the first
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    with pytest.raises(ValueError, match="--couplings is an option of fsdfm distill"):
        train(TrainConfig(mode="pretrain", data=str(corpus), out=str(tmp_path / "p"),
                          couplings=str(pairs)))  # fmt: skip


def test_a_retrained_model_learns_its_coupling(corpus, teacher, tmp_path):
    """x_1 = (7 x_0 + 3) mod 256 position by position: under this coupling p(x_1 | x_0) is a
    point mass, so one factorised step from x_0 is exact, and the retrained model's one-step
    samples follow the map (independent pairs would match it 1 time in 256)."""
    g = torch.Generator().manual_seed(1)
    x_0 = torch.randint(0, 256, (2048, 16), generator=g)
    pairs = tmp_path / "map.safetensors"
    save_couplings(pairs, x_0, (7 * x_0 + 3) % 256, {"map": "7 x + 3"})
    out = train(redi(corpus, tmp_path / "run", teacher, couplings=str(pairs), steps=200,
                     batch_size=16, lr=3e-3, ema=0.0, eval_every=0, save_every=200,
                     log_every=50))  # fmt: skip
    model = fsdfm.load(out / "model")
    last, states = fsdfm.sample(model, 1, batch_size=32, return_trajectory=True,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    follows = (last == (7 * states[0] + 3) % 256).double().mean().item()
    assert follows > 0.3, follows


def test_couplings_are_made_part_by_part_and_survive_a_kill(corpus, teacher, tmp_path,
                                                            monkeypatch):  # fmt: skip
    """A run killed while it makes its couplings keeps the parts made; resumed, it makes only
    the rest, and the result is the one-call result (batch b always seeded seed + b)."""
    monkeypatch.setattr(training, "COUPLING_BATCH", 2)
    monkeypatch.setattr(training, "PART_BATCHES", 2)  # parts of 4 pairs: 12 pairs = 3 parts
    made = []
    real = training.rectified_couplings

    def dying(*args, **kwargs):
        if len(made) == 1:
            raise KeyboardInterrupt  # the kill, after the first part
        made.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "rectified_couplings", dying)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(redi(corpus, out, teacher, batch_size=2))
    assert [p.name for p in (out / training.COUPLINGS_PARTS).iterdir()] == [
        "part-00000.safetensors"
    ]
    assert not (out / COUPLINGS_FILE).exists()
    monkeypatch.setattr(training, "rectified_couplings", lambda *a, **k: made.append(k["seed"])
                        or real(*a, **k))  # fmt: skip
    train(redi(corpus, out, teacher, batch_size=2))
    x_0, x_1, meta = load_couplings(out / COUPLINGS_FILE)
    assert made == [meta["seed"], meta["seed"] + 2, meta["seed"] + 4]
    assert not (out / training.COUPLINGS_PARTS).exists()
    y_0, y_1 = real(fsdfm.load(teacher), 12, steps=3, batch_size=2, seed=meta["seed"])
    assert torch.equal(x_0, y_0) and torch.equal(x_1, y_1)


def test_couplings_of_a_changed_teacher_are_refused(corpus, teacher, tmp_path):
    """The couplings name their teacher by its weights, not only its path: a teacher trained
    further in place makes the run's pairs stale, and the run says so."""
    model = fsdfm.load(teacher)
    own = fsdfm.save(model, tmp_path / "teacher", tokenizer="byte")
    out = tmp_path / "run"
    train(redi(corpus, out, own, steps=2, eval_every=0))
    with torch.no_grad():
        model.output_layer.linear.bias.add_(0.1)
    fsdfm.save(model, own, tokenizer="byte")
    with pytest.raises(ValueError, match=r"couplings made otherwise \(teacher_weights: "):
        train(redi(corpus, out, own, steps=3, eval_every=0))


# Run by torchrun, one process per rank: parts of 4 pairs, each rank logging the seeds it drew.
RANKED = """
import json, os, sys
from fsdfm import training
from fsdfm.train_config import TrainConfig
training.COUPLING_BATCH, training.PART_BATCHES = 2, 2
real = training.rectified_couplings
def logged(*args, **kwargs):
    with open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"]), "a") as f:
        f.write(str(kwargs["seed"]) + "\\n")
    return real(*args, **kwargs)
training.rectified_couplings = logged
training.train(TrainConfig(**json.loads(sys.argv[1])))
"""


def test_the_ranks_share_the_couplings_and_make_the_one_call_result(corpus, teacher, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """Under torchrun the ranks share the parts still to make (rank r: every world-th from the
    r-th), so no rank waits at a barrier while another samples alone, also when a killed run
    left some made; the joined file is the one-call result, and the run trains on it."""
    monkeypatch.setattr(training, "COUPLING_BATCH", 2)
    monkeypatch.setattr(training, "PART_BATCHES", 2)  # as in RANKED: 12 pairs = 3 parts
    real = training.rectified_couplings
    made = []

    def dying(*args, **kwargs):
        if made:
            raise KeyboardInterrupt  # the kill, after part 0
        made.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "rectified_couplings", dying)
    out = tmp_path / "run"
    config = redi(corpus, out, teacher, batch_size=2, steps=2, eval_every=0)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    script = tmp_path / "ranked.py"
    script.write_text(RANKED)
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(script),
         json.dumps(config.to_dict()), str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    x_0, x_1, meta = load_couplings(out / COUPLINGS_FILE)
    seed = meta["seed"]
    assert made == [seed]
    seeds = {r: [int(s) for s in (tmp_path / f"rank{r}").read_text().split()] for r in (0, 1)}
    assert seeds == {0: [seed + 2], 1: [seed + 4]}  # parts 1 and 2 were left: one each
    y_0, y_1 = real(fsdfm.load(teacher), 12, steps=3, batch_size=2, seed=seed)
    assert torch.equal(x_0, y_0) and torch.equal(x_1, y_1)
    assert not (out / training.COUPLINGS_PARTS).exists()
    assert (out / "model_ema" / "model.safetensors").exists()


def test_fsdfm_on_a_couplings_file_draws_every_path_from_its_pairs(corpus, teacher, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    """--method fsdfm --couplings FILE: the data rows and the distilled rows alike take x_t
    between a pair's own x_0 and x_1 (fresh noise would undo the rectification)."""
    g = torch.Generator().manual_seed(3)
    x_0, x_1 = torch.randint(0, 256, (2, 24, 16), generator=g)
    pairs = tmp_path / "pairs.safetensors"
    save_couplings(pairs, x_0, x_1, {"made": "here"})
    seen = []
    real = training.MixturePath.sample

    def spy(self, a, b, t, **kwargs):
        seen.append((a.clone(), b.clone()))
        return real(self, a, b, t, **kwargs)

    monkeypatch.setattr(training.MixturePath, "sample", spy)
    options = {"data": str(corpus), "out": str(tmp_path / "run"), "teacher": str(teacher),
               "seq_len": 16, "batch_size": 8, "steps": 3, "eval_every": 0, "device": "cpu",
               "couplings": str(pairs), "levels": "uniform", "grid": 4}  # fmt: skip
    train(config_from_sources("distill", None, options))
    assert len(seen) == 3
    rows = {(tuple(a.tolist()), tuple(b.tolist())) for a, b in zip(x_0, x_1, strict=True)}
    for a, b in seen:
        assert all(
            (tuple(r.tolist()), tuple(s.tolist())) in rows for r, s in zip(a, b, strict=True)
        )
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert state["couplings_sha"] == training.sha256_of(pairs)
