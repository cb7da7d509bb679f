"""Evaluation sweeps: sample quality against the number of steps (SPEC 5), and synthetic laws
with a known answer for the small reproductions of the paper's claim (docs/results.md).

- :func:`sweep`: for each model, solver and step count, draw samples with :func:`fsdfm.sample`
  and score them: one row per configuration with the number of model calls (NFE), the metrics,
  the mean unigram entropy (bits) and the wall-clock time of sampling.
- :func:`write_results`: rows -> ``results.json``, ``results.md`` (a markdown table) and
  ``results.png`` (a metric and entropy against the steps, one line per model and solver).
- :func:`checkerboard_law`, :func:`checkerboard_scores`: the 2-D checkerboard of the paper's
  figure as a law over V^2 and the scores of samples against it (total variation per cell and per
  block, with the floor that sampling noise alone gives, and the mass on the black squares).
- :func:`train_scorer`: a small autoregressive GPT-2 (`transformers`) trained on the same tokens
  as the models it will score, for generative perplexity where no pre-trained scorer of that
  tokenizer exists (a BPE of the project's own, or no downloads).
- :class:`ExactPosterior`: the exact denoiser of a small joint law, a model that knows the answer:
  what any few-step sampler reaches with a perfect teacher (docs/results.md).
- :class:`MarkovChain`: a random Markov chain of order 1 or 2 over V symbols, its samples and its
  exact log-probability (for :func:`fsdfm.metrics.exact_nll`).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from fsdfm.metrics import generative_perplexity, load_scorer, total_variation, unigram_entropy
from fsdfm.solver import SOLVERS, model_device
from fsdfm.solver import sample as fsdfm_sample

__all__ = [
    "STEPS",
    "ExactPosterior",
    "MarkovChain",
    "checkerboard_law",
    "checkerboard_scores",
    "gen_ppl_metric",
    "markdown_table",
    "sweep",
    "train_scorer",
    "tv_noise_floor",
    "write_results",
]

STEPS = tuple(2**k for k in range(11))  # 1, 2, 4, ..., 1024
# Columns every row has, in this order; the metric columns come after them.
BASE_COLUMNS = ("model", "solver", "steps", "nfe", "n")
TAIL_COLUMNS = ("entropy", "seconds")


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
    n, the metrics, entropy, seconds (sampling only, not scoring).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for k in steps:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"steps must be positive integers, got {k!r}")
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
    plan = [(name, solver, k) for name in models for solver in per_model[name] for k in steps]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # Weighted by model calls, so that the bar's rate and time left are meaningful.
        bar = tqdm(total=sum(k for *_, k in plan), desc="fsdfm eval", unit="NFE")
    rows = []
    try:
        for name, solver, k in plan:
            if bar is not None:
                bar.set_postfix_str(f"{name} {solver} {k} steps")
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
            row["entropy"] = float(unigram_entropy(tokens).mean())
            row["seconds"] = seconds
            rows.append(row)
            if on_samples is not None:
                on_samples(row, tokens)
            if bar is not None:
                bar.update(k)
    finally:
        if bar is not None:
            bar.close()
    return rows


def _draw(model, solver, steps, n, batch_size, seed, sample_kwargs, device):
    """n samples [n, L] on the CPU and the seconds that sampling took."""
    kwargs = dict(sample_kwargs or {})
    if device is not None:
        kwargs["device"] = device
    where = torch.device(device) if device is not None else model_device(model) or "cpu"
    generator = torch.Generator(where).manual_seed(seed)
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
    paths["json"].write_text(json.dumps(list(rows), indent=1) + "\n")
    text = []
    if title:
        text.append(f"# {title}\n")
    if note:
        text.append(note.strip() + "\n")
    text.append(markdown_table(rows))
    paths["md"].write_text("\n".join(text))
    _plot(rows, paths["png"], quality, title, lower_is_better)
    return paths


def _plot(rows, path: Path, quality: str | None, title: str | None, lower_is_better: bool):
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    panels = [quality, "entropy"] if quality else ["entropy"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    lines: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        lines.setdefault((row["model"], row["solver"]), []).append(row)
    for ax, key in zip(axes[0], panels, strict=True):
        for (model, solver), group in lines.items():
            group = sorted((r for r in group if r.get(key) is not None), key=lambda r: r["steps"])
            if group:
                ax.plot(
                    [r["steps"] for r in group],
                    [r[key] for r in group],
                    marker="o",
                    markersize=3,
                    label=f"{model} ({solver})",
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps (NFE)")
        better = "lower" if lower_is_better else "higher"
        ax.set_ylabel(f"{key} ({better} is better)" if key == quality else "entropy (bits)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The checkerboard


def checkerboard_law(vocab_size: int = 128, squares: int = 8) -> torch.Tensor:
    """The law [V, V] (float64) of (x, y) uniform on the black squares of a ``squares`` x
    ``squares`` checkerboard laid over the V x V grid: cell (x, y) is black when
    (x // s + y // s) is even, s = V / squares cells per square side. Half the cells are black,
    and both marginals are uniform: only the joint law tells the board from noise."""
    if vocab_size % squares:
        raise ValueError(f"squares = {squares} must divide vocab_size = {vocab_size}")
    side = vocab_size // squares
    block = torch.arange(vocab_size) // side
    black = (block[:, None] + block[None, :]) % 2 == 0
    return black.double() / black.sum()


def _coarsen(law: torch.Tensor, factor: int) -> torch.Tensor:
    V = law.shape[0]
    return law.reshape(V // factor, factor, V // factor, factor).sum((1, 3))


def tv_noise_floor(law: torch.Tensor, n: int, *, repeats: int = 3, seed: int = 0) -> float:
    """Mean total variation between ``law`` (any shape) and the empirical law of n exact draws
    from it: what a perfect sampler scores with n samples."""
    flat = law.double().flatten()
    g = torch.Generator().manual_seed(seed)
    tvs = []
    for _ in range(repeats):
        counts = torch.bincount(
            torch.multinomial(flat, n, replacement=True, generator=g), minlength=flat.numel()
        )
        tvs.append(0.5 * float((counts.double() / n - flat).abs().sum()))
    return sum(tvs) / len(tvs)


def checkerboard_scores(
    tokens: torch.Tensor, law: torch.Tensor, *, block: int = 8
) -> dict[str, float]:
    """Scores of samples [n, 2] against the checkerboard ``law`` [V, V]:

    tv: total variation per cell (V^2 cells; needs n >> V^2 / 2 samples before it falls near 0),
    tv_block: per block of ``block`` x ``block`` cells (less sampling noise),
    tv_floor, tv_block_floor: what exact draws of the same n score (the sampling-noise floor),
    black: the share of samples on black squares (1 for the law, 1/2 for independent uniform
    coordinates: the marginals alone cannot place a point)."""
    if tokens.dim() != 2 or tokens.shape[1] != 2:
        raise ValueError(f"checkerboard samples are [n, 2], got {tuple(tokens.shape)}")
    n = tokens.shape[0]
    coarse = _coarsen(law, block)
    return {
        "tv": total_variation(tokens, law),
        "tv_floor": tv_noise_floor(law, n),
        "tv_block": total_variation(torch.div(tokens, block, rounding_mode="floor"), coarse),
        "tv_block_floor": tv_noise_floor(coarse, n),
        "black": float((law[tokens[:, 0], tokens[:, 1]] > 0).double().mean()),
    }


# ----------------------------------------------------------------------------------------------
# Exact denoisers


class ExactPosterior:
    """The exact posterior marginals p_{1|t}(x^i | x_t) of the mixture path (kappa_t = t) for a
    small joint law q over V^L: a callable ``model(x_t, t, h) -> logits [B, L, V(+1)]`` that
    ignores h. Sampling it with any solver shows what that solver reaches with a perfect teacher.

    q: target probabilities [V] * L (a tensor of L dimensions of size V). With ``source="mask"``
    the vocabulary gains the mask token (id V), whose logit is -inf. ``clean``: positions known to
    hold data (a prompt), observed exactly rather than through the path. ``calls`` counts calls.
    """

    def __init__(self, q: torch.Tensor, source: str = "uniform", clean: tuple[int, ...] = ()):
        self.q = q.double() / q.double().sum()
        self.clean = torch.zeros(q.dim(), dtype=torch.bool)
        self.clean[list(clean)] = True
        self.L, self.V = q.dim(), q.shape[0]
        self.source = source
        self.states = torch.tensor(list(itertools.product(range(self.V), repeat=self.L)))
        self.calls = 0

    def to(self, device) -> ExactPosterior:
        """Move the tables, so that the oracle runs (and can be captured) on a GPU."""
        self.q, self.states, self.clean = (v.to(device) for v in (self.q, self.states, self.clean))
        return self

    @property
    def vocab_size(self) -> int:
        return self.V + 1 if self.source == "mask" else self.V

    def __call__(self, x_t, t, h):
        self.calls += 1
        kappa = t.double()[:, None, None]  # kappa_t = t
        match = x_t[:, None, :] == self.states[None]  # [B, S, L]
        if self.source == "uniform":
            factor = torch.where(match, kappa + (1 - kappa) / self.V, (1 - kappa) / self.V)
        else:
            masked = (x_t == self.V)[:, None, :]
            factor = torch.where(match, kappa, torch.where(masked, 1 - kappa, 0.0))
        factor = torch.where(self.clean, match.double(), factor)
        post = factor.prod(-1) * self.q.flatten()[None]  # [B, S]
        total = post.sum(-1, keepdim=True)
        # With the mask source a sampler that draws positions independently can reveal tokens
        # that the law never shows together (total = 0), where the posterior is undefined: the
        # masked positions then fall back to their prior marginals, and a revealed position is
        # its own posterior under any law (the mask path reveals x_1 itself).
        prior = self.q.flatten()[None].expand_as(post)
        post = torch.where(total > 0, post / total.clamp_min(1e-300), prior)
        onehot = torch.nn.functional.one_hot(self.states, self.V).double()  # [S, L, V]
        marginals = torch.einsum("bs,slv->blv", post, onehot)
        if self.source == "mask":
            revealed = (x_t != self.V)[..., None]
            own = torch.nn.functional.one_hot(x_t.clamp_max(self.V - 1), self.V).double()
            marginals = torch.where(revealed, own, marginals)
            marginals = torch.cat([marginals, torch.zeros_like(marginals[..., :1])], -1)
        return torch.log(marginals).float()

    def joint_index(self, x: torch.Tensor) -> torch.Tensor:
        """Flat index of each sequence x [B, L] in q.flatten()."""
        weights = self.V ** torch.arange(self.L - 1, -1, -1, device=x.device)
        return (x * weights).sum(-1)

    def product_of_marginals(self) -> torch.Tensor:
        out = torch.ones(())
        for i in range(self.L):
            dims = [d for d in range(self.L) if d != i]
            m = self.q.sum(dims) if dims else self.q
            out = out[..., None] * m
        return out.flatten()


# ----------------------------------------------------------------------------------------------
# A random Markov chain (order 1 or 2)


class MarkovChain:
    """A random Markov chain of order k (1 or 2) over V symbols: x_1..x_k uniform, then
    x_i ~ P(. | x_{i-k}, ..., x_{i-1}) for i = k+1..L, each conditional drawn from a symmetric
    Dirichlet(``concentration``) (small = peaked rows = low entropy).

    ``sample(n, generator)`` -> int64 [n, L]; ``log_prob(tokens [n, L])`` -> [n] natural logs
    (for :func:`fsdfm.metrics.exact_nll`); ``entropy_rate``: the expected entropy (nats) of a
    transition of a sample, averaged over positions k+1..L (the law of the context is propagated
    exactly from the uniform start), so that the chain's own samples score
    (k ln V + (L - k) entropy_rate) / L nats per token in expectation (``expected_nll``)."""

    def __init__(
        self, vocab_size: int, seq_len: int, *, order: int = 2, concentration: float = 0.1, seed=0
    ):
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        if vocab_size < 2 or seq_len <= order:
            raise ValueError(
                f"need vocab_size >= 2 and seq_len > order, got {vocab_size} and {seq_len}"
            )
        import numpy as np

        # Dirichlet rows as normalised Gamma draws, from NumPy's seeded generator (torch's Gamma
        # sampler only draws from the global RNG).
        w = np.random.default_rng(seed).gamma(concentration, size=(vocab_size,) * (order + 1))
        w = torch.from_numpy(w)
        self.table = w / w.sum(-1, keepdim=True)  # [V]*(k+1): P(c | context)
        self.log_table = self.table.clamp_min(1e-300).log()
        self.vocab_size, self.seq_len, self.order = vocab_size, seq_len, order

    def _transitions(self):
        """The law [V]*(k+1) of (context, next symbol) at each position i = k+1..L of a sample,
        propagated exactly from the uniform start."""
        k, V = self.order, self.vocab_size
        context = torch.full((V,) * k, V**-k, dtype=torch.float64)
        for _ in range(self.seq_len - k):
            joint = context.unsqueeze(-1) * self.table
            yield joint
            context = joint.sum(0)  # the next context: (x_{i-k+1}, ..., x_i)

    @functools.cached_property
    def entropy_rate(self) -> float:
        total = sum(float(-(joint * self.log_table).sum()) for joint in self._transitions())
        return total / (self.seq_len - self.order)

    @functools.cached_property
    def pair_law(self) -> torch.Tensor:
        """[V, V]: the law of a pair of neighbours (x_{i-1}, x_i) of a sample, averaged over the
        L - 1 positions i (exact, propagated from the uniform start)."""
        V = self.vocab_size
        # Order 2: the first pair is the uniform start, the others end a transition.
        pairs = torch.full((V, V), V**-2.0, dtype=torch.float64) if self.order == 2 else 0.0
        for joint in self._transitions():
            pairs = pairs + joint.reshape(-1, V, V).sum(0)
        return pairs / (self.seq_len - 1)

    def pair_tv(self, tokens: torch.Tensor) -> float:
        """Total variation between the pooled neighbour pairs of samples [n, L] and
        :attr:`pair_law`: small only when the samples follow the chain's transitions at their
        right frequencies (a sampler that repeats the likeliest transitions scores a low NLL but
        a high pair_tv). Pairs of one sample are dependent, so compare it with the chain's own
        samples of the same n, not with a multinomial floor."""
        tokens = tokens.cpu()
        V = self.vocab_size
        index = (tokens[:, :-1] * V + tokens[:, 1:]).flatten()
        counts = torch.bincount(index, minlength=V * V).double()
        return 0.5 * float((counts / counts.sum() - self.pair_law.flatten()).abs().sum())

    @property
    def expected_nll(self) -> float:
        k, L = self.order, self.seq_len
        return (k * math.log(self.vocab_size) + (L - k) * self.entropy_rate) / L

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        V, L, k = self.vocab_size, self.seq_len, self.order
        x = torch.empty(n, L, dtype=torch.long)
        x[:, :k] = torch.randint(0, V, (n, k), generator=generator)
        for i in range(k, L):
            rows = self.table[tuple(x[:, i - k + j] for j in range(k))]
            x[:, i] = torch.multinomial(rows, 1, generator=generator)[:, 0]
        return x

    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        k, L = self.order, tokens.shape[1]
        tokens = tokens.cpu()
        first = -k * math.log(self.vocab_size)
        steps = self.log_table[tuple(tokens[:, j : L - k + j] for j in range(k + 1))]
        return first + steps.sum(-1)


# ----------------------------------------------------------------------------------------------
# A scorer of our own


def gen_ppl_metric(scorer, *, batch_size: int = 16, device=None) -> Callable:
    """A :func:`sweep` metric: tokens [n, L] -> {"gen_ppl": the mean over samples of
    generative perplexity under ``scorer``, "gen_ppl_corpus": the pooled one}; ``scorer`` as
    :func:`fsdfm.metrics.generative_perplexity` takes it, loaded here once if a name."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scorer = load_scorer(scorer, device)

    def metric(tokens: torch.Tensor) -> dict[str, float]:
        result = generative_perplexity(tokens, scorer, batch_size=batch_size, device=device)
        return {"gen_ppl": result["mean"], "gen_ppl_corpus": result["corpus"]}

    return metric


def train_scorer(
    data: str | Path,
    out: str | Path,
    *,
    tokenizer: str | None = None,
    seq_len: int = 256,
    dim: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 1e-3,
    val_fraction: float = 0.01,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Train a causal GPT-2 (``transformers.GPT2LMHeadModel``) on a token stream and save it to
    ``out`` with ``save_pretrained``, so that ``generative_perplexity(tokens, out)`` and
    ``fsdfm eval --scorer out`` can use it.

    data: text or a token file, as ``fsdfm pretrain --data`` takes it (a token file written by
        pre-training reuses its tokens, so the scorer sees exactly the models' data).
    Blocks of ``seq_len`` tokens are split as in pre-training (the last ``val_fraction`` held
    out); AdamW (0.9, 0.95), weight decay 0.1, 5% warm-up then cosine to 10%, grad clip 1.
    Returns {"val_loss": held-out mean NLL per token (nats), "steps", "tokens", "parameters"}.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from fsdfm.data import Blocks, BlockSampler, prepare_tokens
    from fsdfm.training import learning_rate

    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stream = prepare_tokens(data, tokenizer, out / "data", progress=progress)
    blocks = Blocks(stream, seq_len, val_fraction)
    if blocks.n_val == 0:
        raise ValueError(f"{data} is too short to hold out a block of {seq_len} tokens")
    from fsdfm.tokenizer import get_tokenizer

    eos = get_tokenizer(stream.tokenizer).eos_id
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=stream.vocab_size,
        n_positions=seq_len,
        n_embd=dim,
        n_layer=n_layers,
        n_head=n_heads,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sampler = BlockSampler(blocks.n_train, batch_size, seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="scorer", unit="step")
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, lr=lr, steps=steps, warmup=warmup)
        ids = blocks.get(sampler.next_batch(), device)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        val = list(blocks.val_indices())
        for start in range(0, len(val), batch_size):
            ids = blocks.get(val[start : start + batch_size], device)
            n = ids.numel() - ids.shape[0]  # every token but each block's first is predicted
            total += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    model.save_pretrained(out)
    result = {
        "val_loss": total / count,
        "steps": steps,
        "tokens": steps * batch_size * seq_len,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "scorer.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
