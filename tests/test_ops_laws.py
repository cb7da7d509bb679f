"""The sampling ops draw from the exact laws of SPEC 2 (chi-square at fixed seeds), native and
reference alike, on awkward inputs: odd V, V = 1, strided views, -inf logits, every dtype,
finite and infinite barrier, temperature != 1."""

import math

import pytest
import torch
from laws import chisquare_rows, jump_law, sample_law

from fsdfm import ops

P_MIN = 1e-4  # the tests run at fixed seeds; a wrong law gives p-values near 0
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_logits(R, rows, V, *, dtype, device, strided, neg_inf, scale=2.0, seed=0):
    """[R, rows, V] logits, the same `rows` laws repeated R times along the batch.

    strided: a view whose rows are neither contiguous nor 16-byte aligned (row stride V + 3,
    every second position). neg_inf: about a quarter of the tokens get -inf (never a whole row).
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, rows, V, generator=g) * scale
    if neg_inf and V > 1:
        mask = torch.rand(1, rows, V, generator=g) < 0.25
        mask[..., 0] = False
        base = base.masked_fill(mask, -math.inf)
    base = base.to(dtype).expand(R, rows, V)
    if not strided:
        return base.contiguous().to(device)
    holder = torch.zeros(R, 2 * rows, V + 3, dtype=dtype)
    holder[:, ::2, 1 : V + 1] = base
    view = holder.to(device)[:, ::2, 1 : V + 1]
    assert not view.is_contiguous()
    return view


def draws(fn, logits, R, **kw):
    out = fn(logits, **kw)
    assert out.shape == logits.shape[:2] and out.dtype == torch.int64
    return out  # [R, rows]: R draws of each row's law


def assert_law(samples, law):
    p, stat, dof = chisquare_rows(samples, law)
    assert p > P_MIN, f"chi-square p = {p:.2e} (statistic {stat:.1f}, {dof} dof)"


IMPLS = {
    "native": (ops.jump_step, ops.sample_categorical),
    "ref": (ops.jump_step_ref, ops.sample_categorical_ref),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 2, 111])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("barrier", [math.inf, 1.5])
def test_jump_step_law(device, impl, dtype, V, strided, barrier):
    R, rows = 4000, 3
    logits = make_logits(R, rows, V, dtype=dtype, device=device, strided=strided, neg_inf=True)
    g = torch.Generator(device).manual_seed(1)
    x0 = torch.randint(0, V, (1, rows), generator=torch.Generator().manual_seed(2))
    x_t = x0.expand(R, rows).contiguous().to(device)
    rate = torch.full((R,), 1.7, device=device)
    h = 0.4
    out = draws(
        IMPLS[impl][0],
        logits,
        R,
        x_t=x_t,
        rate_scale=rate,
        h=h,
        barrier=barrier,
        temperature=0.8,
        generator=g,
    )
    law = jump_law(logits[:1].cpu(), x0, 1.7, h, barrier=barrier, temperature=0.8)[0]
    assert_law(out, law)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 2, 111])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("barrier", [math.inf, 2.0])
def test_sample_categorical_law(device, impl, dtype, V, strided, barrier):
    R, rows = 4000, 3
    logits = make_logits(R, rows, V, dtype=dtype, device=device, strided=strided, neg_inf=True)
    g = torch.Generator(device).manual_seed(3)
    out = draws(IMPLS[impl][1], logits, R, barrier=barrier, temperature=1.3, generator=g)
    law = sample_law(logits[:1].cpu(), barrier=barrier, temperature=1.3)[0]
    assert_law(out, law)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("exclude", ["token", "tensor"])
def test_sample_categorical_exclude_law(device, impl, exclude):
    R, rows, V = 4000, 4, 37
    logits = make_logits(
        R, rows, V, dtype=torch.float32, device=device, strided=False, neg_inf=False
    )
    if exclude == "token":
        # The mask token of a mask-source model: the last id, here the most likely one too.
        logits[..., V - 1] = 5.0
        ex, ex_law = V - 1, V - 1
    else:
        ex_law = torch.randint(0, V, (1, rows), generator=torch.Generator().manual_seed(4))
        ex = ex_law.expand(R, rows).contiguous().to(device)
    g = torch.Generator(device).manual_seed(5)
    out = draws(IMPLS[impl][1], logits, R, exclude=ex, generator=g)
    assert_law(out, sample_law(logits[:1].cpu(), exclude=ex_law)[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_jump_step_law_gpt2_vocabulary(device, impl):
    """V = 50257 (odd, unaligned rows), several laws, per-sequence rate and step."""
    R, rows, V = 300, 2, 50257
    logits = make_logits(R, rows, V, dtype=torch.float32, device=device, strided=True, neg_inf=True)
    x0 = torch.randint(0, V, (1, rows), generator=torch.Generator().manual_seed(6))
    # Make the current token likely so that the stay probability is far from 0 and 1.
    logits[:, torch.arange(rows), x0[0]] = 14.0
    x_t = x0.expand(R, rows).contiguous().to(device)
    g = torch.Generator(device).manual_seed(7)
    out = IMPLS[impl][0](logits, x_t, 2.0, 0.5, generator=g)
    law = jump_law(logits[:1].cpu(), x0, 2.0, 0.5)[0]
    assert 0.05 < law[torch.arange(rows), x0[0]].min() < 0.95
    assert_law(out, law)


def test_jump_step_per_sequence_scalars(device):
    """rate_scale and h as [B] tensors: each sequence uses its own (clipped) rate."""
    R, V = 3000, 5
    logits = make_logits(1, 1, V, dtype=torch.float32, device=device, strided=False, neg_inf=False)
    B = 3 * R
    rows = logits.expand(B, 1, V).contiguous()
    x_t = torch.zeros(B, 1, dtype=torch.long, device=device)
    rate = torch.tensor([0.3, 2.5, -1.0], device=device).repeat_interleave(R)
    h = torch.tensor([1.0, 0.25, 1.0], device=device).repeat_interleave(R)
    out = ops.jump_step(rows, x_t, rate, h, generator=torch.Generator(device).manual_seed(8))
    for k, (r, hh) in enumerate([(0.3, 1.0), (2.5, 0.25), (-1.0, 1.0)]):
        part = out[k * R : (k + 1) * R]
        law = jump_law(logits.cpu(), torch.zeros(1, 1, dtype=torch.long), r, hh)[0]
        assert_law(part, law)
    assert bool((out[2 * R :] == 0).all()), "a negative rate is clipped to zero: nothing jumps"


def test_tail_mass(device):
    """Many individually tiny tokens (p ~ 8e-7 each, 10% together) are drawn at their true
    total rate; truncated noise (a float32 Gumbel or uniform) shaves such tails."""
    R, V = 1500, 1 << 17
    logits = torch.full((R, 1, V), -14.0, device=device)
    logits[..., 0] = 0.0
    out = ops.sample_categorical(logits, generator=torch.Generator(device).manual_seed(9))
    tail = float((out != 0).double().mean())
    p_tail = sample_law(logits[:1].cpu())[0, 0, 1:].sum().item()
    sd = math.sqrt(p_tail * (1 - p_tail) / R)
    assert abs(tail - p_tail) < 4.5 * sd, (tail, p_tail, sd)


def test_chisquare_has_power():
    """The law check rejects draws from a slightly different law (guards the guard)."""
    R, V = 4000, 6
    logits = make_logits(R, 1, V, dtype=torch.float32, device="cpu", strided=False, neg_inf=False)
    out = ops.sample_categorical(logits, generator=torch.Generator().manual_seed(10))
    law = sample_law(logits[:1])[0]
    wrong = sample_law(logits[:1], temperature=1.15)[0]
    assert chisquare_rows(out, law)[0] > P_MIN
    assert chisquare_rows(out, wrong)[0] < 1e-6
    with pytest.raises(AssertionError, match="zero-probability"):
        chisquare_rows(out, torch.nn.functional.one_hot(out[:1], V).double()[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_sample_categorical_law_gpt2_vocabulary(device, impl):
    """V = 50257 with the mask-style exclusion of the last id and a finite barrier."""
    R, rows, V = 300, 2, 50257
    logits = make_logits(
        R, rows, V, dtype=torch.bfloat16, device=device, strided=True, neg_inf=True, scale=3.0
    )
    g = torch.Generator(device).manual_seed(11)
    out = IMPLS[impl][1](logits, exclude=V - 1, barrier=8.0, generator=g)
    assert_law(out, sample_law(logits[:1].cpu(), exclude=V - 1, barrier=8.0)[0])


def test_vocabulary_of_2_to_the_20(device):
    """The largest vocabulary the kernels promise: the draw lands on the planted tokens."""
    V = 1 << 20
    logits = torch.full((2, 2, V), -30.0, device=device)
    logits[..., V - 2] = 5.0
    logits[..., 12345] = 5.0
    g = torch.Generator(device).manual_seed(12)
    out = ops.sample_categorical(logits, barrier=1.0, generator=g)
    assert bool(((out == V - 2) | (out == 12345)).all())
    x_t = torch.full((2, 2), 12345, device=device)
    assert bool((ops.jump_step(logits, x_t, 1e9, 1.0, barrier=1.0, generator=g) == V - 2).all())
