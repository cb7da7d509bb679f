"""scripts/animate.py: the README's animation is made from real runs, and the script works."""

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

import fsdfm

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "animate.py"


def animate():
    spec = importlib.util.spec_from_file_location("animate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_animation_of_the_flow_runs(tmp_path, capsys):
    out = tmp_path / "a.gif"
    animate().main(["--out", str(out), "--length", "16", "--frames", "5", "--dfm-steps", "16"])
    gif = Image.open(out)
    assert gif.n_frames == 5 and gif.size == (760, 300)
    err = capsys.readouterr().err
    assert "DFM, 16 steps: The history of the city" in err and "FS-DFM, 8 steps:" in err


def test_animation_with_an_autoregressive_panel(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = fsdfm.load("default").config.vocab_size
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1,
                                     n_head=1)  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "ar")
    out = tmp_path / "b.gif"
    animate().main(["--out", str(out), "--length", "12", "--frames", "4", "--dfm-steps", "8",
                    "--ar-model", str(tmp_path / "ar")])  # fmt: skip
    assert Image.open(out).size == (3 * 380, 300)
    with pytest.raises(SystemExit):
        animate().main(["--out", str(out), "--length", "3"])  # no room after the prompt
