"""Hardening: the processor over arbitrary Unicode (property-based), and errors that name the field and the fix.

Part 1 checks, for any text and prefix, that the processor raises nothing but a documented error, that every
character of the input reaches the model either inside a sketch that shows it completely or as text tokens, that the
render report names exactly what could not be drawn, and that the token stream round-trips.

Part 2 feeds the model inputs that are wrong in one way each and checks that the error names the field and the fix.

Part 3 checks that streaming a long text chunk by chunk gives what processing it at once gives.
"""

import copy
import functools
import math
import os
import warnings

import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken

from vist2 import VIST2ForCausalLM, VIST2Processor, split_into_chunks
from vist2.processing_vist2 import glyph_atlas, render_with_policy
from vist2.training import tiny_config as tiny_vist2_config

# Deterministic in CI; set VIST2_HYPOTHESIS_RANDOM=1 to explore new examples locally.
PROPERTY = settings(max_examples=30, deadline=None, derandomize=not os.environ.get("VIST2_HYPOTHESIS_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------------------------
# Part 1: arbitrary Unicode through the processor
# ---------------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode():
    """GPT-2's byte <-> printable-character table that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_OF = _bytes_to_unicode()


def token_bytes(tokenizer, ids):
    """The exact UTF-8 bytes a run of byte-level BPE tokens stands for (no replacement characters)."""
    return bytes(BYTE_OF[c] for token in tokenizer.convert_ids_to_tokens(list(ids)) for c in token)


def cell_geometry(settings_, font_size):
    scale = font_size / settings_["font_size"]
    cell_w = max(1, round(settings_["char_width"] * scale))
    cell_h = max(1, round(settings_["line_height"] * scale))
    inner_w = settings_["image_width"] - 2 * settings_["margin"]
    inner_h = settings_["image_height"] - 2 * settings_["margin"]
    return cell_w, cell_h, inner_w // cell_w, inner_h // cell_h


def atlas_for(settings_, font_size):
    cell_w, cell_h, _, _ = cell_geometry(settings_, font_size)
    return glyph_atlas(settings_["font_path"], font_size, cell_w, cell_h, settings_["foreground"],
                       settings_["background"])


def expected_overflow(text, settings_, font_size):
    """An independent count of the wrapped lines a chunk needs: newline-separated paragraphs, one cell a character."""
    _, _, columns, rows = cell_geometry(settings_, font_size)
    if text == "":
        return False
    return sum(max(1, math.ceil(len(p) / columns)) for p in text.split("\n")) > rows


WORDS = sorted(set(SAMPLE_TEXT.split())) + ["\n", "\t", "  ", "\r\n"]
HOSTILE = ["😀", "🚀", "中文", "שלום", "مرحبا", "e\u0301", "\u200d", "\u200b", "\x00", "\x07", "\x1b", "\x0b", "\x0c",
           "\u2028", "\u00a0", "\ufffd", "\ufeff", "<|sketch|>", "<|endoftext|>", "<|im_start|>", "“quoted”", "©", "…"]

text_strategy = st.one_of(
    st.text(max_size=120),  # arbitrary Unicode scalar values (hypothesis leaves out lone surrogates)
    st.lists(
        st.one_of(
            st.sampled_from(WORDS).map(lambda w: w + " "),
            st.sampled_from(HOSTILE),
            st.text(alphabet="\n\r\t \x0b\u3000", min_size=1, max_size=24),  # whitespace runs: overflow by newlines
            st.text(max_size=6),
            st.just("x" * 200),  # a long word overflows its sketch
        ),
        max_size=60,
    ).map("".join),
)


@pytest.fixture(scope="module")
def shrink_processor(tokenizer):
    return VIST2Processor.from_config(tiny_config(tokenizer, overflow_policy="shrink_font"), tokenizer)


@pytest.fixture(scope="module")
def truetype_processor(tokenizer):
    """A common TrueType font (DejaVu Sans, shipped by matplotlib): it draws far more than ASCII, including U+FFFD."""
    matplotlib = pytest.importorskip("matplotlib")
    font = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    if not os.path.exists(font):
        pytest.skip("matplotlib ships no DejaVuSans.ttf here")
    return VIST2Processor.from_config(tiny_config(tokenizer, font_path=font), tokenizer)


def check_sample(processor, text, prefix):
    """Run the processor on one (text, prefix) and check every promise about where each character went."""
    tokenizer, settings_ = processor.tokenizer, processor.sketch_settings
    L, m, sketch_id = processor.chunk_size, processor.visual_tokens_per_chunk, processor.sketch_token_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = processor(text=text, prefix=prefix)  # documented errors: none for a valid str with a bos token
    report = processor.last_report[0]
    kept_warnings = [w for w in caught if issubclass(w.category, UserWarning) and "kept as text" in str(w.message)]

    # Token round trip: text -> ids -> text, exactly, and byte-exact per token.
    stream, prefix_ids = processor.encode(text), processor.encode(prefix)
    assert processor.chunk_text(stream) == text
    assert processor.chunk_text(prefix_ids) == prefix
    assert token_bytes(tokenizer, stream) == text.encode("utf-8")
    assert sketch_id not in stream and sketch_id not in prefix_ids

    ids = batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist()
    chunk_ids = batch["chunk_ids"][0][batch["attention_mask"][0] == 1].tolist()
    if not stream and not prefix_ids:
        prefix_ids = [tokenizer.bos_token_id]
    assert [t for t, c in zip(ids, chunk_ids) if c == 0] == prefix_ids, "the prefix is kept as text, whole"

    chunks = split_into_chunks(stream, L)
    assert len(report) == max(len(chunks) - 1, 0), "one report per closed chunk"
    rendered = 0
    for index, chunk in enumerate(chunks, start=1):
        in_layout = [t for t, c in zip(ids, chunk_ids) if c == index]
        if index == len(chunks):  # the open chunk is always text
            assert in_layout == chunk
            continue
        chunk_report = report[index - 1]
        shown = processor.sketch_text(chunk)
        atlas = atlas_for(settings_, chunk_report.font_size)
        # The report names exactly the characters the font cannot draw, and overflow exactly when lines run out.
        assert chunk_report.undrawable == {c for c in set(shown) - {"\n"} if atlas.lookup(c) is None}
        assert chunk_report.overflow == expected_overflow(shown, settings_, chunk_report.font_size)
        if chunk_report.ok:
            # Rendered: the sketch replaces the text, so it must show every character of the chunk's bytes, whole.
            assert in_layout == [sketch_id] * m
            # Bytes of a character cut by the chunk's edges are shown as byte marks (surrogateescape), not lost.
            assert shown.encode("utf-8", "surrogateescape") == token_bytes(tokenizer, chunk)
            assert all(atlas.lookup(c) is not None for c in set(shown) - {"\n"})
            image, _ = render_with_policy(shown, settings_)
            assert torch.equal(batch["pixel_values"][rendered], torch.from_numpy(image))
            rendered += 1
        else:
            assert in_layout == chunk, f"chunk {index} could not be drawn and must stay as its text tokens"
    assert batch["pixel_values"].shape[0] == rendered
    kept = sum(not r.ok for r in report)
    assert int(batch["chunks_kept_as_text"][0]) == kept
    assert len(kept_warnings) == (kept > 0), "one warning per call sums up the chunks kept as text"
    undrawable = "".join(sorted(set().union(*(r.undrawable for r in report))))
    assert batch["undrawable_characters"] == [undrawable]
    if kept:  # the warning names the problems: overflow, exactly the characters no sketch shows, hidden line breaks
        message = str(kept_warnings[0].message)
        assert f"{kept} of {len(report)} closed chunks are kept as text" in message
        assert ("overflow their sketch" in message) == any(r.overflow for r in report)
        assert (repr(undrawable) in message) == bool(undrawable)
        assert ("line break no pixel shows" in message) == any(r.hidden for r in report if not r.ok)

    # The training layout holds every text token, in order, whatever was rendered.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        training = processor(text=text, prefix=prefix, keep_closed_text=True)
    text_ids = [t for t in training["input_ids"][0].tolist() if t != sketch_id]
    assert text_ids == prefix_ids + stream


@PROPERTY
@given(text=text_strategy, prefix=st.one_of(st.just(""), st.text(max_size=20), st.sampled_from(HOSTILE)))
def test_any_unicode_text_reaches_the_model_drawn_whole_or_as_text(processor, text, prefix):
    check_sample(processor, text, prefix)


@PROPERTY
@given(text=text_strategy)
def test_shrink_font_policy_keeps_the_same_promises(shrink_processor, text):
    check_sample(shrink_processor, text, "")


@pytest.mark.parametrize("font", ["builtin", "truetype"])
def test_a_character_split_by_a_chunk_edge_is_drawn_as_its_bytes_not_kept_as_text(processor, truetype_processor,
                                                                                   font):
    # A byte-level tokenizer may cut a character between two chunks; decoded alone, each half is U+FFFD. Each chunk's
    # sketch shows the bytes it holds (byte marks) instead, so neither chunk is kept as text for that.
    processor = truetype_processor if font == "truetype" else processor
    text = "a" * 15 + "“q” " + "plain " * 3 + "a" * 15 + "é and words"  # chunk edges split “ and é
    ids = processor.encode(text)
    cut = [processor.sketch_text(ids[i : i + 16]) for i in (0, 16)]
    assert cut[0].endswith("\udce2") and cut[1].startswith("\udc80\udc9c"), "“ is cut after its first byte"
    images, reports = processor.sketch_chunks(split_into_chunks(ids, 16)[:-1])
    assert all(report.ok for report in reports) and all(image is not None for image in images)
    check_sample(processor, text, "")


@PROPERTY
@given(text=text_strategy)
def test_any_unicode_text_with_a_truetype_font_that_draws_more_than_ascii(truetype_processor, text):
    check_sample(truetype_processor, text, "")


@pytest.mark.parametrize("text", ["ok \ud800 then", "\udfff"])
def test_a_lone_surrogate_raises_a_value_error_that_names_it(processor, text):
    # A str may hold a lone surrogate (os.fsdecode, json); the Rust tokenizer would raise an opaque TypeError.
    with pytest.raises(ValueError, match="lone surrogate .* at index .*Fix: "):
        processor(text=text)
    with pytest.raises(ValueError, match="lone surrogate"):
        processor(text="fine", prefix=text)


# ---------------------------------------------------------------------------------------------------------------------
# Part 2: clear errors that name the field and the fix
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(processor):
    return processor(text=SAMPLE_TEXT[:300])  # 4 closed chunks, no prefix


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool])
def test_pixel_values_of_another_dtype_name_the_expected_tensor(model, batch, dtype):
    with pytest.raises(ValueError, match=r"pixel_values must be uint8 sketches of shape \(num_sketches, 64, 64\)"):
        model(**dict(batch, pixel_values=batch["pixel_values"].to(dtype)))


def test_float_pixel_values_of_c_channels_are_refused_with_the_processor_named(model, batch):
    pixels = batch["pixel_values"][:, None].expand(-1, 3, -1, -1).float() / 127.5 - 1
    with pytest.raises(ValueError, match=r"uint8 sketches .*got \(4, 3, 64, 64\).*pass what VIST2Processor returns"):
        model(**dict(batch, pixel_values=pixels))


def test_pixel_values_of_another_image_size_name_the_configured_size(model, batch):
    with pytest.raises(ValueError, match=r"pixel_values must be uint8 sketches .*got \(4, 32, 32\)"):
        model(**dict(batch, pixel_values=batch["pixel_values"][:, :32, :32]))


def test_pixel_values_without_a_sketch_dimension_name_the_expected_shape(model, batch):
    # The shape is checked before sketches are counted: a (64, 64) tensor is not "64 sketches".
    with pytest.raises(ValueError, match=r"pixel_values must be uint8 sketches of shape \(num_sketches, 64, 64\)"):
        model(**dict(batch, pixel_values=batch["pixel_values"][0]))


def test_missing_pixel_values_name_the_processor_call(model, batch):
    with pytest.raises(ValueError, match=r"16 '<\|sketch\|>' positions but pixel_values has 0 sketches.*same process"):
        model(**dict(batch, pixel_values=None))


@pytest.mark.parametrize("pixels", [True, False])  # m placeholders in a row are a processor batch's, pixels or not
def test_missing_chunk_ids_are_named(model, batch, pixels):
    with pytest.raises(ValueError, match="chunk_ids is required: pass the batch VIST2Processor returns"):
        model(**dict(batch, chunk_ids=None, **({} if pixels else {"pixel_values": None})))


def test_an_attention_mask_of_another_shape_is_named(model, batch):
    with pytest.raises(ValueError, match=r"attention_mask \(1, 23\) must have one shape"):
        model(**dict(batch, attention_mask=batch["attention_mask"][:, 1:]))


def _relabel(batch, edit):
    chunk_ids = batch["chunk_ids"].clone()
    edit(chunk_ids, batch["input_ids"])
    return dict(batch, chunk_ids=chunk_ids)


def _move_one_placeholder(chunk_ids, input_ids):
    first_of_chunk_2 = (chunk_ids[0] == 2).nonzero()[0, 0]  # closed chunks are placeholders only here
    chunk_ids[0, first_of_chunk_2] = 1  # chunk 1 now has 5 placeholders, chunk 2 has 3: the totals still agree


LAYOUT_ERRORS = {
    "negative chunk id": lambda c, i: c.__setitem__((0, 0), -1),
    "chunk ids going back": lambda c, i: c.copy_(c.flip(1)),
    "sketches in the prefix": lambda c, i: c.zero_(),
    "a sketch run that is not m long": _move_one_placeholder,
}


@pytest.mark.parametrize("case", list(LAYOUT_ERRORS))
def test_chunk_ids_that_disagree_with_input_ids_are_named(model, processor, case):
    batch = processor(text=SAMPLE_TEXT[:300])
    with pytest.raises(ValueError, match="input_ids, chunk_ids and attention_mask disagree: row 0 .*Fix: pass the "
                                         "batch of one VIST2Processor call as it is"):
        model(**_relabel(batch, LAYOUT_ERRORS[case]))


def padded_right(batch):
    """The processor's left-padded batch with each row's padding moved to its end, as a right-padding collator does."""
    moved = {key: value.clone() for key, value in batch.items() if key in ("input_ids", "attention_mask", "chunk_ids")}
    for row, pads in enumerate((batch["attention_mask"] == 0).sum(1).tolist()):
        for value in moved.values():
            value[row] = value[row].roll(-pads)
    return {**batch, **moved}


def test_a_right_padded_processor_batch_trains_as_the_left_padded_one(model, processor):
    batch = processor(text=[SAMPLE_TEXT[:300], SAMPLE_TEXT[:90]], prefix=["", "Sys."], keep_closed_text=True,
                      return_labels=True)
    right = padded_right(batch)
    right["labels"] = torch.stack([row.roll(-int(pads)) for row, pads in zip(batch["labels"],
                                                                             (batch["attention_mask"] == 0).sum(1))])
    with torch.no_grad():
        left_out, right_out = model(**batch), model(**right)
    torch.testing.assert_close(right_out.loss, left_out.loss)
    for row in range(2):
        torch.testing.assert_close(right_out.logits[row][right["attention_mask"][row] == 1],
                                   left_out.logits[row][batch["attention_mask"][row] == 1], atol=2e-5, rtol=0)


def test_a_right_padded_processor_batch_is_refused_by_generate_naming_the_fix(model, processor):
    """A cache takes each row's last column as its newest token: a right-padded row's would be padding."""
    batch = padded_right(processor(text=[SAMPLE_TEXT[:300], SAMPLE_TEXT[:90]], prefix=["", "Sys."]))
    with pytest.raises(ValueError, match=r"row 1 has padding after a real token \(generate takes rows left-padded\)"):
        model.generate(**batch, processor=processor, max_new_tokens=2)


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_padding_inside_a_row_of_a_processor_batch_is_refused(model, processor, call):
    """Positions would start again after it (plain ids with such a mask are laid out without those tokens)."""
    batch = processor(text=SAMPLE_TEXT[:300])
    batch["attention_mask"][0, -10:-8] = 0
    with pytest.raises(ValueError, match="row 0 has padding"):
        model(**batch) if call == "forward" else model.generate(**batch, processor=processor, max_new_tokens=2)


def test_generate_given_the_training_layout_says_which_call_to_make(model, processor):
    training = processor(text=SAMPLE_TEXT[:300], keep_closed_text=True)
    with pytest.raises(ValueError, match="generation layout.*without keep_closed_text=True"):
        model.generate(**training, processor=processor, max_new_tokens=3)


@pytest.mark.parametrize("pixels", [True, False])
def test_generate_with_placeholders_but_without_chunk_ids_names_chunk_ids(model, processor, batch, pixels):
    with pytest.raises(ValueError, match=r"chunk_ids is required .*model\.generate\(\*\*processor\(text=\.\.\.\)"):
        model.generate(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"] if pixels else None,
                       processor=processor, max_new_tokens=3)


def test_generate_names_every_setting_the_processor_disagrees_on(model, tokenizer):
    other_config = tiny_config(tokenizer, chunk_size=32, compression_ratio=8, margin=2)
    other = VIST2Processor.from_config(other_config, tokenizer)
    with pytest.raises(ValueError) as error:
        model.generate(**other(text="hello"), processor=other, max_new_tokens=2)
    message = str(error.value)
    for setting in ("chunk_size", "compression_ratio", "margin"):
        assert setting in message
    assert "VIST2Processor.from_config(model.config, tokenizer)" in message


def test_generate_names_a_different_sketch_token(model, processor, tokenizer):
    other = VIST2Processor.from_config(tiny_config(tokenizer), tokenizer)
    other.sketch_token_id = processor.sketch_token_id - 1
    with pytest.raises(ValueError, match="sketch_token_id"):
        model.generate(**processor(text="hello"), processor=other, max_new_tokens=2)


def test_read_rejects_a_processor_with_other_render_settings(model, tokenizer):
    other = VIST2Processor.from_config(tiny_config(tokenizer, font_size=10), tokenizer)
    with pytest.raises(ValueError, match=r"font_size.*VIST2Processor\.from_config\(model\.config, tokenizer\)"):
        model.read(other, SAMPLE_TEXT[:300])


def test_generate_without_a_processor_is_fine_while_no_chunk_closes(model, processor):
    inputs = processor(text=SAMPLE_TEXT[:200])  # closed chunks come as pixel_values; the open chunk has room
    open_length = int((inputs["chunk_ids"][0] == inputs["chunk_ids"][0].max()).sum())
    # The open chunk closes when the token after its L-th is fed, i.e. while choosing new token number room + 2.
    room = processor.chunk_size - open_length
    out = model.generate(**inputs, max_new_tokens=room + 1, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + room + 1
    with pytest.raises(ValueError, match="built in memory. Fix: pass processor=VIST2Processor"):
        model.generate(**inputs, max_new_tokens=room + 2, do_sample=False)


def test_a_vision_tower_with_a_class_token_is_named_with_the_fix(tokenizer, processor):
    vit = {"model_type": "vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "patch_size": 16, "image_size": 64, "num_channels": 3}
    model = VIST2ForCausalLM(tiny_config(tokenizer, vision_config=vit)).eval()
    with pytest.raises(ValueError, match="vision tower gave 17 tokens per sketch, expected 4x4.*SigLIP"):
        model(**processor(text=SAMPLE_TEXT[:300]))


@pytest.mark.parametrize("geometry", [dict(image_height=32, image_width=128), dict(merge_size=1, image_height=32,
                                                                                     image_width=32)])
def test_every_geometry_the_config_accepts_runs_the_encoder(tokenizer, geometry):
    config = tiny_config(tokenizer, **geometry)
    model = VIST2ForCausalLM(config).eval()
    processor = VIST2Processor.from_config(config, tokenizer)
    batch = processor(text=SAMPLE_TEXT[:300])
    assert batch["pixel_values"].shape[1:] == (config.image_height, config.image_width)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.parametrize("merge_size, image_height, image_width, field", [
    (3, 64, 64, "image_height"),      # 64 is not a multiple of 16*3
    (1, 64, 64, "image_height"),      # 16 patches but m = 4
    (2, 64, 48, "image_width"),       # 48 is not a multiple of 16*2
])
def test_geometry_the_encoder_cannot_produce_is_rejected_with_a_fix(merge_size, image_height, image_width, field):
    with pytest.raises(ValueError, match=rf"^VIST2Config\.{field}: .*Fix: "):
        tiny_vist2_config(merge_size=merge_size, image_height=image_height, image_width=image_width)


@pytest.mark.parametrize("sketch_token_id", [999, -5])
def test_a_sketch_token_outside_the_vocabulary_is_rejected(sketch_token_id):
    with pytest.raises(ValueError, match=r"^VIST2Config\.sketch_token_id: .*Fix: "):
        tiny_vist2_config(vocab_size=384, sketch_token_id=sketch_token_id)


@pytest.mark.parametrize("field, value", [("image_std", 0.0), ("image_std", -1.0), ("image_mean", "0.5")])
def test_pixel_normalisation_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=rf"^VIST2Config\.{field}: .*Fix: "):
        tiny_vist2_config(**{field: value})


# ---------------------------------------------------------------------------------------------------------------------
# Part 3: streaming a long text chunk by chunk (scripts/measure_streaming.py measures the memory; docs/STREAMING.md)
# ---------------------------------------------------------------------------------------------------------------------

DOCSTRING_TEXT = ("Return the value.\n\n    Args:\n        x: the input value, a number.\n        y: another one.\n\n"
                  "    Returns:\n        the sum.\n") * 6


@pytest.fixture(scope="module")
def demo_processor():
    """The project's demo tokenizer (trained on docstrings: it merges newline + indentation runs)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(Path(__file__).resolve().parent.parent / "tokenization" /
                                                  "demo_tokenizer"))
    return VIST2Processor.from_config(tiny_config(tokenizer), tokenizer)


def test_streamed_chunks_sketches_and_reports_equal_the_whole_call(processor):
    text = SAMPLE_TEXT[:500] + " naïve café " + "\n" * 20 + SAMPLE_TEXT[:400] + " 中文 " + SAMPLE_TEXT[:300]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = processor(text=text)
        reports = processor.last_report[0]
        streamed = list(processor.iter_chunks(text, piece_chars=97))
    closed, (open_ids, open_sketch, open_report) = streamed[:-1], streamed[-1]
    stream = processor.encode(text)
    assert [t for ids, _, _ in streamed for t in ids] == stream
    assert open_sketch is None and open_report is None and 1 <= len(open_ids) <= processor.chunk_size
    assert [(r.ok, r.overflow, r.undrawable, r.font_size) for _, _, r in closed] == \
        [(r.ok, r.overflow, r.undrawable, r.font_size) for r in reports]
    assert sum(sketch is None for _, sketch, _ in closed) == int(whole["chunks_kept_as_text"][0]) >= 2
    sketches = [sketch for _, sketch, _ in closed if sketch is not None]
    assert torch.equal(processor.pixel_values(sketches), whole["pixel_values"])


def test_streaming_encodes_one_piece_at_a_time(processor, monkeypatch):
    import itertools

    encoded = []
    original = processor.encode
    monkeypatch.setattr(processor, "encode", lambda text, **kw: encoded.append(len(text)) or original(text, **kw))
    book = SAMPLE_TEXT * 2000  # about 1.1 million characters
    first = list(itertools.islice(processor.iter_chunks(book, piece_chars=4096), 3))
    assert len(first) == 3 and all(len(ids) == processor.chunk_size for ids, _, _ in first)
    assert encoded and max(encoded) <= 4096 and sum(encoded) <= 4096, "three chunks need only the first piece"


# Pieces must end where no later text can change the tokens: the start of the piece's last pre-token.
@pytest.mark.parametrize("text, piece_chars", [
    (DOCSTRING_TEXT, 16), (DOCSTRING_TEXT, 40), (DOCSTRING_TEXT, 97),  # cuts inside newline + indentation runs
    ("".join(SAMPLE_TEXT.split())[:600], 97),  # no whitespace in a piece: a hard cut inside a word
    *((("They're sure we'll see you've been there. " * 6), size) for size in range(5, 60, 3)),  # a cut in "'re"
    *(("First.\n\nThe second.\n\n\nThird T|> 4.\n\n" * 4, size) for size in range(2, 30, 3)),  # after a whitespace run
])
def test_streamed_tokens_equal_the_whole_text_with_the_demo_tokenizer(demo_processor, text, piece_chars):
    streamed = [t for ids, _, _ in demo_processor.iter_chunks(text, piece_chars=piece_chars) for t in ids]
    assert demo_processor.chunk_text(streamed) == text
    assert streamed == demo_processor.encode(text)


def test_a_text_of_adjacent_special_token_names_streams_in_pieces(processor):
    """Nothing but names: the pieces end between names (the tokenizer cuts there first), not once at the text's end."""
    text = "<|im_end|><|im_start|>" * 2000
    pieces = list(processor.token_pieces(text, 64))
    assert len(pieces) > 100 and [t for piece in pieces for t in piece] == processor.encode(text)


@pytest.mark.parametrize("piece_chars", range(8, 60, 3))
def test_streamed_tokens_equal_the_whole_text_next_to_names_that_take_the_whitespace_around_them(tokenizer,
                                                                                                 piece_chars):
    """A name with rstrip (Phi-3's chat names, say) takes the whitespace after it: no piece ends right after one."""
    stripping = copy.deepcopy(tokenizer)
    stripping.add_tokens([AddedToken("<|user|>", rstrip=True, lstrip=True, normalized=False, special=True)])
    processor = VIST2Processor.from_config(tiny_config(stripping), stripping)
    text = "".join(f"word{i} words  <|user|>\n  reply {i}.\n" for i in range(40))
    assert [t for piece in processor.token_pieces(text, piece_chars) for t in piece] == processor.encode(text)


def test_no_spelling_of_the_sketch_tokens_name_gives_its_id(tokenizer):
    """A tokenizer that normalises before it matches names would read "<|SKETCH|>" as the token: it is spelled."""
    from tokenizers import normalizers

    from vist2 import VIST2Processor

    lowercasing = copy.deepcopy(tokenizer)
    lowercasing.backend_tokenizer.normalizer = normalizers.Lowercase()
    lowercasing.add_tokens([AddedToken("<|sketch|>", special=True, normalized=True)], special_tokens=True)
    processor = VIST2Processor.from_config(tiny_config(tokenizer), lowercasing)
    assert processor.sketch_token_id not in processor(text="<|SKETCH|> and <|sketch|>")["input_ids"][0].tolist()


@pytest.mark.parametrize("piece_chars", range(2, 40))
def test_streamed_tokens_equal_the_whole_text_under_a_normalizer_that_composes_marks(piece_chars):
    """Qwen3's tokenizer normalises to NFC: a piece that ended between a letter and its combining mark (decomposed text)
    would be normalised apart from it."""
    from conftest import build_tokenizer
    from tokenizers import normalizers

    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()
    processor = VIST2Processor.from_config(tiny_config(tokenizer), tokenizer)
    text = "Cafe\u0301 au lait, cre\u0300me bru\u0302le\u0301e. " * 8  # decomposed accents
    streamed = [t for ids, _, _ in processor.iter_chunks(text, piece_chars=piece_chars) for t in ids]
    assert streamed == processor.encode(text)


# ---------------------------------------------------------------------------------------------------------------------
# Part 4: bad settings and inputs are named at the earliest point, with the fix
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("font", ["missing", "not a font"])
def test_a_font_path_that_does_not_open_is_named_when_the_config_and_processor_are_built(tokenizer, tmp_path, font):
    path = tmp_path / "font.ttf"
    if font == "not a font":
        path.write_text("plain text, not a font")
    with pytest.raises(ValueError, match=r"^VIST2Config\.font_path: cannot open .*font.ttf.*Fix: "):
        tiny_config(tokenizer, font_path=str(path))
    settings_ = dict(tiny_config(tokenizer).sketch_settings, font_path=str(path))
    with pytest.raises(ValueError, match=r"^VIST2Processor\.sketch_settings\['font_path'\]: cannot open .*Fix: "):
        VIST2Processor(tokenizer, sketch_settings=settings_)


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.pop("image_mean"), "image_mean"), (lambda s: s.update(char_width=0), "char_width"),
    (lambda s: s.update(margin=40), "margin"), (lambda s: s.update(image_std=float("nan")), "image_std"),
    (lambda s: s.update(overflow_policy="wrap"), "overflow_policy"), (lambda s: s.update(newline_glyph="ab"),
                                                                       "newline_glyph"),
])
def test_processor_sketch_settings_are_validated_when_it_is_built(processor, edit, field):
    settings_ = dict(processor.sketch_settings)
    edit(settings_)
    with pytest.raises(ValueError, match=rf"^VIST2Processor\.sketch_settings\['{field}'\]: .*Fix: "):
        VIST2Processor(processor.tokenizer, sketch_settings=settings_)


def test_a_misspelled_config_key_is_named_with_the_setting_it_resembles():
    with pytest.raises(ValueError, match=r"^VIST2Config\.chunk_sise: not a VIST2 setting\. Fix: did you mean 'chunk_si"):
        tiny_vist2_config(chunk_sise=32)
    with pytest.raises(ValueError, match="did you mean 'newline_glyph'"):
        tiny_vist2_config(newline_glyf="«")


def test_a_processor_kwarg_that_would_draw_otherwise_than_the_model_is_refused(processor, tmp_path):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    auto = functools.partial(AutoProcessor.from_pretrained, trust_remote_code=True)
    for load in (VIST2Processor.from_pretrained, auto):
        with pytest.raises(ValueError, match=r"\['font_path'\] cannot be set on a processor: .*part of the model"):
            load(str(tmp_path), font_path="/some/other/font.ttf")


def test_a_tokenizer_without_the_sketch_token_is_named(config):
    from conftest import SPECIAL_TOKENS, build_tokenizer

    plain = build_tokenizer(special_tokens=SPECIAL_TOKENS[:-1])
    with pytest.raises(ValueError, match=r"tokenizer's '<\|sketch\|>' is None.*Fix: use the tokenizer saved with"):
        VIST2Processor.from_config(config, plain)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_named(tokenizer, processor):
    small = tiny_vist2_config(vocab_size=256, sketch_token_id=processor.sketch_token_id)
    with pytest.raises(ValueError, match=r"tokenizer has 384 tokens but the model's vocabulary .* 256.*Fix: "):
        VIST2Processor.from_config(small, tokenizer)
    model = VIST2ForCausalLM(small).eval()
    with pytest.raises(ValueError, match=r"tokenizer has 384 tokens but the model embeds 256.*Fix: "):
        model.generate(**processor(text="hello"), processor=processor, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids hold ids outside the model's vocabulary \(0\.\.255\).*Fix: "):
        model(**processor(text=SAMPLE_TEXT[:300]))


def test_a_row_whose_attention_mask_is_all_zero_is_named(model, processor):
    batch = processor(text=[SAMPLE_TEXT[:300], "short"])
    batch["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"attention_mask: row 1 masks every token.*Fix: "):
        model(**batch)
    with pytest.raises(ValueError, match=r"attention_mask: row 1 masks every token"):
        model.generate(**batch, processor=processor, max_new_tokens=2)


def test_a_lone_surrogate_met_while_reading_is_named_at_its_index_in_the_whole_text(model, processor, monkeypatch):
    text = SAMPLE_TEXT[:500] + "\ud800" + SAMPLE_TEXT[:100]  # far beyond the first streamed piece
    monkeypatch.setattr(processor, "iter_chunks", lambda t: VIST2Processor.iter_chunks(processor, t, piece_chars=97))
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at index 500,"):
        model.read(processor, text)
