"""Experiment: can the demo learn to recall a passkey from a sketch up to 64 chunks back, with a recall-shaped objective?

    python research/passkey_finetune.py --init . --out /tmp/passkey-ft --steps 600 --batch-size 4

Starts from a checkpoint (default: the committed demo), freezes the vision tower and the aligner (the sketches keep
meaning what the read-back stages taught), and trains the language model on passkey prompts built exactly as
`examples/passkey.py` builds its test prompts (`make_trial`), but from the training documents of the corpus: the
prompt in the generation layout (closed chunks as sketches only, the question in the open chunk), and a loss on the
answer tokens alone (` NNNNN`), which must therefore come from the key line's sketch. k, the chunks between the key
line and the open chunk, is drawn log-uniformly in 1..--max-k, so short distances are frequent early and long ones
are seen. Every --eval-every steps the log gets the teacher-forced accuracy of whole keys on fixed held-out prompts
(held-out documents, as the test uses) at k in --eval-k. Writes the checkpoint to --out and a JSON-lines log.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

import passkey  # noqa: E402  (examples/passkey.py: the test's own prompt builder)
from transformers import AutoModelForCausalLM, AutoProcessor  # noqa: E402


def passkey_sample(processor, filler: str, k: int, rng: random.Random):
    """One training sample: the prompt in the generation layout, labels on the answer's tokens only. None when the
    answer would not fit in the open chunk (its first tokens would then be compressed before they are predicted)."""
    trial = passkey.make_trial(processor, filler, k, rng)
    ids, answer = processor.encode(trial.prompt), processor.encode(" " + trial.key)
    if len(ids) % processor.chunk_size == 0 or len(ids) % processor.chunk_size + len(answer) > processor.chunk_size:
        return None
    return processor.encode_sample([], ids + answer, trainable=[False] * len(ids) + [True] * len(answer))


def draw_k(rng: random.Random, max_k: int) -> int:
    return min(max_k, int(math.exp(rng.uniform(0, math.log(max_k + 1)))))


def samples(processor, filler, rng, n, k=None, max_k=64):
    out = []
    while len(out) < n:
        sample = passkey_sample(processor, filler, k or draw_k(rng, max_k), rng)
        if sample is not None:
            out.append(sample)
    return out


@torch.no_grad()
def key_accuracy(model, processor, probe) -> float:
    """Teacher-forced: the share of samples whose every answer token is the argmax."""
    right = 0
    for sample in probe:
        batch = processor.collate([sample], return_labels=True)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        labels = batch["labels"][0]
        answer = (labels != -100).nonzero()[:, 0]
        right += bool((logits[answer - 1].argmax(-1) == labels[answer]).all())
    return right / len(probe)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", default=str(REPO))
    parser.add_argument("--out", required=True)
    parser.add_argument("--log", default=None, help="JSON lines (default: <out>/passkey_finetune.jsonl)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--max-k", type=int, default=64)
    parser.add_argument("--eval-k", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--eval-keys", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Path(args.log or out / "passkey_finetune.jsonl")
    log.write_text("")

    model = AutoModelForCausalLM.from_pretrained(args.init, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.init, trust_remote_code=True)
    for part in (model.vision_tower, model.aligner):
        part.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    filler, heldout = passkey.corpus_filler(heldout=False), passkey.corpus_filler()
    probe_rng = random.Random(1234)
    probes = {k: samples(processor, heldout, probe_rng, args.eval_keys, k=k) for k in args.eval_k}

    def evaluate(step):
        model.eval()
        row = {"step": step, **{f"key_acc_k{k}": key_accuracy(model, processor, probe) for k, probe in probes.items()}}
        model.train()
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    evaluate(0)
    model.train()
    began = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = processor.collate(samples(processor, filler, rng, args.batch_size, max_k=args.max_k), return_labels=True)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 10 == 0:
            row = {"step": step, "loss": round(loss.item(), 4), "lr": lr, "seconds": round(time.time() - began, 1)}
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
    model.save_pretrained(out)
    processor.save_pretrained(out)


if __name__ == "__main__":
    main()
