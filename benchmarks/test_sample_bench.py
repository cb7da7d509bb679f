"""fsdfm.sample end to end with a random-weight transformer: time per step, and the share of it
spent outside the model (the sampling ops and the loop), native kernels against the references.

CPU (here, and in CI once with --benchmark-disable): the "tiny" preset with GPT-2's vocabulary,
B = 2, L = 128, steps 1, 8, 64. GPU: the 0.17B preset, B = 8, L = 1024, steps 1, 8, 64, 1024
(1024 with the native backend only: the reference takes minutes there).
"""

import time

import pytest
import torch
from conftest import DEVICES, NOTES, device_name, synchronize

import fsdfm
from fsdfm.model import FSDFMTransformer, ModelConfig

CASES = {"cpu": ("tiny", 2, 128, (1, 8, 64)), "cuda": ("0.17B", 8, 1024, (1, 8, 64, 1024))}


class TimedModel(torch.nn.Module):
    """The model with the wall-clock time of its calls recorded (synchronised on CUDA)."""

    def __init__(self, model, device):
        super().__init__()
        self.model, self.device, self.seconds = model, device, 0.0
        self.config = model.config

    def forward(self, x, t, h):
        synchronize(self.device)
        start = time.perf_counter()
        out = self.model(x, t, h)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return out


def random_model(preset, seq_len, device):
    config = ModelConfig.preset(preset, seq_len=seq_len, step_conditioned=True, dropout=0.0)
    torch.manual_seed(0)
    model = FSDFMTransformer(config)
    with torch.no_grad():  # the zero-initialised layers too, so that the logits are not flat
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(device).eval()


MODELS = {}


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("steps", [1, 8, 64, 1024])
@pytest.mark.parametrize("device", DEVICES)
def test_sample(benchmark, device, steps, backend):
    preset, batch, seq_len, step_list = CASES[device]
    if steps not in step_list or (steps == 1024 and backend == "reference"):
        pytest.skip(f"{steps} steps with the {backend} backend are not measured on {device}")
    key = (device, preset)
    if key not in MODELS:
        MODELS[key] = random_model(preset, seq_len, device)
    timed = TimedModel(MODELS[key], device)
    g = torch.Generator(device).manual_seed(0)
    last = {}

    def run():
        timed.seconds = 0.0
        start = time.perf_counter()
        with torch.no_grad():
            out = fsdfm.sample(timed, steps, batch_size=batch, backend=backend, generator=g)
        synchronize(device)
        last.update(total=time.perf_counter() - start, model=timed.seconds)
        return out

    benchmark.group = f"sample {device} {preset} B={batch} L={seq_len} steps={steps}"
    tokens = benchmark.pedantic(run, rounds=1 if steps >= 64 else 3, iterations=1)
    assert tokens.shape == (batch, seq_len)
    benchmark.extra_info.update(
        device=device_name(device),
        ms_per_step=last["total"] / steps * 1e3,
        share_outside_model=1 - last["model"] / last["total"],
        tokens_per_s=batch * seq_len / last["total"],
    )
    info = benchmark.extra_info
    NOTES.append(
        f"{benchmark.group:<44} {backend:<9} {info['ms_per_step']:9.2f} ms/step  "
        f"{info['share_outside_model']:6.1%} outside the model  {info['tokens_per_s']:9.0f} tok/s"
    )
