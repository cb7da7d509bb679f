"""The `fsdfm` command (also `python -m fsdfm`).

    fsdfm sample [PROMPT] [--model default|PATH] [--steps 8] [--length N] [-n N] [--watch] ...
    fsdfm convert IN.pth OUT_DIR [--weights ema|student|teacher|model] [--dtype bf16]
    fsdfm bench [--model default|PATH] [--steps 8] [-n 1]   kernels and generation, native vs ref
    fsdfm pretrain --data PATH --out DIR [--preset tiny] [--config FILE.yaml] ...
    fsdfm distill --teacher DIR --data PATH --out DIR [--teacher-type rk4|heun] ...
    fsdfm eval --model NAME=PATH [--model ...] [--steps 1,2,4,8] [--scorer gpt2-large] ...

Without a subcommand it runs ``fsdfm sample`` (``--watch`` on a terminal): the bundled model
writes a text in 8 steps.
User mistakes (a missing file, a bad flag value) end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from fsdfm.solver import SOLVERS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sample(args) -> None:
    import fsdfm
    from fsdfm.checkpoint import load
    from fsdfm.tokenizer import get_tokenizer

    device = _device(args.device)
    model = load(args.model, weights=args.weights, device=device)
    name = args.tokenizer or getattr(model, "tokenizer_name", None)
    if name is None:
        raise ValueError(f"{args.model} names no tokenizer: pass --tokenizer")
    tokenizer = get_tokenizer(name)
    length = args.length or model.config.seq_len
    if not 1 <= length <= model.config.seq_len:
        raise ValueError(f"--length must be in [1, {model.config.seq_len}], got {length}")
    watch = _Watch(tokenizer, args.steps, args.watch_delay) if args.watch else None
    start = time.perf_counter()
    texts = fsdfm.generate(
        model,
        tokenizer,
        args.prompt,
        steps=args.steps,
        max_length=length,
        num_return_sequences=args.n,
        seed=args.seed,
        temperature=args.temperature,
        barrier=args.barrier,
        solver=args.solver,
        progress=args.progress and not args.watch,
        callback=watch,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"=== sample {i + 1}")
        print(text)
    tokens = args.n * length
    print(
        f"{args.n} x {length} tokens in {args.steps} steps ({args.solver}) on {device}: "
        f"{seconds:.2f} s, {tokens / seconds:.0f} tokens/s",
        file=sys.stderr,
    )


class _Watch:
    """--watch: redraws the first sequence after every step on stderr, the tokens that changed
    in that step highlighted, so that a person sees the whole text settle in a few steps."""

    def __init__(self, tokenizer, steps: int, delay: float):
        self.tokenizer, self.steps, self.delay = tokenizer, steps, delay
        self.previous = None
        self.tty = sys.stderr.isatty()

    def __call__(self, step: int, t: float, x: torch.Tensor) -> None:
        tokens = x[0].tolist()
        changed = (
            [True] * len(tokens)
            if self.previous is None
            else [a != b for a, b in zip(tokens, self.previous, strict=True)]
        )
        self.previous = tokens
        pieces = []
        for token, moved in zip(tokens, changed, strict=True):
            piece = self.tokenizer.decode([token])
            pieces.append(f"\x1b[7m{piece}\x1b[0m" if moved and self.tty else piece)
        clear = "\x1b[2J\x1b[H" if self.tty else "\n"
        header = f"step {step}/{self.steps}  t = {t:.3f}  {sum(changed)} tokens changed"
        print(f"{clear}{header}\n\n{''.join(pieces)}", file=sys.stderr, flush=True)
        time.sleep(self.delay)


def _convert(args) -> None:
    from fsdfm.checkpoint import convert

    out = convert(args.src, args.out, weights=args.weights, dtype=DTYPES.get(args.dtype))
    print(f"wrote {out}", file=sys.stderr)


def _bench(args) -> None:
    import fsdfm
    from fsdfm import ops
    from fsdfm.checkpoint import load

    device = _device(args.device)
    if not ops.native_available(device):
        raise ValueError(
            f"the native kernels for {device} are not built (pip install --no-build-isolation -e .)"
        )
    model = load(args.model, weights=args.weights, device=device).eval()
    B, L, V = args.n, args.length or model.config.seq_len, model.config.vocab_size
    if L > model.config.seq_len:
        raise ValueError(f"--length must be at most the model's {model.config.seq_len}, got {L}")
    g = torch.Generator(device).manual_seed(args.seed)
    logits = torch.randn(B, L, V, device=device, generator=g) * 3
    x_t = torch.randint(0, V, (B, L), device=device, generator=g)

    def timed(fn, *fn_args, **fn_kwargs) -> float:
        """Median seconds of --repeats calls of fn(*fn_args, **fn_kwargs) after a warm-up."""
        fn(*fn_args, **fn_kwargs)
        times = []
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(*fn_args, **fn_kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def row(label: str, native: float, reference: float) -> None:
        ms = f"{native * 1e3:>9.2f} ms{reference * 1e3:>9.2f} ms"
        print(f"{label:<34}{ms}{reference / native:>7.1f}x")

    # The per-step ops on logits of the model's shape, then whole generations; native and
    # reference timed back to back in this one process, so their ratio is the figure to quote.
    probs = torch.softmax(logits, -1)
    cases = {
        "probs_to_generator": ((probs, x_t, 2.0), {}),
        "jump_step": ((logits, x_t, 2.0, 0.125), {"generator": g}),
        "sample_categorical": ((logits,), {"generator": g}),
    }
    print(f"fsdfm bench on {device}: [B, L, V] = [{B}, {L}, {V}], median of {args.repeats}")
    print(f"{'':<34}{'native':>12}{'reference':>12}{'ratio':>8}")
    for name, (op_args, op_kwargs) in cases.items():
        native = timed(getattr(ops, name), *op_args, **op_kwargs)
        reference = timed(getattr(ops, name + "_ref"), *op_args, **op_kwargs)
        row(name, native, reference)
    for steps in args.steps:
        kwargs = {"batch_size": B, "seq_len": L, "generator": g}
        native = timed(fsdfm.sample, model, steps, backend="native", **kwargs)
        reference = timed(fsdfm.sample, model, steps, backend="reference", **kwargs)
        row(f"sample, {steps} steps ({B * L / native:.0f} tok/s)", native, reference)


def _pretrain(args) -> None:
    from fsdfm import training

    training.main(args, "pretrain")


def _distill(args) -> None:
    from fsdfm import training

    training.main(args, "distill")


NO_SCORER_NOTE = (
    "No --scorer was given, so these rows report entropy only: the quality of generated text "
    "needs a scorer (generative perplexity under an autoregressive language model of the same "
    "tokenizer, e.g. --scorer gpt2-large for GPT-2-tokenised models). A model's own likelihood "
    "bound (fsdfm.metrics.elbo) scores held-out data, not samples, so it cannot stand in."
)


def _named_models(specs: list[str]) -> dict[str, str]:
    """NAME=PATH (or PATH, named after its last component) -> {name: path}."""
    from pathlib import Path

    named = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise ValueError(f"--model takes NAME=PATH, got {spec!r}")
        if name in named:
            raise ValueError(f"--model name {name!r} given twice")
        named[name] = path
    return named


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"step counts must be positive, got {text}")
    return values


def _eval(args) -> None:
    from fsdfm.checkpoint import load
    from fsdfm.evaluation import gen_ppl_metric, markdown_table, sweep, write_results

    solvers = tuple(args.solvers.split(","))
    bad = [s for s in solvers if s not in SOLVERS]
    if bad:
        raise ValueError(f"--solvers must be some of {', '.join(SOLVERS)}; got {', '.join(bad)}")
    device = _device(args.device)
    models = {
        name: load(path, weights=args.weights, device=device).eval()
        for name, path in _named_models(args.model).items()
    }
    for name, model in models.items():
        if args.length is not None and args.length > model.config.seq_len:
            raise ValueError(f"--length {args.length} exceeds {name}'s seq_len")
    metric_fns = {}
    if args.scorer:
        metric_fns["gen_ppl"] = gen_ppl_metric(
            args.scorer, batch_size=args.batch_size, device=device
        )
    else:
        print(f"fsdfm eval: note: {NO_SCORER_NOTE}", file=sys.stderr)
    rows = sweep(
        models,
        steps=args.steps,
        solvers=solvers,
        n_samples=args.n,
        batch_size=args.batch_size,
        metric_fns=metric_fns,
        seed=args.seed,
        progress=True,
        sample_kwargs={"seq_len": args.length} if args.length else None,
        device=device,
    )
    note = f"Scorer: {args.scorer}." if args.scorer else NO_SCORER_NOTE
    paths = write_results(
        rows, args.out, quality="gen_ppl" if args.scorer else None, title="fsdfm eval", note=note
    )
    print(markdown_table(rows), end="")
    print(f"wrote {paths['json']}, {paths['md']} and {paths['png']}", file=sys.stderr)


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _add_weights(parser: argparse.ArgumentParser) -> None:
    from fsdfm.checkpoint import WEIGHT_CHOICES

    parser.add_argument(
        "--weights",
        choices=list(WEIGHT_CHOICES),
        default=None,
        help="which model of a released FS-DFM .pth (default: the EMA student)",
    )


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available"
    )


def _device(requested: str | None) -> str:
    """The device to run on: cuda when available unless told; a clear error if it is not."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsdfm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")

    s = sub.add_parser(
        "sample",
        help="generate text with a model",
        description="Generate text in a few steps and print it; time and "
        "tokens/s go to stderr. The same seed gives the same text.",
    )
    s.add_argument("prompt", nargs="?", default=None, help="text to continue (a frozen prefix)")
    s.add_argument(
        "--model",
        default="default",
        help="default (the bundled model), a directory written by fsdfm.save, or a released .pth",
    )
    _add_weights(s)
    s.add_argument(
        "--tokenizer",
        default=None,
        help="override the tokenizer the checkpoint names: gpt2, byte or a BPE tokenizer.json",
    )
    s.add_argument("--steps", type=_positive(int), default=8, help="model calls (default 8)")
    s.add_argument(
        "--length",
        type=_positive(int),
        default=None,
        help="tokens per sample, prompt included (default: the model's length)",
    )
    s.add_argument("-n", type=_positive(int), default=1, help="number of samples (default 1)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument(
        "--temperature", type=_positive(float), default=1.0, help="softmax temperature (default 1)"
    )
    s.add_argument(
        "--barrier",
        type=float,
        default=math.inf,
        help="energy barrier: only tokens with p >= max p * e^-barrier (default inf)",
    )
    s.add_argument(
        "--solver",
        choices=list(SOLVERS),
        default="cumulative",
        help="cumulative = FS-DFM (default), euler, or dfm (the 1024-step baseline)",
    )
    _add_device(s)
    s.add_argument("--progress", action="store_true", help="show a progress bar over the steps")
    s.add_argument(
        "--watch", action="store_true", help="show the first text changing step by step (stderr)"
    )
    s.add_argument(
        "--watch-delay", type=_non_negative, default=0.4, help="seconds between frames (0.4)"
    )
    s.set_defaults(run=_sample)

    c = sub.add_parser(
        "convert",
        help="turn a released .pth into a safetensors directory",
        description="Load a released FS-DFM / DFM .pth (weights_only: nothing in "
        "it is executed) and write model.safetensors + config.json.",
    )
    c.add_argument("src", help="the .pth file")
    c.add_argument("out", help="the output directory")
    _add_weights(c)
    c.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="cast the weights (default: keep)"
    )
    c.set_defaults(run=_convert)

    b = sub.add_parser(
        "bench",
        help="time the kernels and whole generations, native vs reference",
        description="Time the per-step ops (probs_to_generator, jump_step, sample_categorical) "
        "on logits of the model's shape and whole generations with fsdfm.sample, each with the "
        "native kernels and with the PyTorch references, side by side. benchmarks/ holds the "
        "pytest-benchmark suite with bytes moved and GB/s.",
    )
    b.add_argument("--model", default="default", help="default (the bundled model) or a model path")
    _add_weights(b)
    b.add_argument(
        "--steps", type=_int_list, default=(8,), help="comma-separated step counts (default 8)"
    )
    b.add_argument("-n", type=_positive(int), default=1, help="sequences per batch (default 1)")
    b.add_argument(
        "--length", type=_positive(int), default=None, help="tokens (default: the model's)"
    )
    b.add_argument("--repeats", type=_positive(int), default=3, help="timed calls (default 3)")
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_device(b)
    b.set_defaults(run=_bench)

    from fsdfm.training import add_arguments

    p = sub.add_parser(
        "pretrain",
        help="pre-train a DFM teacher on text",
        description="Pre-train a DFM model (SPEC 4.1) into --out: model/ (fsdfm.load), "
        "state.pt, config.yaml, metrics.jsonl. Re-running on the same --out resumes; under "
        "torchrun the processes share the global batch.",
    )
    add_arguments(p, "pretrain")
    p.set_defaults(run=_pretrain)

    t = sub.add_parser(
        "distill",
        help="distil a DFM teacher into a few-step FS-DFM student",
        description="FS-DFM distillation (SPEC 4.2): the student starts from --teacher and learns "
        "steps of every size from a shortcut teacher (rk4 or heun) built from its own EMA.",
    )
    add_arguments(t, "distill")
    t.set_defaults(run=_distill)

    from fsdfm.evaluation import STEPS

    e = sub.add_parser(
        "eval",
        help="sample quality and entropy against the number of steps",
        description="Sample from each model with each solver at each step count and score the "
        "samples: generative perplexity under --scorer (a transformers causal LM) and the mean "
        "unigram entropy. Writes results.json, results.md and results.png into --out and prints "
        "the table.",
    )
    e.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a model to evaluate (a directory of fsdfm.save or a released .pth); repeatable",
    )
    _add_weights(e)
    e.add_argument(
        "--steps",
        type=_int_list,
        default=STEPS,
        help="comma-separated step counts (default 1,2,4,...,1024)",
    )
    e.add_argument(
        "--solvers", default="cumulative,dfm", help="comma-separated (default cumulative,dfm)"
    )
    e.add_argument("-n", type=_positive(int), default=16, help="samples per setting (default 16)")
    e.add_argument(
        "--batch-size", type=_positive(int), default=16, help="samples per call (default 16)"
    )
    e.add_argument(
        "--length",
        type=_positive(int),
        default=None,
        help="tokens per sample (default: the model's length)",
    )
    e.add_argument(
        "--scorer",
        default=None,
        help="a transformers causal LM name or path for generative perplexity (e.g. gpt2-large)",
    )
    e.add_argument("--out", default="eval", help="output directory (default ./eval)")
    e.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_device(e)
    e.set_defaults(run=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the main job: generate with the bundled model
        args = parser.parse_args(["sample", "--watch"] if sys.stderr.isatty() else ["sample"])
    try:
        args.run(args)
    # User mistakes (bad values, missing or unwritable files, a missing optional package) end
    # in one line; anything else is a bug and keeps its traceback.
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        print(f"fsdfm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
