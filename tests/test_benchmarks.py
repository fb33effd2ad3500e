"""Correctness of the benchmark helpers (benchmarks/common.py). No timings are asserted here, ever."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from vist2.modeling_vist2 import CACHE_KWARG, VIST2ForCausalLM  # noqa: E402

TEXT = (
    "Global context compression renders every finished chunk of text into a small sketch image. "
    "A vision encoder reads the sketch and the language model sees a quarter as many visual tokens. "
    "The open chunk stays as text, so the model keeps writing while its memory stays small. "
) * 8


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokenizer(TEXT, add_special_tokens=False)["input_ids"]


def forced_generate(model, inputs, forced, processor=None):
    kwargs = {"processor": processor} if processor is not None else {}
    lp = LogitsProcessorList([common.ForceTokens(forced, inputs["input_ids"].shape[1])])
    with torch.inference_mode():
        return model.generate(**inputs, **kwargs, max_new_tokens=len(forced), min_new_tokens=len(forced),
                              do_sample=False, logits_processor=lp, return_dict_in_generate=True, pad_token_id=0)


def test_kv_cache_bytes_counts_every_key_and_value():
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), 0)
    cache.update(torch.zeros(1, 2, 5, 8, dtype=torch.bfloat16), torch.zeros(1, 2, 5, 4, dtype=torch.bfloat16), 1)
    assert common.kv_cache_bytes(cache) == 2 * 5 * 8 * 4 * 2 + 2 * 5 * 8 * 2 + 2 * 5 * 4 * 2
    assert common.kv_cache_entries(cache) == 5


def test_a_fixed_capacity_cache_counts_the_entries_it_holds_not_its_spare_slots():
    from vist2.modeling_vist2 import FixedLayer

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), 0)
    cache.layers[0] = FixedLayer(cache.layers[0], capacity=64)
    assert common.kv_cache_entries(cache) == 5 and common.kv_cache_bytes(cache) == 2 * 2 * 5 * 8 * 4


def test_kv_bytes_match_entries_for_both_models(model, processor, ids):
    cfg = model.config.text_config
    per_entry = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    L, forced = model.config.chunk_size, ids[100:100 + 20]
    for out in (forced_generate(model, common.vist2_inputs(processor, ids[:100]), forced, processor),
                forced_generate(model.language_model, common.baseline_inputs(ids[:100]), forced)):
        cache = out[CACHE_KWARG]
        assert common.kv_cache_bytes(cache) == per_entry * common.kv_cache_entries(cache)
    # VIST2 holds closed chunks as m entries plus the open chunk; 119 text tokens went through the model.
    vist2_entries = common.kv_cache_entries(forced_generate(model, common.vist2_inputs(processor, ids[:100]), forced,
                                                            processor)[CACHE_KWARG])
    assert vist2_entries == (119 // L) * model.config.visual_tokens_per_chunk + 119 % L
    baseline = forced_generate(model.language_model, common.baseline_inputs(ids[:100]), forced)[CACHE_KWARG]
    assert common.kv_cache_entries(baseline) == 119


def test_baseline_and_vist2_read_the_same_tokens(processor, ids):
    prompt = ids[:90]
    base = common.baseline_inputs(prompt)
    assert base["input_ids"][0].tolist() == prompt and base["attention_mask"].all()
    seen = []
    original = processor.sketch_chunks
    processor.sketch_chunks = lambda chunks: (seen.extend(chunks), original(chunks))[1]
    try:
        vist = common.vist2_inputs(processor, prompt)
    finally:
        del processor.sketch_chunks
    L, m = processor.chunk_size, processor.visual_tokens_per_chunk
    closed = (len(prompt) - 1) // L
    assert [t for chunk in seen for t in chunk] == prompt[: closed * L]  # every closed chunk was rendered, in order
    assert int(vist["chunks_kept_as_text"].sum()) == 0
    assert vist["pixel_values"].shape[0] == closed
    row = vist["input_ids"][0].tolist()
    assert row[: closed * m] == [processor.sketch_token_id] * (closed * m)
    assert row[closed * m :] == prompt[closed * L :]  # the open chunk is the same text tokens


def test_forced_continuation_is_generated_by_both_and_chunks_close(model, processor, ids):
    forced = ids[64 : 64 + 40]
    rendered = []
    original = processor.sketch_chunks

    def counting(chunks):
        images, reports = original(chunks)
        rendered.extend(images)
        return images, reports

    processor.sketch_chunks = counting
    try:
        vist = forced_generate(model, common.vist2_inputs(processor, ids[:64]), forced, processor)
    finally:
        del processor.sketch_chunks
    base = forced_generate(model.language_model, common.baseline_inputs(ids[:64]), forced)
    assert vist.sequences[0, -len(forced):].tolist() == forced
    assert base.sequences[0, -len(forced):].tolist() == forced
    assert len(rendered) >= 3 + 2 and all(image is not None for image in rendered)  # prompt chunks + decode closures


def test_flop_counter_sees_cpu_attention_and_every_part_of_vist2(model, processor, ids):
    q, k = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 11, 8)
    with common.flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    assert counter.get_total_flops() == 2 * 4 * 7 * 11 * 8 * 2
    with common.flop_counter() as counter:  # a causal kernel computes the triangle only
        torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :7], k[:, :, :7], is_causal=True, enable_gqa=True)
    assert counter.get_total_flops() == 2 * 4 * (7 * 8 // 2) * 8 * 2

    with common.flop_counter() as counter:
        forced_generate(model, common.vist2_inputs(processor, ids[:64]), ids[64 : 64 + 20], processor)
    parts = common.flops_by_part(counter)
    assert parts["vision_tower"] > 0 and parts["aligner"] > 0 and parts["decoder"] > 0 and parts["lm_head"] > 0
    assert parts["vision_tower"] + parts["aligner"] + parts["language_model"] == parts["total"]


def test_phases_wrap_and_unwrap(processor):
    phases = common.Phases()
    before = processor.sketch_chunks
    phases.wrap(processor, "sketch_chunks", "render")
    processor.sketch_chunks([[5, 6, 7]])
    phases.unwrap()
    assert "sketch_chunks" not in vars(processor) and processor.sketch_chunks == before
    assert phases.calls[("prefill", "render")] == 1 and phases.time[("prefill", "render")] >= 0


@pytest.mark.parametrize("preset", sorted(common.PRESETS))
@pytest.mark.parametrize("ratio", sorted(common.GEOMETRY))
def test_presets_construct(preset, ratio):
    tokenizer = common.load_tokenizer()
    config = common.build_config(preset, ratio, tokenizer)
    assert config.visual_tokens_per_chunk == common.CHUNK_SIZE // ratio
    if preset == "qwen3-0.6b" and ratio == 4:
        with torch.device("meta"):
            model = VIST2ForCausalLM(config)
        params = {name: sum(p.numel() for p in getattr(model, name).parameters())
                  for name in ("language_model", "vision_tower")}
        assert 0.55e9 < params["language_model"] < 0.65e9  # Qwen3-0.6B: 596M with tied embeddings
        assert 0.08e9 < params["vision_tower"] < 0.1e9  # SigLIP2-base vision: ~86M


def test_benchmark_text_is_printable_ascii_and_fits_the_sketches():
    tokenizer = common.load_tokenizer()
    ids, info = common.benchmark_token_ids(tokenizer, 4 * common.CHUNK_SIZE)
    text = tokenizer.decode(ids)
    assert text.isascii() and info["ascii_documents"] > 3000
    from vist2.processing_vist2 import render_with_policy

    for ratio in sorted(common.GEOMETRY):
        settings = common.build_config("cpu-small", ratio, tokenizer).sketch_settings
        for i in range(0, len(ids), common.CHUNK_SIZE):
            image, report = render_with_policy(tokenizer.decode(ids[i : i + common.CHUNK_SIZE]), settings)
            assert image is not None, (ratio, report)


@pytest.mark.parametrize("is_vist2", [True, False])
def test_decode_flops_from_a_few_counted_forwards_equal_a_full_count(model, processor, ids, is_vist2):
    """The benchmark counts a few decode forwards after the timed run (one plain step, one chunk closure) and sums
    the whole decode from them and the cache sizes it recorded; that sum must equal a forward-by-forward count."""
    m = model.config.visual_tokens_per_chunk
    prompt, new = ids[:64], 40
    lm = model if is_vist2 else model.language_model
    make = (lambda p: common.vist2_inputs(processor, p)) if is_vist2 else common.baseline_inputs
    extra = {"processor": processor} if is_vist2 else {}

    def run(inputs, forced, streamer):
        lp = LogitsProcessorList([common.ForceTokens(forced, inputs["input_ids"].shape[1])])
        with torch.inference_mode():
            return lm.generate(**inputs, **extra, max_new_tokens=len(forced), min_new_tokens=len(forced),
                               do_sample=False, logits_processor=lp, return_dict_in_generate=True, pad_token_id=0,
                               streamer=streamer)

    holder = {}
    with common.flop_counter() as counter:  # the full count, forward by forward, and the cache size after each
        recorder = common.StepRecorder(lambda: (common.flops_by_part(counter),
                                                common.kv_cache_entries(holder["cache"])))
        first = run(make(prompt), ids[64:65], None)
        after_prefill = common.flops_by_part(counter)
        holder["cache"] = first[CACHE_KWARG]
        entries = [common.kv_cache_entries(first[CACHE_KWARG])]
        seq = first.sequences
        out = run({"input_ids": seq, "attention_mask": torch.ones_like(seq), CACHE_KWARG: first[CACHE_KWARG]},
                  ids[65 : 64 + new], recorder)
    steps = common.per_step([after_prefill] + [flops for flops, _ in recorder.values])[1:]  # forwards 1 .. new-1
    entries += [n for _, n in recorder.values]
    expected = {k: sum(step.get(k, 0) for step in steps) for k in steps[0]}

    with common.flop_counter() as counter:  # a few forwards more, continuing from the cache
        recorder = common.StepRecorder(lambda: (common.flops_by_part(counter),
                                                common.kv_cache_entries(out[CACHE_KWARG])))
        seq = out.sequences
        more = run({"input_ids": seq, "attention_mask": torch.ones_like(seq), CACHE_KWARG: out[CACHE_KWARG]},
                   ids[64 + new : 64 + new + model.config.chunk_size + 1], recorder)
    assert more.sequences[0, seq.shape[1]:].tolist() == ids[64 + new : 64 + new + model.config.chunk_size + 1]
    window = common.per_step([flops for flops, _ in recorder.values])
    entries += [n for _, n in recorder.values]
    got, consistent = common.decode_flops_from_reference(window, entries, new, common.attention_flops_per_entry(
        model.config.text_config), m + 1)
    assert consistent
    assert {k: got[k] for k in expected} == expected


@pytest.mark.parametrize("mode, size", [("generate", 128), ("read", 2), ("baseline", None)])
def test_prefill_memory_case_reports_the_peak_of_inputs_and_prefill(mode, size):
    from benchmarks import prefill_memory

    case = prefill_memory.run_case(context=600, mode=mode, size=size, ratio=4)
    assert case["mode"] == mode and case["context"] == 600
    assert 0 <= case["inputs_peak_mib"] <= case["peak_mib"]


def test_op_counter_counts_each_dispatched_operator_and_can_skip_attention():
    from benchmarks.op_count import OpCounter, count_ops

    a, b = torch.ones(3), torch.ones(3)
    total, names, result = count_ops(lambda: (a + b).mul(2).sum(), skip_attention=False)
    assert total == 3 and names == {"add": 1, "mul": 1, "sum": 1} and float(result) == 12.0
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    with OpCounter(skip_attention=True) as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, k)
    assert out.shape == (1, 2, 5, 8) and counter.total >= 1
    assert any(name.startswith("_scaled_dot_product") for name in counter.counts)


def test_an_accelerator_prefills_the_qwen3_preset_in_one_pass_of_each_model_and_a_cpu_in_blocks():
    """32k tokens at r = 4 are about 8.4k entries: one language-model and one tower pass on a GPU (each pass costs
    hundreds of kernel launches), blocks on a CPU (where compute hides launches and memory is scarcer)."""
    tokenizer = common.load_tokenizer()
    with torch.device("meta"):
        model = VIST2ForCausalLM(common.build_config("qwen3-0.6b", 4, tokenizer)).to(torch.bfloat16)
    entries = 32768 // 4 + 256
    block, sketches = model.prefill_passes("auto", entries, "cuda")
    assert block >= entries and sketches >= 32768 // 256
    assert model.prefill_passes("auto", entries, "cpu")[0] < entries
    assert model.prefill_passes(None, entries, "cpu") == (entries, None)


def test_geometry_counts_the_flops_of_a_candidates_tower_on_a_sketch_as_the_processor_gives_it():
    from benchmarks import geometry

    tower = geometry.flops_per_chunk(geometry.CANDIDATES[:1])["tower"]
    assert len(tower) == 1 and next(iter(tower.values()))["flops"] > 0


def test_geometry_counts_the_rows_and_cells_a_chunk_wraps_into():
    from benchmarks import geometry

    assert geometry.fits("a" * 64, 16, 128, 4, 8)  # 2 rows of 32 cells hold 64 characters, not 65
    assert not geometry.fits("a" * 65, 16, 128, 4, 8)
    assert geometry.cells_needed("ab\ncd", 32) == 64 and geometry.cells_needed("ab\ncd", 32, "«") == 32


def test_the_decode_graph_check_compares_both_steps_over_chunk_closes(model, processor, ids):
    from benchmarks.decode_graph_check import generate_both_ways

    L = model.config.chunk_size
    result = generate_both_ways(model, processor, ids, context=4 * L, new_tokens=3 * L)
    assert result["chunk_closes"] == 3 and result["graph"] == "uncaptured"  # a CPU runs the fixed-shape step as is
    assert result["relative_difference"] < 1e-5 and result["top_token_agreement"] == 1.0


def test_every_prefill_of_a_repeated_case_starts_with_no_other_cache_alive(tmp_path, monkeypatch):
    """The peak memory of a case with repeats is that of one run: the last run's cache (the largest thing a run holds)
    is gone before the next one prefills."""
    import gc
    import json
    import weakref

    from benchmarks import vist2_bench
    from vist2.modeling_vist2 import VIST2Cache, VIST2Model

    ids, _ = common.benchmark_token_ids(common.load_tokenizer(), 1100)
    (tmp_path / "ids.json").write_text(json.dumps({"ids": ids}))
    caches, others = weakref.WeakSet(), []
    init, prefill = VIST2Cache.__init__, VIST2Model.prefill

    def spy(self, cache, *args, **kwargs):
        gc.collect()
        others.append(max([other.get_seq_length() for other in caches if other is not cache] or [0]))
        return prefill(self, cache, *args, **kwargs)
    monkeypatch.setattr(VIST2Cache, "__init__", lambda self, *a, **k: caches.add(self) or init(self, *a, **k))
    monkeypatch.setattr(VIST2Model, "prefill", spy)
    vist2_bench.run_case(dict(preset="cpu-small", context=1024, new_tokens=4, ratio=4, repeats=2, flops=False,
                              data=str(tmp_path / "ids.json")))
    assert others == [0, 0, 0]  # the warm-up's prefill, then each run's: the entries other caches hold
