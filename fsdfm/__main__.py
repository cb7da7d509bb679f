"""`python -m fsdfm`: until the CLI lands, a demonstration of the fused FS-DFM step."""

import math
import time

import torch

from fsdfm.ops import jump_step, jump_step_ref, native_available


def demo() -> None:
    """One FS-DFM step at GPT-2 scale, native kernel against the reference."""
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


if __name__ == "__main__":
    demo()
