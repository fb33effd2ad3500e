"""Fidelity of the demo VIST2 on held-out text, with the wrong-image control.

    python research/evaluate_demo.py --model . --text-only research/text-only-baseline --window-chunks 64 --threads 2 \
        --json research/eval_results.json

Measures, on held-out windows `c_1 c_2` of the stdlib-docstring corpus (documents never trained on):
(a) read-back: greedy reconstruction of c_1 from its own sketch V_1 (layout `c_1 V_1`, read-back visibility; the
    first token of c_1 is given because, under the layout contract, it is predicted before anything sees V_1);
    character accuracy = 1 - Levenshtein(decoded, truth) / len(truth) on the text after the first token; also the
    teacher-forced token accuracy.
(b) optical LM: perplexity of c_2[1:] given only V_1 (read-back off), vs the same VIST2 with no preceding context
    (c_2 alone), vs the same-size text-only Qwen3 given c_1 as text (and with no context); also by bands of c_2's
    bytes, since the first ones finish the word that c_1 broke off and depend most on the context.
(c) control: (a) and (b) again with V_1 replaced by the sketch of another held-out chunk.
(d) with --window-chunks N: perplexity over held-out windows of N chunks, every chunk after the first predicted from
    the sketches of all the chunks before it (the training layout `c_1 V_1 ... c_N`, read-back off: what generation
    sees), against the text-only model given the whole window as text, and against VIST2 given every sketch of
    another window (control); bytes 2..L of chunks 2..N, also by how many chunks precede.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "research"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

from quickstart import char_accuracy  # noqa: E402  (the quickstart's measure: both report one number)


def heldout_samples(processor, config, tokenizer, n=None):
    """The first `n` held-out windows that can be sketched (all of them when `n` is None)."""
    import train_demo as td

    windows = td.corpus_windows(tokenizer, "heldout")
    samples = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for window in windows:
            sample = td.make_sample(processor, window)
            if sample is not None:
                sample["window"] = [int(t) for t in window]
                samples.append(sample)
            if len(samples) == n:
                break
    return samples


def latin1_samples(processor, samples, L, wide_share=0.15):
    """`samples` with c_1's characters replaced by random ones over its layout, some of them the Latin-1 characters of
    several bytes that the demo's font draws (`train_demo.with_corpus_layout`): reading beyond ASCII, without a prior
    to guess from. Only the rows whose c_1 the font draws and holds such a character (none with an ASCII-only font)."""
    import random

    import train_demo as td

    latin1 = td.random_chars_layout(processor.tokenizer, wide_share)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, s in enumerate(samples):
            c1 = latin1(s["window"][:L], random.Random(i))
            window = c1 + s["window"][L:]
            sample = td.make_sample(processor, window)
            if sample is not None and not processor.chunk_text(c1).isascii():
                out.append(dict(sample, window=window))
    return out


def sketches(processor, samples):
    return processor.pixel_values([s["sketches"][0] for s in samples])


@torch.no_grad()
def read_back_logits(model, processor, text, pixels):
    """`(n, len(text), vocab)`: next-token logits of `text` read back from its sketches (layout `c_1 V_1`, read-back
    visibility), the placeholder token never guessed."""
    n, sketch_id = text.shape[0], processor.sketch_token_id
    ids = torch.cat([text, torch.full((n, processor.visual_tokens_per_chunk), sketch_id)], 1)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), chunk_ids=torch.ones_like(ids),
                pixel_values=pixels, read_back=torch.ones(n, dtype=torch.bool))
    logits = out.logits[:, : text.shape[1]].float()
    logits[..., sketch_id] = -float("inf")
    return logits


def write_results(results, script, argv, path=None):
    """Print the results as JSON, with the command that produced them, and write them to `path` if given."""
    results["command"] = f"python research/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


@torch.no_grad()
def read_back(model, processor, samples, pixels, L):
    """Greedy reconstruction of c_1 from V_1: mean char accuracy (counting the text as drawn, a special token with a
    glyph as one character; and counting special tokens by their names), teacher-forced token accuracy, examples,
    mean char accuracy by the number of newlines in the chunk: 0, 1, 2+, since a chunk that wraps is harder to read,
    and the 8 worst read-backs with their teacher-forced accuracy: where the errors are."""
    truth = torch.tensor([s["window"][:L] for s in samples])

    def forward(text):
        return read_back_logits(model, processor, text, pixels)

    forced = forward(truth).argmax(-1)[:, :-1]
    token_acc = (forced == truth[:, 1:]).float().mean().item()
    decoded = truth[:, :1]
    for _ in range(L - 1):
        decoded = torch.cat([decoded, forward(decoded)[:, -1].argmax(-1, keepdim=True)], 1)
    def by_names(ids):
        return processor.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    accs, accs_by_names, examples, by_newlines = [], [], [], {}
    for row, ref in zip(decoded.tolist(), truth.tolist()):
        chunk = processor.chunk_text(ref)
        pred_text, ref_text = processor.chunk_text(row[1:]), processor.chunk_text(ref[1:])
        accs.append(char_accuracy(pred_text, ref_text))
        accs_by_names.append(char_accuracy(by_names(row[1:]), by_names(ref[1:])))
        newlines = chunk.count("\n")
        by_newlines.setdefault("2+" if newlines >= 2 else str(newlines), []).append(accs[-1])
        if len(examples) < 3:
            examples.append({"truth": chunk, "decoded": processor.chunk_text(row)})
    by_newlines = {k: {"n": len(v), "char_accuracy": float(np.mean(v))} for k, v in sorted(by_newlines.items())}
    forced_by_row = (forced == truth[:, 1:]).float().mean(1).tolist()
    worst = [{"truth": processor.chunk_text(truth[i].tolist()), "decoded": processor.chunk_text(decoded[i].tolist()),
              "char_accuracy": accs[i], "token_accuracy_teacher_forced": forced_by_row[i]}
             for i in np.argsort(accs, kind="stable")[:8]]
    return {"char_accuracy": float(np.mean(accs)),
            "char_accuracy_special_tokens_as_names": float(np.mean(accs_by_names)),
            "token_accuracy_teacher_forced": token_acc, "char_accuracy_by_newlines_in_chunk": by_newlines,
            "examples": examples, "worst": worst}


def chunk_tokens(samples, L, k):
    """`(n, L)`: chunk c_k (k = 1 or 2) of each sample's window."""
    return torch.tensor([s["window"][(k - 1) * L : k * L] for s in samples])


def nll_of(logprobs, chunk):
    """`(n, L - 1)`: negative log-likelihood of `chunk[:, 1:]` under next-token log-probabilities at c_2's places."""
    return -logprobs.gather(-1, chunk[:, 1:, None])[..., 0]


@torch.no_grad()
def vist2_logprobs(model, processor, samples, pixels, L, context=True):
    """`(n, L - 1, vocab)`: next-token log-probabilities at c_2's bytes 2..L given V_1 only (read-back off), or given
    nothing (c_2 alone)."""
    m, sketch_id = processor.visual_tokens_per_chunk, processor.sketch_token_id
    c1, c2 = chunk_tokens(samples, L, 1), chunk_tokens(samples, L, 2)
    n = c1.shape[0]
    if context:
        ids = torch.cat([c1, torch.full((n, m), sketch_id), c2], 1)
        chunks = torch.cat([torch.ones(n, L + m, dtype=torch.long), torch.full((n, L), 2)], 1)
    else:
        ids, chunks, pixels = c2, torch.ones_like(c2), None
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), chunk_ids=chunks, pixel_values=pixels,
                   read_back=torch.zeros(n, dtype=torch.bool)).logits
    return torch.log_softmax(logits[:, -L:-1].float(), -1)


@torch.no_grad()
def text_only_logprobs(model, samples, L, context=True):
    c2 = chunk_tokens(samples, L, 2)
    ids = torch.cat([chunk_tokens(samples, L, 1), c2], 1) if context else c2
    return torch.log_softmax(model(input_ids=ids).logits[:, -L:-1].float(), -1)


def read_back_leak(nll_of_c1, samples, L):
    """`(n, L - 1)`: the probability given at c_2's byte j to c_1's byte j (NaN where the two are equal), what reading
    the sketch back would write there. Under the layout contract a chunk read back from its sketch (`P V_1 c_1`) and
    the chunk after it (`P V_1 c_2`) see the same sketch at the same positions, so only the bytes written so far tell
    the two apart."""
    differs = chunk_tokens(samples, L, 1)[:, 1:] != chunk_tokens(samples, L, 2)[:, 1:]
    return torch.where(differs, (-nll_of_c1).exp(), torch.nan)


def same_tokenizer(tokenizer, folder) -> bool:
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(folder)
    return tokenizer.backend_tokenizer.to_str() == other.backend_tokenizer.to_str()


def batched(fn, samples, batch):
    return torch.cat([fn(samples[i : i + batch]) for i in range(0, len(samples), batch)])


def ratio_interval(nll, nll_control, level=0.95, resamples=2000, seed=0):
    """A percentile bootstrap interval of the perplexity ratio `exp(mean nll - mean nll_control)` over windows: both
    `(n, L - 1)` nlls score the same windows, so windows are resampled in pairs and what the two models share (a hard
    window is hard for both) drops out of the spread."""
    per_window = (nll - nll_control).double().mean(1)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(per_window), (resamples, len(per_window)), generator=generator)
    ratios = per_window[picks].mean(1).exp()
    tail = (1 - level) / 2
    return [ratios.quantile(tail).item(), ratios.quantile(1 - tail).item()]


# Bands of c_2's bytes (1-based) whose perplexity `evaluate` reports apart: the first ones finish the word that c_1
# broke off.
BYTE_BANDS = ((2, 4), (5, 8), (9, 16), (17, 32))


# Bands of a long window's chunks (1-based) whose perplexity `long_windows` reports apart: how much context precedes.
CHUNK_BANDS = ((2, 2), (3, 8), (9, 32), (33, 64), (65, 256))


@torch.no_grad()
def long_window_nll(model, processor, windows, pixels=None):
    """`(n, N * L)`: the nll of each window token under VIST2 in the training layout with read-back off (NaN where
    nothing predicts it from text before it: a chunk's first token). `pixels` replaces the windows' sketches."""
    batch = processor.collate([processor.encode_sample([], list(map(int, w)), keep_closed_text=True) for w in windows])
    if pixels is not None:
        batch["pixel_values"] = pixels
    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], chunk_ids=batch["chunk_ids"],
                   pixel_values=batch["pixel_values"], read_back=torch.zeros(len(ids), dtype=torch.bool)).logits
    logprobs = torch.log_softmax(logits.float(), -1)
    text = (ids != processor.sketch_token_id) & (batch["attention_mask"] == 1)
    nll = torch.full((len(windows), len(windows[0])), float("nan"))
    for row in range(len(windows)):
        places = text[row].nonzero()[:, 0]  # the window's tokens, in order
        after_text = torch.zeros_like(places, dtype=torch.bool)
        after_text[1:] = text[row, places[1:] - 1]
        target = ids[row, places[1:]]
        scores = -logprobs[row, places[1:] - 1].gather(-1, target[:, None])[:, 0]
        nll[row, 1:] = torch.where(after_text[1:], scores, torch.nan)
    return nll


@torch.no_grad()
def text_only_window_nll(model, windows):
    """`(n, N * L)`: the nll of each window token given the window's text before it (NaN for the first)."""
    ids = torch.tensor(np.stack(windows), dtype=torch.long)
    logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    nll = -logprobs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([torch.full((len(ids), 1), float("nan")), nll], 1)


def long_windows(model, processor, baseline, window_chunks, limit=None):
    """(d): perplexities over held-out windows of `window_chunks` chunks; the measured tokens are bytes 2..L of
    chunks 2..N (a chunk's first byte is predicted before any of its text, from the sketch of the chunk before)."""
    import train_demo as td

    L = processor.chunk_size
    windows = list(td.corpus_windows(processor.tokenizer, "heldout", window_chunks))[:limit]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoded = [processor.encode_sample([], list(map(int, w)), keep_closed_text=True) for w in windows]
        nll = {"vist2_visual_context": torch.cat([long_window_nll(model, processor, [w]) for w in windows])}
        # The control: each window with the sketches of the next one (both need all N - 1 chunks sketched).
        control = []
        for i, w in enumerate(windows):
            other = encoded[(i + 1) % len(windows)]
            if encoded[i]["chunks_kept_as_text"] or other["chunks_kept_as_text"]:
                control.append(torch.full((1, len(w)), float("nan")))
            else:
                control.append(long_window_nll(model, processor, [w], processor.pixel_values(other["sketches"])))
        nll["vist2_other_windows_sketches"] = torch.cat(control)
    if baseline is not None:
        nll["text_only_text_context"] = torch.cat([text_only_window_nll(baseline, [w]) for w in windows])
    measured = torch.zeros(window_chunks * L, dtype=torch.bool)
    measured[L:] = True
    measured[::L] = False

    def perplexity(values, columns):
        return math.exp(values[:, columns].nanmean().item())

    result = {"window_chunks": window_chunks, "windows": len(windows),
              "chunks_kept_as_text": sum(int(e["chunks_kept_as_text"]) for e in encoded),
              "perplexity": {k: perplexity(v, measured) for k, v in nll.items()}}
    if baseline is not None:
        vist2, text_only = nll["vist2_visual_context"][:, measured], nll["text_only_text_context"][:, measured]
        both = ~(vist2.isnan() | text_only.isnan()).any(0)
        result["ratio_vist2_to_text_only"] = result["perplexity"]["vist2_visual_context"] / result["perplexity"][
            "text_only_text_context"]
        result["ratio_vist2_to_text_only_95ci"] = ratio_interval(vist2[:, both], text_only[:, both])
    result["perplexity_by_chunk"] = {}
    for a, b in CHUNK_BANDS:
        if a > window_chunks:
            break
        columns = measured.clone()
        columns[: (a - 1) * L] = False
        columns[min(b, window_chunks) * L :] = False
        result["perplexity_by_chunk"][f"chunks {a}-{min(b, window_chunks)}"] = {
            k: perplexity(v, columns) for k, v in nll.items()}
    return result


def evaluate(model_dir, text_only_dir=None, n_ppl=None, n_readback=256, batch=32, seed=0, window_chunks=None):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    config, L = model.config, model.config.chunk_size
    samples = heldout_samples(processor, config, processor.tokenizer, n_ppl and max(n_ppl, n_readback))
    rng = np.random.default_rng(seed)
    # The control: every sample gets the sketch of another held-out chunk (a derangement: a rotation).
    shift = int(rng.integers(1, len(samples)))
    wrong = [dict(s, sketches=samples[(i + shift) % len(samples)]["sketches"]) for i, s in enumerate(samples)]
    results = {"model": str(model_dir), "heldout_windows": len(samples), "chunk_size": L,
               "compression_ratio": config.compression_ratio}
    start = time.time()
    rb = samples[:n_readback]
    right = read_back(model, processor, rb, sketches(processor, rb), L)
    other = read_back(model, processor, wrong[:n_readback], sketches(processor, wrong[:n_readback]), L)
    results["read_back"] = {**right, "wrong_image_char_accuracy": other["char_accuracy"],
                            "wrong_image_token_accuracy_teacher_forced": other["token_accuracy_teacher_forced"],
                            "n": len(rb)}
    latin1 = latin1_samples(processor, rb, L)
    if latin1:
        right = read_back(model, processor, latin1, sketches(processor, latin1), L)
        shifted = latin1[1:] + latin1[:1]
        other = read_back(model, processor, latin1, sketches(processor, shifted), L)
        results["read_back_latin1"] = {"char_accuracy": right["char_accuracy"],
                                       "token_accuracy_teacher_forced": right["token_accuracy_teacher_forced"],
                                       "wrong_image_char_accuracy": other["char_accuracy"], "n": len(latin1),
                                       "non_ascii_share": float(np.mean([not c.isascii() for c in "".join(
                                           processor.chunk_text(s["window"][:L]) for s in latin1)])),
                                       "examples": right["examples"], "worst": right["worst"][:4]}
    pp = samples[:n_ppl]
    logprobs = {
        "vist2_visual_context": batched(
            lambda s: vist2_logprobs(model, processor, s, sketches(processor, s), L), pp, batch),
        "vist2_wrong_image": batched(
            lambda s: vist2_logprobs(model, processor, s, sketches(processor, s), L), wrong[:n_ppl], batch),
        "vist2_no_context": batched(lambda s: vist2_logprobs(model, processor, s, None, L, context=False), pp, batch),
    }
    if text_only_dir:
        baseline = AutoModelForCausalLM.from_pretrained(text_only_dir).eval()
        if not same_tokenizer(processor.tokenizer, text_only_dir):
            raise ValueError(f"{text_only_dir} was trained with another tokenizer than {model_dir}: its perplexities "
                             "would be over other tokens. Train the control with the reader's --tokenizer.")
        logprobs["text_only_text_context"] = batched(lambda s: text_only_logprobs(baseline, s, L), pp, batch)
        logprobs["text_only_no_context"] = batched(
            lambda s: text_only_logprobs(baseline, s, L, context=False), pp, batch)
    c1, c2 = chunk_tokens(pp, L, 1), chunk_tokens(pp, L, 2)  # the wrong-image samples: same windows, other sketches
    nll = {k: nll_of(v, c2) for k, v in logprobs.items()}
    perplexity = results["perplexity_c2"] = {k: math.exp(v.mean().item()) for k, v in nll.items()}
    if text_only_dir:
        ratio = perplexity["vist2_visual_context"] / perplexity["text_only_text_context"]
        perplexity["ratio_vist2_to_text_only"] = ratio
        perplexity["ratio_vist2_to_text_only_95ci"] = ratio_interval(nll["vist2_visual_context"],
                                                                     nll["text_only_text_context"])
    # column j of the nll holds byte j + 2 of c_2
    results["perplexity_c2_by_byte"] = {f"bytes {a}-{b}": {k: math.exp(v[:, a - 2 : b - 1].mean().item())
                                                           for k, v in nll.items()} for a, b in BYTE_BANDS}
    # the text-only model has no sketch to read back: its value is the chance level
    leak = {k: read_back_leak(nll_of(logprobs[k], c1), pp, L)
            for k in ("vist2_visual_context", "text_only_text_context") if k in logprobs}
    results["probability_of_c1_byte_at_c2_byte"] = {f"bytes {a}-{b}": {k: v[:, a - 2 : b - 1].nanmean().item()
                                                                        for k, v in leak.items()} for a, b in BYTE_BANDS}
    results["n_ppl"] = len(pp)
    if window_chunks:
        results["long_windows"] = long_windows(model, processor, baseline if text_only_dir else None, window_chunks)
    results["eval_seconds"] = round(time.time() - start, 1)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=".", help="the VIST2 checkpoint (default: the repository root, run from there)")
    parser.add_argument("--text-only", default="research/text-only-baseline",
                        help="the same-size text-only control, with the same tokenizer")
    parser.add_argument("--n-ppl", type=int, default=None,
                        help="held-out windows scored for perplexity (default: all of them, 423)")
    parser.add_argument("--n-readback", type=int, default=256,
                        help="held-out chunks read back")
    parser.add_argument("--window-chunks", type=int, default=None,
                        help="also the perplexity over held-out windows of this many chunks (d)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = evaluate(args.model, args.text_only or None, args.n_ppl, args.n_readback, window_chunks=args.window_chunks)
    write_results(results, "evaluate_demo.py", argv, args.json)


if __name__ == "__main__":
    main()
