"""VIST2 in one minute: compress a long text into sketches, read one back, recall a pass key from far back, keep
writing with a small cache.

    python examples/quickstart.py                      # the demo model: this repository's root
    python examples/quickstart.py --model some/folder --max-new-tokens 64 --write-context 8 --recall-keys 0
"""

import argparse
import random
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from vist2.training import read_back_chunk

import passkey
from generate import cache_bytes, text_only_cache_bytes

ROOT = Path(__file__).resolve().parent.parent


def char_accuracy(predicted: str, reference: str) -> float:
    """1 - edit distance / reference length, floored at 0 (1.0 = identical)."""
    previous = list(range(len(reference) + 1))
    for i, a in enumerate(predicted, 1):
        current = [i]
        for j, b in enumerate(reference, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b)))
        previous = current
    return max(0.0, 1.0 - previous[-1] / len(reference)) if reference else float(not predicted)


def closed_chunks(ids, chunk_size):
    """The chunks of `ids` that are closed: all full ones but one, the open chunk, which holds at least one token."""
    return [ids[i : i + chunk_size] for i in range(0, (len(ids) - 1) // chunk_size * chunk_size, chunk_size)]


def sketch_sheet(images, columns=4) -> Image.Image:
    """The sketches the model read, side by side, with a one-pixel grey rule between them."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("L", (columns * (w + 1) - 1, rows * (h + 1) - 1), 128)
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * (w + 1), (i // columns) * (h + 1)))
    return sheet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT))
    parser.add_argument("--text", default=str(ROOT / "examples" / "data" / "long_text.txt"))
    parser.add_argument("--out", default="quickstart_sketches.png", help="where to save the sketches it read")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--write-context", type=int, default=64, help="closed chunks the continuation starts from")
    parser.add_argument("--recall-k", type=int, default=64, help="chunks between the pass key and the question")
    parser.add_argument("--recall-keys", type=int, default=10, help="pass keys to hide and ask for")
    parser.add_argument("--greedy", action="store_true", help="write greedily instead of sampling (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    text = Path(args.text).read_text(encoding="utf-8")

    # 1. Compress: every closed chunk becomes a sketch and, inside the model, a few visual tokens.
    inputs = processor(text=text)
    stream = processor.encode(text)
    chunk_size = processor.chunk_size
    closed = closed_chunks(stream, chunk_size)
    print(f"{len(text)} characters -> {len(stream)} tokens -> {len(closed)} closed chunks of {chunk_size} tokens "
          f"({int(inputs['chunks_kept_as_text'][0])} kept as text) + an open chunk of {len(stream) - len(closed) * chunk_size}")
    print(f"the model's input: {inputs['input_ids'].shape[1]} positions instead of {len(stream)}")

    # 2. The sketches it read.
    sketches = [processor.render(processor.chunk_text(chunk)) for chunk in closed[:8]]
    sketch_sheet(sketches).save(args.out)
    print(f"saved the first {len(sketches)} sketches to {args.out}")

    # 3. Read one chunk back from its sketch alone.
    chunk = next(c for c, r in zip(closed, processor.last_report[0]) if r.ok)
    original = processor.chunk_text(chunk)
    read = processor.chunk_text(read_back_chunk(model, processor, chunk))
    accuracy = char_accuracy(read, original)
    # The control: the same read-back from another chunk's sketch. A model that reads does far worse here.
    other = processor.pixel_values([processor.sketch_chunks([closed[-1]])[0][0]])
    control = processor.chunk_text(read_back_chunk(model, processor, chunk, pixel_values=other))
    control_accuracy = char_accuracy(control, original)
    print(f"\n--- a chunk ---\n{original}\n--- read back from its sketch (character accuracy {accuracy:.0%}; "
          f"from another chunk's sketch: {control_accuracy:.0%}) ---\n{read}")

    # 4. Beyond ASCII: the demo's font (DejaVu Sans Mono, in the model's folder) draws Latin-1 and typeset punctuation,
    # so these chunks are compressed and read back like any other; a chunk holding a character a model's font cannot
    # draw is kept as text, never dropped, and reported.
    typeset = ("« Déjà vu », dit-elle — l’été à Montréal coûte 12 € ; © 2026 Zoë Ångström, “naïve” façade… ") * 4
    latin = processor(text=typeset)
    chunks, kept = closed_chunks(processor.encode(typeset), chunk_size), int(latin["chunks_kept_as_text"][0])
    print(f"\n--- beyond ASCII: {len(typeset)} characters -> {len(chunks)} closed chunks, {kept} kept as text "
          f"(characters the font cannot draw: {latin['undrawable_characters'][0]!r}) ---")
    drawn = [c for c, r in zip(chunks, processor.last_report[0], strict=True) if r.ok]
    if drawn:
        reads = [processor.chunk_text(read_back_chunk(model, processor, c)) for c in drawn]
        accuracy = sum(char_accuracy(r, processor.chunk_text(c)) for r, c in zip(reads, drawn)) / len(drawn)
        print(f"{processor.chunk_text(drawn[0])}\n--- read back from its sketch (character accuracy over the "
              f"{len(drawn)} sketched chunks: {accuracy:.0%}) ---\n{reads[0]}")

    # 5. Recall: pass keys hidden in the text, `--recall-k` chunks before the question, are then in sketches only.
    # The control asks the same prompts with another text's sketches (same layout, another key): it cannot know them.
    rng = random.Random(args.seed)
    right = control_right = controls = 0
    for i in range(args.recall_keys):
        trial = passkey.make_trial(processor, text, args.recall_k, rng)
        answer = passkey.vist2_answer(model, processor, trial.prompt, max_new_tokens=8)
        other = passkey.same_layout_trial(processor, trial, text, rng)
        control = passkey.vist2_answer(model, processor, trial.prompt, 8, pixel_values=other[1]) if other else None
        right += passkey.is_correct(answer, trial.key)
        controls += other is not None  # (no prompt of the same layout found: no control for this key)
        control_right += other is not None and passkey.is_correct(control, trial.key)
        if i == 0:
            print(f"\n--- recall: {passkey.key_line(trial.key)!r} hidden {trial.k} chunks "
                  f"({len(trial.prompt) - trial.key_end} characters) before {passkey.QUESTION!r} ---\n"
                  f"VIST2 answers {answer!r}; with another text's sketches: "
                  f"{'(none of the same layout)' if control is None else repr(control)}")
    print(f"keys recalled from {args.recall_k} chunks back: {right} of {args.recall_keys}; "
          f"with another text's sketches: {control_right} of {controls}")

    # 6. Keep writing: each chunk that fills up is compressed on the fly. The demo model was trained on windows of
    # at most 64 chunks, so it writes from the last 64: the whole text puts positions in front of it that it never
    # saw (research/README.md).
    start = (len(closed) - args.write_context) * chunk_size
    recent = processor(text=processor.decode(stream[max(start, 0) :]))
    # Sampled, seeded: greedy decoding from the small byte-level demo model soon settles into a run of spaces (the
    # indentation of docstrings is its most likely continuation).
    torch.manual_seed(args.seed)
    sampling = {} if args.greedy else {"temperature": 0.7, "top_p": 0.9}
    out = model.generate(**recent, processor=processor, max_new_tokens=args.max_new_tokens,
                         do_sample=not args.greedy, **sampling)
    new = out[0, recent["input_ids"].shape[1] :]
    print(f"\n--- continuation, from the last {args.write_context} closed chunks ---\n"
          f"{processor.decode(new, skip_special_tokens=True)}")

    # 7. What reading the whole text cost in KV cache (read() streams it into the cache, a group of chunks at a time).
    state = model.read(processor, text)
    total, cache = len(stream), state["cache"]
    vist2, text_only = cache_bytes(cache), text_only_cache_bytes(model, total)
    print(f"\n--- KV cache after reading {total} tokens ---\nVIST2: {cache.get_seq_length()} entries, "
          f"{vist2 / 1024:.0f} KiB; text-only backbone: {total} entries, {text_only / 1024:.0f} KiB "
          f"-> {vist2 / text_only:.1%}")


if __name__ == "__main__":
    main()
