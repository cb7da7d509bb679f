"""Property-based fuzzing (hypothesis) of the public entry points: the ops, ``fsdfm.sample`` /
``generate``, ``load`` / ``save`` and the CLI, with random shapes, dtypes, strides and bad values.

Every argument is drawn either from its valid values or from a list of mistakes, and the test
knows which: valid calls must succeed with a result that obeys the law's hard constraints (shape,
range, tokens of probability zero never drawn, frozen positions kept), and a call with a mistake
must raise a ValueError / TypeError whose message names one of the mistaken arguments. Nothing
else (a crash, a bare RuntimeError, a wrong silent result) is allowed.

The examples are derandomised, so CI runs the same ones every time; HYPOTHESIS_PROFILE=wide
explores ~20x more with fresh randomness.
"""

import contextlib
import io
import json
import math
import os

import pytest
import torch

import fsdfm
from fsdfm import ops
from fsdfm.cli import main

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "wide", deadline=None, max_examples=1200, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
WIDE = os.environ.get("HYPOTHESIS_PROFILE") == "wide"

NATIVE = ops.native_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Draw:
    """Draws the arguments of one call: all valid, or all but one, chosen up front (about half
    the examples are valid), which is then drawn from its list of mistakes."""

    def __init__(self, data, arguments: int):
        # Hypothesis shrinks toward 0: the simplest example is a valid call.
        self.data, self.count = data, 0
        self.target = max(data.draw(st.integers(-arguments, arguments), label="mistake in"), 0)
        self.mistakes = []

    def arg(self, name: str, valid, bad: list):
        """A value from strategy ``valid``, or one of ``bad`` if this is the mistaken argument."""
        self.count += 1
        if self.count == self.target and bad:
            self.mistakes.append(name)
            return self.data.draw(st.sampled_from(bad), label=name)
        return self.data.draw(valid, label=name)

    def check(self, call):
        """call(); None if the mistake was refused in one line naming its argument, else the
        result of the valid call."""
        if not self.mistakes:
            return call()
        with pytest.raises((ValueError, TypeError)) as caught:
            call()
        message = str(caught.value)
        assert self.mistakes[0] in message and "\n" not in message, (self.mistakes, message)
        return None


def logits_strategy(data, B, L, V, dtype, strided):
    """Random logits with -inf entries (never a whole row), sometimes huge values, maybe
    strided (a view with non-unit strides)."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    scale = data.draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]), label="scale")
    logits = torch.randn(B, L, V, generator=g) * scale
    logits[torch.rand(B, L, V, generator=g) < 0.3] = -math.inf
    logits[..., data.draw(st.integers(0, V - 1), label="finite column")] = 0.0
    logits = logits.to(dtype)
    if strided:
        holder = torch.full((L, B, 2 * V), float("nan"), dtype=dtype)
        holder[..., ::2] = logits.transpose(0, 1)
        logits = holder[..., ::2].transpose(0, 1)  # strides along L, B and V all unusual
    return logits


def draw_rows(data, vocab_sizes: list[int]):
    """(B, L, V, dtype, logits) of a random batch of rows."""
    B, L = data.draw(st.integers(0, 3), label="B"), data.draw(st.integers(0, 4), label="L")
    V = data.draw(st.sampled_from(vocab_sizes), label="V")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    logits = logits_strategy(data, B, L, V, dtype, data.draw(st.booleans(), label="strided"))
    return B, L, V, dtype, logits


BACKENDS = [
    pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason="native ops not built")),
    "reference",
]


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_ops_fuzz(backend, data):
    d = Draw(data, arguments=10)
    B, L, V, dtype, logits = draw_rows(data, [1, 2, 3, 7, 33, 130])
    if B * L and d.arg("logits", st.just(False), [True]):
        logits[data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, L - 1)), 0] = data.draw(
            st.sampled_from([math.nan, math.inf])
        )
    x_t = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    if B * L and d.arg("x_t", st.just(False), [True]):
        x_t[0, 0] = data.draw(st.sampled_from([-1, V, V + 5]))
    rate_scale = d.arg(
        "rate_scale",
        st.one_of(
            st.floats(-5, 50),
            st.builds(lambda v: torch.full((B,), v), st.floats(-5, 50)),
        ),
        [math.nan, "1", torch.ones(B + 1), torch.ones(B, dtype=torch.long)]
        + ([torch.full((B,), math.nan)] if B else []),
    )
    h = d.arg(
        "h",
        st.one_of(st.floats(0, 2), st.just(math.inf), st.builds(lambda v: torch.full((B,), v),
                                                                st.floats(0, 2))),
        [-0.1, math.nan, None] + ([torch.full((B,), -1.0)] if B else []),
    )  # fmt: skip
    barrier = d.arg("barrier", st.sampled_from([math.inf, 0.0, 0.5, 3.0]), [-1.0, math.nan, "x"])
    temperature = d.arg(
        "temperature", st.sampled_from([1.0, 0.5, 2.0, 0.05, 0.0]), [-1.0, math.inf, 1e-45, None]
    )
    controls = draw_controls(d)
    generator = d.arg("generator", st.just(torch.Generator().manual_seed(3)), [0, "g"])
    jump = ops.jump_step if backend == "native" else ops.jump_step_ref
    out = d.check(
        lambda: jump(
            logits,
            x_t,
            rate_scale,
            h,
            barrier=barrier,
            temperature=temperature,
            generator=generator,
            **controls,
        )  # fmt: skip
    )
    if out is None:
        return
    assert out.shape == (B, L) and out.dtype == torch.int64
    assert bool(((out >= 0) & (out < V)).all())
    moved = out != x_t
    impossible = logits.float().gather(-1, out[..., None].clamp(0, V - 1))[..., 0] == -math.inf
    assert not bool((moved & impossible).any()), "jumped to a token of probability zero"
    if isinstance(h, float) and h == 0.0:
        assert not bool(moved.any())
    if only_the_maximum(temperature, controls):
        landed = logits.float().gather(-1, out[..., None])[..., 0]
        assert bool((landed == logits.float().amax(-1))[moved].all()), "moved off the maximum"
        if temperature == 0.0:
            assert bool((out == logits.float().argmax(-1))[moved].all()), "not the lowest argmax"


def draw_controls(d: Draw) -> dict:
    """top_k / top_p / min_p, each valid (None and the "off" values included) or mistaken."""
    return {
        "top_k": d.arg("top_k", st.sampled_from([None, 0, 1, 3, 1000]), [-1, 1.5, True]),
        "top_p": d.arg("top_p", st.sampled_from([None, 1.0, 0.5, 0.01]), [0.0, 1.5, math.nan]),
        "min_p": d.arg("min_p", st.sampled_from([None, 0.0, 0.2, 1.0]), [-0.1, 2.0]),
    }


def only_the_maximum(temperature, controls) -> bool:
    """Whether the controls leave only the tokens of the row's largest logit."""
    return temperature == 0.0 or controls["top_k"] == 1 or controls["min_p"] == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_categorical_fuzz(backend, data):
    d = Draw(data, arguments=5)
    B, L, V, dtype, logits = draw_rows(data, [2, 3, 7, 130])
    exclude = d.arg(
        "exclude",
        st.one_of(st.none(), st.integers(0, V - 1)),
        [V, -1, 1.5, torch.zeros(B, L)],
    )
    if exclude is not None and not d.mistakes and B * L:
        # Rows need a token besides the excluded one with a probability that does not underflow:
        # give the next token the row's largest logit.
        logits[..., (exclude + 1) % V] = logits.float().amax(-1).to(dtype)
    barrier = math.inf if exclude is not None else data.draw(st.sampled_from([math.inf, 0.0, 2.0]))
    temperature = d.arg("temperature", st.sampled_from([1.0, 0.3, 3.0, 0.0]), [-0.5, math.nan])
    controls = draw_controls(d)
    categorical = ops.sample_categorical if backend == "native" else ops.sample_categorical_ref
    out = d.check(lambda: categorical(logits, exclude=exclude, barrier=barrier,
                                      temperature=temperature, **controls))  # fmt: skip
    if out is None:
        return
    assert out.shape == (B, L) and out.dtype == torch.int64
    assert bool(((out >= 0) & (out < V)).all())
    drawn = logits.float().gather(-1, out[..., None])[..., 0]
    assert bool((drawn > -math.inf).all()), "drew a token of probability zero"
    if exclude is not None:
        assert not bool((out == exclude).any())
    if exclude is None and (barrier == 0.0 or only_the_maximum(temperature, controls)):
        assert bool((drawn == logits.float().amax(-1)).all())  # only the most probable tokens
        if temperature == 0.0:
            assert torch.equal(out, logits.float().argmax(-1))


# -- fsdfm.sample / generate -------------------------------------------------------------------

MODELS = {}


def tiny(source: str = "uniform", vocab_size: int = 11) -> fsdfm.FSDFMTransformer:
    """A small random student, made once per (source, vocabulary)."""
    key = (source, vocab_size)
    if key not in MODELS:
        torch.manual_seed(0)
        config = fsdfm.ModelConfig(
            vocab_size=vocab_size,
            dim=16,
            n_blocks=1,
            n_heads=1,
            cond_dim=8,
            seq_len=8,
            step_conditioned=True,
            source=source,
        )
        MODELS[key] = fsdfm.FSDFMTransformer(config).eval()
    return MODELS[key]


@given(data=st.data())
def test_sample_fuzz(data):
    source = data.draw(st.sampled_from(["uniform", "mask"]), label="model source")
    model = tiny(source)
    real = 10 if source == "mask" else 11
    d = Draw(data, arguments=12)
    steps = d.arg("steps", st.integers(1, 4), [0, -1, 2.5, True, "2"])
    batch_size = d.arg("batch_size", st.integers(1, 3), [0, 1.5, None])
    seq_len = d.arg("seq_len", st.one_of(st.none(), st.integers(1, 8)), [0, 9, 2.0])
    L = 8 if seq_len is None or d.mistakes else seq_len
    B = batch_size if isinstance(batch_size, int) and batch_size > 0 else 1
    solver = d.arg("solver", st.sampled_from(["cumulative", "euler", "dfm"]), ["Euler", 3])
    temperature = d.arg(
        "temperature", st.one_of(st.floats(0.1, 10), st.just(0.0)), [math.nan, -2.0, 1e-40]
    )
    top_k = d.arg("top_k", st.sampled_from([None, 1, 5]), [-1, "5"])
    top_p = d.arg("top_p", st.sampled_from([None, 0.9]), [0, 2])
    barrier = d.arg("barrier", st.sampled_from([math.inf, 0.0, 1.0]), [-0.5, math.nan])
    other = "mask" if source == "uniform" else "uniform"
    chosen_source = d.arg("source", st.sampled_from([None, source]), [other, "masked"])
    backend = d.arg("backend", st.sampled_from(["auto", "reference"] + ["native"] * NATIVE),
                    ["cuda", None])  # fmt: skip
    fused_head = d.arg("fused_head", st.sampled_from(["auto", False]), ["yes", 1])
    P = data.draw(st.integers(0, L), label="prompt length")
    prompt = None
    if P:
        prompt = torch.randint(0, real, (P,), generator=torch.Generator().manual_seed(P))
    prompt = d.arg("prompt", st.just(prompt),
                   [torch.full((max(P, 1),), real + 3), torch.zeros(B + 1, 2, dtype=torch.long),
                    torch.zeros(max(P, 1)), [1, 2]])  # fmt: skip
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32)))
    kwargs = dict(batch_size=batch_size, seq_len=seq_len, solver=solver, temperature=temperature,
                  top_k=top_k, top_p=top_p, barrier=barrier, source=chosen_source,
                  backend=backend, fused_head=fused_head, prompt=prompt,
                  generator=generator)  # fmt: skip
    out = d.check(lambda: fsdfm.sample(model, steps, **kwargs))
    if out is None:
        return
    assert out.shape == (B, L) and out.dtype == torch.int64
    assert bool(((out >= 0) & (out < real)).all()), "a token out of range (or the mask) survived"
    if prompt is not None and prompt.numel():
        assert torch.equal(out[:, : prompt.shape[-1]], prompt.expand(B, -1))


@given(
    prompt=st.one_of(st.none(), st.text(max_size=6)),
    max_length=st.integers(1, 8),
    n=st.integers(1, 2),
    seed=st.integers(0, 2**64 - 1),
    stop=st.booleans(),
)
def test_generate_fuzz(prompt, max_length, n, seed, stop):
    model, tokenizer = tiny(vocab_size=256), fsdfm.get_tokenizer("byte")
    length = len(prompt.encode()) if prompt else 0
    kw = dict(max_length=max_length, num_return_sequences=n, seed=seed, stop_at_eos=stop, steps=2)
    if length >= max_length:
        with pytest.raises(ValueError, match="leaves no room to generate"):
            fsdfm.generate(model, tokenizer, prompt, **kw)
        return
    texts = fsdfm.generate(model, tokenizer, prompt, **kw)
    assert len(texts) == n and all(t.startswith(prompt or "") for t in texts)
    assert texts == fsdfm.generate(model, tokenizer, prompt, **kw)  # same seed, same texts


# -- load / save ---------------------------------------------------------------------------------


@settings(max_examples=500 if WIDE else 25)
@given(
    vocab=st.integers(2, 40),
    heads=st.integers(1, 2),
    student=st.booleans(),
    source=st.sampled_from(["uniform", "mask"]),
    dtype=st.sampled_from(DTYPES),
    damage=st.one_of(
        st.none(),
        st.tuples(
            st.sampled_from(["config.json", "model.safetensors"]),
            st.sampled_from(["overwrite", "truncate", "append"]),
            st.floats(0, 1),
            st.binary(min_size=1, max_size=8),
        ),
    ),
)
def test_save_load_fuzz(tmp_path_factory, vocab, heads, student, source, dtype, damage):
    config = fsdfm.ModelConfig(
        vocab_size=vocab,
        dim=8 * heads,
        n_blocks=1,
        n_heads=heads,
        cond_dim=8,
        seq_len=8,
        step_conditioned=student,
        source=source,
    )
    model = fsdfm.FSDFMTransformer(config).to(dtype)
    out = fsdfm.save(model, tmp_path_factory.mktemp("fuzz") / "m", tokenizer="byte")
    expected = model.state_dict()
    if damage is not None:
        name, how, where, junk = damage
        file = out / name
        data = file.read_bytes()
        at = int(where * (len(data) - 1))
        if how == "overwrite":
            data = data[:at] + junk + data[at + len(junk) :]
        elif how == "truncate":
            data = data[:at]
        else:
            data = data + junk
        if data == file.read_bytes():
            damage = None
        file.write_bytes(data)
    try:
        loaded = fsdfm.load(out)
    except (ValueError, OSError) as error:
        assert damage is not None, f"an intact model was refused: {error}"
        assert str(out) in str(error) and "\n" not in str(error)
        return
    # Loaded: then it is exactly the saved model (a damaged file that loads would be a miss,
    # except config.json damage that leaves equal JSON, e.g. appended white space).
    assert loaded.config == config
    for key, value in loaded.state_dict().items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    if damage is not None:
        assert damage[0] == "config.json" and json.loads((out / "config.json").read_text())


# -- the CLI ---------------------------------------------------------------------------------------

WORDS = {
    "--steps": ["1", "2", "0", "-3", "x", "1.5"],
    "--length": ["4", "16", "0", "100000", "-1", "a"],
    "-n": ["1", "2", "0", "two"],
    "--seed": ["0", "7", "-1", str(2**64), "s"],
    "--temperature": ["1", "0.5", "0", "nan", "-1", "1e-45", "inf"],
    "--barrier": ["inf", "2", "-1", "nan"],
    "--top-k": ["0", "5", "-1", "x"],
    "--top-p": ["0.9", "1", "0", "1.5"],
    "--min-p": ["0.1", "0", "2"],
    "--solver": ["cumulative", "euler", "dfm", "heun"],
    "--tokenizer": ["gpt2", "byte", "/nonexistent/tokenizer.json"],
    "--model": ["default", "/nonexistent", "fsdfm"],
    "--weights": ["ema", "student", "bogus"],
    "--device": ["cpu", "cuda", "tpu", "cuda:1"],
    "--max-new-tokens": ["3", "0", "x", "100000"],
    "--dtype": ["bf16", "fp32", "fp8"],
}


@settings(max_examples=300 if WIDE else 30)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(sorted(WORDS)).flatmap(
                lambda flag: st.sampled_from(WORDS[flag]).map(lambda v: [flag, v])
            ),
            st.sampled_from(
                [["--stepz"], ["Once upon"], ["--length"], ["--progress"], ["--json"]]
            ).map(list),
        ),
        max_size=4,
    )
)
def test_cli_fuzz(pieces):
    argv = ["sample", "--length", "8", "--steps", "1"] + [w for piece in pieces for w in piece]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    err = stderr.getvalue()
    assert status in (0, 2), (argv, err)
    if status == 2:
        assert err.startswith("fsdfm sample: error: ") and err.count("\n") == 1, (argv, err)
    else:
        assert stdout.getvalue() and "tokens/s" in err, argv
