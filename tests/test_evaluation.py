"""Evaluation: the ELBO against exact answers, the sweep and its files, `fsdfm eval`, and the
synthetic laws of the reproductions (checkerboard, Markov chain)."""

import json
import math

import pytest
import torch
from laws import correlated_law

import fsdfm
from fsdfm import evaluation
from fsdfm.cli import main
from fsdfm.evaluation import plot_frontier, sweep, write_results
from fsdfm.metrics import elbo, exact_nll
from fsdfm.synthetic import (
    ExactPosterior,
    MarkovChain,
    MarkovPosterior,
    checkerboard_law,
    checkerboard_scores,
    tv_noise_floor,
)


def _draw(q: torch.Tensor, n: int, seed: int = 1) -> torch.Tensor:
    """n sequences [n, L] from the joint law q [V] * L."""
    V, L = q.shape[0], q.dim()
    g = torch.Generator().manual_seed(seed)
    index = torch.multinomial(q.flatten(), n, replacement=True, generator=g)
    return torch.stack([(index // V ** (L - 1 - i)) % V for i in range(L)], 1)


def _nll_per_token(q: torch.Tensor, x: torch.Tensor) -> float:
    oracle = ExactPosterior(q)
    return exact_nll(x, lambda t: oracle.q.flatten()[oracle.joint_index(t)].log())["per_token"]


@pytest.fixture(scope="module")
def law():
    return correlated_law(3, 3, seed=2)


def test_elbo_of_the_exact_model_with_a_mask_source_is_the_nll(law):
    # With a mask source the path's state records every revealed token, so the mixture of the
    # conditional paths is Markov and the exact model's bound is tight (up to Monte Carlo noise).
    x = _draw(law, 3000)
    oracle = ExactPosterior(law, "mask")
    bound = elbo(
        oracle, x, source="mask", vocab_size=oracle.vocab_size, n_times=16, batch_size=1000
    )
    assert bound["nats_per_token"] == pytest.approx(_nll_per_token(law, x), rel=0.03)
    assert bound["per_time"].shape == (16,) and bound["times"][0] == pytest.approx(1 / 32)


def test_elbo_with_a_uniform_source_is_a_strict_upper_bound(law):
    # A uniform-source token that jumped may only have jumped to its target: the conditional
    # paths' mixture is not Markov, so even the exact model's bound exceeds the NLL.
    x = _draw(law, 3000)
    oracle = ExactPosterior(law, "uniform")
    bound = elbo(oracle, x, source="uniform", vocab_size=3, n_times=16, batch_size=1000)
    nll = _nll_per_token(law, x)
    assert bound["nats_per_token"] > nll + 0.1
    assert bound["perplexity_bound"] == pytest.approx(torch.tensor(bound["nats_per_token"]).exp())


def test_exact_posterior_of_tokens_the_law_never_shows_together():
    # The checkerboard of 2 x 2 cells on a 4 x 4 grid, and a law whose token 3 never comes
    # first. With the mask source an independent draw per position can reveal an off-board
    # pair, or a first token the law never has; the posterior is then undefined, and the
    # oracle must still give distributions: revealed positions their own token, masked ones
    # their prior marginal.
    law = checkerboard_law(4, squares=2)
    oracle = ExactPosterior(law, "mask")
    mask = 4
    off_board = next((a, b) for a in range(4) for b in range(4) if law[a, b] == 0)
    x_t = torch.tensor([off_board, (0, mask), (mask, mask)])
    p = oracle(x_t, torch.full((3,), 0.5), None).double().exp()
    assert torch.allclose(p.sum(-1), torch.ones(3, 2, dtype=torch.float64))
    assert p[0, 0, off_board[0]] == 1 and p[0, 1, off_board[1]] == 1
    assert torch.allclose(p[1, 1, :4], law[0] / law[0].sum(), atol=1e-6)  # consistent: as before
    assert torch.allclose(p[2, :, :4], torch.stack([law.sum(1), law.sum(0)]).double(), atol=1e-6)
    skewed = law.clone()
    skewed[3] = 0
    oracle = ExactPosterior(skewed, "mask")
    p = oracle(torch.tensor([[3, mask]]), torch.full((1,), 0.5), None).double().exp()
    assert p[0, 0, 3] == 1
    prior = skewed.sum(0) / skewed.sum()
    assert torch.allclose(p[0, 1, :4], prior.double(), atol=1e-6)
    assert p[..., mask].max() == 0  # the mask token is never predicted


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_elbo_of_the_markov_posterior_reads_its_own_source_and_vocabulary(source):
    # No source or vocab_size passed: the exact posterior carries them. Its bound is the
    # chain's NLL with a mask source (a wrong source or vocabulary would not be) and strictly
    # above it with a uniform one: the reference reproduce.py scores beside a teacher.
    chain = MarkovChain(5, 6, order=1, concentration=0.3, seed=1)
    x = chain.sample(2000, torch.Generator().manual_seed(2))
    nll = exact_nll(x, chain.log_prob)["per_token"]
    bound = elbo(MarkovPosterior(chain, source), x, n_times=16, batch_size=1000)
    if source == "mask":
        assert bound["nats_per_token"] == pytest.approx(nll, rel=0.03)
    else:
        assert bound["nats_per_token"] > nll + 0.1


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_elbo_grows_as_the_model_gets_worse(law, source):
    x = _draw(law, 1000)
    oracle = ExactPosterior(law, source)

    def blurred(eps):
        # The exact posterior mixed with the uniform law over the real tokens.
        def model(x_t, t, h):
            p = oracle(x_t, t, h).double().exp()
            p[..., :3] = (1 - eps) * p[..., :3] + eps / 3
            return p.log().float()

        return model

    bounds = [
        elbo(
            blurred(e), x, source=source, vocab_size=oracle.vocab_size, n_times=8, batch_size=1000
        )["nats_per_token"]
        for e in (0.0, 0.3, 0.8)
    ]
    assert bounds[0] < bounds[1] < bounds[2]


def test_elbo_of_fsdfm_models_is_reproducible_and_takes_students():
    torch.manual_seed(0)
    config = fsdfm.ModelConfig(
        vocab_size=16, dim=64, n_blocks=1, n_heads=1, cond_dim=16, seq_len=6, dropout=0.0
    )
    x = torch.randint(0, 16, (5, 6))
    for step_conditioned in (False, True):
        model = fsdfm.FSDFMTransformer(config.replace(step_conditioned=step_conditioned)).eval()
        first = elbo(model, x, n_times=4, batch_size=2, seed=3)
        again = elbo(model, x, n_times=4, batch_size=2, seed=3)
        assert first["nats_per_token"] == again["nats_per_token"] > 0
        assert torch.isfinite(first["per_time"]).all()
    with pytest.raises(ValueError, match="vocab_size"):
        elbo(lambda x_t, t, h: torch.zeros(*x_t.shape, 4), x)


def _stub(V=5):
    """A model that always predicts the same independent law over V tokens."""
    logits = torch.log(torch.arange(1, V + 1, dtype=torch.float32))

    def model(x_t, t, h):
        return logits.expand(*x_t.shape, V).clone()

    return model


def test_sweep_rows_and_result_files(tmp_path, monkeypatch):
    rows = sweep(
        {"a": _stub(), "b": _stub()},
        steps=(1, 2),
        solvers={"a": ("cumulative", "dfm"), "b": ("cumulative",)},
        n_samples=10,
        batch_size=4,
        metric_fns={
            "mean_id": lambda x: float(x.double().mean()),
            "pair": lambda x: {"p1": 1.0, "p2": 2.0},
        },
        sample_kwargs={"seq_len": 4},
        progress=False,
    )
    assert [(r["model"], r["solver"], r["steps"]) for r in rows] == [
        ("a", "cumulative", 1),
        ("a", "cumulative", 2),
        ("a", "dfm", 1),
        ("a", "dfm", 2),
        ("b", "cumulative", 1),
        ("b", "cumulative", 2),
    ]
    for r in rows:
        assert r["nfe"] == r["steps"] and r["n"] == 10 and r["p2"] == 2.0
        assert 0 <= r["mean_id"] < 5 and 0 < r["entropy"] <= 2 and r["seconds"] >= 0
    paths = write_results(rows, tmp_path / "out", quality="mean_id", title="stub", note="a note")
    assert json.loads(paths["json"].read_text()) == rows
    md = paths["md"].read_text()
    header = (
        "| model | solver | steps | nfe | n | mean_id | p1 | p2 | entropy | entropy_se | seconds |"
    )
    assert header in md and "a note" in md and md.count("\n| a |") == 4
    assert all(r["entropy_se"] > 0 for r in rows)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="quality"):
        write_results(rows, tmp_path / "bad", quality="missing")
    # A write that fails (the last file, after two were staged) leaves the previous results
    # whole, and no temporary behind.
    before = {key: path.read_bytes() for key, path in paths.items()}

    class Failing(evaluation.Staging):
        def write(self, target, write):
            super().write(target, write)
            if target.name == "results.png":
                raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "Staging", Failing)
        with pytest.raises(OSError, match="disk full"):
            write_results(rows[:1], tmp_path / "out", quality="mean_id")
    assert {key: path.read_bytes() for key, path in paths.items()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "results.json", "results.md", "results.png"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="solvers"):
        sweep({"a": _stub()}, steps=(1,), solvers=("leapfrog",), progress=False)


def test_same_seed_same_rows():
    kwargs = dict(
        steps=(2,),
        solvers=("cumulative",),
        n_samples=6,
        batch_size=3,
        metric_fns={"s": lambda x: float(x.sum())},
        sample_kwargs={"seq_len": 3},
        progress=False,
        seed=4,
    )
    first, second = sweep({"a": _stub()}, **kwargs), sweep({"a": _stub()}, **kwargs)
    assert first[0]["s"] == second[0]["s"] and first[0]["entropy"] == second[0]["entropy"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    config = fsdfm.ModelConfig(
        vocab_size=32, dim=64, n_blocks=1, n_heads=1, cond_dim=16, seq_len=8, dropout=0.0
    )
    torch.manual_seed(0)
    model = fsdfm.FSDFMTransformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return fsdfm.save(model, tmp_path_factory.mktemp("tiny") / "model")


def test_eval_cli_without_a_scorer(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = [
        "eval",
        "--model",
        f"tiny={tiny_model_dir}",
        "--steps",
        "1,2",
        "--solvers",
        "cumulative,dfm",
        "-n",
        "4",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "| tiny | cumulative | 1 | 1 | 4 |" in captured.out
    assert "entropy only" in captured.err
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 4 and set(rows[0]) == {
        "model",
        "solver",
        "steps",
        "nfe",
        "n",
        "entropy",
        "entropy_se",
        "seconds",
    }
    assert (out / "results.png").stat().st_size > 0 and "entropy only" in (
        out / "results.md"
    ).read_text()


def test_eval_cli_with_a_scorer(tiny_model_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    scorer = tmp_path / "scorer"
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(scorer)
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--steps",
        "2",
        "--solvers",
        "cumulative",
        "-n",
        "4",
        "--batch-size",
        "4",
        "--scorer",
        str(scorer),
        "--length",
        "6",
        "--out",
        str(tmp_path / "eval"),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    row = json.loads((tmp_path / "eval" / "results.json").read_text())[0]
    assert row["model"] == "model" and row["gen_ppl"] > 1 and row["gen_ppl_corpus"] > 1
    assert "gen_ppl" in capsys.readouterr().out


def test_eval_cli_user_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", "--model", "=x", "--out", str(tmp_path)]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert (
        main(["eval", "--model", f"a={tiny_model_dir}", "--solvers", "rk9", "--out", str(tmp_path)])
        == 2
    )
    assert "--solvers" in capsys.readouterr().err
    assert main(["eval", "--model", "a=b", "--steps", "0,2"]) == 2
    assert "--steps: expected positive integers" in capsys.readouterr().err


def test_checkerboard_law_and_scores():
    law = checkerboard_law(32, squares=4)  # squares of 8 x 8 cells
    assert law.sum() == pytest.approx(1.0) and (law > 0).sum() == 32 * 32 // 2
    assert law[0, 0] > 0 and law[0, 8] == 0 and law[8, 8] > 0 and law[31, 0] == 0
    assert torch.allclose(law.sum(0), torch.full((32,), 1 / 32, dtype=torch.float64))
    assert torch.allclose(law.sum(1), torch.full((32,), 1 / 32, dtype=torch.float64))
    with pytest.raises(ValueError):
        checkerboard_law(30, squares=4)

    g = torch.Generator().manual_seed(0)
    n = 20000
    cells = torch.multinomial(law.flatten(), n, replacement=True, generator=g)
    exact = checkerboard_scores(torch.stack([cells // 32, cells % 32], 1), law, block=8)
    assert exact["black"] == 1.0
    assert exact["tv"] == pytest.approx(exact["tv_floor"], rel=0.1)
    assert exact["tv_block"] < 0.05 and exact["tv_block_floor"] < 0.05
    noise = checkerboard_scores(torch.randint(0, 32, (n, 2), generator=g), law, block=8)
    assert noise["black"] == pytest.approx(0.5, abs=0.02)
    assert noise["tv_block"] == pytest.approx(0.5, abs=0.03)  # half the mass on white blocks
    assert tv_noise_floor(law, 100) > tv_noise_floor(law, 10000)


@pytest.mark.parametrize("order", [1, 2])
def test_markov_chain_law(order):
    chain = MarkovChain(6, 10, order=order, concentration=0.5, seed=1)
    assert chain.table.shape == (6,) * (order + 1)
    assert torch.allclose(chain.table.sum(-1), torch.ones((6,) * order, dtype=torch.float64))
    x = chain.sample(20000, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 10) and x.min() >= 0 and x.max() < 6
    # Each transition follows its row: the empirical next-symbol law of the most frequent
    # context against the table, by chi-square.
    context = x[:, order - 1 : 9] if order == 1 else x[:, :8] * 6 + x[:, 1:9]
    nxt = x[:, order:].flatten()
    context = context.flatten()
    top = int(context.bincount().argmax())
    counts = nxt[context == top].bincount(minlength=6).double()
    expected = counts.sum() * chain.table.reshape(-1, 6)[top]
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < 20.5  # chi-square, 5 degrees of freedom, p = 0.001
    # The NLL of its own samples: k uniform tokens, then the exact expected entropy of the rest.
    per_token = float(-chain.log_prob(x).mean()) / 10
    assert per_token == pytest.approx(chain.expected_nll, rel=0.01)
    assert chain.expected_nll == pytest.approx(
        (order * math.log(6) + (10 - order) * chain.entropy_rate) / 10
    )
    # The neighbour pairs of its own samples follow pair_law (TV near the noise of 180,000
    # pairs over 36 cells); independent uniform tokens do not.
    assert chain.pair_law.sum() == pytest.approx(1.0)
    assert chain.pair_tv(x) < 0.01
    assert chain.pair_tv(torch.randint(0, 6, (20000, 10), generator=torch.Generator())) > 0.1
    again = MarkovChain(6, 10, order=order, concentration=0.5, seed=1)
    assert torch.equal(again.table, chain.table)
    with pytest.raises(ValueError, match="order"):
        MarkovChain(6, 10, order=3)


def test_train_scorer_learns_and_scores(tmp_path):
    """The scorer learns a periodic text (held-out loss far below the uniform log V) and then
    scores through generative_perplexity by path: in-pattern samples low, shuffled ones high."""
    pytest.importorskip("transformers")
    from fsdfm.metrics import generative_perplexity
    from fsdfm.scorer import train_scorer
    from fsdfm.tokenizer import get_tokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 400
    (tmp_path / "corpus.txt").write_text(text)
    result = train_scorer(
        tmp_path / "corpus.txt",
        tmp_path / "scorer",
        tokenizer="byte",
        seq_len=32,
        dim=32,
        n_layers=1,
        n_heads=2,
        steps=300,
        batch_size=8,
        lr=1e-2,
        device="cpu",
        progress=False,
    )
    V = get_tokenizer("byte").vocab_size
    assert result["val_loss"] < 0.25 * math.log(V), result
    assert (tmp_path / "scorer" / "scorer.json").exists()
    ids = torch.tensor(get_tokenizer("byte").encode(text[:32]))[None]
    shuffled = ids[:, torch.randperm(32, generator=torch.Generator().manual_seed(0))]
    good = generative_perplexity(ids, str(tmp_path / "scorer"), device="cpu")["mean"]
    bad = generative_perplexity(shuffled, str(tmp_path / "scorer"), device="cpu")["mean"]
    assert good < 2.0 < 10 * good < bad, (good, bad)


def test_plots_draw_error_bars_the_baseline_and_its_band(tmp_path, monkeypatch):
    """Error bars where rows carry <key>_se, the longest DFM run as a dashed line on both
    panels, and the band within 10% of it on the quality panel."""
    from matplotlib.axes import Axes

    from fsdfm.evaluation import baseline_row

    calls = []
    for name in ("errorbar", "axhline", "axhspan"):
        original = getattr(Axes, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, args, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Axes, name, spy)
    rows = [
        {"model": "m", "solver": s, "steps": k, "nfe": k, "n": 4, "q": q, "q_se": 0.1,
         "entropy": 5.0, "entropy_se": 0.01, "seconds": 0.1}
        for s, k, q in [("dfm", 8, 3.0), ("dfm", 1024, 2.0), ("cumulative", 8, 2.1)]
    ]  # fmt: skip
    assert baseline_row(rows)["steps"] == 1024 and baseline_row(rows[2:]) is None
    write_results(rows, tmp_path / "out", quality="q")
    bars = [kw["yerr"] for name, _, kw in calls if name == "errorbar"]
    assert len(bars) == 4 and all(e is not None for e in bars)
    assert [args[0] for name, args, _ in calls if name == "axhline"] == [2.0, 5.0]
    assert [args[:2] for name, args, _ in calls if name == "axhspan"] == [(1.8, 2.2)]


def test_plot_frontier_places_models_on_the_reference_curve(tmp_path):
    def row(model, steps, nll, te):
        return {"model": model, "solver": "cumulative", "steps": steps, "nll": nll,
                "transition_entropy": te}  # fmt: skip

    rows = [row("ref, T = 1", 4, 3.0, 3.5), row("ref, T = 0.8", 4, 2.5, 3.1),
            row("ref, T = 1", 8, 2.4, 2.9), row("ref, T = 0.8", 8, 2.1, 2.7),
            row("mine", 4, 2.4, 3.2), row("mine", 8, 2.0, 2.8)]  # fmt: skip
    frontier = ["ref, T = 1", "ref, T = 0.8"]
    truth = {"model": "law", "nll": 1.8, "transition_entropy": 2.5}
    path = plot_frontier(rows, tmp_path / "f.png", frontier=frontier, steps=[4, 8],
                         reference=truth)  # fmt: skip
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no rows of the frontier models .* at 16 steps"):
        plot_frontier(rows, tmp_path / "g.png", frontier=frontier, steps=[16])
    with pytest.raises(ValueError, match="row 'mine' at 4 steps has no 'transition_entropy'"):
        plot_frontier([*rows[:4], {**rows[4], "transition_entropy": None}], tmp_path / "h.png",
                      frontier=frontier, steps=[4])  # fmt: skip
