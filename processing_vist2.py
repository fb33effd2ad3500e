"""VIST2 processing: chunking, the sketch renderer, and `VIST2Processor`.

A text becomes `P c_1 c_2 ... c_K`: an optional prefix kept as text, then chunks of `chunk_size` (L) tokens. Every
chunk but the last (open: the model keeps writing into it) is *closed*: rendered into a sketch that replaces it by
`visual_tokens_per_chunk` placeholders. The renderer is a glyph atlas (each character drawn once into a fixed cell, a
sketch is the atlas indexed by a grid of character ids): a pure function of (text, settings), fast enough for decoding.
"""
import bisect
import functools
import itertools
import re
import threading
import unicodedata
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .configuration_vist2 import SKETCH_SETTING_KEYS, copy_font, font_file_name, locate_font, validate_sketch_settings


SKETCH_TOKEN = "<|sketch|>"
IGNORE_INDEX = -100
# Bytes the text holds but no character shows (a tab or carriage return, a newline drawn in line, a space that ends a
# line, a byte of a character that a chunk edge splits, spelled as Python's "surrogateescape" does) are each drawn as a
# mark of their own, their bits as blocks: never as a font glyph nor as blank paper.
SHOWN_SPACE, SHOWN_NEWLINE = "\udc20", "\udc0a"
BYTE_MARKED = {"\t": 0x09, "\r": 0x0D, SHOWN_NEWLINE: 0x0A, SHOWN_SPACE: 0x20,
               **{chr(0xDC00 + b): b for b in range(0x80, 0x100)}}
# Characters that may look alike (Latin a, Cyrillic а, Greek ο; ’ and ʼ; the dashes): where a font draws two of them as
# the same cell, the first in this order keeps the cell and the other is reported instead of drawn, so no two texts
# draw alike. ASCII, then the punctuation of prose, then the letters of Latin, Greek and Cyrillic, then the blocks of
# the Basic Multilingual Plane that a text font holds beside them (other scripts, punctuation, symbols, presentation
# forms). `benchmarks/lookalikes.py` lists what a font draws alike despite it.
LOOKALIKE_REPERTOIRE = "".join(dict.fromkeys(map(chr, [
    *range(0x21, 0x7F), *map(ord, "’‘“”—–…•′″€"), *range(0xA1, 0x250), *range(0x370, 0x530), *range(0x250, 0x370),
    *range(0x530, 0x800), *range(0x1D00, 0x1DC0), *range(0x1E00, 0x2000), *range(0x2000, 0x2C00),
    *range(0x2C60, 0x2C80), *range(0x2E00, 0x2E80), *range(0xA640, 0xA800), *range(0xFB00, 0xFE00),
    *range(0xFE20, 0xFF00)])))
LOOKALIKE_POSITION = {char: position for position, char in enumerate(LOOKALIKE_REPERTOIRE)}
# With `byte_aligned`, the cells after a character of several UTF-8 bytes, one per byte beyond the first: drawn blank.
CONTINUATION = "\ud800"
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # a byte-fallback token (SentencePiece): one byte of a character


# -- Chunking ----------------------------------------------------------------------------------------------------------
def split_into_chunks(token_ids: list[int], chunk_size: int) -> list[list[int]]:
    """Cut a token stream into chunks of `chunk_size`; the last one (the open chunk) may be shorter."""
    return [list(token_ids[i : i + chunk_size]) for i in range(0, len(token_ids), chunk_size)]


# -- Sketch renderer ---------------------------------------------------------------------------------------------------
@dataclass
class SketchReport:
    """What rendering one chunk could not do; an empty report means every character is in the sketch, and no other
    text draws the same sketch. `hidden`: a line break no pixel shows (see `wrap_into_lines`)."""

    overflow: bool = False
    undrawable: set = field(default_factory=set)
    font_size: int = 0
    hidden: bool = False

    @property
    def ok(self) -> bool:
        return not self.overflow and not self.undrawable and not self.hidden


def check_characters(text: str, offset: int = 0):
    """A lone surrogate (from os.fsdecode, json, ...) is not a character: name it, at its index in the caller's text
    (`offset`: where `text` starts in it); the tokenizer would raise an opaque error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"VIST2Processor: the text holds a lone surrogate {text[error.start]!r} at index "
                         f"{offset + error.start}, which is not a character. Fix: clean it first, e.g. "
                         "text.encode('utf-8', 'replace').decode()") from None


def byte_level_alphabet() -> dict[str, int]:
    """The byte each character of a byte-level BPE vocabulary stands for (GPT-2's printable stand-ins for bytes)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def _has_no_glyph(char: str) -> bool:
    # Control, format, surrogate, private-use and unassigned code points have no glyph to show; whitespace other than
    # the space would draw as a space. U+FFFD stands for bytes lost before the text reached us.
    return (unicodedata.category(char)[0] == "C" or char.isspace() or char == "\ufffd") and char != " "


class GlyphAtlas:
    """Each character drawn once at `font_size` and box-filtered into a `cell_height x cell_width` grey cell."""

    def __init__(self, font_path, font_size, cell_width, cell_height, foreground, background):
        # One glyph at a time needs no shaping; the basic layout also avoids raqm, which fails on some token strings.
        try:
            self.font = (ImageFont.truetype(font_path, font_size, layout_engine=ImageFont.Layout.BASIC) if font_path
                         else ImageFont.load_default(size=font_size))
        except OSError as error:  # a bare file name that is neither here nor among the system's fonts
            raise OSError(f"font_path {font_path!r} does not open ({error}). Fix: pass the path of a .ttf/.otf file "
                          "that exists on this machine (a model's own font: load the model with from_pretrained)") from None
        self.cell, self.lock = (cell_height, cell_width), threading.Lock()
        self.foreground, self.background = foreground, background
        ascent, descent = self.font.getmetrics()
        self.canvas = (max(1, int(np.ceil(self.font.getlength("M")))), ascent + descent)
        self.notdef = self._coverage("\U0010fffd")  # what the font draws for a character it lacks
        self.index = {" ": 0, CONTINUATION: 0}
        self.glyphs = np.full((1, *self.cell), background, dtype=np.uint8)  # (atlas index, cell_h, cell_w)
        self.marks = {char: self._byte_mark(value) for char, value in BYTE_MARKED.items()}
        self.reserved = {cell.tobytes() for cell in [self.glyphs[0], *self.marks.values()] if cell is not None}
        # cell bytes -> the first character of LOOKALIKE_REPERTOIRE drawn as that cell, among its first `_compared`
        self._lookalikes, self._compared = {}, 0

    def _coverage(self, char: str) -> np.ndarray | None:
        """The glyph's ink on the `canvas` box, widened to hold ink that falls outside it (a comma's left bearing):
        the cell then shows all of it. `None` if the ink reaches beyond three canvases."""
        w, h = self.canvas
        image = Image.new("L", (3 * w, 3 * h), 0)
        ImageDraw.Draw(image).text((w, h), char, fill=255, font=self.font)
        ink = np.asarray(image)
        rows, columns = ink.any(1).nonzero()[0], ink.any(0).nonzero()[0]
        if not rows.size:
            return ink[h : 2 * h, w : 2 * w]
        if rows[0] == 0 or columns[0] == 0 or rows[-1] == 3 * h - 1 or columns[-1] == 3 * w - 1:
            return None
        return ink[min(h, rows[0]) : max(2 * h, rows[-1] + 1), min(w, columns[0]) : max(2 * w, columns[-1] + 1)]

    def _byte_mark(self, value: int) -> np.ndarray | None:
        """A byte's 8 bits as a 4 x 2 grid of solid blocks (bit 7 top left); `None` if the cell is too small."""
        height, width = self.cell
        if height < 4 or width < 2:
            return None
        bits = np.array([(value >> (7 - i)) & 1 for i in range(8)], dtype=bool).reshape(4, 2)
        rows, columns = np.arange(height) * 4 // height, np.arange(width) * 2 // width
        return np.where(bits[rows][:, columns], self.foreground, self.background).astype(np.uint8)

    def _draw(self, char: str) -> np.ndarray | None:
        """The font's glyph for `char` box-filtered into a cell; `None` if the font lacks it or it looks like paper or
        like a byte mark (two texts would draw alike)."""
        try:
            coverage = self._coverage(char)
        except (UnicodeError, ValueError, OSError):
            return None
        if coverage is None or np.array_equal(coverage, self.notdef):
            return None
        ink = np.asarray(Image.fromarray(coverage).resize(self.cell[::-1], Image.Resampling.BOX)) / 255.0
        cell = np.round(self.background + (self.foreground - self.background) * ink).astype(np.uint8)
        return None if cell.tobytes() in self.reserved else cell

    def looks_like_another(self, char: str, cell: np.ndarray) -> bool:
        """Whether a character before `char` in `LOOKALIKE_REPERTOIRE` (any of it, for others) draws the same cell.
        The repertoire is drawn in its order as far as a character needs, so rendering stays a pure function of the
        text, and a text of early characters never draws the whole repertoire."""
        position = LOOKALIKE_POSITION.get(char, len(LOOKALIKE_REPERTOIRE))
        for other in LOOKALIKE_REPERTOIRE[self._compared : position]:
            drawn = self._draw(other)
            if drawn is not None:
                self._lookalikes.setdefault(drawn.tobytes(), other)
        self._compared = max(self._compared, position)
        return self._lookalikes.get(cell.tobytes(), char) != char

    def lookup(self, char: str) -> int | None:
        """Atlas index of `char`, drawn on first use; `None` if the font cannot draw it apart from every other one.
        Threads that render at once (a server's requests) share the atlas: a character is drawn under its lock, and its
        index is published only once its cell is in `glyphs`, which only grows."""
        if char in self.index:
            return self.index[char]
        with self.lock:
            if char not in self.index:
                cell = self.marks.get(char)
                if char not in self.marks and not _has_no_glyph(char):
                    cell = self._draw(char)
                    cell = None if cell is None or self.looks_like_another(char, cell) else cell
                if cell is not None:
                    self.glyphs = np.concatenate([self.glyphs, cell[None]])
                self.index[char] = None if cell is None else len(self.glyphs) - 1
            return self.index[char]


glyph_atlas = functools.lru_cache(maxsize=32)(GlyphAtlas)  # one atlas per font, size, cell and colours


def byte_cells(text: str, token_glyphs=()) -> str:
    """`text` with a character of n UTF-8 bytes followed by n - 1 `CONTINUATION` cells, so that cell i of a chunk of a
    byte-level tokenizer shows its byte i wherever a wider character came before (`token_glyphs`, each drawn for one
    special token, take one cell). The first cell decides how many follow, so no two texts draw alike."""
    widths = {char: len(char.encode("utf-8", "surrogateescape")) for char in set(text) - set(token_glyphs)}
    return "".join(char + CONTINUATION * (widths.get(char, 1) - 1) for char in text)


def wrap_into_lines(text: str, columns: int, newline_glyph: str | None = None, byte_aligned: bool = False,
                    token_glyphs=()) -> tuple[list[str], bool]:
    """Hard-wrap at `columns` characters, one cell each (`byte_cells` first if `byte_aligned`); newlines end a line (or
    are drawn as `newline_glyph`). A space that ends the text, or (newlines ending lines) any line, is `SHOWN_SPACE`:
    blank paper there would look like the end, or a line break. Also: whether a line break would be hidden (at the end,
    or after a full line)."""
    if byte_aligned:
        text = byte_cells(text, token_glyphs)
    if newline_glyph:
        text = text.replace("\n", SHOWN_NEWLINE if newline_glyph == "\n" else newline_glyph)
    paragraphs = [p[:-1] + SHOWN_SPACE if p.endswith(" ") else p for p in text.split("\n")]
    hidden = text.endswith("\n") or any(p and len(p) % columns == 0 for p in paragraphs[:-1])
    lines = [p[i : i + columns] for p in paragraphs for i in range(0, len(p), columns) or [0]]
    if not newline_glyph:
        lines = [line[:-1] + SHOWN_SPACE if line.endswith(" ") else line for line in lines]
    return lines, hidden


def sketch_lines(text: str, settings: dict, columns: int) -> tuple[list[str], bool]:
    """`wrap_into_lines` under a sketch's settings (`VIST2Config.sketch_settings`): the layout of every sketch."""
    return wrap_into_lines(text, columns, settings["newline_glyph"], settings["byte_aligned"],
                           (settings["special_token_glyphs"] or {}).values())


def render_chunk(text: str, settings: dict, font_size: int | None = None) -> tuple[np.ndarray, SketchReport]:
    """One chunk's sketch as a `(image_height, image_width)` uint8 grey array, and what could not be drawn.
    `settings`: `VIST2Config.sketch_settings`; a smaller `font_size` shrinks the cell too (the shrink policy)."""
    font_size = font_size or settings["font_size"]
    scale = font_size / settings["font_size"]
    cell_w, cell_h = max(1, round(settings["char_width"] * scale)), max(1, round(settings["line_height"] * scale))
    height, width, margin = settings["image_height"], settings["image_width"], settings["margin"]
    columns, rows = (width - 2 * margin) // cell_w, (height - 2 * margin) // cell_h
    atlas = glyph_atlas(settings["font_path"], font_size, cell_w, cell_h, settings["foreground"], settings["background"])
    lines, hidden = sketch_lines(text, settings, columns)
    report = SketchReport(font_size=font_size, hidden=hidden)
    index = {char: atlas.lookup(char) for char in set("".join(lines))}
    if len(lines) > rows:
        report.overflow = True
        lines = lines[:rows]
    report.undrawable = {char for char, found in index.items() if found is None}
    index = {char: found or 0 for char, found in index.items()}
    grid = np.zeros((rows, columns), dtype=np.int64)
    for row, line in enumerate(lines):
        grid[row, : len(line)] = np.fromiter(map(index.__getitem__, line), dtype=np.int64, count=len(line))
    # A cell's row of cell_w pixels as one item: the gather and the transpose into image rows move 1/cell_w the items.
    cell_rows = atlas.glyphs.view(np.dtype((np.void, cell_w)))[..., 0]  # (atlas index, cell_h)
    block = np.ascontiguousarray(cell_rows[grid].transpose(0, 2, 1)).view(np.uint8).reshape(rows * cell_h, -1)
    image = np.full((height, width), settings["background"], dtype=np.uint8)
    image[margin : margin + block.shape[0], margin : margin + block.shape[1]] = block
    return image, report


def render_with_policy(text: str, settings: dict) -> tuple[np.ndarray | None, SketchReport]:
    """Apply the overflow policy: `None` pixels mean "keep this chunk as text"."""
    image, report = render_chunk(text, settings)
    if report.overflow and settings["overflow_policy"] == "shrink_font":
        for font_size in range(settings["font_size"] - 1, settings["min_font_size"] - 1, -1):
            image, report = render_chunk(text, settings, font_size)
            if not report.overflow:
                break
    return (image if report.ok else None), report


# -- Processor ---------------------------------------------------------------------------------------------------------
class VIST2Processor(ProcessorMixin):
    r"""Tokenizer + sketch renderer -> VIST2 model inputs. `processor(text=..., prefix=...)` returns, left-padded:
    `input_ids` (`prefix`, m placeholders per drawn closed chunk (one kept as text: its tokens), the open chunk's
    tokens; with `keep_closed_text=True`, training's `P c_1 V_1 c_2 V_2 ... c_K`), `attention_mask`, `chunk_ids` (0 for
    the prefix, i for chunk i), `pixel_values` (`(drawn closed chunks, H, W)` uint8 sketches, in placeholder order),
    and per sample `chunks_kept_as_text` and `undrawable_characters` (chunks that could not be drawn stay as text; one
    warning per call; `last_report`)."""

    tokenizer_class = "AutoTokenizer"

    def __init__(self, tokenizer=None, sketch_settings=None, sketch_token_id=None, chat_template=None, **kwargs):
        if sketch_settings is None:
            raise ValueError("VIST2Processor needs sketch_settings: build it with "
                             "VIST2Processor.from_config(config, tokenizer)")
        sketch_settings = {"byte_aligned": False, **sketch_settings}  # (absent from settings saved without it)
        validate_sketch_settings(sketch_settings, "VIST2Processor.sketch_settings['{}']")
        self.sketch_settings = sketch_settings
        self.last_report = []
        super().__init__(tokenizer, chat_template=chat_template, **kwargs)
        vocab = self.tokenizer.get_vocab()
        if SKETCH_TOKEN not in vocab or sketch_token_id not in (None, vocab[SKETCH_TOKEN]):
            raise ValueError(f"VIST2Processor: the tokenizer's '<|sketch|>' is {vocab.get(SKETCH_TOKEN)}, the model's "
                             f"sketch_token_id {sketch_token_id}. Fix: use the tokenizer saved with the model, or add "
                             "'<|sketch|>' to yours (tokenization/add_special_tokens.py) and set sketch_token_id to it")
        self.sketch_token_id = vocab[SKETCH_TOKEN]
        # Text spells "<|sketch|>" as characters (no text forges a visual position); other added tokens' names are read
        # as their tokens, as the tokenizer (a pipeline, a chat template's text) reads them.
        self.sketch_spelled = self.tokenizer(SKETCH_TOKEN, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        added = self.tokenizer.added_tokens_decoder.values()
        names = {token.content for token in added} | {SKETCH_TOKEN}
        self.added_names = re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True))))
        self.names_taking_space_after = {token.content for token in added if getattr(token, "rstrip", False)}
        self.names_of_single_words = {token.content for token in added if getattr(token, "single_word", False)}
        glyphs = self.sketch_settings["special_token_glyphs"] or {}
        unknown = sorted(set(glyphs) - set(vocab))
        if unknown:
            raise ValueError(f"VIST2Processor: special_token_glyphs names {unknown}, which the tokenizer does not have. "
                             "Fix: map only the tokenizer's own special tokens to glyphs")
        self.glyph_of_token_id = {vocab[token]: glyph for token, glyph in glyphs.items()}
        # Characters that mark something else in a sketch: the same character in the text would look like them.
        self.marks = set(glyphs.values()) | {self.sketch_settings["newline_glyph"]} - {None, "\n"}
        decoder = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_of = byte_level_alphabet() if "ByteLevel" in repr(decoder) else None
        model = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "model", None)
        self.byte_fallback = bool(getattr(model, "byte_fallback", False))  # (Llama, Mistral, Gemma: <0xNN> tokens)
        # Other decoders (SentencePiece's Metaspace, WordPiece) drop the space that a text's first word starts with, so
        # a chunk that starts a word would draw like one that goes on with the word before it: such text is decoded
        # after an anchor (one letter's token), whose own text is then cut off.
        letters = [] if self.byte_of else [self.encode(letter) for letter in "xqzjkvw"]
        self.anchor = next((ids for ids in letters if len(ids) == 1), None)
        self.anchor_text = self.anchor and self.tokenizer.decode(self.anchor, clean_up_tokenization_spaces=False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        changed = sorted(set(kwargs) & set(SKETCH_SETTING_KEYS))  # (ProcessorMixin would drop them without a word)
        if changed:
            raise ValueError(f"VIST2Processor: {changed} cannot be set on a processor: the sketch settings are part of "
                             "the model, which only reads sketches drawn its way. Fix: load the processor as saved; to "
                             "draw otherwise, change the model's config and train it for that")
        return super().from_pretrained(*args, **kwargs)

    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path, **kwargs):
        processor_dict, unused = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        settings = processor_dict.get("sketch_settings")
        if settings and settings.get("font_path"):  # the font saved with the processor (see configuration_vist2)
            font = locate_font(settings["font_path"], pretrained_model_name_or_path, kwargs)
            processor_dict["sketch_settings"] = {**settings, "font_path": font}
        return processor_dict, unused

    def save_pretrained(self, save_directory, **kwargs):
        copy_font(self.sketch_settings["font_path"], save_directory)
        return super().save_pretrained(save_directory, **kwargs)

    def to_json_string(self) -> str:  # saved, the font is its file name (see VIST2Config.to_json_string)
        settings = self.sketch_settings
        self.sketch_settings = {**settings, "font_path": font_file_name(settings["font_path"])}
        try:
            return super().to_json_string()
        finally:
            self.sketch_settings = settings

    @classmethod
    def from_config(cls, config, tokenizer, **kwargs):
        """The processor that matches a model config (same chunking and render settings)."""
        config.validate_vist2()  # (a setting changed since the config was made: sketches the model could not read)
        vocab_size = getattr(config.text_config, "vocab_size", None)
        if vocab_size and len(tokenizer) > vocab_size:
            raise ValueError(f"VIST2Processor: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                             f"(text_config.vocab_size) {vocab_size}. Fix: use the model's own tokenizer, or "
                             "model.resize_token_embeddings(len(tokenizer)) before training")
        return cls(tokenizer, sketch_settings=config.sketch_settings, sketch_token_id=config.sketch_token_id, **kwargs)

    @property
    def chunk_size(self) -> int:
        return self.sketch_settings["chunk_size"]

    @property
    def visual_tokens_per_chunk(self) -> int:
        return self.chunk_size // self.sketch_settings["compression_ratio"]

    def settings_mismatch(self, config) -> dict:
        """{setting: (processor value, config value)} for every sketch setting the two disagree on."""
        own = {**self.sketch_settings, "font_path": font_file_name(self.sketch_settings["font_path"])}
        other = {**config.sketch_settings, "font_path": font_file_name(config.font_path)}  # the same file, moved
        mismatch = {k: (own.get(k), v) for k, v in other.items() if own.get(k) != v}
        if self.sketch_token_id != config.sketch_token_id:
            mismatch["sketch_token_id"] = (self.sketch_token_id, config.sketch_token_id)
        return mismatch

    # -- rendering ----------------------------------------------------------------------------------------------------
    def render(self, text: str) -> Image.Image:
        """One chunk's sketch at the configured size (overflowing text is cut; see `render_with_policy`). Warns, as a
        processor call does, where the model would keep the text as text rather than draw this."""
        image, report = render_chunk(text, self.sketch_settings)
        report.undrawable |= self.marks.intersection(text)
        self.kept_as_text([report], stacklevel=2)
        return Image.fromarray(image, mode="L")

    def chunk_text(self, token_ids) -> str:
        """A chunk's text to read or print: `sketch_text`, with bytes of a character its edges cut as U+FFFD."""
        return self.sketch_text(token_ids).encode("utf-8", "surrogateescape").decode("utf-8", "replace")

    def sketch_text(self, token_ids, literal_marks: set | None = None) -> str:
        """The exact text a chunk's sketch shows (training and generation both render it): special tokens as their
        glyphs, bytes of a character the chunk's edges cut as lone surrogates ("surrogateescape", drawn as byte
        marks). `literal_marks`, if given, collects the glyph characters the text itself holds."""
        def decode(ids, bytes_apart=True):
            ids, settings = list(ids), dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
            anchored = self.tokenizer.decode(self.anchor + ids, **settings) if self.anchor and ids else None
            if anchored is not None and anchored.startswith(self.anchor_text):  # (see __init__)
                text = anchored[len(self.anchor_text):]
            else:
                text = self.tokenizer.decode(ids, **settings)
            if "\ufffd" in text and self.byte_of:  # maybe a character cut by the chunk's edge: read the bytes
                spelled = "".join(self.tokenizer.convert_ids_to_tokens(list(ids)))
                if all(char in self.byte_of for char in spelled):
                    text = bytes(map(self.byte_of.__getitem__, spelled)).decode("utf-8", "surrogateescape")
            elif "\ufffd" in text and bytes_apart and self.byte_fallback:  # SentencePiece's <0xNN> tokens: runs of
                runs = itertools.groupby(zip(ids, self.tokenizer.convert_ids_to_tokens(ids)),  # them are read as bytes
                                         key=lambda pair: BYTE_TOKEN.fullmatch(pair[1]) is not None)
                text = "".join(bytes(int(token[3:5], 16) for _, token in run).decode("utf-8", "surrogateescape")
                               if is_byte else decode([i for i, _ in run], bytes_apart=False) for is_byte, run in runs)
            if literal_marks is not None:
                literal_marks.update(self.marks.intersection(text))
            return text
        if not self.glyph_of_token_id:
            return decode(token_ids)
        pieces, run = [], []
        for token_id in map(int, token_ids):  # tensors hash by identity, not by value
            if token_id in self.glyph_of_token_id:
                pieces += [decode(run), self.glyph_of_token_id[token_id]]
                run = []
            else:
                run.append(token_id)
        return "".join(pieces + [decode(run)])

    def sketch_chunks(self, chunks: list[list[int]]) -> tuple[list[np.ndarray | None], list[SketchReport]]:
        """Render closed chunks; `None` marks a chunk the policy keeps as text (see `kept_as_text`)."""
        images, reports, known = [], [], len(self.tokenizer)
        for token_ids in chunks:
            unshown = {f"<id {t}, past the tokenizer>" for t in token_ids if t >= known}  # (decoded: nothing)
            image, report = render_with_policy(self.sketch_text(token_ids, unshown), self.sketch_settings)
            if unshown:  # (and glyph characters the text itself holds: they would look like what they mark)
                image, report.undrawable = None, report.undrawable | unshown
            images.append(image)
            reports.append(report)
        return images, reports

    def kept_as_text(self, reports: list[SketchReport], stacklevel: int | None = None) -> tuple[int, list[str]]:
        """How many chunks of `reports` are kept as text, and the characters no sketch could show; with `stacklevel`,
        one warning that sums them up, pointing that many frames up (the caller's own line)."""
        kept = [report for report in reports if not report.ok]
        undrawable = sorted(set().union(*(report.undrawable for report in kept)))
        if kept and stacklevel:
            counts = (sum(r.overflow for r in kept), sum(bool(r.undrawable) for r in kept), sum(r.hidden for r in kept))
            problems = ("overflow their sketch (Fix: overflow_policy='shrink_font' or a larger sketch when training)",
                        f"hold characters no sketch of this model shows: {''.join(undrawable)!r} (Fix: a font_path "
                        "that draws them when training, or clean the text, e.g. unicodedata.normalize('NFKC', text))",
                        "end with a line break no pixel shows (Fix: a newline_glyph when training)")
            summary = "; ".join(f"{count} {what}" for count, what in zip(counts, problems) if count)
            warnings.warn(f"VIST2: {len(kept)} of {len(reports)} closed chunks are kept as text (overflow_policy="
                          f"{self.sketch_settings['overflow_policy']!r}): {summary}.", stacklevel=stacklevel + 1)
        return len(kept), undrawable

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        """The sketches as drawn, `(n, H, W)` uint8: the model normalises them on its own device (12x fewer bytes to
        build, hold and copy there than float pixels of C channels)."""
        h, w = self.sketch_settings["image_height"], self.sketch_settings["image_width"]
        return torch.from_numpy(np.stack(images) if images else np.zeros((0, h, w), dtype=np.uint8))

    # -- layout -------------------------------------------------------------------------------------------------------
    def encode_sample(self, prefix_ids, stream_ids, keep_closed_text=False, trainable=None):
        """One sample's layout as lists: input_ids, chunk_ids, labels, sketches (uint8) and the render report.
        `trainable` (a bool per stream token) marks the tokens that carry a label (default: all; never the prefix)."""
        prefix_ids, stream_ids = list(prefix_ids), list(stream_ids)
        if not prefix_ids and not stream_ids:
            if self.tokenizer.bos_token_id is None:
                raise ValueError("VIST2Processor: empty prompt. Pass some text or a prefix (the tokenizer has no "
                                 "bos_token to start from).")
            prefix_ids = [self.tokenizer.bos_token_id]
        trainable = [True] * len(stream_ids) if trainable is None else list(trainable)
        input_ids, chunk_ids, labels = list(prefix_ids), [0] * len(prefix_ids), [IGNORE_INDEX] * len(prefix_ids)
        chunks = split_into_chunks(stream_ids, self.chunk_size)
        label_chunks = split_into_chunks(trainable, self.chunk_size)
        images, reports = self.sketch_chunks(chunks[:-1])
        last_text = 0  # the last chunk whose text the layout holds (the prefix: 0)
        for index, (chunk, keep) in enumerate(zip(chunks, label_chunks), start=1):
            sketched = index < len(chunks) and images[index - 1] is not None  # the last chunk is open
            ids, ids_chunks, text_length = self.chunk_layout(index, chunk, sketched, keep_closed_text)
            input_ids += ids
            chunk_ids += ids_chunks
            labels += [t if k else IGNORE_INDEX for t, k in zip(chunk[:text_length], keep)]
            if text_length and last_text < index - 1:  # text before it is missing: its first token has no predictor
                labels[len(input_ids) - len(ids)] = IGNORE_INDEX
            last_text = index if text_length else last_text
            labels += [IGNORE_INDEX] * (len(ids) - text_length)
        labels[0] = IGNORE_INDEX  # nothing predicts the first token: keeps Trainer's num_items_in_batch exact
        return {"input_ids": input_ids, "chunk_ids": chunk_ids, "labels": labels, "report": reports,
                "sketches": [image for image in images if image is not None],
                **dict(zip(("chunks_kept_as_text", "undrawable_characters"), self.kept_as_text(reports)))}

    def chunk_layout(self, index: int, token_ids, sketched: bool, keep_text: bool = False):
        """The layout rule, for samples, `read` and decoding: chunk `index` adds `(input_ids, chunk_ids, text_length)`:
        its text if open, kept as text or `keep_text` (training's `P c_1 V_1 ...`), then its sketch's placeholders."""
        text = list(token_ids) if keep_text or not sketched else []
        ids = text + [self.sketch_token_id] * (self.visual_tokens_per_chunk if sketched else 0)
        return ids, [index] * len(ids), len(text)

    def collate(self, samples: list[dict], return_labels=False) -> BatchFeature:
        """Left-pad encoded samples into a batch (the model derives positions from the layout, not from padding)."""
        length = max(len(s["input_ids"]) for s in samples)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def left_pad(values, fill):
            return [[fill] * (length - len(v)) + list(v) for v in values]
        data = {
            "input_ids": torch.tensor(left_pad([s["input_ids"] for s in samples], pad_id)),
            "attention_mask": torch.tensor(left_pad([[1] * len(s["input_ids"]) for s in samples], 0)),
            "chunk_ids": torch.tensor(left_pad([s["chunk_ids"] for s in samples], 0)),
            "pixel_values": self.pixel_values([image for s in samples for image in s["sketches"]]),
            "chunks_kept_as_text": torch.tensor([s["chunks_kept_as_text"] for s in samples]),
        }
        if return_labels:
            data["labels"] = torch.tensor(left_pad([s["labels"] for s in samples], IGNORE_INDEX))
        return BatchFeature(data)

    def __call__(self, text=None, prefix=None, keep_closed_text=False, return_labels=False, return_tensors="pt",
                 **kwargs):
        """Encode `text` (compressed chunk by chunk) after an optional `prefix` (kept as text; without one, the
        text's leading system turns, see `prefix_length`): strings or lists of strings of equal length. Batches are
        left-padded, as tensors."""
        honoured = {"return_tensors": ("pt",), "padding": (True, "longest")}  # what a batch always is
        unsupported = {key: value for key, value in {**kwargs, "return_tensors": return_tensors}.items()
                       if value is not None and not any(value is v or value == v for v in honoured.get(key, ()))}
        if unsupported:
            raise ValueError(f"VIST2Processor: {unsupported} would not be applied: it takes text (and a prefix), "
                             "compresses long text instead of cutting it and returns left-padded torch tensors. Fix: "
                             "drop them (cut the text yourself if you must)")
        texts = [text] if isinstance(text, str) or text is None else list(text)
        prefixes = [prefix] * len(texts) if isinstance(prefix, str) or prefix is None else list(prefix)
        if len(prefixes) != len(texts):
            raise ValueError(f"VIST2Processor: got {len(texts)} texts but {len(prefixes)} prefixes; pass one per text")
        samples = []
        for t, p in zip(texts, prefixes):
            ids = self.encode(t)
            cut = 0 if p is not None else self.prefix_length(ids)  # a chat's system turns, as for token ids
            samples.append(self.encode_sample(self.encode(p) if p is not None else ids[:cut], ids[cut:],
                                              keep_closed_text=keep_closed_text))
        return self.batch(samples, return_labels, stacklevel=2)

    def batch(self, samples: list[dict], return_labels=False, stacklevel: int | None = 1,
              reports: list | None = None) -> BatchFeature:
        """Encoded samples -> the model's batch and each sample's `undrawable_characters`; their render reports go to
        `reports` (a caller's list, this call's only), to `last_report` (per sample: the processor's last call, which
        threads sharing it overwrite) and, with `stacklevel`, into one warning that sums them up (`kept_as_text`)."""
        self.last_report = [s["report"] for s in samples]
        flat = [report for s in samples for report in s["report"]]
        if reports is not None:
            reports += flat
        self.kept_as_text(flat, stacklevel and stacklevel + 1)
        batch = self.collate(samples, return_labels=return_labels)
        batch["undrawable_characters"] = ["".join(s["undrawable_characters"]) for s in samples]
        return batch

    def iter_chunks(self, text, piece_chars: int = 1 << 16):
        """Stream `text` (a string, or token ids): `(token_ids, sketch or None, report)` per closed chunk, then
        `(token_ids, None, None)` for the open one. A piece ends at the last start of a pre-token (or of a special
        token's name) before its last one (more text changes only the last two) that is not inside a name, not right
        after whitespace and not where normalising would join the characters on either side, so the tokens equal those
        of the whole text at once."""
        pending = []
        for piece in self.token_pieces(text, piece_chars) if isinstance(text, str) else [self.spell_sketch(text)]:
            pending += piece
            while len(pending) > self.chunk_size:  # the last chunk must stay open
                chunk, pending = pending[: self.chunk_size], pending[self.chunk_size :]
                images, reports = self.sketch_chunks([chunk])
                yield chunk, images[0], reports[0]
        yield pending, None, None

    def token_pieces(self, text: str, piece_chars: int):
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        pre_tokenizer, normalizer = getattr(backend, "pre_tokenizer", None), getattr(backend, "normalizer", None)
        normalize = normalizer.normalize_str if normalizer else lambda piece: piece

        names = list(self.added_names.finditer(text))  # the tokenizer cuts the text at these first
        # Never inside a name, nor right after one that takes the whitespace after it (rstrip: Phi-3's chat names).
        unsafe = {i for name in names for i in range(name.start() + 1, name.end())}
        unsafe |= {name.end() for name in names if name.group() in self.names_taking_space_after}
        name_starts = [name.start() for name in names if name.group() not in self.names_of_single_words]

        def separable(at):  # the normaliser (NFC, or one that strips a piece's ends) joins or drops nothing at `at`: no
            before, after = text[at - 1], text[at]  # mark follows; `at` is not unsafe, nor after whitespace (a run's
            return (at not in unsafe and not before.isspace() and not unicodedata.combining(after)  # split depends on
                    and normalize(f"x{before}{after}x") == normalize(f"x{before}") + normalize(f"{after}x"))  # its end)
        start = 0
        while start < len(text):
            end = min(len(text), start + piece_chars)
            while end < len(text):
                check_characters(text[start:end], offset=start)
                starts = [span[0] for _, span in pre_tokenizer.pre_tokenize_str(text[start:end])] if pre_tokenizer else []
                inside = name_starts[bisect.bisect_right(name_starts, start) : bisect.bisect_left(name_starts, end)]
                starts = sorted(set(starts) | {name_start - start for name_start in inside})
                # More text can change the last two pre-tokens ("they'r" + "e": "they", "'", "r" become "they", "'re").
                cut = next((cut for cut in reversed(starts[:-1]) if cut > 0 and separable(start + cut)), 0)
                if cut > 0:  # end the piece where its last pre-tokens start (that normalising leaves apart)
                    end = start + cut
                    break
                end = min(len(text), 2 * end - start)  # one pre-token fills the piece: take twice the text (so a
                # tokenizer that gives no place to cut, Llama-2's or Gemma's, reads a text once, not once per piece)
            check_characters(text[start:end], offset=start)
            yield self.encode(text[start:end])
            start = end

    def encode(self, text) -> list[int]:
        """Token ids of `text`, as the tokenizer reads it (the names of special tokens are those tokens: a chat
        template's text is a chat), except "<|sketch|>": it is spelled as characters (`spell_sketch`, as plain ids
        are), so no text forges a visual position, however the tokenizer matches the name."""
        if not text:
            return []
        check_characters(text)
        return self.spell_sketch(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def spell_sketch(self, token_ids) -> list[int]:
        """Token ids from elsewhere with a `<|sketch|>` id (a tokenizer read the name in text) spelled as `encode`
        spells it: in token ids as in text, only the processor's layout places visual tokens."""
        return [t for token in map(int, token_ids) for t in (self.sketch_spelled if token == self.sketch_token_id
                                                             else [token])]

    # -- chat ---------------------------------------------------------------------------------------------------------
    def prefix_length(self, token_ids) -> int:
        """How many leading tokens are system turns (`<|im_start|>system\n ... <|im_end|>\n`), the uncompressed prefix;
        found in token ids, so a conversation tokenized elsewhere (a pipeline, a harness) keeps it. (Given a string:
        how many leading characters.)"""
        if isinstance(token_ids, str):
            return re.match(r"(<\|im_start\|>system\n.*?<\|im_end\|>\n)*", token_ids, re.DOTALL).end()
        header, end = "<|im_start|>system\n", self.encode("<|im_end|>\n")
        ids, cut, header_ids = list(token_ids), 0, self.encode(header)

        def opens_a_system_turn(at):  # its ids, or its text: a byte-level BPE may read the header's newline with the
            # spaces that start the content as one token (SentencePiece and WordPiece decode a space after the name)
            return ids[at : at + len(header_ids)] == header_ids or self.tokenizer.decode(
                ids[at : at + len(header_ids)], clean_up_tokenization_spaces=False).startswith(header)
        while opens_a_system_turn(cut):
            turn_end = next((i + len(end) for i in range(cut + 1, len(ids)) if ids[i : i + len(end)] == end), 0)
            if not turn_end:
                break
            cut = turn_end
        return cut

    def layout_token_ids(self, token_ids, keep_closed_text=False, stacklevel: int | None = 1,
                         reports: list | None = None) -> BatchFeature:
        """Plain token ids (a list per sample, a tensor or array, or a tokenizer's output, whose padding is left out) ->
        the model's inputs, as `__call__` lays out text: leading system turns stay as the prefix, every closed chunk
        after them becomes a sketch, and a `<|sketch|>` id (a tokenizer reads the name as it) is the name spelled as
        text, as `encode` spells it."""
        def as_rows(values):  # lists, a tensor or an array; one row or several
            values = values.tolist() if hasattr(values, "tolist") else list(values)
            return [values] if values and not hasattr(values[0], "__len__") else values
        mask = None
        if hasattr(token_ids, "keys"):  # a tokenizer's output: its padding is left out
            token_ids, mask = token_ids["input_ids"], token_ids.get("attention_mask")
        rows = as_rows(token_ids)
        if mask is not None:
            rows = [[t for t, keep in zip(row, keeps) if keep] for row, keeps in zip(rows, as_rows(mask))]
        if not rows:
            raise ValueError("VIST2Processor.layout_token_ids: no token ids. Fix: pass one list of ids per sample")
        samples = []
        for ids in rows:
            ids = self.spell_sketch(ids)
            cut = self.prefix_length(ids)
            samples.append(self.encode_sample(ids[:cut], ids[cut:], keep_closed_text))
        return self.batch(samples, stacklevel=stacklevel and stacklevel + 1, reports=reports)

    def apply_chat_template(self, conversation, chat_template=None, tokenize=False, return_dict=False,
                            return_tensors=None, **kwargs):
        """The chat template as text; with `tokenize=True`, its plain token ids (the model lays them out itself), or
        with `return_dict=True` the laid-out batch that `model.generate(**inputs)` takes."""
        prompt = super().apply_chat_template(conversation, chat_template=chat_template, tokenize=False, **kwargs)
        if not tokenize:
            return prompt
        rows = [self.encode(text) for text in ([prompt] if isinstance(prompt, str) else prompt)]
        if return_dict:
            return self.layout_token_ids(rows, stacklevel=2)
        if return_tensors is None:
            return rows[0] if isinstance(prompt, str) else rows
        return self.tokenizer.pad({"input_ids": rows}, padding_side="left", return_tensors=return_tensors)["input_ids"]

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "chunk_ids", "pixel_values"]


__all__ = ["VIST2Processor", "render_chunk", "split_into_chunks", "SKETCH_TOKEN"]

VIST2Processor.register_for_auto_class()
