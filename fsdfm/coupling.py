"""Rectified couplings (ReDi: Yoo, Kim and Hong, "Rectified Discrete Flow", NeurIPS 2025,
arXiv 2507.15897): pairs (x_0, x_1) with x_0 the source noise and x_1 what a model's sampler
makes from that very x_0, the training pairs of ``fsdfm distill --method redi``.

A discrete flow model trained on independent pairs pi(x_0, x_1) = p_0(x_0) p_1(x_1) learns the
posteriors p(x_1^i | x_t) of each position, and a step that draws the positions independently
misses their joint law by the conditional total correlation

    TC(x_t) = KL( p(x_1 | x_t) || prod_i p(x_1^i | x_t) ),

which is what limits few-step sampling (issue 16's exact caps). Retrained on the pairs of its own
sampler, pi'(x_0, x_1) = p_0(x_0) q(x_1 | x_0), the model sees x_1 partly decided by the x_0
visible in x_t (uniform source: the positions not yet jumped), so the positions' joint
uncertainty given x_t, hence TC, shrinks; ReDi proves each such rectification lowers the
expected conditional TC, with the marginal of x_1 that of the sampler. With the mask source x_0
is the all-mask sequence and carries nothing: rectification needs the uniform source.

The pairs are stored as one safetensors file (x_0, x_1: int32 [n, L]) with their provenance in
its metadata, written atomically and read back before it is trusted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from fsdfm._args import model_device
from fsdfm._io import atomic_write, sha256_of
from fsdfm.progress import Progress
from fsdfm.solver import sample_iter

__all__ = ["load_couplings", "rectified_couplings", "save_couplings"]


@torch.no_grad()
def rectified_couplings(
    model,
    n: int,
    *,
    steps: int = 256,
    solver: str = "cumulative",
    batch_size: int = 256,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """(x_0, x_1), int64 [n, L] on the CPU: n source draws x_0 (uniform source) and, for each,
    the sample ``model`` makes from it with ``steps`` calls of ``solver`` (:func:`fsdfm.sample`).
    Batch b uses the generator seeded ``seed + b`` on the sampling device, so the pairs do not
    depend on how many batches run before a given one."""
    if n < 1 or batch_size < 1 or steps < 1:
        raise ValueError(f"need n, batch_size, steps >= 1, got {n}, {batch_size}, {steps}")
    config = getattr(model, "config", None)
    if config is not None and config.source != "uniform":
        raise ValueError(
            "rectified couplings need the uniform source (the mask source's x_0 is the all-mask "
            f"sequence, which decides nothing); the model was trained with the {config.source} "
            "source"
        )
    if device is None:
        device = model_device(model) or "cpu"
    x_0s, x_1s = [], []
    bar = Progress(n, "couplings", unit="pair", enabled=progress)
    try:
        for b, start in enumerate(range(0, n, batch_size)):
            rows = min(batch_size, n - start)
            generator = torch.Generator(device).manual_seed(seed + b)
            states = sample_iter(
                model, steps, batch_size=rows, seq_len=seq_len, solver=solver,
                vocab_size=vocab_size, device=device, generator=generator,
            )  # fmt: skip
            # The sampler updates its state in place: x_0 is copied when it is yielded.
            x_0 = next(states).x.cpu().clone()
            for state in states:
                x_1 = state.x
            x_0s.append(x_0)
            x_1s.append(x_1.cpu())
            bar.update(rows)
    finally:
        bar.close()
    return torch.cat(x_0s), torch.cat(x_1s)


def save_couplings(path: str | Path, x_0: Tensor, x_1: Tensor, meta: dict) -> str:
    """Write the pairs to ``path`` atomically, read them back, and return the file's sha256.
    ``meta`` (JSON-able: where the pairs come from) goes into the file's metadata."""
    from safetensors.torch import save

    path = Path(path)
    if x_0.shape != x_1.shape or x_0.dim() != 2:
        raise ValueError(f"x_0 and x_1 must both be [n, L], got {x_0.shape} and {x_1.shape}")
    tensors = {"x_0": x_0.to(torch.int32).contiguous(), "x_1": x_1.to(torch.int32).contiguous()}
    data = save(tensors, metadata={"fsdfm": json.dumps(meta, sort_keys=True)})
    atomic_write(path, lambda f: f.write(data))
    back_0, back_1, back_meta = load_couplings(path)
    if not (torch.equal(back_0, x_0.long()) and torch.equal(back_1, x_1.long())):
        raise OSError(f"{path} does not read back as written (a failing disk?)")
    if back_meta != json.loads(json.dumps(meta, sort_keys=True)):
        raise OSError(f"{path}: the metadata does not read back as written")
    return sha256_of(path)


def load_couplings(path: str | Path) -> tuple[Tensor, Tensor, dict]:
    """(x_0, x_1 int64 [n, L], meta) from a file of :func:`save_couplings`; a file that is not
    one is refused in one line naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"couplings file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            meta_text = (f.metadata() or {}).get("fsdfm")
            tensors = {k: f.get_tensor(k) for k in keys & {"x_0", "x_1"}}
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable couplings file: {error}") from None
    x_0, x_1 = tensors.get("x_0"), tensors.get("x_1")
    if x_0 is None or x_1 is None or meta_text is None:
        raise ValueError(f"{path} is not a couplings file (it needs x_0, x_1 and fsdfm metadata)")
    if x_0.shape != x_1.shape or x_0.dim() != 2 or x_0.shape[0] < 1:
        raise ValueError(f"{path}: x_0 {tuple(x_0.shape)} and x_1 {tuple(x_1.shape)} are not "
                         "two [n, L] arrays of one shape")  # fmt: skip
    if x_0.dtype.is_floating_point or x_1.dtype.is_floating_point:
        raise ValueError(f"{path}: the pairs must be token ids (integers)")
    return x_0.long(), x_1.long(), json.loads(meta_text)
