"""Does the decode step replayed as a CUDA graph give the dynamic step's logits, and how much faster is it?

    python benchmarks/decode_graph_check.py --device cuda --name decode-graph-h200

Builds a preset's model (default `qwen3-0.6b`: random weights, bf16; `--dtype` to change it) and, after a
`context`-token prompt of the benchmark text, generates its continuation (forced, as in vist2_bench.py, so both runs
feed the same tokens) twice in the same process: `cuda_graphs=False` (the dynamic step) and `cuda_graphs=True` (on a GPU
captured once and replayed; on a CPU the same fixed-shape step, uncaptured). The continuation crosses chunk closes (the
prompt's last chunk is full, so the first step closes it, and every L-th after). Reports, per run: decode tokens/s (a
warm-up generation first), whether the step was captured; and between the runs: the largest logit difference at any step
against the logits' scale, and how often the two agree on the top token (the forced continuation is the same either
way). Writes `benchmarks/results/<name>.{json,md}`.
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
from transformers import LogitsProcessorList  # noqa: E402

from benchmarks import common  # noqa: E402


def generate_both_ways(model, processor, ids, context: int, new_tokens: int) -> dict:
    """Run the forced continuation with and without the graph; the comparison and each run's decode speed."""
    from vist2.modeling_vist2 import CACHE_KWARG

    device, L = model.device, model.config.chunk_size
    prompt, continuation = ids[:context], ids[context : context + new_tokens]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(graphs: bool, n: int):
        inputs = {k: v.to(device) for k, v in common.vist2_inputs(processor, prompt).items()
                  if isinstance(v, torch.Tensor)}
        kwargs = dict(processor=processor, cuda_graphs=graphs, do_sample=False, return_dict_in_generate=True,
                      pad_token_id=0)
        with torch.inference_mode():
            first = model.generate(**inputs, max_new_tokens=1, **kwargs,
                                   logits_processor=LogitsProcessorList([common.ForceTokens(continuation[:1],
                                                                                            inputs["input_ids"].shape[1])]))
            resumed = {"input_ids": first.sequences, "attention_mask": torch.ones_like(first.sequences),
                       CACHE_KWARG: first[CACHE_KWARG]}
            force = common.ForceTokens(continuation[1:n], first.sequences.shape[1])
            sync()
            start = time.perf_counter()
            out = model.generate(**resumed, max_new_tokens=n - 1, min_new_tokens=n - 1, output_logits=True,
                                 logits_processor=LogitsProcessorList([force]), **kwargs)
            sync()
        return out, (n - 1) / (time.perf_counter() - start), common.decode_graph_state(out[CACHE_KWARG])

    runs = {}
    for graphs in (False, True):
        run(graphs, min(new_tokens, 8))  # warm-up: kernels chosen, allocator filled
        runs[graphs] = run(graphs, new_tokens)
    (dynamic, dynamic_speed, _), (fixed, fixed_speed, state) = runs[False], runs[True]
    steps = list(zip(dynamic.logits, fixed.logits, strict=True))
    valid = [d > -1e30 for d, _ in steps]  # not the ruled-out <|sketch|> logit (the dtype's minimum)
    scale = max(float(d[v].abs().max()) for (d, _), v in zip(steps, valid))
    difference = max(float((d - f)[v].abs().max()) for (d, f), v in zip(steps, valid))
    agree = sum(bool((d.argmax(-1) == f.argmax(-1)).all()) for d, f in steps) / len(steps)
    return {"context": context, "new_tokens": new_tokens, "chunk_size": L,
            "chunk_closes": (context + new_tokens - 1) // L - (context - 1) // L,
            "graph": state, "decode_tok_s": {"dynamic": dynamic_speed, "graph": fixed_speed},
            "speedup": fixed_speed / dynamic_speed, "max_logit_difference": difference, "logit_scale": scale,
            "relative_difference": difference / scale, "top_token_agreement": agree}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen3-0.6b", choices=sorted(common.PRESETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--context", type=int, default=4096, help="a multiple of the chunk size")
    parser.add_argument("--new-tokens", type=int, default=300)
    parser.add_argument("--dtype", default=None, help="the weights' dtype (default: the preset's)")
    parser.add_argument("--name", default="decode-graph-check")
    args = parser.parse_args(argv)

    from vist2 import VIST2ForCausalLM, VIST2Processor

    tokenizer = common.load_tokenizer()
    config = common.build_config(args.preset, 4, tokenizer)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = VIST2ForCausalLM(config).to(getattr(torch, args.dtype or common.PRESETS[args.preset]["dtype"])).eval()
    processor = VIST2Processor.from_config(config, tokenizer)
    ids, _ = common.benchmark_token_ids(tokenizer, args.context + args.new_tokens)
    result = generate_both_ways(model, processor, ids, args.context, args.new_tokens)
    command = "python benchmarks/decode_graph_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result.update(command=command, preset=args.preset, date=datetime.datetime.now().isoformat(timespec="seconds"),
                  machine=common.machine_description())
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}), flush=True)
    out = HERE / "results" / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=1))
    machine = result["machine"]
    lines = [f"# Decode steps as a CUDA graph against the dynamic step: `{args.preset}`", "", "```", command, "```", "",
             f"{result['date']}; {', '.join(machine['gpu']) or 'no GPU'}; torch {machine['torch']}, transformers "
             f"{machine['transformers']}; {model.dtype}. Prompt {args.context} tokens, {args.new_tokens} forced tokens "
             f"({result['chunk_closes']} chunk closes). The step with `cuda_graphs=True`: {result['graph']}.", "",
             "| | `cuda_graphs=False` (dynamic step) | `cuda_graphs=True` | ratio |", "|---|---|---|---|",
             f"| decode tokens/s | {result['decode_tok_s']['dynamic']:.1f} | {result['decode_tok_s']['graph']:.1f} | "
             f"{result['speedup']:.2f}x |", "",
             f"Largest logit difference at any step: {result['max_logit_difference']:.3g} (logits up to "
             f"{result['logit_scale']:.3g}: {result['relative_difference']:.1e} of them); same top token at "
             f"{result['top_token_agreement']:.1%} of the steps.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
