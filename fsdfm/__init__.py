"""fsdfm: few-step discrete flow-matching text generation (FS-DFM, arXiv 2509.20624).

- :func:`fsdfm.sample`: token sequences from a model in a few steps (the solvers of SPEC 2);
- :func:`fsdfm.generate`: the same with a tokenizer, text in and text out;
- :mod:`fsdfm.path`: the schedule, the mixture path, the sources and the solvers' scalars;
- :mod:`fsdfm.ops`: the per-step sampling ops (fused native kernels and their references).
"""

from fsdfm import ops, path
from fsdfm.generation import generate
from fsdfm.solver import sample

__all__ = ["generate", "ops", "path", "sample"]
__version__ = "0.1.0"
