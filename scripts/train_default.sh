#!/usr/bin/env bash
# The recipe of the bundled default model (fsdfm/assets/default, `fsdfm.load("default")`):
# the Debian corpus, a byte-level BPE of 8,192 tokens trained on it, a DFM teacher pre-trained
# with `fsdfm pretrain`, an FS-DFM student distilled from it with `fsdfm distill` (RK-4 shortcut
# teacher), and the student's EMA weights in bf16 with the tokenizer beside them (~17 MB).
#
#   bash scripts/train_default.sh                 # the shipped model's run: ~85 min on 2 cores
#   INSTALL=1 bash scripts/train_default.sh       # ... and replace fsdfm/assets/default with it
#   CORPUS=docs/corpus.md PRETRAIN_STEPS=2 DISTILL_STEPS=2 SEQ_LEN=32 BATCH=2 WORK=/tmp/smoke \
#     bash scripts/train_default.sh       # smoke run: any text file, no apt, no root, a minute
#
# The defaults are the run that produced the shipped weights (docs/results.md): the "small"
# preset (8.3M parameters), sequences of 256 tokens, 1,600 pre-training steps of 16 sequences
# (6.6M tokens, about one pass over the corpus, ~55 min at ~2K tokens/s on 2 CPU cores) and
# 300 distillation steps (~25 min). With a GPU, raise the steps and the batch: the recipe is
# compute-bound, not data-bound, at this size.
#
# Environment: WORK (runs and corpus, default ./runs/default), CORPUS (a text file to train on
# instead of the Debian corpus, whose build runs apt-get as root), PRESET (small), SEQ_LEN (256),
# BATCH (16), PRETRAIN_STEPS (1600), PRETRAIN_LR (1e-3), DISTILL_STEPS (300), DISTILL_LR (1e-4),
# DEVICE (cuda when available), PYTHON (.venv/bin/python),
# INSTALL (0: leave the shipped model alone, the default; 1: replace fsdfm/assets/default).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
work=${WORK:-runs/default}
preset=${PRESET:-small}
seq_len=${SEQ_LEN:-256}
batch=${BATCH:-16}
pretrain_steps=${PRETRAIN_STEPS:-1600}
distill_steps=${DISTILL_STEPS:-300}
device=${DEVICE:-$("$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
mkdir -p "$work"
start=$SECONDS

if [ -n "${CORPUS:-}" ]; then
  mkdir -p "$work/corpus" && cp "$CORPUS" "$work/corpus/corpus.txt"
fi
[ -f "$work/corpus/corpus.txt" ] || "$py" scripts/build_corpus.py "$work/corpus"
[ -f "$work/bpe/tokenizer.json" ] || "$py" -c "
from fsdfm.tokenizer import train_bpe
train_bpe(['$work/corpus/corpus.txt'], 8192, '$work/bpe/tokenizer.json')"
echo "[$((SECONDS - start))s] corpus and tokenizer ready"

# One pass over the data at most: no dropout. The EMA horizon (1 / (1 - decay) = 200 steps) is
# short enough for a run of this length.
"$py" -m fsdfm pretrain --data "$work/corpus/corpus.txt" --tokenizer "$work/bpe/tokenizer.json" \
  --out "$work/teacher" --preset "$preset" --seq-len "$seq_len" --batch-size "$batch" \
  --steps "$pretrain_steps" --lr "${PRETRAIN_LR:-1e-3}" --warmup $((pretrain_steps / 16)) \
  --dropout 0 --ema 0.995 --eval-every 200 --save-every 200 --device "$device"
echo "[$((SECONDS - start))s] teacher pre-trained"
# The teacher's token cache (the corpus tokenised once) is the student's data.
tokens=$(ls "$work"/teacher/data/*.bin | head -n 1)
"$py" -m fsdfm distill --teacher "$work/teacher/model_ema" --data "$tokens" \
  --tokenizer "$work/bpe/tokenizer.json" --out "$work/student" --batch-size "$batch" \
  --steps "$distill_steps" --lr "${DISTILL_LR:-1e-4}" --warmup $((distill_steps / 10)) \
  --ema 0.98 --eval-every 100 --save-every 100 --device "$device"
echo "[$((SECONDS - start))s] student distilled"

if [ "${INSTALL:-0}" = 1 ]; then
  "$py" -c "
import torch, fsdfm
model = fsdfm.load('$work/student/model_ema', dtype=torch.bfloat16)
fsdfm.save(model, 'fsdfm/assets/default')
print('installed fsdfm/assets/default:', model.config)"
else
  echo "the model is $work/student/model_ema (fsdfm sample --model $work/student/model_ema);" \
    "INSTALL=1 makes it the bundled default"
fi
echo "[$((SECONDS - start))s] done"
