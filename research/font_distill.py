"""A new font for a trained model: its vision tower learns to read sketches drawn in that font as it read the old ones.

    python research/font_distill.py --init . --font-path DejaVuSansMono.ttf --newline-glyph "↵" \
        --separator-glyph "■" --byte-aligned --out research/build/font-distill --steps 1000

The language model and the old tower stay as they are. A copy of the tower and aligner (the student) sees each training
chunk drawn with the new settings (font, newline glyph, document-separator glyph) and learns to give the visual tokens
that the old tower (the teacher) gives for the same chunk drawn the old way: mean squared error over the m visual tokens
of each sketch. Where the two agree, the language model reads the new sketches as it read the old ones, so read-back,
passkey recall and perplexity carry over without a step of language-model training. The chunks are the training
corpus's, random characters over a corpus chunk's layout, and uniform random characters, a third each; a chunk that
either side cannot draw is skipped. Characters only the new font draws have no teacher: a later step teaches them by
read-back with the language model trained too (`passkey_finetune.py --chars-rows --wide-share`); `--latin1-rows` tries
it here, read back through the language model, frozen (a loss on the tower alone) or trained too (`--train-lm`).
`--byte-aligned` draws a character of n bytes in n cells (`VIST2Config.byte_aligned`). Logs the held-out distance, and
teacher-forced read-back of held-out chunks, random characters (and Latin-1 rows) with the student's sketches (and with
wrong ones, the control).
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


def redrawn_config(config, font_path, newline_glyph, separator_glyph, byte_aligned=False):
    """`config` with the new drawing settings: the font, the newline glyph, the glyph of each special token, one cell
    per byte."""
    new = copy.deepcopy(config)
    new.font_path, new.newline_glyph, new.byte_aligned = font_path, newline_glyph, byte_aligned
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
    parser.add_argument("--byte-aligned", action="store_true", help="draw a character of n bytes in n cells")
    parser.add_argument("--latin1-rows", type=int, default=0,
                        help="per step, rows of random characters with Latin-1 ones among them, learnt by read-back "
                             "through the language model, frozen unless --train-lm (they have no teacher)")
    parser.add_argument("--wide-share", type=float, default=0.15, help="share of a Latin-1 row's places tried wide")
    parser.add_argument("--readback-weight", type=float, default=1.0, help="the read-back loss's weight")
    parser.add_argument("--train-lm", choices=["none", "all", "high-bytes"], default="none",
                        help="--latin1-rows: train the language model too (all of it), or only the (tied) embeddings "
                             "of the bytes 0x80-0xFF, which ASCII text never uses")
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
                                    args.separator_glyph, args.byte_aligned)
    new = type(old).from_config(student.config, old.tokenizer)
    student.requires_grad_(False)
    params = [*student.vision_tower.parameters(), *student.aligner.parameters()]
    if args.train_lm == "all":
        params += list(student.language_model.parameters())
    if args.train_lm == "high-bytes":
        embeddings = student.get_input_embeddings().weight
        high = torch.tensor([i for token, i in old.tokenizer.get_vocab().items()
                             if len(token) == 1 and old.byte_of.get(token, 0) >= 0x80])
        keep = torch.zeros(embeddings.shape[0], 1).index_fill_(0, high, 1.0)
        # every other row stays as it was (and gets no weight decay either)
        embeddings.requires_grad_(True).register_hook(lambda grad: grad * keep)
    groups = [{"params": params}] + ([{"params": [embeddings], "weight_decay": 0.0}] if args.train_lm == "high-bytes"
                                     else [])
    trained = [p for group in groups for p in group["params"]]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

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
    latin1_row = train_demo.random_chars_layout(tokenizer, args.wide_share)

    def latin1_items(n, r, split="train"):
        return train_demo.sketchable_items(new, student.config, lambda _, r, split: torch.tensor(
            [latin1_row(draw_window(1, r, split)[0][:chunk].tolist(), r)]), n, r, split)
    if args.latin1_rows:
        probes["latin1"] = latin1_items(64, random.Random(54321), "heldout")

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
        if args.latin1_rows:  # read back through the frozen LM: only the tower and aligner learn to draw these
            loss = loss + args.readback_weight * student(**train_demo.readback_batch(
                new, latin1_items(args.latin1_rows, rng))).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if step % 25 == 0:
            print(f"step {step} mse {loss.item():.5f} {time.time() - start:.0f}s", flush=True)
    evaluate(args.steps, start)
    student.save_pretrained(out)
    new.save_pretrained(out)
    print(f"saved to {out} after {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
