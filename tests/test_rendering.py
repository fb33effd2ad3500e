"""The sketch renderer: a deterministic pure function that never loses text silently."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from vist2 import VIST2Config, render_chunk
from vist2.processing_vist2 import render_with_policy, wrap_into_lines

SETTINGS = VIST2Config.tiny().sketch_settings
HOSTILE = {
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
        "import hashlib; from vist2 import VIST2Config, render_chunk; "
        "print(hashlib.sha256(render_chunk('Across processes.', VIST2Config.tiny().sketch_settings)[0].tobytes()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == digest("Across processes.")


def test_each_character_occupies_a_fixed_cell():
    cell_w, cell_h = SETTINGS["char_width"], SETTINGS["line_height"]
    alone, _ = render_chunk("a", SETTINGS)
    shifted, _ = render_chunk("ba", SETTINGS)
    assert np.array_equal(alone[:cell_h, :cell_w], shifted[:cell_h, cell_w : 2 * cell_w])


def test_different_text_gives_different_pixels():
    assert digest("first text") != digest("other text")


def test_empty_and_whitespace_only_text_render_blank_without_problems():
    for text in ["", "   ", "\n\n\t"]:
        image, report = render_chunk(text, SETTINGS)
        assert report.ok and (image == SETTINGS["background"]).all()


def test_lines_wrap_at_the_column_limit_and_break_at_newlines():
    assert wrap_into_lines("abcdefg\nhi", 3) == ["abc", "def", "g", "hi"]
    assert wrap_into_lines("a\tb", 8) == ["a   b"]
    assert wrap_into_lines("a\r\nb\rc", 8) == ["a", "b", "c"]


def test_newline_glyph_keeps_the_text_on_one_line_with_the_glyph_in_the_newlines_cell():
    assert wrap_into_lines("ab\ncd\r\ne", 8, newline_glyph="«") == ["ab«cd«e"]
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


def test_a_newline_glyph_the_font_cannot_draw_is_reported():
    image, report = render_with_policy("a\nb", {**SETTINGS, "newline_glyph": "\u21b5"})
    assert image is None and report.undrawable == {"\u21b5"}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_text_is_reported_not_silently_dropped(kind):
    text = HOSTILE[kind]
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
    text = "word " * 30  # 150 characters: more than the 128 cells at full size
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
