"""Latency of the sampling ops, native kernels against the PyTorch references, side by side.

CPU goal: native jump_step >= 5x faster than jump_step_ref at B=2, L=256, V=50257, fp32.
GPU goal: jump_step at B=32, L=1024, V=50257 (bf16 and fp32) >= 80% of the measured copy
bandwidth and >= 20x faster than jump_step_ref.

    pytest benchmarks                                  # time everything available
    pytest benchmarks --benchmark-json=out.json        # keep the figures
"""

import math

import pytest
import torch
from conftest import CUDA, DEVICES, record, synchronize

from fsdfm import ops

GPT2_V = 50257
SHAPES = {"cpu": (2, 256, GPT2_V), "cuda": (32, 1024, GPT2_V)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ["native", "ref"]


def inputs(device, dtype):
    B, L, V = SHAPES[device]
    g = torch.Generator(device).manual_seed(0)
    logits = (torch.randn(B, L, V, device=device, generator=g) * 3).to(dtype)
    x_t = torch.randint(0, V, (B, L), device=device, generator=g)
    return logits, x_t


def token_bytes(logits):
    return logits.shape[0] * logits.shape[1] * 8


def run(benchmark, device, fn):
    def call():
        out = fn()
        synchronize(device)
        return out

    return benchmark(call)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_jump_step(benchmark, device, dtype, impl):
    logits, x_t = inputs(device, DTYPES[dtype])
    fn = ops.jump_step if impl == "native" else ops.jump_step_ref
    g = torch.Generator(device).manual_seed(1)
    # alpha(t, h) of the FS-DFM step at t = 1/2, h = 1/8 (kappa_t = t).
    h = 1 / 8
    alpha = (math.log(1 - 0.5) - math.log(1 - 0.5 - h)) / h
    benchmark.group = f"jump_step {device} {dtype}"
    out = run(benchmark, device, lambda: fn(logits, x_t, alpha, h, generator=g, validate=False))
    assert out.shape == x_t.shape
    nbytes = logits.numel() * logits.element_size() + 2 * token_bytes(logits)
    record(benchmark, f"jump_step {device} {dtype} {tuple(logits.shape)}", impl, nbytes, device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_sample_categorical(benchmark, device, impl):
    logits, _ = inputs(device, torch.float32)
    fn = ops.sample_categorical if impl == "native" else ops.sample_categorical_ref
    g = torch.Generator(device).manual_seed(2)
    benchmark.group = f"sample_categorical {device} fp32"
    run(benchmark, device, lambda: fn(logits, exclude=GPT2_V - 1, generator=g, validate=False))
    nbytes = logits.numel() * logits.element_size() + token_bytes(logits)
    record(
        benchmark, f"sample_categorical {device} fp32 {tuple(logits.shape)}", impl, nbytes, device
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_probs_to_generator(benchmark, device, impl):
    logits, x_t = inputs(device, torch.float32)
    probs = logits.softmax(-1)
    fn = ops.probs_to_generator if impl == "native" else ops.probs_to_generator_ref
    benchmark.group = f"probs_to_generator {device} fp32"
    run(benchmark, device, lambda: fn(probs, x_t, 8.0, validate=False))
    nbytes = 2 * probs.numel() * probs.element_size() + token_bytes(probs)
    record(
        benchmark, f"probs_to_generator {device} fp32 {tuple(probs.shape)}", impl, nbytes, device
    )


@pytest.mark.parametrize("device", DEVICES)
def test_copy_bandwidth(benchmark, device):
    """Device-to-device copy of a buffer the size of the jump_step fp32 logits: read + write."""
    logits, _ = inputs(device, torch.float32)
    dst = torch.empty_like(logits)
    benchmark.group = f"copy {device}"
    run(benchmark, device, lambda: dst.copy_(logits))
    record(benchmark, f"copy {device}", "native", 2 * logits.numel() * 4, device)


def test_cuda_cases_exist_when_a_gpu_does():
    assert CUDA == torch.cuda.is_available()
