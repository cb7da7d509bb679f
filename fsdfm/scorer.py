"""A scorer of our own: a small autoregressive GPT-2 (Hugging Face ``transformers``) trained on
the same tokens as the models it will score, for generative perplexity where no pre-trained
scorer of the tokenizer exists (a BPE of the project's own) or nothing can be downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fsdfm._args import resolve_device
from fsdfm._io import atomic_write
from fsdfm.data import Blocks, BlockSampler, prepare_tokens
from fsdfm.optim import learning_rate
from fsdfm.progress import Progress
from fsdfm.tokenizer import get_tokenizer

__all__ = ["train_scorer"]


def train_scorer(
    data: str | Path,
    out: str | Path,
    *,
    tokenizer: str | None = None,
    seq_len: int = 256,
    dim: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 1e-3,
    val_fraction: float = 0.01,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Train a causal GPT-2 (``transformers.GPT2LMHeadModel``) on a token stream and save it to
    ``out`` with ``save_pretrained``, so that ``generative_perplexity(tokens, out)`` and
    ``fsdfm eval --scorer out`` can use it.

    data: text or a token file, as ``fsdfm pretrain --data`` takes it (a token file written by
        pre-training reuses its tokens, so the scorer sees exactly the models' data).
    Blocks of ``seq_len`` tokens are split as in pre-training (the last ``val_fraction`` held
    out); AdamW (0.9, 0.95), weight decay 0.1, 5% warm-up then cosine to 10%, grad clip 1.
    Returns {"val_loss": held-out mean NLL per token (nats), "steps", "tokens", "parameters"}.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out)
    device = resolve_device(device)
    stream = prepare_tokens(data, tokenizer, out / "data", progress=progress)
    blocks = Blocks(stream, seq_len, val_fraction)
    if blocks.n_val == 0:
        raise ValueError(f"{data} is too short to hold out a block of {seq_len} tokens")
    eos = get_tokenizer(stream.tokenizer).eos_id
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=stream.vocab_size,
        n_positions=seq_len,
        n_embd=dim,
        n_layer=n_layers,
        n_head=n_heads,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sampler = BlockSampler(blocks.n_train, batch_size, seed)
    bar = Progress(steps, "scorer", enabled=progress)
    every = max(1, steps // 50)  # a loss on the bar, or a plain line, every 2% of the run
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, lr=lr, steps=steps, warmup=warmup)
        ids = blocks.get(sampler.next_batch(), device)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.update(1)
        if (step + 1) % every == 0 or step + 1 == steps:
            bar.note(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        val = list(blocks.val_indices())
        for start in range(0, len(val), batch_size):
            ids = blocks.get(val[start : start + batch_size], device)
            n = ids.numel() - ids.shape[0]  # every token but each block's first is predicted
            total += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    model.save_pretrained(out)
    result = {
        "val_loss": total / count,
        "steps": steps,
        "tokens": steps * batch_size * seq_len,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    text = (json.dumps(result, indent=2) + "\n").encode()
    atomic_write(out / "scorer.json", lambda f: f.write(text))
    return result
