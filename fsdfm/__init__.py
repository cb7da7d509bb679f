"""fsdfm: few-step discrete flow-matching text generation (FS-DFM, arXiv 2509.20624).

- :func:`fsdfm.sample`: token sequences from a model in a few steps (the solvers of SPEC 2);
  :func:`fsdfm.sample_iter` yields the state after every step (streaming, live display);
- :func:`fsdfm.generate`: the same with a tokenizer, text in and text out;
- :func:`fsdfm.load` / :func:`fsdfm.save` / :func:`fsdfm.convert`: checkpoints (released ``.pth``
  files, read with ``weights_only=True``; our safetensors directories);
- :class:`fsdfm.FSDFMTransformer` / :class:`fsdfm.ModelConfig`: the DDiT transformer (SPEC 3);
- :func:`fsdfm.get_tokenizer`: GPT-2 (offline), byte and BPE (a tokenizer.json) tokenizers;
- :mod:`fsdfm.path`: the schedule, the mixture path, the sources and the solvers' scalars;
- :mod:`fsdfm.ops`: the per-step sampling ops (fused native kernels and their references);
- :mod:`fsdfm.metrics`: generative perplexity, entropy, ELBO, exact NLL and total variation;
- :mod:`fsdfm.evaluation` (imported on use): sweeps over steps and solvers (``fsdfm eval``);
- :mod:`fsdfm.training` and :mod:`fsdfm.data` (imported on use): DFM pre-training and FS-DFM
  distillation (``fsdfm pretrain`` / ``fsdfm distill``) on token streams.
"""

from fsdfm import checkpoint, metrics, model, ops, path
from fsdfm.checkpoint import convert, load, save
from fsdfm.generation import generate
from fsdfm.model import PRESETS, FSDFMTransformer, ModelConfig, config_from_state_dict
from fsdfm.solver import SampleStep, sample, sample_iter
from fsdfm.tokenizer import get_tokenizer

__all__ = [
    "PRESETS",
    "SampleStep",
    "FSDFMTransformer",
    "ModelConfig",
    "checkpoint",
    "config_from_state_dict",
    "convert",
    "generate",
    "get_tokenizer",
    "load",
    "metrics",
    "model",
    "ops",
    "path",
    "sample",
    "sample_iter",
    "save",
]
__version__ = "0.1.0"
