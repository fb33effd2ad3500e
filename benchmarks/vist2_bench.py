"""VIST2 against its own text-only backbone, in one run: KV-cache bytes, peak memory, FLOPs, time to first token,
decode tokens/s, and the share of time spent rendering and encoding sketches (issue 7, DESIGN §6).

    python benchmarks/vist2_bench.py --preset cpu-small --contexts 2048 8192 32768 --new-tokens 1024 \
        --ratios 2 4 8 --name cpu-small

Every (model, context) case runs in a fresh subprocess, so peak memory is per case; cases run interleaved (for each
context: baseline, r=4, r=2, r=8) so VIST2 and its baseline see the same machine load, and `os.getloadavg()` is
recorded with each. The baseline is `model.language_model` of the same VIST2 model (same weights), generating from
the same prompt token ids with the same forced continuation (see `common.ForceTokens`), greedy, same max_new_tokens.

Writes `benchmarks/results/<name>.json` (raw), `.md` (tables, command, machine) and `.png` (each cost vs context).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

RESULTS = HERE / "results"
# glibc adapts its mmap threshold upwards after large frees, after which freed tensors stay resident and peak RSS
# depends on allocation history (the same computation measured 119 or 177 MiB). `--malloc trim` (the default) fixes a
# 64 KiB threshold, which returns every large tensor to the OS when freed, so peak RSS follows live memory; same
# setting for every case. Each large allocation then page-faults afresh, which costs CPU time (the most for a model
# that runs many small passes: VIST2's 8k first token on cpu-small took 1.75x as long, the backbone's 1.17x), so
# time-to-first-token comparisons run with `--malloc default`, the allocator every user process gets.
MALLOC_TRIM = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def core_fingerprint() -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(HERE.parent.glob("*_vist2.py"))}


def model_label(ratio, variant=None) -> str:
    if ratio is None:
        return "baseline"
    return f"vist2-r{ratio}" + ("" if variant in (None, "core") else f"-{variant}")
TARGETS_R4 = {  # issue 7, at r = 4
    "kv": ("KV cache <= 26 % of baseline from 8k up", 0.26),
    "mem": ("peak memory <= 23 % of baseline", 0.23),
    "flops": ("FLOPs <= 26 % of baseline", 0.26),
    "ttft": ("first token >= 3x faster at 8k, rising with context", 3.0),
    "decode": ("decode >= 2x faster at 32k", 2.0),
}


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one (model, context) case in this process
# ---------------------------------------------------------------------------------------------------------------------


def run_case(case: dict) -> dict:
    from transformers import LogitsProcessorList
    from transformers.models.qwen3 import modeling_qwen3

    import vist2.modeling_vist2 as modeling
    from vist2.modeling_vist2 import CACHE_KWARG, VIST2Cache, VIST2ForCausalLM
    from vist2.processing_vist2 import VIST2Processor

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    device = torch.device(case.get("device", "cpu"))
    dtype = getattr(torch, case.get("dtype") or common.PRESETS[case["preset"]]["dtype"])
    ids = json.loads(Path(case["data"]).read_text())["ids"]
    context, new_tokens, ratio = case["context"], case["new_tokens"], case["ratio"]
    variant = case.get("variant") or "core"
    prompt_ids, continuation = ids[:context], ids[context : context + new_tokens]
    is_vist2 = ratio is not None

    tokenizer = common.load_tokenizer()
    config = common.build_config(case["preset"], ratio or 4, tokenizer, case.get("chunk_size", common.CHUNK_SIZE))
    torch.manual_seed(0)
    rss_start = common.rss_bytes()
    with torch.device(device):  # initialised where it runs: a 0.6B model's random init on a host takes minutes
        model = VIST2ForCausalLM(config).to(dtype=dtype).eval()
    processor = VIST2Processor.from_config(config, tokenizer)
    if not is_vist2:
        model = model.language_model  # the text-only backbone, same weights; the vision tower is dropped
        gc.collect()
    params = sum(p.numel() for p in model.parameters())

    def sync():
        # Not while a decode step is being captured as a CUDA graph (a synchronisation would end the capture).
        if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()

    def make_inputs(prompt):
        if is_vist2 and variant == "read":
            # The core's streaming prefill: tokenize, render, encode and extend the cache `sketches_per_step` chunks
            # at a time; returns the last prompt token and the filled cache for generate().
            with torch.inference_mode():
                return model.read(processor, tokenizer.decode(prompt), sketches_per_step=case["read_group"])
        inputs = common.vist2_inputs(processor, prompt) if is_vist2 else common.baseline_inputs(prompt)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def resume_inputs(out):
        """Inputs that continue a finished generation from its cache."""
        return {"input_ids": out.sequences, "attention_mask": torch.ones_like(out.sequences),
                CACHE_KWARG: out[CACHE_KWARG]}

    def generate(inputs, forced, n_new, streamer=None):
        kwargs = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, return_dict_in_generate=True,
                      pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                      logits_processor=LogitsProcessorList([common.ForceTokens(forced, inputs["input_ids"].shape[1])]))
        if is_vist2:
            kwargs["processor"] = processor
            kwargs["cuda_graphs"] = {"auto": None, "on": True, "off": False}[case.get("cuda_graphs", "auto")]
        with torch.inference_mode():
            return model.generate(**inputs, **kwargs)

    # Warm-up crossing one chunk closure (2 chunks of prompt: the first decode step closes the open chunk).
    L = config.chunk_size
    read_tokens_match = None
    if is_vist2 and variant == "read":
        read_tokens_match = processor.encode(tokenizer.decode(prompt_ids)) == list(prompt_ids)
    warm = generate(make_inputs(ids[: 2 * L]), ids[2 * L : 2 * L + 1], 1)
    generate(resume_inputs(warm), ids[2 * L + 1 : 2 * L + 5], 4)
    del warm

    # "thread": CPU seconds of this (one-threaded) process's main thread, which other jobs on a shared machine do not
    # inflate as they do wall time; a GPU's time is wall time.
    clock = time.thread_time if case.get("clock") == "thread" else time.perf_counter
    phases = common.Phases(clock=clock)
    kept = {"prefill": 0, "decode": 0}
    rendered = {"prefill": 0, "decode": 0}
    original_sketch = processor.sketch_chunks

    def counting_sketch_chunks(chunks):
        images, reports = original_sketch(chunks)
        kept[phases.stage] += sum(image is None for image in images)
        rendered[phases.stage] += sum(image is not None for image in images)
        return images, reports

    processor.sketch_chunks = counting_sketch_chunks
    phases.wrap(processor, "sketch_chunks", "render")
    phases.wrap(processor, "pixel_values", "normalize")
    decoder = model.get_decoder()
    phases.wrap(decoder, "forward", "lm")
    phases.wrap(model.get_output_embeddings(), "forward", "lm_head")
    phases.wrap(modeling_qwen3, "create_causal_mask", "mask")
    if is_vist2:
        phases.wrap(model, "encode_sketches", "encode")
        if hasattr(model, "build_attention_mask"):
            phases.wrap(model, "build_attention_mask", "mask")
        else:
            phases.wrap(modeling, "create_causal_mask", "mask")
        phases.wrap(VIST2Cache, "compact", "compact")
        if hasattr(modeling, "DecodeGraph"):  # a replayed step runs no Python inside: the language model's time
            phases.wrap(modeling.DecodeGraph, "__call__", "lm")

    gc.collect()
    rss_loaded = common.rss_bytes()
    peak_reset = common.reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        cuda_loaded = torch.cuda.memory_allocated()

    runs = []
    result = None
    count_flops = case.get("flops", True)
    prefill_flops = {}
    last = None
    repeats = case.get("repeats", 1)
    for repeat in range(repeats):
        phases.reset()
        # On a GPU kernels run asynchronously: phase times need a synchronisation at each phase boundary, which slows
        # the run down, so with repeats the first run is the profiled one and the others are timed without it.
        profiled = device.type != "cuda" or repeats == 1 or repeat == 0
        phases.sync = sync if device.type == "cuda" and profiled else None
        for stage in kept:
            kept[stage] = rendered[stage] = 0
        last = None
        gc.collect()
        # The prefill is timed as generate(max_new_tokens=1) (time to first token) and the decode as the continuation
        # of that generation from its cache (the standard transformers way to resume; VIST2's cache resumes the same
        # way, tests/test_benchmarks.py checks it). The first timed run counts the prefill's FLOPs: the counter is on
        # for the first call only (its overhead: a few hundred Python dispatches against seconds of compute), so the
        # decode is timed without it.
        counter = common.flop_counter() if count_flops and repeat == 0 else None
        phases.start_sampling()
        sync()
        t0 = clock()
        with counter if counter is not None else contextlib.nullcontext():
            with phases.phase("inputs"):
                inputs = make_inputs(prompt_ids)
            first = generate(inputs, continuation[:1], 1)
            sync()
            t_first = clock()
        if counter is not None:
            prefill_flops.update(common.flops_by_part(counter))
        phases.stage = "decode"
        entries = [common.kv_cache_entries(first[CACHE_KWARG])]  # cache size after each forward (FLOP sums)
        sizes = common.StepRecorder(lambda cache=first[CACHE_KWARG]: common.kv_cache_entries(cache))
        t_decode = clock()
        out = generate(resume_inputs(first), continuation[1:], new_tokens - 1, streamer=sizes) \
            if new_tokens > 1 else first
        sync()
        t_end = clock()
        phases.stop_sampling()
        generated = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        cache = out[CACHE_KWARG]
        phase_times = phases.as_dict()
        for stage, seconds in (("prefill", t_first - t0), ("decode", t_end - t_decode)):
            spent = sum(p["seconds"] for p in phase_times.get(stage, {}).values())
            phase_times.setdefault(stage, {}).setdefault("other", {"seconds": 0.0, "calls": 0})
            phase_times[stage]["other"]["seconds"] += seconds - spent
            phase_times[stage]["_total"] = {"seconds": seconds, "calls": 1}
        run = {
            "ttft_s": t_first - t0,
            "decode_s": t_end - t_decode,
            "total_s": t_first - t0 + t_end - t_decode,
            "decode_tok_s": (new_tokens - 1) / (t_end - t_decode) if new_tokens > 1 else None,
            "phases": phase_times,
            "flop_counter_in_prefill": counter is not None,
            "profiled": profiled,
            "loadavg": os.getloadavg(),
        }
        runs.append(run)
        if result is None:
            pixels = inputs.get("pixel_values")
            result = {
                "prompt_layout_tokens": int(inputs["input_ids"].shape[1]),
                "pixel_values_bytes": int(pixels.numel() * pixels.element_size()) if pixels is not None else 0,
                "generated_matches_forced": generated == continuation,
                "kv_bytes": common.kv_cache_bytes(cache),
                "kv_entries": common.kv_cache_entries(cache),
                "chunks_kept_as_text": {"prompt": kept["prefill"], "decode": kept["decode"]},
                "chunks_rendered": dict(rendered),
                "cuda_graphs": common.decode_graph_state(cache),
            }
        last, last_entries = out, entries + sizes.values
        del out, cache, inputs, first, sizes  # (the recorder holds the cache: the next run must not find it alive)
    peak = common.peak_rss_bytes()
    sampled_peak = max((p.get("peak_rss", 0) for run in runs for stage in run["phases"].values() for p in stage.values()),
                       default=0)
    best = min(runs, key=lambda run: run["total_s"])
    timed = [run for run in runs if not run["profiled"]] or runs  # on a GPU with repeats: runs without phase syncs
    result.update({
        "case": {k: v for k, v in case.items() if k != "data"},
        "model": model_label(ratio, case.get("variant")),
        "core_sha256": core_fingerprint(),
        "read_tokens_match": read_tokens_match,
        "params": params,
        "rss_start": rss_start,
        "rss_loaded": rss_loaded,
        "peak_rss": peak if peak_reset else max(peak, sampled_peak),
        "peak_rss_reset": peak_reset,
        "peak_delta": (peak if peak_reset else max(peak, sampled_peak)) - rss_loaded,
        "ttft_s": min(run["ttft_s"] for run in timed),
        "decode_tok_s": max(run["decode_tok_s"] or 0 for run in timed),
        "runs": runs,
        "best_run_phases": min((run for run in runs if run["profiled"]), key=lambda run: run["total_s"])["phases"],
    })
    if device.type == "cuda":
        result["cuda_peak_delta"] = torch.cuda.max_memory_allocated() - cuda_loaded
    phases.unwrap()
    processor.sketch_chunks = original_sketch
    if case.get("profile"):
        try:  # a profiler that fails here must not lose the case's measurements
            first = [None]

            def prefill():
                first[0] = generate(make_inputs(prompt_ids), continuation[:1], 1)

            result["profile"] = profile_run(prefill, sync)
            # Decode: 16 steps that close no chunk (the prompt ends on a chunk boundary, so the step after the first
            # token closes one; it runs unprofiled), per step.
            after = generate(resume_inputs(first[0]), continuation[1:2], 1)
            steps = profile_run(lambda: generate(resume_inputs(after), continuation[2:18], 16), sync)
            result["profile_decode_step"] = {k: v / 16 for k, v in steps.items() if isinstance(v, (int, float))}
        except Exception as error:  # noqa: BLE001
            result["profile_error"] = repr(error)

    if count_flops:
        # Decode FLOPs: continue the last timed generation with the counter on, up to and just past the next chunk
        # closure (VIST2) or for 3 forwards (baseline), and sum the whole decode from those counted forwards and the
        # cache sizes recorded during the timed run (common.decode_flops_from_reference; exact for dense attention,
        # checked on every counted forward and in tests).
        started = time.perf_counter()
        m = config.visual_tokens_per_chunk
        cache = last[CACHE_KWARG]
        open_length = getattr(cache, "open_length", None)
        window_tokens = (L - open_length[0] + 2 if open_length else L + 2) if is_vist2 else 3
        forced = ids[context + new_tokens : context + new_tokens + window_tokens]
        counter = common.flop_counter()
        recorder = common.StepRecorder(lambda: (common.flops_by_part(counter), common.kv_cache_entries(cache)))
        sequences = last.sequences
        with counter:
            more = generate(resume_inputs(last), forced, window_tokens, streamer=recorder)
        window = common.per_step([flops for flops, _ in recorder.values])
        all_entries = last_entries + [n for _, n in recorder.values]
        decode, consistent = common.decode_flops_from_reference(
            window, all_entries, new_tokens, common.attention_flops_per_entry(config.text_config), m + 1)
        result["flops"] = {
            "prefill": prefill_flops,
            "decode": decode,
            "decode_tokens": new_tokens - 1,
            "window_forwards": len(window),
            "window_check": bool(consistent),
            "window_matches_forced": more.sequences[0, sequences.shape[1] :].tolist() == forced,
            "total": {k: prefill_flops.get(k, 0) + decode.get(k, 0) for k in set(prefill_flops) | set(decode)},
            "seconds": time.perf_counter() - started,
        }
    return result


def profile_run(run, sync) -> dict:
    """`run()` under torch.profiler: wall time, and on a GPU the kernels it ran, how long they kept the GPU busy, how
    many launch calls the host made (the launch-bound share is wall minus busy) and the GPU peak above the start."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        run()
        sync()
        wall = time.perf_counter() - started
    rows = prof.key_averages()
    kernels = [row for row in rows if row.device_type == DeviceType.CUDA]
    launches = sum(row.count for row in rows if row.key in ("cudaLaunchKernel", "cudaLaunchKernelExC",
                                                            "cuLaunchKernel", "cuLaunchKernelEx"))
    busy = sum(getattr(row, "self_device_time_total", 0) for row in kernels) / 1e6
    return {"wall_s": wall, "kernels": sum(row.count for row in kernels), "kernel_launch_calls": launches,
            "peak_delta": torch.cuda.max_memory_allocated() - before if cuda else None,
            "gpu_busy_s": busy, "top_kernels": {row.key[:80]: row.count for row in
                                                sorted(kernels, key=lambda r: -r.count)[:8]}}


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------


def run_all(args, path: Path) -> dict:
    """Runs every case; `path` holds the results so far after each case, so a run cut short keeps what it measured
    (`--report-only path` writes its report)."""
    tokenizer = common.load_tokenizer()
    need = max(args.contexts) + args.new_tokens + args.chunk_size + 8  # + the FLOP window
    ids, text_info = common.benchmark_token_ids(tokenizer, need)
    results = {
        "command": "python benchmarks/vist2_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": common.machine_description(),
        "text": text_info,
        "args": vars(args),
        "geometry": {r: common.GEOMETRY[r] for r in sorted(set(args.ratios) | set(args.read_ratios))},
        "core_sha256": core_fingerprint(),
        "cases": [],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=RESULTS, prefix=".tmp-") as tmp:  # /tmp is shared and gets cleaned
        data = Path(tmp, "ids.json")
        data.write_text(json.dumps({"ids": ids}))
        order = [(None, None)] + variant_order(args.ratios, args.read_ratios)
        for context in args.contexts:
            for ratio, variant in order:
                case = dict(preset=args.preset, context=context, new_tokens=args.new_tokens, ratio=ratio,
                            variant=variant, repeats=args.repeats, flops=not args.no_flops, threads=args.threads,
                            device=args.device, dtype=args.dtype, chunk_size=args.chunk_size,
                            read_group=args.read_group, clock=args.clock, profile=args.profile, data=str(data),
                            cuda_graphs=args.cuda_graphs)
                case_file, out_file = Path(tmp, "case.json"), Path(tmp, "out.json")
                case_file.write_text(json.dumps(case))
                load_before = os.getloadavg()
                started = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--worker", str(case_file), "--worker-out",
                                       str(out_file)], capture_output=True, text=True,
                                      env=dict(os.environ, **(MALLOC_TRIM if args.malloc == "trim" else {})))
                wall = time.perf_counter() - started
                label = f"ctx={context} {model_label(ratio, variant)}"
                if proc.returncode != 0:
                    print(f"[{label}] FAILED\n{proc.stderr[-4000:]}", file=sys.stderr)
                    results["cases"].append({"case": {k: v for k, v in case.items() if k != "data"},
                                             "model": model_label(ratio, variant),
                                             "error": proc.stderr[-2000:]})
                    path.write_text(json.dumps(results, indent=1))
                    continue
                result = json.loads(out_file.read_text())
                result["wall_s"] = wall
                result["loadavg_before"] = load_before
                result["loadavg_after"] = os.getloadavg()
                results["cases"].append(result)
                print(f"[{label}] {wall:.0f}s ttft={result['ttft_s']:.2f}s decode={result['decode_tok_s']:.1f} tok/s "
                      f"kv={result['kv_bytes'] / 2**20:.1f}MiB peakΔ={result['peak_delta'] / 2**20:.0f}MiB "
                      f"load={load_before[0]:.2f}", flush=True)
                path.write_text(json.dumps(results, indent=1))
    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------

MiB = 2**20


def _index(results):
    table = {}
    for case in results["cases"]:
        if "error" not in case:
            table[(case["case"]["context"], case["model"])] = case
    return table


VARIANTS = ("core", "read")


def variant_order(ratios, read_ratios=()):
    """(ratio, variant) in run order: r = 4 first (right after the baseline), then the others."""
    chosen = {"core": set(ratios), "read": set(read_ratios)}
    order = []
    for ratio in sorted(set().union(*chosen.values()), key=lambda r: (r != 4, r)):
        order += [(ratio, variant) for variant in VARIANTS if ratio in chosen[variant]]
    return order


def model_order(results):
    args = results["args"]
    pairs = sorted(variant_order(args["ratios"], args.get("read_ratios", [])),
                   key=lambda p: (p[0], VARIANTS.index(p[1])))
    return ["baseline"] + [model_label(r, v) for r, v in pairs]


def _prefill_flops(case):
    return case.get("flops", {}).get("prefill", {}).get("total")


def _decode_flops_per_token(case):
    flops = case.get("flops")
    return flops["decode"]["total"] / max(flops["decode_tokens"], 1) if flops else None


def _total_flops(case):
    return case.get("flops", {}).get("total", {}).get("total")


def _share(case, stage, names=("render", "normalize", "encode")):
    phases = case["best_run_phases"].get(stage, {})
    spent = sum(phases.get(n, {}).get("seconds", 0.0) for n in names)
    total = phases.get("_total", {}).get("seconds", 0.0)
    return spent / total if total else 0.0


def metrics(case) -> dict:
    return {
        "kv": case["kv_bytes"],
        "mem": case.get("cuda_peak_delta", case["peak_delta"]),  # on a GPU: its memory, above the weights
        "mem_total": case["peak_rss"],
        "prefill_flops": _prefill_flops(case),
        "decode_flops": _decode_flops_per_token(case),
        "flops": _total_flops(case),
        "ttft": case["ttft_s"],
        "decode": case["decode_tok_s"],
    }


def _ratio(a, b):
    return a / b if a is not None and b else None


def _fmt(value, spec, suffix=""):
    return "n/a" if value is None else format(value, spec) + suffix


def summary_rows(results):
    """(context, model, metrics, ratios vs baseline) for every measured case."""
    table = _index(results)
    rows = []
    for context in results["args"]["contexts"]:
        base = table.get((context, "baseline"))
        for model in model_order(results):
            case = table.get((context, model))
            if case is None:
                continue
            m = metrics(case)
            b = metrics(base) if base else {}
            ratios = {k: _ratio(m[k], b.get(k)) for k in ("kv", "mem", "mem_total", "prefill_flops", "decode_flops",
                                                          "flops")}
            ratios["ttft_speedup"] = _ratio(b.get("ttft"), m["ttft"])
            ratios["decode_speedup"] = _ratio(m["decode"], b.get("decode"))
            rows.append((context, model, case, m, ratios))
    return rows


def target_checks(results, model="vist2-r4"):
    """Issue-7 targets at r = 4: list of (target, context, value, met)."""
    checks = []
    rows = [r for r in summary_rows(results) if r[1] == model]
    ttfts = []
    for context, _, _, _, ratios in rows:
        if context >= 8192 and ratios["kv"] is not None:
            checks.append((TARGETS_R4["kv"][0], context, f"{ratios['kv']:.1%}", ratios["kv"] <= 0.26))
        if ratios["mem"] is not None:
            checks.append((TARGETS_R4["mem"][0], context, f"{ratios['mem']:.1%}", ratios["mem"] <= 0.23))
        if ratios["flops"] is not None:
            checks.append((TARGETS_R4["flops"][0] + " (prefill + decode)", context, f"{ratios['flops']:.1%}",
                           ratios["flops"] <= 0.26))
        if ratios["ttft_speedup"] is not None:
            ttfts.append((context, ratios["ttft_speedup"]))
        if context >= 32768 and ratios["decode_speedup"] is not None:
            checks.append((TARGETS_R4["decode"][0], context, f"{ratios['decode_speedup']:.2f}x",
                           ratios["decode_speedup"] >= 2.0))
    for i, (context, speedup) in enumerate(ttfts):
        if context >= 8192:
            rising = all(speedup >= s for _, s in ttfts[:i])
            checks.append((TARGETS_R4["ttft"][0], context, f"{speedup:.2f}x", speedup >= 3.0 and rising))
    return checks


def write_markdown(results, path: Path):
    r = results
    lines = [f"# VIST2 vs its text-only backbone: `{r['args']['preset']}`", ""]
    lines += ["Command (repository root):", "", "```", r["command"], "```", "",
              f"Run {r['started']} to {r.get('finished', '?')}. Every (model, context) case ran in a fresh subprocess, "
              "interleaved per context (baseline, then VIST2 r=4, r=2, r=8); the baseline is `model.language_model` "
              "of the same model (same weights), reading the same prompt token ids and generating the same forced "
              "continuation (greedy, same `max_new_tokens`)."
              + (" Times are CPU seconds of each case's main thread (`--clock thread`), not wall time."
                 if r["args"].get("clock") == "thread" else ""), ""]
    m = r["machine"]
    gpus = [f"GPU: {m['nvidia_smi'] or ', '.join(m['gpu'])}"] if m.get("gpu") else []
    lines += ["## Machine", "", "```"] + gpus + m["lscpu"] + [f"nproc: {m['nproc']}"] + m["free_g"] + [
        f"python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"torch threads {m['torch_threads']}, {m['platform']}", "```", ""]
    t = r["text"]
    lines += ["## Text", "",
              f"Docstrings of the Python standard library (`tokenization/build_corpus.py`), whitespace collapsed to one "
              f"paragraph per docstring, **printable ASCII only** ({t['dropped_non_ascii']} of {t['documents']} "
              f"documents dropped: Pillow's default font draws ASCII, other chunks would be kept as text). "
              f"{t['chars_per_token']:.2f} characters per token (demo tokenizer, 4096 ids). The prompt is the first "
              f"N tokens; the generation is forced to be the next `new_tokens` tokens of the same text.", ""]
    lines += ["Sketch geometry (chunk_size L = 256, 16 px patches, aligner merge s x s):", "",
              "| r | m | sketch H x W | merge | cell (w x h) | cells |", "|---|---|---|---|---|---|"]
    for ratio, g in sorted(r["geometry"].items(), key=lambda kv: int(kv[0])):
        cols, rows = g["image_width"] // g["char_width"], g["image_height"] // g["line_height"]
        lines.append(f"| {ratio} | {256 // int(ratio)} | {g['image_height']} x {g['image_width']} | {g['merge_size']} | "
                     f"{g['char_width']} x {g['line_height']} | {cols} x {rows} |")
    lines.append("")

    rows = summary_rows(r)
    lines += ["## Results", "",
              "Ratios in parentheses are VIST2 / baseline (memory, FLOPs) or speed-ups (TTFT, decode). "
              "KV = bytes of all keys and values in the cache after generation. Peak Δ = on a GPU, its peak allocated "
              "memory above the loaded model's; on a CPU, peak RSS during the timed "
              "generation minus RSS after model load and warm-up (VmHWM reset); peak total = whole-process peak. "
              "FLOPs from `torch.utils.flop_counter` (attention counted as the kernel computes it: every pair of a masked call, the triangle of a causal one; see `common.sdpa_flops`); "
              "total = prefill + all decode steps. TTFT = building inputs (VIST2: chunking, rendering, "
              "normalising) + prefill + first token. Share = time in render + normalise + encode / stage time.", "",
              "| context | model | KV MiB | peak Δ MiB | peak total MiB | prefill GFLOP | decode MFLOP/token | "
              "total GFLOP | TTFT s | decode tok/s | render+encode share (prefill / decode) | kept as text | "
              "load avg (1 min) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for context, model, case, mt, ra in rows:
        base = model == "baseline"

        def rel(key, spec=".1%"):
            return "" if base or ra[key] is None else f" ({format(ra[key], spec)})"

        kept = case["chunks_kept_as_text"]
        share = "-" if base else f"{_share(case, 'prefill'):.0%} / {_share(case, 'decode'):.0%}"
        lines.append(
            f"| {context} | {model} | {mt['kv'] / MiB:.1f}{rel('kv')} | {mt['mem'] / MiB:.0f}{rel('mem')} | "
            f"{mt['mem_total'] / MiB:.0f}{rel('mem_total')} | "
            f"{_fmt(mt['prefill_flops'] and mt['prefill_flops'] / 1e9, '.1f')}{rel('prefill_flops')} | "
            f"{_fmt(mt['decode_flops'] and mt['decode_flops'] / 1e6, '.1f')}{rel('decode_flops')} | "
            f"{_fmt(mt['flops'] and mt['flops'] / 1e9, '.1f')}{rel('flops')} | "
            f"{mt['ttft']:.2f}{rel('ttft_speedup', '.2f').replace(')', 'x)')} | "
            f"{mt['decode']:.1f}{rel('decode_speedup', '.2f').replace(')', 'x)')} | "
            f"{share} | {'-' if base else kept['prompt'] + kept['decode']} | {case['loadavg_before'][0]:.2f} |")
    lines.append("")

    for model in [m for m in model_order(r) if m.startswith("vist2-r4")]:
        checks = target_checks(r, model)
        if checks:
            lines += [f"## Targets at r = 4 (issue 7): `{model}`", "", "| target | context | measured | met |",
                      "|---|---|---|---|"]
            lines += [f"| {name} | {ctx} | {value} | {'yes' if ok else '**no**'} |" for name, ctx, value, ok in checks]
            lines.append("")

    lines += ["## Where the time goes (best run, seconds)", "",
              "Phases: inputs = building model inputs outside render/normalise; render = `processor.sketch_chunks`; "
              "normalize = `processor.pixel_values`; encode = `model.encode_sketches` (vision tower + aligner); "
              "mask = `create_causal_mask`; lm = decoder layers; lm_head; compact = `VIST2Cache.compact`; "
              "other = generate's own loop (logits processing, stopping, streamer, cache bookkeeping).", "",
              "| context | model | stage | inputs | render | normalize | encode | mask | lm | lm_head | compact | other "
              "| peak RSS phase |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = ("inputs", "render", "normalize", "encode", "mask", "lm", "lm_head", "compact", "other")
    for context, model, case, _, _ in rows:
        for stage in ("prefill", "decode"):
            ph = case["best_run_phases"].get(stage, {})
            peak_phase = max(((n, p.get("peak_rss", 0)) for n, p in ph.items()), key=lambda x: x[1], default=("-", 0))
            cells = " | ".join(f"{ph[n]['seconds']:.3f}" if n in ph else "-" for n in names)
            lines.append(f"| {context} | {model} | {stage} | {cells} | {peak_phase[0]} |")
    lines.append("")

    lines += ["## FLOPs by part (GFLOP)", "", "| context | model | stage | vision tower | aligner | language model | "
              "total |", "|---|---|---|---|---|---|---|"]
    for context, model, case, _, _ in rows:
        flops = case.get("flops")
        if not flops:
            continue
        for stage in ("prefill", "decode"):
            f = flops[stage]
            lines.append(f"| {context} | {model} | {stage} | {f.get('vision_tower', 0) / 1e9:.2f} | "
                         f"{f.get('aligner', 0) / 1e9:.3f} | {f.get('language_model', 0) / 1e9:.2f} | "
                         f"{f.get('total', 0) / 1e9:.2f} |")
    lines.append("")
    profiled = [(context, model, case) for context, model, case, _, _ in rows if case.get("profile")]
    if profiled:
        lines += ["## Under torch.profiler (`--profile`): one prefill + first token, and decode steps", "",
                  "Kernels the GPU ran, how long they kept it busy, and the host's kernel launch calls; wall time "
                  "minus busy time is what the host cost beyond the GPU's work (launches, Python, the processor).", "",
                  "| context | model | what | wall ms | GPU busy ms | kernels | launch calls | GPU peak above start "
                  "MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for context, model, case in profiled:
            for what, p in (("prefill + first token", case["profile"]),
                            ("decode step (mean of 16)", case.get("profile_decode_step"))):
                if p:
                    peak = p.get("peak_delta")
                    lines.append(f"| {context} | {model} | {what} | {1e3 * p['wall_s']:.1f} | "
                                 f"{1e3 * p['gpu_busy_s']:.1f} | {p['kernels']:.0f} | {p['kernel_launch_calls']:.0f} | "
                                 f"{_fmt(peak and peak / MiB, '.0f')} |")
        lines.append("")
    lines += ["## Sanity", "", "| context | model | prompt layout tokens | KV entries | pixel_values MiB | "
              "generated == forced | chunks rendered (prefill / decode) | decode as a CUDA graph | wall s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for context, model, case, _, _ in rows:
        rendered = case["chunks_rendered"]
        graphs = case.get("cuda_graphs", "-") if model != "baseline" else "-"
        lines.append(f"| {context} | {model} | {case['prompt_layout_tokens']} | {case['kv_entries']} | "
                     f"{case['pixel_values_bytes'] / MiB:.1f} | {case['generated_matches_forced']} | "
                     f"{rendered['prefill']} / {rendered['decode']} | {graphs} | {case.get('wall_s', 0):.0f} |")
    errors = [c for c in r["cases"] if "error" in c]
    if errors:
        lines += ["", "## Failed cases", ""]
        lines += [f"- {c['model']} at {c['case']['context']}: `{c['error'].strip().splitlines()[-1]}`" for c in errors]
    lines.append("")
    path.write_text("\n".join(lines))


def write_plot(results, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary_rows(results)
    models = model_order(results)
    panels = [("kv", "KV cache at end (MiB)", 1 / MiB), ("mem", "peak memory Δ (MiB)", 1 / MiB),
              ("prefill_flops", "prefill GFLOP", 1e-9), ("decode_flops", "decode MFLOP / token", 1e-6),
              ("ttft", "time to first token (s)", 1), ("decode", "decode tokens / s", 1)]
    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    axes = axes.ravel()
    styles = {"baseline": dict(color="black", marker="o", lw=2)}
    colors = {"vist2-r2": "tab:blue", "vist2-r4": "tab:red", "vist2-r8": "tab:green"}
    for ax, (key, title, scale) in zip(axes, panels):
        for model in models:
            pts = [(c, m[key] * scale) for c, mod, _, m, _ in rows if mod == model and m[key] is not None]
            if pts:
                if model in styles:
                    style = styles[model]
                else:
                    style = dict(color=colors.get("-".join(model.split("-")[:2])), marker="s",
                                 ls="--" if model.count("-") > 1 else "-")
                ax.plot(*zip(*pts), label=model, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("context tokens")
        ax.grid(True, which="both", alpha=0.3)
    r4_models = [m for m in models if m.startswith("vist2-r4")]
    for ax, title, metrics_ in (
        (axes[6], "r = 4: VIST2 / baseline (dotted: target)",
         (("kv", "KV", 0.26), ("mem", "peak mem Δ", 0.23), ("flops", "FLOPs (total)", 0.26))),
        (axes[7], "r = 4: speed-up over baseline (dotted: target)",
         (("ttft_speedup", "TTFT speed-up", 3.0), ("decode_speedup", "decode speed-up", 2.0))),
    ):
        for i, (key, label, target) in enumerate(metrics_):
            color = f"C{i}"
            ax.axhline(target, color=color, ls=":", lw=1)
            for model in r4_models:
                pts = [(c, ra[key]) for c, mod, _, _, ra in rows if mod == model and ra[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="s", color=color, ls="--" if model.count("-") > 1 else "-",
                            label=label + ("" if model == "vist2-r4" else f" ({model})"))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("context tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].legend()
    m = results["machine"]
    cpu = next((line.split(":", 1)[1].strip() for line in m["lscpu"] if line.startswith("Model name")), "?")
    fig.suptitle(f"VIST2 ({results['args']['preset']}) vs text-only backbone, {results['args']['new_tokens']} new "
                 f"tokens; {cpu}, {m['nproc']} cores, torch {m['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small", choices=sorted(common.PRESETS))
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--ratios", type=int, nargs="*", default=[2, 4, 8], choices=sorted(common.GEOMETRY),
                        help="compression ratios run with the core as it is")
    parser.add_argument("--chunk-size", type=int, default=common.CHUNK_SIZE)
    parser.add_argument("--repeats", type=int, default=1, help="timed generations per case (best is reported)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting generation")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per case (default 1: on a shared machine more threads than free cores "
                             "make OpenMP spin-wait and distort small decode kernels; 0 = torch's default)")
    parser.add_argument("--read-ratios", type=int, nargs="*", default=[4], choices=sorted(common.GEOMETRY),
                        help="also run these ratios as 'vist2-rN-read': the prompt goes in through the core's "
                             "streaming model.read(processor, text) (tokenized, rendered, encoded and cached group "
                             "by group) instead of generate(**processor(text)); then the same generate()")
    parser.add_argument("--read-group", type=int, default=None,
                        help="sketches_per_step of model.read (default: the model's, sized by its memory budget)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: time CPU cases in CPU seconds of the main thread (with --threads 1), which a "
                             "shared machine's load does not inflate")
    parser.add_argument("--malloc", choices=("trim", "default"), default="trim",
                        help="trim: peak RSS is live memory (slower allocations); default: the usual glibc allocator")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one prefill + first token (kernels, GPU busy time, launch calls)")
    parser.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                        help="VIST2's decode steps as a CUDA graph: auto (generate's default: on a GPU), on (on a CPU: "
                             "the fixed-shape step, uncaptured), off")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: the preset's")
    parser.add_argument("--name", default=None, help="results/<name>.{json,md,png} (default: the preset)")
    parser.add_argument("--report-only", metavar="JSON", help="rewrite .md and .png from a results JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = run_case(json.loads(Path(args.worker).read_text()))
        Path(args.worker_out).write_text(json.dumps(result))
        return
    if args.report_only:
        path = Path(args.report_only)
        results = json.loads(path.read_text())
    else:
        if args.chunk_size != common.CHUNK_SIZE:
            raise SystemExit("GEOMETRY is sized for chunk_size 256; adjust common.GEOMETRY before changing it")
        path = RESULTS / f"{args.name or args.preset}.json"
        results = run_all(args, path)
        path.write_text(json.dumps(results, indent=1))
    write_markdown(results, path.with_suffix(".md"))
    write_plot(results, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
