"""README.md cannot go stale: every command in its ```bash blocks is run, here or by CI, and its
```python blocks run in order as one script.

Commands run here get extra flags appended (argparse keeps the last value of a flag) that shrink
the work to seconds: a tiny model, two optimiser steps, two samples. Their other flags, the files
they read and write and their order are README's. The quick-start commands are run verbatim by
.ci/run, which this test checks.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoint import random_state_dict

import fsdfm
from fsdfm._io import sha256_of
from fsdfm.checkpoint import DEFAULT_MODEL
from fsdfm.cli import COMMANDS
from fsdfm.model import GPT2_VOCAB
from fsdfm.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# The quick start: set up and generate, then the test suite. .ci/run runs both verbatim.
QUICK_START = (
    "bash scripts/setup.sh && .venv/bin/python -m fsdfm",
    ".venv/bin/python -m pytest tests",
)
# Commands that CI runs (verbatim, or with --benchmark-disable) rather than this test.
IN_CI = {
    *QUICK_START,
    ".venv/bin/python -m pytest tests -m slow",
    ".venv/bin/python -m pytest benchmarks",
}
TINY_TRAINING = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--steps", "2"]
# What each command that runs here gets appended, by its first two words.
SHRINK = {
    "fsdfm": [],
    "fsdfm sample": [],
    "fsdfm bench": ["--repeats", "1", "--length", "32"],
    "fsdfm convert": [],
    "fsdfm pretrain": [*TINY_TRAINING, "--eval-every", "0"],
    "fsdfm distill": ["--batch-size", "2", "--steps", "2", "--eval-every", "0"],
    "fsdfm eval": ["--steps", "1,2", "-n", "2", "--batch-size", "2"],
    "torchrun --nproc-per-node": [*TINY_TRAINING, "--eval-every", "0"],
    "bash scripts/train_default.sh": [],
}


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def bash_commands() -> list[str]:
    """The command lines of README's bash blocks, comments stripped."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def kind(command: str) -> str:
    words = shlex.split(command)
    if words[0] == "fsdfm" and (len(words) == 1 or words[1] not in COMMANDS):
        return "fsdfm"  # the main job, `fsdfm [PROMPT] [sample options]`
    return " ".join(command.split()[:2])


def test_every_readme_command_is_exercised():
    commands = bash_commands()
    assert commands, "README has no bash commands"
    assert list(QUICK_START) == commands[:2], "the quick start must be README's first two commands"
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands:
        if command in IN_CI:
            assert command in ci, f".ci/run does not run README's {command!r}"
        else:
            assert kind(command) in SHRINK, f"README's {command!r} is run by no test"


def test_readme_python_blocks_name_real_api():
    for block in code_blocks("python"):
        for name in re.findall(r"\bfsdfm\.(\w+)\(", block):
            assert hasattr(fsdfm, name), f"README calls fsdfm.{name}, which does not exist"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with the files README's commands name: a text corpus and a released-style
    FS-DFM .pth (random weights, GPT-2's vocabulary, the real key layout)."""
    work = tmp_path_factory.mktemp("readme")
    lines = [f"Line {i} of the corpus tells of rivers, towns and the sea." for i in range(400)]
    (work / "corpus.txt").write_text("\n".join(lines) + "\n")
    sd = {k: v.clone() for k, v in random_state_dict(0, True, vocab_size=GPT2_VOCAB).items()}
    teacher = random_state_dict(1, False, vocab_size=GPT2_VOCAB)
    torch.save({"student_ema_model": sd, "teacher_model": teacher}, work / "fsdfm-1.3b.pth")
    return work


def run(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        argv,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_readme_bash_commands_run(workdir):
    for command in bash_commands():
        if command in IN_CI:
            continue
        words = shlex.split(command)
        extra = SHRINK[kind(command)]
        if words[0] == "fsdfm":
            result = run([sys.executable, "-m", "fsdfm", *words[1:], *extra], workdir)
            if kind(command) in ("fsdfm", "fsdfm sample"):
                if "-o" in words:  # the texts went to the file
                    written = (workdir / words[words.index("-o") + 1]).read_text()
                    assert written.strip() and result.stdout == "", command
                else:
                    assert result.stdout.strip(), f"{command!r} printed no text"
        elif words[0] == "torchrun":
            torchrun = Path(sys.executable).with_name("torchrun")
            run([str(torchrun), *words[1:], *extra], workdir)
        else:  # the default model's recipe, cut to two steps per stage in a scratch WORK
            work = workdir / "train_default"
            (work / "corpus").mkdir(parents=True, exist_ok=True)
            (work / "corpus" / "corpus.txt").write_text((workdir / "corpus.txt").read_text())
            train_bpe([work / "corpus" / "corpus.txt"], 300, work / "bpe" / "tokenizer.json")
            shrink = {"PRESET": "tiny", "SEQ_LEN": "32", "BATCH": "2"}
            shrink |= {"PRETRAIN_STEPS": "2", "DISTILL_STEPS": "2", "DEVICE": "cpu"}
            shipped = sha256_of(DEFAULT_MODEL / "model.safetensors")
            run(words, ROOT, {"WORK": str(work), "PYTHON": sys.executable, **shrink})
            assert (work / "student" / "model_ema" / "model.safetensors").exists()
            # Without INSTALL=1 the recipe never touches the shipped model.
            assert sha256_of(DEFAULT_MODEL / "model.safetensors") == shipped


class _TinyScorer:
    """Stands in for `from_pretrained("gpt2-large")` (no weights offline): a random GPT-2."""

    @staticmethod
    def from_pretrained(name):
        from transformers import GPT2Config, GPT2LMHeadModel

        assert name == "gpt2-large"
        config = GPT2Config(vocab_size=GPT2_VOCAB, n_positions=1024, n_embd=32, n_layer=1, n_head=2)
        return GPT2LMHeadModel(config)


def test_readme_python_blocks_run(workdir, monkeypatch):
    pytest.importorskip("transformers")
    import transformers

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", _TinyScorer)
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    for block in code_blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)


def test_setup_without_torch_says_how_to_install(tmp_path):
    """pip's isolated build (or a Python without torch) gets one line on what to do."""
    shadow = tmp_path / "torch"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("fsdfm builds its kernels against the installed PyTorch")
    )
    assert "--no-build-isolation" in result.stderr
