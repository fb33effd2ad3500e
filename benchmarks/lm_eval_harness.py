"""lm-evaluation-harness against VIST2 through its standard `hf` model type, a client nobody here wrote: a passkey
task over long prompts, scored by generation (`generate_until`) and by log-likelihood (`multiple_choice`). The
harness tokenizes for itself and calls `model.generate(input_ids=...)` / `model(input_ids).logits` on plain ids;
VIST2 lays them out and renders every closed chunk itself.

    pip install -e ".[eval]"
    python benchmarks/lm_eval_harness.py                 # the demo checkpoint at the repository root, on CPU
    python benchmarks/lm_eval_harness.py --write-data    # rewrite benchmarks/harness_tasks/passkey.jsonl

The same evaluation from lm_eval's own command line, run at the repository root:

    lm_eval --model hf --model_args pretrained=.,trust_remote_code=True,max_length=4000 \
        --include_path benchmarks/harness_tasks --tasks vist2_passkey,vist2_passkey_choice --device cpu --batch_size 4

`max_length`: lm_eval cuts contexts to the backbone's `max_position_embeddings` raw tokens unless told otherwise, but
a closed chunk takes m positions, not L: `text_capacity` (4 000 for the demo checkpoint) is how many raw tokens a
sequence may reach with its compressed layout inside the backbone's positions.
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "benchmarks" / "harness_tasks"


def text_capacity(config) -> int:
    """Raw tokens a sequence (without a prefix) may reach while its compressed layout, at every step of writing, stays
    within the backbone's positions: closed chunks take m positions each, the open chunk up to L."""
    L, m = config.chunk_size, config.visual_tokens_per_chunk
    return (config.text_config.max_position_embeddings - L) // m * L + L


def passkey_docs(count=16, seed=0, filler_chars=900):
    """Prompts of about `filler_chars` characters of the demo's own kind of text with a 5-digit key stated near the
    start, asked for at the end; four candidate keys for the log-likelihood task."""
    lines = [line for line in (ROOT / "examples" / "data" / "long_text.txt").read_text().splitlines() if line.strip()]
    rng, docs = random.Random(seed), []
    for _ in range(count):
        keys = rng.sample(range(10000, 100000), 4)
        start = rng.randrange(len(lines) - 60)
        filler = "\n".join(lines[start : start + 60])[:filler_chars]
        prompt = f"The pass key is {keys[0]}. Remember it.\n{filler}\nWhat is the pass key? The pass key is"
        order = rng.sample(range(4), 4)
        docs.append({"prompt": prompt, "answer": str(keys[0]), "choices": [str(keys[i]) for i in order],
                     "label": order.index(0)})
    return docs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT))
    parser.add_argument("--tasks", default="vist2_passkey,vist2_passkey_choice")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--write-data", action="store_true", help="rewrite passkey.jsonl and exit")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.write_data:
        (TASKS / "passkey.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in passkey_docs()))
        return None

    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoConfig

    capacity = text_capacity(AutoConfig.from_pretrained(args.model, trust_remote_code=True))
    os.chdir(ROOT)  # the task files name their data relative to the repository root
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={args.model},trust_remote_code=True,max_length={capacity}",
        tasks=args.tasks.split(","),
        task_manager=TaskManager(include_path=str(TASKS)), device="cpu", batch_size=args.batch_size,
        limit=args.limit)
    seconds = time.perf_counter() - start
    summary = {"command": "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *(argv or sys.argv[1:])]),
               "seconds": round(seconds, 1), "lm_eval": lm_eval.__version__,
               "results": {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                           for task, metrics in results["results"].items()}}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
