"""The clients users already have -- plain token ids, `pipeline("text-generation")`, chat templates -- get the
compressed model: the model lays out plain ids itself, as the processor lays out text."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoProcessor, LogitsProcessor, TextStreamer,
                          pipeline)

from conftest import SAMPLE_TEXT
from test_generation import TOLERANCE, training_forward_logits
from vist2 import VIST2ForCausalLM
from vist2.modeling_vist2 import CACHE_KWARG
from vist2.training import encode_conversation

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": SAMPLE_TEXT[:300] + "\nWhat is compressed?"}]


@pytest.fixture(scope="module")
def ascii_only(tokenizer, config):
    return [i for i in range(len(tokenizer)) if i == config.sketch_token_id or not tokenizer.decode([i]) or
            not all(32 <= ord(c) < 127 for c in tokenizer.decode([i]))]


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chatty = copy.deepcopy(tokenizer)
    chatty.chat_template = (ROOT / "chat_template.jinja").read_text()
    chatty.padding_side = "left"
    return chatty


@pytest.fixture(scope="module")
def chat_processor(processor, chat_tokenizer):
    from vist2 import VIST2Processor

    return VIST2Processor(chat_tokenizer, sketch_settings=processor.sketch_settings,
                          sketch_token_id=processor.sketch_token_id, chat_template=chat_tokenizer.chat_template)


def plain(tokenizer, texts):
    return tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")


def run(model, inputs, **kwargs):
    return model.generate(**inputs, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs)


def assert_same_generation(a, a_width, b, b_width):
    assert a.sequences[:, a_width:].tolist() == b.sequences[:, b_width:].tolist()
    for a_logits, b_logits in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(a_logits, b_logits, atol=TOLERANCE, rtol=0)
    assert a[CACHE_KWARG].entries == b[CACHE_KWARG].entries


@pytest.mark.parametrize("texts", [[SAMPLE_TEXT[:400]], [SAMPLE_TEXT[:400], SAMPLE_TEXT[50:90], SAMPLE_TEXT[7:260]]])
def test_plain_token_ids_generate_what_the_processor_batch_generates(model, processor, tokenizer, ascii_only, texts):
    laid_out, ids = processor(text=texts), plain(tokenizer, texts)
    assert (laid_out["input_ids"] == model.config.sketch_token_id).any(), "the prompt must close chunks"
    kwargs = dict(processor=processor, max_new_tokens=40, suppress_tokens=ascii_only)
    expected, got = run(model, laid_out, **kwargs), run(model, ids, **kwargs)
    assert_same_generation(got, ids["input_ids"].shape[1], expected, laid_out["input_ids"].shape[1])
    assert got.sequences[:, : ids["input_ids"].shape[1]].tolist() == ids["input_ids"].tolist(), "the caller's prompt"


@pytest.fixture(scope="module")
def loaded(model, tokenizer, tmp_path_factory):
    """The model as a user loads it: saved with its tokenizer, no processor at hand."""
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return VIST2ForCausalLM.from_pretrained(folder).eval()


def test_a_sketch_tokens_name_in_text_tokenized_elsewhere_is_read_as_the_processor_reads_it(model, processor,
                                                                                             tokenizer, ascii_only):
    """A tokenizer reads "<|sketch|>" typed in a document as the token; plain ids spell it as text, as `encode` does,
    so a pipeline given this README generates what the processor's batch generates."""
    text = (SAMPLE_TEXT[:150] + " <|sketch|> marks a visual position. ") * 2
    ids = plain(tokenizer, [text])
    assert processor.sketch_token_id in ids["input_ids"][0].tolist()
    inputs = processor(text=text)
    settings = dict(processor=processor, max_new_tokens=20, suppress_tokens=ascii_only)
    assert_same_generation(run(model, ids, **settings), ids["input_ids"].shape[1],
                           run(model, inputs, **settings), inputs["input_ids"].shape[1])
    with pytest.raises(ValueError, match="hold the '<\\|sketch\\|>' id.*Fix: tokenize with the processor"):
        model(**ids)  # the training layout could not line its logits up with the caller's tokens


def test_without_a_processor_the_model_uses_the_tokenizer_saved_with_it(loaded, model, processor, tokenizer,
                                                                       ascii_only):
    ids = plain(tokenizer, [SAMPLE_TEXT[:300], SAMPLE_TEXT[:100]])
    got = run(loaded, ids, max_new_tokens=40, suppress_tokens=ascii_only)  # chunks close in the prompt and later
    expected = run(model, ids, processor=processor, max_new_tokens=40, suppress_tokens=ascii_only)
    assert_same_generation(got, 0, expected, 0)


def test_a_model_built_in_memory_without_a_tokenizer_says_what_is_missing(config, tokenizer):
    bare = VIST2ForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"needs its tokenizer .* built in memory\. Fix: pass processor=VIST2Processor"):
        bare.generate(**plain(tokenizer, [SAMPLE_TEXT[:100]]), max_new_tokens=2)
    bare.tokenizer = tokenizer  # what from_backbones keeps
    assert bare.generate(**plain(tokenizer, [SAMPLE_TEXT[:100]]), max_new_tokens=2).shape[1] > 2


def test_read_takes_token_ids_as_it_takes_text(model, processor, ascii_only):
    text = SAMPLE_TEXT[:500]
    kwargs = dict(processor=processor, max_new_tokens=20, suppress_tokens=ascii_only)
    from_text = run(model, model.read(processor, text, sketches_per_step=3), **kwargs)
    from_ids = run(model, model.read(processor, torch.tensor([processor.encode(text)]), sketches_per_step=3), **kwargs)
    assert_same_generation(from_ids, 1, from_text, 1)


def test_forward_on_plain_ids_gives_at_every_token_the_logits_and_loss_of_the_training_layout(loaded, model,
                                                                                            processor, tokenizer):
    texts = [SAMPLE_TEXT[:300], SAMPLE_TEXT[100:180]]
    ids = plain(tokenizer, texts)
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = loaded(**ids, labels=labels)
    for row, text in enumerate(texts):
        expected, _, batch = training_forward_logits(model, processor, "", processor.encode(text))
        assert batch["pixel_values"].shape[0] > 0, "closed chunks are compressed"
        torch.testing.assert_close(out.logits[row, ids["attention_mask"][row] == 1], expected, atol=TOLERANCE, rtol=0)
    laid_out = processor(text=texts, keep_closed_text=True, return_labels=True)
    with torch.no_grad():
        torch.testing.assert_close(out.loss, model(**laid_out).loss, atol=TOLERANCE, rtol=0)


def test_forward_on_plain_ids_with_a_cache_gives_every_tokens_logits_and_loss_and_a_cache_that_goes_on(
        loaded, tokenizer):
    """A loop of one's own (`model(ids, use_cache=True)`, then a token at a time) sees what the forward without a
    cache gives, and continues as generate does."""
    texts = [SAMPLE_TEXT[:300], SAMPLE_TEXT[100:180]]
    ids = plain(tokenizer, texts)
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = loaded(**ids, labels=labels)
        out = loaded(**ids, labels=labels, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        step = loaded(input_ids=token, **{CACHE_KWARG: out[CACHE_KWARG]}).logits[:, -1]
    torch.testing.assert_close(out.logits, expected.logits, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=TOLERANCE, rtol=0)
    generated = run(loaded, ids, max_new_tokens=2)
    assert generated.sequences[:, -2:-1].tolist() == token.tolist()
    torch.testing.assert_close(step, generated.logits[1], atol=TOLERANCE, rtol=0)


def test_after_a_resize_for_new_tokens_the_model_asks_for_the_tokenizer_that_holds_them(model, tokenizer, tmp_path):
    """The usual fine-tuning step, tokens added and the embeddings resized: the tokenizer saved with the model would
    neither draw a new token nor let generate write it."""
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    resized = VIST2ForCausalLM.from_pretrained(tmp_path).eval()
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(["<|tool|>"], special_tokens=True)
    resized.resize_token_embeddings(len(grown))
    ids = plain(grown, [SAMPLE_TEXT[:300]])
    with pytest.raises(ValueError, match=r"model.tokenizer = tokenizer"):
        resized.generate(**ids, max_new_tokens=1)
    resized.tokenizer = tokenizer  # a tokenizer set before, without the new tokens
    with pytest.raises(ValueError, match=r"model.tokenizer = tokenizer"):
        resized.generate(**ids, max_new_tokens=1)
    resized.tokenizer = grown
    with torch.no_grad():
        head = resized.get_output_embeddings().weight
        head[len(grown) - 1] = 3 * head[int(resized(**ids).logits[0, -1].argmax())]  # the new token, written first
    assert resized.generate(**ids, max_new_tokens=1, do_sample=False)[0, -1] == len(grown) - 1


@pytest.mark.parametrize("resize", [{}, {"pad_to_multiple_of": 100}])
def test_a_resize_that_adds_no_token_leaves_generation_as_it_was(model, tokenizer, tmp_path, resize):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = VIST2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = plain(tokenizer, [SAMPLE_TEXT[:300]])
    before = loaded.generate(**ids, max_new_tokens=4, do_sample=False)
    loaded.resize_token_embeddings(len(tokenizer) if resize else None, **resize)
    loaded.resize_token_embeddings(loaded.get_input_embeddings().weight.shape[0])  # (to the rows it has)
    assert loaded.generate(**ids, max_new_tokens=4, do_sample=False).tolist() == before.tolist()


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_inputs_embeds_are_refused_naming_input_ids(model, call):
    embeds = model.get_input_embeddings()(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=embeds) if call == "forward" else model.generate(inputs_embeds=embeds, max_new_tokens=1)


def test_a_conversation_tokenized_elsewhere_keeps_its_system_turns_as_the_prefix(chat_processor, chat_tokenizer):
    ids = chat_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    laid_out = chat_processor.layout_token_ids(ids)
    sample = encode_conversation(chat_processor, MESSAGES, keep_closed_text=False, add_generation_prompt=True)
    assert laid_out["input_ids"][0].tolist() == sample["input_ids"]
    assert laid_out["chunk_ids"][0].tolist() == sample["chunk_ids"]
    prefix = laid_out["input_ids"][0][laid_out["chunk_ids"][0] == 0]
    assert chat_processor.decode(prefix) == "<|im_start|>system\nAnswer briefly.<|im_end|>\n"


@pytest.mark.parametrize("content", ["Answer briefly.", "  Answer briefly.", "\nAnswer briefly."])
def test_system_turns_are_found_in_ids_whose_header_newline_merged_with_the_contents_spaces(processor, content):
    """A GPT-2-style BPE reads "\n " as one token: the header's newline and the content's first space."""
    from conftest import SPECIAL_TOKENS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vist2 import VIST2Processor

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([SAMPLE_TEXT.replace(". ", ".\n  ")], trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:])
    assert "ĊĠ" in tokenizer.tokenize("system\n  Answer"), "the merge this test is about"
    chat = VIST2Processor(tokenizer, sketch_settings=processor.sketch_settings,
                          chat_template=(ROOT / "chat_template.jinja").read_text())
    messages = [{**MESSAGES[0], "content": content}, MESSAGES[1]]
    text = chat.apply_chat_template(messages, add_generation_prompt=True)
    ids = chat.encode(text)
    cut = chat.prefix_length(ids)
    assert chat.decode(ids[:cut]) == text[: chat.prefix_length(text)] == f"<|im_start|>system\n{content}<|im_end|>\n"


def test_the_models_own_processor_follows_a_tokenizer_set_after_its_first_use(model, processor, tokenizer):
    import copy

    from vist2 import VIST2ForCausalLM

    fresh = VIST2ForCausalLM(model.config)
    fresh.tokenizer = tokenizer
    assert fresh.own_processor().tokenizer is tokenizer
    grown = copy.deepcopy(tokenizer)
    fresh.tokenizer = grown
    assert fresh.own_processor().tokenizer is grown


def test_the_models_own_processor_follows_the_configs_sketch_settings(model, tokenizer):
    from vist2 import VIST2ForCausalLM

    fresh = VIST2ForCausalLM(copy.deepcopy(model.config))
    fresh.tokenizer = tokenizer
    assert fresh.own_processor().sketch_settings["foreground"] == fresh.config.foreground
    fresh.config.foreground = 40  # (a curriculum's final geometry is written into the config the same way)
    assert fresh.own_processor().sketch_settings["foreground"] == 40


@pytest.mark.parametrize("where", ["a relative folder, then another working directory", "a subfolder"])
def test_the_models_own_processor_finds_the_tokenizer_where_the_model_was_loaded_from(model, tokenizer, tmp_path,
                                                                                      monkeypatch, where):
    folder = tmp_path / "repo" / "checkpoint"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    if where == "a subfolder":
        loaded = VIST2ForCausalLM.from_pretrained("repo", subfolder="checkpoint")
    else:
        loaded = VIST2ForCausalLM.from_pretrained("repo/checkpoint")
        monkeypatch.chdir(folder)
    assert loaded.own_processor().tokenizer.get_vocab() == tokenizer.get_vocab()


def test_token_ids_are_laid_out_from_lists_tensors_arrays_or_a_tokenizers_output(processor):
    import numpy as np

    texts = [SAMPLE_TEXT[:300], SAMPLE_TEXT[:90]]
    expected = processor.layout_token_ids([processor.encode(text) for text in texts])
    padded = processor.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    for given in (padded, {"input_ids": padded["input_ids"].tolist(), "attention_mask": padded["attention_mask"]}):
        assert torch.equal(processor.layout_token_ids(given)["input_ids"], expected["input_ids"])
    one = processor.encode(texts[0])
    for given in (torch.tensor(one), torch.tensor([one]), np.array(one), list(np.array(one))):
        assert processor.layout_token_ids(given)["input_ids"][0].tolist() == expected["input_ids"][0][
            expected["attention_mask"][0] == 1].tolist()
    with pytest.raises(ValueError, match="no token ids"):
        processor.layout_token_ids([])


def test_a_row_of_plain_ids_that_masks_every_token_is_refused(model, processor):
    ids = torch.tensor([processor.encode(SAMPLE_TEXT[:60])] * 2)
    mask = torch.ones_like(ids)
    mask[1] = 0
    for call in (lambda: model(input_ids=ids, attention_mask=mask), lambda: model.generate(
            input_ids=ids, attention_mask=mask, processor=processor, max_new_tokens=1)):
        with pytest.raises(ValueError, match="attention_mask: row 1 masks every token"):
            call()


def test_ids_past_the_tokenizer_keep_their_chunk_as_text_with_a_report(processor):
    """The tokenizer decodes an id it does not have to nothing: drawn, the chunk would lose it."""
    ids = processor.encode(SAMPLE_TEXT[:400])
    ids[5] = len(processor.tokenizer) + 2  # a padded embedding row, or a token added to another copy of the tokenizer
    batch = processor.layout_token_ids(ids)
    assert batch["undrawable_characters"] == [f"<id {ids[5]}, past the tokenizer>"]
    assert ids[5] in batch["input_ids"][0].tolist(), "the chunk stays as text"
    assert not processor.last_report[0][0].ok and all(report.ok for report in processor.last_report[0][1:])


def test_apply_chat_template_renders_and_tokenizes_with_special_tokens_as_ids(chat_processor, chat_tokenizer):
    text = chat_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == chat_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = chat_processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert ids == chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    tensor = chat_processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    assert tensor.tolist() == [ids]
    batch = chat_processor.apply_chat_template([MESSAGES, MESSAGES[1:]], add_generation_prompt=True, tokenize=True,
                                               return_tensors="pt")
    assert batch.shape[0] == 2 and batch[0].tolist() == ids
    inputs = chat_processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert {"input_ids", "attention_mask", "chunk_ids", "pixel_values"} <= set(inputs)
    assert inputs["input_ids"].tolist() == chat_processor.layout_token_ids(ids)["input_ids"].tolist()
    assert inputs["pixel_values"].shape[0] >= 1


def test_the_chat_templates_text_given_to_the_processor_is_the_tokenized_template(chat_processor):
    """transformers' idiom, `processor(text=processor.apply_chat_template(messages))`: the text is read as the
    tokenizer reads it (special-token names as their tokens), and its system turns stay the prefix."""
    text = chat_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    by_text = chat_processor(text=text)
    by_ids = chat_processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    for key in ("input_ids", "chunk_ids", "pixel_values"):
        assert torch.equal(by_text[key], by_ids[key]), key


def test_reading_a_chat_templates_text_equals_the_processor_call(model, chat_processor, ascii_only):
    text = chat_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    settings = dict(processor=chat_processor, max_new_tokens=4, suppress_tokens=ascii_only)
    read, batch = model.read(chat_processor, text), chat_processor(text=text)
    assert read["cache"].prefix_length == [int(((batch["chunk_ids"] == 0) & (batch["attention_mask"] == 1)).sum())]
    assert_same_generation(run(model, read, **settings), 1, run(model, batch, **settings), batch["input_ids"].shape[1])


def test_a_laid_out_chat_template_warns_of_chunks_kept_as_text_as_a_processor_call_does(chat_processor):
    messages = [MESSAGES[0], {"role": "user", "content": SAMPLE_TEXT[:200] + " 漢字漢字漢字漢字漢字漢字漢字 " + SAMPLE_TEXT[:200]}]
    with pytest.warns(UserWarning, match="closed chunks are kept as text"):
        batch = chat_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert int(batch["chunks_kept_as_text"][0]) >= 1


def test_both_chat_template_outputs_generate_the_same_reply(model, chat_processor, ascii_only):
    kwargs = dict(add_generation_prompt=True, tokenize=True)
    ids = chat_processor.apply_chat_template(MESSAGES, return_tensors="pt", **kwargs)
    inputs = chat_processor.apply_chat_template(MESSAGES, return_dict=True, **kwargs)
    settings = dict(processor=chat_processor, max_new_tokens=30, suppress_tokens=ascii_only)
    assert_same_generation(run(model, {"input_ids": ids}, **settings), ids.shape[1],
                           run(model, inputs, **settings), inputs["input_ids"].shape[1])


# -- pipeline("text-generation") ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, model, chat_processor):
    folder = tmp_path_factory.mktemp("hub_model")
    model.save_pretrained(folder)
    chat_processor.save_pretrained(folder)
    return pipeline("text-generation", model=str(folder), trust_remote_code=True)


class CacheProbe(LogitsProcessor):
    """Records the cache's live entries each time a token is chosen."""

    def __init__(self, cache):
        self.cache, self.entries = cache, []

    def __call__(self, input_ids, scores):
        self.entries.append(max(self.cache.entries))
        return scores


def compressing_cache(pipe):
    remote = sys.modules[type(pipe.model).__module__]  # the folder's own remote code
    return remote.VIST2Cache(config=pipe.model.config.text_config)


def test_the_pipeline_compresses_a_long_prompt_and_keeps_the_cache_bound(pipe, processor, ascii_only):
    text = SAMPLE_TEXT * 2
    cache = compressing_cache(pipe)
    probe = CacheProbe(cache)
    out = pipe(text, max_new_tokens=40, do_sample=False, cache=cache, logits_processor=[probe],
               suppress_tokens=ascii_only, return_full_text=False)
    m, L = processor.visual_tokens_per_chunk, processor.chunk_size
    prompt = len(processor.encode(text))
    text_only = [prompt + step for step in range(40)]  # what the backbone's cache holds at each step
    assert len(probe.entries) == 40 and len(out[0]["generated_text"]) > 0
    for step, entries in enumerate(probe.entries):
        assert entries <= m * ((prompt + step) // L) + L
        assert entries < text_only[step] / 3
    assert int(cache.open_chunk[0]) > prompt // L + 1, "chunks closed while writing as well"


def test_the_pipeline_samples_what_generate_samples_on_the_processor_batch(pipe, model, processor, ascii_only):
    text = SAMPLE_TEXT[:500]
    kwargs = dict(max_new_tokens=30, do_sample=True, temperature=0.8, top_k=40, suppress_tokens=ascii_only)
    torch.manual_seed(7)
    out = pipe(text, return_full_text=False, **kwargs)[0]["generated_text"]
    inputs = processor(text=text)
    torch.manual_seed(7)
    expected = model.generate(**inputs, processor=processor, **kwargs)[0, inputs["input_ids"].shape[1] :]
    assert out == processor.decode(expected, skip_special_tokens=True)


def test_the_pipeline_stops_at_a_stop_string_and_streams_what_it_returns(pipe, ascii_only):
    text = SAMPLE_TEXT[:300]
    free = pipe(text, max_new_tokens=40, do_sample=False, suppress_tokens=ascii_only,
                return_full_text=False)[0]["generated_text"]
    stop = free[25:28]
    streamed = []
    streamer = TextStreamer(pipe.tokenizer, skip_prompt=True)
    streamer.on_finalized_text = lambda piece, stream_end=False: streamed.append(piece)
    stopped = pipe(text, max_new_tokens=40, do_sample=False, suppress_tokens=ascii_only, stop_strings=[stop],
                   streamer=streamer, return_full_text=False)[0]["generated_text"]
    assert stop in stopped and len(stopped) < len(free) and free.startswith(stopped)
    assert "".join(streamed) == stopped


def test_the_pipeline_answers_chat_messages_with_the_system_turn_as_the_prefix(pipe, model, chat_processor,
                                                                             ascii_only):
    cache = compressing_cache(pipe)
    out = pipe(MESSAGES, max_new_tokens=30, do_sample=False, suppress_tokens=ascii_only, cache=cache)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    inputs = chat_processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = model.generate(**inputs, processor=chat_processor, max_new_tokens=30, do_sample=False,
                              suppress_tokens=ascii_only)[0, inputs["input_ids"].shape[1] :]
    assert reply["content"] == chat_processor.decode(expected, skip_special_tokens=True)
    system_turn = chat_processor.encode("<|im_start|>system\nAnswer briefly.<|im_end|>\n")
    assert cache.prefix_length[0] == len(system_turn), "the system turn is the uncompressed prefix"


# -- lm-evaluation-harness ---------------------------------------------------------------------------------------------


def test_lm_eval_harness_scores_the_compressed_model_through_its_hf_model_type(tmp_path, monkeypatch):
    """lm_eval's own `hf` model tokenizes for itself; its answers and log-likelihoods must be the compressed model's:
    what `generate` gives on the processor's batch, and the training layout's log-probabilities."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from lm_eval_harness import TASKS, passkey_docs

    docs = passkey_docs(count=2, filler_chars=200)
    (tmp_path / "passkey.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    for task in ("vist2_passkey", "vist2_passkey_choice"):
        spec = (TASKS / f"{task}.yaml").read_text().replace("benchmarks/harness_tasks/", "")
        (tmp_path / f"{task}.yaml").write_text(spec)
    monkeypatch.chdir(tmp_path)
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={ROOT},trust_remote_code=True", device="cpu", batch_size=2,
        tasks=["vist2_passkey", "vist2_passkey_choice"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True)
    model = AutoModelForCausalLM.from_pretrained(ROOT, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(ROOT, trust_remote_code=True)
    for sample in results["samples"]["vist2_passkey"]:
        inputs = processor(text=sample["doc"]["prompt"] + " ")
        assert inputs["pixel_values"].shape[0] >= 5, "the prompt closes chunks"
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        expected = processor.decode(out).split("\n")[0].split(" ")[0]
        assert sample["resps"][0][0] == expected
    for sample in results["samples"]["vist2_passkey_choice"]:
        context = processor.encode(sample["doc"]["prompt"])
        for choice, ((harness_logprob, _),) in zip(sample["doc"]["choices"], sample["resps"], strict=True):
            whole = processor.encode(sample["doc"]["prompt"] + " " + choice)
            with torch.no_grad():
                logits, _, _ = training_forward_logits(model, processor, "", whole)
            logprobs = logits[len(context) - 1 : -1].log_softmax(-1)
            expected = logprobs.gather(1, torch.tensor(whole[len(context) :])[:, None]).sum()
            assert harness_logprob == pytest.approx(float(expected), abs=1e-4)


def test_lm_evals_max_length_is_the_raw_tokens_whose_layout_fits_the_backbones_positions(monkeypatch):
    """lm_eval cuts contexts to `max_length` raw tokens; the harness gives it VIST2's capacity, not the backbone's."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from lm_eval_harness import text_capacity

    processor = AutoProcessor.from_pretrained(ROOT, trust_remote_code=True)
    config = AutoModelForCausalLM.from_pretrained(ROOT, trust_remote_code=True).config
    capacity, positions = text_capacity(config), config.text_config.max_position_embeddings
    assert capacity > positions
    text = "".join(chr(97 + i % 26) for i in range(capacity + config.chunk_size))  # every chunk drawn (one byte a token)
    fits, beyond = (processor.layout_token_ids(processor.encode(text[:n]))["input_ids"].shape[1]
                    for n in (capacity, capacity + config.chunk_size))
    assert fits <= positions < beyond  # (the open chunk full: the longest layout a sequence of up to n tokens has)
