#!/usr/bin/env bash
# The recipe of the committed demo checkpoint, with one command (research/README.md tells what each stage is for and
# what it measured): encoder -> random-character read-back warm-up -> reader (with, then without random-character rows)
# -> the encoder unfrozen (random rows on one line, over several lines, over real chunks' lines) -> newlines drawn in
# line (then random rows with document separators, fewer of them) -> document separators drawn in one cell -> read-back
# from noisy inputs -> windows whose second chunk starts inside the first -> read-back placed right before the next
# chunk -> text-only control (the same LM steps) -> recall (passkeys and 64-chunk windows, both models) -> a font that
# draws Latin-1 -> evaluation. Seeded, one or two threads per job: about 20 hours in all (the stages' times are in
# research/README.md), two to four jobs at a time on 2 cores (the control is independent of stages 1-18 and may run
# beside them). The LM side reads and writes one byte per token (tokenization/byte_tokenizer), so a random-character
# warm-up is read-back of the very tokens the corpus is made of.
#   bash research/reproduce.sh             # into research/build (git-ignored), to compare with the committed files
#   bash research/reproduce.sh DIR         # into DIR
#   bash research/reproduce.sh demo        # stages in research/build, then rewrites the committed checkpoint (the
#                                          # repository root's weights, config, tokenizer and processor files),
#                                          # research/text-only-baseline, research/logs and research/eval_results.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-research/build}
if [ "$OUT" = demo ]; then BUILD=research/build LOGS=research/logs; else BUILD=$OUT LOGS=$OUT/logs; fi
BYTES=tokenization/byte_tokenizer
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# 1. Encoder: vision tower + aligner from scratch on the per-visual-token glyph-cell loss (no LM), corpus sketches
#    (demo tokenizer chunks: several lines each). The committed run was stopped by a 30-minute limit after 2 233
#    steps of the 2 500-step schedule; --encoder-stop-step replays it.
python research/train_demo.py --encoder-steps 2500 --encoder-stop-step 2233 --encoder-batch 32 --data corpus \
    --aligner-init-std 0.3 --head-prior-init --lr 1e-3 --aligner-lr 1e-4 --warmup 50 --eval-every 50 \
    --encoder-target 0.97 --out "$BUILD/encoder" --log "$LOGS/training_log.encoder.jsonl"

# 2. Warm-up: that encoder frozen, a fresh byte-level LM reads back chunks of 32 random characters (`c_1 V_1`):
#    nothing to guess, so reading is the only way down.
python research/train_demo.py --tokenizer "$BYTES" --readback-only --init "$BUILD/encoder" --freeze vision+aligner \
    --data chars --steps 800 --batch-size 32 --lr 2e-3 --warmup 50 --eval-every 100 --log-every 50 \
    --out "$BUILD/warmup" --log "$LOGS/training_log.warmup.jsonl"

# 3. Reader: from the warm-up, on `c_1 V_1 c_2` corpus windows (c_1 read back from V_1, c_2 given only V_1), with
#    half of each batch still random-character read-back rows so that reading stays rewarded.
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/warmup" --freeze vision+aligner \
    --chunk-sampling any --mix-chars 0.5 --steps 2400 --batch-size 16 --warmup 100 \
    --eval-every 100 --log-every 50 --out "$BUILD/reader" --log "$LOGS/training_log.reader.jsonl"

# 4. The reader continued on corpus windows only: language modelling catches up, reading holds.
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader" --freeze vision+aligner \
    --chunk-sampling any --steps 1000 --batch-size 16 --warmup 50 --lr 1e-3 --eval-every 100 \
    --log-every 50 --out "$BUILD/reader-corpus" --log "$LOGS/training_log.reader-corpus.jsonl"

# 5. Everything trainable, the encoder included, at a small lr, with random-character rows again: random characters
#    are then read at 99.9 % (teacher-forced), where the frozen encoder plateaued at 88 %.
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-corpus" --freeze none \
    --chunk-sampling any --mix-chars 0.5 --steps 1500 --batch-size 16 --warmup 50 --lr 3e-4 \
    --eval-every 100 --log-every 50 --out "$BUILD/reader-unfrozen" --log "$LOGS/training_log.reader-unfrozen.jsonl"

# 6. Random rows laid over several lines: corpus chunks that wrap are read worst (the reader lost its place after a
#    newline), so the rows it cannot guess now wrap too.
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-unfrozen" --freeze none \
    --chunk-sampling any --mix-chars 0.5 --chars-newlines 0.0625 --steps 1000 --batch-size 16 \
    --warmup 50 --lr 3e-4 --eval-every 100 --log-every 50 --out "$BUILD/reader-newlines" \
    --log "$LOGS/training_log.reader-newlines.jsonl"

# 7. Random rows over the lines of real chunks: a training chunk's spaces, tabs and newlines kept in place, random
#    characters in between (indentation and blank lines included, nothing to guess).
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-newlines" --freeze none \
    --chunk-sampling any --mix-chars 0.5 --chars-layout corpus --steps 1500 --batch-size 16 \
    --warmup 50 --lr 3e-4 --eval-every 100 --log-every 50 --out "$BUILD/reader-layout" \
    --log "$LOGS/training_log.reader-layout.jsonl"

# 8. Newlines drawn in line as `«` (VIST2Config.newline_glyph, saved with the checkpoint): a 32-byte chunk is one
#    line of 32 cells, a byte's cell is its place in the chunk, and the reader no longer has to find the next line.
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-layout" --newline-glyph "«" --freeze none \
    --chunk-sampling any --mix-chars 0.5 --chars-layout corpus --steps 1000 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 100 --log-every 50 --out "$BUILD/reader-glyph" \
    --log "$LOGS/training_log.reader-glyph.jsonl"

# 9. Random rows that keep the chunk's document separators too ("<|endoftext|>": one token, 13 cells), and a quarter
#    of each batch instead of half, for language modelling.
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-glyph" --newline-glyph "«" --freeze none \
    --chunk-sampling any --mix-chars 0.25 --chars-layout corpus+eos --steps 1000 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 100 --log-every 50 --out "$BUILD/reader-separators" \
    --log "$LOGS/training_log.reader-separators.jsonl"

# 10. An eighth of each batch random rows, for language modelling.
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-separators" --newline-glyph "«" --freeze none \
    --chunk-sampling any --mix-chars 0.125 --chars-layout corpus+eos --steps 1000 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 100 --log-every 50 --out "$BUILD/reader-fewer-chars" \
    --log "$LOGS/training_log.reader-fewer-chars.jsonl"

# 11. The document separator drawn in one cell as `©` (VIST2Config.special_token_glyphs) instead of its 13-character
#     name, and a seed of its own: every stage above draws its windows with seed 0, so a stage that goes on from
#     another trains on the same windows in the same order (research/README.md).
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-fewer-chars" --newline-glyph "«" \
    --separator-glyph "©" --freeze none --chunk-sampling any --mix-chars 0.125 \
    --chars-layout corpus+eos --steps 1500 --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 250 --log-every 50 \
    --seed 8 --out "$BUILD/reader-separator-glyph" --log "$LOGS/training_log.reader-separator-glyph.jsonl"

# 12-13. Read-back rows with a twentieth, then a fiftieth, of their input bytes replaced by random characters (labels
#     unchanged), so that greedy read-back reads the next cell after a wrong byte instead of following the language
#     prior (research/README.md).
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-separator-glyph" --newline-glyph "«" \
    --separator-glyph "©" --freeze none --chunk-sampling any --mix-chars 0.125 \
    --chars-layout corpus+eos --readback-noise 0.05 --steps 800 --batch-size 16 --warmup 50 --lr 3e-4 \
    --eval-every 200 --log-every 50 --seed 12 --out "$BUILD/reader-noise" --log "$LOGS/training_log.reader-noise.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-noise" --newline-glyph "«" \
    --separator-glyph "©" --freeze none --chunk-sampling any --mix-chars 0.125 \
    --chars-layout corpus+eos --readback-noise 0.02 --steps 800 --batch-size 16 --warmup 50 --lr 3e-4 \
    --eval-every 200 --log-every 50 --seed 13 --out "$BUILD/reader-noise-fewer" \
    --log "$LOGS/training_log.reader-noise-fewer.jsonl"

# 14. A quarter of the corpus windows with c_2 starting 1 to 8 bytes before the end of c_1 (`--overlap-rows`): c_2
#     then begins by reading the last cells of V_1, where the bytes that finish a broken word are (research/README.md).
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-noise-fewer" --newline-glyph "«" \
    --separator-glyph "©" --freeze none --chunk-sampling any --mix-chars 0.125 \
    --chars-layout corpus+eos --readback-noise 0.02 --overlap-rows 0.25 --max-overlap 8 --steps 800 --batch-size 16 \
    --warmup 50 --lr 3e-4 --eval-every 200 --log-every 50 --seed 14 --out "$BUILD/reader-overlap" \
    --log "$LOGS/training_log.reader-overlap.jsonl"

# 15-18. A chunk read back from its sketch placed right before the next chunk (`--read-back-positions
#     before_next_chunk`, saved with the checkpoint) instead of at that chunk's places, then the same for longer:
#     read-back had taught the open chunk's first bytes to read the sketch's first cells (research/README.md).
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-overlap" --newline-glyph "«" \
    --separator-glyph "©" --read-back-positions before_next_chunk --freeze none \
    --chunk-sampling any --mix-chars 0.125 --chars-layout corpus+eos --readback-noise 0.02 --steps 600 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 100 --log-every 50 --seed 16 \
    --out "$BUILD/reader-read-back-before" --log "$LOGS/training_log.reader-read-back-before.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-read-back-before" --newline-glyph "«" \
    --separator-glyph "©" --read-back-positions before_next_chunk --freeze none \
    --chunk-sampling any --mix-chars 0.125 --chars-layout corpus+eos --readback-noise 0.02 --steps 3000 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 500 --log-every 50 --seed 17 \
    --out "$BUILD/reader-read-back-longer" --log "$LOGS/training_log.reader-read-back-longer.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-read-back-longer" --newline-glyph "«" \
    --separator-glyph "©" --read-back-positions before_next_chunk --freeze none \
    --chunk-sampling any --mix-chars 0.125 --chars-layout corpus+eos --readback-noise 0.02 --steps 5000 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 1000 --log-every 50 --seed 18 \
    --out "$BUILD/reader-read-back-longer-2" --log "$LOGS/training_log.reader-read-back-longer-2.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --init "$BUILD/reader-read-back-longer-2" --newline-glyph "«" \
    --separator-glyph "©" --read-back-positions before_next_chunk --freeze none \
    --chunk-sampling any --mix-chars 0.125 --chars-layout corpus+eos --readback-noise 0.02 --steps 5000 \
    --batch-size 16 --warmup 50 --lr 3e-4 --eval-every 1000 --log-every 50 --seed 20 --out "$BUILD/vist2-demo" \
    --log "$LOGS/training_log.vist2-demo.jsonl"

# 19. The same-size text-only control: same tokenizer, seeds, steps, batch and schedules as stages 3 to 18.
python research/train_demo.py --tokenizer "$BYTES" --text-only --chunk-sampling any --steps 2400 --batch-size 16 \
    --warmup 100 --log-every 50 --out "$BUILD/text-only" --log "$LOGS/training_log.text-only.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only" --chunk-sampling any \
    --steps 1000 --batch-size 16 --warmup 50 --lr 1e-3 --log-every 50 \
    --out "$BUILD/text-only-corpus" --log "$LOGS/training_log.text-only-corpus.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-corpus" --chunk-sampling any \
    --steps 1500 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 \
    --out "$BUILD/text-only-continued" --log "$LOGS/training_log.text-only-continued.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-continued" --chunk-sampling any \
    --steps 1000 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 \
    --out "$BUILD/text-only-newlines" --log "$LOGS/training_log.text-only-newlines.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-newlines" --chunk-sampling any \
    --steps 1500 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 \
    --out "$BUILD/text-only-layout" --log "$LOGS/training_log.text-only-layout.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-layout" --chunk-sampling any \
    --steps 1000 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 \
    --out "$BUILD/text-only-glyph" --log "$LOGS/training_log.text-only-glyph.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-glyph" --chunk-sampling any \
    --steps 1000 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 \
    --out "$BUILD/text-only-separators" --log "$LOGS/training_log.text-only-separators.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-separators" --chunk-sampling any \
    --steps 1000 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 \
    --out "$BUILD/text-only-fewer-chars" --log "$LOGS/training_log.text-only-fewer-chars.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-fewer-chars" --chunk-sampling any \
    --steps 1500 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 --seed 8 \
    --out "$BUILD/text-only-separator-glyph" --log "$LOGS/training_log.text-only-separator-glyph.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-separator-glyph" \
    --chunk-sampling any --steps 800 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 \
    --seed 12 --out "$BUILD/text-only-noise" --log "$LOGS/training_log.text-only-noise.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-noise" --chunk-sampling any \
    --steps 800 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 --seed 13 \
    --out "$BUILD/text-only-noise-fewer" --log "$LOGS/training_log.text-only-noise-fewer.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-noise-fewer" \
    --chunk-sampling any --steps 800 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 \
    --seed 14 --out "$BUILD/text-only-overlap" --log "$LOGS/training_log.text-only-overlap.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-overlap" \
    --chunk-sampling any --steps 600 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 \
    --seed 16 --out "$BUILD/text-only-read-back-before" --log "$LOGS/training_log.text-only-read-back-before.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-read-back-before" \
    --chunk-sampling any --steps 3000 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 \
    --seed 17 --out "$BUILD/text-only-read-back-longer" --log "$LOGS/training_log.text-only-read-back-longer.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-read-back-longer" \
    --chunk-sampling any --steps 5000 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 \
    --seed 18 --out "$BUILD/text-only-read-back-longer-2" --log "$LOGS/training_log.text-only-read-back-longer-2.jsonl"
python research/train_demo.py --tokenizer "$BYTES" --text-only --init "$BUILD/text-only-read-back-longer-2" \
    --chunk-sampling any --steps 5000 --batch-size 16 --warmup 50 --lr 3e-4 --log-every 50 \
    --seed 20 --out "$BUILD/text-only-baseline" --log "$LOGS/training_log.text-only-baseline.jsonl"

# 20. Recall: the language model (tower and aligner frozen) on passkey prompts in the generation layout with a loss on
#     the answer and the `.` after it. Stage 1 puts the key line 1 chunk back and trains on nothing else; stages 2-4
#     draw k log-uniform in 1..8, 1..64, then 4..64, and add to each step one 64-chunk corpus window with read-back
#     off (every chunk predicted from the sketches before it) and two, then four, read-back rows; stage 5 adds the
#     prompts whose answer closes the open chunk while it is written, and stage 6 makes them half the prompts. Stage 7
#     trains the tower and aligner too, with eight random-character read-back rows per step (digits read as sharply
#     as a key needs), stage 8 makes 80 % of the prompts close the open chunk, stage 9 draws k up to 96, so that
#     64 is no longer the edge of what it trained on, at a lower learning rate, stage 10 adds four read-back rows
#     of the chunks such answers close (the digits already written, read from the sketch generation goes on from),
#     stages 11-13 repeat stage 10 with fresh seeds, and stage 14 draws 40 % of its prompts (and closing chunks) from
#     the distances still short of 95 %, 1-2 and 48-80 chunks back. With every distance mixed in from the first step
#     it stays at chance. The control gets the same prompts and windows as text (research/README.md, "The recall
#     stage"). The two chains may run side by side; wall times on 2 cores with both running: VIST2 8, 19, 47, 40,
#     34, 65, 34, 58, 74, 48, 47, 49, 36, 49 min (the last eight with 2 threads, as run; the 13th alone, the control
#     done); text-only 11, 11, 42, 35, 13, 17, 20, 21, 25, 19, 15, 12, 12, 16 min.
COMMON="--answer-suffix . --window-rows 1 --window-chunks 64 --eval-k 1 8 64 --eval-every 100 --threads 1"
python research/passkey_finetune.py --init "$BUILD/vist2-demo" --out "$BUILD/recall-k1" \
    --log "$LOGS/training_log.recall-k1.jsonl" --steps 1000 --batch-size 16 --max-k 1 --eval-k 1 8 --threads 1 \
    --answer-suffix . --lr 1e-3 --eval-every 200
python research/passkey_finetune.py --init "$BUILD/recall-k1" --out "$BUILD/recall-k8" \
    --log "$LOGS/training_log.recall-k8.jsonl" --steps 500 --batch-size 8 --max-k 8 --seed 1 --lr 1e-3 \
    --readback-rows 2 $COMMON
python research/passkey_finetune.py --init "$BUILD/recall-k8" --out "$BUILD/recall-k64" \
    --log "$LOGS/training_log.recall-k64.jsonl" --steps 800 --batch-size 8 --max-k 64 --seed 2 --lr 1e-3 \
    --readback-rows 2 $COMMON
python research/passkey_finetune.py --init "$BUILD/recall-k64" --out "$BUILD/recall-far" \
    --log "$LOGS/training_log.recall-far.jsonl" --steps 700 --batch-size 8 --min-k 4 --max-k 64 --seed 3 --lr 5e-4 \
    --readback-rows 4 $COMMON
python research/passkey_finetune.py --init "$BUILD/recall-far" --out "$BUILD/recall" \
    --log "$LOGS/training_log.recall.jsonl" --steps 300 --batch-size 8 --max-k 64 --seed 4 --lr 3e-4 \
    --answer-across-chunks --readback-rows 4 $COMMON
python research/passkey_finetune.py --init "$BUILD/recall" --out "$BUILD/recall-closing" \
    --log "$LOGS/training_log.recall-closing.jsonl" --steps 400 --batch-size 8 --max-k 64 --seed 5 --lr 3e-4 \
    --answer-across-chunks --closing-share 0.5 --readback-rows 4 $COMMON
python research/passkey_finetune.py --init "$BUILD/recall-closing" --out "$BUILD/recall-chars" \
    --log "$LOGS/training_log.recall-chars.jsonl" --steps 300 --batch-size 8 --max-k 64 --seed 7 --lr 3e-4 \
    --answer-across-chunks --closing-share 0.5 --readback-rows 4 --chars-rows 8 --train-encoder $COMMON \
    --threads 2 --eval-keys 32
python research/passkey_finetune.py --init "$BUILD/recall-chars" --out "$BUILD/recall-chars-closing" \
    --log "$LOGS/training_log.recall-chars-closing.jsonl" --steps 300 --batch-size 8 --max-k 64 --seed 8 --lr 3e-4 \
    --answer-across-chunks --closing-share 0.8 --readback-rows 4 --chars-rows 8 --train-encoder $COMMON \
    --threads 2 --eval-keys 32
python research/passkey_finetune.py --init "$BUILD/recall-chars-closing" --out "$BUILD/recall-far-closing" \
    --log "$LOGS/training_log.recall-far-closing.jsonl" --steps 300 --batch-size 8 --max-k 96 --seed 9 --lr 2e-4 \
    --answer-across-chunks --closing-share 0.8 --readback-rows 4 --chars-rows 8 --train-encoder $COMMON \
    --threads 2 --eval-keys 32
python research/passkey_finetune.py --init "$BUILD/recall-far-closing" --out "$BUILD/recall-closing-readback" \
    --log "$LOGS/training_log.recall-closing-readback.jsonl" --steps 300 --batch-size 8 --max-k 96 --seed 10 \
    --lr 2e-4 --answer-across-chunks --closing-share 0.8 --readback-rows 4 --chars-rows 8 --closing-readback-rows 4 \
    --train-encoder $COMMON --threads 2 --eval-keys 32
python research/passkey_finetune.py --init "$BUILD/recall-closing-readback" --out "$BUILD/recall-closing-readback-2" \
    --log "$LOGS/training_log.recall-closing-readback-2.jsonl" --steps 300 --batch-size 8 --max-k 96 --seed 11 \
    --lr 2e-4 --answer-across-chunks --closing-share 0.8 --readback-rows 4 --chars-rows 8 --closing-readback-rows 4 \
    --train-encoder $COMMON --threads 2 --eval-keys 32
python research/passkey_finetune.py --init "$BUILD/recall-closing-readback-2" --out "$BUILD/recall-closing-readback-3" \
    --log "$LOGS/training_log.recall-closing-readback-3.jsonl" --steps 300 --batch-size 8 --max-k 96 --seed 12 \
    --lr 2e-4 --answer-across-chunks --closing-share 0.8 --readback-rows 4 --chars-rows 8 --closing-readback-rows 4 \
    --train-encoder $COMMON --threads 2 --eval-keys 32
python research/passkey_finetune.py --init "$BUILD/recall-closing-readback-3" --out "$BUILD/recall-closing-readback-4" \
    --log "$LOGS/training_log.recall-closing-readback-4.jsonl" --steps 300 --batch-size 8 --max-k 96 --seed 13 \
    --lr 2e-4 --answer-across-chunks --closing-share 0.8 --readback-rows 4 --chars-rows 8 --closing-readback-rows 4 \
    --train-encoder $COMMON --threads 2 --eval-keys 32
python research/passkey_finetune.py --init "$BUILD/recall-closing-readback-4" --out "$BUILD/recall-focus" \
    --log "$LOGS/training_log.recall-focus.jsonl" --steps 300 --batch-size 8 --max-k 96 --seed 15 \
    --lr 2e-4 --answer-across-chunks --closing-share 0.8 --readback-rows 4 --chars-rows 8 --closing-readback-rows 4 \
    --train-encoder --focus-k 1-2 48-80 --focus-share 0.4 $COMMON --threads 2 --eval-keys 32
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-baseline" --out "$BUILD/text-only-recall-k1" \
    --log "$LOGS/training_log.text-only-recall-k1.jsonl" --steps 1000 --batch-size 16 --max-k 1 --eval-k 1 8 \
    --threads 1 --answer-suffix . --lr 1e-3 --eval-every 200
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-k1" --out "$BUILD/text-only-recall-k8" \
    --log "$LOGS/training_log.text-only-recall-k8.jsonl" --steps 500 --batch-size 8 --max-k 8 --seed 1 --lr 1e-3 \
    $COMMON
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-k8" --out "$BUILD/text-only-recall-k64" \
    --log "$LOGS/training_log.text-only-recall-k64.jsonl" --steps 800 --batch-size 8 --max-k 64 --seed 2 --lr 1e-3 \
    $COMMON
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-k64" \
    --out "$BUILD/text-only-recall-far" --log "$LOGS/training_log.text-only-recall-far.jsonl" --steps 700 \
    --batch-size 8 --min-k 4 --max-k 64 --seed 3 --lr 5e-4 $COMMON
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-far" \
    --out "$BUILD/text-only-recall" --log "$LOGS/training_log.text-only-recall.jsonl" --steps 300 \
    --batch-size 8 --max-k 64 --seed 4 --lr 3e-4 --answer-across-chunks $COMMON
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall" \
    --out "$BUILD/text-only-recall-closing" --log "$LOGS/training_log.text-only-recall-closing.jsonl" --steps 400 \
    --batch-size 8 --max-k 64 --seed 5 --lr 3e-4 --answer-across-chunks --closing-share 0.5 $COMMON
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-closing" \
    --out "$BUILD/text-only-recall-chars" --log "$LOGS/training_log.text-only-recall-chars.jsonl" --steps 300 \
    --batch-size 8 --max-k 64 --seed 7 --lr 3e-4 --answer-across-chunks --closing-share 0.5 $COMMON
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-chars" \
    --out "$BUILD/text-only-recall-chars-closing" --log "$LOGS/training_log.text-only-recall-chars-closing.jsonl" \
    --steps 300 --batch-size 8 --max-k 64 --seed 8 --lr 3e-4 --answer-across-chunks --closing-share 0.8 $COMMON
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-chars-closing" \
    --out "$BUILD/text-only-recall-far-closing" --log "$LOGS/training_log.text-only-recall-far-closing.jsonl" \
    --steps 300 --batch-size 8 --max-k 96 --seed 9 --lr 2e-4 --answer-across-chunks --closing-share 0.8 $COMMON
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-far-closing" \
    --out "$BUILD/text-only-recall-closing-readback" \
    --log "$LOGS/training_log.text-only-recall-closing-readback.jsonl" --steps 300 --batch-size 8 --max-k 96 \
    --seed 10 --lr 2e-4 --answer-across-chunks --closing-share 0.8 $COMMON
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-closing-readback" \
    --out "$BUILD/text-only-recall-closing-readback-2" \
    --log "$LOGS/training_log.text-only-recall-closing-readback-2.jsonl" --steps 300 --batch-size 8 --max-k 96 \
    --seed 11 --lr 2e-4 --answer-across-chunks --closing-share 0.8 $COMMON
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-closing-readback-2" \
    --out "$BUILD/text-only-recall-closing-readback-3" \
    --log "$LOGS/training_log.text-only-recall-closing-readback-3.jsonl" --steps 300 --batch-size 8 --max-k 96 \
    --seed 12 --lr 2e-4 --answer-across-chunks --closing-share 0.8 $COMMON
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-closing-readback-3" \
    --out "$BUILD/text-only-recall-closing-readback-4" \
    --log "$LOGS/training_log.text-only-recall-closing-readback-4.jsonl" --steps 300 --batch-size 8 --max-k 96 \
    --seed 13 --lr 2e-4 --answer-across-chunks --closing-share 0.8 $COMMON
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-closing-readback-4" \
    --out "$BUILD/text-only-recall-focus" --log "$LOGS/training_log.text-only-recall-focus.jsonl" --steps 300 \
    --batch-size 8 --max-k 96 --seed 15 --lr 2e-4 --answer-across-chunks --closing-share 0.8 \
    --focus-k 1-2 48-80 --focus-share 0.4 $COMMON

# 21. A font that draws Latin-1: DejaVu Sans Mono (DejaVuSansMono.ttf, which the checkpoint carries), newlines drawn
#     as ↵ and the document separator as ■ (« and © are now text to draw), one cell per byte (`byte_aligned`: a
#     character of n bytes keeps every later cell at its token). First the tower and aligner learn to give the new
#     sketches of ASCII chunks the visual tokens the old tower gives the old ones (the LM untouched); then the whole
#     model reads back rows of random characters in which 30 % of the places try a Latin-1 character (which wipes
#     recall); then stage 20's last step, five times, with such rows, brings recall back; the control gets the same
#     recall steps as text (research/README.md, "A font that draws Latin-1"). Wall times on 2 cores: 5 and 8 min, then
#     25, 15, 53, 28 and 38 min with 4, 5, 27, 9 and 12 min for the control beside them (the last VIST2 step beside
#     the test suite, the last control beside a passkey evaluation).
F="--font-path DejaVuSansMono.ttf --newline-glyph ↵ --separator-glyph ■ --byte-aligned"
python research/font_distill.py --init "$BUILD/recall-focus" --out "$BUILD/font-bytes-distill" $F --steps 1000 \
    --lr 1e-3 --eval-every 250 --seed 33 --threads 1 --log "$LOGS/training_log.font-bytes-distill.jsonl"
python research/font_distill.py --init "$BUILD/font-bytes-distill" --out "$BUILD/font-bytes-lm" $F --latin1-rows 16 \
    --wide-share 0.3 --train-lm all --steps 1000 --lr 3e-4 --eval-every 250 --seed 34 --threads 1 \
    --log "$LOGS/training_log.font-bytes-lm.jsonl"
python research/passkey_finetune.py --init "$BUILD/font-bytes-lm" --out "$BUILD/recall-latin1" \
    --log "$LOGS/training_log.recall-latin1.jsonl" --steps 100 --batch-size 8 --max-k 96 --seed 20 \
    --lr 5e-4 --answer-across-chunks --closing-share 0.8 --readback-rows 4 --chars-rows 16 --wide-share 0.3 \
    --closing-readback-rows 4 --train-encoder --focus-k 1-2 48-80 --focus-share 0.4 $COMMON --eval-keys 32 \
    --eval-every 50
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-focus" \
    --out "$BUILD/text-only-recall-latin1" --log "$LOGS/training_log.text-only-recall-latin1.jsonl" --steps 100 \
    --batch-size 8 --max-k 96 --seed 20 --lr 5e-4 --answer-across-chunks --closing-share 0.8 \
    --focus-k 1-2 48-80 --focus-share 0.4 $COMMON --eval-every 50
python research/passkey_finetune.py --init "$BUILD/recall-latin1" --out "$BUILD/recall-latin1-2" \
    --log "$LOGS/training_log.recall-latin1-2.jsonl" --steps 100 --batch-size 8 --max-k 96 --seed 21 \
    --lr 3e-4 --answer-across-chunks --closing-share 0.8 --readback-rows 4 --chars-rows 16 --wide-share 0.3 \
    --closing-readback-rows 4 --train-encoder --focus-k 1-2 48-80 --focus-share 0.4 $COMMON --eval-keys 32 \
    --eval-every 50 --threads 2
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-latin1" \
    --out "$BUILD/text-only-recall-latin1-2" --log "$LOGS/training_log.text-only-recall-latin1-2.jsonl" --steps 100 \
    --batch-size 8 --max-k 96 --seed 21 --lr 3e-4 --answer-across-chunks --closing-share 0.8 \
    --focus-k 1-2 48-80 --focus-share 0.4 $COMMON --eval-every 50
python research/passkey_finetune.py --init "$BUILD/recall-latin1-2" --out "$BUILD/recall-latin1-3" \
    --log "$LOGS/training_log.recall-latin1-3.jsonl" --steps 300 --batch-size 8 --max-k 96 --seed 22 \
    --lr 2e-4 --answer-across-chunks --closing-share 0.8 --readback-rows 4 --chars-rows 8 --wide-share 0.3 \
    --closing-readback-rows 4 --train-encoder --focus-k 1-4 24-80 --focus-share 0.4 $COMMON --eval-keys 32 \
    --threads 2
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-latin1-2" \
    --out "$BUILD/text-only-recall-latin1-3" --log "$LOGS/training_log.text-only-recall-latin1-3.jsonl" --steps 300 \
    --batch-size 8 --max-k 96 --seed 22 --lr 2e-4 --answer-across-chunks --closing-share 0.8 \
    --focus-k 1-4 24-80 --focus-share 0.4 $COMMON
python research/passkey_finetune.py --init "$BUILD/recall-latin1-3" --out "$BUILD/recall-latin1-4" \
    --log "$LOGS/training_log.recall-latin1-4.jsonl" --steps 150 --batch-size 8 --max-k 96 --seed 23 \
    --lr 1.5e-4 --answer-across-chunks --closing-share 0.8 --readback-rows 4 --chars-rows 8 --wide-share 0.3 \
    --closing-readback-rows 4 --train-encoder --focus-k 1-2 --focus-share 0.4 $COMMON --eval-keys 32 \
    --eval-every 150 --threads 2
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-latin1-3" \
    --out "$BUILD/text-only-recall-latin1-4" --log "$LOGS/training_log.text-only-recall-latin1-4.jsonl" --steps 150 \
    --batch-size 8 --max-k 96 --seed 23 --lr 1.5e-4 --answer-across-chunks --closing-share 0.8 \
    --focus-k 1-2 --focus-share 0.4 $COMMON --eval-every 150
python research/passkey_finetune.py --init "$BUILD/recall-latin1-4" --out "$BUILD/recall-latin1-5" \
    --log "$LOGS/training_log.recall-latin1-5.jsonl" --steps 150 --batch-size 8 --max-k 96 --seed 24 \
    --lr 1e-4 --answer-across-chunks --closing-share 0.8 --readback-rows 4 --chars-rows 8 --wide-share 0.3 \
    --closing-readback-rows 4 --train-encoder --focus-k 1-2 --focus-share 0.4 $COMMON --eval-keys 32 \
    --eval-every 150 --threads 2
python research/passkey_finetune.py --text-only --init "$BUILD/text-only-recall-latin1-4" \
    --out "$BUILD/text-only-recall-latin1-5" --log "$LOGS/training_log.text-only-recall-latin1-5.jsonl" --steps 150 \
    --batch-size 8 --max-k 96 --seed 24 --lr 1e-4 --answer-across-chunks --closing-share 0.8 \
    --focus-k 1-2 --focus-share 0.4 $COMMON --eval-every 150

if [ "$OUT" = demo ]; then  # the checkpoint is the repository root: its files, not the code save_pretrained copies
    for file in "$BUILD"/recall-latin1-5/*; do case "$file" in *.py|*.jsonl) ;; *) cp "$file" . ;; esac; done
    rm -rf research/text-only-baseline && cp -r "$BUILD/text-only-recall-latin1-5" research/text-only-baseline
    rm -f research/text-only-baseline/*.jsonl
    python research/evaluate_demo.py --model . --text-only research/text-only-baseline --window-chunks 64 \
        --threads 2 --json research/eval_results.json
    python examples/passkey.py --model . --text-only research/text-only-baseline --keys 100 --threads 2 \
        --json benchmarks/results/passkey-demo.json --markdown benchmarks/results/passkey-demo.md
else
    python research/evaluate_demo.py --model "$BUILD/recall-latin1-5" \
        --text-only "$BUILD/text-only-recall-latin1-5" \
        --window-chunks 64 --threads 2 --json "$BUILD/eval_results.json"
    python examples/passkey.py --model "$BUILD/recall-latin1-5" \
        --text-only "$BUILD/text-only-recall-latin1-5" --keys 100 --threads 2 --json "$BUILD/passkey-demo.json"
fi
