"""The decode step a GPU captures as a CUDA graph (`DecodeGraph` over `FixedLayer` buffers) is the dynamic step, exactly.

A CPU cannot capture, so these tests run the fixed-shape step itself (`cuda_graphs=True`): the same function, on the same
buffers, that a GPU records once and replays."""

import pytest
import torch

from conftest import SAMPLE_TEXT
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
    read_backs = {"_local_scalar_dense", "item", "is_nonzero", "nonzero"} & set(counter.counts)
    assert not read_backs, read_backs
    steps = model.config.chunk_size - max(cache.open_length) + 2  # through a chunk's close and on
    assert cache.get_seq_length() + model.config.visual_tokens_per_chunk + steps < cache.layers[0].keys.shape[2]
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=token, **{CACHE_KWARG: cache}).logits[:, -1].argmax(-1, keepdim=True)
    assert cache.decode_graph is graph
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == buffers
