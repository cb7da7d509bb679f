"""The same text settling three ways, as an animated GIF made from real runs: an autoregressive
model writing one token per model call, the 1,024-step DFM baseline, and 8-step FS-DFM (the
bundled model for both). Each panel plays its own run over the same frames, its header counting
model calls; the tokens that changed since the previous frame are highlighted.

    python scripts/animate.py --out docs/figures/settling.gif --ar-model runs/ar
    python scripts/animate.py --out /tmp/quick.gif --length 16 --frames 6 --dfm-steps 32

--ar-model is a transformers causal LM on the bundled model's tokenizer; without it the GIF has
the two flow panels only. No such model is shipped, and the bundled model's corpus is not on
every machine; the README's GIF used a small GPT-2 trained on the docstrings of Python's
standard library, which every machine has:

    python scripts/animate.py --docstrings /tmp/docstrings.txt   # 2.4 M characters of English
    OMP_NUM_THREADS=1 python scripts/train_scorer.py --data /tmp/docstrings.txt --out runs/ar \
        --tokenizer fsdfm/assets/default/tokenizer.json --seq-len 128 --dim 192 --layers 3 \
        --heads 3 --steps 500 --batch-size 16 --lr 2e-3       # 2.9M parameters, 5 min
    python scripts/animate.py --out docs/figures/settling.gif --ar-model runs/ar --length 64
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path

import matplotlib
import torch
from PIL import Image, ImageDraw, ImageFont

import fsdfm

FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansMono.ttf"
PANEL_W, PANEL_H, MARGIN = 380, 300, 12
COLOURS = {"background": "white", "text": "#222222", "changed": "#d62728", "noise": "#aaaaaa",
           "header": "#1f77b4"}  # fmt: skip


def flow_states(model, prompt_ids, length, steps, solver, frames, seed) -> list[tuple[int, list]]:
    """(model calls so far, tokens) at ``frames`` evenly spaced points of one run, from x_0."""
    want = {round(f * steps / (frames - 1)) for f in range(frames)}
    g = torch.Generator().manual_seed(seed)
    prompt = torch.tensor(prompt_ids) if prompt_ids else None
    kept = {}
    for state in fsdfm.sample_iter(model, steps, seq_len=length, solver=solver, prompt=prompt,
                                   generator=g):  # fmt: skip
        if state.step in want:
            kept[state.step] = state.x[0].tolist()
    return [(k, kept[k]) for k in sorted(kept)]


def ar_states(ar_model, prompt_ids, length, frames, seed) -> list[tuple[int, list]]:
    """(model calls so far, tokens, None where not yet written) of one sampled autoregressive
    continuation, at ``frames`` evenly spaced points."""
    torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids or [0]])
    with torch.no_grad():
        out = ar_model.generate(ids, do_sample=True, top_k=0, max_new_tokens=length - ids.shape[1],
                                pad_token_id=0)[0].tolist()  # fmt: skip
    new = length - len(prompt_ids)
    states = []
    for f in range(frames):
        calls = round(f * new / (frames - 1))
        states.append((calls, out[: len(prompt_ids) + calls] + [None] * (new - calls)))
    return states


def write_docstrings(path: Path) -> None:
    """The docstrings of Python's standard library (tests, installed packages and IDLE left out)
    as a text corpus: one
    document per docstring of more than 200 characters, its paragraphs of more than 60
    characters on lines of their own, doctest lines dropped."""
    import ast
    import sysconfig

    documents = []
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if {"test", "tests", "site-packages", "idlelib"} & set(file.parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, kinds) else None
            if doc and len(doc) > 200:
                paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
                kept = [p for p in paragraphs if len(p) > 60 and not p.startswith((">>>", "..."))]
                if kept:
                    documents.append("\n".join(kept))
    path.write_text("\n\n".join(documents) + "\n")
    print(f"wrote {path}: {len(documents)} docstrings", file=sys.stderr)


def draw_panel(draw, origin, title, calls, total, tokens, previous, tokenizer, font, bold):
    x0, y0 = origin
    draw.text((x0 + MARGIN, y0 + MARGIN), title, fill=COLOURS["header"], font=bold)
    draw.text((x0 + MARGIN, y0 + MARGIN + 20), f"model calls: {calls} / {total}",
              fill=COLOURS["header"], font=font)  # fmt: skip
    x, y = x0 + MARGIN, y0 + MARGIN + 48
    right = x0 + PANEL_W - MARGIN
    line_h = font.size + 4
    for i, token in enumerate(tokens):
        if token is None:
            piece, colour = "·", COLOURS["noise"]
        else:
            piece = tokenizer.decode([token]).replace("\n", "¶ ")
            changed = previous is not None and previous[i] != token
            colour = COLOURS["changed"] if changed else COLOURS["text"]
        width = draw.textlength(piece, font=font)
        if x + width > right:
            x, y = x0 + MARGIN, y + line_h
        if y + line_h > y0 + PANEL_H - MARGIN:
            break
        draw.text((x, y), piece, fill=colour, font=font)
        x += width


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="the GIF to write")
    parser.add_argument("--docstrings", help="only write the docstring corpus to this file")
    parser.add_argument("--model", default="default", help="the flow model (default: bundled)")
    parser.add_argument("--ar-model", help="a transformers causal LM on the same tokenizer")
    parser.add_argument("--prompt", default="The history of the city")
    parser.add_argument("--length", type=int, default=48, help="tokens, prompt included")
    parser.add_argument("--steps", type=int, default=8, help="FS-DFM steps")
    parser.add_argument("--dfm-steps", type=int, default=1024, help="DFM baseline steps")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--ms", type=int, default=180, help="milliseconds per frame")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.docstrings:
        return write_docstrings(Path(args.docstrings))
    if args.out is None:
        parser.error("--out is required")
    if args.frames < 2:
        parser.error("--frames must be at least 2")
    torch.set_num_threads(1)
    model = fsdfm.load(args.model)
    tokenizer = fsdfm.get_tokenizer(model.tokenizer_name)
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) >= args.length:
        parser.error(f"--length {args.length} leaves no room after the prompt's {len(prompt)}")
    panels = []
    if args.ar_model:
        from transformers import AutoModelForCausalLM

        ar = AutoModelForCausalLM.from_pretrained(args.ar_model).eval()
        total = args.length - len(prompt)
        panels.append(("autoregressive", total, ar_states(ar, prompt, args.length, args.frames,
                                                          args.seed)))  # fmt: skip
    for title, solver, steps in (
        (f"DFM, {args.dfm_steps} steps", "dfm", args.dfm_steps),
        (f"FS-DFM, {args.steps} steps", "cumulative", args.steps),
    ):
        states = flow_states(model, prompt, args.length, steps, solver, args.frames, args.seed)
        # Fewer distinct states than frames (8 steps): each is held for its share of frames.
        per_frame = [states[min(len(states) - 1, math.floor(f * len(states) / args.frames))]
                     for f in range(args.frames)]  # fmt: skip
        panels.append((title, steps, per_frame))
    font = ImageFont.truetype(str(FONT), 13)
    bold = ImageFont.truetype(str(FONT), 15)
    images, previous = [], [None] * len(panels)
    for f in range(args.frames):
        image = Image.new("RGB", (PANEL_W * len(panels), PANEL_H), COLOURS["background"])
        draw = ImageDraw.Draw(image)
        for p, (title, total, states) in enumerate(panels):
            calls, tokens = states[f]
            draw_panel(draw, (p * PANEL_W, 0), title, calls, total, tokens, previous[p],
                       tokenizer, font, bold)  # fmt: skip
            previous[p] = tokens
            if p:
                draw.line([(p * PANEL_W, 0), (p * PANEL_W, PANEL_H)], fill="#dddddd")
        images.append(image)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The last frame is held, so that the finished texts can be read.
    durations = [args.ms] * (len(images) - 1) + [args.ms * 15]
    images[0].save(out, save_all=True, append_images=images[1:], duration=durations, loop=0)
    final = {title: states[-1][1] for title, _, states in panels}
    for title, tokens in final.items():
        text = tokenizer.decode([t for t in tokens if t is not None])
        print(f"{title}: " + textwrap.shorten(text, 200), file=sys.stderr)
    print(f"wrote {out} ({len(images)} frames)", file=sys.stderr)


if __name__ == "__main__":
    main()
