"""Cost of the sampling controls (top_k, top_p, min_p, temperature=0), side by side in one run:
each control's native draw against the plain native draw (GB/s of the logits read once), against
its `_ref` (torch.topk / sort based, float64 multinomial) and, for the collapse, against the
filter chain a transformers user would write ("warpers": topk / sort + cumsum + masked_fill,
softmax, torch.multinomial).

The native top-k / top-p floor is found without sorting: on the CPU a radix selection over the
float order (three histogram levels, about two reads of the row per control), on the GPU a
bisection over the same order (up to 32 block-wide passes over the row, after the first served
by L2). Goal: top-k / top-p native draws at least 2x faster than the sort-based references and
the warper chain on both devices; min_p costs what a finite barrier costs.

    pytest benchmarks/test_controls_bench.py
"""

import math

import pytest
import torch
from conftest import DEVICES, record
from test_ops_bench import inputs, run, token_bytes

from fsdfm import ops

CONTROLS = {
    "plain": {},
    "top_k=50": {"top_k": 50},
    "top_p=0.9": {"top_p": 0.9},
    "top_k=50+top_p=0.9": {"top_k": 50, "top_p": 0.9},
    "min_p=0.05": {"min_p": 0.05},
    "temperature=0": {"temperature": 0.0},
}


def warpers(logits, *, top_k=None, top_p=None, min_p=None, temperature=1.0, generator=None):
    """The collapse as transformers' logits warpers compute it, unfused: filter with topk /
    sort, then softmax and torch.multinomial (argmax at temperature 0)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    B, L, V = logits.shape
    s = logits.float() / temperature
    if top_k:
        s = s.masked_fill(s < s.topk(top_k, dim=-1).values[..., -1:], -math.inf)
    if top_p:
        ascending, order = s.sort(-1)
        remove = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1] = False
        s = s.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    if min_p:
        p = s.softmax(-1)
        s = s.masked_fill(p < min_p * p.amax(-1, keepdim=True), -math.inf)
    draws = torch.multinomial(s.softmax(-1).reshape(B * L, V), 1, generator=generator)
    return draws.reshape(B, L)


@pytest.mark.parametrize("impl", ["native", "ref"])
@pytest.mark.parametrize("control", CONTROLS)
@pytest.mark.parametrize("device", DEVICES)
def test_jump_step_controls(benchmark, device, control, impl):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    logits, x_t = inputs(device, dtype)
    fn = ops.jump_step if impl == "native" else ops.jump_step_ref
    g = torch.Generator(device).manual_seed(3)
    h = 1 / 8
    alpha = (math.log(1 - 0.5) - math.log(1 - 0.5 - h)) / h
    kw = CONTROLS[control]
    benchmark.group = f"jump_step controls {device}"
    out = run(benchmark, device,
                lambda: fn(logits, x_t, alpha, h, generator=g, validate=False, **kw))  # fmt: skip
    assert out.shape == x_t.shape
    nbytes = logits.numel() * logits.element_size() + 2 * token_bytes(logits)
    record(benchmark, f"jump_step {control} {device} {tuple(logits.shape)}", impl, nbytes, device)


@pytest.mark.parametrize("impl", ["native", "ref", "warpers"])
@pytest.mark.parametrize("control", CONTROLS)
@pytest.mark.parametrize("device", DEVICES)
def test_sample_categorical_controls(benchmark, device, control, impl):
    logits, _ = inputs(device, torch.float32)
    g = torch.Generator(device).manual_seed(4)
    kw = CONTROLS[control]
    if impl == "warpers":

        def fn():
            return warpers(logits, generator=g, **kw)
    else:
        draw = ops.sample_categorical if impl == "native" else ops.sample_categorical_ref

        def fn():
            return draw(logits, generator=g, validate=False, **kw)

    benchmark.group = f"sample_categorical controls {device}"
    run(benchmark, device, fn)
    nbytes = logits.numel() * logits.element_size() + token_bytes(logits)
    record(
        benchmark, f"sample_categorical {control} {device} {tuple(logits.shape)}", impl, nbytes,
        device,
    )  # fmt: skip
