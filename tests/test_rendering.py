"""The sketch renderer: a deterministic pure function that never loses text silently."""

import functools
import hashlib
import os
import string
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vist2 import render_chunk
from vist2.processing_vist2 import render_with_policy, wrap_into_lines
from vist2.training import tiny_config as tiny_vist2_config

SETTINGS = tiny_vist2_config().sketch_settings
HOSTILE_TEXT = {
    "emoji": "ok 😀🚀 done",
    "cjk": "中文文本 and text",
    "rtl": "שלום עולם مرحبا",
    "control": "bell\x07 null\x00 escape\x1b",
    "zero_width": "join\u200dme",
    "long_word": "x" * 10_000,
}


def digest(text, settings=SETTINGS):
    return hashlib.sha256(render_chunk(text, settings)[0].tobytes()).hexdigest()


def test_sketch_has_configured_size_and_is_grey():
    image, report = render_chunk("Hello, world.", SETTINGS)
    assert image.shape == (SETTINGS["image_height"], SETTINGS["image_width"]) and image.dtype == np.uint8
    assert report.ok


def test_rendering_twice_gives_identical_bytes():
    assert digest("The same text, twice.") == digest("The same text, twice.")


def test_rendering_in_another_process_gives_identical_bytes():
    code = (
        "import hashlib; from vist2 import render_chunk; from vist2.training import tiny_config; "
        "print(hashlib.sha256(render_chunk('Across processes.', tiny_config().sketch_settings)[0].tobytes()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == digest("Across processes.")


def test_threads_rendering_at_once_draw_what_one_thread_draws():
    """A server renders its requests' chunks in threads that share one glyph atlas, each drawing new characters."""
    import threading
    from pathlib import Path

    from vist2.processing_vist2 import glyph_atlas

    settings = {**SETTINGS, "font_path": str(Path(__file__).resolve().parent.parent / "DejaVuSansMono.ttf")}
    characters = [chr(c) for c in range(0xC0, 0x250)]  # many characters each text draws first
    texts = ["".join(characters[i::8])[:60] for i in range(8)]
    expected = [render_chunk(text, settings)[0] for text in texts]
    rendered, failures = {}, []

    def render_all(first):
        try:
            for i in [(first + j) % 8 for j in range(8)]:
                rendered[first, i] = render_chunk(texts[i], settings)[0]
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(error)
    for _ in range(5):
        glyph_atlas.cache_clear()  # an atlas drawn from nothing, by all threads at once
        threads = [threading.Thread(target=render_all, args=(first,)) for first in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures and all(np.array_equal(image, expected[i]) for (_, i), image in rendered.items())


def test_each_character_occupies_a_fixed_cell():
    cell_w, cell_h = SETTINGS["char_width"], SETTINGS["line_height"]
    alone, _ = render_chunk("a", SETTINGS)
    shifted, _ = render_chunk("ba", SETTINGS)
    assert np.array_equal(alone[:cell_h, :cell_w], shifted[:cell_h, cell_w : 2 * cell_w])


def test_different_text_gives_different_pixels():
    assert digest("first text") != digest("other text")


def test_empty_text_renders_blank_and_a_line_break_no_pixel_shows_is_reported():
    image, report = render_chunk("", SETTINGS)
    assert report.ok and (image == SETTINGS["background"]).all()
    for text in ["\n\n", "end\n", "a" * 16 + "\nb"]:  # 16 columns: a full line, then a break (looks like wrapping)
        assert render_chunk(text, SETTINGS)[1].hidden, f"{text!r} draws like another text"
    assert not render_chunk("mid space\nand\n\nbreaks", SETTINGS)[1].hidden


@pytest.mark.parametrize("text, alike", [("end ", "end"), ("   ", ""), ("line \nnext", "line\nnext"),
                                         ("a" * 15 + " wrapped", "a" * 15 + "\nwrapped")])  # 16 columns
def test_a_space_that_ends_a_line_is_drawn_as_a_mark(text, alike):
    image, report = render_chunk(text, SETTINGS)
    assert report.ok and not np.array_equal(image, render_chunk(alike, SETTINGS)[0])


def test_lines_wrap_at_the_column_limit_and_break_at_newlines():
    assert wrap_into_lines("abcdefg\nhi", 3) == (["abc", "def", "g", "hi"], False)
    assert wrap_into_lines("a\tb\r\nc", 8) == (["a\tb\r", "c"], False)  # a tab and a CR take one (marked) cell


def test_newline_glyph_keeps_the_text_on_one_line_with_the_glyph_in_the_newlines_cell():
    assert wrap_into_lines("ab\ncd\r\ne", 8, newline_glyph="«") == (["ab«cd\r«e"], False)
    inline = {**SETTINGS, "newline_glyph": "«"}
    cell_w, cell_h = SETTINGS["char_width"], SETTINGS["line_height"]
    broken, _ = render_chunk("ab\ncd", SETTINGS)
    joined, report = render_chunk("ab\ncd", inline)
    assert report.ok
    assert (broken[cell_h : 2 * cell_h] < SETTINGS["background"]).any()  # "cd" on the second line
    assert (joined[cell_h:] == SETTINGS["background"]).all()  # nothing below the first line
    glyph, _ = render_chunk("«", SETTINGS)
    assert np.array_equal(joined[:cell_h, 2 * cell_w : 3 * cell_w], glyph[:cell_h, :cell_w])
    assert np.array_equal(joined[:cell_h, 3 * cell_w : 5 * cell_w], broken[cell_h : 2 * cell_h, : 2 * cell_w])


def test_byte_aligned_sketch_gives_a_character_one_cell_per_utf8_byte():
    aligned = {**SETTINGS, "byte_aligned": True}  # "©" is two bytes: its glyph, then a blank cell
    assert digest("©x", aligned) == digest("© x") != digest("©x")
    assert digest("abc", aligned) == digest("abc")


def test_byte_aligned_special_token_glyph_takes_one_cell_as_its_token_does():
    glyphs = {"<|endoftext|>": "©"}
    assert digest("©x", {**SETTINGS, "byte_aligned": True, "special_token_glyphs": glyphs}) == digest("©x")


def test_a_newline_glyph_the_font_cannot_draw_is_reported():
    image, report = render_with_policy("a\nb", {**SETTINGS, "newline_glyph": "\u21b5"})
    assert image is None and report.undrawable == {"\u21b5"}


@pytest.mark.parametrize("kind", sorted(HOSTILE_TEXT))
def test_hostile_text_is_reported_not_silently_dropped(kind):
    text = HOSTILE_TEXT[kind]
    image, report = render_with_policy(text, SETTINGS)
    assert image is None, "a chunk that cannot be drawn in full must be kept as text"
    assert not report.ok
    if kind == "long_word":
        assert report.overflow
    else:
        assert report.undrawable and report.undrawable <= set(text)


def test_undrawable_characters_are_listed_even_beyond_an_overflow():
    _, report = render_chunk("x" * 10_000 + "中", SETTINGS)
    assert report.overflow and report.undrawable == {"中"}


def test_shrink_policy_fits_overflowing_text_with_a_smaller_font():
    settings = dict(SETTINGS, overflow_policy="shrink_font")
    text = "word " * 30 + "end"  # 153 characters: more than the 128 cells at full size
    assert render_chunk(text, SETTINGS)[1].overflow
    image, report = render_with_policy(text, settings)
    assert image is not None and report.ok and report.font_size < SETTINGS["font_size"]


def test_shrink_policy_stops_at_the_floor_and_keeps_text():
    settings = dict(SETTINGS, overflow_policy="shrink_font")
    image, report = render_with_policy("y" * 10_000, settings)
    assert image is None and report.overflow and report.font_size == SETTINGS["min_font_size"]


def test_a_configured_truetype_font_file_is_used(tmp_path):
    from PIL import ImageFont

    # Pillow's built-in scalable font is a TrueType file held in memory: write it out and configure its path.
    font_file = tmp_path / "builtin.ttf"
    font_file.write_bytes(ImageFont.load_default(size=12).path.getvalue())
    settings = dict(SETTINGS, font_path=str(font_file))
    assert digest("Font test", settings) == digest("Font test")
    assert digest("Font test", dict(settings, font_size=10)) != digest("Font test", settings)


def test_a_missing_font_file_raises():
    with pytest.raises(OSError):
        render_chunk("text", dict(SETTINGS, font_path="/nonexistent/font.ttf"))


def test_a_font_name_found_nowhere_is_named_with_the_fix():
    with pytest.raises(OSError, match="font_path 'NoSuchFont.ttf' does not open.*Fix: pass the path"):
        render_chunk("text", dict(SETTINGS, font_path="NoSuchFont.ttf"))


# ---------------------------------------------------------------------------------------------------------------------
# Injective: a sketch drawn (report ok) reads back to exactly its chunk's text; anything else is reported
# ---------------------------------------------------------------------------------------------------------------------

WHITESPACE = "\t\r\n\x0b\x0c\x1c\x1d\x1e\x1f\x85\u00a0\u1680\u2000\u2007\u200a\u2028\u2029\u202f\u205f\u3000"
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\x00\x07\x1b\u00ad"
DRAWN = "ab .0,W/\\;x«©»±⁄\t\r\n"  # drawn by the built-in font (some as marks, some only where no mark is them)
HOSTILE = WHITESPACE + INVISIBLE + "\u0301\u0308\u20dd\ufffdéñ中😀<|>"  # not drawn, or cut into bytes at an edge
ALPHABET = DRAWN + HOSTILE


def read_sketch(image, settings, chars):
    """An independent reading of a sketch: each cell is looked up among the cells of `chars` (and the byte marks);
    rows lose their trailing blanks; a row that is not full ends with a newline, unless it is the last one."""
    from vist2.processing_vist2 import BYTE_MARKED, SHOWN_NEWLINE, SHOWN_SPACE, glyph_atlas

    one_cell = {settings["newline_glyph"], *(settings["special_token_glyphs"] or {}).values(), *BYTE_MARKED}

    def cells_taken(char):  # byte_aligned: a character's bytes; a glyph drawn for one token or byte takes one
        return 1 if char in one_cell or not settings["byte_aligned"] else len(char.encode("utf-8"))

    atlas = glyph_atlas(settings["font_path"], settings["font_size"], settings["char_width"], settings["line_height"],
                        settings["foreground"], settings["background"])
    table = {}
    for char in {*chars, *string.printable.strip(), *BYTE_MARKED, " ", *(settings["newline_glyph"] or "")}:
        if atlas.lookup(char) is not None:
            table.setdefault(atlas.glyphs[atlas.lookup(char)].tobytes(), set()).add(char)
    h, w, margin = settings["line_height"], settings["char_width"], settings["margin"]
    rows, columns = (settings["image_height"] - 2 * margin) // h, (settings["image_width"] - 2 * margin) // w
    cells = image[margin : margin + rows * h, margin : margin + columns * w].reshape(rows, h, columns, w)
    lines, continued = [], 0
    for row in range(rows):
        found = [table.get(cells[row, :, column].tobytes(), set()) for column in range(columns)]
        if any(len(chars) != 1 for chars in found):
            return None  # a cell no character draws, or one that two characters draw alike
        line = ""
        for (char,) in found:  # the cells after a wide character are blank, and stand for its other bytes ("\0")
            if continued:
                assert char == " ", "a wide character's other cells are blank"
                char, continued = "\0", continued - 1
            else:
                continued = cells_taken(char) - 1
            line += char
        lines.append(line.rstrip(" "))
    while lines and not lines[-1]:
        lines.pop()
    text = "".join(line + "\n" * (i + 1 < len(lines) and len(line) < columns) for i, line in enumerate(lines))
    text = text.replace(SHOWN_SPACE, " ").replace(SHOWN_NEWLINE, "\n")  # a space that ends a line, a newline mark
    text = text.replace("\0", "")
    return text.replace(settings["newline_glyph"], "\n") if settings["newline_glyph"] else text


@pytest.fixture(scope="module", params=["page", "demo glyphs", "newline mark", "byte aligned"])
def any_processor(request, tokenizer):
    from conftest import tiny_config

    from vist2 import VIST2Processor

    settings_ = {"page": {}, "demo glyphs": dict(newline_glyph="«", special_token_glyphs={"<|endoftext|>": "©"}),
                 "newline mark": dict(newline_glyph="\n"),
                 "byte aligned": dict(newline_glyph="«", special_token_glyphs={"<|endoftext|>": "©"}, byte_aligned=True),
                 }[request.param]
    config = tiny_config(tokenizer, **settings_)
    return VIST2Processor.from_config(config, tokenizer)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.builds(lambda text, inserts: functools.reduce(lambda t, i: t[: i[0]] + i[1] + t[i[0] :], inserts, text),
                      st.text(st.sampled_from(DRAWN), max_size=30),
                      st.lists(st.tuples(st.integers(0, 30), st.sampled_from(HOSTILE)), max_size=2)),
       special=st.booleans())
def test_a_sketch_drawn_reads_back_to_exactly_its_chunk_text(any_processor, text, special):
    # Every chunk is drawn so that no other text draws the same sketch, or it is reported (and kept as text): cut bytes,
    # whitespace variants, invisible characters, combining marks and the glyph characters themselves included.
    ids = any_processor.encode(text)[:16]
    ids = ids[:-1] + [any_processor.tokenizer.eos_token_id] if special and ids else ids
    (image,), (report,) = any_processor.sketch_chunks([ids])
    if report.ok:
        assert read_sketch(image, any_processor.sketch_settings, ALPHABET) == any_processor.sketch_text(ids)


@pytest.mark.parametrize("text, other", [
    ("a\r\nb", "a\nb"), ("a\rb", "a\nb"), ("a\u2028b", "a b"), ("a\u2029b", "a b"), ("a\u00a0b", "a b"),
    ("a\u3000b", "a b"), ("a\tb", "a   b"), ("ab ", "ab"), ("ab  ", "ab "), ("ab\n", "ab"), ("a \nb", "a\nb"),
    ("a" * 16 + "\nb", "a" * 16 + "b"), ("a" * 15 + " b", "a" * 15 + "\nb"),
])
def test_texts_that_would_draw_alike_are_not_both_drawn(text, other):
    first, second = render_with_policy(text, SETTINGS), render_with_policy(other, SETTINGS)
    assert first[0] is None or second[0] is None or not np.array_equal(first[0], second[0])
    assert (first[0] is None) == (not first[1].ok)


def test_a_glyph_character_in_the_text_is_reported_not_drawn_like_the_mark(tokenizer):
    from conftest import tiny_config

    from vist2 import VIST2Processor

    config = tiny_config(tokenizer, newline_glyph="«", special_token_glyphs={"<|endoftext|>": "©"})
    processor = VIST2Processor.from_config(config, tokenizer)
    for literal in ("x « y", "x © y"):  # a literal « would draw like a newline, © like <|endoftext|>
        (image,), (report,) = processor.sketch_chunks([processor.encode(literal)])
        assert image is None and report.undrawable == set(literal[2])
    (image,), (report,) = processor.sketch_chunks([processor.encode("x\ny") + [tokenizer.eos_token_id]])
    assert report.ok and image is not None, "the marks themselves are drawn"


def test_every_glyph_keeps_all_its_ink_in_its_cell():
    from PIL import Image, ImageDraw

    from vist2.processing_vist2 import glyph_atlas

    for size, cell in [(12, (4, 8)), (16, (8, 16))]:  # the tiny test geometry and the demo checkpoint's
        atlas = glyph_atlas(None, size, *cell, 0, 255)
        for char in map(chr, range(0x21, 0x3000)):
            if atlas.lookup(char) is None:
                continue
            free = Image.new("L", (8 * size, 8 * size), 0)
            ImageDraw.Draw(free).text((4 * size, 4 * size), char, fill=255, font=atlas.font)
            assert atlas._coverage(char).sum() == np.asarray(free).sum(), f"{char!r} loses ink outside its cell"


def test_the_default_font_draws_no_two_characters_alike():
    from vist2.processing_vist2 import BYTE_MARKED, glyph_atlas

    atlas = glyph_atlas(None, 12, 4, 8, 0, 255)
    drawn = [c for c in list(map(chr, range(0x20, 0x3000))) + list(BYTE_MARKED) if atlas.lookup(c) is not None]
    assert len({atlas.glyphs[atlas.lookup(c)].tobytes() for c in drawn}) == len(drawn) > 100


@pytest.mark.parametrize("cell", [(4, 8), (8, 16)])
def test_a_font_that_draws_two_letters_alike_draws_only_the_first_and_reports_the_other(cell):
    """DejaVu Sans draws Latin "a" and Cyrillic "а" (and "o" and Greek "ο") as one shape: two texts would draw alike."""
    import matplotlib

    font = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    settings = {**SETTINGS, "font_path": font, "char_width": cell[0], "line_height": cell[1]}
    for latin, lookalike in (("a", "\u0430"), ("o", "\u03bf")):
        drawn, reported = render_with_policy(f"x{latin}y", settings), render_with_policy(f"x{lookalike}y", settings)
        assert drawn[1].ok and drawn[0] is not None, "the first of the repertoire keeps its glyph"
        assert reported[0] is None and reported[1].undrawable == {lookalike}
    assert render_with_policy("x\u00e9y", settings)[1].ok, "a letter no other draws alike is drawn"


@pytest.mark.parametrize("size, cell", [(16, (8, 16)), (12, (4, 8))])
def test_the_shipped_font_draws_the_punctuation_of_prose_and_reports_its_lookalikes(size, cell):
    """DejaVu Sans Mono squeezes the em dash into the en dash's cell, and draws ’ as ʼ and ” as ˮ
    (`benchmarks/results/lookalikes-dejavu.md`): the character of prose keeps the cell, the other is reported."""
    font = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "DejaVuSansMono.ttf")
    settings = {**SETTINGS, "font_path": font, "font_size": size, "min_font_size": size, "char_width": cell[0],
                "line_height": cell[1]}
    for prose, lookalike in (("\u2019", "\u02bc"), ("\u201d", "\u02ee"), ("\u2014", "\u2013"), ("\u2022", "\u2219")):
        drawn, reported = render_with_policy(f"x{prose}y", settings), render_with_policy(f"x{lookalike}y", settings)
        assert drawn[1].ok and drawn[0] is not None
        assert reported[0] is None and reported[1].undrawable == {lookalike}
