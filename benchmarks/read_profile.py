"""Where `model.read(processor, text)` spends its time, by phase, with the demo checkpoint (the repository root).

    python benchmarks/read_profile.py --chars 62500 125000 --roots <before checkout> . --repeats 2 --name read-profile

One torch thread; times are the CPU time of that thread (`time.thread_time`), which the load of a shared machine
does not inflate as it does wall time. The text is the benchmark text (`common.benchmark_documents`, printable ASCII). Phases: tokenize =
`processor.encode`; render = `processor.sketch_chunks`; normalize = `processor.pixel_values`; encode =
`model.encode_sketches`; lm = the decoder's forward (attention mask included when the decoder builds it); mask = the
model's own attention-mask building; bookkeeping = the rest of `read` (layout, cache updates, copies). Also reports
the peak RSS above the RSS before the call and the KV cache it left. Writes `benchmarks/results/<name>.{json,md}`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

PHASES = ("tokenize", "render", "normalize", "encode", "mask", "lm", "bookkeeping")


def profile(model, processor, text: str) -> dict:
    phases = common.Phases(clock=time.thread_time)
    phases.wrap(processor, "encode", "tokenize")
    phases.wrap(processor, "sketch_chunks", "render")
    phases.wrap(processor, "pixel_values", "normalize")
    phases.wrap(model, "encode_sketches", "encode")
    phases.wrap(model.get_decoder(), "forward", "lm")
    if hasattr(model, "build_attention_mask"):
        phases.wrap(model, "build_attention_mask", "mask")
    rss = common.rss_bytes()
    common.reset_peak_rss()
    start = time.thread_time()
    try:
        with torch.inference_mode(), phases.phase("bookkeeping"):
            inputs = model.read(processor, text)
    finally:
        phases.unwrap()
    seconds = time.thread_time() - start
    times = {name: phases.time.get(("prefill", name), 0.0) for name in PHASES}
    cache = inputs["cache"]
    return {"chars": len(text), "seconds": seconds, "phases": times, "peak_mib": (common.peak_rss_bytes() - rss) / 2**20,
            "kv_mib": common.kv_cache_bytes(cache) / 2**20, "kv_entries": common.kv_cache_entries(cache)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chars", type=int, nargs="+", default=[62500, 125000, 250000])
    parser.add_argument("--name", default="read-profile")
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. before / after)")
    parser.add_argument("--roots", nargs="+", default=[str(HERE.parent)],
                        help="checkpoints (with their remote code) to compare, e.g. a checkout of an earlier revision "
                             "and this one; runs alternate between them, best of --repeats is kept")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoProcessor

    torch.set_num_threads(1)
    docs, _ = common.benchmark_documents()
    text = "\n".join(docs)
    models = {}
    for root in args.roots:
        model = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(root, trust_remote_code=True)
        model.read(processor, text[:2000])  # warm-up
        models[root] = (model, processor)
    rows = []
    for chars in args.chars:
        best = {}
        for _ in range(args.repeats):
            for root, (model, processor) in models.items():  # alternating: both see the same machine load
                row = dict(profile(model, processor, text[:chars]), root=root)
                print(json.dumps(row), flush=True)
                if root not in best or row["seconds"] < best[root]["seconds"]:
                    best[root] = row
        rows += list(best.values())
    command = "python benchmarks/read_profile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"command": command, "label": args.label, "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": common.machine_description(), "rows": rows}
    out = HERE / "results" / f"{args.name}.json"
    out.write_text(json.dumps(results, indent=1))
    lines = [f"# `model.read` by phase (demo checkpoint){': ' + args.label if args.label else ''}", "", "```", command,
             "```", "", f"{results['date']}; torch {results['machine']['torch']}, one torch thread, CPU seconds of that thread "
             "(2 cores shared with other jobs); best of the repeats, runs alternating between the checkouts.",
             "", "| checkout | characters | total s | " + " | ".join(PHASES) + " | peak MiB | KV MiB |",
             "|---|---|---|" + "---|" * len(PHASES) + "---|---|"]
    for row in rows:
        lines.append(f"| `{row['root']}` | {row['chars']} | {row['seconds']:.1f} | " + " | ".join(
            f"{row['phases'][name]:.1f}" for name in PHASES) + f" | {row['peak_mib']:.0f} | {row['kv_mib']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
