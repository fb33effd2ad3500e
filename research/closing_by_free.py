"""Passkey answers that close the open chunk, counted by how many tokens the prompt's open chunk had left.

    python research/closing_by_free.py MODEL 20 1      # 20 closing prompts at each of k = 2, 4, 8; 1 thread (2 min)

With 1 token left, the answer's space fills the chunk and every digit is written in the next one; with none left
(shown as the chunk size) the prompt ends on a chunk's edge. Prompts are `examples/passkey.py`'s (`make_trial`,
held-out filler, a fixed seed), greedy, scored by its rule (`is_correct`).
"""

import collections
import random
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import passkey  # noqa: E402


def main(model_path: str, per_k: int, threads: int = 2):
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    filler, rng, L = passkey.corpus_filler(), random.Random(2026), processor.chunk_size
    recalled = collections.defaultdict(list)
    warnings.simplefilter("ignore")
    for k in (2, 4, 8):
        found = 0
        while found < per_k:
            trial = passkey.make_trial(processor, filler, k, rng)
            if not passkey.answer_closes_chunk(processor, trial):
                continue
            found += 1
            left = L - len(processor.encode(trial.prompt)) % L
            answer = passkey.vist2_answer(model, processor, trial.prompt, 8)
            recalled[left].append(passkey.is_correct(answer, trial.key))
    print(model_path, {left: f"{sum(v)}/{len(v)}" for left, v in sorted(recalled.items())},
          "all", f"{sum(map(sum, recalled.values()))}/{sum(map(len, recalled.values()))}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2)
