"""Argument checks shared by the public entry points (``fsdfm.sample``, the op wrappers, the
model's forward, the metrics): each raises one ``TypeError`` / ``ValueError`` that names the
argument, in the manner of PyTorch's own argument errors. Inner loops get checked values and
check nothing again.
"""

from __future__ import annotations

import math

import torch


def positive_int(value, name: str) -> int:
    """``value`` as an int >= 1 (bools are refused: True is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def per_sequence(
    value: float | torch.Tensor,
    batch: int,
    device: torch.device,
    name: str,
    *,
    low: float = 0.0,
    high: float = math.inf,
    check_values: bool = True,
    move: bool = False,
) -> torch.Tensor:
    """A per-sequence scalar given as a number or a 0-d / [B] floating-point tensor, as a float32
    [B] tensor on ``device``; every value must lie in [low, high] (NaN never does). A tensor
    elsewhere is an error unless ``move`` (then it is copied there without synchronising).
    Numbers are always checked; tensors only with ``check_values``, since reading a CUDA tensor
    synchronises with the host (a sampling loop checks nothing: it made the values itself)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(
                f"{name} must be a float or a floating-point [B] tensor, got {value.dtype}"
            )
        if value.dim() == 0:
            value = value.expand(batch)
        if tuple(value.shape) != (batch,):
            raise ValueError(
                f"{name} must be a float or have shape [B] = [{batch}], got {tuple(value.shape)}"
            )
        if value.device != device and not move:
            raise ValueError(f"{name} is on {value.device} but the logits are on {device}")
        if check_values and value.device.type != "meta":
            outside = value.isnan() | (value < low) | (value > high)
            if bool(outside.any()):
                i = int(outside.nonzero()[0, 0])
                raise ValueError(
                    f"{name} must {_requirement(low, high)}, got {name}[{i}] = {float(value[i])}"
                )
        return value.to(device=device, dtype=torch.float32).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a [B] tensor, got {type(value).__name__}")
    if not low <= value <= high:  # False for NaN too
        raise ValueError(f"{name} must {_requirement(low, high)}, got {value}")
    return torch.full((batch,), float(value), dtype=torch.float32, device=device)


def _requirement(low: float, high: float) -> str:
    if low == -math.inf and high == math.inf:
        return "be a number (not NaN)"
    return f"lie in [{low:g}, {high:g}]" if high < math.inf else f"lie in [{low:g}, inf)"


def seeded_generator(seed, device: torch.device | str, name: str = "seed") -> torch.Generator:
    """A fresh torch.Generator on ``device`` seeded with ``seed``, an int in [0, 2**64) (the
    range of torch.manual_seed's unsigned seeds)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {seed!r}")
    return torch.Generator(device).manual_seed(seed)


def check_vocabulary(what: str, size: int | None, config, model: str = "the model") -> None:
    """``what`` (a tokenizer, a scorer) reads and writes the model's token ids as its own, which
    needs at least the same number of real tokens (the mask aside). Unknown sizes pass."""
    if size is None or config is None:
        return
    if size != config.real_vocab_size:
        raise ValueError(
            f"{what} has {size} tokens but {model} has {config.real_vocab_size} (not counting a "
            "mask): they must share a tokenizer"
        )


def resolve_device(device: torch.device | str | None, name: str = "device") -> torch.device:
    """``device`` as a torch.device, CUDA when available if None; a CUDA device that this
    machine lacks is a ValueError naming ``name``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{name} must be a device such as 'cpu' or 'cuda', got {device!r}"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} is {device} but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name} is {device} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s)"
            )
    return device


def model_device(model) -> torch.device | None:
    """The device of a module's first parameter (or buffer); None for other callables."""
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return None
