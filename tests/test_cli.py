"""The `fsdfm` command: convert a released-layout file, sample from it, errors as one line."""

import json
import re
import subprocess
import sys
import time

import pytest
import torch

import fsdfm
from fsdfm.cli import main


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released-style FS-DFM .pth with a tiny random student on the byte vocabulary."""
    config = fsdfm.ModelConfig(
        vocab_size=256,
        dim=64,
        n_blocks=1,
        n_heads=1,
        cond_dim=32,
        seq_len=32,
        step_conditioned=True,
    )
    torch.manual_seed(0)
    models = {}
    for name in ("student_model", "student_ema_model"):
        m = fsdfm.FSDFMTransformer(config)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.05)
        models[name] = m.state_dict()
    path = tmp_path_factory.mktemp("released") / "fsdfm.pth"
    torch.save({**models, "optimizer": {"step": 3}, "epoch": 1}, path)
    return path


def test_convert_then_sample(released, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(released), str(out), "--weights", "ema"]) == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    args = [
        "sample",
        "hi",
        "--model",
        str(out),
        "--tokenizer",
        "byte",
        "--steps",
        "4",
        "--length",
        "16",
        "-n",
        "2",
        "--seed",
        "7",
    ]
    assert main(args) == 0
    first = capsys.readouterr()
    assert first.out.count("=== sample") == 2 and "hi" in first.out
    assert "tokens/s" in first.err
    assert main(args) == 0
    assert capsys.readouterr().out == first.out, "same seed, same text"


def test_watch_shows_every_step(released, tmp_path, capsys):
    out = tmp_path / "watched"
    main(["convert", str(released), str(out)])
    args = ["sample", "--model", str(out), "--tokenizer", "byte", "--steps", "3", "--length",
            "12", "--watch", "--watch-delay", "0"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "step 0/3  t = 0.000  source noise" in err, "the first frame is the noise"
    for step in (1, 2, 3):
        assert f"step {step}/3" in err


def test_tokens_per_second_never_counts_the_watch(released, tmp_path, capsys, monkeypatch):
    """The watch's drawing and waiting is not sampling time: a clock that jumps 100 s in every
    sleep leaves the reported seconds far below the 400 s of four frames."""
    import fsdfm.cli as cli

    out = tmp_path / "watched"
    main(["convert", str(released), str(out)])
    offset = [0.0]
    real = time.perf_counter
    monkeypatch.setattr(cli.time, "perf_counter", lambda: real() + offset[0])
    monkeypatch.setattr(cli.time, "sleep", lambda s: offset.__setitem__(0, offset[0] + 100 * s))
    args = ["sample", "--model", str(out), "--tokenizer", "byte", "--steps", "3", "--length",
            "12", "--watch", "--watch-delay", "1"]  # fmt: skip
    assert main(args) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    seconds = float(re.search(r": ([0-9.]+) s,", summary).group(1))
    assert seconds < 50, summary


def test_sample_for_scripts(released, tmp_path, capsys):
    """--json gives one object per sample; -o writes the file (stdout stays empty);
    --max-new-tokens counts after the prompt; --dtype and the controls are taken."""
    out = tmp_path / "converted"
    main(["convert", str(released), str(out)])
    base = ["sample", "hi", "--model", str(out), "--tokenizer", "byte", "--steps", "2",
            "--seed", "5", "-n", "2"]  # fmt: skip
    assert main([*base, "--max-new-tokens", "6", "--json", "--top-k", "20", "--dtype", "bf16"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all(r["new_tokens"] <= 6 for r in rows)
    assert all(r["tokens"][:2] == list(b"hi") and r["seed"] == 5 for r in rows)
    assert "2 x 8 tokens in 2 steps" in captured.err
    target = tmp_path / "samples.jsonl"
    assert main([*base, "--max-new-tokens", "6", "--json", "--top-k", "20", "--dtype", "bf16",
                 "-o", str(target)]) == 0  # fmt: skip
    assert capsys.readouterr().out == ""
    written = [json.loads(line) for line in target.read_text().splitlines()]
    for row in rows + written:
        row.pop("seconds")
    assert written == rows, "the same seed writes the same samples"
    assert main([*base, "--temperature", "0", "--min-p", "0.1", "--length", "10"]) == 0
    assert capsys.readouterr().out.count("=== sample") == 2
    for argv, message in (
        (["--length", "8", "--max-new-tokens", "2"], "--length and --max-new-tokens"),
        (["--device", "cuda:x"], "--device: must be cpu, cuda or cuda:N"),
        (["--top-p", "0"], "--top-p: must be in (0, 1]"),
        (["--dtype", "fp8"], "--dtype"),
        (["--max-new-tokens", "5000"], "more than the model's seq_len = 1024"),
    ):
        status, err = main([*base, *argv]), capsys.readouterr().err
        assert status == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_main_job_is_the_bundled_model(capsys, monkeypatch):
    """`fsdfm` alone generates with the bundled model (--model's default); where the model is
    absent, one line says so."""
    import fsdfm.checkpoint

    assert main([]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "256 tokens in 8 steps" in out.err
    # `fsdfm PROMPT [sample options]` is `fsdfm sample PROMPT ...`.
    assert main(["Once upon a time", "--steps", "2", "--length", "24", "--seed", "3"]) == 0
    bare = capsys.readouterr()
    assert bare.out.startswith("Once upon a time") and "24 tokens in 2 steps" in bare.err
    assert (
        main(["sample", "Once upon a time", "--steps", "2", "--length", "24", "--seed", "3"]) == 0
    )
    assert capsys.readouterr().out == bare.out
    assert main(["--stepz", "2"]) == 2
    assert capsys.readouterr().err.startswith("fsdfm sample: error: unrecognized arguments")
    monkeypatch.setattr(fsdfm.checkpoint, "DEFAULT_MODEL", fsdfm.checkpoint.DEFAULT_MODEL / "x")
    assert main(["sample", "--steps", "2"]) == 2
    assert "bundled default model is not in this installation" in capsys.readouterr().err


def test_bench(released, capsys):
    argv = ["bench", "--model", str(released), "--weights", "ema", "--length", "16"]
    assert main([*argv, "--steps", "1,2", "--repeats", "1", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "[B, L, V] = [2, 16, 256]" in out
    for label in ("probs_to_generator", "jump_step", "sample_categorical", "1 steps", "2 steps"):
        (line,) = [line for line in out.splitlines() if label in line]
        assert line.count(" ms") == 2 and line.endswith("x"), line
    assert main([*argv, "--length", "5000"]) == 2
    assert "--length must be at most" in capsys.readouterr().err


def test_user_errors_are_one_line(released, tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsdfm sample: error:") and err.count("\n") == 1
    assert main(["sample", "--model", str(released)]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    assert main(["sample", "--model", str(released), "--steps", "0"]) == 2
    assert capsys.readouterr().err == "fsdfm sample: error: --steps: must be positive, got '0'\n"
    assert main(["sample", "--model", str(released), "--stepz", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsdfm sample: error: unrecognized arguments") and err.count("\n") == 1


def test_python_dash_m(released):
    done = subprocess.run(
        [sys.executable, "-m", "fsdfm", "--help"], capture_output=True, text=True, check=True
    )
    assert "sample" in done.stdout and "convert" in done.stdout


def test_more_user_errors_are_one_line(released, tmp_path, capsys):
    if not torch.cuda.is_available():
        assert main(["sample", "--model", str(released), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["convert", str(released), str(blocker / "out")]) == 2  # an unwritable target
    assert capsys.readouterr().err.startswith("fsdfm convert: error:")
    assert main(["sample", "--model", str(released), "--watch-delay", "-1"]) == 2
    assert "--watch-delay: must be >= 0" in capsys.readouterr().err
    assert main(["convert"]) == 2
    assert "required: src, out" in capsys.readouterr().err


def test_bugs_keep_their_traceback_and_debug_shows_user_errors(released, monkeypatch, capsys):
    import fsdfm.cli

    def broken(o):
        raise KeyError("a bug")

    monkeypatch.setitem(fsdfm.cli.COMMANDS, "convert", fsdfm.cli.CONVERT.__class__(
        "convert", "", "", fsdfm.cli.CONVERT.options, broken))  # fmt: skip
    with pytest.raises(KeyError):
        main(["convert", "a", "b"])
    assert "internal error; please report it" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        main(["sample", "--model", "/nonexistent", "--debug"])


def test_ctrl_c_is_one_line_and_status_130(released, monkeypatch, capsys):
    import fsdfm.checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fsdfm.checkpoint, "load", interrupted)
    assert main(["sample", "--model", str(released)]) == 130
    assert capsys.readouterr().err == "fsdfm sample: interrupted\n"
