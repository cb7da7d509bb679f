"""The `fsdfm` command (also `python -m fsdfm`).

    fsdfm sample [PROMPT] [--model default|PATH] [--steps 8] [--length N] [-n N] [--watch] ...
    fsdfm convert IN.pth OUT_DIR [--weights ema|student|teacher|model] [--dtype bf16]
    fsdfm bench [--model default|PATH] [--steps 8] [-n 1]   kernels and generation, native vs ref
    fsdfm pretrain --data PATH --out DIR [--preset tiny] [--config FILE.yaml] ...
    fsdfm distill --teacher DIR --data PATH --out DIR [--teacher-type rk4|heun] ...
    fsdfm eval --model NAME=PATH [--model ...] [--steps 1,2,4,8] [--scorer gpt2-large] ...

Without a subcommand it runs ``fsdfm sample`` (``--watch`` on a terminal): the bundled model
writes a text in 8 steps; ``fsdfm "Once upon a time" --steps 4`` continues a prompt the same
way. Every subcommand's options are a table of :class:`fsdfm.options.Option` (flags, ``--help``
and errors come from it; the training commands' table is :data:`fsdfm.train_config.OPTIONS`,
which also gives their YAML keys).

User mistakes (a missing file, a bad flag value) end with one line on stderr and exit status 2;
Ctrl-C ends with one line and status 130; anything else is a bug and keeps its traceback.
``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fsdfm._args import resolve_device, seeded_generator
from fsdfm.checkpoint import WEIGHT_CHOICES
from fsdfm.options import (
    Option,
    Parser,
    add_options,
    fraction,
    int_list,
    non_negative,
    positive,
    probability,
    seed,
    values,
)
from fsdfm.solver import SOLVERS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LONG_SAMPLING = 64  # steps from which fsdfm sample shows its progress by itself

MODEL = Option(
    "model",
    str,
    "default (the bundled model), a directory written by fsdfm.save, or a released .pth",
    default="default",
)
WEIGHTS = Option(
    "weights",
    tuple(WEIGHT_CHOICES),
    "which model of a released FS-DFM .pth (default: the EMA student)",
)


def _device_name(value) -> str | None:
    return None if re.fullmatch(r"cpu|cuda(:\d+)?", value) else "must be cpu, cuda or cuda:N"


DEVICE = Option(
    "device", str, "cpu, cuda or cuda:N (default: cuda when available)", check=_device_name
)
COMPILE = Option(
    "compile",
    bool,
    "torch.compile the model first (slower start, faster steps; Inductor needs a C++ compiler "
    "on the CPU)",
    default=False,
)
SEED = Option("seed", int, "random seed (default 0)", default=0, check=seed)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    options: tuple[Option, ...]
    run: Callable[[dict], None]


# ----------------------------------------------------------------------------------------------
# fsdfm sample


def _sample(o: dict) -> None:
    from rich.console import Console

    from fsdfm.checkpoint import load
    from fsdfm.generation import complete
    from fsdfm.tokenizer import get_tokenizer

    device = resolve_device(o["device"], "--device")
    if o["length"] is not None and o["max_new_tokens"] is not None:
        raise ValueError("--length and --max-new-tokens: give one or neither")
    console = Console(file=sys.stderr, highlight=False, soft_wrap=True)
    # A model can take a while to load: say so when someone is watching.
    loading = console.status(f"loading {o['model']} ...") if o["watch"] else _nothing()
    with loading:
        model = load(o["model"], weights=o["weights"], device=device, dtype=DTYPES.get(o["dtype"]))
        if o["compile"]:
            model.compile(dynamic=False)
    name = o["tokenizer"] or getattr(model, "tokenizer_name", None)
    if name is None:
        raise ValueError(f"{o['model']} names no tokenizer: pass --tokenizer")
    tokenizer = get_tokenizer(name)
    lengths = {"max_new_tokens": o["max_new_tokens"]}
    if o["max_new_tokens"] is None:
        length = o["length"] or model.config.seq_len
        if not 1 <= length <= model.config.seq_len:
            raise ValueError(f"--length must be in [1, {model.config.seq_len}], got {length}")
        lengths = {"max_length": length}
    watch = _Watch(tokenizer, o["watch_delay"], console) if o["watch"] else None
    start = time.perf_counter()
    with watch or _nothing():
        done = complete(
            model,
            tokenizer,
            o["prompt"],
            steps=o["steps"],
            **lengths,
            num_return_sequences=o["n"],
            seed=o["seed"],
            temperature=o["temperature"],
            top_k=o["top_k"],
            top_p=o["top_p"],
            min_p=o["min_p"],
            barrier=o["barrier"],
            solver=o["solver"],
            # A long run (the 1,024-step baseline) shows its progress unless asked not to.
            progress=not o["watch"] and (o["progress"] or o["steps"] >= LONG_SAMPLING),
            on_step=watch,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    # tokens/s counts sampling only, not the time the watch spent drawing and waiting.
    seconds = time.perf_counter() - start - (watch.seconds if watch else 0.0)
    _write_samples(o, done, seconds)
    positions = sum(len(c.prompt_ids) + len(c.new_ids) for c in done)
    new = sum(len(c.new_ids) for c in done)
    print(
        f"{o['n']} x {positions // len(done)} tokens in {o['steps']} steps ({o['solver']}) on "
        f"{device.type}: {seconds:.2f} s, {new} new tokens, {new / seconds:.0f} tokens/s",
        file=sys.stderr,
    )


def _write_samples(o: dict, done, seconds: float) -> None:
    """The texts (or, with --json, one JSON object per sample) on stdout or into --output, which
    is replaced atomically (a reader sees the old file or the whole new one)."""
    if o["json"]:
        lines = [
            json.dumps({
                "index": i,
                "prompt": o["prompt"],
                "text": c.text,
                "tokens": c.prompt_ids + c.new_ids,
                "new_tokens": len(c.new_ids),
                "seed": o["seed"],
                "steps": o["steps"],
                "solver": o["solver"],
                "seconds": round(seconds, 6),
            })
            for i, c in enumerate(done)
        ]  # fmt: skip
    else:
        lines = []
        for i, c in enumerate(done):
            if len(done) > 1:
                lines.append(f"=== sample {i + 1}")
            lines.append(c.text)
    text = "".join(line + "\n" for line in lines)
    if o["output"] is None:
        sys.stdout.write(text)
        return
    from fsdfm._io import atomic_write

    atomic_write(Path(o["output"]), lambda f: f.write(text.encode()))


@contextlib.contextmanager
def _nothing():
    yield


class _Watch:
    """--watch: the first sequence after every step, the tokens that changed in that step
    highlighted, so that a person sees the whole text settle in a few steps. Frame 0 is the
    source noise. On a terminal the frame is redrawn in place (rich's Live); elsewhere each
    frame is printed in turn. ``seconds`` is the time spent drawing and waiting."""

    def __init__(self, tokenizer, delay: float, console):
        from rich.live import Live

        self.tokenizer, self.delay, self.console = tokenizer, delay, console
        self.previous = None
        self.seconds = 0.0
        self.live = Live(console=console, auto_refresh=False) if console.is_terminal else None

    def __enter__(self):
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.stop()

    def __call__(self, state) -> None:
        from rich.console import Group
        from rich.text import Text

        start = time.perf_counter()
        tokens = state.x[0].tolist()
        changed = (
            [False] * len(tokens)
            if self.previous is None
            else [a != b for a, b in zip(tokens, self.previous, strict=True)]
        )
        self.previous = tokens
        text = Text()
        for token, moved in zip(tokens, changed, strict=True):
            # A mask source's mask id is no token of the tokenizer: shown as a blank.
            piece = "_" if token >= self.tokenizer.vocab_size else self.tokenizer.decode([token])
            text.append(piece, style="reverse" if moved else "")
        what = "source noise" if state.step == 0 else f"{sum(changed)} tokens changed"
        header = Text(f"step {state.step}/{state.steps}  t = {state.t:.3f}  {what}", style="bold")
        if self.live is not None:
            self.live.update(Group(header, Text(), text), refresh=True)
        else:
            self.console.print(header)
            self.console.print(text)
            self.console.print()
        time.sleep(self.delay)
        self.seconds += time.perf_counter() - start


SAMPLE = Command(
    "sample",
    "generate text with a model",
    "Generate text in a few steps and print it; time and tokens/s go to stderr. The same seed "
    "gives the same text.",
    (
        Option("prompt", str, "text to continue (a frozen prefix)", positional=True),
        MODEL,
        WEIGHTS,
        Option(
            "tokenizer",
            str,
            "override the tokenizer the checkpoint names: gpt2, byte or a BPE tokenizer.json",
        ),
        Option("steps", int, "model calls (default 8)", default=8, check=positive),
        Option(
            "length",
            int,
            "tokens per sample, prompt included (default: the model's length)",
            check=positive,
        ),
        Option(
            "max_new_tokens",
            int,
            "tokens generated after the prompt (instead of --length)",
            check=positive,
        ),
        Option("n", int, "number of samples (default 1)", default=1, short="-n", check=positive),
        SEED,
        Option(
            "temperature",
            float,
            "softmax temperature (default 1); 0 takes the most likely token (greedy)",
            default=1.0,
            check=non_negative,
        ),
        Option("top_k", int, "keep the k most likely tokens (default: all)", check=non_negative),
        Option(
            "top_p",
            float,
            "keep the most likely tokens up to this probability mass (default 1: all)",
            check=probability,
        ),
        Option(
            "min_p",
            float,
            "keep tokens with p >= min_p * max p (default 0: all)",
            check=fraction,
        ),
        Option(
            "barrier",
            float,
            "energy barrier: only tokens with p >= max p * e^-barrier (default inf)",
            default=math.inf,
            check=non_negative,
        ),
        Option(
            "solver",
            SOLVERS,
            "cumulative = FS-DFM (default), euler, dfm (the 1024-step baseline), or dilated "
            "(mask-source models: positions revealed far-apart first)",
            default="cumulative",
        ),
        DEVICE,
        Option("dtype", tuple(DTYPES), "cast the weights (default: the model's own)"),
        COMPILE,
        Option("json", bool, "one JSON object per sample (text, tokens, seed, ...)", default=False),
        Option("output", str, "write the samples to this file (replaced atomically)", short="-o"),
        Option(
            "progress",
            bool,
            f"show progress over the steps (always from {LONG_SAMPLING} steps on): a bar on a "
            "terminal, plain lines elsewhere",
            default=False,
        ),
        Option("watch", bool, "show the first text changing step by step (stderr)", default=False),
        Option(
            "watch_delay", float, "seconds between frames (0.4)", default=0.4, check=non_negative
        ),  # fmt: skip
    ),
    _sample,
)


# ----------------------------------------------------------------------------------------------
# fsdfm convert


def _convert(o: dict) -> None:
    from fsdfm.checkpoint import convert

    out = convert(o["src"], o["out"], weights=o["weights"], dtype=DTYPES.get(o["dtype"]))
    print(f"wrote {out}", file=sys.stderr)


CONVERT = Command(
    "convert",
    "turn a released .pth into a safetensors directory",
    "Load a released FS-DFM / DFM .pth (weights_only: nothing in it is executed) and write "
    "model.safetensors + config.json.",
    (
        Option("src", str, "the .pth file", positional=True, required=True),
        Option("out", str, "the output directory", positional=True, required=True),
        WEIGHTS,
        Option("dtype", tuple(DTYPES), "cast the weights (default: keep)"),
    ),
    _convert,
)


# ----------------------------------------------------------------------------------------------
# fsdfm bench


def _bench(o: dict) -> None:
    from fsdfm import ops
    from fsdfm.checkpoint import load
    from fsdfm.solver import sample

    device = resolve_device(o["device"], "--device")
    if not ops.native_available(device):
        raise ValueError(
            f"the native kernels for {device} are not built (pip install --no-build-isolation -e .)"
        )
    model = load(o["model"], weights=o["weights"], device=device).eval()
    if o["compile"]:
        model.compile(dynamic=False)
    B, L, V = o["n"], o["length"] or model.config.seq_len, model.config.vocab_size
    if L > model.config.seq_len:
        raise ValueError(f"--length must be at most the model's {model.config.seq_len}, got {L}")
    g = seeded_generator(o["seed"], device, "--seed")
    logits = torch.randn(B, L, V, device=device, generator=g) * 3
    x_t = torch.randint(0, V, (B, L), device=device, generator=g)

    def timed(fn, *fn_args, **fn_kwargs) -> float:
        """Median seconds of --repeats calls of fn(*fn_args, **fn_kwargs) after a warm-up."""
        fn(*fn_args, **fn_kwargs)
        times = []
        for _ in range(o["repeats"]):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn(*fn_args, **fn_kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
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
    print(f"fsdfm bench on {device.type}: [B, L, V] = [{B}, {L}, {V}], median of {o['repeats']}")
    print(f"{'':<34}{'native':>12}{'reference':>12}{'ratio':>8}")
    for name, (op_args, op_kwargs) in cases.items():
        native = timed(getattr(ops, name), *op_args, **op_kwargs)
        reference = timed(getattr(ops, name + "_ref"), *op_args, **op_kwargs)
        row(name, native, reference)
    for steps in o["steps"]:
        kwargs = {"batch_size": B, "seq_len": L, "generator": g}
        native = timed(sample, model, steps, backend="native", **kwargs)
        reference = timed(sample, model, steps, backend="reference", **kwargs)
        row(f"sample, {steps} steps ({B * L / native:.0f} tok/s)", native, reference)


BENCH = Command(
    "bench",
    "time the kernels and whole generations, native vs reference",
    "Time the per-step ops (probs_to_generator, jump_step, sample_categorical) on logits of the "
    "model's shape and whole generations with fsdfm.sample, each with the native kernels and "
    "with the PyTorch references, side by side. benchmarks/ holds the pytest-benchmark suite "
    "with bytes moved and GB/s.",
    (
        Option("model", str, "default (the bundled model) or a model path", default="default"),
        WEIGHTS,
        Option("steps", int_list, "comma-separated step counts (default 8)", default=(8,)),
        Option("n", int, "sequences per batch (default 1)", default=1, short="-n", check=positive),
        Option("length", int, "tokens (default: the model's)", check=positive),
        Option("repeats", int, "timed calls (default 3)", default=3, check=positive),
        SEED,
        DEVICE,
        COMPILE,
    ),
    _bench,
)


# ----------------------------------------------------------------------------------------------
# fsdfm pretrain / distill


def _train(mode: str) -> Callable[[dict], None]:
    def run(o: dict) -> None:
        from fsdfm.train_config import config_from_sources
        from fsdfm.training import train

        flags = {k: v for k, v in o.items() if k != "config" and v is not None}
        train(config_from_sources(mode, o["config"], flags))

    return run


def _train_options(mode: str) -> tuple[Option, ...]:
    """--config and the options of ``mode``, kept as text: config_from_sources converts them
    (with the YAML file's values under them), so these options carry no kind of their own."""
    from fsdfm.train_config import OPTIONS

    config = Option("config", str, "options as YAML (underscored keys); flags win",
                    metavar="FILE.yaml")  # fmt: skip
    return (config, *(option for option, modes in OPTIONS.values() if mode in modes))


PRETRAIN = Command(
    "pretrain",
    "pre-train a DFM teacher on text",
    "Pre-train a DFM model (SPEC 4.1) into --out: model/ (fsdfm.load), state.pt, config.yaml, "
    "metrics.jsonl. Re-running on the same --out resumes; under torchrun the processes share "
    "the global batch.",
    _train_options("pretrain"),
    _train("pretrain"),
)
DISTILL = Command(
    "distill",
    "distil a DFM teacher into a few-step FS-DFM student",
    "FS-DFM distillation (SPEC 4.2): the student starts from --teacher and learns steps of "
    "every size from a shortcut teacher (rk4 or heun) built from its own EMA. --method redi "
    "instead retrains the teacher on its own (noise, sample) pairs (rectified couplings).",
    _train_options("distill"),
    _train("distill"),
)


# ----------------------------------------------------------------------------------------------
# fsdfm eval

NO_SCORER_NOTE = (
    "No --scorer was given, so these rows report entropy only: the quality of generated text "
    "needs a scorer (generative perplexity under an autoregressive language model of the same "
    "tokenizer, e.g. --scorer gpt2-large for GPT-2-tokenised models). A model's own likelihood "
    "bound (fsdfm.metrics.elbo) scores held-out data, not samples, so it cannot stand in."
)


def _named_models(specs: list[str]) -> dict[str, str]:
    """NAME=PATH (or PATH, named after its last component) -> {name: path}."""
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


def _solver_list(text: str) -> tuple[str, ...]:
    solvers = tuple(text.split(","))
    bad = [s for s in solvers if s not in SOLVERS]
    if bad:
        raise ValueError(f"must be some of {', '.join(SOLVERS)}; got {', '.join(bad)}")
    return solvers


def _eval(o: dict) -> None:
    from fsdfm.checkpoint import load
    from fsdfm.evaluation import gen_ppl_metric, markdown_table, sweep, write_results

    device = resolve_device(o["device"], "--device")
    models = {
        name: load(path, weights=o["weights"], device=device).eval()
        for name, path in _named_models(o["model"]).items()
    }
    for name, model in models.items():
        if o["length"] is not None and o["length"] > model.config.seq_len:
            raise ValueError(f"--length {o['length']} exceeds {name}'s seq_len")
    metric_fns = {}
    if o["scorer"]:
        metric_fns["gen_ppl"] = gen_ppl_metric(
            o["scorer"], batch_size=o["batch_size"], device=device
        )
    else:
        print(f"fsdfm eval: note: {NO_SCORER_NOTE}", file=sys.stderr)
    rows = sweep(
        models,
        steps=o["steps"],
        solvers=o["solvers"],
        n_samples=o["n"],
        batch_size=o["batch_size"],
        metric_fns=metric_fns,
        seed=o["seed"],
        progress=True,
        sample_kwargs={"seq_len": o["length"]} if o["length"] else None,
        device=device,
    )
    note = f"Scorer: {o['scorer']}." if o["scorer"] else NO_SCORER_NOTE
    paths = write_results(
        rows, o["out"], quality="gen_ppl" if o["scorer"] else None, title="fsdfm eval", note=note
    )
    print(markdown_table(rows), end="")
    print(f"wrote {paths['json']}, {paths['md']} and {paths['png']}", file=sys.stderr)


def _eval_command() -> Command:
    from fsdfm.evaluation import STEPS

    options = (
        Option(
            "model",
            str,
            "a model to evaluate (a directory of fsdfm.save or a released .pth); repeatable",
            repeat=True,
            required=True,
            metavar="NAME=PATH",
        ),
        WEIGHTS,
        Option(
            "steps", int_list, "comma-separated step counts (default 1,2,4,...,1024)", default=STEPS
        ),  # fmt: skip
        Option(
            "solvers",
            _solver_list,
            "comma-separated (default cumulative,dfm)",
            default=("cumulative", "dfm"),
            metavar="SOLVERS",
        ),  # fmt: skip
        Option(
            "n", int, "samples per setting (default 16)", default=16, short="-n", check=positive
        ),  # fmt: skip
        Option("batch_size", int, "samples per call (default 16)", default=16, check=positive),
        Option("length", int, "tokens per sample (default: the model's length)", check=positive),
        Option(
            "scorer",
            str,
            "a transformers causal LM name or path for generative perplexity (e.g. gpt2-large)",
        ),
        Option("out", str, "output directory (default ./eval)", default="eval"),
        SEED,
        DEVICE,
    )
    return Command(
        "eval",
        "sample quality and entropy against the number of steps",
        "Sample from each model with each solver at each step count and score the samples: "
        "generative perplexity under --scorer (a transformers causal LM) and the mean unigram "
        "entropy. Writes results.json, results.md and results.png into --out and prints the "
        "table.",
        options,
        _eval,
    )


COMMANDS = {c.name: c for c in (SAMPLE, CONVERT, BENCH, PRETRAIN, DISTILL, _eval_command())}


# ----------------------------------------------------------------------------------------------
# The command


def build_parser() -> Parser:
    parser = Parser(prog="fsdfm", description=__doc__.split("\n")[0])
    debug = {"action": "store_true", "help": "show the traceback of every error"}
    parser.add_argument("--debug", **debug)
    sub = parser.add_subparsers(dest="command")
    for command in COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        add_options(p, command.options)
        p.add_argument("--debug", default=argparse.SUPPRESS, **debug)
    return parser


def _options_of(command: Command, namespace) -> dict:
    given = {k: v for k, v in vars(namespace).items() if k not in ("command", "debug")}
    if command.name in ("pretrain", "distill"):  # converted by config_from_sources
        return {option.name: given.get(option.name) for option in command.options}
    return values(command.options, given)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    named = [word for word in argv if word in COMMANDS]
    name = f"fsdfm {named[0]}" if named else "fsdfm"
    if not named and not {"-h", "--help"} & set(argv):
        # `fsdfm [PROMPT] [sample options]`: the main job, generating with the bundled model.
        watch = ["--watch"] if sys.stderr.isatty() and "--progress" not in argv else []
        argv, name = ["sample", *watch, *argv], "fsdfm sample"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        name = f"fsdfm {args.command}"
        command = COMMANDS[args.command]
        command.run(_options_of(command, args))
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    # User mistakes (bad values, missing or unwritable files, a missing optional package, a
    # device out of memory) end in one line; anything else is a bug and keeps its traceback.
    except (ValueError, OSError, ImportError, torch.cuda.OutOfMemoryError) as error:
        if debug:
            raise
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except Exception:
        print(
            f"{name}: internal error; please report it with the command line and this "
            "traceback (--debug shows the traceback of user errors too)",
            file=sys.stderr,
        )
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
