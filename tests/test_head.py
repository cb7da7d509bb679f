"""The fused head (fsdfm.head) draws from the law of the unfused ops on
F.linear(hidden, weight, bias), native and reference, on awkward shapes (V = 1, odd V, V one past
a vocabulary tile, no bias), every dtype, finite barrier, temperature, exclusion, -inf logits and
rows that cannot be sampled; opcheck, torch.compile, thread counts; and fsdfm.sample with it."""

import math

import pytest
import torch
import torch.nn.functional as F
from laws import chisquare_rows, jump_law, sample_law
from scipy.stats import chi2_contingency

import fsdfm
from fsdfm import head, ops

P_MIN = 1e-4
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = {
    "native": (head.head_jump_step, head.head_sample_categorical),
    "ref": (head.head_jump_step_ref, head.head_sample_categorical_ref),
}
TILE = 2048  # the CPU kernel's vocabulary tile (csrc/cpu/head_cpu.cpp)


def make_head(R, rows, V, d=19, *, dtype=torch.float32, device="cpu", bias=True, neg_inf=False,
              seed=0):  # fmt: skip
    """hidden [R, rows, d] (the same `rows` states repeated R times), weight [V, d], bias [V]:
    logits of scale ~2; with neg_inf about a quarter of the tokens get a -inf bias."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, rows, d, generator=g).expand(R, rows, d)
    weight = torch.randn(V, d, generator=g) * (2 / math.sqrt(d))
    b = torch.randn(V, generator=g) * 0.5 if bias or neg_inf else None
    if neg_inf and V > 1:
        mask = torch.rand(V, generator=g) < 0.25
        mask[0] = False
        b = b.masked_fill(mask, -math.inf)
    cast = [
        t.to(dtype=dtype, device=device) if t is not None else None for t in (hidden, weight, b)
    ]
    cast[0] = cast[0].contiguous()
    return cast


def logits_of(hidden, weight, bias):
    """The unfused logits of the first copy, in the inputs' dtype (as the model makes them)."""
    return F.linear(hidden[:1], weight, bias).cpu()


def assert_law(samples, law):
    p, stat, dof = chisquare_rows(samples, law)
    assert p > P_MIN, f"chi-square p = {p:.2e} (statistic {stat:.1f}, {dof} dof)"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 2, 111, TILE + 1])
@pytest.mark.parametrize("barrier", [math.inf, 1.5])
def test_jump_law(device, impl, dtype, V, barrier):
    if impl == "ref" and V > 200:
        pytest.skip("the reference materialises [R, rows, V]")
    R, rows = 3000, 3
    hidden, weight, bias = make_head(R, rows, V, dtype=dtype, device=device, neg_inf=V > 2)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randint(0, V, (1, rows), generator=g).expand(R, rows).contiguous().to(device)
    rate = torch.tensor([2.0, 0.7, 5.0])[:1].expand(R).to(device)  # per-sequence scalars
    gen = torch.Generator(device).manual_seed(2)
    out = IMPLS[impl][0](hidden, weight, bias, x_t, rate, 0.3, barrier=barrier,
                         temperature=0.8, generator=gen)  # fmt: skip
    assert out.shape == (R, rows) and out.dtype == torch.int64
    law = jump_law(logits_of(hidden, weight, bias), x_t[:1].cpu(), 2.0, 0.3, barrier=barrier,
                   temperature=0.8)  # fmt: skip
    assert_law(out.cpu(), law[0])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [2, 111, TILE + 1, 2 * TILE + 333])
@pytest.mark.parametrize("exclude", [None, 1])
def test_sample_law(device, impl, dtype, V, exclude):
    if impl == "ref" and V > 200:
        pytest.skip("the reference materialises [R, rows, V]")
    R, rows = 3000, 2
    hidden, weight, bias = make_head(R, rows, V, dtype=dtype, device=device, neg_inf=True,
                                     bias=exclude is None)  # fmt: skip
    gen = torch.Generator(device).manual_seed(3)
    out = IMPLS[impl][1](hidden, weight, bias, exclude=exclude, temperature=1.3, generator=gen)
    law = sample_law(logits_of(hidden, weight, bias), exclude=exclude, temperature=1.3)
    assert_law(out.cpu(), law[0])


def test_tiles_merge_exactly_when_one_tile_holds_almost_everything(device):
    """A token far beyond the first tile that dominates the row, and a tiny mass spread over
    the others: the merge probabilities tile-mass / mass-so-far stay exact in float64."""
    R, V, d = 4000, 3 * TILE + 5, 4
    hidden = torch.ones(R, 1, d, device=device)
    weight = torch.zeros(V, d, device=device)
    bias = torch.full((V,), -30.0, device=device)
    bias[2 * TILE + 7] = 0.0
    bias[3] = -1.0
    gen = torch.Generator(device).manual_seed(4)
    out = head.head_sample_categorical(hidden, weight, bias, generator=gen)
    law = sample_law(logits_of(hidden, weight, bias))
    assert_law(out.cpu(), law[0])


def test_invalid_rows_are_reported(device):
    hidden, weight, bias = make_head(2, 3, 50, device=device)
    hidden = hidden.clone()
    hidden[1, 2, 0] = math.nan
    with pytest.raises(ops.InvalidRowsError, match=r"logits of hidden\[1, 2\]\[0, 0\] holds NaN"):
        head.head_sample_categorical(hidden, weight, bias)
    out = head.head_sample_categorical(hidden, weight, bias, validate=False)
    assert out[1, 2] == -1 and bool((out.flatten()[:-1] >= 0).all())
    dead = torch.full((50,), -math.inf, device=device)
    with pytest.raises(ops.InvalidRowsError, match="-inf everywhere"):
        head.head_sample_categorical(hidden[:1, :1], weight, dead)
    one = make_head(1, 1, 1, device=device)
    with pytest.raises(ops.InvalidRowsError, match="leaves no token"):
        head.head_sample_categorical(*one, exclude=0)
    x_t = torch.zeros(1, 1, dtype=torch.long, device=device)
    assert head.head_jump_step(*one, x_t, 3.0, 1.0).item() == 0, "V = 1: nowhere to go"


def test_errors_name_the_argument():
    hidden, weight, bias = make_head(2, 3, 10)
    x_t = torch.zeros(2, 3, dtype=torch.long)
    cases = [
        (lambda: head.head_sample_categorical(hidden[0], weight), ValueError, "hidden must have"),
        (lambda: head.head_sample_categorical(hidden, weight[:, :3]), ValueError, "weight must"),
        (lambda: head.head_sample_categorical(hidden, weight.double()), TypeError, "weight is"),
        (lambda: head.head_sample_categorical(hidden, weight, bias[:3]), ValueError, "bias must"),
        (lambda: head.head_sample_categorical(hidden, weight, exclude=10), ValueError, "exclude"),
        (lambda: head.head_jump_step(hidden, weight, bias, x_t[:1], 1.0, 1.0), ValueError, "x_t"),
        (lambda: head.head_jump_step(hidden, weight, bias, x_t, 1.0, -1.0), ValueError, "h must"),
        (lambda: head.head_jump_step(hidden, weight, bias, x_t + 10, 1.0, 1.0), ValueError,
         "x_t holds token id 10"),
    ]  # fmt: skip
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_tokens_do_not_depend_on_thread_count():
    hidden, weight, bias = make_head(4, 40, 2 * TILE + 9, neg_inf=True)
    x_t = torch.randint(0, 2 * TILE + 9, (4, 40), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            seeded = {"generator": torch.Generator().manual_seed(5), "barrier": 4.0}
            jumped = head.head_jump_step(hidden, weight, bias, x_t, 2.0, 0.5, **seeded)
            results.append((jumped, head.head_sample_categorical(hidden, weight, bias, **seeded)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_opcheck_and_compile(device):
    hidden, weight, bias = make_head(2, 5, 300, device=device)
    x_t = torch.randint(0, 300, (2, 5), device=device)
    rate = torch.tensor([1.0, 2.0], device=device)
    h = torch.tensor([0.5, 0.25], device=device)
    gen = torch.Generator(device).manual_seed(0)
    # the aot test would compare the draws of two calls, which take different noise
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fsdfm.head_jump_step,
                          (hidden, weight, bias, x_t, rate, h, math.inf, 1.0, gen),
                          test_utils=tests)  # fmt: skip
    torch.library.opcheck(torch.ops.fsdfm.head_sample_categorical,
                          (hidden, weight, None, -1, 2.0, 0.5, None), test_utils=tests)  # fmt: skip

    def step(hidden, x_t):
        x = torch.ops.fsdfm.head_jump_step(hidden, weight, bias, x_t, rate, h, math.inf, 1.0, None)
        return torch.ops.fsdfm.head_sample_categorical(hidden, weight, bias, -1, 3.0, 1.0, None), x

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    torch.manual_seed(0)
    eager = step(hidden, x_t)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(compiled(hidden, x_t), eager, strict=True))


# ---------------------------------------------------------------------------------------------
# fsdfm.sample with the fused head


def tiny_model(source="uniform", V=13):
    config = fsdfm.ModelConfig(
        vocab_size=V + (source == "mask"), dim=32, n_blocks=1, n_heads=1, cond_dim=16, seq_len=3,
        source=source, step_conditioned=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = fsdfm.FSDFMTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        model.output_layer.linear.weight.normal_(0, 0.5)  # logits of scale ~1: every token seen
    return model


def test_head_inputs_give_the_models_logits():
    model = tiny_model()
    x = torch.randint(0, 13, (4, 3))
    hidden, weight, bias = model.head_inputs(x, 0.4, 0.25)
    assert hidden.shape == (4, 3, 32) and weight.shape == (13, 32) and bias.shape == (13,)
    assert torch.equal(F.linear(hidden, weight, bias), model(x, 0.4, 0.25))


@pytest.mark.parametrize("source", ["uniform", "mask"])
@pytest.mark.parametrize("solver", ["cumulative", "euler", "dfm"])
def test_sample_with_the_fused_head_follows_the_same_law(source, solver):
    """Two samplers of one law: the token counts per position of fused and unfused samples
    are homogeneous (chi-square contingency), and an empty contingency would be a failure."""
    model = tiny_model(source)
    n = 4000
    runs = {}
    for fused in (True, False):
        gen = torch.Generator().manual_seed(10 + fused)
        runs[fused] = fsdfm.sample(model, 3, batch_size=n, solver=solver, generator=gen,
                                   fused_head=fused)  # fmt: skip
    assert not torch.equal(runs[True], runs[False]), "the fused head takes its own noise"
    for pos in range(3):
        counts = torch.stack(
            [torch.bincount(runs[f][:, pos], minlength=13)[:13] for f in (True, False)]
        )
        counts = counts[:, counts.sum(0) > 0]
        assert counts.shape[1] > 3
        assert chi2_contingency(counts.numpy()).pvalue > P_MIN


def test_fused_head_is_chosen_and_refused_as_asked(monkeypatch):
    model = tiny_model()
    calls = []
    monkeypatch.setattr(head, "jump", lambda *a, **k: calls.append("head") or a[4])
    fsdfm.sample(model, 2, batch_size=2, fused_head="auto")
    assert calls, "auto uses the fused head for an fsdfm model with the native kernels"
    calls.clear()
    fsdfm.sample(model, 2, batch_size=2, fused_head=False)
    fsdfm.sample(model, 2, batch_size=2, backend="reference")
    assert not calls
    with pytest.raises(ValueError, match="needs an fsdfm model"):
        fsdfm.sample(lambda x, t, h: model(x, t, h), 2, seq_len=3, fused_head=True)
    with pytest.raises(ValueError, match="fused_head must be"):
        fsdfm.sample(model, 2, fused_head="yes")
