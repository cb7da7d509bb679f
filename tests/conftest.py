import os

# Nothing in the tests may download: huggingface_hub (fsdfm.load of a hub id, transformers)
# reads only its cache. Set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random

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


SENTENCES = ["the cat sat on the mat. ", "a dog ran in the park. ", "birds sing at dawn. "]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A learnable byte-level corpus for training runs: three sentences in a random order
    (about 30 KB)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(rng.choice(SENTENCES) for _ in range(1200)))
    return path
