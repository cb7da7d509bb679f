"""Evaluation sweeps: sample quality against the number of steps (SPEC 5).

- :func:`sweep`: for each model, solver and step count, draw samples with :func:`fsdfm.sample`
  and score them: one row per configuration with the number of model calls (NFE), the metrics,
  the mean unigram entropy (bits) and the wall-clock time of sampling.
- :func:`write_results`: rows -> ``results.json``, ``results.md`` (a markdown table) and
  ``results.png`` (a metric and entropy against the steps, one line per model and solver).
- :func:`temperature_frontier` / :func:`plot_frontier`: a reference sampler at several
  temperatures as a curve of quality against joint structure, and the models placed on it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from fsdfm._args import (
    check_vocabulary,
    model_device,
    positive_int,
    resolve_device,
    seeded_generator,
)
from fsdfm._io import Staging, figure_bytes, save_figure
from fsdfm.metrics import generative_perplexity, load_scorer, unigram_entropy
from fsdfm.progress import Progress
from fsdfm.solver import SOLVERS
from fsdfm.solver import sample as fsdfm_sample

__all__ = [
    "STEPS",
    "baseline_row",
    "gen_ppl_metric",
    "markdown_table",
    "plot_frontier",
    "sweep",
    "temperature_frontier",
    "write_results",
]

STEPS = tuple(2**k for k in range(11))  # 1, 2, 4, ..., 1024
# Columns every row has, in this order; the metric columns come after them.
BASE_COLUMNS = ("model", "solver", "steps", "nfe", "n")
TAIL_COLUMNS = ("entropy", "entropy_se", "seconds")


# ----------------------------------------------------------------------------------------------
# Sweeps


def sweep(
    models: Mapping[str, Callable],
    *,
    steps: Sequence[int] = STEPS,
    solvers: Sequence[str] | Mapping[str, Sequence[str]] = ("cumulative", "dfm"),
    n_samples: int = 256,
    batch_size: int = 64,
    metric_fns: Mapping[str, Callable[[torch.Tensor], float]] | None = None,
    seed: int = 0,
    progress: bool = True,
    sample_kwargs: Mapping | None = None,
    device: torch.device | str | None = None,
    on_samples: Callable[[dict, torch.Tensor], None] | None = None,
) -> list[dict]:
    """Sample from every model with every solver at every step count and score the samples.

    models: name -> an fsdfm model or any callable ``model(x_t, t, h)`` (see :func:`fsdfm.sample`).
    solvers: the solvers for every model, or name -> solvers (e.g. a student with "cumulative"
        only; the "dfm" solver ignores what a student learnt about big steps).
    n_samples, batch_size: samples per configuration, drawn ``batch_size`` at a time.
    metric_fns: name -> ``fn(tokens [n, L])`` returning a float (the column ``name``) or a dict
        of floats (its keys become columns), e.g. generative perplexity, exact NLL, total
        variation; every row also gets ``entropy``, the mean unigram entropy in bits.
    seed: every configuration draws from a generator seeded with ``seed``, so that the rows share
        their random numbers as far as the solvers allow (common random numbers make differences
        between rows less noisy than independent draws would).
    sample_kwargs: passed to :func:`fsdfm.sample` (seq_len, source, temperature ...).
    on_samples: ``on_samples(row, tokens)`` after each configuration, to keep or plot samples.
    Returns one dict per configuration: model, solver, steps, nfe (model calls: one per step),
    n, the metrics, entropy and its standard error over the samples (entropy_se), seconds
    (sampling only, not scoring). A metric may add ``<name>_se`` columns: the plots draw them as
    error bars.
    """
    positive_int(n_samples, "n_samples")
    positive_int(batch_size, "batch_size")
    for k in steps:
        positive_int(k, "every entry of steps")
    per_model = {
        name: tuple(solvers[name] if isinstance(solvers, Mapping) else solvers) for name in models
    }
    for name, chosen in per_model.items():
        bad = [s for s in chosen if s not in SOLVERS]
        if bad or not chosen:
            raise ValueError(f"solvers for {name!r} must be some of {SOLVERS}, got {chosen}")
    metric_fns = dict(metric_fns or {})
    clash = set(metric_fns) & {*BASE_COLUMNS, *TAIL_COLUMNS}
    if clash:
        raise ValueError(f"metric names {sorted(clash)} clash with the standard columns")
    _check_scorer_vocabularies(models, metric_fns)
    plan = [(name, solver, k) for name in models for solver in per_model[name] for k in steps]
    # Weighted by model calls, so that the rate and the time left are meaningful.
    bar = Progress(sum(k for *_, k in plan), "fsdfm eval", unit="NFE", enabled=progress)
    rows = []
    try:
        for name, solver, k in plan:
            bar.note(model=name, solver=solver, steps=k)
            tokens, seconds = _draw(
                models[name], solver, k, n_samples, batch_size, seed, sample_kwargs, device
            )
            row = {"model": name, "solver": solver, "steps": k, "nfe": k, "n": n_samples}
            for metric, fn in metric_fns.items():
                value = fn(tokens)
                if isinstance(value, Mapping):
                    row.update({key: float(v) for key, v in value.items()})
                else:
                    row[metric] = float(value)
            entropy = unigram_entropy(tokens).double()
            row["entropy"] = float(entropy.mean())
            row["entropy_se"] = _standard_error(entropy)
            row["seconds"] = seconds
            rows.append(row)
            if on_samples is not None:
                on_samples(row, tokens)
            bar.update(k)
    finally:
        bar.close()
    return rows


def _draw(model, solver, steps, n, batch_size, seed, sample_kwargs, device):
    """n samples [n, L] on the CPU and the seconds that sampling took."""
    kwargs = dict(sample_kwargs or {})
    if device is not None:
        kwargs["device"] = device
    where = torch.device(device) if device is not None else model_device(model) or "cpu"
    generator = seeded_generator(seed, where)
    parts = []
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, n, batch_size):
            size = min(batch_size, n - first)
            parts.append(
                fsdfm_sample(
                    model, steps, batch_size=size, solver=solver, generator=generator, **kwargs
                ).cpu()
            )
    return torch.cat(parts), time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Results files


def temperature_frontier(
    model: Callable,
    temperatures: Sequence[float] = (1.0, 0.9, 0.8, 0.7),
    *,
    steps: int | Sequence[int] = 64,
    solver: str = "cumulative",
    name: str = "frontier",
    sample_kwargs: Mapping | None = None,
    **sweep_kwargs,
) -> list[dict]:
    """The rows of one sampler (``model`` with ``solver`` at ``steps``, one step count or
    several) at each temperature, with a ``temperature`` column: a reference curve of quality
    against joint structure (exact NLL against transition entropy, say). Lowering the
    temperature moves a sampler along this curve (sharper transitions, lower NLL); a method that
    lands below it (lower NLL at the same transition entropy) gained something that sharpening
    alone does not give. With the exact posterior (:class:`fsdfm.synthetic.MarkovPosterior`) and
    many steps the curve passes through the law itself at T = 1. ``name`` is the rows' model
    name; it may hold ``{temperature}`` (e.g. "exact posterior, T = {temperature:g}") to name
    each temperature apart, as :func:`plot_frontier` takes them. Other arguments as
    :func:`sweep` (metric_fns, n_samples, seed, ...)."""
    counts = (steps,) if isinstance(steps, int) else tuple(steps)
    rows = []
    for temperature in temperatures:
        kwargs = {**(sample_kwargs or {}), "temperature": temperature}
        label = name.format(temperature=temperature)
        for row in sweep({label: model}, steps=counts, solvers=(solver,), sample_kwargs=kwargs,
                         **sweep_kwargs):  # fmt: skip
            rows.append({**row, "temperature": temperature})
    return rows


def _columns(rows: Sequence[dict]) -> list[str]:
    metrics = []
    for row in rows:
        for key in row:
            if key not in BASE_COLUMNS and key not in TAIL_COLUMNS and key not in metrics:
                metrics.append(key)
    return [*BASE_COLUMNS, *metrics, *TAIL_COLUMNS]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a markdown table, one column per key (standard columns first)."""
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    rows: Sequence[dict],
    out_dir: str | Path,
    *,
    quality: str | None = None,
    title: str | None = None,
    note: str | None = None,
    lower_is_better: bool = True,
) -> dict[str, Path]:
    """Write ``results.json`` (the rows), ``results.md`` (title, note, table) and ``results.png``
    (``quality`` and entropy against the steps on a log scale, one line per model and solver) into
    ``out_dir``. quality: the metric to plot (default: the first metric column; with none, only
    entropy is plotted). Returns {"json", "md", "png"} -> paths."""
    if not rows:
        raise ValueError("no rows to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows)
    metrics = [c for c in columns if c not in BASE_COLUMNS and c not in TAIL_COLUMNS]
    if quality is None:
        quality = metrics[0] if metrics else None
    elif quality not in metrics:
        raise ValueError(f"quality {quality!r} is not a metric of the rows: {metrics}")
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    text = []
    if title:
        text.append(f"# {title}\n")
    if note:
        text.append(note.strip() + "\n")
    text.append(markdown_table(rows))
    contents = {
        "json": (json.dumps(list(rows), indent=1) + "\n").encode(),
        "md": "\n".join(text).encode(),
        "png": _plot(rows, quality, title, lower_is_better),
    }
    with Staging() as stage:  # all rendered first: an error leaves the old files as they were
        for key, data in contents.items():
            stage.write(paths[key], lambda f, data=data: f.write(data))
        stage.commit()
    return paths


def _standard_error(values: torch.Tensor) -> float:
    """The standard error of the mean of per-sample values (0 for a single sample)."""
    n = values.numel()
    return float(values.double().std() / math.sqrt(n)) if n > 1 else 0.0


def baseline_row(rows: Sequence[dict]) -> dict | None:
    """The reference the plots draw as a line: the "dfm" row with the most steps (the
    1,024-step DFM baseline of a full sweep), or None without DFM rows."""
    dfm = [r for r in rows if r["solver"] == "dfm"]
    return max(dfm, key=lambda r: r["steps"]) if dfm else None


def _plot(rows, quality: str | None, title: str | None, lower_is_better: bool) -> bytes:
    """The PNG of quality and entropy against the steps (log axis), one line per model and
    solver, with error bars where the rows carry ``<key>_se``; the DFM baseline
    (:func:`baseline_row`) as a dashed line, and on the quality panel the band within 10% of it
    (the paper's target)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    panels = [quality, "entropy"] if quality else ["entropy"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    lines: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        lines.setdefault((row["model"], row["solver"]), []).append(row)
    base = baseline_row(rows)
    for ax, key in zip(axes[0], panels, strict=True):
        for (model, solver), group in lines.items():
            group = sorted((r for r in group if r.get(key) is not None), key=lambda r: r["steps"])
            if group:
                errors = [r.get(f"{key}_se") for r in group]
                ax.errorbar(
                    [r["steps"] for r in group],
                    [r[key] for r in group],
                    yerr=errors if all(e is not None for e in errors) else None,
                    marker="o",
                    markersize=3,
                    capsize=2,
                    label=f"{model} ({solver})",
                )
        if base is not None and base.get(key) is not None:
            value = base[key]
            ax.axhline(value, color="k", linestyle="--", linewidth=0.8,
                       label=f"{base['model']} dfm, {base['steps']} steps")  # fmt: skip
            if key == quality:
                ax.axhspan(0.9 * value, 1.1 * value, color="gray", alpha=0.15, label="±10%")
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if key == quality and values and max(values) > 10 * min(values):
            ax.set_yscale("log")  # a range this wide would flatten the band around the baseline
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps (NFE)")
        better = "lower" if lower_is_better else "higher"
        ax.set_ylabel(f"{key} ({better} is better)" if key == quality else "entropy (bits)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png = figure_bytes(fig)
    plt.close(fig)
    return png


def plot_frontier(
    rows: Sequence[dict],
    path: str | Path,
    *,
    frontier: Sequence[str],
    steps: Sequence[int],
    x: str = "transition_entropy",
    y: str = "nll",
    reference: dict | None = None,
    title: str | None = None,
) -> Path:
    """One panel per step count in ``steps``: ``y`` against ``x`` for every row at that count,
    the rows of the models named in ``frontier`` (a reference sampler at several temperatures,
    e.g. the exact posterior) joined as a curve, every other model a point; ``reference`` (a
    row, e.g. the law's own samples) a star in every panel. A point below the curve has a lower
    ``y`` than the reference sampler reaches by cooling to the same ``x``: a gain that
    sharpening alone does not give. Writes ``path`` (PNG) and returns it."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    for row in rows:
        missing = [key for key in (x, y) if row.get(key) is None]
        if missing:
            raise ValueError(f"row {row.get('model')!r} at {row.get('steps')} steps has no "
                             f"{missing[0]!r}")  # fmt: skip
    # A model sampled with several solvers is told apart by its solver in the legend.
    solvers = {}
    for row in rows:
        solvers.setdefault(row["model"], set()).add(row.get("solver"))
    several = {model for model, used in solvers.items() if len(used) > 1}
    fig, axes = plt.subplots(1, len(steps), figsize=(4.2 * len(steps), 3.6), squeeze=False)
    for ax, count in zip(axes[0], steps, strict=True):
        here = [r for r in rows if r["steps"] == count]
        curve = sorted((r for r in here if r["model"] in frontier), key=lambda r: r[x])
        if not curve:
            raise ValueError(f"no rows of the frontier models {list(frontier)} at {count} steps")
        ax.plot([r[x] for r in curve], [r[y] for r in curve], "k-", marker=".", linewidth=1,
                label="frontier")  # fmt: skip
        for r in curve:
            ax.annotate(r["model"].split(", ")[-1], (r[x], r[y]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))  # fmt: skip
        for r in here:
            if r["model"] not in frontier:
                label = r["model"] + (f" ({r['solver']})" if r["model"] in several else "")
                ax.plot(r[x], r[y], marker="o", linestyle="none", label=label)
        if reference is not None:
            ax.plot(reference[x], reference[y], marker="*", markersize=10, color="gold",
                    markeredgecolor="k", linestyle="none", label=reference["model"])  # fmt: skip
        ax.set_title(f"{count} step{'s' if count > 1 else ''}", fontsize=9)
        ax.set_xlabel(x)
        ax.set_ylabel(f"{y} (lower is better)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Metrics


def gen_ppl_metric(scorer, *, batch_size: int = 16, device=None) -> Callable:
    """A :func:`sweep` metric: tokens [n, L] -> {"gen_ppl": the mean over samples of
    generative perplexity under ``scorer``, "gen_ppl_se": its standard error, "gen_ppl_corpus":
    the pooled one}; ``scorer`` as
    :func:`fsdfm.metrics.generative_perplexity` takes it, loaded here once if a name. The
    metric's ``vocab_size`` is the scorer's, which :func:`sweep` compares with each model's."""
    device = resolve_device(device)
    name = scorer if isinstance(scorer, str) else type(scorer).__name__
    scorer = load_scorer(scorer, device)

    def metric(tokens: torch.Tensor) -> dict[str, float]:
        result = generative_perplexity(tokens, scorer, batch_size=batch_size, device=device)
        return {
            "gen_ppl": result["mean"],
            "gen_ppl_se": _standard_error(result["per_sample"]),
            "gen_ppl_corpus": result["corpus"],
        }

    metric.vocab_size = getattr(getattr(scorer, "config", None), "vocab_size", None)
    metric.scorer_name = name
    return metric


def _check_scorer_vocabularies(models: Mapping, metric_fns: Mapping) -> None:
    """A scorer reads the samples' token ids as its own: the perplexity means something only
    if it has the model's tokenizer."""
    for metric_name, fn in metric_fns.items():
        scorer = f"{metric_name}: the scorer {getattr(fn, 'scorer_name', '')}"
        for model_name, model in models.items():
            size = getattr(fn, "vocab_size", None)
            check_vocabulary(scorer, size, getattr(model, "config", None), f"model {model_name!r}")
