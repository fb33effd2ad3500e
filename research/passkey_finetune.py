"""The demo's recall stage: recall a passkey from a sketch up to 64 chunks back, and model text over 64-chunk windows.

    python research/passkey_finetune.py --init . --out /tmp/passkey-ft --steps 600 --batch-size 4

Starts from a checkpoint (default: the committed demo), freezes the vision tower and the aligner (the sketches keep
meaning what the read-back stages taught; --train-encoder trains them too), and trains the language model on up to
four kinds of rows, each kind its own forward pass (their lengths differ by 10x, so one padded batch would be mostly
padding):

- passkey rows (--batch-size of them): prompts built exactly as `examples/passkey.py` builds its test prompts
  (`make_trial`), but from the training documents of the corpus, in the generation layout (closed chunks as sketches
  only, the question in the open chunk), with a loss on the answer alone (` NNNNN`, and with --answer-suffix the
  text after it, `.`, so that the model learns where the key ends). k, the chunks between the key line and the open
  chunk, is drawn log-uniformly in --min-k..--max-k, or for a share --focus-share of the rows uniformly in one of
  the bands --focus-k (the distances an evaluation found weakest);
- window rows (--window-rows, of --window-chunks chunks): corpus windows in the training layout
  `c_1 V_1 c_2 ... c_n` with read-back off, every chunk predicted from the sketches of the chunks before it (the
  generation layout's context, all chunks of a window in one pass): language modelling over long compressed contexts;
- read-back rows (--readback-rows): two-chunk windows `c_1 V_1 c_2` with c_1 read back from V_1, as in the recipe's
  last stages, so that reading is kept;
- random-character read-back rows (--chars-rows): random characters over the whitespace of corpus chunks, read back
  from their sketch (nothing to guess: digits are read as sharply as a key needs), with --wide-share of the places
  trying a character of several bytes (`train_demo.with_corpus_layout`), so that a font drawing beyond ASCII is read
  there too;
- closing-chunk read-back rows (--closing-readback-rows): the chunk a passkey answer closes while it is written (the
  prompt's last tokens and the answer's first digits), read back from its sketch: generation goes on from exactly
  that sketch, and must read which digits it has already written.

With --text-only the same rows train the same-size text-only control (`--init research/text-only-baseline`): the
passkey prompts and windows as plain text, no read-back rows (it has no sketch to read). Every --eval-every steps the
log gets the teacher-forced accuracy of whole answers on fixed held-out prompts (held-out documents, as the test uses)
at k in --eval-k. Writes the checkpoint to --out and a JSON-lines log.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "research"))

import passkey  # noqa: E402  (examples/passkey.py: the test's own prompt builder)
import train_demo  # noqa: E402  (the recipe's corpus windows and batches)
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer  # noqa: E402


def trial_tokens(processor, filler: str, k: int, rng: random.Random, suffix: str = ""):
    """A passkey trial (`make_trial`) as tokens: the prompt's, the answer's (` NNNNN` and `suffix`), and whether writing
    the answer closes the prompt's open chunk."""
    trial = passkey.make_trial(processor, filler, k, rng)
    ids, answer = processor.encode(trial.prompt), processor.encode(" " + trial.key + suffix)
    return ids, answer, passkey.closes_open_chunk(processor.chunk_size, len(ids), len(answer))


def passkey_sample(processor, filler: str, k: int, rng: random.Random, suffix: str = "", text_only: bool = False,
                   across_chunks: bool = False, closing: bool | None = None):
    """One training sample: the prompt in the generation layout, labels on the answer's tokens (and `suffix`'s) only;
    with `text_only`, the same prompt and answer as plain text, `(input_ids, labels)`.

    An answer that does not fit in the prompt's open chunk closes it while it is written: generation then compresses
    its first tokens into a sketch and goes on from that. Such a sample is None, or with `across_chunks` it is laid
    out in the training layout (every chunk's text, then its sketch), whose logits are generation's, closing included.
    With `closing` set, a sample whose answer does not close the open chunk (True) or does (False) is None too.
    """
    ids, answer, crosses = trial_tokens(processor, filler, k, rng, suffix)
    if (crosses and not across_chunks) or closing not in (None, crosses):
        return None
    if text_only:
        return ids + answer, [-100] * len(ids) + answer
    return processor.encode_sample([], ids + answer, keep_closed_text=crosses,
                                   trainable=[False] * len(ids) + [True] * len(answer))


def draw_k(rng: random.Random, max_k: int, min_k: int = 1, focus=(), focus_share: float = 0.0) -> int:
    """Log-uniform in [min_k, max_k]: near keys are easy, so each doubling of k gets the same share. With `focus`, a
    list of (low, high) bands, a share `focus_share` of the draws is uniform in one band picked at random instead: the
    distances an evaluation found weakest get more rows (and with no focus, the draws are the same as without it)."""
    if focus and rng.random() < focus_share:
        return rng.randint(*rng.choice(focus))
    return min(max_k, int(math.exp(rng.uniform(math.log(min_k), math.log(max_k + 1)))))


def samples(processor, filler, rng, n, k=None, max_k=64, suffix="", text_only=False, min_k=1, across_chunks=False,
            closing_share=None, focus=(), focus_share=0.0):
    """`n` passkey samples; with `closing_share`, each one's answer closes the open chunk with that probability (other
    fillers and keys at the same k until one does or does not: as drawn, 9-48 % of prompts close it, by k)."""
    out = []
    while len(out) < n:
        closing = None if closing_share is None else rng.random() < closing_share
        k_row = k or draw_k(rng, max_k, min_k, focus, focus_share)
        sample = passkey_sample(processor, filler, k_row, rng, suffix, text_only, across_chunks, closing)
        while sample is None and closing is not None:
            sample = passkey_sample(processor, filler, k_row, rng, suffix, text_only, across_chunks, closing)
        if sample is not None:
            out.append(sample)
    return out


def closing_chunks(processor, filler, rng, n, max_k=64, suffix="", min_k=1, focus=(), focus_share=0.0):
    """`n` read-back rows, each the chunk that a passkey answer closes while it is written: its sketch is what
    generation goes on from, so reading it is trained where a key is broken off. k is drawn as `samples` draws it and
    a prompt kept only if its answer closes the open chunk, so small k, where more answers close it, come up more."""
    rows, L = [], processor.chunk_size
    while len(rows) < n:
        k = draw_k(rng, max_k, min_k, focus, focus_share)
        ids, answer, closes = trial_tokens(processor, filler, k, rng, suffix)
        if closes:
            start = (len(ids) - 1) // L * L  # the open chunk, or the prompt's last chunk where it ends on an edge
            row = train_demo.chars_readback_sample(processor, (ids + answer)[start : start + L])
            rows += [row] if row is not None else []  # None: a chunk its sketch cannot hold
    return rows


def text_batch(row):
    """One `(input_ids, labels)` row of the text-only control as a batch of one (prompts differ in length by 10x, so
    they go one by one rather than padded)."""
    ids, labels = row
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}


@torch.no_grad()
def key_accuracy(model, processor, probe, text_only=False) -> float:
    """Teacher-forced: the share of samples whose every answer token is the argmax. The logits that predict a token
    are those of the text token before it in the text stream, which is not the entry before it where an answer closes
    a chunk (its sketch lies between), so both are taken along the text stream, as the model's loss does."""
    right = 0
    for sample in probe:
        batch = text_batch(sample) if text_only else train_demo.make_batch(processor, [sample])
        labels = batch.pop("labels")[0]
        logits = model(**batch).logits[0]
        if not text_only:
            text = batch["input_ids"][0] != processor.sketch_token_id
            logits, labels = logits[text], labels[text]
        answer = (labels != -100).nonzero()[:, 0]
        right += bool((logits[answer - 1].argmax(-1) == labels[answer]).all())
    return right / len(probe)


def window_batch(processor, windows, text_only=False):
    """Corpus windows as model inputs: the training layout with read-back off, or plain text for the control."""
    if text_only:
        ids = torch.tensor(np.stack(windows), dtype=torch.long)
        return {"input_ids": ids, "labels": ids}
    return train_demo.make_batch(processor, [processor.encode_sample([], list(map(int, w)), keep_closed_text=True)
                                             for w in windows])


def k_band(text: str) -> tuple[int, int]:
    """`--focus-k` bands: `LOW-HIGH` (or one k), chunks back."""
    low, _, high = text.partition("-")
    band = int(low), int(high or low)
    if not 1 <= band[0] <= band[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: a band of k is LOW-HIGH with 1 <= LOW <= HIGH, e.g. 48-80")
    return band


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", default=str(REPO))
    parser.add_argument("--out", required=True)
    parser.add_argument("--log", default=None, help="JSON lines (default: <out>/passkey_finetune.jsonl)")
    parser.add_argument("--text-only", action="store_true", help="train the text-only control (--init its folder)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=4, help="passkey rows per step")
    parser.add_argument("--answer-suffix", default="", help="text after the key that is labelled too, e.g. '.'")
    parser.add_argument("--answer-across-chunks", action="store_true",
                        help="also train (and probe) answers that close the open chunk while they are written")
    parser.add_argument("--closing-share", type=float, default=None,
                        help="with --answer-across-chunks: the share of passkey rows whose answer closes the open chunk")
    parser.add_argument("--window-rows", type=int, default=0, help="corpus windows per step (read-back off)")
    parser.add_argument("--window-chunks", type=int, default=64)
    parser.add_argument("--readback-rows", type=int, default=0, help="two-chunk read-back windows per step")
    parser.add_argument("--chars-rows", type=int, default=0, help="random-character read-back rows per step")
    parser.add_argument("--closing-readback-rows", type=int, default=0,
                        help="read-back rows of the chunks passkey answers close while they are written, per step")
    parser.add_argument("--wide-share", type=float, default=0.0,
                        help="--chars-rows: share of places trying a Latin-1 character (see train_demo.py)")
    parser.add_argument("--train-encoder", action="store_true",
                        help="train the vision tower and the aligner too (a font whose new glyphs they never read)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--max-k", type=int, default=64)
    parser.add_argument("--min-k", type=int, default=1, help="train on keys at least this many chunks back")
    parser.add_argument("--focus-k", type=k_band, nargs="+", default=[], metavar="LOW-HIGH",
                        help="bands of k (e.g. 1-2 48-80) that a share --focus-share of the rows is drawn from")
    parser.add_argument("--focus-share", type=float, default=0.0)
    parser.add_argument("--eval-k", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--eval-keys", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.closing_share is not None and not args.answer_across_chunks:
        raise SystemExit("--closing-share needs --answer-across-chunks (without it, no answer may close the chunk)")
    rng, out, log = train_demo.start_run(args, "passkey_finetune.jsonl")

    # The control's prompts are laid out by the demo's processor (same tokenizer, same chunks), then taken as text.
    processor = AutoProcessor.from_pretrained(str(REPO) if args.text_only else args.init, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.init, trust_remote_code=not args.text_only)
    if not args.text_only and not args.train_encoder:
        for part in (model.vision_tower, model.aligner):
            part.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    filler, heldout = passkey.corpus_filler(heldout=False), passkey.corpus_filler()
    probe_rng = random.Random(1234)
    probes = {k: samples(processor, heldout, probe_rng, args.eval_keys, k=k, suffix=args.answer_suffix,
                         text_only=args.text_only, across_chunks=args.answer_across_chunks) for k in args.eval_k}
    if args.window_rows or args.readback_rows or args.chars_rows:
        stream = train_demo.corpus_windows(processor.tokenizer, "train").reshape(-1)
        window_tokens = args.window_chunks * processor.chunk_size

    def draw_windows(n, length):
        starts = [rng.randrange(len(stream) - length + 1) for _ in range(n)]
        return [stream[s : s + length] for s in starts]

    if args.chars_rows:
        chars_layout = train_demo.random_chars_layout(processor.tokenizer, args.wide_share)

    def chars_batch(n):
        rows = []
        while len(rows) < n:
            chars = chars_layout(draw_windows(1, processor.chunk_size)[0].tolist(), rng)
            rows += [row] if (row := train_demo.chars_readback_sample(processor, chars)) is not None else []
        return train_demo.make_batch(processor, rows)

    def evaluate(step):
        model.eval()
        row = {"step": step, **{f"key_acc_k{k}": key_accuracy(model, processor, probe, args.text_only)
                                for k, probe in probes.items()}}
        model.train()
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def backward(batch, scale=1.0, **kwargs):
        loss = model(**batch, **kwargs).loss
        (loss * scale).backward()
        return loss.item()

    evaluate(0)
    model.train()
    began = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        rows = samples(processor, filler, rng, args.batch_size, max_k=args.max_k, suffix=args.answer_suffix,
                       text_only=args.text_only, min_k=args.min_k, across_chunks=args.answer_across_chunks,
                       closing_share=args.closing_share, focus=args.focus_k, focus_share=args.focus_share)
        if args.text_only:  # row by row: padded to the longest, a batch of text prompts would be mostly padding
            losses = {"loss": sum(backward(text_batch(row), 1 / len(rows)) for row in rows) / len(rows)}
        else:
            losses = {"loss": backward(train_demo.make_batch(processor, rows))}
        if args.window_rows:
            losses["window_loss"] = backward(window_batch(processor, draw_windows(args.window_rows, window_tokens),
                                                          args.text_only))
        if args.readback_rows and not args.text_only:
            pairs = window_batch(processor, draw_windows(args.readback_rows, 2 * processor.chunk_size))
            losses["readback_loss"] = backward(pairs, read_back=torch.ones(args.readback_rows, dtype=torch.bool))
        if args.chars_rows and not args.text_only:
            losses["chars_loss"] = backward(chars_batch(args.chars_rows),
                                            read_back=torch.ones(args.chars_rows, dtype=torch.bool))
        if args.closing_readback_rows and not args.text_only:
            rows = closing_chunks(processor, filler, rng, args.closing_readback_rows, args.max_k, args.answer_suffix,
                                  args.min_k, args.focus_k, args.focus_share)
            losses["closing_readback_loss"] = backward(
                train_demo.make_batch(processor, rows),
                read_back=torch.ones(args.closing_readback_rows, dtype=torch.bool))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 10 == 0:
            row = {"step": step, **{k: round(v, 4) for k, v in losses.items()}, "lr": lr,
                   "seconds": round(time.time() - began, 1)}
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
    model.save_pretrained(out)
    # The control's folder gets its own tokenizer files: the demo processor's would point at code it does not have.
    (AutoTokenizer.from_pretrained(args.init) if args.text_only else processor).save_pretrained(out)


if __name__ == "__main__":
    main()
