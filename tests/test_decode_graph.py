"""The decode step a GPU captures as a CUDA graph (`DecodeGraph` over `FixedLayer` buffers) is the dynamic step, exactly.

A CPU cannot capture, so these tests run the fixed-shape step itself (`cuda_graphs=True`): the same function, on the same
buffers, that a GPU records once and replays."""

import pytest
import torch

from conftest import READ_BACK_OPERATORS, SAMPLE_TEXT
from vist2.modeling_vist2 import CACHE_KWARG, DecodeGraph, FixedLayer

TOLERANCE = 1e-5  # float32


@pytest.fixture(scope="module")
def ascii_only(tokenizer, config):
    return [i for i in range(len(tokenizer))
            if i == config.sketch_token_id or not tokenizer.decode([i]) or
            not all(32 <= ord(c) < 127 for c in tokenizer.decode([i]))]


def both_ways(model, processor, inputs, **kwargs):
    kwargs = dict(processor=processor, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs)
    return [model.generate(**inputs(), cuda_graphs=graphs, **kwargs) for graphs in (False, True)]


def assert_same(dynamic, fixed):
    assert fixed.sequences.tolist() == dynamic.sequences.tolist()
    for fixed_logits, dynamic_logits in zip(fixed.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(fixed_logits, dynamic_logits, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("texts", [[SAMPLE_TEXT[:400]], [SAMPLE_TEXT[:400], SAMPLE_TEXT[50:90]]])  # padding
def test_the_fixed_shape_decode_step_gives_the_dynamic_steps_tokens_and_logits(model, processor, ascii_only, texts):
    dynamic, fixed = both_ways(model, processor, lambda: processor(text=texts), max_new_tokens=200,
                               suppress_tokens=ascii_only)
    assert_same(dynamic, fixed)
    cache = fixed[CACHE_KWARG]
    assert all(isinstance(layer, FixedLayer) for layer in cache.layers)
    assert cache.get_seq_length() == dynamic[CACHE_KWARG].get_seq_length()


def test_full_buffers_grow_and_the_step_stays_exact(model, processor, ascii_only, monkeypatch):
    capacities, init = [], FixedLayer.__init__
    monkeypatch.setattr(FixedLayer, "__init__", lambda self, layer, capacity: capacities.append(capacity) or
                        init(self, layer, capacity))
    dynamic, fixed = both_ways(model, processor, lambda: processor(text=SAMPLE_TEXT[:60]), max_new_tokens=300,
                               suppress_tokens=ascii_only)
    assert_same(dynamic, fixed)
    assert len(set(capacities)) >= 2, capacities  # grown while writing


def test_a_text_read_in_a_stream_decodes_the_same_with_the_fixed_shape_step(model, processor, ascii_only):
    dynamic, fixed = both_ways(model, processor, lambda: model.read(processor, SAMPLE_TEXT[:300]), max_new_tokens=60,
                               suppress_tokens=ascii_only)
    assert_same(dynamic, fixed)


def test_sampled_sequences_decode_the_same_with_the_fixed_shape_step(model, processor, ascii_only):
    outs = []
    for graphs in (False, True):
        torch.manual_seed(5)
        outs.append(model.generate(**processor(text=SAMPLE_TEXT[:120]), processor=processor, cuda_graphs=graphs,
                                   do_sample=True, top_k=20, num_return_sequences=2, max_new_tokens=50,
                                   return_dict_in_generate=True, output_logits=True, suppress_tokens=ascii_only))
    assert_same(*outs)


def test_beam_search_decodes_without_a_graph_by_default_and_the_same_with_one(model, processor, ascii_only):
    kwargs = dict(processor=processor, num_beams=3, max_new_tokens=40, do_sample=False, suppress_tokens=ascii_only,
                  return_dict_in_generate=True, output_scores=True)
    default = model.generate(**processor(text=SAMPLE_TEXT[:100]), **kwargs)
    assert default[CACHE_KWARG].cuda_graphs is False  # its rows are reordered every step: a graph would not last
    forced = model.generate(**processor(text=SAMPLE_TEXT[:100]), cuda_graphs=True, **kwargs)
    assert forced.sequences.tolist() == default.sequences.tolist()
    torch.testing.assert_close(forced.sequences_scores, default.sequences_scores, atol=TOLERANCE, rtol=0)


def test_on_a_cpu_generate_keeps_the_backbones_decode_step(model, processor):
    out = model.generate(**processor(text=SAMPLE_TEXT[:100]), processor=processor, max_new_tokens=30,
                         do_sample=False, return_dict_in_generate=True)
    cache = out[CACHE_KWARG]
    assert cache.cuda_graphs is False and cache.decode_graph is None
    assert not any(isinstance(layer, FixedLayer) for layer in cache.layers)


@pytest.mark.parametrize("texts", [[SAMPLE_TEXT[:100]], [SAMPLE_TEXT[:100], SAMPLE_TEXT[:30]]])  # no padding; padding
def test_the_captured_step_never_waits_for_the_device_and_keeps_its_buffers_in_place(model, processor, monkeypatch,
                                                                                     texts):
    """What a CUDA graph records must read back nothing (a capture fails on a synchronisation) and must find its
    buffers where it left them, across steps and across a chunk's compaction."""
    from benchmarks.op_count import OpCounter

    inputs = processor(text=texts)
    with torch.no_grad():
        first = model(**inputs, use_cache=True, logits_to_keep=1)
    cache = first[CACHE_KWARG]
    cache.cuda_graphs, cache.processor = True, processor
    token = first.logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        token = model(input_ids=token, **{CACHE_KWARG: cache}).logits[:, -1].argmax(-1, keepdim=True)
    graph = cache.decode_graph
    assert isinstance(graph, DecodeGraph)
    buffers = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
    with OpCounter() as counter, torch.no_grad():
        graph.step(cache)
    read_backs = READ_BACK_OPERATORS & set(counter.counts)
    assert not read_backs, read_backs
    steps = model.config.chunk_size - max(cache.open_length) + 2  # through a chunk's close and on
    assert cache.get_seq_length() + model.config.visual_tokens_per_chunk + steps < cache.layers[0].keys.shape[2]
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=token, **{CACHE_KWARG: cache}).logits[:, -1].argmax(-1, keepdim=True)
    assert cache.decode_graph is graph
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == buffers


def test_a_decode_step_with_gradients_keeps_the_dynamic_cache_and_backpropagates(model, processor):
    inputs = processor(text=SAMPLE_TEXT[:100])
    first = model(**inputs, use_cache=True, logits_to_keep=1)
    cache = first[CACHE_KWARG]
    cache.cuda_graphs = True  # as on a GPU; its in-place writes would break backward
    step = model(input_ids=first.logits[:, -1].argmax(-1, keepdim=True), **{CACHE_KWARG: cache})
    assert not any(isinstance(layer, FixedLayer) for layer in cache.layers) and cache.decode_graph is None
    (first.logits.sum() + step.logits.sum()).backward()


def test_a_cache_made_under_inference_mode_decodes_on_outside_it(model, processor, ascii_only):
    kwargs = dict(processor=processor, do_sample=False, suppress_tokens=ascii_only, return_dict_in_generate=True,
                  output_logits=True)
    outs = []
    for graphs in (False, True):
        with torch.inference_mode():
            first = model.generate(**processor(text=SAMPLE_TEXT[:100]), cuda_graphs=graphs, max_new_tokens=20,
                                   **kwargs)
        sequences = first.sequences
        outs.append(model.generate(input_ids=sequences, attention_mask=torch.ones_like(sequences),
                                   **{CACHE_KWARG: first[CACHE_KWARG]}, max_new_tokens=30, **kwargs))
    assert_same(*outs)


@pytest.mark.parametrize("middle", ["generate without it", "a loop of one's own with gradients"])
def test_steps_outside_the_fixed_shape_step_are_seen_by_it_afterwards(model, processor, ascii_only, middle):
    """Entries written by dynamic steps that close no chunk must be visible to the next fixed-shape step."""
    kwargs = dict(processor=processor, do_sample=False, return_dict_in_generate=True, output_logits=True,
                  suppress_tokens=ascii_only)

    def continued(first, then, last):
        out = model.generate(**processor(text=SAMPLE_TEXT[:300]), max_new_tokens=3, cuda_graphs=first, **kwargs)
        cache, logits, sequence = out[CACHE_KWARG], list(out.logits), torch.cat([out.sequences, out.sequences[:, -1:]], 1)
        if then == "generate without it":
            out = model.generate(input_ids=sequence, cache=cache, max_new_tokens=3, cuda_graphs=False, **kwargs)
            logits, sequence = logits + list(out.logits), out.sequences
        else:
            with torch.enable_grad():  # (with gradients the step is never the fixed-shape one)
                for column in range(cache.seen, sequence.shape[1]):
                    model(input_ids=sequence[:, column : column + 1], cache=cache)
        sequence = torch.cat([sequence, sequence[:, -1:]], 1)
        out = model.generate(input_ids=sequence, cache=cache, max_new_tokens=6, cuda_graphs=last, **kwargs)
        return logits + list(out.logits)

    for fixed, dynamic in zip(continued(True, middle, True), continued(False, middle, False), strict=True):
        torch.testing.assert_close(fixed, dynamic, atol=TOLERANCE, rtol=0)


def test_a_copied_cache_captures_its_own_step_and_continues_like_the_original(model, processor, ascii_only):
    import copy

    kwargs = dict(processor=processor, cuda_graphs=True, do_sample=False, suppress_tokens=ascii_only,
                  return_dict_in_generate=True, output_logits=True)
    first = model.generate(**processor(text=SAMPLE_TEXT[:100]), max_new_tokens=10, **kwargs)
    assert first[CACHE_KWARG].decode_graph is not None
    copied = copy.deepcopy(first[CACHE_KWARG])
    assert copied.decode_graph is None  # it would hold the model and the original's buffers
    resumed = dict(input_ids=first.sequences, attention_mask=torch.ones_like(first.sequences), max_new_tokens=30)
    assert_same(model.generate(**resumed, **{CACHE_KWARG: first[CACHE_KWARG]}, **kwargs),
                model.generate(**resumed, **{CACHE_KWARG: copied}, **kwargs))


def test_a_copied_or_pickled_cache_leaves_its_captured_step_behind(model, processor):
    """The step holds the model and the original's buffers (on a GPU, a CUDA graph)."""
    import copy
    import pickle

    out = model.generate(**processor(text=SAMPLE_TEXT[:100]), processor=processor, cuda_graphs=True, max_new_tokens=4,
                         return_dict_in_generate=True)
    cache = out[CACHE_KWARG]
    assert cache.decode_graph is not None
    assert copy.copy(cache).decode_graph is None and pickle.loads(pickle.dumps(cache)).decode_graph is None


def test_a_copied_cache_shares_its_processor_and_holds_its_own_entries(model, processor):
    """A copy reuses a prompt: its processor has no state of the cache's (a large tokenizer is slow to copy)."""
    import copy

    cache = model.read(processor, SAMPLE_TEXT[:300])["cache"]
    copied = copy.deepcopy(cache)
    assert copied.processor is cache.processor
    both = copy.deepcopy({"cache": cache, "processor": processor})
    assert both["cache"].processor is processor and both["processor"] is not processor  # (only the cache shares it)
    assert copied.layers[0].keys is not cache.layers[0].keys and torch.equal(copied.layers[0].keys, cache.layers[0].keys)


def test_a_replay_that_disagrees_with_the_step_warns_and_decoding_goes_on_exactly_without_it(model, processor,
                                                                                           ascii_only, caplog):
    kwargs = dict(processor=processor, do_sample=False, suppress_tokens=ascii_only, return_dict_in_generate=True,
                  output_logits=True)
    outs = []
    for graphs in (False, True):
        first = model.generate(**processor(text=SAMPLE_TEXT[:100]), cuda_graphs=graphs, max_new_tokens=10, **kwargs)
        cache = first[CACHE_KWARG]
        if graphs:  # as when a GPU's replay gives other logits than the step run as it is
            logits = torch.zeros(1, 1, model.config.text_config.vocab_size)
            cache.decode_graph.check(logits + 1, logits, cache, "in this test")
            assert cache.cuda_graphs is False and "decoding without CUDA graphs" in caplog.text
        resumed = dict(input_ids=first.sequences, attention_mask=torch.ones_like(first.sequences))
        outs.append(model.generate(**resumed, **{CACHE_KWARG: cache}, max_new_tokens=40, **kwargs))
    assert_same(*outs)
