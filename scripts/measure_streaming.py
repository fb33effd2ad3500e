"""Measure memory while processing a 1,000,000-character text: streamed chunk by chunk vs. all at once.

Each measurement runs in a fresh interpreter (peak RSS, `ru_maxrss`, only grows within a process):

    baseline  import everything, build the text and the processor; nothing processed (the floor)
    stream    `for chunk in processor.iter_chunks(text)`: tokenize, render and drop one chunk at a time
    naive     `processor(text=text)`: the whole text as one batch (every sketch as pixel_values at once)
    read      `model.read(processor, text)`: stream into a compressed VIST2Cache (the model runs; slow on CPU, so
              by default on a shorter text; --read-chars)

The text is the offline demo corpus (CPython docstrings, tokenization/build_corpus.py), repeated until it reaches
--chars characters. The processor: the 4 096-token demo BPE tokenizer, L=32, r=4, 128x256 sketches, Pillow's built-in font.
RSS is sampled from /proc/self/status every --every chunks, so the output shows memory against progress.

    python scripts/measure_streaming.py --out runs/streaming.json          # about 3-6 minutes on 2 busy cores
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_text(chars: int) -> str:
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "tokenization" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    corpus = "\n\n".join(module.build_corpus(max_chars=min(chars, 2_000_000)))
    return (corpus * (chars // len(corpus) + 1))[:chars]


def demo_processor():
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from vist2 import VIST2Config, VIST2Processor

    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "tokenization" / "demo_tokenizer"))
    text = dict(model_type="qwen3", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                max_position_embeddings=1 << 20, tie_word_embeddings=True)
    vision = dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                  num_attention_heads=4, patch_size=16, image_size=128, num_channels=1, vision_use_head=False)
    config = VIST2Config(text_config=text, vision_config=vision, chunk_size=32, compression_ratio=4, merge_size=4,
                         image_height=128, image_width=256, char_width=8, line_height=16, font_size=16,
                         min_font_size=8, num_channels=1, sketch_token_id=tokenizer.convert_tokens_to_ids("<|sketch|>"),
                         tie_word_embeddings=True)
    return config, VIST2Processor.from_config(config, tokenizer)


def worker(mode: str, chars: int, every: int) -> dict:
    import warnings

    import torch

    warnings.simplefilter("ignore")  # chunks kept as text warn once each
    torch.set_num_threads(1)
    start = time.perf_counter()
    text = build_text(chars)
    config, processor = demo_processor()
    samples = [(0, round(time.perf_counter() - start, 2), round(rss_mib(), 1))]
    result = {"mode": mode, "chars": len(text)}
    if mode == "stream":
        closed = kept = tokens = 0
        for ids, sketch, report in processor.iter_chunks(text):
            tokens += len(ids)
            if report is None:
                break
            closed += 1
            kept += sketch is None
            if closed % every == 0:
                samples.append((closed, round(time.perf_counter() - start, 2), round(rss_mib(), 1)))
        result.update(tokens=tokens, closed_chunks=closed, kept_as_text=kept)
    elif mode == "naive":
        batch = processor(text=text)
        result.update(tokens=len(processor.encode(text)), closed_chunks=len(processor.last_report[0]),
                      kept_as_text=int(batch["chunks_kept_as_text"][0]),
                      pixel_values_mib=round(batch["pixel_values"].numel() * batch["pixel_values"].element_size() / 2**20, 1),
                      input_ids=int(batch["input_ids"].shape[1]))
    elif mode == "read":
        from vist2 import VIST2ForCausalLM

        torch.manual_seed(0)
        model = VIST2ForCausalLM(config).eval()  # random weights: memory and time do not depend on them
        samples.append((0, round(time.perf_counter() - start, 2), round(rss_mib(), 1)))
        inputs = model.read(processor, text)
        cache = inputs["cache"]
        result.update(cache_entries=int(cache.get_seq_length()), open_chunk=int(cache.open_chunk),
                      cache_mib=round(sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
                                      * 4 / 2**20, 2))
    samples.append((result.get("closed_chunks", -1), round(time.perf_counter() - start, 2), round(rss_mib(), 1)))
    result.update(seconds=round(time.perf_counter() - start, 1), peak_rss_mib=round(peak_mib(), 1),
                  samples=samples)
    return result


def run(mode, chars, every, timeout):
    command = [sys.executable, __file__, "--worker", mode, "--chars", str(chars), "--every", str(every)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "chars": chars, "error": f"timed out after {timeout}s"}
    if done.returncode != 0:
        return {"mode": mode, "chars": chars, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=1_000_000)
    parser.add_argument("--read-chars", type=int, default=100_000, help="text length for the model.read measurement")
    parser.add_argument("--every", type=int, default=1000, help="sample RSS every N chunks (stream mode)")
    parser.add_argument("--modes", default="baseline,stream,naive,read")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.chars, args.every)))
        return
    import torch
    import transformers

    machine = {"python": platform.python_version(), "torch": torch.__version__,
               "transformers": transformers.__version__, "cpus": os.cpu_count(), "platform": platform.platform(),
               "torch_threads": 1}
    results = []
    for mode in args.modes.split(","):
        chars = args.read_chars if mode == "read" else args.chars
        results.append(run(mode, chars, args.every, args.timeout))
        r = results[-1]
        details = {k: v for k, v in r.items() if k not in ("samples", "mode", "chars", "peak_rss_mib", "seconds")}
        print(f"{mode:9s} {r.get('chars', 0):>9,d} chars  peak RSS {r.get('peak_rss_mib', float('nan')):8.1f} MiB  "
              f"{r.get('seconds', float('nan')):7.1f} s  {details}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                                              "machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
