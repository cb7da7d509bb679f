"""The ops' contract besides their laws: the explicit generator against its reference, seeds,
edge cases, errors that name the argument, opcheck and torch.compile."""

import math
import sys

import pytest
import torch

from fsdfm import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_native_is_built():
    assert ops.native_available(), "fsdfm._C did not import: build with setup.py build_ext"
    assert ops.native_available("cpu")


def random_probs(B, L, V, *, dtype, device, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g) * 2
    logits[torch.rand(B, L, V, generator=g) < 0.2] = -math.inf
    logits[..., 0] = 0.0
    p = torch.softmax(logits, -1).to(dtype)
    if strided:
        holder = torch.zeros(B, L, 2 * V + 1, dtype=dtype)
        holder[..., 1::2] = p
        return holder.to(device)[..., 1::2]  # non-unit stride along V
    return p.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 2, 111, 50257])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("barrier", [math.inf, 0.0, 1.0, 4.0])
def test_probs_to_generator_matches_reference(device, dtype, V, strided, barrier):
    B, L = (2, 3) if V < 50257 else (1, 2)
    p = random_probs(B, L, V, dtype=dtype, device=device, strided=strided)
    x_t = torch.randint(0, V, (B, L), device=device)
    rate = torch.tensor([1.5, -0.5], device=device)[:B]
    out = ops.probs_to_generator(p, x_t, rate, barrier=barrier)
    ref = ops.probs_to_generator_ref(p, x_t, rate, barrier=barrier)
    assert out.dtype == dtype and out.shape == (B, L, V) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert bool((out >= 0).all())
    assert bool((out.gather(-1, x_t[..., None]) == 0).all())
    if B == 2:
        assert bool((out[1] == 0).all()), "a negative rate_scale is clipped to zero rates"


def test_probs_to_generator_formula():
    """u(x) = max(r (p(x) - delta_z(x)), 0): the explicit formula on a hand-made row."""
    p = torch.tensor([[[0.1, 0.6, 0.3]]])
    out = ops.probs_to_generator(p, torch.tensor([[1]]), 2.0)
    torch.testing.assert_close(out, torch.tensor([[[0.2, 0.0, 0.6]]]))
    # barrier ln 4: reachable iff p >= 0.6 / 4 = 0.15, so 0.1 is cut.
    out = ops.probs_to_generator(p, torch.tensor([[1]]), 2.0, barrier=math.log(4))
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.0, 0.6]]]))


@pytest.mark.parametrize("op", ["jump_step", "sample_categorical"])
def test_same_seed_same_tokens(device, op):
    B, L, V = 3, 17, 1001
    logits = torch.randn(B, L, V, device=device)
    x_t = torch.randint(0, V, (B, L), device=device)
    args = (logits, x_t, 3.0, 0.5) if op == "jump_step" else (logits,)
    fn = getattr(ops, op)
    a = fn(*args, generator=torch.Generator(device).manual_seed(11))
    b = fn(*args, generator=torch.Generator(device).manual_seed(11))
    c = fn(*args, generator=torch.Generator(device).manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(5)
    d = fn(*args)
    torch.manual_seed(5)
    assert torch.equal(d, fn(*args)), "the default generator is honoured"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP build on Linux")
def test_cpu_kernels_run_on_openmp_threads():
    """Without -fopenmp at::parallel_for runs every row on the calling thread, and the test
    below would pass trivially."""
    from fsdfm import _C

    assert _C.openmp_version() >= 201511


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokens_do_not_depend_on_thread_count(dtype):
    """Counter-based noise per row: the draws are the same with 1, 2 and 4 threads."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 64, 3001, generator=g) * 2).to(dtype)
    x_t = torch.randint(0, 3001, (4, 64), generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            seeded = {"generator": torch.Generator().manual_seed(0)}
            results.append(
                (
                    ops.jump_step(logits, x_t, 2.0, 0.5, **seeded),
                    ops.sample_categorical(logits, **seeded),
                    ops.probs_to_generator(logits.float().softmax(-1), x_t, 2.0),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_edge_rows(device):
    # V = 1: the only token is the current one, so it stays; sampling without exclusion gives 0.
    one = torch.zeros(2, 3, 1, device=device)
    zeros = torch.zeros(2, 3, dtype=torch.long, device=device)
    assert torch.equal(ops.jump_step(one, zeros, 10.0, 1.0), zeros)
    assert torch.equal(ops.sample_categorical(one), zeros)
    # A single finite logit: sampling must return it; a jump must land on it or stay.
    logits = torch.full((2, 3, 9), -math.inf, device=device)
    logits[..., 4] = 0.0
    assert bool((ops.sample_categorical(logits) == 4).all())
    stay_put = torch.full((2, 3), 4, dtype=torch.long, device=device)
    assert torch.equal(ops.jump_step(logits, stay_put, 5.0, 1.0), stay_put)
    # An infinite rate with h > 0 always jumps; the only other reachable token is certain.
    two = torch.tensor([[[0.0, 0.0, -math.inf]]], device=device)
    z = torch.zeros(1, 1, dtype=torch.long, device=device)
    assert int(ops.jump_step(two, z, math.inf, 1.0)) == 1
    assert int(ops.jump_step(two, z, 5.0, 0.0)) == 0, "h = 0 never jumps"
    # barrier 0 keeps only the maximisers: a jump can only go to the other maximiser.
    tie = torch.tensor([[[1.0, 3.0, 3.0, 2.9]]], device=device)
    for seed in range(5):
        g = torch.Generator(device).manual_seed(seed)
        assert int(ops.sample_categorical(tie, barrier=0.0, exclude=2, generator=g)) == 1
        assert int(ops.jump_step(tie, z + 1, 1e6, 1.0, barrier=0.0, generator=g)) == 2


def test_invalid_rows_raise(device):
    logits = torch.randn(2, 3, 5, device=device)
    x_t = torch.zeros(2, 3, dtype=torch.long, device=device)
    for value, what in [(math.nan, "NaN"), (math.inf, r"\+inf")]:
        bad = logits.clone()
        bad[1, 2, 3] = value
        for call in (
            lambda b=bad: ops.jump_step(b, x_t, 1.0, 0.5),
            lambda b=bad: ops.sample_categorical(b),
            lambda b=bad: ops.jump_step_ref(b, x_t, 1.0, 0.5),
            lambda b=bad: ops.sample_categorical_ref(b),
        ):
            with pytest.raises(ValueError, match=rf"logits\[1, 2\] holds {what}"):
                call()
    dead = logits.clone()
    dead[0, 1] = -math.inf
    with pytest.raises(ValueError, match=r"logits\[0, 1\] is -inf everywhere"):
        ops.jump_step(dead, x_t, 1.0, 0.5)
    with pytest.raises(ValueError, match=r"logits\[0, 1\] is -inf everywhere"):
        ops.sample_categorical_ref(dead)
    one = torch.zeros(1, 1, 1, device=device)
    for fn in (ops.sample_categorical, ops.sample_categorical_ref):
        with pytest.raises(ValueError, match="no token to draw"):
            fn(one, exclude=0)
    # Without validation the kernels report such rows as -1 and never read out of bounds.
    out = ops.jump_step(dead, x_t, 1.0, 0.5, validate=False)
    assert int(out[0, 1]) == -1 and bool((out[1] >= 0).all())
    out = torch.ops.fsdfm.jump_step(
        logits,
        x_t + 7,
        torch.ones(2, device=device),
        torch.ones(2, device=device),
        math.inf,
        1.0,
        0,
        1.0,
        None,
    )
    assert bool((out == -1).all()), "token ids out of range give -1 rows"
    out = torch.ops.fsdfm.sample_categorical(logits, x_t - 1, -1, math.inf, 1.0, 0, 1.0, None)
    assert bool((out == -1).all()), "in an exclude tensor -1 is out of range, not 'none'"


def test_argument_errors(device):
    logits = torch.randn(2, 3, 5, device=device)
    x_t = torch.zeros(2, 3, dtype=torch.long, device=device)
    cases = [
        (lambda: ops.jump_step(logits[0], x_t, 1.0, 0.5), ValueError, "logits must have shape"),
        (
            lambda: ops.jump_step(logits.double(), x_t, 1.0, 0.5),
            TypeError,
            "logits must be float32",
        ),
        (lambda: ops.jump_step(logits, x_t.int(), 1.0, 0.5), TypeError, "x_t must be int64"),
        (
            lambda: ops.jump_step(logits, x_t[:, :2], 1.0, 0.5),
            ValueError,
            r"x_t must have shape \[B, L\]",
        ),
        (lambda: ops.jump_step(logits, x_t + 5, 1.0, 0.5), ValueError, "x_t holds token id 5"),
        (lambda: ops.jump_step(logits, x_t - 1, 1.0, 0.5), ValueError, "x_t holds token id -1"),
        (
            lambda: ops.jump_step(logits, x_t, torch.ones(3, device=device), 0.5),
            ValueError,
            "rate_scale must be a float or have shape",
        ),
        (lambda: ops.jump_step(logits, x_t, 1.0, -0.5), ValueError, r"h must lie in \[0, inf\)"),
        (
            lambda: ops.jump_step(logits, x_t, math.nan, 0.5),
            ValueError,
            r"rate_scale must be a number \(not NaN\)",
        ),
        (lambda: ops.jump_step(logits, x_t, "1", 0.5), TypeError, "rate_scale must be a float"),
        (
            lambda: ops.jump_step(logits, x_t, 1.0, 0.5, barrier=-1.0),
            ValueError,
            "barrier must be >= 0",
        ),
        (
            lambda: ops.jump_step(logits, x_t, 1.0, 0.5, temperature=-0.5),
            ValueError,
            "temperature must be",
        ),
        (lambda: ops.jump_step(logits, x_t, 1.0, 0.5, generator=1), TypeError, "generator must be"),
        (
            lambda: ops.sample_categorical(logits, exclude=5),
            ValueError,
            r"exclude must be a token id in \[0, 5\)",
        ),
        (
            lambda: ops.sample_categorical(logits, exclude=x_t + 9),
            ValueError,
            "exclude holds token id 9",
        ),
        (lambda: ops.sample_categorical(logits, exclude=1.5), TypeError, "exclude must be None"),
        (
            lambda: ops.probs_to_generator(-logits.abs(), x_t, 1.0),
            ValueError,
            "probs must be non-negative",
        ),
        (
            lambda: ops.probs_to_generator(logits.abs(), x_t.float(), 1.0),
            TypeError,
            "x_t must be int64",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    if device.type == "cuda":
        with pytest.raises(ValueError, match="generator is for cpu"):
            ops.jump_step(logits, x_t, 1.0, 0.5, generator=torch.Generator())


def test_native_op_checks_its_arguments():
    """The registered ops check shapes themselves (for callers of torch.ops.fsdfm.*)."""
    logits = torch.randn(2, 3, 5)
    x_t = torch.zeros(2, 3, dtype=torch.long)
    one = torch.ones(2)
    with pytest.raises(ValueError, match="x_t must have shape"):
        torch.ops.fsdfm.jump_step(logits, x_t[:1], one, one, math.inf, 1.0, 0, 1.0, None)
    with pytest.raises(ValueError, match="h must have shape"):
        torch.ops.fsdfm.jump_step(logits, x_t, one, one[:1], math.inf, 1.0, 0, 1.0, None)
    with pytest.raises(TypeError, match="rate_scale must be a float32"):
        torch.ops.fsdfm.jump_step(logits, x_t, one.double(), one, math.inf, 1.0, 0, 1.0, None)
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.fsdfm.sample_categorical(logits, None, -1, math.inf, -1.0, 0, 1.0, None)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        torch.ops.fsdfm.sample_categorical(logits, None, -1, math.inf, 1.0, -1, 1.0, None)
    with pytest.raises(ValueError, match="top_p must lie in"):
        torch.ops.fsdfm.jump_step(logits, x_t, one, one, math.inf, 1.0, 0, 0.0, None)
    with pytest.raises(ValueError, match="give exclude either"):
        torch.ops.fsdfm.sample_categorical(logits, x_t, 1, math.inf, 1.0, 0, 1.0, None)


def op_samples(device):
    logits = torch.randn(2, 5, 33, device=device)
    x_t = torch.randint(0, 33, (2, 5), device=device)
    one = torch.ones(2, device=device)
    return {
        "probs_to_generator": (logits.softmax(-1), x_t, one, 2.0),
        "jump_step": (logits, x_t, one, one * 0.5, math.inf, 0.9, 0, 1.0, None),
        "sample_categorical": (logits, x_t, -1, 3.0, 1.0, 0, 1.0, None),
        # The controls (top-k and top-p; temperature 0) take other paths through the kernels.
        "jump_step/controls": (logits, x_t, one, one * 0.5, 2.0, 0.9, 5, 0.8, None),
        "sample_categorical/greedy": (logits, x_t, -1, math.inf, 0.0, 3, 0.5, None),
    }


@pytest.mark.parametrize(
    "case",
    [
        "probs_to_generator",
        "jump_step",
        "sample_categorical",
        "jump_step/controls",
        "sample_categorical/greedy",
    ],
)
def test_opcheck(device, case):
    args = op_samples(device)[case]
    op = case.split("/")[0]
    torch.library.opcheck(getattr(torch.ops.fsdfm, op).default, args)
    if op != "probs_to_generator":
        # With an explicit generator the eager/AOT comparison would draw twice from one state.
        args = (*args[:-1], torch.Generator(device).manual_seed(0))
        torch.library.opcheck(
            getattr(torch.ops.fsdfm, op).default,
            args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


def test_torch_compile(device):
    """A step traced with fullgraph=True gives the eager tokens (same default-generator seed)."""

    def step(logits, x_t, rate, h):
        x = torch.ops.fsdfm.jump_step(logits, x_t, rate, h, math.inf, 1.0, 0, 1.0, None)
        return torch.ops.fsdfm.sample_categorical(logits, x, -1, math.inf, 1.0, 0, 1.0, None)

    logits = torch.randn(2, 7, 50, device=device)
    x_t = torch.randint(0, 50, (2, 7), device=device)
    rate = torch.full((2,), 2.0, device=device)
    h = torch.full((2,), 0.5, device=device)
    compiled = torch.compile(step, fullgraph=True)
    torch.manual_seed(0)
    eager = step(logits, x_t, rate, h)
    torch.manual_seed(0)
    assert torch.equal(compiled(logits, x_t, rate, h), eager)
