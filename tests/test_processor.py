"""VIST2Processor: chunking, layout, batching, reports, chat, persistence."""

import warnings

import pytest
import torch

from conftest import SAMPLE_TEXT, tiny_config
from vist2 import VIST2Model, VIST2Processor, split_into_chunks
from vist2.processing_vist2 import IGNORE_INDEX
from vist2.training import encode_conversation


def test_token_stream_is_cut_into_chunks_with_a_shorter_open_tail():
    assert split_into_chunks(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_into_chunks([], 4) == []


def test_closed_chunks_become_sketch_placeholders_and_the_open_chunk_stays_text(processor, config):
    stream = processor.encode(SAMPLE_TEXT[:300])
    closed = (len(stream) - 1) // config.chunk_size
    batch = processor(text=SAMPLE_TEXT[:300])
    ids, chunks = batch["input_ids"][0], batch["chunk_ids"][0]
    assert batch["pixel_values"].shape == (closed, config.image_height, config.image_width)
    assert int((ids == config.sketch_token_id).sum()) == closed * config.visual_tokens_per_chunk
    open_tokens = ids[chunks == closed + 1].tolist()
    assert open_tokens == stream[closed * config.chunk_size :]


def test_training_layout_keeps_each_closed_chunk_text_before_its_sketch(processor, config):
    batch = processor(text=SAMPLE_TEXT[:200], prefix="Note.", keep_closed_text=True, return_labels=True)
    ids, chunks = batch["input_ids"][0].tolist(), batch["chunk_ids"][0].tolist()
    text = [t for t in ids if t != config.sketch_token_id]
    assert text == processor.encode("Note.") + processor.encode(SAMPLE_TEXT[:200])
    first_sketch = ids.index(config.sketch_token_id)
    assert chunks[first_sketch - 1] == chunks[first_sketch] == 1
    labels = batch["labels"][0]
    assert (labels[batch["input_ids"][0] == config.sketch_token_id] == IGNORE_INDEX).all()


def test_prefix_is_never_compressed(processor):
    prefix = "A system prompt that is long enough to fill more than one chunk of tokens, surely."
    batch = processor(text="short", prefix=prefix)
    assert batch["pixel_values"].shape[0] == 0
    assert batch["input_ids"][0].tolist() == processor.encode(prefix) + processor.encode("short")
    assert set(batch["chunk_ids"][0].tolist()) == {0, 1}


def test_batches_are_left_padded(processor, tokenizer):
    batch = processor(text=[SAMPLE_TEXT[:400], "tiny"])
    short = batch["attention_mask"][1]
    assert short[-1] == 1 and short[0] == 0
    assert (batch["input_ids"][1][short == 0] == tokenizer.pad_token_id).all()
    assert batch["pixel_values"].shape[0] == int((batch["input_ids"] == processor.sketch_token_id).sum()) // 4


def test_literal_special_token_text_never_becomes_a_placeholder(processor):
    batch = processor(text="see <|sketch|> here")
    assert processor.sketch_token_id not in batch["input_ids"][0].tolist()
    assert processor.decode(batch["input_ids"][0]) == "see <|sketch|> here"


def processor_drawing(special_token_glyphs, tokenizer):
    return VIST2Processor.from_config(tiny_config(tokenizer, special_token_glyphs=special_token_glyphs), tokenizer)


def test_a_special_token_with_a_glyph_is_drawn_in_one_cell(tokenizer):
    processor = processor_drawing({"<|endoftext|>": "©"}, tokenizer)
    ids = processor.encode("end.") + [tokenizer.eos_token_id] + processor.encode("Next")
    assert processor.chunk_text(ids) == "end.©Next"
    assert processor.chunk_text(torch.tensor(ids)) == "end.©Next"
    assert processor.sketch_chunks([ids])[1][0].ok


def test_a_special_token_name_in_text_is_that_token_as_the_tokenizer_reads_it(tokenizer):
    processor = processor_drawing({"<|endoftext|>": "©"}, tokenizer)
    ids = processor.encode("a<|endoftext|>b")
    assert ids == tokenizer("a<|endoftext|>b", add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id in ids and processor.chunk_text(ids) == "a©b"


@pytest.mark.parametrize("piece_chars", [3, 7, 64])
def test_streamed_text_never_cuts_a_special_tokens_name(processor, piece_chars):
    text = ("Some <|sketch|> text<|endoftext|>and <|im_start|>more<|sketch|><|endoftext|> " * 6)
    streamed = [token for piece in processor.token_pieces(text, piece_chars) for token in piece]
    assert streamed == processor.encode(text)


def test_a_glyph_for_a_token_the_tokenizer_lacks_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="does not have"):
        processor_drawing({"<|eot_id|>": "©"}, tokenizer)


def test_chunk_that_cannot_be_drawn_is_kept_as_text_counted_and_warned(processor, config):
    text = "plain words first " * 3 + "中文" * 20 + " and plain words after" * 3
    with pytest.warns(UserWarning, match="kept as text"):
        batch = processor(text=text)
    kept = int(batch["chunks_kept_as_text"][0])
    assert kept >= 1
    assert sum(not r.ok for r in processor.last_report[0]) == kept
    ids = batch["input_ids"][0]
    assert processor.decode(ids[ids != config.sketch_token_id]).count("中") > 0


def test_empty_prompt_starts_from_the_bos_token(processor, tokenizer):
    batch = processor(text="")
    assert batch["input_ids"][0].tolist() == [tokenizer.bos_token_id]


def test_empty_prompt_without_bos_token_raises(config, tokenizer):
    processor = VIST2Processor.from_config(config, tokenizer)
    original = tokenizer.bos_token
    tokenizer.bos_token = None
    try:
        with pytest.raises(ValueError, match="empty prompt"):
            processor(text="")
    finally:
        tokenizer.bos_token = original


def test_render_returns_one_chunk_sketch_as_image(processor, config):
    image = processor.render("Hello")
    assert image.size == (config.image_width, config.image_height) and image.mode == "L"


@pytest.mark.parametrize("text", ["a\u200bb", "漢x", "x" * 2000])  # a character with no glyph, one the font lacks, overflow
def test_render_warns_where_the_model_would_keep_the_text_as_text(processor, text):
    with pytest.warns(UserWarning, match="1 of 1 closed chunks are kept as text"):
        processor.render(text)


def test_conversation_prefix_is_system_and_labels_cover_assistant_replies_only(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": SAMPLE_TEXT[:150]},
        {"role": "assistant", "content": "It compresses old text."},
    ]
    sample = encode_conversation(processor, messages)
    batch = processor.collate([sample], return_labels=True)
    ids, labels, chunks = batch["input_ids"][0], batch["labels"][0], batch["chunk_ids"][0]
    assert processor.decode(ids[chunks == 0]) == "<|im_start|>system\nBe brief.<|im_end|>\n"
    supervised = processor.decode(ids[labels != IGNORE_INDEX])
    assert supervised == "It compresses old text.<|im_end|>\n"


def test_processor_round_trips_through_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = VIST2Processor.from_pretrained(tmp_path)
    assert loaded.sketch_settings == processor.sketch_settings
    assert loaded.sketch_token_id == processor.sketch_token_id
    first = processor(text=SAMPLE_TEXT[:200])
    second = loaded(text=SAMPLE_TEXT[:200])
    assert first.keys() == second.keys()
    assert all(torch.equal(v, second[k]) if isinstance(v, torch.Tensor) else v == second[k] for k, v in first.items())


def test_a_processor_saved_without_byte_aligned_draws_one_cell_per_character(processor, tmp_path):
    import json

    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    del saved["sketch_settings"]["byte_aligned"]
    (tmp_path / "processor_config.json").write_text(json.dumps(saved))
    assert VIST2Processor.from_pretrained(tmp_path).sketch_settings == processor.sketch_settings
    assert processor.sketch_settings["byte_aligned"] is False


def test_processor_settings_that_disagree_with_the_model_config_are_detected(processor, tokenizer):
    other = tiny_config(tokenizer, font_size=11)
    assert processor.settings_mismatch(other) == {"font_size": (12, 11)}
    assert processor.settings_mismatch(tiny_config(tokenizer)) == {}


def test_batch_decode_drops_special_tokens_when_asked(processor, tokenizer):
    ids = processor.encode("hello") + [tokenizer.eos_token_id]
    assert processor.batch_decode([ids], skip_special_tokens=True) == ["hello"]


UNDRAWABLE_TEXT = ("plain words " * 3 + "中文 ") * 8  # several chunks hold characters the built-in font lacks


def kept_as_text_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own filter: it shows a warning once per place it points at
        result = call()
    return result, [w for w in caught if "kept as text" in str(w.message)]


def test_a_call_reports_its_chunks_kept_as_text_in_one_warning_at_the_callers_line(processor):
    batch, caught = kept_as_text_warnings(lambda: processor(text=[UNDRAWABLE_TEXT, SAMPLE_TEXT[:300]]))
    kept = batch["chunks_kept_as_text"].tolist()
    assert kept[0] >= 5 and kept[1] == 0 and batch["undrawable_characters"] == ["中文", ""]
    assert len(caught) == 1 and caught[0].filename == __file__
    closed = sum(len(report) for report in processor.last_report)
    assert f"{kept[0]} of {closed} closed chunks are kept as text" in str(caught[0].message)
    assert "'中文'" in str(caught[0].message) and "Fix: " in str(caught[0].message)


@pytest.mark.parametrize("call", ["processor.layout_token_ids", "model(input_ids=...)", "model(..., use_cache=True)",
                                  "VIST2Model(input_ids=...)"])
def test_plain_ids_report_their_chunks_kept_as_text_in_one_warning_at_the_callers_line(model, processor, call,
                                                                                      monkeypatch):
    ids = processor.encode(UNDRAWABLE_TEXT)
    run = {"processor.layout_token_ids": lambda: processor.layout_token_ids(ids),
           "model(input_ids=...)": lambda: model(input_ids=torch.tensor([ids])),
           "model(..., use_cache=True)": lambda: model(input_ids=torch.tensor([ids]), use_cache=True),
           "VIST2Model(input_ids=...)": lambda: base(input_ids=torch.tensor([ids]))}[call]
    base = VIST2Model(model.config)
    for built in (model, base):  # the processor a loaded model builds
        monkeypatch.setattr(built, "_own_processor", processor, raising=False)
    _, caught = kept_as_text_warnings(run)
    assert len(caught) == 1 and caught[0].filename == __file__
    assert "'中文'" in str(caught[0].message)


def test_read_returns_the_report_of_a_processor_call_in_one_warning_at_the_callers_line(model, processor):
    inputs, caught = kept_as_text_warnings(lambda: model.read(processor, UNDRAWABLE_TEXT, sketches_per_step=3))
    batch, _ = kept_as_text_warnings(lambda: processor(text=UNDRAWABLE_TEXT))
    assert inputs["chunks_kept_as_text"].tolist() == batch["chunks_kept_as_text"].tolist() != [0]
    assert inputs["undrawable_characters"] == batch["undrawable_characters"] == ["中文"]
    assert len(caught) == 1 and caught[0].filename == __file__


def test_read_shows_a_progress_bar_unless_turned_off(model, processor, capsys):
    model.read(processor, SAMPLE_TEXT[:400], progress=True)
    assert "VIST2 read" in capsys.readouterr().err
    model.read(processor, SAMPLE_TEXT[:400], progress=False)
    model.read(processor, SAMPLE_TEXT[:400])  # short texts show none by default
    assert "VIST2 read" not in capsys.readouterr().err


def sentencepiece_or_wordpiece(decoder, prepend_scheme="first"):
    """A Llama/Mistral/Gemma-style (Metaspace) or BERT-style (WordPiece) tokenizer, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|sketch|>"]
    if decoder == "Metaspace":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
        trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials, show_progress=False)
    else:
        backend = Tokenizer(models.WordPiece(unk_token="<|endoftext|>"))
        backend.pre_tokenizer, backend.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=384, special_tokens=specials, show_progress=False)
    backend.train_from_iterator([SAMPLE_TEXT], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    return VIST2Processor.from_config(tiny_config(tokenizer), tokenizer)


@pytest.mark.parametrize("decoder, prepend_scheme", [("Metaspace", "always"), ("Metaspace", "first"),
                                                     ("WordPiece", None)])
def test_system_turns_are_found_in_the_ids_of_sentencepiece_and_wordpiece_tokenizers(decoder, prepend_scheme):
    """Their decoders put a space after a special token's name: the header is also matched by its ids."""
    processor = sentencepiece_or_wordpiece(decoder, prepend_scheme)
    turn = "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
    ids = processor.encode(turn + "<|im_start|>user\n" + SAMPLE_TEXT[:200] + "<|im_end|>\n")
    assert processor.prefix_length(ids) == len(processor.encode(turn)) > 0


def test_streamed_tokens_equal_the_whole_texts_under_a_normalizer_that_strips_a_pieces_ends(tokenizer):
    """DeBERTa-v2/v3 strip whitespace at both ends of what they read: no piece may start or end with it."""
    import copy

    from tokenizers import normalizers

    stripping = copy.deepcopy(tokenizer)
    stripping.backend_tokenizer.normalizer = normalizers.Strip()
    processor = VIST2Processor.from_config(tiny_config(stripping), stripping)
    for text in ("one \t two. " * 6, "see ,it. " * 6):
        for piece_chars in range(2, 12):
            assert [t for piece in processor.token_pieces(text, piece_chars) for t in piece] == processor.encode(text)


def test_no_piece_ends_inside_a_word_where_a_single_word_names_spelling_stands(tokenizer):
    """A name added with single_word=True is that token only as a whole word: inside 'sketchunks' it is text."""
    import copy

    from tokenizers import AddedToken

    words = copy.deepcopy(tokenizer)
    words.add_tokens([AddedToken("chunk", single_word=True, normalized=False)])
    processor = VIST2Processor.from_config(tiny_config(words), words)
    text = "the sketchunks and rechunked chunk, xchunk. " * 3
    for piece_chars in (8, 16, 24):
        assert [t for piece in processor.token_pieces(text, piece_chars) for t in piece] == processor.encode(text)


def test_a_tokenizer_that_gives_no_place_to_cut_a_text_reads_it_a_bounded_number_of_times(monkeypatch):
    """Mistral v0.3's Metaspace(split=False) reads a text as one pre-token: a piece grows to the whole text, doubling, so
    each character is checked and pre-tokenized a few times, not once per `piece_chars` of the text before it."""
    from tokenizers import pre_tokenizers

    import vist2.processing_vist2 as processing

    processor = sentencepiece_or_wordpiece("Metaspace")
    processor.tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    text = SAMPLE_TEXT * 100  # about 220 000 characters
    read, check = [], processing.check_characters
    monkeypatch.setattr(processing, "check_characters", lambda piece, offset=0: read.append(len(piece)) or check(piece))
    streamed = [t for piece in processor.token_pieces(text, 256) for t in piece]
    assert streamed == processor.encode(text) and sum(read) <= 5 * len(text)  # (one piece at a time: about n²/512)


def test_a_character_a_chunk_edge_cuts_is_drawn_as_its_bytes_under_byte_fallback():
    """Llama, Mistral and Gemma spell a character their vocabulary lacks as <0xNN> tokens, which a chunk edge may cut:
    the bytes are drawn as marks (as under a byte-level tokenizer), not decoded to U+FFFD and kept as text."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders
    from transformers import PreTrainedTokenizerFast

    base = sentencepiece_or_wordpiece("Metaspace").tokenizer
    data = json.loads(base.backend_tokenizer.to_str())
    for byte in range(256):
        data["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(data["model"]["vocab"]))
    data["model"]["byte_fallback"] = True
    backend = Tokenizer.from_str(json.dumps(data))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|sketch|>"])
    font = str(Path(__file__).resolve().parent.parent / "DejaVuSansMono.ttf")
    processor = VIST2Processor.from_config(tiny_config(tokenizer, font_path=font), tokenizer)
    text = "Zażółć gęślą jaźń, mówię w Krakowie. " * 6
    ids = processor.encode(text)
    assert any(token.startswith("<0x") for token in tokenizer.convert_ids_to_tokens(ids)), "what this test is about"
    chunks = [ids[i : i + processor.chunk_size] for i in range(0, len(ids) - processor.chunk_size, processor.chunk_size)]
    _, reports = processor.sketch_chunks(chunks)
    assert all(report.ok for report in reports)
    assert "".join(processor.sketch_text(chunk) for chunk in chunks).encode("utf-8", "surrogateescape").decode() == \
        processor.tokenizer.decode([t for chunk in chunks for t in chunk])


@pytest.mark.parametrize("decoder", ["Metaspace", "WordPiece"])
def test_a_chunk_that_starts_a_word_draws_unlike_one_that_goes_on_with_the_word_before(decoder):
    """SentencePiece (Llama, Mistral, Gemma) and WordPiece decoders drop the space a text's first word starts with;
    a chunk's first word keeps it in its sketch, so the two chunks below, which differ by that space, draw apart."""
    import numpy as np

    processor = sentencepiece_or_wordpiece(decoder)
    tokenizer = processor.tokenizer
    vocab, rest = tokenizer.get_vocab(), processor.encode(" of text")
    if decoder == "Metaspace":  # "▁word" starts a word, "word" goes on with one
        pairs = ((vocab[token], vocab[token[1:]]) for token in sorted(vocab) if token[:1] == "▁" and token[1:] in vocab)
    else:  # "word" starts a word, "##word" goes on with one
        pairs = ((vocab[token], vocab["##" + token]) for token in sorted(vocab) if "##" + token in vocab)
    starts, goes_on = next(pair for pair in pairs if len(tokenizer.decode([pair[0]]).strip()) > 1)
    (starting, continuing), reports = processor.sketch_chunks([[starts] + rest, [goes_on] + rest])
    assert all(report.ok for report in reports) and not np.array_equal(starting, continuing)
    assert processor.sketch_text([starts] + rest).startswith(" ")


@pytest.mark.parametrize("option", [dict(truncation=True, max_length=8), dict(return_tensors="np"),
                                    dict(padding="max_length", max_length=64), dict(images=[])])
def test_an_option_a_processor_call_would_not_apply_is_refused(processor, option):
    with pytest.raises(ValueError, match=r"would not be applied: .*Fix: drop them"):
        processor(text=SAMPLE_TEXT[:400], **option)


def test_the_options_a_processor_call_always_applies_are_accepted(processor):
    plain = processor(text=[SAMPLE_TEXT[:400], SAMPLE_TEXT[:50]])
    said = processor(text=[SAMPLE_TEXT[:400], SAMPLE_TEXT[:50]], padding=True, return_tensors="pt", images=None)
    assert torch.equal(plain["input_ids"], said["input_ids"]) and torch.equal(plain["chunk_ids"], said["chunk_ids"])


def test_plain_ids_laid_out_by_the_model_get_their_own_calls_reports_while_others_use_the_processor(model, processor,
                                                                                                     monkeypatch):
    """A server's threads share one processor, whose `last_report` is the last call's, whoever made it."""
    ids = processor.encode(UNDRAWABLE_TEXT)
    layout_token_ids = processor.layout_token_ids

    def another_request_in_between(*args, **kwargs):
        batch = layout_token_ids(*args, **kwargs)
        processor(text=SAMPLE_TEXT[:300])  # another thread's call, before this one reads its reports
        return batch
    monkeypatch.setattr(processor, "layout_token_ids", another_request_in_between)
    reports = []
    model.lay_out(torch.tensor([ids]), processor=processor, reports=reports)
    assert len(reports) == (len(ids) - 1) // model.config.chunk_size and sum(not r.ok for r in reports) >= 5
