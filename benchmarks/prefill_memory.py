"""Peak memory and time of VIST2's prefill against its block size (`prefill_chunk_size`) and `model.read`'s group.

    python benchmarks/prefill_memory.py --contexts 8192 32768 --blocks none 2048 1024 512 256 --read-groups 16 8

Each case runs in a fresh subprocess (one torch thread, glibc mmap threshold 64 KiB as in vist2_bench.py): it loads
the `cpu-small` model at r = 4, warms up on a short prompt, resets the peak-RSS watermark, then builds the inputs for
the first `context` tokens of the benchmark text and runs `generate(max_new_tokens=1)` (the prefill and first token).
Peak memory is reported above the RSS after warm-up, for the inputs alone and for inputs + prefill; the baseline is
the text-only backbone on the same tokens. Writes `benchmarks/results/prefill_memory.{json,md}`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import common  # noqa: E402
from benchmarks.vist2_bench import MALLOC_TRIM  # noqa: E402

MiB = 2**20


def run_case(context: int, mode: str, size: int | None, ratio: int) -> dict:
    import torch

    from vist2 import VIST2ForCausalLM, VIST2Processor

    torch.set_num_threads(1)
    tokenizer = common.load_tokenizer()
    config = common.build_config("cpu-small", ratio, tokenizer)
    torch.manual_seed(0)
    model = VIST2ForCausalLM(config).eval()
    processor = VIST2Processor.from_config(config, tokenizer)
    if mode == "baseline":
        model = model.language_model
        gc.collect()
    ids, _ = common.benchmark_token_ids(tokenizer, context)

    def inputs_for(prompt):
        if mode == "baseline":
            return common.baseline_inputs(prompt)
        if mode == "read":
            with torch.inference_mode():
                return model.read(processor, tokenizer.decode(prompt), sketches_per_step=size)
        return common.vist2_inputs(processor, prompt)

    def first_token(inputs):
        kwargs = dict(max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        if mode != "baseline":
            kwargs.update(processor=processor, prefill_chunk_size=size if mode == "generate" else None)
            if mode == "generate" and size == "auto":
                kwargs.pop("prefill_chunk_size")
        with torch.inference_mode():
            return model.generate(**inputs, **kwargs)

    first_token(inputs_for(ids[: 2 * config.chunk_size + 10]))
    gc.collect()
    loaded = common.rss_bytes()
    common.reset_peak_rss()
    started = time.perf_counter()
    inputs = inputs_for(ids)
    inputs_peak = common.peak_rss_bytes() - loaded
    first_token(inputs)
    return {"context": context, "mode": mode, "size": size, "ratio": ratio,
            "inputs_peak_mib": inputs_peak / MiB, "peak_mib": (common.peak_rss_bytes() - loaded) / MiB,
            "seconds": time.perf_counter() - started}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--ratio", type=int, default=4, choices=sorted(common.GEOMETRY))
    parser.add_argument("--blocks", nargs="+", default=["auto", "none", "2048", "1024", "512", "256"],
                        help="prefill_chunk_size values for generate(**processor(text)); 'none' = one pass, 'auto' = "
                             "the default (sized by a memory budget)")
    parser.add_argument("--read-groups", type=int, nargs="*", default=[16, 8], help="sketches_per_step of model.read")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(**json.loads(args.worker))))
        return

    cases = []
    for context in args.contexts:
        blocks = [None if b == "none" else b if b == "auto" else int(b) for b in args.blocks]
        plan = [("baseline", None)] + [("generate", b) for b in blocks]
        plan += [("read", g) for g in args.read_groups]
        for mode, size in plan:
            spec = json.dumps({"context": context, "mode": mode, "size": size, "ratio": args.ratio})
            out = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True,
                                 env=dict(os.environ, **MALLOC_TRIM), check=True)
            case = json.loads(out.stdout.strip().splitlines()[-1])
            cases.append(case)
            print(f"{context:6d} {mode:8s} {str(size):5s} inputs {case['inputs_peak_mib']:7.1f} MiB  "
                  f"peak {case['peak_mib']:7.1f} MiB  {case['seconds']:6.2f} s", flush=True)

    command = "python benchmarks/prefill_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": common.machine_description(), "cases": cases}
    (HERE / "results" / "prefill_memory.json").write_text(json.dumps(results, indent=1))
    lines = ["# VIST2 prefill: peak memory against block size", "", "```", command, "```", "",
             f"{results['date']}; python {results['machine']['python']}, torch {results['machine']['torch']}, "
             "one torch thread, 2 shared CPU cores. Peak = peak RSS above the RSS after warm-up, for building the "
             "inputs and for inputs + prefill + first token; ratio against the text-only baseline's peak.", "",
             "| context | path | block / group | inputs peak MiB | peak MiB | vs baseline | seconds |",
             "|---|---|---|---|---|---|---|"]
    for case in cases:
        base = next(c for c in cases if c["context"] == case["context"] and c["mode"] == "baseline")
        path = {"baseline": "text-only baseline", "generate": "generate(**processor(text))",
                "read": "model.read(processor, text)"}[case["mode"]]
        size = "-" if case["mode"] == "baseline" else ("one pass" if case["size"] is None else str(case["size"]))
        lines.append(f"| {case['context']} | {path} | {size} | {case['inputs_peak_mib']:.1f} | {case['peak_mib']:.1f} | "
                     f"{case['peak_mib'] / base['peak_mib']:.1%} | {case['seconds']:.2f} |")
    (HERE / "results" / "prefill_memory.md").write_text("\n".join(lines) + "\n")
    print("wrote benchmarks/results/prefill_memory.{json,md}")


if __name__ == "__main__":
    main()
