"""VIST2 configuration: each closed chunk of `chunk_size` (L) tokens is rendered into an `image_height x image_width`
sketch, read by the vision tower and merged `merge_size x merge_size` by the aligner into m = L / r visual tokens.
Everything that decides a sketch's pixels lives here, so a model and its processor provably agree (`sketch_settings`).
"""

import difflib
import math
from pathlib import Path

from PIL import ImageFont
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING
from transformers.utils import cached_file

OVERFLOW_POLICIES = ("keep_text", "shrink_font")
READ_BACK_POSITIONS = ("after_sketch", "before_next_chunk")

# Settings that decide which tokens form a chunk and which pixels its sketch has.
SKETCH_SETTING_KEYS = ("chunk_size", "compression_ratio", "font_path", "font_size", "min_font_size", "char_width",
                       "line_height", "margin", "foreground", "background", "image_height", "image_width",
                       "num_channels", "image_mean", "image_std", "overflow_policy", "newline_glyph",
                       "special_token_glyphs", "byte_aligned")
VIST2_KEYS = SKETCH_SETTING_KEYS + ("text_config", "vision_config", "merge_size", "sketch_token_id",
                                    "read_back_positions")


def _is_glyph(char) -> bool:
    return isinstance(char, str) and len(char) == 1 and not char.isspace()


def grid_cells(height, width, char_width, line_height, margin) -> int:
    """Characters a `height x width` sketch holds: its grid of `char_width x line_height` cells inside the margin."""
    return ((height - 2 * margin) // line_height) * ((width - 2 * margin) // char_width)


def validate_sketch_settings(settings: dict, name: str):
    """Check the settings that decide a sketch's pixels, wherever they come from (a config, a processor file).
    `name` formats a field into the error's subject, e.g. "VIST2Config.{}"."""

    def fail(field, problem, fix):
        raise ValueError(f"{name.format(field)}: {problem}. Fix: {fix}.")
    missing = [key for key in SKETCH_SETTING_KEYS if key not in settings]
    if missing:
        fail(missing[0], f"missing (also missing: {missing[1:]})", "build the processor with "
             "VIST2Processor.from_config(model.config, tokenizer), which copies every sketch setting")
    for field in ("chunk_size", "compression_ratio", "font_size", "min_font_size", "char_width", "line_height",
                  "image_height", "image_width", "merge_size"):
        value = settings.get(field, 1)  # merge_size: only a config has it
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            fail(field, f"must be a positive integer, got {value!r}", f"pass {field}=<positive int>")
    L, r = settings["chunk_size"], settings["compression_ratio"]
    if L % r:
        fail("chunk_size", f"L={L} is not a multiple of compression_ratio r={r}",
             f"use chunk_size={L - L % r or r} or a ratio that divides {L}")
    if settings["num_channels"] not in (1, 3):
        fail("num_channels", f"{settings['num_channels']!r} must be 1 or 3", "use 1 (grey) or 3 (grey replicated)")
    margin, cell_h, cell_w = settings["margin"], settings["line_height"], settings["char_width"]
    if not isinstance(margin, int) or margin < 0 or min(settings["image_height"] - 2 * margin - cell_h,
                                                        settings["image_width"] - 2 * margin - cell_w) < 0:
        fail("margin", f"margin={margin!r} leaves no room for one {cell_w}x{cell_h} cell in a "
             f"{settings['image_height']}x{settings['image_width']} sketch", "use a smaller margin or cell")
    if settings["min_font_size"] > settings["font_size"]:
        fail("min_font_size", f"{settings['min_font_size']} exceeds font_size={settings['font_size']}",
             f"use min_font_size <= {settings['font_size']}")
    if settings["overflow_policy"] not in OVERFLOW_POLICIES:
        fail("overflow_policy", f"unknown policy {settings['overflow_policy']!r}", f"use one of {OVERFLOW_POLICIES}")
    newline_glyph, glyphs = settings["newline_glyph"], settings["special_token_glyphs"] or {}
    if newline_glyph not in (None, "\n") and not _is_glyph(newline_glyph):
        fail("newline_glyph", f"must be None, \"\\n\" or one visible character, got {newline_glyph!r}",
             'use newline_glyph="\\n" (in line, as a mark no character has)')
    if not isinstance(glyphs, dict) or not all(isinstance(t, str) and t and _is_glyph(g) for t, g in glyphs.items()):
        fail("special_token_glyphs", f"must map token strings to one visible character each, got {glyphs!r}",
             'use e.g. special_token_glyphs={"<|endoftext|>": "©"}')
    drawn = list(glyphs.values()) + [newline_glyph] * (newline_glyph is not None)
    if len(set(drawn)) != len(drawn):
        fail("special_token_glyphs", f"two things drawn the same way ({drawn!r}): the sketch could not tell "
             "them apart", "give every special token (and newline_glyph) its own character")
    if not isinstance(settings["byte_aligned"], bool):
        fail("byte_aligned", f"must be True or False, got {settings['byte_aligned']!r}",
             "use byte_aligned=True only with a byte-level tokenizer (one token per byte)")
    for field in ("foreground", "background"):
        if not isinstance(settings[field], int) or not 0 <= settings[field] <= 255:
            fail(field, f"grey level {settings[field]!r} out of range", "use an integer in 0..255")
    if settings["foreground"] == settings["background"]:
        fail("foreground", f"equals background ({settings['background']}): ink on paper of its own grey shows nothing",
             "use two grey levels, e.g. foreground=0, background=255")
    for field, low in (("image_mean", -math.inf), ("image_std", 0)):
        value = settings[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < math.inf:
            fail(field, f"must be a finite number above {low}, got {value!r}", f"use e.g. {field}=0.5")
    font = settings["font_path"]
    # The font is part of the model: a path that does not open fails here, not at the first closed chunk. A bare file
    # name that is not here names the font saved with a model, which from_pretrained looks up in the model's folder.
    if font is not None and (Path(font).name != font or Path(font).exists()):
        try:
            ImageFont.truetype(settings["font_path"], settings["font_size"])
        except (OSError, ValueError, TypeError) as error:
            fail("font_path", f"cannot open {settings['font_path']!r} as a TrueType/OpenType font ({error})",
                 "pass the path of a .ttf/.otf file that exists on this machine, or None for Pillow's built-in font")


# -- The font travels with the model --------------------------------------------------------------------------------
# A model reads only sketches drawn with the font it was trained on, so the font file is part of the checkpoint:
# `save_pretrained` copies it into the model's folder and records its file name, `from_pretrained` finds that name in
# the folder or Hub repo the model comes from. Loaded, `font_path` is a file on this machine.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


def font_file_name(font_path):
    return None if font_path is None else Path(font_path).name


def locate_font(font_path, pretrained_model_name_or_path, hub_kwargs: dict):
    """The local file of a saved `font_path`: a file name is looked up in the model's folder or Hub repo."""
    if font_path is None or Path(font_path).is_absolute():
        return font_path
    if Path(str(pretrained_model_name_or_path)).is_file():  # a config.json given by its path: the folder holding it
        pretrained_model_name_or_path = str(Path(pretrained_model_name_or_path).parent)
    hub_kwargs = {key: hub_kwargs[key] for key in HUB_KWARGS if key in hub_kwargs}
    found = cached_file(pretrained_model_name_or_path, font_path, _raise_exceptions_for_missing_entries=False,
                        **hub_kwargs)
    if found is None:
        raise OSError(f"font_path: the model names the font {font_path!r}, which {pretrained_model_name_or_path!r} "
                      "does not hold. Fix: save the model with save_pretrained (it copies the font), or put the font "
                      "file next to its config.json")
    for licence in (f"{Path(font_path).stem}-LICENSE.txt", f"{Path(font_path).stem}-LICENSE"):  # beside it (copy_font)
        cached_file(pretrained_model_name_or_path, licence, _raise_exceptions_for_missing_entries=False,
                    _raise_exceptions_for_connection_errors=False, **hub_kwargs)
    return str(Path(found).absolute())  # located once, whatever the working directory is later (a Hub cache's file
    # is a link to a blob named by its hash: the link's own name is the font's)


def copy_font(font_path, save_directory):
    """The font file (a system font found by name: the file drawn with), and its licence (`<name>-LICENSE*` beside it,
    which a font's licence may require with every copy), into `save_directory`."""
    if font_path is not None:
        source = Path(font_path) if Path(font_path).exists() else Path(ImageFont.truetype(font_path).path)
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        for file in [source, *source.parent.glob(f"{source.stem}-LICENSE*")]:
            target = Path(save_directory) / file.name
            if not target.exists() or not target.samefile(file):
                target.write_bytes(file.read_bytes())


def _sub_config(value, default_model_type, defaults):
    if isinstance(value, PretrainedConfig):
        return value
    value = dict(defaults if value is None else value)
    model_type = value.pop("model_type", default_model_type)
    return CONFIG_MAPPING[model_type](**value)


class VIST2Config(PretrainedConfig):
    r"""
    Args:
        text_config, vision_config (`dict` or `PretrainedConfig`, *optional*): the causal LM backbone (Qwen3 by
            default; any decoder taking `inputs_embeds`, `position_ids` and a 4D mask) and the SigLIP(2) vision tower.
        chunk_size (`int`): L, text tokens per chunk. compression_ratio (`int`): r; a closed chunk becomes m = L / r
            visual tokens. merge_size (`int`): s; the aligner concatenates s x s neighbouring patches (paper: 1).
        sketch_token_id (`int`): the `<|sketch|>` placeholder id that marks visual positions in `input_ids`.
        font_path (`str`, *optional*): a TrueType font file, saved with the model (`save_pretrained` copies it into
            the model's folder); `None` uses Pillow's built-in scalable font (ASCII and a few other characters).
            font_size, min_font_size (`int`): pixel size glyphs are drawn at, and the `"shrink_font"` policy's floor.
        char_width, line_height, margin (`int`): the glyph cell in pixels (one per character); blank pixels around.
        foreground, background (`int`): grey levels of ink and paper (0-255).
        image_height, image_width (`int`): sketch size, giving exactly m tokens after patching and merging; the
            default 256 x 256 at s = 2 holds a 256-token chunk of English prose at up to 5 characters per token.
        num_channels (`int`): 1 or 3 (grey replicated). image_mean, image_std (`float`): `(x / 255 - mean) / std`.
        overflow_policy (`str`): for a chunk that overflows or holds characters the font cannot draw: `"keep_text"`
            keeps it as text tokens; `"shrink_font"` first retries overflow with smaller cells.
        newline_glyph (`str`, *optional*): draw each newline in line as this character (default "\n": a byte mark),
            so a character's cell is its place in the chunk; `None` breaks lines as a page does.
        special_token_glyphs (`dict[str, str]`, *optional*): special tokens drawn as one character each, e.g.
            `{"<|endoftext|>": "©"}`.
        byte_aligned (`bool`): a character of n UTF-8 bytes takes n cells (its glyph, then blanks), so that under a
            byte-level tokenizer cell i of a sketch always shows token i of its chunk, whatever came before it.
        read_back_positions (`str`): where a chunk read back from its own sketch (OCR warm-up) sits: `"after_sketch"`
            or `"before_next_chunk"` (docs/DESIGN.md §2).
    """

    model_type = "vist2"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(self, text_config=None, vision_config=None, chunk_size=256, compression_ratio=4, merge_size=2,
                 sketch_token_id=None, font_path=None, font_size=16, min_font_size=8, char_width=4, line_height=8,
                 margin=0, foreground=0, background=255, image_height=256, image_width=256, num_channels=3,
                 image_mean=0.5, image_std=0.5, overflow_policy="keep_text", newline_glyph="\n",
                 special_token_glyphs=None, byte_aligned=False, read_back_positions="after_sketch", **kwargs):
        self.text_config = _sub_config(text_config, "qwen3", {})
        self.vision_config = _sub_config(vision_config, "siglip_vision_model",
                                         {"patch_size": 16, "vision_use_head": False})
        if vision_config is None:
            self.vision_config.image_size = image_height
        self.chunk_size, self.compression_ratio, self.merge_size = chunk_size, compression_ratio, merge_size
        self.sketch_token_id, self.read_back_positions = sketch_token_id, read_back_positions
        self.font_path, self.font_size, self.min_font_size = font_path, font_size, min_font_size
        self.char_width, self.line_height, self.margin = char_width, line_height, margin
        self.foreground, self.background = foreground, background
        self.image_height, self.image_width, self.num_channels = image_height, image_width, num_channels
        self.image_mean, self.image_std = image_mean, image_std
        self.overflow_policy, self.newline_glyph = overflow_policy, newline_glyph
        self.special_token_glyphs, self.byte_aligned = special_token_glyphs or None, byte_aligned
        for key in kwargs:  # PretrainedConfig keeps any unknown key: a misspelled setting would be silently unused
            near = difflib.get_close_matches(key, VIST2_KEYS, n=1, cutoff=0.8)
            if near:
                raise ValueError(f"VIST2Config.{key}: not a VIST2 setting. Fix: did you mean {near[0]!r}?")
        if "tie_word_embeddings" in kwargs:  # the decoder ties its head by its own config: a flag given here goes there
            self.text_config.tie_word_embeddings = kwargs["tie_word_embeddings"]
        kwargs["tie_word_embeddings"] = getattr(self.text_config, "tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.validate_vist2()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, unused = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == cls.model_type:
            config_dict["font_path"] = locate_font(config_dict.get("font_path"), pretrained_model_name_or_path, kwargs)
        return config_dict, unused

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # AutoConfig reads config.json with the base class's get_config_dict: the font is located here then (where it
        # cannot be, with the subfolder or cache_dir AutoConfig used up, the name stays for the model's and processor's
        # from_pretrained to locate). Settings given as keyword arguments are set after __init__: all is checked again.
        source = kwargs.get("name_or_path")
        if source and config_dict.get("font_path"):
            try:
                font = locate_font(config_dict["font_path"], source, {"revision": config_dict.get("_commit_hash")})
                config_dict = {**config_dict, "font_path": font}
            except OSError:
                pass
        loaded = super().from_dict(config_dict, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).validate_vist2()
        return loaded

    def save_pretrained(self, save_directory, **kwargs):
        self.validate_vist2()  # a setting changed since __init__ would make a checkpoint that does not load
        copy_font(self.font_path, save_directory)
        super().save_pretrained(save_directory, **kwargs)

    def to_json_string(self, use_diff: bool = True) -> str:
        # Saved, the font is its file name (save_pretrained copies the file next to config.json, where locate_font finds
        # it); in memory (to_dict, a config made from it) it stays the file this machine draws with.
        font, self.font_path = self.font_path, font_file_name(self.font_path)
        try:
            return super().to_json_string(use_diff)
        finally:
            self.font_path = font

    @property
    def visual_tokens_per_chunk(self) -> int:
        """m = L / r: how many visual tokens replace one closed chunk."""
        return self.chunk_size // self.compression_ratio

    @property
    def patch_size(self) -> int:
        return self.vision_config.patch_size

    @property
    def sketch_cells(self) -> int:
        """Characters one sketch holds: its grid of `char_width x line_height` cells."""
        return grid_cells(self.image_height, self.image_width, self.char_width, self.line_height, self.margin)

    @property
    def sketch_settings(self) -> dict:
        """Everything that decides a chunk's tokens and pixels; a processor must carry the same values."""
        return {key: getattr(self, key) for key in SKETCH_SETTING_KEYS}

    def validate_vist2(self):
        def fail(field, problem, fix):
            raise ValueError(f"VIST2Config.{field}: {problem}. Fix: {fix}.")
        validate_sketch_settings({**self.sketch_settings, "merge_size": self.merge_size}, "VIST2Config.{}")
        L, r, s, p = self.chunk_size, self.compression_ratio, self.merge_size, self.patch_size
        for field in ("image_height", "image_width"):
            size = getattr(self, field)
            if size % (p * s):
                fail(field, f"{size} is not a multiple of patch_size*merge_size = {p}*{s}",
                     f"use {field}={max(p * s, size - size % (p * s))}")
        tokens, m = (self.image_height // (p * s)) * (self.image_width // (p * s)), self.visual_tokens_per_chunk
        if tokens != m:
            rows = max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)  # the squarest grid of m tokens
            fail("image_height", f"a {self.image_height}x{self.image_width} sketch gives {tokens} visual tokens "
                 f"(patch {p}, merge {s}) but chunk_size/compression_ratio = {L}/{r} = {m}", f"pass a geometry giving "
                 f"that many, e.g. image_height={rows * p * s}, image_width={m // rows * p * s} (or size one for a "
                 "tokenizer's chunks with vist2.training.sketch_geometry(chunk_size, ratio, patch))")
        if self.num_channels != getattr(self.vision_config, "num_channels", 3):
            fail("num_channels", f"{self.num_channels} must equal vision_config.num_channels "
                 f"({getattr(self.vision_config, 'num_channels', 3)})", "set both to the same value")
        if self.read_back_positions not in READ_BACK_POSITIONS:
            fail("read_back_positions", f"unknown layout {self.read_back_positions!r}",
                 f"use one of {READ_BACK_POSITIONS}")
        vocab_size = getattr(self.text_config, "vocab_size", None)
        if self.sketch_token_id is not None and vocab_size and not 0 <= self.sketch_token_id < vocab_size:
            fail("sketch_token_id", f"{self.sketch_token_id} is outside the text vocabulary (0..{vocab_size - 1})",
                 "use the tokenizer's <|sketch|> id and resize the embeddings to the tokenizer")
        if getattr(self.text_config, "use_sliding_window", False):
            fail("text_config", "sliding-window attention would hide sketches of early chunks",
                 "set text_config.use_sliding_window=False")


__all__ = ["VIST2Config"]

VIST2Config.register_for_auto_class()
