"""A new font for a trained model: its vision tower learns to read sketches drawn in that font as it read the old ones.

    python research/font_distill.py --init . --font-path research/fonts/DejaVuSansMono.ttf \
        --newline-glyph "↵" --separator-glyph "■" --out research/build/font-distill --steps 1500

The language model and the old tower stay as they are. A copy of the tower and aligner (the student) sees each training
chunk drawn with the new settings (font, newline glyph, document-separator glyph) and learns to give the visual tokens
that the old tower (the teacher) gives for the same chunk drawn the old way: mean squared error over the m visual tokens
of each sketch. Where the two agree, the language model reads the new sketches as it read the old ones, so read-back,
passkey recall and perplexity carry over without a step of language-model training. The chunks are the training
corpus's, random characters over a corpus chunk's layout, and uniform random characters, a third each; a chunk that
either side cannot draw is skipped. Characters only the new font draws have no teacher: the next stage teaches them by
read-back (`train_demo.py --chars-repertoire latin1`). Logs the held-out distance, and teacher-forced read-back of
held-out chunks and random characters with the student's sketches (and with wrong ones, the control).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "research"))

import train_demo  # noqa: E402  (the recipe's corpus, random rows and probes)
from transformers import AutoModelForCausalLM, AutoProcessor  # noqa: E402


def redrawn_config(config, font_path, newline_glyph, separator_glyph):
    """`config` with the new drawing settings: the font, the newline glyph, the glyph of each special token."""
    new = copy.deepcopy(config)
    new.font_path, new.newline_glyph = font_path, newline_glyph
    if separator_glyph:
        new.special_token_glyphs = {token: separator_glyph for token in (config.special_token_glyphs or {})}
    return new


def sketch_pair(old, new, ids):
    """The chunk `ids` drawn the old way and the new way, or None if either side keeps it as text."""
    (old_image,), _ = old.sketch_chunks([ids])
    (new_image,), _ = new.sketch_chunks([ids])
    return None if old_image is None or new_image is None else (old_image, new_image)


def pixels(images):
    return torch.from_numpy(np.stack(images))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", default=str(REPO))
    parser.add_argument("--out", required=True)
    parser.add_argument("--log", default=None, help="JSON lines (default: <out>/font_distill.jsonl)")
    parser.add_argument("--font-path", required=True)
    parser.add_argument("--newline-glyph", default=None, help="default: the old one")
    parser.add_argument("--separator-glyph", default=None, help="default: the old one")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32, help="chunks per step")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rng, out, log = train_demo.start_run(args, "font_distill.jsonl")

    old = AutoProcessor.from_pretrained(args.init, trust_remote_code=True)
    teacher = AutoModelForCausalLM.from_pretrained(args.init, trust_remote_code=True).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(args.init, trust_remote_code=True)
    student.config = redrawn_config(student.config, args.font_path, args.newline_glyph or student.config.newline_glyph,
                                    args.separator_glyph)
    new = type(old).from_config(student.config, old.tokenizer)
    student.requires_grad_(False)
    params = [*student.vision_tower.parameters(), *student.aligner.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    tokenizer, chunk = old.tokenizer, old.chunk_size
    draw_window = train_demo.chunk_sampler(tokenizer, "corpus", [], 2 * chunk, sampling="any")
    pool = train_demo.random_token_pool(tokenizer, "chars")
    layout = train_demo.layout_token_ids(tokenizer, separators=True)
    kinds = [lambda r: draw_window(1, r)[0][:chunk].tolist(),
             lambda r: train_demo.with_corpus_layout(draw_window(1, r)[0][:chunk].tolist(), layout, pool, r),
             lambda r: [pool[r.randrange(len(pool))] for _ in range(chunk)]]

    def draw_pairs(n, r):
        pairs = []
        while len(pairs) < n:
            pair = sketch_pair(old, new, kinds[len(pairs) % 3](r))
            if pair is not None:
                pairs.append(pair)
        return pairs

    heldout_pairs = [p for w in train_demo.corpus_windows(tokenizer, "heldout")[:96]
                     if (p := sketch_pair(old, new, w[:chunk].tolist())) is not None][:64]
    draw_chars = train_demo.chunk_sampler(tokenizer, "chars", pool)
    probes = {"heldout": train_demo.heldout_readback_items(new, student.config, tokenizer, 32),
              "chars": train_demo.sketchable_items(new, student.config, draw_chars, 32, random.Random(12345))}

    def distance(pairs, model=student):
        old_pixels, new_pixels = pixels([p[0] for p in pairs]), pixels([p[1] for p in pairs])
        return torch.nn.functional.mse_loss(model.encode_sketches(new_pixels), teacher.encode_sketches(old_pixels))

    def evaluate(step, start):
        student.eval()
        with torch.no_grad():
            row = {"step": step, "elapsed_s": round(time.time() - start, 1),
                   "heldout_mse": round(distance(heldout_pairs).item(), 5),
                   **{k: round(v, 4) for k, v in train_demo.probe_stats(student, new, probes).items()}}
        student.train()
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    start = time.time()
    with torch.no_grad():
        untrained = distance(heldout_pairs, teacher).item()  # the teacher on the new sketches: where we start from
    print(f"teacher on the new sketches: held-out mse {untrained:.5f}", flush=True)
    student.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = train_demo.lr_at(step, args.steps, args.lr, args.warmup)
        if step % args.eval_every == 0:
            evaluate(step, start)
        loss = distance(draw_pairs(args.batch_size, rng))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 25 == 0:
            print(f"step {step} mse {loss.item():.5f} {time.time() - start:.0f}s", flush=True)
    evaluate(args.steps, start)
    student.save_pretrained(out)
    new.save_pretrained(out)
    print(f"saved to {out} after {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
