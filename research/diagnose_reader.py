"""How the demo VIST2 finds its place in a sketch: two probes with the wrong-image control (demo/NOTES.md,
"Thirteenth attempt").

    python examples/diagnose_reader.py --model demo/vist2-demo --json demo/reader_diagnosis.json

On the held-out windows of `evaluate_demo.py`:
- blank visual tokens: how often each of a sketch's visual tokens sees no ink at all.
- tail: windows whose c_2 starts K bytes before the end of c_1 (`train_demo.with_overlap`), so that c_2's bytes 2..K
  are the last cells of V_1. Accuracy of the model's next-byte guess there (teacher-forced, read-back off) tells
  whether an open chunk reads the end of the sketch before it, which finishing a word broken off at a chunk boundary
  needs.
- read-back with random inputs: c_1 read back from V_1, teacher-forced, with a fraction of its input bytes replaced by
  random characters (labels true). If the reader found the next cell by its position in the chunk, it would read on;
  if by matching the bytes it wrote against the sketch, it reads no better than with another text's sketch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

import evaluate_demo as ev  # noqa: E402
import train_demo as td  # noqa: E402

TAIL_OVERLAPS = (2, 4, 8, 31, 32)  # 32: c_2 = c_1, read from the sketch's first cell; 31: one cell later
INPUT_NOISE = (0.0, 0.1, 0.5, 1.0)


def overlapping(samples, overlap: int):
    """The samples with c_2 starting `overlap` bytes before the end of c_1; c_1 and its sketch unchanged."""
    return [dict(s, window=td.with_overlap(np.array(s["window"]), overlap).tolist()) for s in samples]


def with_random_inputs(tokens: torch.Tensor, fraction: float, pool: list[int], generator: torch.Generator):
    """A copy of `(n, L)` tokens with each one after the first (which read-back is given) replaced, with probability
    `fraction`, by a random one of `pool`."""
    replace = torch.rand(tokens.shape, generator=generator) < fraction
    replace[:, 0] = False
    random_ids = torch.tensor(pool)[torch.randint(len(pool), tokens.shape, generator=generator)]
    return torch.where(replace, random_ids, tokens)


def blank_visual_tokens(sketches, token_size: int, background: int) -> list[float]:
    """For each visual token (row by row over the sketch), the fraction of `sketches` whose `token_size`-pixel square
    under it holds no ink: tokens a chunk never draws on carry nothing."""
    blank = []
    for image in map(np.asarray, sketches):
        h, w = image.shape[:2]
        squares = image.reshape(h // token_size, token_size, w // token_size, token_size, -1)
        blank.append((squares.min(axis=(1, 3, 4)) >= background).ravel())
    return np.mean(blank, axis=0).tolist()


@torch.no_grad()
def tail_accuracy(model, processor, samples, pixels, overlap: int, L: int) -> float:
    """Accuracy of the next-byte guess at c_2's bytes 2..overlap, the last cells of V_1, given V_1 and c_2's bytes
    before (read-back off)."""
    shifted = overlapping(samples, overlap)
    logprobs = ev.vist2_logprobs(model, processor, shifted, pixels, L)
    c2 = ev.chunk_tokens(shifted, L, 2)
    return (logprobs.argmax(-1) == c2[:, 1:])[:, : overlap - 1].float().mean().item()


@torch.no_grad()
def read_back_accuracy(model, processor, inputs, truth, pixels) -> torch.Tensor:
    """`(n, L - 1)`: whether the teacher-forced read-back of c_1 from V_1, fed `inputs`, guesses each of `truth[:, 1:]`."""
    return ev.read_back_logits(model, processor, inputs, pixels)[:, :-1].argmax(-1) == truth[:, 1:]


def by_bands(correct: torch.Tensor) -> dict:
    return {f"bytes {a}-{b}": correct[:, a - 2 : b - 1].float().mean().item() for a, b in ev.BYTE_BANDS}


def diagnose(model_dir, n=256, batch=64, seed=0):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    L = model.config.chunk_size
    samples = ev.heldout_samples(processor, model.config, processor.tokenizer, n)
    pixels = {"right_sketch": ev.sketches(processor, samples)}
    # each window gets the sketch of the window half the set away: another text, not the next lines of the same one
    pixels["wrong_sketch"] = pixels["right_sketch"].roll(len(samples) // 2, 0)
    parts = range(0, len(samples), batch)
    results = {"model": str(model_dir), "heldout_windows": len(samples)}
    token_size = model.config.vision_config.patch_size * model.config.merge_size
    results["blank_fraction_by_visual_token"] = blank_visual_tokens(
        [s["sketches"][0] for s in samples], token_size, model.config.background)
    results["tail_accuracy_by_overlap"] = {
        str(k): {name: float(np.mean([tail_accuracy(model, processor, samples[i : i + batch], p[i : i + batch], k, L)
                                      for i in parts]))
                 for name, p in pixels.items()} for k in TAIL_OVERLAPS}
    truth = ev.chunk_tokens(samples, L, 1)
    pool = td.random_token_pool(processor.tokenizer, "chars")
    results["read_back_accuracy_with_random_inputs"] = {}
    for fraction in INPUT_NOISE:
        inputs = with_random_inputs(truth, fraction, pool, torch.Generator().manual_seed(seed))
        results["read_back_accuracy_with_random_inputs"][str(fraction)] = {
            name: by_bands(torch.cat([read_back_accuracy(model, processor, inputs[i : i + batch],
                                                         truth[i : i + batch], p[i : i + batch]) for i in parts]))
            for name, p in pixels.items()}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo/vist2-demo")
    parser.add_argument("--n", type=int, default=256, help="held-out windows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ev.write_results(diagnose(args.model, args.n), "diagnose_reader.py", argv, args.json)


if __name__ == "__main__":
    main()
