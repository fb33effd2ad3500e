"""The attention rule and positions of DESIGN §2, checked against a brute-force rule written independently here."""

import random

import pytest
import torch

from conftest import SAMPLE_TEXT, tiny_config
from vist2 import VIST2ForCausalLM
from transformers import DynamicCache

from vist2.modeling_vist2 import (PAD, generation_mask_function, layout_position_ids, memory_flags,
                                  prefill_block_ends, sketch_reach, token_kinds, vist2_mask_function)

L, M = 16, 4  # tiny preset: chunk size and visual tokens per chunk


def random_layout(rng, sketch_id):
    """One row as a list of tokens (kind, chunk, kept, token_id), in the flat order the processor uses."""
    tokens = [("prefix", 0, True, rng.randrange(10, 300)) for _ in range(rng.randrange(0, 4))]
    chunks = rng.randrange(0, 5)
    for chunk in range(1, chunks + 1):
        if chunk == chunks:  # the open chunk
            tokens += [("text", chunk, False, rng.randrange(10, 300)) for _ in range(rng.randrange(1, L + 1))]
            break
        state = rng.choice(["text+sketch", "sketch", "kept"])
        if state in ("text+sketch", "kept"):
            tokens += [("text", chunk, state == "kept", rng.randrange(10, 300)) for _ in range(L)]
        if state != "kept":
            tokens += [("sketch", chunk, False, sketch_id) for _ in range(M)]
    return tokens or [("prefix", 0, True, 11)]


def brute_force_allowed(row, read_back):
    """allowed[q][k] by DESIGN §2, one pair at a time."""
    n = len(row)
    allowed = [[False] * n for _ in range(n)]
    for q, (q_kind, q_chunk, _, _) in enumerate(row):
        for k, (k_kind, k_chunk, k_kept, _) in enumerate(row):
            if q_kind == "pad":
                ok = k == q
            elif k_kind == "pad":
                ok = False
            elif q_kind == "prefix":
                ok = k_kind == "prefix" and k <= q
            elif k_kind == "prefix":
                ok = True
            elif q_kind == "text":
                if k_kind == "sketch":
                    ok = k_chunk < q_chunk or (k_chunk == q_chunk and read_back)
                else:
                    ok = (k_chunk == q_chunk and k <= q) or (k_chunk < q_chunk and k_kept)
            else:  # a sketch query
                ok = k_chunk <= q_chunk if k_kind == "sketch" else (k_chunk < q_chunk and k_kept)
            allowed[q][k] = ok
    return allowed


def brute_force_positions(row, read_back, read_back_before=0):
    """Positions in the generation layout P V_1 .. V_{i-1} c_i, walking the chunks in order; a chunk read back sits
    after its sketch, moved back by `read_back_before` places."""
    positions, start = [0] * len(row), 0
    prefix = [i for i, t in enumerate(row) if t[0] == "prefix"]
    for offset, i in enumerate(prefix):
        positions[i] = offset
    start = len(prefix)
    chunks = sorted({t[1] for t in row if t[0] in ("text", "sketch")})
    for chunk in chunks:
        text = [i for i, t in enumerate(row) if t[0] == "text" and t[1] == chunk]
        sketch = [i for i, t in enumerate(row) if t[0] == "sketch" and t[1] == chunk]
        for offset, i in enumerate(sketch):
            positions[i] = start + offset
        shift = len(sketch) - read_back_before if read_back and sketch else 0
        for offset, i in enumerate(text):
            positions[i] = start + shift + offset
        kept = bool(text) and row[text[0]][2]
        start += len(sketch) if sketch else (len(text) if kept else 0)
    return positions


def left_padded_batch(rows):
    width = max(len(r) for r in rows)
    rows = [[("pad", 0, False, 0)] * (width - len(r)) + r for r in rows]
    input_ids = torch.tensor([[t[3] for t in r] for r in rows])
    attention_mask = torch.tensor([[int(t[0] != "pad") for t in r] for r in rows])
    chunk_ids = torch.tensor([[t[1] for t in r] for r in rows])
    return rows, input_ids, attention_mask, chunk_ids


@pytest.fixture(scope="module")
def models(tokenizer):
    built = {}
    for implementation in ("eager", "sdpa"):
        config = tiny_config(tokenizer)
        config._attn_implementation = implementation
        torch.manual_seed(0)
        built[implementation] = VIST2ForCausalLM(config).eval()
    return built


@pytest.mark.parametrize("seed", range(12))
def test_model_mask_and_positions_equal_the_brute_force_rule(models, config, seed):
    rng = random.Random(seed)
    rows = [random_layout(rng, config.sketch_token_id) for _ in range(3)]
    rows, input_ids, attention_mask, chunk_ids = left_padded_batch(rows)
    read_back = torch.tensor([rng.random() < 0.5 for _ in rows])
    kinds = token_kinds(input_ids, attention_mask, config.sketch_token_id)
    memory = memory_flags(kinds, chunk_ids)
    positions = layout_position_ids(kinds, chunk_ids, memory, read_back)
    before_next_chunk = layout_position_ids(kinds, chunk_ids, memory, read_back, L)
    layout = (kinds, chunk_ids, memory, read_back)
    embeds = torch.zeros(len(rows), input_ids.shape[1], config.text_config.hidden_size)
    eager = models["eager"].build_attention_mask(embeds, vist2_mask_function(*layout))
    sdpa = models["sdpa"].build_attention_mask(embeds, vist2_mask_function(*layout))
    for b, row in enumerate(rows):
        expected = torch.tensor(brute_force_allowed(row, bool(read_back[b])))
        assert torch.equal(sdpa[b, 0] == 0, expected) and torch.equal(eager[b, 0] == 0, expected)  # both additive
        real = attention_mask[b].bool()
        assert positions[b][real].tolist() == [p for p, t in zip(brute_force_positions(row, bool(read_back[b])), row)
                                               if t[0] != "pad"]
        assert before_next_chunk[b][real].tolist() == [
            p for p, t in zip(brute_force_positions(row, bool(read_back[b]), L), row) if t[0] != "pad"]


def test_sdpa_is_given_an_additive_mask_it_need_not_convert_in_every_layer(models, processor, monkeypatch):
    """Given a boolean mask, SDPA converts it to an additive one in every call: a launch or more per layer on a GPU,
    in the prefill and in each decode step, and a copy of the mask."""
    sdpa, masks = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, attn_mask=None, **kwargs: masks.append(attn_mask) or sdpa(*args, attn_mask=attn_mask,
                                                                                               **kwargs))
    inputs = processor(text=[SAMPLE_TEXT[:200], SAMPLE_TEXT[:60]])  # sketches, padding
    with torch.no_grad():
        models["sdpa"].generate(**inputs, processor=processor, max_new_tokens=3, do_sample=False)
    given = [mask for mask in masks if mask is not None]  # (the vision tower's passes take none)
    assert given and all(mask.is_floating_point() for mask in given)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("q_length", [1, 5])  # a decode step; a closing step (sketch + token) over a cache
def test_mask_of_the_last_queries_over_a_cache_equals_the_brute_force_rows(models, config, seed, q_length):
    rng = random.Random(seed)
    rows, input_ids, attention_mask, chunk_ids = left_padded_batch(
        [random_layout(rng, config.sketch_token_id) for _ in range(3)])
    kinds = token_kinds(input_ids, attention_mask, config.sketch_token_id)
    layout = (kinds, chunk_ids, memory_flags(kinds, chunk_ids), torch.zeros(3, dtype=torch.bool))
    width = input_ids.shape[1]
    cache = DynamicCache()
    for layer in range(config.text_config.num_hidden_layers):
        past = torch.zeros(3, 1, width - q_length, 8)
        cache.update(past, past, layer)
    mask = models["sdpa"].build_attention_mask(torch.zeros(3, q_length, config.text_config.hidden_size),
                                               vist2_mask_function(*layout), cache)
    for b, row in enumerate(rows):
        expected = torch.tensor(brute_force_allowed(row, False))[width - q_length :]
        assert torch.equal(mask[b, 0] == 0, expected)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("block", [1, 3, 7])
def test_prefill_blocks_end_only_where_no_earlier_query_sees_a_later_key(config, seed, block):
    rng = random.Random(seed)
    rows, input_ids, attention_mask, chunk_ids = left_padded_batch(
        [random_layout(rng, config.sketch_token_id) for _ in range(rng.randrange(1, 4))])
    kinds = token_kinds(input_ids, attention_mask, config.sketch_token_id)
    ends = prefill_block_ends(kinds, chunk_ids, block)
    assert ends[-1] == input_ids.shape[1] and ends == sorted(set(ends))
    assert all(b - a >= block for a, b in zip([0] + ends[:-2], ends[:-1]))  # only the last block may be short
    for row in rows:
        allowed = brute_force_allowed(row, False)
        for end in ends:
            assert not any(allowed[q][k] for q in range(end) for k in range(end, len(row)))


def test_first_token_of_a_chunk_and_of_its_sketch_share_a_position(processor, config):
    batch = processor(text=SAMPLE_TEXT[:200], prefix="Hi.", keep_closed_text=True)
    kinds = token_kinds(batch["input_ids"], batch["attention_mask"], config.sketch_token_id)
    positions = layout_position_ids(kinds, batch["chunk_ids"], memory_flags(kinds, batch["chunk_ids"]))[0]
    prefix = len(processor.encode("Hi."))
    for chunk in (1, 2):  # the closed chunks (chunk 3 is open: text only)
        in_chunk = batch["chunk_ids"][0] == chunk
        text_start = positions[in_chunk & (kinds[0] == 1)][0]
        sketch_start = positions[in_chunk & (kinds[0] == 2)][0]
        assert text_start == sketch_start == prefix + (chunk - 1) * config.visual_tokens_per_chunk


def chunk_logits(model, batch, chunk):
    with torch.no_grad():
        logits = model(**batch).logits[0]
    return logits[batch["chunk_ids"][0] >= chunk]


def test_later_chunks_ignore_the_text_of_an_earlier_chunk_but_read_its_sketch(model, processor, config):
    batch = processor(text=SAMPLE_TEXT[:300], keep_closed_text=True)
    reference = chunk_logits(model, batch, 2)

    swapped_text = dict(batch)
    ids = batch["input_ids"].clone()
    in_chunk_one_text = (batch["chunk_ids"] == 1) & (ids != config.sketch_token_id)
    ids[in_chunk_one_text] = torch.randint(10, 300, (int(in_chunk_one_text.sum()),))
    swapped_text["input_ids"] = ids
    assert torch.equal(chunk_logits(model, swapped_text, 2), reference)

    swapped_sketch = dict(batch)
    pixels = batch["pixel_values"].clone()
    pixels[0] = processor.pixel_values([__import__("numpy").asarray(processor.render("entirely different words"))])[0]
    swapped_sketch["pixel_values"] = pixels
    assert not torch.allclose(chunk_logits(model, swapped_sketch, 2), reference)


def test_read_back_lets_a_chunk_see_its_own_sketch(model, processor):
    batch = processor(text=SAMPLE_TEXT[:200], keep_closed_text=True)
    other = dict(batch, pixel_values=torch.flip(batch["pixel_values"], dims=[0]))
    chunk_one = (batch["chunk_ids"][0] == 1) & (batch["input_ids"][0] != processor.sketch_token_id)
    for read_back, should_change in ((False, False), (True, True)):
        flags = torch.tensor([read_back])
        with torch.no_grad():
            before = model(**batch, read_back=flags).logits[0][chunk_one]
            after = model(**other, read_back=flags).logits[0][chunk_one]
        assert (not torch.allclose(before, after)) == should_change


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
def test_attention_implementations_agree_with_eager(tokenizer, processor, implementation):
    batch = processor(text=[SAMPLE_TEXT[:300], SAMPLE_TEXT[:90]], prefix="Sys.", keep_closed_text=True)
    outputs = {}
    for name in ("eager", implementation):
        config = tiny_config(tokenizer)
        config._attn_implementation = name
        torch.manual_seed(0)
        with torch.no_grad():
            outputs[name] = VIST2ForCausalLM(config).eval()(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(outputs[implementation][real], outputs["eager"][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("read_back_positions, first", [("after_sketch", M), ("before_next_chunk", M - L)])
def test_a_chunk_read_back_sits_after_its_sketch_or_right_before_the_next_chunk(read_back_positions, first):
    """`c_1 V_1 c_2` read back: c_2 starts at M either way; c_1 starts after V_1 or ends at M - 1, where a text-only
    model holds the text before the next chunk."""
    S = 999
    ids = torch.tensor([[5] * L + [S] * M + [6] * 3])
    chunk_ids = torch.tensor([[1] * (L + M) + [2] * 3])
    kinds = token_kinds(ids, torch.ones_like(ids), S)
    before = L if read_back_positions == "before_next_chunk" else 0
    positions = layout_position_ids(kinds, chunk_ids, memory_flags(kinds, chunk_ids), torch.tensor([True]), before)
    assert positions[0].tolist() == list(range(first, first + L)) + list(range(M)) + [M, M + 1, M + 2]


def test_read_back_positions_change_only_what_a_read_back_chunk_computes(tokenizer, processor):
    batch = processor(text=SAMPLE_TEXT[:200], keep_closed_text=True)
    logits = {}
    for layout in ("after_sketch", "before_next_chunk"):
        torch.manual_seed(0)
        model = VIST2ForCausalLM(tiny_config(tokenizer, read_back_positions=layout)).eval()
        with torch.no_grad():
            logits[layout] = [model(**batch, read_back=torch.tensor([flag])).logits for flag in (False, True)]
    torch.testing.assert_close(logits["after_sketch"][0], logits["before_next_chunk"][0])
    assert not torch.allclose(logits["after_sketch"][1], logits["before_next_chunk"][1])


@pytest.mark.parametrize("seed", range(12))
def test_in_the_generation_layout_the_rule_is_causal_with_each_sketch_filled_in(config, seed):
    """Generation never keeps a closed chunk's text beside its sketch, so every entry before a query is visible to it
    and a sketch sees its whole sketch: `key <= reach[query]` equals the full rule there (padding aside)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(3):
        row = [t for t in random_layout(rng, config.sketch_token_id)]
        chunks_with_sketch = {t[1] for t in row if t[0] == "sketch"}
        rows.append([t for t in row if not (t[0] == "text" and t[1] in chunks_with_sketch)] or row)
    rows, input_ids, attention_mask, chunk_ids = left_padded_batch(rows)
    kinds = token_kinds(input_ids, attention_mask, config.sketch_token_id)
    full = vist2_mask_function(kinds, chunk_ids, memory_flags(kinds, chunk_ids), torch.zeros(3, dtype=torch.bool))
    fast = generation_mask_function(sketch_reach(kinds, chunk_ids), kinds != PAD)
    index = torch.arange(input_ids.shape[1])
    rows_index, queries, keys = torch.arange(3)[:, None, None], index[None, :, None], index[None, None, :]
    real = (kinds != PAD)[:, :, None]  # a padding query's row is never used
    assert torch.equal(full(rows_index, None, queries, keys) & real, fast(rows_index, None, queries, keys) & real)
