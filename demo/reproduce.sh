#!/usr/bin/env bash
# The demo recipe of demo/NOTES.md, "Sixth attempt", with one command: encoder -> reader -> text-only control ->
# evaluation. Seeded, one thread per job (17 + 69 + 56 + 1 min here, up to three jobs on 2 cores; stages 2 and 3 are
# independent and may run side by side). Every stage draws its chunks / windows at any token offset of the corpus.
#   bash demo/reproduce.sh            # into demo/build (git-ignored), to compare with the committed files
#   bash demo/reproduce.sh demo       # rewrites the committed demo/vist2-demo, text-only-baseline, logs, eval
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo/build}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# 1. Encoder: vision tower + aligner from scratch on the per-visual-token glyph-cell loss (no LM), corpus sketches.
#    The run in the notes was stopped by --max-minutes 17 after 1 352 steps of the 2 500-step schedule.
python examples/train_demo.py --encoder-steps 2500 --encoder-stop-step 1352 --encoder-batch 32 --data corpus \
    --chunk-sampling any --aligner-init-std 0.3 --head-prior-init --lr 1e-3 --aligner-lr 1e-4 --warmup 50 \
    --eval-every 50 --encoder-target 0.97 --out "$OUT/encoder" --log "$OUT/training_log.encoder.jsonl"

# 2. Reader: that encoder frozen, a fresh LM on `c_1 V_1 c_2` windows (c_1 read back from V_1, c_2 given only V_1).
python examples/train_demo.py --init-encoder "$OUT/encoder" --freeze vision+aligner --aux-weight 0 \
    --aux-only-steps 0 --chunk-sampling any --steps 2400 --batch-size 16 --warmup 100 --eval-every 100 \
    --log-every 50 --out "$OUT/vist2-demo" --log "$OUT/training_log.vist2-demo.jsonl"

# 3. The same-size text-only control: same windows, steps, batch and schedule.
python examples/train_demo.py --text-only --chunk-sampling any --steps 2400 --batch-size 16 --aux-only-steps 0 \
    --warmup 100 --log-every 50 --out "$OUT/text-only-baseline" --log "$OUT/training_log.text-only-baseline.jsonl"

python examples/evaluate_demo.py --model "$OUT/vist2-demo" --text-only "$OUT/text-only-baseline" \
    --json "$OUT/eval_results.json"
