"""The FS-DFM / DFM transformer (SPEC 3): a DiT-style bidirectional transformer ("DDiT").

token embedding -> ``n_blocks`` adaLN blocks (rotary attention + GELU MLP) -> adaLN final layer
-> logits [B, L, V]. The state-dict names and shapes are those of the released checkpoints, so a
released state dict loads as is (see :mod:`fsdfm.checkpoint`).

Conditioning, with phi(s) the 256-wide sinusoidal embedding of the raw scalar s (not x1000),
omega_k = exp(-ln(10000) k / 128), phi = [cos(s omega), sin(s omega)]:

- teacher (``step_conditioned=False``): c = SiLU(t_emb), t_emb = time_embedding(phi(t)) with the
  MLP Linear(256, c), SiLU, Linear(c, c); every block and the final layer use c directly;
- student (``step_conditioned=True``): c = SiLU(time_condition_fuser([t_emb; h_emb])), 2c wide,
  h_emb = dt_embedding(phi(h)); every block and the final layer first map it back with their own
  ``condition_fuser``: c_i = SiLU(condition_fuser_i(c)), Linear(2c, c), then adaLN_modulation(c_i).
  (SPEC 3 reads "a Linear(2c->c) and a SiLU": we apply the Linear first, then the SiLU, the order
  that the released checkpoints were trained with.)

Numerics: on CUDA the blocks and the final layer run under bf16 autocast (``autocast_dtype``;
set it to None for full fp32), while the conditioning MLPs, the LayerNorms (fp32, eps 1e-5, no
affine, then the learned weight), the rotary embedding and the residual stream stay in fp32.
On CPU there is no autocast: the model computes in the dtype of its weights (a bf16 model casts
the inputs of each Linear to bf16) with an fp32 residual stream. Logits come back in the dtype
of the last matmul, bfloat16 under autocast or for a bf16 model: the sampling kernels read them
as they are and the losses (:mod:`fsdfm.losses`) upcast a chunk of rows at a time, so no fp32
copy of the [B, L, V] logits is made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsdfm import path
from fsdfm._args import per_sequence

__all__ = [
    "PRESETS",
    "FSDFMTransformer",
    "ModelConfig",
    "config_from_state_dict",
    "sinusoidal_embedding",
]

GPT2_VOCAB = 50257  # GPT-2's vocabulary: the released models' output size (uniform source)
FREQ_DIM = 256  # width of the sinusoidal embedding phi
ROTARY_BASE = 10000.0
NORM_EPS = 1e-5


@dataclass(frozen=True)
class ModelConfig:
    """The shape of an FS-DFM / DFM transformer (SPEC 3); the defaults are the 0.17B model.

    vocab_size: the model's input and output size: V real tokens for a uniform source, V + 1 for
        a mask source (the mask id is then ``vocab_size - 1``).
    dim, n_blocks, n_heads, cond_dim: d, the number of blocks, attention heads (head_dim =
        dim / n_heads, even for rotary; 64 in the released models) and c, the conditioning width.
    seq_len: the longest sequence the model takes (and the length ``fsdfm.sample`` generates).
    dropout: on the attention and MLP branches, in training mode only.
    step_conditioned: whether the step size h is embedded (an FS-DFM student; a DFM teacher is not).
    source: "uniform" or "mask", the source distribution that the model was trained with.
    """

    vocab_size: int = GPT2_VOCAB
    dim: int = 768
    n_blocks: int = 12
    n_heads: int = 12
    cond_dim: int = 128
    seq_len: int = 1024
    dropout: float = 0.1
    step_conditioned: bool = False
    source: str = "uniform"

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_blocks", "n_heads", "cond_dim", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"ModelConfig.dim = {self.dim} is not divisible by n_heads = {self.n_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.head_dim} must be even (rotary embedding)"
            )
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.step_conditioned, bool):
            raise ValueError(
                f"ModelConfig.step_conditioned must be a bool, got {self.step_conditioned!r}"
            )
        if self.source not in path.SOURCES:
            raise ValueError(
                f"ModelConfig.source must be one of {path.SOURCES}, got {self.source!r}"
            )
        if self.source == "mask" and self.vocab_size < 2:
            raise ValueError("a mask source needs vocab_size >= 2 (V real tokens + the mask)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def mask_id(self) -> int | None:
        """The mask token's id (the last index) with a mask source, else None."""
        return path.mask_id(self.source, self.vocab_size)

    @property
    def real_vocab_size(self) -> int:
        """V, the number of real tokens (vocab_size without the mask token)."""
        return path.real_vocab_size(self.source, self.vocab_size)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def forward_flops(self, batch: int, seq_len: int | None = None) -> int:
        """Floating-point operations of one forward pass on [batch, seq_len] tokens, counting a
        multiply-add as 2: per block and token 24 d^2 in the matmuls (q, k, v, out: 4 d^2; the
        MLP: 8 d^2; times 2) and 4 L d in attention (Q K^T and A V), plus 2 d V in the output
        layer; the conditioning MLPs, norms and element-wise work are left out (< 1%)."""
        L = self.seq_len if seq_len is None else seq_len
        d = self.dim
        per_token = self.n_blocks * (24 * d * d + 4 * L * d) + 2 * d * self.vocab_size
        return batch * L * per_token

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The inverse of :meth:`to_dict`. Unknown keys are an error; the shape fields (vocab_size,
        dim, n_blocks, n_heads, cond_dim) are required, the others take their defaults."""
        if not isinstance(data, dict):
            raise TypeError(f"ModelConfig.from_dict needs a dict, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; the known keys are {known}")
        missing = [
            k for k in ("vocab_size", "dim", "n_blocks", "n_heads", "cond_dim") if k not in data
        ]
        if missing:
            raise ValueError(f"ModelConfig dict lacks the required keys {missing}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named size from :data:`PRESETS` with fields overridden, e.g.
        ``ModelConfig.preset("tiny", vocab_size=1000, step_conditioned=True)``. With
        ``source="mask"`` and no vocab_size the vocabulary is GPT-2's plus the mask (50258)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; the presets are {sorted(PRESETS)}")
        if overrides.get("source") == "mask" and "vocab_size" not in overrides:
            overrides["vocab_size"] = GPT2_VOCAB + 1
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, ModelConfig] = {
    # Small sizes for tests and CPU experiments (heads of 64 like the released models).
    "tiny": ModelConfig(dim=128, n_blocks=2, n_heads=2, cond_dim=64, seq_len=128),
    "small": ModelConfig(dim=256, n_blocks=4, n_heads=4, cond_dim=128, seq_len=256),
    # The sizes of the paper (SPEC 3).
    "0.17B": ModelConfig(dim=768, n_blocks=12, n_heads=12, cond_dim=128),
    "1.3B": ModelConfig(dim=2048, n_blocks=21, n_heads=32, cond_dim=256),
    "1.7B": ModelConfig(dim=2048, n_blocks=28, n_heads=32, cond_dim=256),
    # The synthetic problems of docs/results.md (fsdfm.synthetic): pairs on a checkerboard and
    # Markov chains of 128 symbols, CPU-sized.
    "toy-pairs": ModelConfig(dim=64, n_blocks=2, n_heads=1, cond_dim=32, seq_len=2),
    "toy-chain": ModelConfig(dim=128, n_blocks=2, n_heads=2, cond_dim=64, seq_len=128),
}


def sinusoidal_embedding(s: Tensor, dim: int = FREQ_DIM) -> Tensor:
    """phi(s) [B, dim] in fp32 for s [B]: [cos(s omega), sin(s omega)], omega_k =
    exp(-ln(10000) k / (dim / 2)), k = 0 .. dim/2 - 1. The raw scalar, not scaled by 1000."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=s.device)
    omega = torch.exp(-math.log(10000.0) * k / half)
    args = s.float()[:, None] * omega[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _cast(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    return x if dtype is None else x.to(dtype)


def _norm(x: Tensor, weight: Tensor) -> Tensor:
    """LayerNorm without affine in fp32 (eps 1e-5), then the learned weight (no bias)."""
    with _no_cuda_autocast(x):
        return F.layer_norm(x.float(), (x.shape[-1],), eps=NORM_EPS) * weight.float()


def _no_cuda_autocast(x: Tensor):
    if x.device.type == "cuda":
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


class TimestepEmbedder(nn.Module):
    """phi(s) -> Linear(256, c) -> SiLU -> Linear(c, c) (state-dict names ``mlp.0``, ``mlp.2``)."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    def forward(self, s: Tensor) -> Tensor:
        phi = sinusoidal_embedding(s)
        return self.mlp(phi.to(self.mlp[0].weight.dtype))


class Rotary(nn.Module):
    """Rotary position embedding (NeoX rotate-half form, base 10000), computed in fp32.

    ``inv_freq`` [head_dim / 2] is a persistent buffer (it is in the released state dicts) and is
    kept in fp32 when the module is cast to another dtype."""

    def __init__(self, head_dim: int, base: float = ROTARY_BASE):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq)

    def _apply(self, fn, recurse=True):
        saved = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:  # a dtype cast: keep the frequencies exact
            self.inv_freq = saved.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin [L, head_dim] in fp32."""
        pos = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, self.inv_freq.float())
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, L, H, hd] rotated in fp32: x cos + rotate_half(x) sin, back in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]).to(x.dtype)


class DDiTBlock(nn.Module):
    """adaLN block: rotary bidirectional attention and a GELU(tanh) MLP, each gated."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, c = config.dim, config.cond_dim
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.norm1 = _NormWeight(d)
        self.qw = nn.Linear(d, d, bias=False)
        self.kw = nn.Linear(d, d, bias=False)
        self.vw = nn.Linear(d, d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = _NormWeight(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d)
        )
        if config.step_conditioned:
            self.condition_fuser = nn.Linear(2 * c, c)
        self.adaLN_modulation = nn.Linear(c, 6 * d)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, c: Tensor, cast) -> Tensor:
        """x [B, L, d] fp32 residual stream, c [B, c] (or [B, 2c] for a student)."""
        B, L, d = x.shape
        if hasattr(self, "condition_fuser"):
            c = F.silu(self.condition_fuser(_cast(c, cast)))
        mod = self.adaLN_modulation(_cast(c, cast))[:, None, :]  # [B, 1, 6d]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)

        a = _norm(x, self.norm1.weight) * (1 + scale1) + shift1
        a = _cast(a, cast)
        q = self.qw(a).view(B, L, self.n_heads, self.head_dim)
        k = self.kw(a).view(B, L, self.n_heads, self.head_dim)
        v = self.vw(a).view(B, L, self.n_heads, self.head_dim)
        with _no_cuda_autocast(x):
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        o = o.transpose(1, 2).reshape(B, L, d)
        x = x + gate1 * F.dropout(self.attn_out(o), self.dropout, self.training)

        a = _norm(x, self.norm2.weight) * (1 + scale2) + shift2
        x = x + gate2 * F.dropout(self.mlp(_cast(a, cast)), self.dropout, self.training)
        return x


class _NormWeight(nn.Module):
    """Holds the learned LayerNorm weight [d] (state-dict name ``...norm1.weight``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _norm(x, self.weight)


class FinalLayer(nn.Module):
    """(shift, scale) = adaLN_modulation(c); logits = linear(LN(x) w (1 + scale) + shift). The
    model applies ``linear`` itself (FSDFMTransformer._forward), so that the fused head can take
    its input instead (``head_inputs``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, c = config.dim, config.cond_dim
        self.norm_final = _NormWeight(d)
        self.linear = nn.Linear(d, config.vocab_size)
        if config.step_conditioned:
            self.condition_fuser = nn.Linear(2 * c, c)
        self.adaLN_modulation = nn.Linear(c, 2 * d)
        for p in (self.linear.weight, self.linear.bias):
            nn.init.zeros_(p)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def modulated(self, x: Tensor, c: Tensor, cast) -> Tensor:
        """The input of the output linear: LN(x) w (1 + scale) + shift (fp32 under autocast)."""
        if hasattr(self, "condition_fuser"):
            c = F.silu(self.condition_fuser(_cast(c, cast)))
        shift, scale = self.adaLN_modulation(_cast(c, cast))[:, None, :].chunk(2, dim=-1)
        return _cast(_norm(x, self.norm_final.weight) * (1 + scale) + shift, cast)


class FSDFMTransformer(nn.Module):
    """The DFM teacher / FS-DFM student transformer of SPEC 3.

    ``model(x_t, t, h=None)`` -> logits [B, L, vocab_size] (float32, or bfloat16 under CUDA
    autocast and for a bf16 model), for x_t int64 [B, L] (L <=
    ``config.seq_len``), t (and h, the step size) floats or [B] tensors in [0, 1]. A teacher
    ignores h; a student (``config.step_conditioned``) requires it.

    Input checks never synchronise with a CUDA device: dtype, shape and device are always checked,
    the token-id range and the values of t and h only for CPU tensors (floats always; an
    out-of-range id on CUDA fails inside the embedding).
    With t and h given as float32 [B] tensors on the model's device the forward is device work only,
    so it can be captured in a CUDA graph (``fsdfm.sample(..., cuda_graph=True)``).

    Attributes: ``config`` (the :class:`ModelConfig`), ``autocast_dtype`` (torch.bfloat16: the
    autocast dtype on CUDA; None runs CUDA in the weights' dtype), ``tokenizer_name`` (set by
    :func:`fsdfm.checkpoint.load`, else None). :meth:`compile` compiles the computation (the checks
    stay outside the compiled graph). ``from_pretrained`` / ``save_pretrained``, Hugging Face's
    entry points, are :func:`fsdfm.checkpoint.load` / :func:`~fsdfm.checkpoint.save`; the
    checkpoint module, which sits above this one, attaches them.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.autocast_dtype: torch.dtype | None = torch.bfloat16
        self.tokenizer_name: str | None = None
        c = config.cond_dim
        self.vocab_embed = nn.Embedding(config.vocab_size, config.dim)
        self.time_embedding = TimestepEmbedder(c)
        if config.step_conditioned:
            self.dt_embedding = TimestepEmbedder(c)
            self.time_condition_fuser = nn.Linear(2 * c, 2 * c)
        self.rotary_emb = Rotary(config.head_dim)
        self.blocks = nn.ModuleList(DDiTBlock(config) for _ in range(config.n_blocks))
        self.output_layer = FinalLayer(config)
        self._compiled = None
        self._compiled_hidden = None

    # -- as in Hugging Face models ------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.vocab_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (the rotary frequencies aside, always float32)."""
        return self.vocab_embed.weight.dtype

    # -- torch.compile ---------------------------------------------------------------------

    def compile(self, **kwargs) -> FSDFMTransformer:
        """Compile the computation with ``torch.compile(**kwargs)`` (e.g. ``mode="max-autotune"``,
        ``dynamic=False``); returns self. The input checks run eagerly before the compiled graph.
        ``model.compile(disable=True)`` goes back to eager. Copies and pickles of the model drop
        the compiled function (call compile again on them)."""
        if kwargs.get("disable"):
            self._compiled = self._compiled_hidden = None
        else:
            self._compiled = torch.compile(self._forward, **kwargs)
            self._compiled_hidden = torch.compile(self._hidden, **kwargs)
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        # A compiled function is neither copied nor pickled.
        state["_compiled"] = state["_compiled_hidden"] = None
        return state

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t, h=None) -> Tensor:
        t, h = self._check_inputs(x_t, t, h)
        run = self._compiled if self._compiled is not None else self._forward
        return run(x_t, t, h)

    def head_inputs(self, x_t: Tensor, t, h=None) -> tuple[Tensor, Tensor, Tensor]:
        """(hidden [B, L, d], weight [V, d], bias [V]): the final hidden states and the output
        layer, all in the dtype of the output product (bfloat16 under autocast), so that
        ``F.linear(hidden, weight, bias)`` is ``model(x_t, t, h)``. The fused head
        (:mod:`fsdfm.head`) samples from them without making the logits."""
        t, h = self._check_inputs(x_t, t, h)
        run = self._compiled_hidden if self._compiled_hidden is not None else self._hidden
        hidden = run(x_t, t, h)
        return (hidden, *self._output_weights(hidden.dtype))

    def _check_inputs(self, x_t, t, h):
        cfg = self.config
        if not isinstance(x_t, Tensor) or x_t.dtype != torch.int64 or x_t.dim() != 2:
            what = (
                f"{x_t.dtype} tensor of shape {tuple(x_t.shape)}"
                if isinstance(x_t, Tensor)
                else type(x_t).__name__
            )
            raise TypeError(f"x_t must be an int64 tensor [B, L], got a {what}")
        B, L = x_t.shape
        if L > cfg.seq_len:
            raise ValueError(
                f"x_t has length L = {L}, longer than the model's seq_len = {cfg.seq_len}"
            )
        device = self.vocab_embed.weight.device
        if x_t.device != device:
            raise ValueError(f"x_t is on {x_t.device} but the model is on {device}")
        on_cpu = x_t.device.type == "cpu"  # values are read only there: on CUDA it would sync
        if on_cpu and x_t.numel():
            lo, hi = (int(v) for v in torch.aminmax(x_t))
            if lo < 0 or hi >= cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"x_t holds token id {bad}, outside [0, {cfg.vocab_size})")
        # t and h outside [0, 1] (NaN, inf) have no meaning on the path and give NaN logits.
        t = per_sequence(t, B, device, "t", high=1.0, check_values=on_cpu, move=True)
        if cfg.step_conditioned:
            if h is None:
                raise ValueError(
                    "this model is step-conditioned (an FS-DFM student): pass h, the step size, "
                    "as model(x_t, t, h)"
                )
            h = per_sequence(h, B, device, "h", high=1.0, check_values=on_cpu, move=True)
        else:
            h = None  # a teacher ignores the step size
        return t, h

    def _forward(self, x_t: Tensor, t: Tensor, h: Tensor | None) -> Tensor:
        hidden = self._hidden(x_t, t, h)
        return F.linear(hidden, *self._output_weights(hidden.dtype))

    def _output_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        linear = self.output_layer.linear
        return linear.weight.to(dtype), linear.bias.to(dtype)

    def _hidden(self, x_t: Tensor, t: Tensor, h: Tensor | None) -> Tensor:
        """The input of the output linear [B, L, d], in the dtype of that product."""
        on_cuda = x_t.device.type == "cuda"
        use_autocast = on_cuda and self.autocast_dtype is not None
        # Without autocast, Linear inputs are cast to the weights' dtype (a bf16 model on CPU).
        cast = None if use_autocast else self.vocab_embed.weight.dtype

        # Conditioning outside autocast (fp32 for fp32 weights), as in the released models.
        with _no_cuda_autocast(x_t):
            t_emb = self.time_embedding(t)
            if self.config.step_conditioned:
                h_emb = self.dt_embedding(h)
                fused = torch.cat([t_emb, h_emb], dim=-1)
                c = F.silu(
                    self.time_condition_fuser(fused.to(self.time_condition_fuser.weight.dtype))
                )
            else:
                c = F.silu(t_emb)

        x = self.vocab_embed(x_t).float()  # fp32 residual stream
        cos, sin = self.rotary_emb(x_t.shape[1], x_t.device)
        ctx = (
            torch.autocast("cuda", dtype=self.autocast_dtype)
            if use_autocast
            else contextlib.nullcontext()
        )
        with ctx:
            for block in self.blocks:
                x = block(x, cos, sin, c, cast)
            hidden = self.output_layer.modulated(x, c, cast)
        # Under autocast the output product runs in autocast's dtype: cast as it would.
        return hidden.to(self.autocast_dtype) if use_autocast else hidden


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def config_from_state_dict(
    state_dict: dict[str, Tensor],
    *,
    seq_len: int = 1024,
    dropout: float = 0.1,
    source: str | None = None,
) -> ModelConfig:
    """Read the :class:`ModelConfig` off the shapes of a state dict with SPEC 3's names (no
    ``_orig_mod.`` / ``module.`` prefixes: :func:`fsdfm.checkpoint.load` strips them).

    d and V from ``vocab_embed.weight``, c from ``time_embedding.mlp.0.weight``, the number of
    blocks from the highest ``blocks.i``, heads = d / (2 len(inv_freq)), a student if
    ``dt_embedding`` is present. ``source`` (None: infer) is "mask" for V = 50258 (GPT-2's 50257
    tokens plus the mask, the only mask-source size we can recognise) and "uniform" otherwise;
    pass it explicitly for a mask-source model with another vocabulary.
    """

    def shape(key):
        if key not in state_dict:
            raise ValueError(
                f"state dict lacks {key!r}, needed to read the model's shape "
                f"(keys found: {_preview(state_dict)})"
            )
        return tuple(state_dict[key].shape)

    V, d = shape("vocab_embed.weight")
    c = shape("time_embedding.mlp.0.weight")[0]
    (half,) = shape("rotary_emb.inv_freq")
    if half == 0 or d % (2 * half):
        raise ValueError(
            f"rotary_emb.inv_freq has {half} entries: d = {d} is not a whole number of heads of "
            f"{2 * half}"
        )
    indices = [int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))]
    if not indices:
        raise ValueError("state dict has no blocks.<i>.* keys")
    if source is None:
        source = "mask" if V == GPT2_VOCAB + 1 else "uniform"
    return ModelConfig(
        vocab_size=V,
        dim=d,
        n_blocks=max(indices) + 1,
        n_heads=d // (2 * half),
        cond_dim=c,
        seq_len=seq_len,
        dropout=dropout,
        step_conditioned="dt_embedding.mlp.0.weight" in state_dict,
        source=source,
    )


def _preview(keys, n: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "") if keys else "none"
