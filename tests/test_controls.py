"""Sampling controls (top_k, top_p, min_p, temperature=0) in the ops, native and reference, and
through fsdfm.sample: the draws follow the exact filtered laws (chi-square at fixed seeds, the
oracle in laws.py sorts each row in float64), "off" values change nothing, ties are kept, and
the argmax takes the lowest id."""

import math

import pytest
import torch
from laws import jump_law, sample_law
from test_head import tiny_model
from test_ops_laws import DTYPES, IMPLS, assert_law, make_logits

from fsdfm import ops
from fsdfm.solver import sample

CONTROLS = {
    "top_k": {"top_k": 7},
    "top_p": {"top_p": 0.6},
    "top_k+top_p": {"top_k": 20, "top_p": 0.8},
    "min_p": {"min_p": 0.1},
}


def _law_kwargs(control: dict) -> dict:
    """The law's arguments for a control: min_p is the barrier -ln(min_p)."""
    kw = dict(control)
    if "min_p" in kw:
        kw["barrier"] = -math.log(kw.pop("min_p"))
    return kw


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("control", CONTROLS)
def test_sample_categorical_controls_law(device, impl, dtype, strided, control):
    R, rows, V = 4000, 3, 111
    logits = make_logits(R, rows, V, dtype=dtype, device=device, strided=strided, neg_inf=True)
    g = torch.Generator(device).manual_seed(11)
    kw = CONTROLS[control]
    out = IMPLS[impl][1](logits, temperature=0.9, generator=g, **kw)
    law = sample_law(logits[:1].cpu(), temperature=0.9, **_law_kwargs(kw))[0]
    assert_law(out, law)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("control", CONTROLS)
def test_jump_step_controls_law(device, impl, dtype, strided, control):
    """The controls remove destinations: lambda shrinks with them and the jump draws from p
    restricted to the kept tokens other than x_t. Half of the rows start on a kept token, half
    on one the controls remove."""
    R, rows, V = 4000, 4, 111
    logits = make_logits(R, rows, V, dtype=dtype, device=device, strided=strided, neg_inf=True)
    order = logits[0].float().cpu().argsort(-1, descending=True)
    x0 = torch.stack([order[0, 0], order[1, 3], order[2, 60], order[3, 90]])[None]
    x_t = x0.expand(R, rows).contiguous().to(device)
    g = torch.Generator(device).manual_seed(12)
    kw = CONTROLS[control]
    out = IMPLS[impl][0](logits, x_t, 2.5, 0.5, temperature=1.2, generator=g, **kw)
    law = jump_law(logits[:1].cpu(), x0, 2.5, 0.5, temperature=1.2, **_law_kwargs(kw))[0]
    assert_law(out, law)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V", [1, 2, 5])
def test_controls_small_vocabularies(device, impl, V):
    """top_k >= V and V = 1: nothing to remove; top_k = 1 on V = 2 keeps the larger."""
    R, rows = 3000, 3
    logits = make_logits(R, rows, V, dtype=torch.float32, device=device, strided=True, neg_inf=True)
    for kw in ({"top_k": 1}, {"top_k": V}, {"top_k": 2, "top_p": 0.3}):
        g = torch.Generator(device).manual_seed(13)
        out = IMPLS[impl][1](logits, generator=g, **kw)
        assert_law(out, sample_law(logits[:1].cpu(), **kw)[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_top_p_gpt2_vocabulary(device, impl):
    """V = 50257, unaligned rows: top-p over a realistic vocabulary, with top-k too."""
    R, rows, V = 400, 2, 50257
    g = torch.Generator().manual_seed(14)
    base = torch.randn(1, rows, V, generator=g) * 3.0
    base[..., :40] += 9.0  # a head of about 40 likely tokens over a long tail
    logits = base.expand(R, rows, V).contiguous().to(device)
    for kw in ({"top_p": 0.9}, {"top_k": 30, "top_p": 0.95}):
        out = IMPLS[impl][1](logits, generator=torch.Generator(device).manual_seed(15), **kw)
        assert_law(out, sample_law(logits[:1].cpu(), **kw)[0])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ["ascending", "descending", "ties", "one_value"])
def test_controls_on_awkward_rows(device, impl, shape):
    """Rows that defeat naive pivots or carry many equal values: the floor stays exact, and
    every token tied with the k-th largest is kept (transformers keeps them too)."""
    R, V = 3000, 301
    if shape == "ascending":
        row = torch.linspace(-6, 6, V)
    elif shape == "descending":
        row = torch.linspace(6, -6, V)
    elif shape == "ties":
        row = (torch.randn(V, generator=torch.Generator().manual_seed(16)) * 2).round() / 2
    else:
        row = torch.zeros(V)
    logits = row.expand(R, 1, V).contiguous().to(device)
    # top_p = 0.999 reaches into the tail, which the CPU kernel prunes by a mass bound.
    for kw in ({"top_k": 10}, {"top_p": 0.5}, {"top_k": 150, "top_p": 0.99}, {"top_p": 0.999}):
        g = torch.Generator(device).manual_seed(17)
        out = IMPLS[impl][1](logits, generator=g, **kw)
        law = sample_law(logits[:1].cpu(), **kw)[0]
        if shape == "ties" and "top_k" in kw and "top_p" not in kw:
            kth = row.sort(descending=True).values[kw["top_k"] - 1]
            assert int((law[0] > 0).sum()) == int((row >= kth).sum()) > kw["top_k"]
        assert_law(out, law)


@pytest.mark.parametrize("impl", IMPLS)
def test_excluded_token_is_not_counted(device, impl):
    """With the mask source's exclusion the floor is taken over p without the mask: top_k = 1
    keeps the best real token, even when the mask is the row's maximum."""
    R, V = 500, 9
    logits = torch.randn(1, 2, V, generator=torch.Generator().manual_seed(18)).expand(R, 2, V)
    logits = logits.contiguous().to(device)
    logits[..., V - 1] = 20.0
    out = IMPLS[impl][1](logits, exclude=V - 1, top_k=1, generator=torch.Generator(device))
    assert torch.equal(out, logits[..., : V - 1].argmax(-1))


@pytest.mark.parametrize("impl", IMPLS)
def test_off_values_change_nothing(device, impl):
    """top_k = 0 or >= V, top_p = 1, min_p = 0: the same tokens as without them, seed for
    seed; min_p is the barrier -ln(min_p), draw for draw."""
    logits = make_logits(64, 3, 50, dtype=torch.float32, device=device, strided=False, neg_inf=True)
    x_t = torch.randint(0, 50, (64, 3), generator=torch.Generator().manual_seed(19)).to(device)
    jump, draw = IMPLS[impl]

    def run(**kw):
        g = torch.Generator(device).manual_seed(20)
        return jump(logits, x_t, 3.0, 0.5, generator=g, **kw), draw(logits, generator=g, **kw)

    plain = run()
    for kw in ({"top_k": 0}, {"top_k": 50}, {"top_k": 500}, {"top_p": 1.0}, {"min_p": 0.0}):
        for got, want in zip(run(**kw), plain, strict=True):
            assert torch.equal(got, want), kw
    for got, want in zip(run(min_p=0.2), run(barrier=-math.log(0.2)), strict=True):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# temperature = 0: the argmax.


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_temperature_zero_takes_the_lowest_argmax(device, impl, dtype):
    R, V = 8, 1000
    logits = torch.randn(R, 4, V, generator=torch.Generator().manual_seed(21)).to(dtype)
    logits[:, 0, [5, 700]] = 40.0  # a tie: the lowest id wins
    logits[:, 1, :] = -math.inf
    logits[:, 1, 999] = 0.0  # the only finite logit, last
    logits[:, 2, 3] = 40.0  # the excluded token below, also the maximum
    logits = logits.to(device)
    out = IMPLS[impl][1](logits, temperature=0, exclude=3, generator=torch.Generator(device))
    want = logits.float().masked_fill(torch.arange(V, device=device) == 3, -math.inf).argmax(-1)
    assert torch.equal(out, want)
    assert (out[:, 0] == 5).all() and (out[:, 1] == 999).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_temperature_zero_jump_law(device, impl):
    """P(jump) = 1 - exp(-h max(rate, 0)) to the argmax unless x_t is the argmax (then never)."""
    R, V = 6000, 33
    logits = torch.randn(1, 3, V, generator=torch.Generator().manual_seed(22))
    logits = logits.expand(R, 3, V).contiguous().to(device)
    best = logits[0].argmax(-1).cpu()
    x0 = torch.stack([best[0], (best[1] + 1) % V, (best[2] + 2) % V])[None]
    x_t = x0.expand(R, 3).contiguous().to(device)
    out = IMPLS[impl][0](logits, x_t, 1.5, 0.6, temperature=0, generator=torch.Generator(device))
    law = torch.zeros(3, V, dtype=torch.float64)
    p = 1 - math.exp(-0.9)
    law[0, best[0]] = 1.0
    for r in (1, 2):
        law[r, best[r]] = p
        law[r, x0[0, r]] = 1 - p
    assert_law(out, law)


@pytest.mark.parametrize("impl", IMPLS)
def test_temperature_zero_bad_rows(device, impl):
    """NaN, +inf and all -inf rows are refused at temperature 0 as at any other; so is a row
    with nothing left after the exclusion."""
    logits = torch.randn(1, 4, 6)
    logits[0, 1, 2] = math.nan
    logits[0, 2, 0] = math.inf
    logits[0, 3] = -math.inf
    _, draw = IMPLS[impl]
    for row, what in ((1, "NaN"), (2, r"\+inf"), (3, "-inf everywhere")):
        with pytest.raises(ops.InvalidRowsError, match=what):
            draw(logits[:, [0, row]].to(device), temperature=0)
    only = torch.full((1, 1, 4), -math.inf)
    only[..., 2] = 1.0
    with pytest.raises(ops.InvalidRowsError, match="no token to draw"):
        draw(only.to(device), temperature=0, exclude=2)


# ---------------------------------------------------------------------------------------------
# Mistakes and the sampler.


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 2.0}, "min_p"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_control_mistakes_are_named(kw, name):
    logits = torch.randn(1, 2, 5)
    for fn in (ops.sample_categorical, ops.sample_categorical_ref):
        with pytest.raises(ValueError, match=f"^{name} must"):
            fn(logits, **kw)


class FixedLogits:
    """A bare model whose logits do not depend on x: p is known at every step."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, x, t, h):
        return self.logits.expand(x.shape[0], -1, -1)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("solver", ["cumulative", "euler", "dfm"])
def test_sample_greedy_and_filtered(backend, solver):
    """temperature=0 ends on the argmax everywhere, whatever the seed; top_k = 2 never ends on
    a token outside each position's two most likely."""
    L, V = 16, 40
    logits = torch.randn(1, L, V, generator=torch.Generator().manual_seed(23))
    model = FixedLogits(logits)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        out = sample(model, 4, batch_size=3, seq_len=L, vocab_size=V, solver=solver,
                     temperature=0, generator=g, backend=backend)  # fmt: skip
        assert torch.equal(out, logits.argmax(-1).expand(3, L))
    out = sample(model, 4, batch_size=64, seq_len=L, vocab_size=V, solver=solver, top_k=2,
                 generator=torch.Generator().manual_seed(2), backend=backend)  # fmt: skip
    top2 = logits[0].topk(2, -1).indices
    assert ((out[..., None] == top2).any(-1)).all()


def test_fused_head_and_whole_row_controls():
    """The fused head makes a row a tile at a time: "auto" takes the logits path for top_k /
    top_p / temperature 0, and True refuses them by name."""
    model = tiny_model()
    for kw in ({"top_k": 3}, {"top_p": 0.5}, {"temperature": 0}):
        out = sample(model, 2, generator=torch.Generator().manual_seed(0), **kw)
        assert out.shape == (1, model.config.seq_len)
        with pytest.raises(ValueError, match="fused_head=True cannot apply top_k"):
            sample(model, 2, fused_head=True, **kw)
