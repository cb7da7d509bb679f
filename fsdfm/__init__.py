"""fsdfm: few-step discrete flow-matching text generation (FS-DFM, arXiv 2509.20624).

The per-step sampling work lives in :mod:`fsdfm.ops` (fused native kernels and their PyTorch
references).
"""

from fsdfm import ops

__all__ = ["ops"]
__version__ = "0.1.0"
