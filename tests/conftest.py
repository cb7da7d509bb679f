import os

# Nothing in the tests may download: huggingface_hub (fsdfm.load of a hub id, transformers)
# reads only its cache. Set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
