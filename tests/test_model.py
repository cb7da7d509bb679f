"""fsdfm.model against a float64 re-implementation of SPEC 3 written here from the state-dict
tensors, with random weights everywhere; state-dict layout, initialisation, conditioning, dropout,
gradients, sampling, presets and input checks."""

import copy
import json
import math

import pytest
import torch

import fsdfm
from fsdfm.model import (
    PRESETS,
    FSDFMTransformer,
    ModelConfig,
    config_from_state_dict,
    sinusoidal_embedding,
)

V, L = 61, 7
SMALL = {"vocab_size": V, "dim": 64, "n_blocks": 2, "n_heads": 2, "cond_dim": 32, "seq_len": L}


def small_config(**changes) -> ModelConfig:
    return ModelConfig(**{**SMALL, **changes})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter (the zero-initialised adaLN and output layers too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def random_model(seed=0, **changes) -> FSDFMTransformer:
    return randomize(FSDFMTransformer(small_config(**changes)), seed).eval()


# ----------------------------------------------------------------------------------------------
# The float64 reference, written from SPEC 3 only.


def reference_logits(sd, cfg: ModelConfig, x, t, h=None):
    W = {k: v.double() for k, v in sd.items()}
    d, H = cfg.dim, cfg.n_heads
    hd = d // H
    B, n = x.shape

    def linear(z, name, bias=True):
        y = z @ W[name + ".weight"].T
        return y + W[name + ".bias"] if bias else y

    def silu(z):
        return z * torch.sigmoid(z)

    def gelu_tanh(z):
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    def phi(s):
        k = torch.arange(128, dtype=torch.float64)
        omega = torch.exp(-math.log(10000.0) * k / 128)
        arg = s.double()[:, None] * omega[None]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)

    def embed(s, name):
        return linear(silu(linear(phi(s), name + ".mlp.0")), name + ".mlp.2")

    def layer_norm(z, weight):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-5) * weight

    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def rope(z):  # z [B, n, hd]; pairs (j, j + hd/2) turn by pos * inv_freq[j]
        out = torch.empty_like(z)
        half = hd // 2
        for pos in range(n):
            for j in range(half):
                angle = pos * inv_freq[j]
                a, b = z[:, pos, j], z[:, pos, j + half]
                out[:, pos, j] = a * math.cos(angle) - b * math.sin(angle)
                out[:, pos, j + half] = b * math.cos(angle) + a * math.sin(angle)
        return out

    t_emb = embed(t, "time_embedding")
    if cfg.step_conditioned:
        c_vec = silu(
            linear(torch.cat([t_emb, embed(h, "dt_embedding")], 1), "time_condition_fuser")
        )
    else:
        c_vec = silu(t_emb)

    hid = W["vocab_embed.weight"][x]
    for i in range(cfg.n_blocks):
        p = f"blocks.{i}."
        c_i = silu(linear(c_vec, p + "condition_fuser")) if cfg.step_conditioned else c_vec
        mod = linear(c_i, p + "adaLN_modulation")
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            mod[:, j * d : (j + 1) * d][:, None, :] for j in range(6)
        )
        a = layer_norm(hid, W[p + "norm1.weight"]) * (1 + scale1) + shift1
        q = linear(a, p + "qw", bias=False)
        k = linear(a, p + "kw", bias=False)
        v = linear(a, p + "vw", bias=False)
        o = torch.zeros_like(q)
        for head in range(H):
            s = slice(head * hd, (head + 1) * hd)
            qh, kh = rope(q[..., s]), rope(k[..., s])
            att = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(hd), dim=-1)
            o[..., s] = att @ v[..., s]
        hid = hid + gate1 * linear(o, p + "attn_out", bias=False)
        a = layer_norm(hid, W[p + "norm2.weight"]) * (1 + scale2) + shift2
        hid = hid + gate2 * linear(gelu_tanh(linear(a, p + "mlp.0")), p + "mlp.2")

    c_f = silu(linear(c_vec, "output_layer.condition_fuser")) if cfg.step_conditioned else c_vec
    mod = linear(c_f, "output_layer.adaLN_modulation")
    shift, scale = mod[:, None, :d], mod[:, None, d:]
    a = layer_norm(hid, W["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return linear(a, "output_layer.linear")


def assert_close_rel(actual, expected, rel=1e-4):
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} against a scale of {scale:.3e}"


@pytest.mark.parametrize("student", [False, True], ids=["teacher", "student"])
@pytest.mark.parametrize("length", [L, 5])
def test_logits_match_the_float64_reference(student, length):
    model = random_model(seed=1, step_conditioned=student)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (3, length), generator=g)
    t = torch.tensor([0.0, 0.37, 0.999])
    h = torch.tensor([1 / 1024, 0.25, 1.0]) if student else None
    with torch.no_grad():
        logits = model(x, t, h)
    assert logits.dtype == torch.float32 and logits.shape == (3, length, V)
    expected = reference_logits(model.state_dict(), model.config, x, t, h)
    assert expected.abs().max() > 1.0, "the reference is not trivially small"
    assert_close_rel(logits, expected)


def test_the_reference_itself_is_sensitive():
    """The comparison can fail: a different weight, time or step size changes the logits."""
    model = random_model(seed=1, step_conditioned=True)
    x = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(0))
    t, h = torch.tensor([0.2, 0.6]), torch.tensor([0.5, 0.125])
    base = reference_logits(model.state_dict(), model.config, x, t, h)
    sd = dict(model.state_dict())
    sd["blocks.1.condition_fuser.bias"] = sd["blocks.1.condition_fuser.bias"] + 0.1
    for other in (
        reference_logits(sd, model.config, x, t, h),
        reference_logits(model.state_dict(), model.config, x, t + 0.1, h),
        reference_logits(model.state_dict(), model.config, x, t, h / 2),
    ):
        assert (other - base).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Layout and initialisation


def spec_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, c, Vt = cfg.dim, cfg.cond_dim, cfg.vocab_size
    names = {"vocab_embed.weight": (Vt, d)}
    mlps = ["time_embedding"] + (["dt_embedding"] if cfg.step_conditioned else [])
    for m in mlps:
        names.update(
            {
                f"{m}.mlp.0.weight": (c, 256),
                f"{m}.mlp.0.bias": (c,),
                f"{m}.mlp.2.weight": (c, c),
                f"{m}.mlp.2.bias": (c,),
            }
        )
    if cfg.step_conditioned:
        names.update({"time_condition_fuser.weight": (2 * c, 2 * c)})
        names.update({"time_condition_fuser.bias": (2 * c,)})
    names["rotary_emb.inv_freq"] = (cfg.head_dim // 2,)
    for i in range(cfg.n_blocks):
        p = f"blocks.{i}."
        names.update({p + "norm1.weight": (d,), p + "norm2.weight": (d,)})
        names.update({p + f"{w}.weight": (d, d) for w in ("qw", "kw", "vw", "attn_out")})
        names.update({p + "mlp.0.weight": (4 * d, d), p + "mlp.0.bias": (4 * d,)})
        names.update({p + "mlp.2.weight": (d, 4 * d), p + "mlp.2.bias": (d,)})
        names.update({p + "adaLN_modulation.weight": (6 * d, c)})
        names.update({p + "adaLN_modulation.bias": (6 * d,)})
        if cfg.step_conditioned:
            names.update({p + "condition_fuser.weight": (c, 2 * c)})
            names.update({p + "condition_fuser.bias": (c,)})
    names.update(
        {
            "output_layer.norm_final.weight": (d,),
            "output_layer.linear.weight": (Vt, d),
            "output_layer.linear.bias": (Vt,),
            "output_layer.adaLN_modulation.weight": (2 * d, c),
            "output_layer.adaLN_modulation.bias": (2 * d,),
        }
    )
    if cfg.step_conditioned:
        names.update({"output_layer.condition_fuser.weight": (c, 2 * c)})
        names.update({"output_layer.condition_fuser.bias": (c,)})
    return names


@pytest.mark.parametrize("student", [False, True], ids=["teacher", "student"])
def test_state_dict_names_and_shapes_are_spec_3(student):
    cfg = small_config(step_conditioned=student)
    sd = FSDFMTransformer(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec_names(cfg)
    # Released sizes: heads of 64, so inv_freq has 32 entries.
    with torch.device("meta"):
        big = FSDFMTransformer(ModelConfig.preset("0.17B", step_conditioned=student))
    sd = big.state_dict()
    assert sd["rotary_emb.inv_freq"].shape == (32,)
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec_names(big.config)


def test_rotary_frequencies_are_base_10000_and_stay_fp32():
    model = FSDFMTransformer(small_config())
    hd = model.config.head_dim
    want = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    torch.testing.assert_close(model.rotary_emb.inv_freq.double(), want, rtol=1e-6, atol=0)
    model.to(torch.bfloat16)
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.vocab_embed.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.rotary_emb.inv_freq.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("student", [False, True], ids=["teacher", "student"])
def test_fresh_model_gives_zero_logits(student):
    model = FSDFMTransformer(small_config(step_conditioned=student)).eval()
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or "output_layer.linear" in name:
            assert not p.any(), name
        if "norm" in name:
            assert bool((p == 1).all()), name
    x = torch.randint(0, V, (2, L))
    logits = model(x, torch.rand(2), torch.rand(2))
    assert logits.shape == (2, L, V) and not logits.any()


def test_sinusoidal_embedding_is_of_the_raw_scalar():
    s = torch.tensor([0.0, 0.5, 1.0])
    phi = sinusoidal_embedding(s)
    assert phi.shape == (3, 256)
    torch.testing.assert_close(phi[:, 0], torch.cos(s))  # omega_0 = 1: no x1000
    torch.testing.assert_close(phi[:, 128], torch.sin(s))
    omega_1 = math.exp(-math.log(10000) / 128)
    torch.testing.assert_close(phi[:, 1], torch.cos(s * omega_1))


# ----------------------------------------------------------------------------------------------
# Conditioning, dropout, gradients


def test_student_needs_h_and_teacher_ignores_it():
    x = torch.randint(0, V, (2, L))
    student = random_model(step_conditioned=True)
    with pytest.raises(ValueError, match="step-conditioned.*pass h"):
        student(x, torch.rand(2))
    a = student(x, 0.25, 0.5)
    b = student(x, 0.25, 0.125)
    assert (a - b).abs().max() > 1e-4, "the student's logits depend on h"
    teacher = random_model()
    torch.testing.assert_close(teacher(x, 0.25), teacher(x, 0.25, 0.5), rtol=0, atol=0)
    assert (teacher(x, 0.25) - teacher(x, 0.75)).abs().max() > 1e-4


def test_scalar_and_batch_times_agree():
    model = random_model(step_conditioned=True)
    x = torch.randint(0, V, (2, L))
    ref = model(x, torch.tensor([0.3, 0.3]), torch.tensor([0.5, 0.5]))
    for t, h in [(0.3, 0.5), (torch.tensor(0.3), torch.tensor(0.5)), (0.3, torch.full((2,), 0.5))]:
        torch.testing.assert_close(model(x, t, h), ref, rtol=0, atol=0)
    # float64 times are taken as float32
    torch.testing.assert_close(model(x, torch.tensor([0.3, 0.3], dtype=torch.float64), 0.5), ref)


def test_dropout_only_in_training():
    model = random_model(dropout=0.5)
    x = torch.randint(0, V, (2, L))
    with torch.no_grad():
        torch.testing.assert_close(model(x, 0.4), model(x, 0.4), rtol=0, atol=0)
        model.train()
        torch.manual_seed(0)
        a = model(x, 0.4)
        b = model(x, 0.4)
        assert (a - b).abs().max() > 1e-3
        model.eval()
        eval_out = model(x, 0.4)
    no_dropout = random_model(dropout=0.0).train()
    with torch.no_grad():
        torch.testing.assert_close(no_dropout(x, 0.4), eval_out, rtol=0, atol=0)


@pytest.mark.parametrize("student", [False, True], ids=["teacher", "student"])
def test_gradients_reach_every_parameter(student):
    model = random_model(step_conditioned=student).train()
    x = torch.randint(0, V, (2, L))
    target = torch.randint(0, V, (2, L))
    logits = model(x, torch.rand(2), torch.rand(2))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), target.reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    assert not model.rotary_emb.inv_freq.requires_grad


def test_fresh_model_trains_from_zero_init():
    """From the zero-initialised output the first step moves the output layer."""
    model = FSDFMTransformer(small_config()).train()
    x = torch.randint(0, V, (2, L))
    logits = model(x, torch.rand(2))
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), x.reshape(-1)).backward()
    assert model.output_layer.linear.weight.grad.abs().max() > 0


def test_bf16_weights_on_cpu():
    model = random_model(step_conditioned=True)
    x = torch.randint(0, V, (2, L))
    ref = model(x, 0.3, 0.25)
    low = copy.deepcopy(model).to(torch.bfloat16)
    out = low(x, 0.3, 0.25)
    assert out.dtype == torch.bfloat16, "the logits stay in the weights' dtype"
    assert_close_rel(out.float(), ref.double(), rel=0.1)


# ----------------------------------------------------------------------------------------------
# Sampling, presets, config


@pytest.mark.parametrize("source", ["uniform", "mask"])
@pytest.mark.parametrize("student", [False, True], ids=["teacher", "student"])
def test_fsdfm_sample_runs(source, student):
    model = random_model(step_conditioned=student, source=source)
    g = torch.Generator().manual_seed(0)
    x = fsdfm.sample(model, steps=4, batch_size=2, generator=g)
    assert x.shape == (2, L) and x.dtype == torch.int64
    real = V - 1 if source == "mask" else V
    assert bool(((x >= 0) & (x < real)).all())
    y = fsdfm.sample(model, steps=4, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, y)


@pytest.mark.parametrize(
    "name, low, high",
    [("0.17B", 0.16e9, 0.18e9), ("1.3B", 1.25e9, 1.40e9), ("1.7B", 1.6e9, 1.8e9)],
)
def test_preset_sizes(name, low, high):
    with torch.device("meta"):
        model = FSDFMTransformer(ModelConfig.preset(name))
    n = sum(p.numel() for p in model.parameters())
    assert low < n < high, f"{name}: {n / 1e9:.3f}B parameters"
    cfg = model.config
    assert cfg.head_dim == 64 and cfg.seq_len == 1024 and cfg.dropout == 0.1
    assert cfg.vocab_size == 50257 and cfg.source == "uniform"


def test_preset_values_and_overrides():
    assert (PRESETS["1.3B"].dim, PRESETS["1.3B"].n_blocks) == (2048, 21)
    assert (PRESETS["1.3B"].n_heads, PRESETS["1.3B"].cond_dim) == (32, 256)
    assert (PRESETS["1.7B"].n_blocks, PRESETS["0.17B"].n_heads) == (28, 12)
    tiny = ModelConfig.preset("tiny", vocab_size=100, step_conditioned=True)
    assert (tiny.dim, tiny.n_blocks, tiny.n_heads, tiny.cond_dim, tiny.seq_len) == (
        128,
        2,
        2,
        64,
        128,
    )
    assert tiny.vocab_size == 100 and tiny.step_conditioned
    masked = ModelConfig.preset("small", source="mask")
    assert masked.vocab_size == 50258 and masked.mask_id == 50257
    assert masked.real_vocab_size == 50257
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("huge")


def test_config_dict_round_trip_and_errors():
    cfg = small_config(step_conditioned=True, source="mask", dropout=0.0)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig keys.*'heads'"):
        ModelConfig.from_dict({**data, "heads": 2})
    missing = dict(data)
    del missing["dim"]
    with pytest.raises(ValueError, match="required keys.*dim"):
        ModelConfig.from_dict(missing)
    with pytest.raises(ValueError, match="even"):
        small_config(dim=66, n_heads=2)  # heads of 33
    with pytest.raises(ValueError, match="divisible"):
        small_config(n_heads=3)
    with pytest.raises(ValueError, match="source"):
        small_config(source="gaussian")
    with pytest.raises(ValueError, match="dropout"):
        small_config(dropout=1.0)
    with pytest.raises(ValueError, match="positive integer"):
        small_config(n_blocks=0)


@pytest.mark.parametrize("student", [False, True], ids=["teacher", "student"])
def test_config_from_state_dict(student):
    cfg = small_config(step_conditioned=student, dropout=0.1, seq_len=1024)
    sd = FSDFMTransformer(cfg).state_dict()
    assert config_from_state_dict(sd) == cfg
    assert config_from_state_dict(sd, seq_len=L).seq_len == L
    assert config_from_state_dict(sd, source="mask").source == "mask"
    with torch.device("meta"):
        big = FSDFMTransformer(ModelConfig.preset("1.3B", step_conditioned=student))
    assert config_from_state_dict(big.state_dict()) == big.config
    masked = {k: v for k, v in sd.items()}
    masked["vocab_embed.weight"] = torch.empty(50258, cfg.dim, device="meta")
    assert config_from_state_dict(masked).source == "mask"
    del masked["time_embedding.mlp.0.weight"]
    with pytest.raises(ValueError, match="time_embedding.mlp.0.weight"):
        config_from_state_dict(masked)


# ----------------------------------------------------------------------------------------------
# Input checks and compile


def test_input_checks():
    model = random_model(step_conditioned=True)
    x = torch.randint(0, V, (2, L))
    with pytest.raises(TypeError, match="int64"):
        model(x.int(), 0.5, 0.5)
    with pytest.raises(TypeError, match="int64"):
        model(x[0], 0.5, 0.5)
    with pytest.raises(ValueError, match="longer than the model's seq_len"):
        model(torch.zeros(2, L + 1, dtype=torch.long), 0.5, 0.5)
    bad = x.clone()
    bad[1, 3] = V
    with pytest.raises(ValueError, match=f"token id {V}"):
        model(bad, 0.5, 0.5)
    bad[1, 3] = -1
    with pytest.raises(ValueError, match="token id -1"):
        model(bad, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"t must be .*\[2\]"):
        model(x, torch.rand(3), 0.5)
    with pytest.raises(TypeError, match="h must be"):
        model(x, 0.5, "half")


def test_compile_keeps_results_and_copies():
    model = random_model(step_conditioned=True)
    x = torch.randint(0, V, (2, L))
    eager = model(x, 0.3, 0.25)
    assert model.compile(backend="eager") is model
    torch.testing.assert_close(model(x, 0.3, 0.25), eager)
    with pytest.raises(ValueError, match="pass h"):  # the checks stay outside the graph
        model(x, 0.3)
    clone = copy.deepcopy(model)  # an EMA copy of a compiled model works
    assert clone._compiled is None
    torch.testing.assert_close(clone(x, 0.3, 0.25), eager)
    model.compile(disable=True)
    assert model._compiled is None


@pytest.mark.slow
def test_inductor_compiles_the_model_on_cpu():
    """torch.compile's default backend (Inductor, C++ on the CPU) gives the eager logits and
    hidden states, and fsdfm.sample runs the compiled model with the fused head and without."""
    model = random_model(step_conditioned=True)
    x = torch.randint(0, V, (2, L))
    with torch.no_grad():
        eager = model(x, 0.3, 0.25)
        hidden = model.head_inputs(x, 0.3, 0.25)[0]
        model.compile(dynamic=False)
        torch.testing.assert_close(model(x, 0.3, 0.25), eager, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.head_inputs(x, 0.3, 0.25)[0], hidden, rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
    for fused in (True, False):
        tokens = fsdfm.sample(model, 2, batch_size=2, fused_head=fused)
        assert tokens.shape == (2, L) and bool(((tokens >= 0) & (tokens < V)).all())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_forward_is_sync_free_and_bf16_autocast():
    model = random_model(step_conditioned=True).cuda()
    x = torch.randint(0, V, (2, L), device="cuda")
    t = torch.full((2,), 0.3, device="cuda")
    h = torch.full((2,), 0.25, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            out = model(x, t, h)
            model(x, 0.3, 0.25)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.dtype == torch.bfloat16 and out.shape == (2, L, V), "autocast's logits, no copy"
    model.autocast_dtype = None  # full fp32 on CUDA
    with torch.no_grad():
        full = model(x, t, h)
    expected = reference_logits(model.cpu().state_dict(), model.config, x.cpu(), t.cpu(), h.cpu())
    assert_close_rel(full.cpu(), expected, rel=1e-3)  # TF32 may be on
    assert_close_rel(out.cpu(), expected, rel=5e-2)  # bf16 matmuls


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_sampling_captures_the_model():
    """The forward is capturable (no host synchronisation), so fsdfm.sample can graph it."""
    model = random_model(step_conditioned=True).cuda()
    g = torch.Generator("cuda").manual_seed(0)
    x = fsdfm.sample(model, steps=4, batch_size=2, cuda_graph=True, generator=g)
    assert x.shape == (2, L) and bool(((x >= 0) & (x < V)).all())
