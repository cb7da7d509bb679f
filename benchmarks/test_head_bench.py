"""The fused head (fsdfm.head) against the unfused path it replaces: the logits made by the
output layer (F.linear, in the inputs' dtype) and then jump_step on them. Time and peak memory,
side by side in one run; the goal (GPU, B = 32, L = 1,024, V = 50,257, d = 768 and 2,048, bf16):
faster than the unfused path and a peak lower by at least the logits' size.
CPU: the bundled model's head ([4, 256] states of d = 256, V = 8,192, fp32).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, NOTES, device_name, synchronize

from fsdfm import head, ops

CASES = {
    "cpu": [(4, 256, 8192, 256, torch.float32)],
    "cuda": [(32, 1024, 50257, 768, torch.bfloat16), (32, 1024, 50257, 2048, torch.bfloat16)],
}
H = 1 / 8
ALPHA = (math.log(1 - 0.5) - math.log(1 - 0.5 - H)) / H  # the FS-DFM step at t = 1/2
SEEN: dict = {}


def inputs(B, L, V, d, dtype, device):
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(B, L, d, device=device, generator=g).to(dtype)
    weight = (torch.randn(V, d, device=device, generator=g) * (3 / math.sqrt(d))).to(dtype)
    bias = torch.zeros(V, device=device, dtype=dtype)
    x_t = torch.randint(0, V, (B, L), device=device, generator=g)
    return hidden, weight, bias, x_t


@pytest.mark.parametrize("impl", ["fused", "unfused"])
@pytest.mark.parametrize("case", range(2))
@pytest.mark.parametrize("device", DEVICES)
def test_head_step(benchmark, device, case, impl):
    if case >= len(CASES[device]):
        pytest.skip("no such case on this device")
    B, L, V, d, dtype = CASES[device][case]
    hidden, weight, bias, x_t = inputs(B, L, V, d, dtype, device)
    g = torch.Generator(device).manual_seed(1)
    kw = {"generator": g, "validate": False}
    if impl == "fused":

        def fn():
            return head.head_jump_step(hidden, weight, bias, x_t, ALPHA, H, **kw)
    else:

        def fn():
            return ops.jump_step(F.linear(hidden, weight, bias), x_t, ALPHA, H, **kw)

    fn()
    synchronize(device)
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        synchronize(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9

    def call():
        out = fn()
        synchronize(device)
        return out

    benchmark.group = f"head {device} B={B} L={L} V={V} d={d} {str(dtype)[6:]}"
    out = benchmark(call)
    assert out.shape == (B, L)
    benchmark.extra_info.update(
        device=device_name(device),
        batch=B,
        seq_len=L,
        vocab=V,
        dim=d,
        peak_gb=peak,
        logits_gb=B * L * V * hidden.element_size() / 1e9,
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        SEEN[(device, case, impl)] = (stats.stats.mean, peak)
        other = SEEN.get((device, case, "unfused" if impl == "fused" else "fused"))
        if other is not None:
            (fused, fpeak), (unfused, upeak) = (
                SEEN[(device, case, "fused")],
                SEEN[(device, case, "unfused")],
            )
            mem = f", peak {fpeak:.2f} vs {upeak:.2f} GB" if fpeak is not None else ""
            NOTES.append(
                f"{benchmark.group}: fused {fused * 1e3:.2f} ms vs unfused "
                f"{unfused * 1e3:.2f} ms ({unfused / fused:.2f}x){mem}"
            )
