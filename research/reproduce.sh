#!/usr/bin/env bash
# The demo recipe of demo/NOTES.md, "Seventh attempt" to "Fourteenth attempt", with one command: encoder ->
# random-character read-back warm-up -> reader (with, then without random-character rows) -> the encoder unfrozen
# (random rows on one line, over several lines, over real chunks' lines) -> newlines drawn in line (then random rows
# with document separators, fewer of them) -> document separators drawn in one cell -> read-back from noisy inputs ->
# windows whose second chunk starts inside the first -> read-back placed right before the next chunk -> text-only
# control (the same LM steps) -> evaluation. Seeded, one thread per job (30 + 16 + 41 + 21 + 42 + 22 + 47 + 32 + 25 +
# 23 + 39 + 12 + 10 + 10 + 6 + 26 + 50 + 66 + 36 + 17 + 29 + 14 + 30 + 21 + 14 + 14 + 21 + 8 + 12 + 5 + 3 + 15 + 30 + 43 + 5 min
# here, two to four jobs on 2 cores; the control is independent of stages 1-18 and may run beside them). The LM side reads
# and writes one byte per token (tokenization/byte_tokenizer), so a random-character warm-up is read-back of the very
# tokens the corpus is made of.
#   bash demo/reproduce.sh            # into demo/build (git-ignored), to compare with the committed files
#   bash demo/reproduce.sh demo       # rewrites the committed demo/vist2-demo, text-only-baseline, logs, eval
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo/build}
BYTES=tokenization/byte_tokenizer
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# 1. Encoder: vision tower + aligner from scratch on the per-visual-token glyph-cell loss (no LM), corpus sketches
#    (demo tokenizer chunks: several lines each). The run in the notes (F1) was stopped by --max-minutes 30 after
#    2 233 steps of the 2 500-step schedule.
python examples/train_demo.py --encoder-steps 2500 --encoder-stop-step 2233 --encoder-batch 32 --data corpus \
    --aligner-init-std 0.3 --head-prior-init --lr 1e-3 --aligner-lr 1e-4 --warmup 50 --eval-every 50 \
    --encoder-target 0.97 --out "$OUT/encoder" --log "$OUT/training_log.encoder.jsonl"

# 2. Warm-up: that encoder frozen, a fresh byte-level LM reads back chunks of 32 random characters (`c_1 V_1`):
#    nothing to guess, so reading is the only way down.
python examples/train_demo.py --tokenizer "$BYTES" --readback-only --init "$OUT/encoder" --freeze vision+aligner \
    --aux-weight 0 --data chars --steps 800 --batch-size 32 --lr 2e-3 --warmup 50 --eval-every 100 --log-every 50 \
    --out "$OUT/warmup" --log "$OUT/training_log.warmup.jsonl"

# 3. Reader: from the warm-up, on `c_1 V_1 c_2` corpus windows (c_1 read back from V_1, c_2 given only V_1), with
#    half of each batch still random-character read-back rows so that reading stays rewarded.
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/warmup" --freeze vision+aligner --aux-weight 0 \
    --aux-only-steps 0 --chunk-sampling any --mix-chars 0.5 --steps 2400 --batch-size 16 --warmup 100 \
    --eval-every 100 --log-every 50 --out "$OUT/reader" --log "$OUT/training_log.reader.jsonl"

# 4. The reader continued on corpus windows only: language modelling catches up, reading holds.
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader" --freeze vision+aligner --aux-weight 0 \
    --aux-only-steps 0 --chunk-sampling any --steps 1000 --batch-size 16 --warmup 50 --lr 1e-3 --eval-every 100 \
    --log-every 50 --out "$OUT/reader-corpus" --log "$OUT/training_log.reader-corpus.jsonl"

# 5. Everything trainable, the encoder included, at a small lr, with random-character rows again: random characters
#    are then read at 99.9 % (teacher-forced), where the frozen encoder plateaued at 88 %.
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-corpus" --freeze none --aux-weight 0 \
    --aux-only-steps 0 --chunk-sampling any --mix-chars 0.5 --steps 1500 --batch-size 16 --warmup 50 --lr 3e-4 \
    --eval-every 100 --log-every 50 --out "$OUT/reader-unfrozen" --log "$OUT/training_log.reader-unfrozen.jsonl"

# 6. Random rows laid over several lines: corpus chunks that wrap are read worst (the reader lost its place after a
#    newline), so the rows it cannot guess now wrap too.
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-unfrozen" --freeze none --aux-weight 0 \
    --aux-only-steps 0 --chunk-sampling any --mix-chars 0.5 --chars-newlines 0.0625 --steps 1000 --batch-size 16 \
    --warmup 50 --lr 3e-4 --eval-every 100 --log-every 50 --out "$OUT/reader-newlines" \
    --log "$OUT/training_log.reader-newlines.jsonl"

# 7. Random rows over the lines of real chunks: a training chunk's spaces, tabs and newlines kept in place, random
#    characters in between (indentation and blank lines included, nothing to guess).
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-newlines" --freeze none --aux-weight 0 \
    --aux-only-steps 0 --chunk-sampling any --mix-chars 0.5 --chars-layout corpus --steps 1500 --batch-size 16 \
    --warmup 50 --lr 3e-4 --eval-every 100 --log-every 50 --out "$OUT/reader-layout" \
    --log "$OUT/training_log.reader-layout.jsonl"

# 8. Newlines drawn in line as `«` (VIST2Config.newline_glyph, saved with the checkpoint): a 32-byte chunk is one
#    line of 32 cells, a byte's cell is its place in the chunk, and the reader no longer has to find the next line.
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-layout" --newline-glyph "«" --freeze none \
    --aux-weight 0 --aux-only-steps 0 --chunk-sampling any --mix-chars 0.5 --chars-layout corpus --steps 1000 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 100 --log-every 50 --out "$OUT/reader-glyph" \
    --log "$OUT/training_log.reader-glyph.jsonl"

# 9. Random rows that keep the chunk's document separators too ("<|endoftext|>": one token, 13 cells), and a quarter
#    of each batch instead of half, for language modelling.
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-glyph" --newline-glyph "«" --freeze none \
    --aux-weight 0 --aux-only-steps 0 --chunk-sampling any --mix-chars 0.25 --chars-layout corpus+eos --steps 1000 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 100 --log-every 50 --out "$OUT/reader-separators" \
    --log "$OUT/training_log.reader-separators.jsonl"

# 10. An eighth of each batch random rows, for language modelling.
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-separators" --newline-glyph "«" --freeze none \
    --aux-weight 0 --aux-only-steps 0 --chunk-sampling any --mix-chars 0.125 --chars-layout corpus+eos --steps 1000 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 100 --log-every 50 --out "$OUT/reader-fewer-chars" \
    --log "$OUT/training_log.reader-fewer-chars.jsonl"

# 11. The document separator drawn in one cell as `©` (VIST2Config.special_token_glyphs) instead of its 13-character
#     name, and a seed of its own: every stage above draws its windows with seed 0, so a stage that goes on from
#     another trains on the same windows in the same order (demo/NOTES.md, "Tenth attempt").
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-fewer-chars" --newline-glyph "«" \
    --separator-glyph "©" --freeze none --aux-weight 0 --aux-only-steps 0 --chunk-sampling any --mix-chars 0.125 \
    --chars-layout corpus+eos --steps 1500 --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 250 --log-every 50 \
    --seed 8 --out "$OUT/reader-separator-glyph" --log "$OUT/training_log.reader-separator-glyph.jsonl"

# 12-13. Read-back rows with a twentieth, then a fiftieth, of their input bytes replaced by random characters (labels
#     unchanged), so that greedy read-back reads the next cell after a wrong byte instead of following the language
#     prior (demo/NOTES.md, "Eleventh attempt").
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-separator-glyph" --newline-glyph "«" \
    --separator-glyph "©" --freeze none --aux-weight 0 --aux-only-steps 0 --chunk-sampling any --mix-chars 0.125 \
    --chars-layout corpus+eos --readback-noise 0.05 --steps 800 --batch-size 16 --warmup 50 --lr 3e-4 \
    --eval-every 200 --log-every 50 --seed 12 --out "$OUT/reader-noise" --log "$OUT/training_log.reader-noise.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-noise" --newline-glyph "«" \
    --separator-glyph "©" --freeze none --aux-weight 0 --aux-only-steps 0 --chunk-sampling any --mix-chars 0.125 \
    --chars-layout corpus+eos --readback-noise 0.02 --steps 800 --batch-size 16 --warmup 50 --lr 3e-4 \
    --eval-every 200 --log-every 50 --seed 13 --out "$OUT/reader-noise-fewer" \
    --log "$OUT/training_log.reader-noise-fewer.jsonl"

# 14. A quarter of the corpus windows with c_2 starting 1 to 8 bytes before the end of c_1 (`--overlap-rows`): c_2
#     then begins by reading the last cells of V_1, where the bytes that finish a broken word are (demo/NOTES.md,
#     "Twelfth attempt").
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-noise-fewer" --newline-glyph "«" \
    --separator-glyph "©" --freeze none --aux-weight 0 --aux-only-steps 0 --chunk-sampling any --mix-chars 0.125 \
    --chars-layout corpus+eos --readback-noise 0.02 --overlap-rows 0.25 --max-overlap 8 --steps 800 --batch-size 16 \
    --warmup 50 --lr 3e-4 --eval-every 200 --log-every 50 --seed 14 --out "$OUT/reader-overlap" \
    --log "$OUT/training_log.reader-overlap.jsonl"

# 15-18. A chunk read back from its sketch placed right before the next chunk (`--read-back-positions
#     before_next_chunk`, saved with the checkpoint) instead of at that chunk's places, then the same for longer:
#     read-back had taught the open chunk's first bytes to read the sketch's first cells (demo/NOTES.md, "Thirteenth
#     attempt" and "Fourteenth attempt").
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-overlap" --newline-glyph "«" \
    --separator-glyph "©" --read-back-positions before_next_chunk --freeze none --aux-weight 0 --aux-only-steps 0 \
    --chunk-sampling any --mix-chars 0.125 --chars-layout corpus+eos --readback-noise 0.02 --steps 600 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 100 --log-every 50 --seed 16 \
    --out "$OUT/reader-read-back-before" --log "$OUT/training_log.reader-read-back-before.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-read-back-before" --newline-glyph "«" \
    --separator-glyph "©" --read-back-positions before_next_chunk --freeze none --aux-weight 0 --aux-only-steps 0 \
    --chunk-sampling any --mix-chars 0.125 --chars-layout corpus+eos --readback-noise 0.02 --steps 3000 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 500 --log-every 50 --seed 17 \
    --out "$OUT/reader-read-back-longer" --log "$OUT/training_log.reader-read-back-longer.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-read-back-longer" --newline-glyph "«" \
    --separator-glyph "©" --read-back-positions before_next_chunk --freeze none --aux-weight 0 --aux-only-steps 0 \
    --chunk-sampling any --mix-chars 0.125 --chars-layout corpus+eos --readback-noise 0.02 --steps 5000 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 1000 --log-every 50 --seed 18 \
    --out "$OUT/reader-read-back-longer-2" --log "$OUT/training_log.reader-read-back-longer-2.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --init "$OUT/reader-read-back-longer-2" --newline-glyph "«" \
    --separator-glyph "©" --read-back-positions before_next_chunk --freeze none --aux-weight 0 --aux-only-steps 0 \
    --chunk-sampling any --mix-chars 0.125 --chars-layout corpus+eos --readback-noise 0.02 --steps 5000 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 1000 --log-every 50 --seed 20 --out "$OUT/vist2-demo" \
    --log "$OUT/training_log.vist2-demo.jsonl"

# 19. The same-size text-only control: same tokenizer, seeds, steps, batch and schedules as stages 3 to 18.
python examples/train_demo.py --tokenizer "$BYTES" --text-only --chunk-sampling any --steps 2400 --batch-size 16 \
    --aux-only-steps 0 --warmup 100 --log-every 50 --out "$OUT/text-only" --log "$OUT/training_log.text-only.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only" --chunk-sampling any \
    --steps 1000 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 1e-3 --log-every 50 \
    --out "$OUT/text-only-corpus" --log "$OUT/training_log.text-only-corpus.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-corpus" --chunk-sampling any \
    --steps 1500 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 \
    --out "$OUT/text-only-continued" --log "$OUT/training_log.text-only-continued.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-continued" --chunk-sampling any \
    --steps 1000 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 \
    --out "$OUT/text-only-newlines" --log "$OUT/training_log.text-only-newlines.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-newlines" --chunk-sampling any \
    --steps 1500 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 \
    --out "$OUT/text-only-layout" --log "$OUT/training_log.text-only-layout.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-layout" --chunk-sampling any \
    --steps 1000 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 \
    --out "$OUT/text-only-glyph" --log "$OUT/training_log.text-only-glyph.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-glyph" --chunk-sampling any \
    --steps 1000 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 \
    --out "$OUT/text-only-separators" --log "$OUT/training_log.text-only-separators.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-separators" --chunk-sampling any \
    --steps 1000 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 \
    --out "$OUT/text-only-fewer-chars" --log "$OUT/training_log.text-only-fewer-chars.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-fewer-chars" --chunk-sampling any \
    --steps 1500 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 --seed 8 \
    --out "$OUT/text-only-separator-glyph" --log "$OUT/training_log.text-only-separator-glyph.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-separator-glyph" \
    --chunk-sampling any --steps 800 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 \
    --seed 12 --out "$OUT/text-only-noise" --log "$OUT/training_log.text-only-noise.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-noise" --chunk-sampling any \
    --steps 800 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 --seed 13 \
    --out "$OUT/text-only-noise-fewer" --log "$OUT/training_log.text-only-noise-fewer.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-noise-fewer" \
    --chunk-sampling any --steps 800 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 \
    --seed 14 --out "$OUT/text-only-overlap" --log "$OUT/training_log.text-only-overlap.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-overlap" \
    --chunk-sampling any --steps 600 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 \
    --seed 16 --out "$OUT/text-only-read-back-before" --log "$OUT/training_log.text-only-read-back-before.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-read-back-before" \
    --chunk-sampling any --steps 3000 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 \
    --seed 17 --out "$OUT/text-only-read-back-longer" --log "$OUT/training_log.text-only-read-back-longer.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-read-back-longer" \
    --chunk-sampling any --steps 5000 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 \
    --seed 18 --out "$OUT/text-only-read-back-longer-2" --log "$OUT/training_log.text-only-read-back-longer-2.jsonl"
python examples/train_demo.py --tokenizer "$BYTES" --text-only --init "$OUT/text-only-read-back-longer-2" \
    --chunk-sampling any --steps 5000 --batch-size 16 --aux-only-steps 0 --warmup 50 --lr 3e-4 --log-every 50 \
    --seed 20 --out "$OUT/text-only-baseline" --log "$OUT/training_log.text-only-baseline.jsonl"

python examples/evaluate_demo.py --model "$OUT/vist2-demo" --text-only "$OUT/text-only-baseline" \
    --json "$OUT/eval_results.json"
