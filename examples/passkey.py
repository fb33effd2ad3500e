"""Passkey retrieval: does VIST2 recall a number it read k chunks ago, from its sketches alone?

    python examples/passkey.py --model . --text-only research/text-only-baseline --keys 100 --threads 2 \\
        --json benchmarks/results/passkey-demo.json --markdown benchmarks/results/passkey-demo.md
    python examples/passkey.py --model . --filler my_text.txt --keys 20 --k 1 4 16      # on your own text

Protocol (the standard long-context retrieval probe). A filler text gets one line

    The pass key is NNNNN. Remember it. NNNNN is the pass key.

(NNNNN: five random digits) inserted after one to two chunks' worth of it, more filler after the line, and the
question `What is the pass key? The pass key is` at the end. Greedy decoding must produce the five digits, after
any whitespace (and not followed by a sixth digit).

Where the key lies: k counts the model's chunks of tokens, from the chunk that holds the key line's last token to
the open chunk (the prompt's last chunk, which stays text). k = 1: the key line ends in the last closed chunk, so
for every k >= 1 the whole key line (58 characters, 2-3 chunks at L = 32 bytes) is compressed; the question after
it (38 tokens) cannot share the open chunk with it at L = 32. Where the key line falls inside its chunks and how full
the open chunk is are drawn at random for each key.

Compared, on the same prompts:
- `vist2`: `model.generate(**processor(text=prompt), processor=processor, do_sample=False)`;
- `vist2_other_sketches` (control): the same input ids, with `pixel_values` replaced by those of another prompt of
  the same layout (same k, same lengths, another key and another part of the filler). The prompt's own key is then
  in no input, so its accuracy is chance: 1e-5 for the whole key, 10 % per digit for an answer that does not depend
  on the key. `answers_other_key` says how often it gives the other prompt's key instead: the sketches were read;
- `text_only` (with `--text-only`): a causal LM with the same tokenizer, given the whole prompt as text.

The default filler is the held-out part of the repository's offline corpus (CPython docstrings the demo never
trained on, `tokenization/build_corpus.py`), documents joined by blank lines; `--filler FILE` reads any text, and a
filler shorter than a prompt needs is read again from its start.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is the pass key? The pass key is"
KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KEY_DIGITS = 5


def key_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_prompt(before: str, key: str, after: str) -> tuple[str, int]:
    """`before`, the key line, `after` and the question, one line each; and where the key line ends (a character
    index into the prompt)."""
    head = f"{before}\n{key_line(key)}"
    return f"{head}\n{after}\n{QUESTION}", len(head)


def chunks_back(processor, prompt: str, key_end: int) -> int:
    """Index of the open chunk minus index of the chunk that holds the token of character `key_end - 1`."""
    offsets = processor.tokenizer(prompt, add_special_tokens=False, split_special_tokens=True,
                                  return_offsets_mapping=True)["offset_mapping"]
    last = next(i for i, (_, end) in enumerate(offsets) if end >= key_end)
    return (len(offsets) - 1) // processor.chunk_size - last // processor.chunk_size


def read_answer(text: str) -> str:
    """The five characters after any leading whitespace: the model's key."""
    return text.lstrip()[:KEY_DIGITS]


def is_correct(generated: str, key: str) -> bool:
    rest = generated.lstrip()
    return rest[:KEY_DIGITS] == key and not rest[KEY_DIGITS : KEY_DIGITS + 1].isdigit()


def digits_correct(generated: str, key: str) -> int:
    """How many of the key's digits the answer has at their place (0-5)."""
    return sum(a == b for a, b in zip(read_answer(generated), key))


# ---------------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Trial:
    k: int
    key: str
    prompt: str
    key_end: int  # character index where the key line ends
    start: int  # where `before` starts in the filler
    before_chars: int
    after_chars: int


def closes_open_chunk(chunk_size: int, prompt_tokens: int, answer_tokens: int) -> bool:
    """Whether writing an answer of `answer_tokens` after the prompt fills the prompt's open chunk, so that generation
    compresses the answer's first tokens into a sketch before it writes the rest."""
    open_tokens = prompt_tokens % chunk_size
    return open_tokens == 0 or open_tokens + answer_tokens > chunk_size


def answer_closes_chunk(processor, trial) -> bool:
    return closes_open_chunk(processor.chunk_size, len(processor.encode(trial.prompt)),
                             len(processor.encode(" " + trial.key)))


def filler_text(filler: str, start: int, length: int) -> str:
    """`length` characters of `filler` from `start`, read as a loop (a short filler repeats)."""
    start %= len(filler)
    repeats = (start + length) // len(filler) + 1
    return (filler * repeats)[start : start + length]


def build_trial(processor, filler, k, key, start, before_chars, after_chars) -> Trial:
    before = filler_text(filler, start, before_chars)
    after = filler_text(filler, start + before_chars, after_chars)
    prompt, key_end = passkey_prompt(before, key, after)
    return Trial(k, key, prompt, key_end, start, before_chars, after_chars)


def random_key(rng: random.Random) -> str:
    return f"{rng.randrange(10**KEY_DIGITS):0{KEY_DIGITS}d}"


def make_trial(processor, filler: str, k: int, rng: random.Random, max_tries: int = 200) -> Trial:
    """A prompt whose key line ends k chunks before the open chunk.

    Drawn at random: the key, where in the filler the text starts, how much filler precedes the key line (one to two
    chunks' worth of characters) and how many tokens the open chunk holds. The filler after the key line is then
    sized, counting tokens with the processor's tokenizer, so that the prompt ends in the open chunk drawn."""
    if k < 1:
        raise ValueError(f"k={k}: the question after the key line needs more than the open chunk; use k >= 1")
    L = processor.chunk_size
    for _ in range(max_tries):
        key, start = random_key(rng), rng.randrange(len(filler))
        before_chars, open_tokens = rng.randrange(L, 2 * L), rng.randint(1, L)
        after_chars, target = 0, None
        for _ in range(64):
            trial = build_trial(processor, filler, k, key, start, before_chars, after_chars)
            total = len(processor.encode(trial.prompt))
            key_tokens = len(processor.encode(trial.prompt[: trial.key_end]))
            target = ((key_tokens - 1) // L + k) * L + open_tokens
            if total == target or (total > target and after_chars == 0):
                break
            after_chars = max(0, after_chars + target - total)
        if total == target and chunks_back(processor, trial.prompt, trial.key_end) == k:
            return trial
    raise RuntimeError(f"no prompt with the key line {k} chunks back after {max_tries} draws")


def same_layout_trial(processor, trial: Trial, filler: str, rng: random.Random, max_tries: int = 50):
    """Another prompt of the same layout as `trial` (same lengths, same closed chunks sketched), with another key
    and another part of the filler; None if none is found."""
    reference = processor(text=trial.prompt)
    for _ in range(max_tries):
        key = random_key(rng)
        if key == trial.key:
            continue
        other = build_trial(processor, filler, trial.k, key, rng.randrange(len(filler)), trial.before_chars,
                            trial.after_chars)
        inputs = processor(text=other.prompt)
        same = (inputs["input_ids"].shape == reference["input_ids"].shape
                and torch.equal(inputs["input_ids"] == processor.sketch_token_id,
                                reference["input_ids"] == processor.sketch_token_id))
        if same:
            return other, inputs["pixel_values"]
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def vist2_answer(model, processor, prompt: str, max_new_tokens: int, pixel_values=None) -> str:
    inputs = processor(text=prompt).to(model.device)
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values.to(model.device)
    out = model.generate(**inputs, processor=processor, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def text_only_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, split_special_tokens=True, return_tensors="pt")["input_ids"]
    ids = ids.to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def score(answers: list[tuple[str, str]], other_keys: list[str] | None = None, examples: int = 3) -> dict:
    """`answers`: (key, generated text) pairs -> accuracy, per-digit accuracy and a few examples."""
    result = {
        "n": len(answers),
        "accuracy": sum(is_correct(text, key) for key, text in answers) / len(answers),
        "digit_accuracy": sum(digits_correct(text, key) for key, text in answers) / (KEY_DIGITS * len(answers)),
    }
    if other_keys is not None:
        result["answers_other_key"] = sum(is_correct(text, other) for (_, text), other in zip(answers, other_keys)) / len(answers)
    result["examples"] = [{"key": key, "generated": text} for key, text in answers[:examples]]
    return result


def corpus_filler(heldout: bool = True) -> str:
    """The held-out documents of the offline demo corpus (the training ones with `heldout=False`), joined by blank
    lines; those with a character outside ASCII (one of 88 held-out) are left out, so that every closed chunk is
    sketched whatever the model's font (Pillow's built-in one draws ASCII only) and every model gets the same prompts."""
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "tokenization" / "build_corpus.py")
    build_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_corpus)
    train, held = build_corpus.split_documents(build_corpus.build_corpus())
    return "\n\n".join(doc for doc in (held if heldout else train) if doc.isascii())


CONDITIONS = {"vist2": "VIST2", "vist2_other_sketches": "VIST2, another prompt's sketches (control)",
              "text_only": "text-only, full text"}


def markdown_table(results: dict) -> str:
    """The results as a page: the command, the machine, and accuracy (per-digit accuracy) by k and condition."""
    names = [c for c in CONDITIONS if any(c in row for row in results["by_k"].values())]
    lines = [f"# Passkey recall: {results['model']}", "", "```", results["command"], "```", "",
             f"{results['date']}, {results['machine']}; {results['seconds']['total']:.0f} s in all. "
             f"{results['keys_per_k']} keys per k, seed {results['seed']}, filler: {results['filler']} "
             f"({results['filler_chars']} characters). Protocol: the docstring of `examples/passkey.py`. Chance: "
             "0.001 % for the whole key, 10 % per digit.", "",
             "| k | prompt tokens (mean) | " + " | ".join(CONDITIONS[c] for c in names) +
             " | VIST2, answer fits the open chunk / closes it (keys) |",
             "| --- | --- |" + " --- |" * (len(names) + 1)]
    for k, row in results["by_k"].items():
        cells = [f"{row[c]['accuracy']:.0%} ({row[c]['digit_accuracy']:.0%})" if c in row else "" for c in names]
        split = row.get("vist2_by_answer", {})
        cells.append(" / ".join(f"{split[c]['accuracy']:.0%} ({split[c]['n']})" if c in split else "-"
                                for c in ("fits_open_chunk", "closes_open_chunk")))
        lines.append(f"| {k} | {row['prompt_tokens_mean']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO), help="VIST2 model folder or Hub id (default: this repository)")
    parser.add_argument("--text-only", help="a causal LM with the same tokenizer, given the prompt as text (reference)")
    parser.add_argument("--filler", help="text file the key is hidden in (default: the held-out demo corpus)")
    parser.add_argument("--k", type=int, nargs="+", default=list(KS), help="chunks back from the open chunk")
    parser.add_argument("--keys", type=int, default=100, help="prompts (keys) per k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--no-control", action="store_true", help="skip the other-sketches control")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--markdown", help="also write them as a table to this file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    text_only = tokenizer = None
    if args.text_only:
        text_only = AutoModelForCausalLM.from_pretrained(args.text_only).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.text_only)
    filler = Path(args.filler).read_text(encoding="utf-8") if args.filler else corpus_filler()
    if not filler.strip():
        raise ValueError("--filler: the file is empty. Fix: pass a text file with some prose in it")

    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "protocol": "key line 'The pass key is NNNNN. Remember it. NNNNN is the pass key.' in filler text; prompt "
                    f"ends with {QUESTION!r}; correct = greedy output is the 5 digits after any whitespace. k = index "
                    "of the open chunk minus index of the chunk holding the key line's last token.",
        "chance": {"accuracy": 10.0**-KEY_DIGITS, "digit_accuracy": 0.1},
        "model": args.model, "text_only": args.text_only, "filler": args.filler or "held-out demo corpus",
        "filler_chars": len(filler), "chunk_size": processor.chunk_size,
        "visual_tokens_per_chunk": processor.visual_tokens_per_chunk,
        "keys_per_k": args.keys, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
        "machine": f"{platform.machine()}, python {platform.python_version()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} torch thread(s)",
        "by_k": {},
    }
    seconds = {"vist2": 0.0, "vist2_other_sketches": 0.0, "text_only": 0.0}
    for k in args.k:
        rng, control_rng = random.Random(f"passkey-{args.seed}-{k}"), random.Random(f"control-{args.seed}-{k}")
        trials = [make_trial(processor, filler, k, rng) for _ in range(args.keys)]
        answers, control, other_keys, reference = [], [], [], []
        kept_as_text = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a chunk the font cannot draw is kept as text: counted below
            for trial in trials:
                kept_as_text += int(processor(text=trial.prompt)["chunks_kept_as_text"].sum())
                t = time.time()
                answers.append((trial.key, vist2_answer(model, processor, trial.prompt, args.max_new_tokens)))
                seconds["vist2"] += time.time() - t
                other = None if args.no_control else same_layout_trial(processor, trial, filler, control_rng)
                if other is not None:
                    t = time.time()
                    text = vist2_answer(model, processor, trial.prompt, args.max_new_tokens, pixel_values=other[1])
                    seconds["vist2_other_sketches"] += time.time() - t
                    control.append((trial.key, text))
                    other_keys.append(other[0].key)
                if text_only is not None:
                    t = time.time()
                    reference.append((trial.key, text_only_answer(text_only, tokenizer, trial.prompt, args.max_new_tokens)))
                    seconds["text_only"] += time.time() - t
        tokens = [len(processor.encode(trial.prompt)) for trial in trials]
        closes = [answer_closes_chunk(processor, trial) for trial in trials]
        row = {"prompt_tokens_mean": round(statistics.mean(tokens), 1), "prompt_tokens_max": max(tokens),
               "chunks_kept_as_text": kept_as_text, "vist2": score(answers),
               # VIST2 apart for the keys whose answer closes the open chunk while it is written, and the others
               "vist2_by_answer": {name: score([a for a, c in zip(answers, closes) if c == flag])
                                   for name, flag in (("fits_open_chunk", False), ("closes_open_chunk", True))
                                   if flag in closes}}
        if control:
            row["vist2_other_sketches"] = score(control, other_keys)
        if reference:
            row["text_only"] = score(reference)
        results["by_k"][str(k)] = row
        print(f"k={k:>3} ({row['prompt_tokens_mean']:.0f} tokens): " + ", ".join(
            f"{name} {row[name]['accuracy']:.0%} (digits {row[name]['digit_accuracy']:.0%})"
            for name in ("vist2", "vist2_other_sketches", "text_only") if name in row), flush=True)
    results["seconds"] = {name: round(s, 1) for name, s in seconds.items() if s} | {"total": round(time.time() - began, 1)}
    results["command"] = "python examples/passkey.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(results))
    return results


if __name__ == "__main__":
    main()
