"""fsdfm.training: losses, the (h, t) law, the student's initialisation, the shortcut teachers
(hand-worked), pre-training and distillation runs, exact resumption, atomic checkpoints under
kill -9, two-process DDP against one process, and the CLI (YAML + flags, one-line errors)."""

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

import fsdfm
from fsdfm import training
from fsdfm.cli import main
from fsdfm.distill import sample_step_sizes, shortcut_teacher, student_from_teacher
from fsdfm.losses import cross_entropy, forward_kl, generalized_kl
from fsdfm.model import FSDFMTransformer, ModelConfig
from fsdfm.optim import learning_rate
from fsdfm.train_config import config_from_sources
from fsdfm.training import train

ROOT = Path(__file__).resolve().parents[1]


def tiny(corpus, out, **overrides):
    """A TrainConfig for quick CPU runs of the tiny preset on the byte corpus."""
    options = {
        "data": str(corpus),
        "out": str(out),
        "tokenizer": "byte",
        "seq_len": 32,
        "batch_size": 4,
        "steps": 12,
        "lr": 1e-3,
        "log_every": 1,
        "eval_every": 6,
        "save_every": 5,
        "device": "cpu",
    }
    mode = overrides.pop("mode", "pretrain")
    if mode == "pretrain":
        options["preset"] = "tiny"
    options.update(overrides)
    return config_from_sources(mode, None, options)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny DFM teacher on the byte vocabulary with random (non-zero) weights."""
    torch.manual_seed(0)
    model = FSDFMTransformer(ModelConfig.preset("tiny", vocab_size=256, seq_len=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return fsdfm.save(model, tmp_path_factory.mktemp("teacher") / "model", tokenizer="byte")


# ---------------------------------------------------------------------------------------------
# Losses and schedules


def test_losses_against_their_definitions():
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 5, 7
    logits = torch.randn(B, L, V, generator=g) * 2
    x_1 = torch.randint(0, V, (B, L), generator=g)
    x_t = torch.where(torch.rand(B, L, generator=g) < 0.5, x_1, torch.randint(0, V, (B, L)))
    t = torch.tensor([0.0, 0.3, 0.9])

    expected_ce = F.cross_entropy(logits.reshape(-1, V), x_1.reshape(-1), reduction="none")
    torch.testing.assert_close(cross_entropy(logits, x_1), expected_ce.reshape(B, L))

    p = logits.softmax(-1)
    p1 = p.gather(-1, x_1[..., None])[..., 0]
    pt = p.gather(-1, x_t[..., None])[..., 0]
    factor = (1 / (1 - t))[:, None]  # kappa = t: kdot / (1 - kappa)
    expected = torch.where(x_t == x_1, factor * (1 - p1), -factor * (pt + p1.log()))
    torch.testing.assert_close(generalized_kl(logits, x_1, x_t, t), expected)
    # t -> 1: the factor is clamped (1 - kappa >= 1e-8), so the loss stays finite
    assert generalized_kl(logits, x_1, x_t, torch.ones(B)).isfinite().all()

    student = torch.randn(B, L, V, generator=g, requires_grad=True)
    kl = forward_kl(logits, student)
    expected_kl = F.kl_div(
        student.log_softmax(-1), logits.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(kl, expected_kl)
    kl.sum().backward()
    torch.testing.assert_close(student.grad, student.softmax(-1) - p)  # d KL / d l_S
    assert forward_kl(logits, logits).abs().max() < 1e-5


def test_losses_in_row_chunks_and_from_bf16_logits(monkeypatch):
    """The fp32 maths runs a chunk of rows at a time (here 2 rows of V = 7): values and gradients
    are those of the plain definitions; bf16 logits give the fp32 losses of the same numbers and
    a bf16 gradient, without an fp32 copy of the logits."""
    import fsdfm.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 16)
    g = torch.Generator().manual_seed(1)
    B, L, V = 3, 5, 7
    logits = (torch.randn(B, L, V, generator=g) * 2).requires_grad_()
    x_1 = torch.randint(0, V, (B, L), generator=g)
    x_t = torch.where(torch.rand(B, L, generator=g) < 0.5, x_1, torch.randint(0, V, (B, L)))
    t = torch.tensor([0.1, 0.5, 0.8])
    weights = torch.randn(B, L, generator=g)

    def plain_gkl(values):
        p = values.softmax(-1)
        p1, pt = p.gather(-1, x_1[..., None])[..., 0], p.gather(-1, x_t[..., None])[..., 0]
        factor = (1 / (1 - t))[:, None]
        return torch.where(x_t == x_1, factor * (1 - p1), -factor * (pt + p1.log()))

    got = generalized_kl(logits, x_1, x_t, t)
    (grad,) = torch.autograd.grad((got * weights).sum(), logits)
    want = plain_gkl(logits)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)
    (grad,) = torch.autograd.grad((cross_entropy(logits, x_1) * weights).sum(), logits)
    plain_ce = F.cross_entropy(logits.reshape(-1, V), x_1.reshape(-1), reduction="none")
    (want_grad,) = torch.autograd.grad((plain_ce * weights.reshape(-1)).sum(), logits)
    torch.testing.assert_close(grad, want_grad)

    low = logits.detach().bfloat16().requires_grad_()
    teacher = torch.randn(B, L, V, generator=g).bfloat16()
    for loss in (
        lambda z: generalized_kl(z, x_1, x_t, t),
        lambda z: cross_entropy(z, x_1),
        lambda z: forward_kl(teacher, z),
    ):
        value = loss(low)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, loss(low.detach().float()), rtol=0, atol=0)
        (grad,) = torch.autograd.grad(value.sum(), low)
        assert grad.dtype == torch.bfloat16
        reference = low.detach().float().requires_grad_()
        (want,) = torch.autograd.grad(loss(reference).sum(), reference)
        torch.testing.assert_close(grad.float(), want, rtol=0.02, atol=1e-3)


def test_learning_rate_warmup_then_cosine():
    lr = [learning_rate(s, lr=1.0, steps=110, warmup=10) for s in range(110)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[10] == pytest.approx(1.0) and lr[60] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))
    assert learning_rate(10**6, lr=1.0, steps=110, warmup=10) == pytest.approx(0.1)


def test_step_size_and_time_law():
    g = torch.Generator().manual_seed(1)
    n = 60000
    h, t = sample_step_sizes(n, 1024, g)
    k = (-torch.log2(h)).round().long()
    assert torch.equal(2.0 ** (-k.double()), h) and k.min() >= 0 and k.max() <= 10
    observed = torch.bincount(k, minlength=11).double()
    weights = 2.0 ** torch.arange(11, dtype=torch.float64)  # proportional to 1/h
    assert chisquare(observed, weights / weights.sum() * n).pvalue > 1e-3
    assert abs(observed[10] / n - 0.5) < 0.01  # half the draws are h = 1/1024
    j = t * 1024
    assert torch.equal(j, j.round()) and (t >= 0).all() and (t + h <= 1).all()
    assert (t[h == 1] == 0).all()

    # the joint law (h, t) on a small grid: P(k) = 2^k / 15, j | k uniform on 0..8 - 8/2^k
    h, t = sample_step_sizes(n, 8, g)
    k, j = (-torch.log2(h)).round().long(), (t * 8).round().long()
    cells, probs = [], []
    for level in range(4):
        top = 8 - 8 // 2**level
        for value in range(top + 1):
            cells.append(((k == level) & (j == value)).sum().item())
            probs.append(2**level / 15 / (top + 1))
    assert sum(cells) == n
    assert chisquare(cells, torch.tensor(probs, dtype=torch.float64) * n).pvalue > 1e-3


def test_level_laws():
    """uniform: every level alike; curriculum: the two finest levels first, one coarser level
    more every 1/K of the run, uniform over the open ones; a bad law is named."""
    from fsdfm.distill import level_weights

    g = torch.Generator().manual_seed(2)
    n = 40000
    h, _ = sample_step_sizes(n, 8, g, law="uniform")
    observed = torch.bincount((-torch.log2(h)).round().long(), minlength=4).double()
    assert chisquare(observed, torch.full((4,), n / 4.0)).pvalue > 1e-3
    assert level_weights(8, "curriculum", 0.0).tolist() == [0, 0, 0.5, 0.5]
    assert level_weights(8, "curriculum", 0.34).tolist() == [0, 1 / 3, 1 / 3, 1 / 3]
    assert level_weights(8, "curriculum", 0.99).tolist() == [0.25] * 4
    h, t = sample_step_sizes(n, 8, g, law="curriculum", progress=0.0)
    assert set(h.tolist()) == {0.25, 0.125} and (t + h <= 1).all()
    with pytest.raises(ValueError, match="levels must be one of"):
        level_weights(8, "steep")


def test_student_with_random_step_layers():
    """init="random" (the authors' way) copies the teacher's network but leaves the step-size
    layers fresh: the student no longer computes the teacher's function at the start."""
    torch.manual_seed(0)
    teacher = FSDFMTransformer(ModelConfig.preset("tiny", vocab_size=256, seq_len=32)).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.1)
    student = student_from_teacher(teacher, init="random").eval()
    x, t = torch.randint(0, 256, (2, 32)), torch.tensor([0.2, 0.6])
    assert (student(x, t, 0.5) - teacher(x, t)).abs().max() > 1e-2
    shared = {k: v for k, v in teacher.state_dict().items()}
    for k, v in student.state_dict().items():
        if k in shared:
            assert torch.equal(v, shared[k]), k
    with pytest.raises(ValueError, match="init must be one of"):
        student_from_teacher(teacher, init="zeros")


# ---------------------------------------------------------------------------------------------
# Distillation pieces


def test_student_starts_as_the_teacher():
    torch.manual_seed(0)
    teacher = FSDFMTransformer(ModelConfig.preset("tiny", vocab_size=256, seq_len=32)).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.1)
    student = student_from_teacher(teacher).eval()
    assert student.config.step_conditioned
    x = torch.randint(0, 256, (4, 32))
    t = torch.tensor([0.0, 0.25, 0.7, 0.999])
    reference = teacher(x, t)
    assert reference.abs().max() > 0.5  # a non-trivial function
    for h in (1.0, 0.5, 1 / 1024, 0.3):
        # exact up to fp32 rounding of SiLU(x) - SiLU(-x) = x (measured: max 3e-7)
        torch.testing.assert_close(student(x, t, h), reference, atol=2e-6, rtol=0)
    # dt_embedding is live: the fuser's h columns are zero, but get a gradient
    student.train()
    student(x, t, 0.5).square().mean().backward()
    c = teacher.config.cond_dim
    assert student.time_condition_fuser.weight.grad[:, c:].abs().max() > 0


class StubModel:
    """logits[b, l, v] = t_b (v + 1) + 10 h_b v + 3 x[b, l] v over V = 2, recording its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, h):
        self.calls.append((x.clone(), t.clone(), h.clone()))
        return f(x, t, h)


def f(x, t, h):
    v = torch.arange(2.0)
    return t[:, None, None] * (v + 1) + 10 * h[:, None, None] * v + 3 * x[..., None].float() * v


class InfiniteRate:
    """A schedule whose cumulative scalar is infinite: every jump happens, and with V = 2 it
    goes to the other token, so the teacher's path is known in advance."""

    def __init__(self):
        self.calls = []

    def cumulative_scalar(self, t, h):
        self.calls.append((t.clone(), h.clone()))
        return torch.full_like(t, math.inf)


@pytest.mark.parametrize("kind", ["rk4", "heun"])
def test_shortcut_teacher_hand_worked(kind):
    x = torch.tensor([[0, 1, 1], [1, 0, 0]])
    t = torch.tensor([0.25, 0.0], dtype=torch.float64)
    h = torch.tensor([0.5, 1.0], dtype=torch.float64)
    model, schedule = StubModel(), InfiniteRate()
    out = shortcut_teacher(model, x, t, h, kind, schedule=schedule)

    half, mid, end, flipped = h / 2, t + h / 2, t + h, 1 - x
    if kind == "rk4":
        # chained jumps: x -> 1 - x -> x -> 1 - x, evaluated at t, t + h/2, t + h/2, t + h
        states, times = [x, flipped, x, flipped], [t, mid, mid, end]
        weights = [1 / 6, 2 / 6, 2 / 6, 1 / 6]
        jumps = [t, mid, mid]
    else:
        states, times, weights, jumps = [x, flipped], [t, mid], [0.5, 0.5], [t]
    expected = sum(
        w * f(s, tt.float(), half.float()) for w, s, tt in zip(weights, states, times, strict=True)
    )
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32
    assert len(model.calls) == len(states)
    for (cx, ct, ch), s, tt in zip(model.calls, states, times, strict=True):
        assert torch.equal(cx, s) and torch.equal(ct, tt.float()) and torch.equal(ch, half.float())
    assert len(schedule.calls) == len(jumps)  # the jump scalars are alpha(s, h/2), in float64
    for (st, sh), s in zip(schedule.calls, jumps, strict=True):
        assert torch.equal(st, s) and torch.equal(sh, half)


def test_shortcut_teacher_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be"):
        shortcut_teacher(StubModel(), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1),
                         torch.ones(1), "euler")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Runs


def test_pretraining_loss_falls(corpus, tmp_path):
    out = train(tiny(corpus, tmp_path / "run", steps=40, batch_size=8, eval_every=20,
                     save_every=40, dropout=0.0))  # fmt: skip
    lines = metrics(out)
    losses = [m["loss"] for m in lines]
    assert len(losses) == 40 and [m["step"] for m in lines] == list(range(1, 41))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert lines[19]["val_loss"] > lines[39]["val_loss"]
    assert all(m["tokens_per_s"] > 0 and m["lr"] > 0 for m in lines)
    model = fsdfm.load(out / "model")
    assert model.tokenizer_name == "byte" and not model.config.step_conditioned
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 40 and state["sampler"]["index"] >= 0
    saved = (out / "config.yaml").read_text()
    assert "preset: tiny" in saved and "loss: ce" in saved and "warmup: 4" in saved


@pytest.mark.parametrize("mode", ["pretrain", "distill"])
def test_interrupted_and_resumed_equals_uninterrupted(corpus, teacher_dir, tmp_path, mode):
    extra = {"ema": 0.9} if mode == "pretrain" else {"teacher": str(teacher_dir), "grid": 8}
    whole = train(tiny(corpus, tmp_path / "whole", mode=mode, **extra))
    part = tmp_path / "part"
    train(tiny(corpus, part, mode=mode, stop_at=7, **extra))  # checkpoints at 5 and 7
    assert [m["step"] for m in metrics(part)] == list(range(1, 8))
    # a killed run may have logged past its checkpoint: those lines are dropped on resume
    with open(part / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 8, "loss": -1.0}) + "\n" + '{"step": 9, "lo')
    train(tiny(corpus, part, mode=mode, **extra))
    a, b = metrics(whole), metrics(part)
    assert [m["step"] for m in b] == list(range(1, 13))
    keys = ["loss", "lr", "grad_norm", "val_loss", "val_loss_ema", "loss_data", "loss_distill"]
    for x, y in zip(a, b, strict=True):
        assert {k: x.get(k) for k in keys} == {k: y.get(k) for k in keys}  # exact
    for name in ("model", "model_ema"):
        wa, wb = fsdfm.load(whole / name).state_dict(), fsdfm.load(part / name).state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_another_configuration(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=2, eval_every=0))
    with pytest.raises(ValueError, match=r"another configuration \(lr: 0.001 -> 0.002\)"):
        train(tiny(corpus, out, steps=2, lr=2e-3))
    train(tiny(corpus, out, steps=2, log_every=3, save_every=9))  # presentation may change


def test_distillation_end_to_end(corpus, teacher_dir, tmp_path, monkeypatch):
    seen = []

    def recording(model, x_t, t, h, kind, **kw):
        seen.append((h.clone(), t.clone(), x_t.shape[0], kind))
        return shortcut_teacher(model, x_t, t, h, kind, **kw)

    monkeypatch.setattr(training, "shortcut_teacher", recording)
    # eval_every=0: the diagnostics' own shortcut targets are not training rows
    out = train(tiny(corpus, tmp_path / "d", mode="distill", teacher=str(teacher_dir),
                     teacher_type="heun", grid=16, steps=6, batch_size=8,
                     eval_every=0))  # fmt: skip
    lines = metrics(out)
    # the shortcut teacher saw exactly the distilled rows (h > 1/grid, t + h <= 1), and nothing
    # ran for the data rows
    distilled = sum(round(m["frac_distill"] * 8) for m in lines)
    assert sum(n for _, _, n, _ in seen) == distilled > 0
    for h, t, _, kind in seen:
        assert kind == "heun" and (h > 1 / 16).all() and (t + h <= 1).all()
    assert all(m["loss_distill"] is None or m["loss_distill"] >= -1e-6 for m in lines)
    saved = (out / "config.yaml").read_text()
    assert "ema: 0.9995" in saved and "loss: gkl" in saved and "lr: 0.001" in saved

    for name in ("model", "model_ema"):
        student = fsdfm.load(out / name)
        assert student.config.step_conditioned and student.tokenizer_name == "byte"
        tokens = fsdfm.sample(student, 4, batch_size=2, generator=torch.Generator().manual_seed(0))
        assert tokens.shape == (2, 32) and 0 <= tokens.min() and tokens.max() < 256


def test_mask_source_pretrain_then_distill(corpus, tmp_path):
    options = {"steps": 3, "eval_every": 3, "source": "mask", "loss": "gkl"}
    teacher = train(tiny(corpus, tmp_path / "teacher", **options))
    model = fsdfm.load(teacher / "model")
    assert model.config.source == "mask" and model.config.vocab_size == 257
    assert all(math.isfinite(m["loss"]) for m in metrics(teacher))
    out = train(tiny(corpus, tmp_path / "student", mode="distill",
                     teacher=str(teacher / "model"), steps=2, grid=4))  # fmt: skip
    student = fsdfm.load(out / "model")
    assert student.config.source == "mask" and student.config.step_conditioned
    tokens = fsdfm.sample(student, 2, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert tokens.max() < 256  # no mask token left


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(corpus, tmp_path):
    options = {"steps": 5, "batch_size": 8, "dropout": 0.0, "eval_every": 5, "save_every": 5}
    single = train(tiny(corpus, tmp_path / "one", **options))
    flags = [
        "--data", str(corpus), "--out", str(tmp_path / "two"), "--tokenizer", "byte",
        "--preset", "tiny", "--seq-len", "32", "--lr", "1e-3", "--log-every", "1",
        "--device", "cpu",
    ] + [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]  # fmt: skip
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "fsdfm", "pretrain", *flags,
    ]  # fmt: skip
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr
    one, two = metrics(single), metrics(tmp_path / "two")
    assert [m["step"] for m in two] == list(range(1, 6))
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-5)
    wa = fsdfm.load(single / "model").state_dict()
    wb = fsdfm.load(tmp_path / "two" / "model").state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_kill_9_during_saves_leaves_a_loadable_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    flags = {
        "data": str(corpus), "out": str(out), "tokenizer": "byte", "preset": "tiny",
        "seq_len": "32", "batch_size": "4", "steps": "100000", "save_every": "1",
        "eval_every": "0", "log_every": "1", "device": "cpu", "ema": "0.99",
    }  # fmt: skip
    command = [sys.executable, "-m", "fsdfm", "pretrain"]
    for key, value in flags.items():
        command += ["--" + key.replace("_", "-"), value]
    rng = random.Random(0)
    state_path, reached = out / "state.pt", 0
    for _ in range(4):
        start = time.time()
        proc = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            # wait until this process has written a checkpoint, then kill it at a random moment
            # (with a save after every step, most moments are inside a save)
            while not (state_path.exists() and state_path.stat().st_mtime > start + 0.05):
                assert proc.poll() is None and time.time() - start < 60
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        state = torch.load(state_path, weights_only=True)
        assert state["step"] >= max(reached, 1)
        reached = state["step"]
        fsdfm.load(out / "model")
        fsdfm.load(out / "model_ema")
    # and the run resumes from what is on disk (temporary files of the killed saves removed)
    config = config_from_sources("pretrain", None, {**flags, "stop_at": reached + 2})
    train(config)
    assert torch.load(state_path, weights_only=True)["step"] == reached + 2
    assert not list(out.glob("*.tmp-*")) and not list((out / "model").glob("*.tmp-*"))
    assert [m["step"] for m in metrics(out)] == list(range(1, reached + 3))


class Crash(BaseException):
    """Raised at a chosen rename: a process dying between two files of a checkpoint."""


def test_a_save_cut_at_any_rename_leaves_a_consistent_checkpoint(corpus, tmp_path, monkeypatch):
    """The deterministic complement of the kill -9 test: a save (model/, model_ema/, state.pt:
    five renames) is cut at each rename in turn; what is on disk still loads and resumes."""
    out = tmp_path / "run"
    options = {"steps": 20, "save_every": 1, "eval_every": 0, "ema": 0.9}
    train(tiny(corpus, out, stop_at=1, **options))
    real_replace = os.replace
    for cut in range(5):
        calls = []

        def replace(src, dst, cut=cut, calls=calls):
            calls.append(dst)
            if len(calls) > cut:
                raise Crash
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        before = torch.load(out / "state.pt", weights_only=True)["step"]
        with pytest.raises(Crash):
            train(tiny(corpus, out, stop_at=before + 1, **options))
        monkeypatch.setattr(os, "replace", real_replace)
        assert torch.load(out / "state.pt", weights_only=True)["step"] == before
        fsdfm.load(out / "model")
        fsdfm.load(out / "model_ema")
        train(tiny(corpus, out, stop_at=before + 1, **options))  # resumes from `before`
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))


# ---------------------------------------------------------------------------------------------
# Configuration and the CLI


def test_flags_override_yaml(tmp_path, corpus):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"data: {corpus}\nout: {tmp_path / 'from_yaml'}\npreset: tiny\ntokenizer: byte\n"
        "seq_len: 32\nbatch_size: 4\nsteps: 50\nlr: 3e-4\nema: 0.99\n"
    )
    config = config_from_sources("pretrain", str(yaml_file), {"steps": "3", "out": "elsewhere"})
    assert (config.steps, config.out, config.lr, config.ema, config.preset) == (
        3, "elsewhere", 3e-4, 0.99, "tiny",
    )  # fmt: skip
    out = tmp_path / "cli"
    code = main(["pretrain", "--config", str(yaml_file), "--out", str(out), "--steps", "2",
                 "--eval-every", "0", "--device", "cpu"])  # fmt: skip
    assert code == 0
    saved = (out / "config.yaml").read_text()
    assert "steps: 2" in saved and "lr: 0.0003" in saved and "batch_size: 4" in saved
    assert [m["step"] for m in metrics(out)] == [2]  # log_every 10: the final step only

    yaml_file.write_text("teacher: x\n")
    with pytest.raises(ValueError, match="option of fsdfm distill, not pretrain"):
        config_from_sources("pretrain", str(yaml_file), {})
    yaml_file.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="stepz: unknown option"):
        config_from_sources("pretrain", str(yaml_file), {})


def one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input_is_one_line(capsys, tmp_path):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "missing.txt")
    assert "no data at" in one_line_error(capsys, ["pretrain", "--data", missing, "--out", out])
    short = tmp_path / "short.txt"
    short.write_text("too short")
    line = one_line_error(capsys, ["pretrain", "--data", str(short), "--out", out,
                                   "--tokenizer", "byte", "--preset", "tiny"])  # fmt: skip
    assert "fewer than one block of seq_len = 128" in line
    line = one_line_error(capsys, ["pretrain", "--data", str(short), "--out", out,
                                   "--preset", "huge"])  # fmt: skip
    assert "--preset: must be one of tiny, small, 0.17B" in line
    assert "pass --data" in one_line_error(capsys, ["pretrain", "--out", out])
    line = one_line_error(capsys, ["pretrain", "--data", str(short), "--out", out,
                                   "--steps", "many"])  # fmt: skip
    assert "--steps: expected an integer, got 'many'" in line
    assert "needs --teacher" in one_line_error(
        capsys, ["distill", "--data", str(short), "--out", out]
    )
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("steps: [1,\n")
    assert "not valid YAML" in one_line_error(capsys, ["pretrain", "--config", str(bad_yaml)])


def test_pretraining_with_a_bpe_tokenizer(corpus, tmp_path):
    """--tokenizer takes a BPE tokenizer.json: the data is cached under its content, and the
    trained model carries the tokenizer, so generate works from the saved directory alone."""
    pytest.importorskip("tokenizers")
    from fsdfm.tokenizer import train_bpe

    bpe = train_bpe([corpus], 300, tmp_path / "bpe" / "tokenizer.json")
    out = train(tiny(corpus, tmp_path / "run", tokenizer=str(bpe.name), steps=2, eval_every=0))
    model = fsdfm.load(out / "model")
    assert model.config.vocab_size == bpe.vocab_size
    tok = fsdfm.get_tokenizer(model.tokenizer_name)
    assert Path(model.tokenizer_name).parent == out / "model"
    texts = fsdfm.generate(model, tok, "the cat", steps=2, seed=0)
    assert texts[0].startswith("the cat")
    with pytest.raises(ValueError, match="tokenizer must be gpt2, byte or a path"):
        train(tiny(corpus, tmp_path / "bad", tokenizer=str(tmp_path / "nope.json")))


def test_a_diverging_run_stops_and_keeps_the_last_finite_checkpoint(
    corpus, tmp_path, monkeypatch, capsys
):
    """NaN weights after step 3 (as a far too large learning rate gives): the run stops with
    TrainingDiverged before logging or saving step 4, metrics.jsonl stays JSON, and the model of
    step 2 is untouched. From the command line: one line and exit status 2."""
    out = tmp_path / "run"
    config = tiny(corpus, out, steps=4, save_every=2, eval_every=0)
    original = training._Run._train_step

    def poisoned(self):
        result = original(self)
        if self.step == 3:
            with torch.no_grad():
                next(self.model.parameters()).fill_(math.nan)
        return result

    monkeypatch.setattr(training._Run, "_train_step", poisoned)
    with pytest.raises(training.TrainingDiverged, match="step 4 .*checkpoint of step 2"):
        train(config)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    model = fsdfm.load(out / "model")
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    monkeypatch.undo()

    argv = ["pretrain", "--data", str(corpus), "--out", str(tmp_path / "cli"), "--tokenizer",
            "byte", "--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--steps", "3",
            "--log-every", "1", "--eval-every", "0", "--device", "cpu", "--lr", "1e30"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fsdfm pretrain: error: training diverged at step")


def test_a_damaged_state_is_refused_in_one_line_naming_it(corpus, tmp_path, capsys):
    """state.pt made empty, text, a list, a dict without its optimizer, truncated, with a
    negative or out-of-range step, replaced by a directory, or with 2,000 random bytes inside:
    the resume stops with one line naming state.pt, and metrics.jsonl is left as it was. The
    random bytes are caught by the sha256 in state.json (without it they could load as NaN)."""
    out = tmp_path / "run"
    flags = {"steps": 6, "save_every": 1, "eval_every": 0}
    train(tiny(corpus, out, stop_at=2, **flags))
    state_path, manifest = out / "state.pt", out / "state.json"
    good, good_manifest = state_path.read_bytes(), manifest.read_bytes()
    logged = (out / "metrics.jsonl").read_text()
    state = torch.load(state_path, weights_only=True)
    rng = random.Random(0)

    def saved(obj):
        return lambda: torch.save(obj, state_path)

    def scrambled():
        data = bytearray(good)
        start = rng.randrange(len(data) // 4, len(data) // 2)
        data[start : start + 2000] = bytes(rng.randrange(256) for _ in range(2000))
        state_path.write_bytes(bytes(data))

    def directory():
        state_path.unlink()
        state_path.mkdir()

    cases = {  # name: (damage, keep state.json)
        "empty": (lambda: state_path.write_bytes(b""), False),
        "text": (lambda: state_path.write_text("not a checkpoint"), False),
        "list": (saved([1, 2, 3]), False),
        "no optimizer": (saved({k: v for k, v in state.items() if k != "optimizer"}), False),
        "truncated": (lambda: state_path.write_bytes(good[: len(good) // 2]), False),
        "negative step": (saved({**state, "step": -3}), False),
        "step past the run": (saved({**state, "step": 10**6}), False),
        "directory": (directory, False),
        "random bytes": (scrambled, True),
    }
    for name, (damage, keep_manifest) in cases.items():
        if state_path.is_dir():
            state_path.rmdir()
        state_path.write_bytes(good)
        manifest.write_bytes(good_manifest)
        if not keep_manifest:
            manifest.unlink()
        damage()
        argv = ["pretrain", "--data", str(corpus), "--out", str(out), "--tokenizer", "byte",
                "--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--steps", "6",
                "--lr", "1e-3", "--log-every", "1", "--eval-every", "0", "--save-every", "1",
                "--device", "cpu"]  # fmt: skip
        capsys.readouterr()
        assert main(argv) == 2, name
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("fsdfm pretrain: error:") and "state.pt" in last, (name, last)
        assert (out / "metrics.jsonl").read_text() == logged, name
    if state_path.is_dir():
        state_path.rmdir()
    state_path.write_bytes(good)
    manifest.write_bytes(good_manifest)
    train(tiny(corpus, out, stop_at=3, **flags))  # and the intact state resumes
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Training as people run it: gradient accumulation, extending a finished run, progress lines


def test_grad_accum_gives_the_losses_of_the_whole_batch(corpus, tmp_path):
    """--grad-accum N splits each step's batch into N passes: without dropout (whose masks
    are drawn per pass) the losses and weights are those of the whole batch at once, up to
    float summation order."""
    kw = {"steps": 4, "batch_size": 8, "dropout": 0.0, "eval_every": 0, "save_every": 4}
    whole = train(tiny(corpus, tmp_path / "whole", **kw))
    parts = train(tiny(corpus, tmp_path / "parts", grad_accum=3, **kw))  # 3 + 3 + 2 rows
    for a, b in zip(metrics(whole), metrics(parts), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wa, wb = (fsdfm.load(p / "model").state_dict() for p in (whole, parts))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="grad_accum = 9 exceeds the 8 sequences per process"):
        train(tiny(corpus, tmp_path / "bad", grad_accum=9, **kw))


def test_grad_accum_in_distillation(corpus, teacher_dir, tmp_path):
    out = train(tiny(corpus, tmp_path / "d", mode="distill", teacher=str(teacher_dir), grid=8,
                     steps=3, grad_accum=2, eval_every=0, save_every=3))  # fmt: skip
    rows = metrics(out)
    assert [m["step"] for m in rows] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in rows)


def test_extending_a_finished_run(corpus, tmp_path, capsys):
    """A finished run given a larger --steps continues from where it stopped, the schedule
    recomputed (said in one line) and the derived warm-up kept; the result is the run's first
    steps followed by the new ones. A --steps below the step reached, or another changed
    option, is refused with the reason."""
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=6, eval_every=0, save_every=3))
    import yaml

    warmup = yaml.safe_load((out / "config.yaml").read_text())["warmup"]
    capsys.readouterr()
    train(tiny(corpus, out, steps=10, eval_every=0, save_every=3))
    err = capsys.readouterr().err
    assert "--steps 6 -> 10: continuing at step 6 with the learning-rate schedule recomputed" in err
    rows = metrics(out)
    assert [m["step"] for m in rows] == list(range(1, 11))
    lr7 = learning_rate(6, lr=1e-3, steps=10, warmup=warmup, min_lr_ratio=0.1)
    assert rows[6]["lr"] == pytest.approx(lr7)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 10 and saved["warmup"] == warmup
    # Resumed again with its new length, the extended run is at its end: nothing to refuse.
    train(tiny(corpus, out, steps=10, eval_every=0, save_every=3))
    assert "is already at step 10" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--steps 4 is below step 10"):
        train(tiny(corpus, out, steps=4))
    with pytest.raises(ValueError, match=r"another configuration \(lr: 0.001 -> 0.002\)"):
        train(tiny(corpus, out, steps=12, lr=2e-3))


def test_plain_progress_lines_when_stderr_is_no_terminal(corpus, tmp_path, capsys):
    train(tiny(corpus, tmp_path / "run", steps=3, eval_every=0, save_every=3))
    lines = [
        x for x in capsys.readouterr().err.splitlines() if re.match(r"fsdfm pretrain: step \d+/", x)
    ]
    assert len(lines) == 3 and lines[-1].startswith("fsdfm pretrain: step 3/3 (100%), loss ")
    assert all(" tokens/s, " in x and ", ETA " in x for x in lines), lines


def test_distillation_diagnostics(corpus, teacher_dir, tmp_path):
    """At every evaluation fsdfm distill logs, per level of the grid, the self-consistency
    KL(target_h || student_h), KL(student_h || student_finest), the predictive entropy and the
    rows drawn so far, and plots them (OUT/diagnostics.png)."""
    out = train(tiny(corpus, tmp_path / "d", mode="distill", teacher=str(teacher_dir), grid=8,
                     steps=4, batch_size=8, eval_every=2, save_every=4))  # fmt: skip
    logged = [m for m in metrics(out) if "levels" in m]
    assert [m["step"] for m in logged] == [2, 4]
    for m in logged:
        levels = m["levels"]
        assert list(levels) == ["1", "1/2", "1/4", "1/8"]
        assert "kl_target" not in levels["1/8"] and levels["1/8"]["kl_fine"] == 0.0
        for name in ("1", "1/2", "1/4"):
            assert levels[name]["kl_target"] >= -1e-6 and levels[name]["kl_fine"] >= -1e-6
        assert all(0 < row["entropy"] <= math.log(256) + 1e-6 for row in levels.values())
        assert sum(row["rows"] for row in levels.values()) == 8 * m["step"]
    # The 1/h weights draw the finest level most often.
    rows = {name: row["rows"] for name, row in logged[-1]["levels"].items()}
    assert rows["1/8"] >= rows["1"]
    assert (out / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("levels, init", [("uniform", "random"), ("curriculum", "teacher")])
def test_distillation_with_other_choices(corpus, teacher_dir, tmp_path, levels, init):
    out = train(tiny(corpus, tmp_path / "d", mode="distill", teacher=str(teacher_dir), grid=8,
                     steps=4, batch_size=8, eval_every=2, save_every=4, levels=levels,
                     student_init=init))  # fmt: skip
    at_2, at_4 = (m for m in metrics(out) if "levels" in m)
    assert math.isfinite(at_4["loss"])
    saved = (out / "config.yaml").read_text()
    assert f"levels: {levels}" in saved and f"student_init: {init}" in saved
    if levels == "curriculum":  # h = 1 opens at 3/4 of the run (step 3 of 4); 1/2 at step 2
        assert at_2["levels"]["1"]["rows"] == 0 and at_2["levels"]["1/2"]["rows"] == 0
        assert at_2["levels"]["1/8"]["rows"] + at_2["levels"]["1/4"]["rows"] == 16


def test_a_run_from_before_an_option_existed_resumes(corpus, tmp_path):
    """A state whose config lacks options added since (here the redi ones) resumes: the run
    behaved as their defaults do. A changed known option is still refused."""
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=6, stop_at=3, eval_every=0, save_every=3))
    state = torch.load(out / "state.pt", weights_only=True)
    for key in ("method", "couplings", "coupling_count", "coupling_steps"):
        del state["config"][key]
    torch.save(state, out / "state.pt")
    manifest = {"format": training.STATE_FORMAT, "sha256": [training.sha256_of(out / "state.pt")]}
    (out / training.STATE_MANIFEST).write_text(json.dumps(manifest))
    train(tiny(corpus, out, steps=6, eval_every=0, save_every=3))
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))
    with pytest.raises(ValueError, match=r"another configuration \(lr: 0.001 -> 0.002\)"):
        train(tiny(corpus, out, steps=6, lr=2e-3))
