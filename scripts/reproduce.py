"""The paper's claim reproduced in small (docs/results.md has the numbers and the commands).

    python scripts/reproduce.py checkerboard --source uniform   # 2-D checkerboard, V = 128, L = 2
    python scripts/reproduce.py checkerboard --source mask
    python scripts/reproduce.py --threads 4 markov              # order-1 Markov chain, L = 128
    python scripts/reproduce.py oracle --source uniform  # the checkerboard's exact denoiser
    python scripts/reproduce.py --threads 2 text --run runs/default  # the bundled model, real text
    python scripts/reproduce.py replot runs/checkerboard-uniform  # tables and plots from JSON
    python scripts/reproduce.py figures    # docs/figures redrawn from the JSON kept there
    python scripts/reproduce.py --threads 2 caps   # exact caps on a CPU-sized Markov chain
    python scripts/reproduce.py --threads 2 redi   # rectified couplings on that chain
    python scripts/reproduce.py --threads 2 dilated   # the dilated solver (mask source) on it

Each problem: write the training set as a token file, pre-train a DFM teacher and distil an
FS-DFM student with :func:`fsdfm.training.train` (the code behind ``fsdfm pretrain`` /
``fsdfm distill``), then sweep the step counts with :func:`fsdfm.evaluation.sweep` and score the
samples against the known law. Everything lands in ``--out`` (default ``runs/PROBLEM-SOURCE``):
``teacher/``, ``student/``, ``eval-student/results.{json,md,png}``; the figures are copied to
``--figures`` (default ``docs/figures/``). Re-running resumes the training runs (or skips them
when finished); ``--student-dir NAME`` distils another student from the same teacher
(``eval-NAME/``).

``oracle`` samples the checkerboard with its exact denoiser (:class:`ExactPosterior`, no training):
what each solver reaches with a perfect teacher, the ceiling of any sampler that draws the
positions of a step independently (a DFM teacher's and an FS-DFM student's alike).

``redi`` runs ``fsdfm distill --method redi`` (:mod:`fsdfm.coupling`) on the CPU-sized chain of
``caps``, from the teacher of ``markov --vocab 32 --length 32`` (``--run``): the teacher's own
couplings (the mode as users run it), and, to tell the method apart from the teacher's
shortfall, the same retraining on pairs from the exact posterior (rectified: x_1 sampled from
that x_0) against the same number of independent pairs (x_1 the chain's own samples, x_0 fresh
noise: plain DFM training); ``--fsdfm-steps N`` adds FS-DFM students of the last exact-coupled
model distilled over its couplings (``fsdfm distill --couplings``). Every model is scored by
exact NLL, pair TV and transition entropy.

``dilated`` samples the mask-source teacher and FS-DFM student of ``markov --source mask
--vocab 32 --length 32`` (``--run``) in the path's random order and with the dilated solver
(:mod:`fsdfm.dilation`), against the exact posterior's random-order cap and its dilated
frontier (the same solver at temperatures below 1).

``text`` evaluates the teacher and student of ``scripts/train_default.sh`` (its WORK directory,
``--run``) on real text: generative perplexity under an autoregressive GPT-2 that it first trains
on the same tokens (:func:`fsdfm.evaluation.train_scorer`; nothing pre-trained is available
offline), unigram entropy, and the ELBO of both models on held-out blocks.

The laws, their scores, the symbol tokenizers and the toy model presets are fsdfm's
(:mod:`fsdfm.synthetic`, ``toy-pairs`` / ``toy-chain`` in :data:`fsdfm.model.PRESETS`): this
script only chooses the runs and writes the reports.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from fsdfm._args import resolve_device
from fsdfm.checkpoint import load
from fsdfm.coupling import rectified_couplings, save_couplings
from fsdfm.evaluation import (
    gen_ppl_metric,
    plot_frontier,
    sweep,
    temperature_frontier,
    write_results,
)
from fsdfm.metrics import elbo, exact_nll, transition_entropy, unigram_entropy
from fsdfm.scorer import train_scorer
from fsdfm.synthetic import (
    ExactPosterior,
    MarkovChain,
    MarkovPosterior,
    checkerboard_law,
    checkerboard_scores,
    symbol_tokenizer,
    write_sequences,
)
from fsdfm.train_config import TrainConfig
from fsdfm.training import train

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
# The rows of the exact posterior at each temperature (redi, dilated: the frontier).
FRONTIER = "exact posterior, T = {temperature:g}"


def train_pair(out: Path, data: Path, tokenizer: Path, args, preset: str, seq_len: int):
    """Pre-train the teacher, then distil the student(s): ``args.student_dir`` with the RK-4
    shortcut teacher and, for the ablation, ``heun_dir`` with Heun's when the problem asks for
    it (``args.heun_dir``). Returns the training seconds of each (of this invocation: 0 when a
    finished run is found)."""
    common = dict(
        data=str(data),
        tokenizer=str(tokenizer),
        seq_len=seq_len,
        dropout=0.0,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        eval_every=args.eval_every,
        save_every=500,
        log_every=50,
    )
    seconds = {}
    start = time.perf_counter()
    train(
        TrainConfig(
            mode="pretrain",
            out=str(out / "teacher"),
            preset=preset,
            source=args.source,
            loss="ce",
            steps=args.teacher_steps,
            lr=args.teacher_lr,
            **common,
        )
    )
    seconds["teacher"] = time.perf_counter() - start
    students = {args.student_dir: "rk4"}
    if getattr(args, "heun_dir", None):
        students[args.heun_dir] = "heun"
    for name, teacher_type in students.items():
        start = time.perf_counter()
        train(
            TrainConfig(
                mode="distill",
                out=str(out / name),
                teacher=str(out / "teacher" / "model"),
                teacher_type=teacher_type,
                levels=getattr(args, "levels", "weighted"),
                steps=args.student_steps,
                lr=args.student_lr,
                ema=args.ema,
                **common,
            )
        )
        seconds[name] = time.perf_counter() - start
    return seconds


def load_pair(out: Path, student_dir: str, device: str = "cpu", extra: dict | None = None):
    """The teacher and the student (its EMA weights), plus ``extra`` (label -> student dir)."""
    models = {"teacher": load(out / "teacher" / "model", device=device).eval()}
    for label, name in {"student": student_dir, **(extra or {})}.items():
        models[label] = load(out / name / "model_ema", device=device).eval()
    return models


def evaluate(models, args, metric_fns, on_samples=None, solvers=None) -> list[dict]:
    """Teacher with both solvers and the student with its own at the few-step budgets (n =
    --samples), then the teacher's 1024-step baseline on fewer samples (--samples-long): on a
    CPU one 1024-step run costs as much as 1024 one-step runs. ``solvers``: model -> solvers,
    to replace the default plan of the few-step budgets."""
    solvers = solvers or {"teacher": ("dfm", "cumulative"), "student": ("cumulative",)}
    common = dict(
        batch_size=args.eval_batch, metric_fns=metric_fns, seed=args.seed, on_samples=on_samples
    )
    rows = sweep(models, steps=args.steps, solvers=solvers, n_samples=args.samples, **common)
    rows += sweep(
        {"teacher": models["teacher"]},
        steps=(args.long_steps,),
        solvers=("dfm",),
        n_samples=args.samples_long,
        **common,
    )
    return rows


def likelihood_bounds(
    models,
    held_out: torch.Tensor,
    true_nll: float | None = None,
    batch_size: int = 1000,
    exact: MarkovPosterior | None = None,
) -> str:
    """The DFM bound (nats per token) of teacher and student (at h = 1/1024) on held-out data,
    as a sentence for the results note. With a uniform source the bound stays above the NLL even
    for the exact denoiser (fsdfm.metrics.elbo), so ``exact``, when given, is scored beside the
    models: that, not the law's NLL, is the bound a perfect model would reach."""
    references = {} if exact is None else {"exact posterior": exact}
    parts = []
    for name, model in {**models, **references}.items():
        bound = elbo(model, held_out, n_times=32, batch_size=batch_size)["nats_per_token"]
        parts.append(f"{name} {bound:.3f}")
    truth = "" if true_nll is None else f"; the law's own NLL is {true_nll:.3f}"
    return (
        f"ELBO on {len(held_out)} held-out sequences (nats/token, 32 times): "
        f"{', '.join(parts)}{truth}."
    )


def _density_figure(samples: dict, vocab_size: int, path: Path, title: str) -> None:
    """2-D histograms of the kept samples, one panel per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(2.0 * len(samples), 2.3))
    for ax, (label, tokens) in zip(axes, samples.items(), strict=True):
        counts = torch.zeros(vocab_size, vocab_size)
        counts.index_put_((tokens[:, 1], tokens[:, 0]), torch.ones(len(tokens)), accumulate=True)
        ax.imshow(counts.numpy(), cmap="magma", origin="lower", interpolation="nearest")
        ax.set_title(label, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def checkerboard(args) -> None:
    V = 128
    out = Path(args.out or ROOT / "runs" / f"checkerboard-{args.source}")
    out.mkdir(parents=True, exist_ok=True)
    law = checkerboard_law(V, squares=8)
    g = torch.Generator().manual_seed(args.seed)
    cells = torch.multinomial(law.flatten(), args.train_pairs, replacement=True, generator=g)
    pairs = torch.stack([cells // V, cells % V], dim=1)
    tokenizer = symbol_tokenizer(V, out / "tokenizer")
    data = write_sequences(pairs, out / "train.bin", tokenizer, V)
    seconds = train_pair(out, data, tokenizer, args, "toy-pairs", seq_len=2)
    print(f"training seconds (this invocation): {seconds}", file=sys.stderr)

    models = load_pair(out, args.student_dir, args.device)
    keep = {}
    shown = {
        ("teacher", "dfm", 1),
        ("teacher", "dfm", 8),
        ("teacher", "cumulative", 8),
        ("student", "cumulative", 1),
        ("student", "cumulative", 8),
        ("teacher", "dfm", args.long_steps),
    }

    def on_samples(row, tokens):
        key = (row["model"], row["solver"], row["steps"])
        if key in shown:
            keep[f"{key[0]} {key[1]} {key[2]}"] = tokens[: args.samples_long]

    rows = evaluate(models, args, {"board": lambda x: checkerboard_scores(x, law)}, on_samples)
    note = (
        f"Checkerboard V = {V}, L = 2, 8 x 8 squares of 16 x 16 cells, {args.source} source. "
        "tv: total variation over the 128^2 cells; tv_block: over blocks of 8 x 8 cells; "
        "*_floor: the same for n exact draws (sampling noise alone); black: share of samples "
        "on black squares (1 is perfect, 0.5 = independent coordinates). "
    )
    held_out = torch.multinomial(law.flatten(), 2000, replacement=True, generator=g)
    held_out = torch.stack([held_out // V, held_out % V], 1)
    note += likelihood_bounds(models, held_out, math.log(law.gt(0).sum().item()) / 2)
    paths = write_results(
        rows,
        out / f"eval-{args.student_dir}",
        quality="black",
        lower_is_better=False,
        note=note,
        title=f"checkerboard, {args.source} source",
    )
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    tag = f"checkerboard-{args.source}" + (
        "" if args.student_dir == "student" else f"-{args.student_dir}"
    )
    shutil.copy(paths["png"], figures / f"{tag}.png")
    truth = torch.multinomial(law.flatten(), args.samples_long, replacement=True, generator=g)
    keep = {"true law": torch.stack([truth // V, truth % V], 1), **keep}
    _density_figure(
        keep,
        V,
        figures / f"{tag}-samples.png",
        f"checkerboard, {args.source} source: {args.samples_long} samples each",
    )
    print(paths["md"].read_text())


def oracle(args) -> None:
    V = 128
    law = checkerboard_law(V, squares=8)
    model = ExactPosterior(law, source=args.source)
    rows = sweep(
        {"exact": model},
        steps=args.steps,
        solvers=("cumulative", "dfm"),
        n_samples=args.samples,
        batch_size=args.eval_batch,
        metric_fns={"board": lambda x: checkerboard_scores(x, law)},
        seed=args.seed,
        sample_kwargs={"seq_len": 2, "source": args.source, "vocab_size": model.vocab_size},
    )
    out = Path(args.out or ROOT / "runs" / f"checkerboard-oracle-{args.source}")
    paths = write_results(
        rows,
        out,
        quality="black",
        lower_is_better=False,
        title=f"checkerboard, exact denoiser, {args.source} source",
        note="The exact posterior marginals of the checkerboard law (no training): what each "
        "solver reaches with a perfect teacher. Columns as in the trained models' table.",
    )
    print(paths["md"].read_text())


def chain_scores(chain: MarkovChain):
    """The metric of a chain's samples: exact NLL, pair TV, transition entropy (bits)."""

    def scores(x: torch.Tensor) -> dict[str, float]:
        return {
            "nll": exact_nll(x, chain.log_prob)["per_token"],
            "pair_tv": chain.pair_tv(x),
            "transition_entropy": transition_entropy(x, chain.vocab_size)["transition_entropy"],
        }

    return scores


def own_samples_row(chain: MarkovChain, n: int, seed: int) -> dict:
    """A results row of n of the chain's own samples (seeded): the floor of pair TV and the
    plug-in bias of transition entropy at that n."""
    own = chain.sample(n, torch.Generator().manual_seed(seed))
    return {"model": "chain's own samples", "solver": "-", "steps": 0, "nfe": 0, "n": n,
            **chain_scores(chain)(own)}  # fmt: skip


def markov(args) -> None:
    V, L, k = args.vocab, args.length, args.order
    out = Path(args.out or ROOT / "runs" / f"markov{k}-{args.source}")
    out.mkdir(parents=True, exist_ok=True)
    chain = MarkovChain(V, L, order=k, concentration=args.concentration, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    tokenizer = symbol_tokenizer(V, out / "tokenizer")
    data = write_sequences(chain.sample(args.train_seqs, g), out / "train.bin", tokenizer, V)
    seconds = train_pair(out, data, tokenizer, args, "toy-chain", seq_len=L)
    print(f"training seconds (this invocation): {seconds}", file=sys.stderr)
    # The ablations: the cumulative scalar against the Euler solver (every model), and the
    # RK-4 against the Heun shortcut teacher (a second student).
    extra = {"student-heun": args.heun_dir} if args.heun_dir else {}
    models = load_pair(out, args.student_dir, args.device, extra)
    # A mask-source model also gets the planned step (fsdfm.dilation).
    planned = ("dilated",) if args.source == "mask" else ()
    solvers = {name: ("cumulative", "euler", *planned) for name in models}
    solvers["teacher"] = ("dfm", "cumulative", "euler", *planned)

    rows = evaluate(models, args, {"chain": chain_scores(chain)}, solvers=solvers)
    truth = chain.sample(args.samples, g)
    held_out = chain.sample(200, g)
    note = (
        f"Order-{k} Markov chain, V = {V}, L = {L}, Dirichlet({args.concentration}) rows, "
        f"{args.source} source, {args.train_seqs} training sequences. nll: exact NLL per token "
        f"under the chain (nats); the chain's own samples score "
        f"{exact_nll(truth, chain.log_prob)['per_token']:.3f} ({chain.expected_nll:.3f} in "
        f"expectation; entropy {float(unigram_entropy(truth).mean()):.3f} bits; pair_tv "
        f"{chain.pair_tv(truth):.3f}). pair_tv: total variation between the samples' pooled "
        f"neighbour pairs and the chain's pair law (the chain's own samples set the floor). "
        f"student-heun: distilled with the Heun shortcut teacher instead of RK-4. "
        + likelihood_bounds(
            models,
            held_out,
            exact_nll(held_out, chain.log_prob)["per_token"],
            args.eval_batch,
            exact=MarkovPosterior(chain, args.source) if k == 1 else None,
        )
        + f" Training seconds (this invocation): {json.dumps(seconds)}."
    )
    paths = write_results(
        rows,
        out / f"eval-{args.student_dir}",
        quality="nll",
        note=note,
        title=f"order-{k} Markov chain, {args.source} source",
    )
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copy(paths["png"], figures / f"markov{k}-{args.source}.png")
    shutil.copy(paths["json"], figures / f"markov{k}-{args.source}.json")
    print(paths["md"].read_text())


def caps(args) -> None:
    """The exact caps of issue 16 on a CPU-sized chain: the exact posterior (MarkovPosterior)
    sampled by each solver at each step count (uniform source; with the mask source, the
    path's random order against the dilated solver's planned one), scored by exact NLL, pair TV
    and transition entropy, next to the chain's own samples and the temperature frontier (the
    exact posterior at many steps and T < 1), for each Dirichlet concentration."""
    V, L = args.vocab, args.length
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    for concentration in args.concentrations:
        tag = f"caps-v{V}-l{L}-c{concentration:g}"
        out = Path(args.out or ROOT / "runs") / tag
        chain = MarkovChain(V, L, order=1, concentration=concentration, seed=args.seed)
        posterior = MarkovPosterior(chain)
        common = dict(n_samples=args.samples, batch_size=args.samples, seed=args.seed,
                      metric_fns={"chain": chain_scores(chain)}, progress=False,
                      sample_kwargs={"seq_len": L, "vocab_size": V})  # fmt: skip
        rows = sweep({"exact posterior": posterior}, steps=args.steps,
                     solvers=("cumulative", "euler", "dfm"), **common)  # fmt: skip
        # The mask source: the random order of the path against the planned (dilated) one.
        mask = {**common, "sample_kwargs": {"seq_len": L, "vocab_size": V + 1, "source": "mask"}}
        rows += sweep({"exact posterior, mask source": MarkovPosterior(chain, "mask")},
                      steps=args.steps, solvers=("cumulative", "dilated"), **mask)  # fmt: skip
        name = f"frontier, {args.frontier_steps} steps"
        rows += temperature_frontier(posterior, args.temperatures, steps=args.frontier_steps,
                                     name=name, **common)  # fmt: skip
        truth = own_samples_row(chain, args.samples, args.seed + 1)
        note = (
            f"Order-1 Markov chain, V = {V}, L = {L}, Dirichlet({concentration:g}) rows (seed "
            f"{args.seed}): exact NLL {chain.expected_nll:.4f} nats/token in expectation, "
            f"transition entropy {chain.transition_entropy:.4f} bits. The exact posterior "
            f"(forward-backward) sampled by each solver: the cap of any sampler that draws the "
            f"positions of a step independently in the path's (random) order; with the mask "
            f"source the dilated solver reveals them in a planned order instead (far-apart "
            f"positions first). {args.samples} samples per row; the chain's "
            f"own samples at the same n set the floor of pair_tv and the plug-in bias of "
            f"transition_entropy: {truth['nll']:.4f} / {truth['pair_tv']:.4f} / "
            f"{truth['transition_entropy']:.4f}."
        )
        title = f"exact caps, V = {V}, L = {L}, Dirichlet({concentration:g})"
        paths = write_results(rows, out, quality="nll", note=note, title=title)
        shutil.copy(paths["png"], figures / f"{tag}.png")
        shutil.copy(paths["json"], figures / f"{tag}.json")
        print(paths["md"].read_text())


def redi(args) -> None:
    """Rectified couplings on the CPU-sized chain (see the module docstring)."""
    run = Path(args.run)
    teacher = run / "teacher" / "model"
    if not teacher.is_dir():
        raise SystemExit(f"no teacher at {teacher}: run reproduce.py markov --vocab 32 ... first")
    chain = MarkovChain(args.vocab, args.length, order=1, concentration=args.concentration,
                        seed=args.seed)  # fmt: skip
    V, L, n = args.vocab, args.length, args.pairs
    pairs = {}
    exact = run / "couplings-exact.safetensors"
    if not exact.is_file():
        x_0, x_1 = rectified_couplings(MarkovPosterior(chain), n, steps=args.coupling_steps,
                                       batch_size=2048, seq_len=L, vocab_size=V, seed=args.seed,
                                       progress=True)  # fmt: skip
        save_couplings(exact, x_0, x_1, {"model": "exact posterior", "steps": args.coupling_steps,
                                         "seed": args.seed})  # fmt: skip
    pairs["redi-exact"] = exact
    independent = run / "couplings-independent.safetensors"
    if not independent.is_file():
        g = torch.Generator().manual_seed(args.seed + 1)
        x_1 = chain.sample(n, g)
        x_0 = torch.randint(0, V, (n, L), generator=g)
        save_couplings(independent, x_0, x_1, {"model": "the chain, independent x_0",
                                               "seed": args.seed + 1})  # fmt: skip
    pairs["dfm-independent"] = independent
    common = {"data": str(run / "train.bin"), "method": "redi", "batch_size": args.batch_size,
              "lr": args.lr, "warmup": args.train_steps // 20, "ema": 0.999, "log_every": 50,
              "device": "cpu", "seed": args.seed}  # fmt: skip
    seconds = {}
    # (name, its teacher, its couplings file: None = the mode makes them from its teacher,
    # training steps); rounds 2.. rectify redi-exact again with the mode, each from the last.
    steps = args.train_steps
    plan = [("redi-teacher", teacher, None, steps),
            *((k, teacher, v, steps) for k, v in pairs.items())]  # fmt: skip
    plan += [(f"redi-exact-r{r}", run / ("redi-exact" if r == 2 else f"redi-exact-r{r - 1}")
              / "model_ema", None, steps) for r in range(2, args.rounds + 1)]  # fmt: skip
    if args.long_train_steps:  # redi-exact trained longer (the same warm-up)
        long = args.long_train_steps
        plan.append((f"redi-exact-{long // 1000}k", teacher, exact, long))
    runs = []  # (name, its training options), trained in this order
    for name, source, path, steps in plan:
        options = dict(common, teacher=str(source), couplings=None if path is None else str(path),
                       steps=steps, eval_every=steps // 4, save_every=steps // 4)  # fmt: skip
        if path is None:
            options.update(coupling_count=n, coupling_steps=args.teacher_coupling_steps)
        runs.append((name, options))
    if args.fsdfm_steps:  # FS-DFM on the last model trained on the exact couplings, over them
        base = plan[-1][0] if args.long_train_steps else "redi-exact"
        k = args.fsdfm_steps
        for levels, tag in (("weighted", "w"), ("uniform", "u")):
            runs.append((f"{base}-fsdfm-{tag}", dict(
                common, method="fsdfm", lr=3e-4, ema=0.99, warmup=None, levels=levels,
                teacher=str(run / base / "model_ema"), couplings=str(exact), steps=k,
                eval_every=k // 4, save_every=k // 4)))  # fmt: skip
    for name, options in runs:
        start = time.perf_counter()
        train(TrainConfig(mode="distill", out=str(run / name), **options))
        seconds[name] = round(time.perf_counter() - start)
    models = {"teacher": load(teacher).eval()}
    models.update({name: load(run / name / "model_ema").eval() for name in seconds})
    # The FS-DFM students of the same teacher (reproduce.py markov), where they were made.
    students = {"fsdfm, 1/h levels": "student-w", "fsdfm, uniform levels": "student-u"}
    for name, directory in students.items():
        if (run / directory / "model_ema").is_dir():
            models[name] = load(run / directory / "model_ema").eval()
    grid = dict(steps=args.steps, n_samples=args.samples, batch_size=args.samples,
                metric_fns={"chain": chain_scores(chain)}, seed=args.seed)  # fmt: skip
    rows = sweep(models, solvers=("cumulative",), **grid)
    # The exact caps (T = 1) and the temperature frontier at every step count: a model below
    # the T = 1 row gained past the factorised step; one that only matches a colder row sharpened.
    rows += temperature_frontier(MarkovPosterior(chain), args.temperatures, name=FRONTIER,
                                 sample_kwargs={"seq_len": L, "vocab_size": V},
                                 **grid)  # fmt: skip
    truth = own_samples_row(chain, args.samples, args.seed + 2)
    note = (
        _chain_sentence(args, truth)
        + f"Each model retrained from the teacher ({teacher}) for {args.train_steps} steps on "
        f"{n} pairs: redi-teacher on the teacher's own {args.teacher_coupling_steps}-step "
        f"couplings (fsdfm distill --method redi), redi-exact on the exact posterior's "
        f"{args.coupling_steps}-step couplings, dfm-independent on the chain's samples with "
        f"independent noise (plain DFM training, the control); redi-exact-rN: the mode again "
        f"from round N - 1's model, on its own {args.teacher_coupling_steps}-step couplings; "
        f"redi-exact-Nk: redi-exact trained N thousand steps; NAME-fsdfm-w / -u: FS-DFM "
        f"students of NAME (1/h / uniform levels) distilled over the exact couplings. "
        f"Training seconds (this invocation, couplings included): "
        f"{json.dumps(seconds)}."
    )
    _frontier_report(rows, truth, run / "eval-redi", "redi", "rectified couplings", note, args)


def _chain_sentence(args, truth: dict, source: str = "") -> str:
    """The first sentence of a chain experiment's note: the chain and its own samples' scores."""
    return (
        f"Order-1 Markov chain, V = {args.vocab}, L = {args.length}, "
        f"Dirichlet({args.concentration:g}) (seed {args.seed}){source}: the chain's own samples "
        f"score NLL {truth['nll']:.4f}, pair TV {truth['pair_tv']:.4f}, transition entropy "
        f"{truth['transition_entropy']:.4f} bits. "
    )


def _frontier_report(rows, truth, out: Path, name: str, what: str, note: str, args) -> None:
    """Write a chain experiment's rows (and the chain's own samples, ``truth``) to ``out``, plot
    them against the frontier rows ("exact posterior, T = ..."), and copy the table's JSON and
    both figures to ``--figures`` as NAME-vV-lL[-cC].{json,png} and ...-frontier.png."""
    V, L, law = args.vocab, args.length, f"Dirichlet({args.concentration:g})"
    paths = write_results(rows + [truth], out, quality="nll", note=note,
                          title=f"{what}, V = {V}, L = {L}, {law}")  # fmt: skip
    frontier = [FRONTIER.format(temperature=t) for t in args.temperatures]
    plot_frontier(rows, out / "frontier.png", frontier=frontier,
                  steps=[s for s in args.steps if s > 1], reference=truth,
                  title=f"{what} against the temperature frontier, V = {V}, L = {L}, "
                  f"{law}")  # fmt: skip
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    tag = f"{name}-v{V}-l{L}" + ("" if args.concentration == 0.1 else f"-c{args.concentration:g}")
    shutil.copy(paths["png"], figures / f"{tag}.png")
    shutil.copy(paths["json"], figures / f"{tag}.json")
    shutil.copy(out / "frontier.png", figures / f"{tag}-frontier.png")
    print(paths["md"].read_text())


def dilated(args) -> None:
    """The dilated solver on the CPU-sized chain (see the module docstring)."""
    run = Path(args.run)
    teacher = run / "teacher" / "model"
    if not teacher.is_dir():
        raise SystemExit(
            f"no teacher at {teacher}: run reproduce.py markov --source mask --vocab 32 ... first"
        )
    V, L = args.vocab, args.length
    chain = MarkovChain(V, L, order=1, concentration=args.concentration, seed=args.seed)
    models = {"teacher": load(teacher).eval()}
    if (run / args.student_dir / "model_ema").is_dir():
        models["fsdfm student"] = load(run / args.student_dir / "model_ema").eval()
    if any(model.config.source != "mask" for model in models.values()):
        raise SystemExit(f"the models of {run} are not mask-source models")
    grid = dict(steps=args.steps, n_samples=args.samples, batch_size=args.samples,
                metric_fns={"chain": chain_scores(chain)}, seed=args.seed)  # fmt: skip
    rows = sweep(models, solvers=("cumulative", "dilated"), **grid)
    # The exact posterior in the path's random order (the factorised cap), and with the dilated
    # solver at each temperature: the frontier of the planned step.
    posterior = MarkovPosterior(chain, "mask")
    kwargs = {"seq_len": L, "vocab_size": V + 1, "source": "mask"}
    rows += sweep({"exact posterior, random order": posterior}, solvers=("cumulative",),
                  sample_kwargs=kwargs, **grid)  # fmt: skip
    rows += temperature_frontier(posterior, args.temperatures, solver="dilated", name=FRONTIER,
                                 sample_kwargs=kwargs, **grid)  # fmt: skip
    truth = own_samples_row(chain, args.samples, args.seed + 2)
    note = (
        _chain_sentence(args, truth, ", mask source")
        + f"The teacher and FS-DFM student of {run} sampled in the path's random order "
        f"(cumulative: each masked position revealed independently) and in the dilated order "
        f"(fsdfm.dilation); the exact posterior in the random order (the factorised cap) and "
        f"with the dilated solver at each temperature (the frontier)."
    )
    _frontier_report(rows, truth, run / "eval-dilated", "dilated", "the dilated solver", note,
                     args)  # fmt: skip


def text(args) -> None:
    from fsdfm.data import Blocks, prepare_tokens

    run = Path(args.run)
    tokens = sorted((run / "teacher" / "data").glob("*.bin"))
    if not tokens:
        raise SystemExit(f"no token file under {run}/teacher/data: run scripts/train_default.sh")
    scorer_dir = run / "scorer"
    if not (scorer_dir / "scorer.json").exists():
        train_scorer(tokens[0], scorer_dir, steps=args.scorer_steps, batch_size=16, seq_len=256)
    scorer_info = json.loads((scorer_dir / "scorer.json").read_text())
    gen_ppl = gen_ppl_metric(str(scorer_dir), batch_size=args.eval_batch, device="cpu")
    models = {
        "teacher": load(run / "teacher" / "model_ema").eval(),
        "student": load(run / args.student_dir / "model_ema").eval(),
    }
    seq_len = models["student"].config.seq_len
    blocks = Blocks(prepare_tokens(tokens[0], None, run), seq_len, 0.01)
    held_out = blocks.get(list(blocks.val_indices())[: args.samples])

    rows = evaluate(models, args, {"gen_ppl": gen_ppl})
    data = gen_ppl(held_out)
    teacher_val = [
        json.loads(line)
        for line in (run / "teacher" / "metrics.jsonl").read_text().splitlines()
        if "val_loss_ema" in line
    ][-1]
    note = (
        f"The bundled model's teacher and student (scripts/train_default.sh), {args.samples} "
        f"samples of {seq_len} tokens per setting ({args.samples_long} at {args.long_steps} "
        f"steps). gen_ppl: generative perplexity (mean over samples; gen_ppl_corpus pools the "
        f"tokens) under a {scorer_info['parameters'] / 1e6:.1f}M-parameter GPT-2 trained on the "
        f"same tokens for {scorer_info['steps']} steps (held-out loss "
        f"{scorer_info['val_loss']:.3f} nats/token); held-out real text scores "
        f"{data['gen_ppl']:.1f} ({data['gen_ppl_corpus']:.1f} pooled) with entropy "
        f"{float(unigram_entropy(held_out).mean()):.2f} bits. The teacher's pre-training "
        f"held-out loss (EMA, step {teacher_val['step']}): {teacher_val['val_loss_ema']:.3f}. "
        + likelihood_bounds(models, held_out, batch_size=args.eval_batch)
    )
    paths = write_results(
        rows,
        run / f"eval-{args.student_dir}",
        quality="gen_ppl",
        note=note,
        title="the bundled model on real text",
    )
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copy(paths["png"], figures / "default-text.png")
    print(paths["md"].read_text())


def replot(args) -> None:
    """Rewrite results.md / results.png of finished sweeps from their results.json (the note is
    kept from results.md), without sampling again: ``replot runs/checkerboard-uniform``."""
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    for results in sorted(Path(args.run).glob("eval-*/results.json")):
        rows = json.loads(results.read_text())
        text = results.with_suffix(".md").read_text().split("\n\n")
        title, note = text[0].removeprefix("# "), text[1]
        board = "black" in rows[0]
        paths = write_results(
            rows,
            results.parent,
            quality="black" if board else "nll",
            lower_is_better=not board,
            title=title,
            note=note,
        )
        student = results.parent.name.removeprefix("eval-")
        tag = Path(args.run).name + ("" if student == "student" else f"-{student}")
        shutil.copy(paths["png"], figures / f"{tag}.png")
        print(f"rewrote {paths['md']} and {figures / f'{tag}.png'}", file=sys.stderr)


# The figures of docs/results.md whose sweeps are kept as JSON there: name -> (quality, title).
FIGURE_SWEEPS = {
    "default-text": ("gen_ppl", "the bundled model: generative perplexity against steps"),
    "markov1-uniform": ("nll", "order-1 Markov chain (V = 256, L = 128): exact NLL against steps"),
}


def replot_figures(args) -> None:
    """Redraw the figures of docs/results.md from the sweeps kept beside them
    (``docs/figures/NAME.json``): the same rows, today's plot (the DFM baseline as a line, the
    band within 10% of it, error bars where the rows carry standard errors)."""
    figures = Path(args.figures)
    for name, (quality, title) in FIGURE_SWEEPS.items():
        rows = json.loads((figures / f"{name}.json").read_text())
        with tempfile.TemporaryDirectory() as scratch:
            paths = write_results(rows, scratch, quality=quality, title=title)
            shutil.copy(paths["png"], figures / f"{name}.png")
        print(f"rewrote {figures / f'{name}.png'}", file=sys.stderr)


def _steps(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(","))


def _quartered(text: str) -> int:
    """A training length saved and evaluated every quarter: 0 (none) or at least 4."""
    n = int(text)
    if n != 0 and n < 4:
        raise argparse.ArgumentTypeError(f"0 (none) or at least 4 steps, got {n}")
    return n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="problem", required=True)
    for name, defaults in (
        (
            "checkerboard",
            dict(
                teacher_steps=10000,
                student_steps=3000,
                batch_size=256,
                teacher_lr=1e-3,
                ema=0.999,
                eval_every=500,
                steps=(1, 2, 4, 8, 16),
                samples=50000,
                samples_long=5000,
                eval_batch=10000,
            ),
        ),
        (
            "markov",
            # The H200 run of docs/results.md (about 5 minutes there; far too long for a CPU).
            dict(
                teacher_steps=10000,
                student_steps=1500,
                batch_size=256,
                teacher_lr=2e-3,
                ema=0.99,
                eval_every=2000,
                steps=(1, 2, 4, 8, 16, 64, 256),
                samples=1024,
                samples_long=1024,
                eval_batch=1024,
            ),
        ),
    ):
        p = sub.add_parser(name)
        p.add_argument("--source", choices=["uniform", "mask"], default="uniform")
        p.add_argument("--out", default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--figures", default=str(FIGURES), help="where the plots are copied")
        p.add_argument("--teacher-steps", type=int, default=defaults["teacher_steps"])
        p.add_argument("--student-steps", type=int, default=defaults["student_steps"])
        p.add_argument("--teacher-lr", type=float, default=defaults["teacher_lr"])
        p.add_argument("--student-lr", type=float, default=3e-4)
        p.add_argument("--ema", type=float, default=defaults["ema"])
        p.add_argument(
            "--student-dir",
            default="student",
            help="the student's directory under --out (another name trains another student)",
        )
        p.add_argument("--batch-size", type=int, default=defaults["batch_size"])
        p.add_argument(
            "--device",
            choices=("cpu", "cuda"),
            default=None,
            help="where to train and sample (default: cuda when available)",
        )
        p.add_argument("--eval-every", type=int, default=defaults["eval_every"])
        p.add_argument(
            "--steps",
            type=_steps,
            default=defaults["steps"],
            help="the few-step budgets, comma-separated",
        )
        p.add_argument("--long-steps", type=int, default=1024, help="the baseline's budget")
        p.add_argument("--samples", type=int, default=defaults["samples"])
        p.add_argument("--samples-long", type=int, default=defaults["samples_long"])
        p.add_argument("--eval-batch", type=int, default=defaults["eval_batch"])
        if name == "checkerboard":
            p.add_argument("--train-pairs", type=int, default=200000)
        else:
            p.add_argument("--vocab", type=int, default=256)
            p.add_argument("--length", type=int, default=128)
            p.add_argument("--order", type=int, choices=(1, 2), default=1)
            p.add_argument("--concentration", type=float, default=0.1)
            p.add_argument("--train-seqs", type=int, default=100000)
            p.add_argument(
                "--levels",
                choices=("weighted", "uniform", "curriculum"),
                default="weighted",
                help="the students' step-size law (fsdfm distill --levels)",
            )
            p.add_argument(
                "--heun-dir",
                default="student-heun",
                help="a second student distilled with the Heun shortcut teacher ('' for none)",
            )
    o = sub.add_parser("oracle", help="the checkerboard sampled with its exact denoiser")
    o.add_argument("--source", choices=["uniform", "mask"], default="uniform")
    o.add_argument("--out", default=None)
    o.add_argument("--steps", type=_steps, default=(1, 2, 4, 8, 16))
    o.add_argument("--samples", type=int, default=8000)
    o.add_argument("--eval-batch", type=int, default=1000)
    o.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("text", help="the bundled model's teacher and student on real text")
    t.add_argument("--run", default=str(ROOT / "runs" / "default"), help="train_default's WORK")
    t.add_argument("--student-dir", default="student")
    t.add_argument("--scorer-steps", type=int, default=600)
    t.add_argument("--steps", type=_steps, default=(1, 2, 4, 8))
    t.add_argument("--long-steps", type=int, default=1024)
    t.add_argument("--samples", type=int, default=16)
    t.add_argument("--samples-long", type=int, default=16)
    t.add_argument("--eval-batch", type=int, default=16)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--figures", default=str(FIGURES), help="where the plot is copied")
    r = sub.add_parser("replot", help="rewrite the tables and plots of a run from its JSON")
    r.add_argument("run", help="a run directory, e.g. runs/checkerboard-uniform")
    r.add_argument("--figures", default=str(FIGURES), help="where the plots are copied")
    c = sub.add_parser("caps", help="exact caps of the solvers on a CPU-sized Markov chain")
    c.add_argument("--vocab", type=int, default=32)
    c.add_argument("--length", type=int, default=32)
    c.add_argument("--concentrations", type=float, nargs="+", default=[0.1, 0.3])
    c.add_argument("--steps", type=_steps, default=(1, 2, 4, 8, 16, 64))
    c.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7])
    c.add_argument("--frontier-steps", type=int, default=64)
    c.add_argument("--samples", type=int, default=4096)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=None, help="runs directory (default runs/)")
    c.add_argument("--figures", default=str(FIGURES))
    d = sub.add_parser("redi", help="rectified couplings (distill --method redi) on that chain")
    d.add_argument(
        "--run",
        default=str(ROOT / "runs" / "markov-cpu"),
        help="a markov run with --vocab 32 --length 32 (its teacher and train.bin)",
    )
    d.add_argument("--vocab", type=int, default=32)
    d.add_argument("--length", type=int, default=32)
    d.add_argument("--concentration", type=float, default=0.1)
    d.add_argument("--pairs", type=int, default=32768)
    d.add_argument("--coupling-steps", type=int, default=128, help="the exact posterior's")
    d.add_argument("--teacher-coupling-steps", type=int, default=64)
    d.add_argument("--train-steps", type=int, default=3000)
    d.add_argument("--rounds", type=int, default=1, help="rectifications of redi-exact")
    d.add_argument(
        "--long-train-steps",
        type=int,
        default=0,
        help="also train redi-exact this long (e.g. 9000: redi-exact-9k)",
    )
    d.add_argument(
        "--fsdfm-steps",
        type=_quartered,
        default=0,
        help="also distil FS-DFM students (1/h and uniform levels) of the last model trained on "
        "the exact couplings, over those couplings, for this many steps",
    )
    d.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.9, 0.8])
    d.add_argument("--batch-size", type=int, default=128)
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--steps", type=_steps, default=(1, 2, 4, 8, 16))
    d.add_argument("--samples", type=int, default=2048)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--figures", default=str(FIGURES))
    m = sub.add_parser("dilated", help="the dilated solver (mask source) on that chain")
    m.add_argument(
        "--run",
        default=str(ROOT / "runs" / "markov-cpu-mask"),
        help="a markov run with --source mask --vocab 32 --length 32 (its teacher and student)",
    )
    m.add_argument("--student-dir", default="student-w")
    m.add_argument("--vocab", type=int, default=32)
    m.add_argument("--length", type=int, default=32)
    m.add_argument("--concentration", type=float, default=0.1)
    m.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.9, 0.8])
    m.add_argument("--steps", type=_steps, default=(1, 2, 4, 8, 16))
    m.add_argument("--samples", type=int, default=2048)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--figures", default=str(FIGURES))
    f = sub.add_parser("figures", help="redraw docs/figures from the sweeps kept there as JSON")
    f.add_argument("--figures", default=str(FIGURES), help="the figures directory")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: other jobs share the cores)"
    )
    args = parser.parse_args(argv)
    # One thread by default: the 2 cores are shared, and oversubscribed OpenMP threads run
    # 10x slower. --threads 2 for a run that has the machine to itself.
    torch.set_num_threads(args.threads)
    if "device" in args:
        args.device = resolve_device(args.device, "--device").type
    problems = {
        "checkerboard": checkerboard,
        "markov": markov,
        "oracle": oracle,
        "text": text,
        "replot": replot,
        "figures": replot_figures,
        "caps": caps,
        "redi": redi,
        "dilated": dilated,
    }
    problems[args.problem](args)


if __name__ == "__main__":
    main()
