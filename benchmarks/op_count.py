"""A deterministic CPU gauge of GPU launch overhead: aten operators dispatched by VIST2 and by its backbone.

    python benchmarks/op_count.py --contexts 8192 32768 --name op-count

On a GPU every dispatched aten operator is (at most) one kernel launch, and a model this size is launch-bound: the
host spends longer issuing kernels than the GPU spends running them. The number of operators does not depend on the
widths of the layers, only on their count and on the code, so this script builds the `qwen3-0.6b` preset's layer
counts (28 decoder layers, 12 vision layers) at tiny widths and counts, with a `TorchDispatchMode`:

- prefill + first token: `generate(**inputs, max_new_tokens=1)` over the first `context` tokens of the benchmark text
  (inputs built beforehand: the processor's work is host work), its passes sized as on an accelerator for the
  full-width preset (`prefill_passes`), which is what a GPU runs;
- a decode step that closes no chunk, and one that closes a chunk: differences of resumed `generate` calls (one
  generate call's own fixed work cancels out);
- VIST2's `model.read` of the same prompt (its token ids) + first token (`generate(**read, max_new_tokens=1)`), its
  groups sized as on an accelerator;
- VIST2's decode step that closes no chunk as a GPU runs it, replayed as a CUDA graph (`cuda_graphs`, the default
  there): the operators dispatched around the replay (`DecodeGraph.__call__`, generate's loop), plus the one graph
  launch. A CPU cannot capture, so the fixed-shape step runs as it is and its own operators (which the graph holds)
  are counted apart and subtracted.

Attention kernels are counted but not computed (their output is left uninitialised), so 32k contexts run on a laptop;
their values never decide the control flow here (the continuation is forced).

And the host's side of a decode step that closes no chunk, what a launch-bound GPU step waits on besides the launches:
the Python function calls per step (cProfile's count: deterministic), and the CPU time of the main thread per step (one
torch thread, so other jobs on the machine count little) at these tiny widths and a one-chunk context
(`--host-context`), where the operators' own work is small. Writes `benchmarks/results/<name>.{json,md}`.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import datetime
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks import common  # noqa: E402

ATTENTION_OPS = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}
# Under torch.inference_mode (the default, as the benchmarks generate) the dispatcher sees composite operators whole
# (`linear`, `scaled_dot_product_attention`); under torch.no_grad it sees the operators they are made of, closer to the
# kernels a GPU launches (`--grad-mode no_grad`).
GRAD_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
GRAD_MODE = [torch.inference_mode]
TINY_WIDTHS = {  # layer counts stay the preset's; only the widths shrink
    "text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32),
    "vision": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2),
}


class OpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched while active, by name (`counts`) and in all (`total`).

    `skip_attention`: fused attention kernels are counted but return uninitialised outputs of the right shape instead
    of running (the count is the same; the work, quadratic in the context, is skipped)."""

    def __init__(self, skip_attention: bool = False):
        super().__init__()
        self.counts = collections.Counter()
        self.skip_attention = skip_attention

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        if self.skip_attention and name in ATTENTION_OPS:
            return skipped_attention(func, args, kwargs or {})
        return func(*args, **(kwargs or {}))


def skipped_attention(func, args, kwargs):
    """Outputs of a fused attention op without computing it: the output like the query (values' head size), and the
    auxiliary outputs (log-sum-exp and the like) as empty tensors, which nothing downstream reads at inference."""
    query, value = args[0], args[2]
    output = query.new_empty(*query.shape[:-1], value.shape[-1])
    if func.overloadpacket.__name__ == "_scaled_dot_product_flash_attention_for_cpu":
        return output, query.new_empty(query.shape[:-1], dtype=torch.float32)
    results = func._schema.returns
    return (output,) + tuple(query.new_empty(0) for _ in results[1:]) if len(results) > 1 else output


def count_ops(fn, skip_attention=True) -> tuple[int, collections.Counter, object]:
    """(total operators, per-name counts, fn's result) of running `fn()`."""
    with OpCounter(skip_attention=skip_attention) as counter:
        result = fn()
    return counter.total, counter.counts, result


def build(ratio: int):
    from vist2 import VIST2ForCausalLM, VIST2Processor

    tokenizer = common.load_tokenizer()
    config = common.build_config("qwen3-0.6b", ratio, tokenizer)
    config.text_config.update({**TINY_WIDTHS["text"], "vocab_size": len(tokenizer)})
    config.vision_config.update(TINY_WIDTHS["vision"])
    config.text_config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = VIST2ForCausalLM(config).eval()
    # Passes as an accelerator sizes them for the full-width preset: what a GPU runs, counted here.
    with torch.device("meta"):
        full_width = VIST2ForCausalLM(common.build_config("qwen3-0.6b", ratio, tokenizer)).to(torch.bfloat16)
    model.prefill_passes = lambda setting, keys, device: full_width.prefill_passes(setting, keys, "cuda")
    return model, VIST2Processor.from_config(config, tokenizer), tokenizer


def forced_generation(model, processor, ids, context, is_vist2, cache_kwarg, **generate_kwargs):
    """`generate(n)`: `generate` writing the benchmark text's next `n` tokens, the first call from the prompt
    `ids[:context]` (its inputs built here, outside what is measured), each later call resumed from the last one's
    sequences and cache, so that VIST2 and the backbone feed the very same tokens."""
    from transformers import LogitsProcessorList

    lm = model if is_vist2 else model.language_model
    extra = {"processor": processor, **generate_kwargs} if is_vist2 else {}
    prompt = ids[:context]
    state = {"fed": context, "out": None,  # tokens fed so far, including the one generate is about to feed
             "prompt": common.vist2_inputs(processor, prompt) if is_vist2 else common.baseline_inputs(prompt)}

    def generate(n):
        out, fed = state["out"], state["fed"]
        inputs = state["prompt"] if out is None else {
            "input_ids": out.sequences, "attention_mask": torch.ones_like(out.sequences), cache_kwarg: out[cache_kwarg]}
        force = LogitsProcessorList([common.ForceTokens(ids[fed : fed + n], inputs["input_ids"].shape[1])])
        with GRAD_MODE[0]():
            out = lm.generate(**inputs, **extra, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              logits_processor=force, return_dict_in_generate=True, pad_token_id=0)
        state.update(out=out, fed=fed + n)
        return out
    return generate


def measure(model, processor, tokenizer, ids, context, is_vist2, cache_kwarg) -> dict:
    """Operators of prefill + first token, of a decode step closing a chunk and of one closing none."""
    generate = forced_generation(model, processor, ids, context, is_vist2, cache_kwarg)
    prefill, names, _ = count_ops(lambda: generate(1))
    # The prompt's last chunk is open and holds L tokens when context is a multiple of L: the first token fed closes
    # it. Then plain steps follow (checked below against the tokens fed).
    assert context % model.config.chunk_size == 0, "contexts are multiples of the chunk size: the first step closes one"
    closing_call, _, _ = count_ops(lambda: generate(1))
    plain_call, _, _ = count_ops(lambda: generate(1))
    two_plain, _, out = count_ops(lambda: generate(2))
    plain = two_plain - plain_call
    overhead = plain_call - plain
    return {"context": context, "model": "vist2" if is_vist2 else "baseline", "prefill_first_token": prefill,
            "decode_step": plain, "decode_step_closing": closing_call - overhead, "generate_call_overhead": overhead,
            "top_ops_prefill": dict(names.most_common(12)), "generated_ok": out.sequences.shape[1] > 0}


def captured_decode_step(model, processor, ids, context, cache_kwarg) -> dict:
    """Host launches of VIST2's decode step that closes no chunk, replayed as a CUDA graph: what `generate` dispatches
    for the step outside `DecodeGraph.step` (counted around it), plus one for the graph's launch."""
    from vist2.modeling_vist2 import DecodeGraph

    generate = forced_generation(model, processor, ids, context, True, cache_kwarg, cuda_graphs=True)
    generate(1)
    generate(1)  # the step that closes the prompt's full last chunk
    step, inside = DecodeGraph.step, []

    def counted_step(graph, cache):
        with OpCounter() as counter:  # nested: the outer count sees these operators too
            logits = step(graph, cache)
        inside.append(counter.total)
        return logits

    DecodeGraph.step = counted_step
    try:
        one, _, _ = count_ops(lambda: generate(1))
        two, _, _ = count_ops(lambda: generate(2))
    finally:
        DecodeGraph.step = step
    per_step, in_graph = two - one, inside[-1]
    return {"decode_step_captured": per_step - in_graph + 1, "fixed_shape_step": in_graph}


def read_first_token(model, processor, ids, context) -> dict:
    """Operators of `model.read(processor, ids[:context])` and generate's first token from it."""
    def run():
        with GRAD_MODE[0]():
            inputs = model.read(processor, ids[:context])
            return model.generate(**inputs, processor=processor, max_new_tokens=1, do_sample=False, pad_token_id=0)
    total, _, _ = count_ops(run)
    return {"read_first_token": total}


def count_python_calls(fn) -> tuple[int, object]:
    """(Python function calls, as cProfile counts them, fn's result) of running `fn()`: deterministic host work."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        result = fn()
    finally:
        profiler.disable()
    return pstats.Stats(profiler).total_calls, result


def decode_host_cost(model, processor, ids, context, is_vist2, cache_kwarg, steps=32, repeats=5) -> dict:
    """The host's work per decode step that closes no chunk, after a prefill of `context` tokens, from differences of
    resumed `generate` calls (`(cost(1 + steps) - cost(1)) / steps`: one call's fixed work cancels out): Python function
    calls (deterministic) and the median CPU time of the main thread over `repeats`, in ms."""
    L = model.config.chunk_size
    assert context % L == 0 and (repeats + 1) * (steps + 2) < L, "every measured step must leave the open chunk open"
    generate = forced_generation(model, processor, ids, context, is_vist2, cache_kwarg)

    def thread_time(n):
        start = time.thread_time()
        generate(n)
        return time.thread_time() - start

    generate(1)
    generate(1)  # the step that closes the prompt's full last chunk
    one, _ = count_python_calls(lambda: generate(1))
    many, _ = count_python_calls(lambda: generate(1 + steps))
    per_step = []
    for _ in range(repeats):
        one_ms = thread_time(1)
        per_step.append((thread_time(1 + steps) - one_ms) / steps * 1e3)
    return {"python_calls": (many - one) / steps, "ms": statistics.median(per_step)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--ratio", type=int, default=4, choices=sorted(common.GEOMETRY))
    parser.add_argument("--name", default="op-count")
    parser.add_argument("--host-context", type=int, default=256, help="context of the host-time measurement")
    parser.add_argument("--grad-mode", choices=sorted(GRAD_MODES), default="inference_mode")
    args = parser.parse_args(argv)
    GRAD_MODE[0] = GRAD_MODES[args.grad_mode]

    from vist2.modeling_vist2 import CACHE_KWARG

    torch.set_num_threads(1)  # the host time is the main thread's; the operator counts do not depend on threads
    model, processor, tokenizer = build(args.ratio)
    ids, _ = common.benchmark_token_ids(tokenizer, max(args.contexts + [args.host_context]) + 512)
    rows = []
    for context in args.contexts:
        for is_vist2 in (False, True):
            row = measure(model, processor, tokenizer, ids, context, is_vist2, CACHE_KWARG)
            if is_vist2:
                row.update(captured_decode_step(model, processor, ids, context, CACHE_KWARG))
                row.update(read_first_token(model, processor, ids, context))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "top_ops_prefill"}), flush=True)
    host = {"baseline": [], "vist2": []}
    for _ in range(2):  # alternated, so that a change in the machine's load falls on both models
        for is_vist2 in (False, True):
            cost = decode_host_cost(model, processor, ids, args.host_context, is_vist2, CACHE_KWARG)
            host["vist2" if is_vist2 else "baseline"].append(cost)
    print(json.dumps({"decode_step_host": host}), flush=True)
    write(rows, host, args)


def write(rows, host, args):
    command = "python benchmarks/op_count.py " + " ".join(sys.argv[1:])
    results = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": common.machine_description(), "ratio": args.ratio, "widths": TINY_WIDTHS, "rows": rows,
               "host_context": args.host_context, "decode_step_host": host, "grad_mode": args.grad_mode}
    out = HERE / "results" / f"{args.name}.json"
    out.write_text(json.dumps(results, indent=1))
    lines = [f"# Dispatched aten operators: VIST2 r = {args.ratio} against its backbone", "", "```", command, "```", "",
             f"{results['date']}; torch {results['machine']['torch']}, transformers "
             f"{results['machine']['transformers']}, under torch.{args.grad_mode}. The `qwen3-0.6b` preset's layer "
             "counts (28 decoder, 12 vision layers) at tiny widths; counts do not depend on widths or on the machine.", "",
             "| context | model | prefill + first token | `read` + first token | decode step, no chunk closes | "
             "decode step closing a chunk | decode step, no chunk closes, as a CUDA graph (host launches) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["context"] == row["context"] and r["model"] == "baseline")

        def cell(key):
            ratio = "" if row is base else f" ({row[key] / base[key]:.2f}x)"
            return f"{row[key]}{ratio}"

        captured = f"{row['decode_step_captured']} (the graph holds {row['fixed_shape_step']})" \
            if "decode_step_captured" in row else "- (not captured)"
        read = f"{row['read_first_token']} ({row['read_first_token'] / base['prefill_first_token']:.2f}x)" \
            if "read_first_token" in row else "-"
        lines.append(f"| {row['context']} | {row['model']} | {cell('prefill_first_token')} | {read} | "
                     f"{cell('decode_step')} | {cell('decode_step_closing')} | {captured} |")
    calls = {model: min(run["python_calls"] for run in host[model]) for model in host}
    runs = {model: [round(run["ms"], 2) for run in host[model]] for model in host}
    base, vist2, base_ms, vist2_ms = calls["baseline"], calls["vist2"], min(runs["baseline"]), min(runs["vist2"])
    lines += ["", f"The host's work per decode step that closes no chunk, context {args.host_context}: Python function "
              f"calls (deterministic) backbone {base:.0f}, VIST2 {vist2:.0f} ({vist2 / base:.3f}x); CPU time of the "
              f"main thread (one torch thread; the smaller of two alternated runs, each the median of 5 differences "
              f"of 32 steps) backbone {base_ms:.2f} ms, VIST2 {vist2_ms:.2f} ms ({vist2_ms / base_ms:.2f}x), runs "
              f"{runs['baseline']} and {runs['vist2']} ms. CPU time, unlike the counts, depends on the machine and its "
              "load.", ""]
    cpu = [" ".join(line.split()) for line in results["machine"]["lscpu"] if line.startswith("Model name")]
    lines.append("Machine: " + "; ".join(cpu) + f"; nproc {results['machine']['nproc']}.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
