"""Sketch rendering throughput on one core: chunks of ~1000 characters per second.

    python benchmarks/render_speed.py

Measures
  1. `render_chunk(text, config.sketch_settings)` alone, on 1000-character slices of the benchmark text (ASCII
     stdlib docstrings, see common.benchmark_documents), for a 256 x 512 sketch with 8 x 16 px cells and for the
     sketch geometries the VIST2 benchmark uses;
  2. the full processor path, `processor(text=...)`: tokenize -> chunk (L = 256 tokens, ~980 characters of the
     benchmark text) -> render -> normalise to float pixel values, split into its stages, for the r = 4 and r = 2
     benchmark geometries (a 256-token chunk of this text does not fit the 1024 cells of the 8 x 16 setting).
Target (DESIGN §3): >= 900 chunks/s of ~1000 characters, 100x Glyph's reportlab -> PDF -> poppler path (~9/s here).
Single core: the thread pools of torch, OpenMP and BLAS are set to 1 before numpy/torch load. Timings are the best
of `--repeats` passes (the machine is shared), with the load average recorded.
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from vist2.configuration_vist2 import VIST2Config  # noqa: E402
from vist2.processing_vist2 import VIST2Processor, render_chunk  # noqa: E402

torch.set_num_threads(1)

# name -> (config geometry, what it is); all L = 256, 16 px patches
SETTINGS = {
    "256x512, 8x16 cells (64x16)": dict(image_height=256, image_width=512, char_width=8, line_height=16,
                                        merge_size=2, compression_ratio=2),
    "256x256, 4x8 cells (r=4 benchmark)": dict(common.GEOMETRY[4], compression_ratio=4),
    "256x512, 4x8 cells (r=2 benchmark)": dict(common.GEOMETRY[2], compression_ratio=2),
    "128x256, 4x6 cells (r=8 benchmark)": dict(common.GEOMETRY[8], compression_ratio=8),
}


def make_config(tokenizer, geometry):
    preset = common.PRESETS["cpu-small"]
    vision = dict(preset["vision"], image_size=geometry["image_height"])
    text = dict(preset["text"], vocab_size=len(tokenizer))
    return VIST2Config(text_config=text, vision_config=vision, chunk_size=common.CHUNK_SIZE,
                       sketch_token_id=tokenizer.convert_tokens_to_ids("<|sketch|>"), font_size=16, min_font_size=8,
                       **geometry)


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=2000, help="chunks per pass")
    parser.add_argument("--chars", type=int, default=1000, help="characters per chunk (render_chunk alone)")
    parser.add_argument("--processor-chunks", type=int, default=200,
                        help="chunks per processor pass (its float pixel values take 0.8-1.5 MiB per chunk)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    tokenizer = common.load_tokenizer()
    docs, info = common.benchmark_documents()
    # One line of prose per chunk: with newlines a 1000-character slice needs more than the 64 x 16 = 1024 cells of the
    # 8 x 16 setting (wrapped lines) and would be cut; the speed figure is for chunks the sketch holds.
    text = " ".join(docs)
    slices = [text[i : i + args.chars] for i in range(0, args.chunks * args.chars, args.chars)]
    assert len(slices) == args.chunks and all(len(s) == args.chars for s in slices)
    load = os.getloadavg()
    results = {"load_before": load, "chunks": args.chunks, "chars_per_chunk": args.chars, "render_chunk": {},
               "processor": {}}

    print(f"one core (torch threads {torch.get_num_threads()}), {args.chunks} chunks per pass, best of "
          f"{args.repeats}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"\n1. render_chunk alone, {args.chars}-character chunks")
    for name, geometry in SETTINGS.items():
        settings = make_config(tokenizer, geometry).sketch_settings
        render_chunk(slices[0], settings)  # warm the glyph atlas
        overflow = sum(render_chunk(s, settings)[1].overflow for s in slices[:200])
        seconds, _ = best_of(args.repeats, lambda: [render_chunk(s, settings) for s in slices])
        rate = args.chunks / seconds
        results["render_chunk"][name] = {"chunks_per_s": rate, "overflow_in_200": overflow}
        print(f"  {name:40s} {rate:8.0f} chunks/s   ({overflow}/{len(slices[:200])} chunks overflow and are cut)")

    print(f"\n2. processor(text=...) path, L = {common.CHUNK_SIZE} tokens per chunk")
    for name in ("256x256, 4x8 cells (r=4 benchmark)", "256x512, 4x8 cells (r=2 benchmark)"):
        config = make_config(tokenizer, SETTINGS[name])
        processor = VIST2Processor.from_config(config, tokenizer)
        ids, _ = common.benchmark_token_ids(tokenizer, (args.processor_chunks + 1) * common.CHUNK_SIZE)
        long_text = tokenizer.decode(ids)
        processor(text=long_text[:20000])  # warm-up
        stages = {}

        def timed(stage, fn):
            def wrapper(*a, **k):
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - start
            return wrapper

        processor.sketch_chunks = timed("render", processor.sketch_chunks)
        processor.pixel_values = timed("normalize", processor.pixel_values)
        processor.encode = timed("tokenize", processor.encode)
        runs = []
        for _ in range(args.repeats):
            stages.clear()
            start = time.perf_counter()
            batch = processor(text=long_text)
            total = time.perf_counter() - start
            runs.append((total, dict(stages), int(batch["pixel_values"].shape[0]), int(batch["chunks_kept_as_text"])))
        total, stage_times, n_chunks, kept = min(runs, key=lambda run: run[0])
        chars = len(long_text) / (len(ids) / common.CHUNK_SIZE)
        results["processor"][name] = {"chunks_per_s": n_chunks / total, "chunks": n_chunks, "kept_as_text": kept,
                                      "chars_per_chunk": chars,
                                      "stage_chunks_per_s": {k: n_chunks / v for k, v in stage_times.items()},
                                      "stage_share": {k: v / total for k, v in stage_times.items()}}
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in stage_times.items())
        print(f"  {name:40s} {n_chunks / total:8.0f} chunks/s   ({n_chunks} chunks of ~{chars:.0f} chars, "
              f"{kept} kept as text; {shares}, other {1 - sum(stage_times.values()) / total:.0%})")
    results["load_after"] = os.getloadavg()
    print(f"\nload average after: {results['load_after'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
