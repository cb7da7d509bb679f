#!/usr/bin/env bash
# The recipe of the bundled default model (fsdfm/assets/default, `fsdfm.load("default")`):
# the Debian corpus, a byte-level BPE of 8,192 tokens trained on it, a DFM teacher pre-trained
# with `fsdfm pretrain`, an FS-DFM student distilled with `fsdfm distill`, and the student's EMA
# weights in bf16 with the tokenizer beside them (about 15 MB with the "small" preset).
#
#   bash scripts/train_default.sh                 # the full recipe (meant for a GPU)
#   PRETRAIN_STEPS=2 DISTILL_STEPS=2 WORK=/tmp/smoke bash scripts/train_default.sh   # smoke run
#
# Environment: WORK (runs and corpus, default ./runs/default), PRESET (small), SEQ_LEN (256),
# BATCH (64), PRETRAIN_STEPS (20000), DISTILL_STEPS (5000), DEVICE (cuda when available),
# PYTHON (.venv/bin/python), INSTALL (1: copy the result into fsdfm/assets/default).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
work=${WORK:-runs/default}
preset=${PRESET:-small}
seq_len=${SEQ_LEN:-256}
batch=${BATCH:-64}
device=${DEVICE:-$("$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
mkdir -p "$work"
start=$SECONDS

[ -f "$work/corpus/corpus.txt" ] || "$py" scripts/build_corpus.py "$work/corpus"
[ -f "$work/bpe/tokenizer.json" ] || "$py" -c "
from fsdfm.tokenizer import train_bpe
train_bpe(['$work/corpus/corpus.txt'], 8192, '$work/bpe/tokenizer.json')"
echo "[$((SECONDS - start))s] corpus and tokenizer ready"

"$py" -m fsdfm pretrain --data "$work/corpus/corpus.txt" --tokenizer "$work/bpe/tokenizer.json" \
  --out "$work/teacher" --preset "$preset" --seq-len "$seq_len" --batch-size "$batch" \
  --steps "${PRETRAIN_STEPS:-20000}" --ema 0.9999 --device "$device"
echo "[$((SECONDS - start))s] teacher pre-trained"
# The teacher's token cache (the corpus tokenised once) is the student's data.
tokens=$(ls "$work"/teacher/data/*.bin | head -n 1)
"$py" -m fsdfm distill --teacher "$work/teacher/model_ema" --data "$tokens" \
  --tokenizer "$work/bpe/tokenizer.json" --out "$work/student" --batch-size "$batch" \
  --steps "${DISTILL_STEPS:-5000}" --device "$device"
echo "[$((SECONDS - start))s] student distilled"

if [ "${INSTALL:-1}" = 1 ]; then
  "$py" -c "
import torch, fsdfm
model = fsdfm.load('$work/student/model_ema', dtype=torch.bfloat16)
fsdfm.save(model, 'fsdfm/assets/default')
print('installed fsdfm/assets/default:', model.config)"
fi
echo "[$((SECONDS - start))s] done"
