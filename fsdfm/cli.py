"""The `fsdfm` command (also `python -m fsdfm`).

    fsdfm sample [PROMPT] --model PATH [--steps 8] [--length N] [-n N] [--seed S] ...
    fsdfm convert IN.pth OUT_DIR [--weights ema|student|teacher|model] [--dtype bf16]
    fsdfm demo                      one fused FS-DFM step at GPT-2 scale, native vs reference
    fsdfm pretrain --data PATH --out DIR [--preset tiny] [--config FILE.yaml] ...
    fsdfm distill --teacher DIR --data PATH --out DIR [--teacher-type rk4|heun] ...

User mistakes (a missing file, a bad flag value) end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sample(args) -> None:
    import fsdfm
    from fsdfm.checkpoint import load
    from fsdfm.tokenizer import get_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load(args.model, weights=args.weights, device=device)
    name = args.tokenizer or getattr(model, "tokenizer_name", None)
    if name is None:
        raise ValueError(f"{args.model} names no tokenizer: pass --tokenizer gpt2|byte")
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


def _demo(args) -> None:
    from fsdfm.ops import jump_step, jump_step_ref, native_available

    device = "cuda" if native_available("cuda") and torch.cuda.is_available() else "cpu"
    B, L, V = 2, 256, 50257
    g = torch.Generator(device).manual_seed(0)
    logits = torch.randn(B, L, V, device=device, generator=g) * 3
    x_t = torch.randint(0, V, (B, L), device=device, generator=g)
    t, h = 0.5, 1 / 8
    alpha = (math.log(1 - t) - math.log(1 - t - h)) / h
    p_t = torch.softmax(logits.double(), -1).gather(-1, x_t[..., None])[..., 0]
    expected = float((-torch.expm1(-h * alpha * (1 - p_t))).mean())
    print(f"FS-DFM step on {device}: logits [{B}, {L}, {V}], t = {t}, h = {h}, alpha = {alpha:.4f}")
    for name, fn in (("native", jump_step), ("reference", jump_step_ref)):
        fn(logits, x_t, alpha, h, generator=g)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x_next = fn(logits, x_t, alpha, h, generator=g)
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        moved = float((x_next != x_t).double().mean())
        print(f"  {name:<9} {ms:8.1f} ms   jumped {moved:.3f} of positions (law: {expected:.3f})")


def _pretrain(args) -> None:
    from fsdfm import training

    training.main(args, "pretrain")


def _distill(args) -> None:
    from fsdfm import training

    training.main(args, "distill")


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


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
    s.add_argument(
        "--weights",
        choices=["ema", "student", "teacher", "model"],
        default=None,
        help="which model of a released FS-DFM .pth (default: the EMA student)",
    )
    s.add_argument(
        "--tokenizer",
        choices=["gpt2", "byte"],
        default=None,
        help="override the tokenizer the checkpoint names",
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
        choices=["cumulative", "euler", "dfm"],
        default="cumulative",
        help="cumulative = FS-DFM (default), euler, or dfm (the 1024-step baseline)",
    )
    s.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available"
    )
    s.add_argument("--progress", action="store_true", help="show a progress bar over the steps")
    s.add_argument(
        "--watch", action="store_true", help="show the first text changing step by step (stderr)"
    )
    s.add_argument(
        "--watch-delay", type=float, default=0.4, help="seconds between --watch frames (0.4)"
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
    c.add_argument(
        "--weights",
        choices=["ema", "student", "teacher", "model"],
        default=None,
        help="which model of an FS-DFM file (default: the EMA student)",
    )
    c.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="cast the weights (default: keep)"
    )
    c.set_defaults(run=_convert)

    d = sub.add_parser("demo", help="one fused FS-DFM step, native kernel vs reference")
    d.set_defaults(run=_demo)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo"])
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        print(f"fsdfm {args.command or 'demo'}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
