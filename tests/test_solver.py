"""fsdfm.sample against an exact oracle: with many steps the joint law of the samples converges
to the target; with one step each token comes from its marginal. Prompts, edit masks, seeds,
trajectories and errors."""

import math

import pytest
import torch
from laws import chisquare_rows, correlated_law

import fsdfm
from fsdfm.metrics import total_variation
from fsdfm.path import MixturePath, PolynomialSchedule, sample_source
from fsdfm.synthetic import ExactPosterior, tv_noise_floor

BACKENDS = ["native", "reference"]
V, L = 3, 3
Q = correlated_law(V, L)


def run(model, steps, n, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return fsdfm.sample(
        model,
        steps,
        batch_size=n,
        seq_len=L,
        source=model.source,
        vocab_size=model.vocab_size,
        **kw,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["uniform", "mask"])
@pytest.mark.parametrize("solver", ["cumulative", "dfm"])
def test_many_steps_reach_the_target(solver, source, backend):
    n, steps = 10000, 128
    model = ExactPosterior(Q, source)
    x = run(model, steps, n, solver=solver, backend=backend)
    assert model.calls == steps
    assert x.shape == (n, L) and bool(((x >= 0) & (x < V)).all()), "no mask token survives"
    tv = total_variation(x, Q.flatten())
    floor = tv_noise_floor(Q, n, repeats=5)
    assert tv < floor + 0.012, f"TV {tv:.4f} against a sampling-noise floor of {floor:.4f}"
    # The same check rejects a sampler that misses the dependence between tokens.
    assert total_variation(x, model.product_of_marginals()) > 0.3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["uniform", "mask"])
@pytest.mark.parametrize("solver", ["cumulative", "euler", "dfm"])
def test_one_step_draws_each_token_from_its_marginal(solver, source, backend):
    n = 20000
    model = ExactPosterior(Q, source)
    x = run(model, 1, n, solver=solver, backend=backend)
    law = model.product_of_marginals()
    p, stat, dof = chisquare_rows(model.joint_index(x)[:, None], law[None])
    assert p > 1e-4, f"chi-square p = {p:.2e} ({stat:.1f} on {dof} dof)"


def test_cumulative_beats_dfm_in_few_steps():
    """The point of the cumulative scalar: at 8 steps it lands closer than the DFM sampler."""
    n = 20000
    model = ExactPosterior(Q, "uniform")
    tv = {s: total_variation(run(model, 8, n, solver=s), Q) for s in ("cumulative", "dfm")}
    assert tv["cumulative"] < tv["dfm"], tv


@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_prompt_is_frozen_and_conditions_the_rest(source):
    n, steps = 8000, 64
    model = ExactPosterior(Q, source, clean=(0,))
    prompt = torch.tensor([2])
    x, states = run(model, steps, n, prompt=prompt, return_trajectory=True)
    assert states.shape == (steps + 1, n, L)
    assert bool((states[:, :, 0] == 2).all()), "the prompt never changes"
    # The rest follows q(x_2, x_3 | x_1 = 2).
    conditional = Q[2].flatten() / Q[2].sum()
    floor = tv_noise_floor(conditional, n, repeats=5)
    assert total_variation(x[:, 1:], conditional) < floor + 0.015


def test_edit_mask_freezes_what_it_should():
    n = 500
    model = ExactPosterior(Q, "uniform")
    init = torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(1))
    edit = torch.rand(n, L, generator=torch.Generator().manual_seed(2)) < 0.5
    seen = []
    x = run(
        model,
        8,
        n,
        init=init,
        edit_mask=edit,
        callback=lambda step, t, xt: seen.append((step, t, xt.clone())),
    )
    assert torch.equal(x[~edit], init[~edit])
    assert [s for s, _, _ in seen] == list(range(1, 9))
    assert [t for _, t, _ in seen] == pytest.approx([k / 8 for k in range(1, 9)])
    for _, _, xt in seen:
        assert torch.equal(xt[~edit], init[~edit])
    assert not torch.equal(x[edit], init[edit]), "edited positions are generated"


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_samples(backend):
    model = ExactPosterior(Q, "uniform")
    a = run(model, 8, 64, backend=backend, generator=torch.Generator().manual_seed(3))
    b = run(model, 8, 64, backend=backend, generator=torch.Generator().manual_seed(3))
    c = run(model, 8, 64, backend=backend, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_vocabulary_read_off_the_logits():
    model = ExactPosterior(Q, "uniform")
    x = fsdfm.sample(model, 4, batch_size=16, seq_len=L, progress=True)
    assert model.calls == 5, "one probe call, then one per step"
    assert x.shape == (16, L)


def test_errors():
    model = ExactPosterior(Q, "uniform")
    kw = {"seq_len": L, "vocab_size": V}
    cases = [
        (lambda: fsdfm.sample(model, 0, **kw), ValueError, "steps must be a positive integer"),
        (lambda: fsdfm.sample(model, 2.5, **kw), ValueError, "steps must be"),
        (lambda: fsdfm.sample(model, 2), ValueError, "seq_len is required"),
        (lambda: fsdfm.sample(model, 2, solver="rk4", **kw), ValueError, "solver must be"),
        (lambda: fsdfm.sample(model, 2, backend="gpu", **kw), ValueError, "backend must be"),
        (lambda: fsdfm.sample(model, 2, source="noise", **kw), ValueError, "source must be"),
        (lambda: fsdfm.sample(model, 2, temperature=-1, **kw), ValueError, "temperature"),
        (lambda: fsdfm.sample(model, 2, top_p=0, **kw), ValueError, "top_p must"),
        (lambda: fsdfm.sample(model, 2, barrier=-1.0, **kw), ValueError, "barrier"),
        (
            lambda: fsdfm.sample(model, 2, prompt=torch.tensor([0, 1, 2, 0]), **kw),
            ValueError,
            "prompt has 4 tokens, longer than seq_len = 3",
        ),
        (
            lambda: fsdfm.sample(model, 2, prompt=torch.tensor([3]), **kw),
            ValueError,
            r"prompt holds token id 3, outside the vocabulary \[0, 3\)",
        ),
        (lambda: fsdfm.sample(model, 2, prompt=torch.tensor([1.0]), **kw), TypeError, "prompt"),
        (
            lambda: fsdfm.sample(model, 2, init=torch.zeros(1, L, dtype=torch.long), **kw),
            ValueError,
            "init needs edit_mask",
        ),
        (
            lambda: fsdfm.sample(model, 2, edit_mask=torch.ones(1, L, dtype=torch.bool), **kw),
            ValueError,
            "edit_mask needs init",
        ),
        (
            lambda: fsdfm.sample(model, 2, seq_len=L, vocab_size=V + 1),
            ValueError,
            r"model returned logits of shape \(1, 3, 3\) at step 1, expected \[1, 3, 4\]",
        ),
        (lambda: fsdfm.sample(lambda x, t, h: x, 2, **kw), TypeError, "floating-point logits"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_are_reported(backend):
    def broken(x, t, h):
        logits = torch.zeros(*x.shape, 5)
        if float(t[0]) >= 0.5:
            logits[0, 1, 2] = math.nan
        return logits

    with pytest.raises(ValueError, match="step 3"):
        fsdfm.sample(broken, 4, seq_len=4, vocab_size=5, backend=backend)


def test_path_and_scalars():
    sched = PolynomialSchedule()
    # alpha(t, h) -> kappa_dot / (1 - kappa) as h -> 0, and equals the log-ratio exactly.
    assert sched.cumulative_scalar(0.25, 1e-6) == pytest.approx(1 / 0.75, rel=1e-5)
    assert sched.cumulative_scalar(0.5, 0.5) == pytest.approx(
        -math.log(1e-8) / 0.5 + math.log(0.5) / 0.5
    )
    assert sched.euler_scalar(0.125) == 8.0
    assert sched.dfm_rate(0.5) == pytest.approx(2.0)
    cubic = PolynomialSchedule(3)
    assert cubic.kappa(0.5) == 0.125 and cubic.kappa_dot(0.5) == pytest.approx(0.75)
    t = torch.tensor([0.0, 0.5])
    torch.testing.assert_close(
        sched.cumulative_scalar(t, 0.25),
        torch.tensor([math.log(1 / 0.75), math.log(0.5 / 0.25)]) / 0.25,
    )
    with pytest.raises(ValueError, match="exponent"):
        PolynomialSchedule(0)
    # Mixture path: the share of target tokens is kappa_t per sequence.
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(3, 20000, dtype=torch.long)
    x1 = torch.ones(3, 20000, dtype=torch.long)
    xt = MixturePath().sample(x0, x1, torch.tensor([0.0, 0.3, 1.0]), generator=g)
    share = xt.double().mean(1)
    assert share[0] == 0 and share[2] == 1 and abs(share[1] - 0.3) < 0.015
    src = sample_source("uniform", 4, 1000, 7, generator=g)
    assert int(src.min()) == 0 and int(src.max()) == 6
    assert bool((sample_source("mask", 2, 3, 8) == 7).all())


def test_cuda_graph_needs_cuda_and_native():
    model = ExactPosterior(Q, "uniform")
    with pytest.raises(ValueError, match="cuda_graph=True needs sampling on CUDA"):
        run(model, 4, 8, cuda_graph=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_samples_the_target_law_reproducibly():
    """A captured step replayed reaches the target law, and the same seed repeats the samples."""
    n = 10000
    model = ExactPosterior(Q, "uniform").to("cuda")

    def graphed(seed):
        g = torch.Generator("cuda").manual_seed(seed)
        return run(model, 64, n, cuda_graph=True, generator=g, device="cuda")

    a = graphed(0)
    assert torch.equal(a, graphed(0)) and not torch.equal(a, graphed(1))
    tv = total_variation(a.cpu(), Q.flatten())
    assert tv < tv_noise_floor(Q, n, repeats=5) + 0.012


def test_sampling_runs_without_autograd():
    seen = []

    def model(x, t, h):
        seen.append(torch.is_grad_enabled())
        return torch.zeros(*x.shape, 5)

    fsdfm.sample(model, 3, seq_len=4, vocab_size=5)
    assert seen == [False, False, False]


@pytest.mark.parametrize("backend", ["native"])
def test_nan_logits_at_frozen_positions_are_ignored(backend):
    """A prompt position keeps its token whatever its logits, so NaN there is no error."""

    def model(x, t, h):
        logits = torch.zeros(*x.shape, 5)
        logits[:, 0] = math.nan
        return logits

    x = fsdfm.sample(model, 3, seq_len=4, vocab_size=5, prompt=torch.tensor([2]), backend=backend)
    assert bool((x[:, 0] == 2).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", ["euler", "dfm"])
def test_mask_source_moves_only_masked_positions(solver, backend):
    """SPEC 2.4 / 2.5: with the mask source the Euler and DFM solvers leave a revealed token
    where it is, and the DFM draw never puts the mask back, even for a model that gives a
    revealed position mass elsewhere (here: flat logits over the real tokens)."""
    V_real = 5

    def flat(x, t, h):
        logits = torch.zeros(*x.shape, V_real + 1)
        logits[..., V_real] = 3.0  # the mask token is the likeliest "token"
        return logits

    n, steps = 400, 16
    gen = torch.Generator().manual_seed(0)
    _, states = fsdfm.sample(flat, steps, batch_size=n, seq_len=4, source="mask",
                             vocab_size=V_real + 1, solver=solver, backend=backend,
                             return_trajectory=True, generator=gen)  # fmt: skip
    revealed = states[:-1] != V_real
    assert bool(revealed[1:].any()), "tokens are revealed along the way"
    assert bool((states[1:][revealed] == states[:-1][revealed]).all()), "a revealed token moved"
    assert bool((states[-1] < V_real).all()), "no mask token at the end"


# ---------------------------------------------------------------------------------------------
# Streaming: sample_iter, and a callback that finishes early.


@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_sample_iter_yields_every_state(source):
    """x_0, then the state after each step; the last is the sample of fsdfm.sample with the same
    seed; between yields the consumer's own grad mode holds."""
    model = ExactPosterior(Q, source)
    states = []
    for state in fsdfm.sample_iter(model, 4, batch_size=8, seq_len=L, source=source,
                                   generator=torch.Generator().manual_seed(5)):  # fmt: skip
        assert torch.is_grad_enabled(), "sampling's no_grad leaked into the consumer"
        states.append(state)
    assert [s.step for s in states] == [0, 1, 2, 3, 4]
    assert [s.last for s in states] == [False] * 4 + [True]
    assert [s.t for s in states] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    want = fsdfm.sample(model, 4, batch_size=8, seq_len=L, source=source,
                        generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert torch.equal(states[-1].x, want)
    if source == "mask":
        assert bool((states[0].x == V).all()), "x_0 of the mask source is all mask"
    with pytest.raises(TypeError, match="return_trajectory"):
        fsdfm.sample_iter(model, 4, seq_len=L, return_trajectory=True)
    with pytest.raises(ValueError, match="steps must"):
        fsdfm.sample_iter(model, 0, seq_len=L)  # checked at the call, not at the first next()


def test_callback_finishes_early():
    """A callback that returns True makes the next model call the last step: a complete sample
    (no mask left) in fewer calls."""
    model = ExactPosterior(Q, "mask")
    seen = []

    def stop_after_two(step, t, x):
        seen.append(step)
        return step == 2

    x, trajectory = fsdfm.sample(model, 16, batch_size=8, seq_len=L, source="mask",
                                 callback=stop_after_two, return_trajectory=True)  # fmt: skip
    assert seen == [1, 2, 3] and model.calls == 1 + 3, "a vocabulary probe, then three steps"
    assert trajectory.shape[0] == 4 and torch.equal(trajectory[-1], x)
    assert bool((x < V).all()), "the early collapse reveals every position"
    with pytest.raises(TypeError, match="callback must be callable"):
        fsdfm.sample(model, 2, seq_len=L, source="mask", callback=3)
