"""Train the autoregressive scorer for generative perplexity on a model's own tokens.

    python scripts/train_scorer.py --data runs/default/teacher/data/KEY.bin --out runs/scorer
    fsdfm eval --model student=runs/default/student/model_ema --scorer runs/scorer

See fsdfm.scorer.train_scorer; prints the held-out loss and writes OUT/scorer.json.
"""

import argparse
import json

from fsdfm.scorer import train_scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a text file or a token file (.bin/.npy)")
    parser.add_argument("--out", required=True, help="directory for save_pretrained")
    parser.add_argument("--tokenizer", default=None, help="for text: gpt2, byte or tokenizer.json")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    result = train_scorer(
        args.data,
        args.out,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
