"""Generation at the edges: no new tokens, an empty prompt, prompts exactly on a chunk boundary, EOS as the first
token, batches whose rows are several chunks apart, and `read()` at the same edges.

Every case checks the output is sane AND that each step's logits equal one training forward over the interleaved
sequence (DESIGN §4.3), the contract tests/test_generation.py states for ordinary prompts.
"""

import pytest
import torch
from conftest import SAMPLE_TEXT

from vist2 import VIST2Cache
from vist2.modeling_vist2 import CACHE_KWARG, TEXT, token_kinds

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def ascii_only(tokenizer, config):
    """Random weights write arbitrary bytes; printable ASCII tokens keep every chunk renderable (no EOS either)."""
    return [i for i in range(len(tokenizer))
            if i in (config.sketch_token_id, tokenizer.eos_token_id) or not tokenizer.decode([i]) or
            not all(32 <= ord(c) < 127 for c in tokenizer.decode([i]))]


def text_with_tokens(processor, count, source=SAMPLE_TEXT):
    """The shortest prefix of `source` that the processor encodes into exactly `count` tokens."""
    for end in range(1, len(source) + 1):
        if len(processor.encode(source[:end])) == count:
            return source[:end]
    raise AssertionError(f"no prefix of the source has {count} tokens")


def training_logits(model, processor, prefix_ids, stream_ids):
    """Logits at every text token of `prefix_ids + stream_ids`, from one training forward (keep_closed_text)."""
    batch = processor.collate([processor.encode_sample(prefix_ids, stream_ids, keep_closed_text=True)])
    with torch.no_grad():
        logits = model(**batch).logits[0]
    kinds = token_kinds(batch["input_ids"], batch["attention_mask"], model.config.sketch_token_id)[0]
    return logits[kinds == TEXT]


def assert_steps_equal_training(model, processor, prefix_ids, prompt_ids, generated, step_logits):
    """`step_logits[t]` (one row) chose `generated[t]`; it must equal the training forward at the same token."""
    reference = training_logits(model, processor, prefix_ids, prompt_ids + generated)
    first = len(prefix_ids) + len(prompt_ids) - 1
    assert len(step_logits) == len(generated)
    for step, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, reference[first + step], atol=TOLERANCE, rtol=0)


def generate(model, processor, inputs, **kwargs):
    kwargs.setdefault("do_sample", False)
    return model.generate(**inputs, processor=processor, return_dict_in_generate=True, output_logits=True, **kwargs)


def test_zero_new_tokens_is_refused_before_any_work(model, processor, config):
    inputs = processor(text=SAMPLE_TEXT[:100])
    cache = VIST2Cache(config=config.text_config)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(**inputs, processor=processor, cache=cache, max_new_tokens=0)
    assert not cache.is_prefilled and cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="max_length"):
        model.generate(**inputs, processor=processor, max_length=inputs["input_ids"].shape[1])


def test_one_new_token_is_the_prompt_plus_one(model, processor, ascii_only):
    inputs = processor(text=SAMPLE_TEXT[:100])
    out = generate(model, processor, inputs, max_new_tokens=1, suppress_tokens=ascii_only)
    assert out.sequences.shape == (1, inputs["input_ids"].shape[1] + 1)
    assert torch.equal(out.sequences[0, :-1], inputs["input_ids"][0])
    assert_steps_equal_training(model, processor, [], processor.encode(SAMPLE_TEXT[:100]),
                                out.sequences[0, -1:].tolist(), [out.logits[0][0]])


def test_an_empty_prompt_generates_from_the_bos_token_across_a_chunk(model, processor, tokenizer, ascii_only):
    inputs = processor(text="")
    assert inputs["input_ids"].tolist() == [[tokenizer.bos_token_id]] and inputs["pixel_values"].shape[0] == 0
    out = generate(model, processor, inputs, max_new_tokens=20, suppress_tokens=ascii_only)
    generated = out.sequences[0, 1:].tolist()
    assert len(generated) == 20 and out[CACHE_KWARG].open_chunk.item() == 2, "a chunk closed while writing"
    assert_steps_equal_training(model, processor, [tokenizer.bos_token_id], [], generated,
                                [step[0] for step in out.logits])


def check_cache_after(cache, prefix_ids, prompt_tokens, new_tokens, L, m, row=0):
    """Fed: the prompt and every generated token but the last. Closed chunks are sketches, the open one text."""
    fed = prompt_tokens + new_tokens - 1
    assert cache.open_chunk[row].item() == (fed - 1) // L + 1
    assert cache.entries[row] == len(prefix_ids) + m * ((fed - 1) // L) + (fed - 1) % L + 1


@pytest.mark.parametrize("prompt_tokens, prefix", [(16, ""), (32, "Sys.")])
def test_a_prompt_exactly_on_a_chunk_boundary_keeps_its_last_chunk_open(model, processor, config, ascii_only,
                                                                        prompt_tokens, prefix):
    L, m = config.chunk_size, config.visual_tokens_per_chunk
    text = text_with_tokens(processor, prompt_tokens)
    inputs = processor(text=text, prefix=prefix)
    closed = prompt_tokens // L - 1  # the last chunk stays open although it is full
    assert inputs["pixel_values"].shape[0] == closed
    assert int((inputs["chunk_ids"][0] == closed + 1).sum()) == L
    out = generate(model, processor, inputs, max_new_tokens=3, suppress_tokens=ascii_only)  # 1st fed token closes it
    generated = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    prefix_ids = processor.encode(prefix)
    check_cache_after(out[CACHE_KWARG], prefix_ids, prompt_tokens, 3, L, m)
    assert_steps_equal_training(model, processor, prefix_ids, processor.encode(text), generated,
                                [step[0] for step in out.logits])


@pytest.mark.parametrize("prompt_tokens", [16, 20])
def test_eos_as_the_first_token_stops_after_it(model, processor, tokenizer, ascii_only, prompt_tokens):
    text = text_with_tokens(processor, prompt_tokens)
    inputs = processor(text=text)
    free = generate(model, processor, inputs, max_new_tokens=1, suppress_tokens=ascii_only)
    first = int(free.sequences[0, -1])
    out = generate(model, processor, inputs, max_new_tokens=30, suppress_tokens=ascii_only, eos_token_id=first,
                   pad_token_id=tokenizer.pad_token_id)
    assert out.sequences[0, inputs["input_ids"].shape[1]:].tolist() == [first]
    assert len(out.logits) == 1
    torch.testing.assert_close(out.logits[0], free.logits[0], atol=0, rtol=0)
    # The first token was chosen but never fed: even a full open chunk (16 tokens) is still open.
    assert out[CACHE_KWARG].open_chunk.item() == (prompt_tokens - 1) // processor.chunk_size + 1


def test_a_row_that_stops_at_once_leaves_the_other_row_untouched(model, processor, tokenizer, ascii_only):
    texts = [SAMPLE_TEXT[:40], text_with_tokens(processor, 32)]
    first = generate(model, processor, processor(text=texts[0]), max_new_tokens=1, suppress_tokens=ascii_only)
    eos = int(first.sequences[0, -1])
    inputs = processor(text=texts)
    new_tokens = 8  # row 1's full open chunk closes when its first new token is fed
    out = generate(model, processor, inputs, max_new_tokens=new_tokens, suppress_tokens=ascii_only,
                   eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    width = inputs["input_ids"].shape[1]
    generated = out.sequences[1, width:].tolist()
    if eos in generated:
        pytest.skip("row 1 happens to write row 0's first token")
    assert out.sequences[0, width:].tolist() == [eos] + [tokenizer.pad_token_id] * (new_tokens - 1)
    assert len(generated) == new_tokens
    assert_steps_equal_training(model, processor, [], processor.encode(texts[1]), generated,
                                [step[1] for step in out.logits])


def test_a_batch_of_rows_several_chunks_apart_equals_the_training_forward_per_row(model, processor, config, tokenizer,
                                                                                   ascii_only):
    rows = [  # (text, prefix)
        ("", ""),                                             # empty prompt: bos only
        (text_with_tokens(processor, 16), ""),                # exactly one chunk, still open
        (text_with_tokens(processor, 32), "Sys."),            # exactly two chunks, with a prefix
        (text_with_tokens(processor, 17), ""),                # one token past a boundary
        (SAMPLE_TEXT[:500], "A system prompt."),              # many closed chunks
        (SAMPLE_TEXT[:60] + " naïve café résumé " + SAMPLE_TEXT[:60], ""),  # a chunk kept as text
    ]
    with pytest.warns(UserWarning, match="kept as text"):
        inputs = processor(text=[t for t, _ in rows], prefix=[p for _, p in rows])
    assert inputs["chunks_kept_as_text"].tolist()[5] >= 1
    chunks_per_row = inputs["chunk_ids"].max(1).values
    assert int(chunks_per_row.max() - chunks_per_row.min()) >= 5, "rows are several chunks apart"
    new_tokens = 20  # every row closes at least one chunk while writing
    out = generate(model, processor, inputs, max_new_tokens=new_tokens, suppress_tokens=ascii_only)
    width = inputs["input_ids"].shape[1]
    L, m = config.chunk_size, config.visual_tokens_per_chunk
    for row, (text, prefix) in enumerate(rows):
        generated = out.sequences[row, width:].tolist()
        prompt = processor.encode(text)
        prefix_ids = processor.encode(prefix) or ([] if text else [tokenizer.bos_token_id])
        if row != 5:  # (a chunk kept as text holds L entries instead of m)
            check_cache_after(out[CACHE_KWARG], prefix_ids, len(prompt), new_tokens, L, m, row)
        assert_steps_equal_training(model, processor, prefix_ids, prompt, generated, [step[row] for step in out.logits])


@pytest.mark.parametrize("prompt_tokens", [1, 32])
def test_reading_a_prompt_on_a_chunk_boundary_equals_processing_it(model, processor, ascii_only, prompt_tokens):
    text = text_with_tokens(processor, prompt_tokens)
    whole_inputs = processor(text=text)
    whole = generate(model, processor, whole_inputs, max_new_tokens=4, suppress_tokens=ascii_only)
    read = model.read(processor, text, sketches_per_step=1)
    streamed = generate(model, processor, read, max_new_tokens=4, suppress_tokens=ascii_only)
    assert streamed.sequences[0, 1:].tolist() == whole.sequences[0, whole_inputs["input_ids"].shape[1]:].tolist()
    assert streamed[CACHE_KWARG].get_seq_length() == whole[CACHE_KWARG].get_seq_length()
    for a, b in zip(streamed.logits, whole.logits):
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)


def test_reading_an_empty_text_gives_the_empty_prompt(model, processor, tokenizer, ascii_only):
    inputs = model.read(processor, "")
    assert inputs["input_ids"].tolist() == [[tokenizer.bos_token_id]]
    out = generate(model, processor, inputs, max_new_tokens=3, suppress_tokens=ascii_only)
    direct = generate(model, processor, processor(text=""), max_new_tokens=3, suppress_tokens=ascii_only)
    assert out.sequences.tolist() == direct.sequences.tolist()
