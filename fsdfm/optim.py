"""The learning-rate schedule of every training loop of fsdfm (the DFM teacher, the FS-DFM
student and the autoregressive scorer): a linear warm-up, then a cosine decay to a floor.
"""

from __future__ import annotations

import math

__all__ = ["learning_rate"]


def learning_rate(
    step: int, *, lr: float, steps: int, warmup: int, min_lr_ratio: float = 0.1
) -> float:
    """The LR of optimizer step ``step`` (0-based): lr (step + 1) / warmup during the warm-up,
    then lr_min + (lr - lr_min) (1 + cos(pi (step - warmup) / (steps - warmup))) / 2, with
    lr_min = min_lr_ratio lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    low = min_lr_ratio * lr
    return low + (lr - low) * 0.5 * (1 + math.cos(math.pi * progress))
