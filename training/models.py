"""Building VIST2 models to train: from pretrained backbones (`from_backbones`), with a sketch sized to hold a chunk of
the tokenizer's text (`sketch_geometry`), or tiny ones (`tiny_config`); and `read_back_chunk`, which shows whether a
model reads its sketches.

These belong to the installed `vist2` package only: a Hub model repo's remote code loads a model already built.
"""

from __future__ import annotations

import inspect
import math

import torch
from transformers import AddedToken, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from ..configuration_vist2 import VIST2Config, grid_cells
from ..modeling_vist2 import VIST2ForCausalLM, VIST2ModalAligner
from ..processing_vist2 import SKETCH_TOKEN

logger = logging.get_logger(__name__)
MASKED_ATTENTION = ("eager", "sdpa", "flex_attention")  # the attention implementations that take VIST2's layout mask

# A sketch holds FIT_MARGIN times a chunk's mean characters: the longest 1 % of chunks of English prose
# (benchmarks/geometry.py: up to 1.27x the mean); FIT_MARGIN_LINE_BREAKS with newline_glyph=None, where each line break
# blanks the rest of its line (up to 1.92x at 64 columns). BPEs of 8k-50k tokens spell 3.9-5.0 characters per token of
# English prose; VIST2Config's default geometry is `sketch_geometry` at PROSE_CHARS_PER_TOKEN.
FIT_MARGIN, FIT_MARGIN_LINE_BREAKS, PROSE_CHARS_PER_TOKEN, MAX_MERGE_SIZE = 1.3, 2.0, 5.0, 4
# Ordinary English prose: on it a tokenizer's characters per token size the sketch of its chunks (`from_backbones`).
PROSE_SAMPLE = (
    "The river had risen in the night, and by morning the road to the village was under water. Anna stood at "
    "the window for a long time, watching the brown current carry branches, fence posts and once a whole "
    "chicken coop past the garden wall. Her father had gone out before dawn to help the neighbours move their "
    "animals to higher ground, and he had not come back yet. She made tea, because that was what her mother "
    "would have done, and set out two cups on the kitchen table.\nFloods like this one are not rare in the "
    "valley. The soil on the hills is thin, and when heavy rain falls for several days in a row, most of it "
    "runs straight into the streams instead of sinking into the ground. Engineers have proposed dams, new "
    "channels and wider bridges, but every plan costs more than the county can raise, and the arguments at the "
    "council meetings usually end where they began. In the meantime, families keep sandbags in their sheds and "
    "move their furniture upstairs whenever the forecast turns grey.\nBy noon the water had stopped rising. A "
    "boat came down the flooded lane with two men in it, and one of them was her father, soaked to the waist "
    "and laughing at something the other had said. He waved when he saw her at the window. Later, drying his "
    "boots by the stove, he told her that the old mill had lost its roof, that nobody had been hurt, and that "
    "the baker had promised free bread to anyone who helped clear the square once the water went down.\n"
)


def prose_chars_per_token(tokenizer) -> float:
    """Characters per token of `tokenizer` on English prose: what sizes a sketch for its chunks."""
    return len(PROSE_SAMPLE) / len(tokenizer(PROSE_SAMPLE, add_special_tokens=False)["input_ids"])


def characters_needed(chunk_size, chars_per_token, newline_glyph) -> int:
    """Cells a sketch needs for chunks of `chunk_size` tokens at `chars_per_token` (see FIT_MARGIN)."""
    return math.ceil((FIT_MARGIN if newline_glyph else FIT_MARGIN_LINE_BREAKS) * chunk_size * chars_per_token)


def sketch_geometry(chunk_size, compression_ratio, patch_size, chars_per_token=PROSE_CHARS_PER_TOKEN, char_width=4,
                    line_height=8, margin=0, newline_glyph="\n", merge_size=None) -> dict:
    """The cheapest sketch that holds a chunk: `{"image_height", "image_width", "merge_size"}`.

    The m = L / r visual tokens form the squarest grid of s x s patch blocks; the tower reads m * s^2 patches per
    chunk, so the smallest merge s whose cells hold `characters_needed` is taken (s = 1: one patch per token).
    A given `merge_size` is kept, whether its sketch holds a chunk or not (`check_fit` tells).
    """
    m, need = max(1, chunk_size // compression_ratio), characters_needed(chunk_size, chars_per_token, newline_glyph)
    rows = max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)
    for s in [merge_size] if merge_size else range(1, MAX_MERGE_SIZE + 1):
        height, width = rows * patch_size * s, m // rows * patch_size * s
        if merge_size or grid_cells(height, width, char_width, line_height, margin) >= need:
            return {"image_height": height, "image_width": width, "merge_size": s}
    raise ValueError(f"VIST2Config.compression_ratio: no sketch up to merge_size={MAX_MERGE_SIZE} has the {need} "
                     f"cells of {char_width}x{line_height} px that a chunk of {chunk_size} tokens at "
                     f"{chars_per_token:.2f} characters per token needs ({need / m:.0f} per visual token at r="
                     f"{compression_ratio}). Fix: use a lower compression_ratio or smaller cells (char_width, "
                     "line_height)")


def fitted_geometry(config: VIST2Config, chars_per_token: float) -> dict:
    """`sketch_geometry` for the config's chunks and cells, at a tokenizer's characters per token."""
    return sketch_geometry(config.chunk_size, config.compression_ratio, config.patch_size, chars_per_token,
                           config.char_width, config.line_height, config.margin, config.newline_glyph)


def check_fit(config: VIST2Config, chars_per_token: float):
    """Refuse a sketch too small for chunks of a tokenizer: each would overflow and be kept as text."""
    need = characters_needed(config.chunk_size, chars_per_token, config.newline_glyph)
    if config.sketch_cells < need:
        raise ValueError(
            f"VIST2Config.image_height: a {config.image_height}x{config.image_width} sketch of {config.char_width}x"
            f"{config.line_height}-px cells holds {config.sketch_cells} characters, but a chunk of {config.chunk_size} "
            f"tokens at {chars_per_token:.2f} characters per token (the tokenizer's, on English prose) needs "
            f"{need} with room for the longest: most chunks would overflow and be kept as text. Fix: leave "
            f"image_height, image_width and merge_size unset (the fitting geometry is "
            f"{fitted_geometry(config, chars_per_token)}), or lower chunk_size and compression_ratio together")


def headless_vision_tower(vision_model) -> PreTrainedModel:
    """The image tower of a SigLIP / SigLIP2 checkpoint (a Hub id, a folder or a loaded model), without its pooling
    head: VIST2 reads patch tokens, so the head would be dead weight (and unused parameters break DDP)."""
    tower = vision_model if isinstance(vision_model, PreTrainedModel) else AutoModel.from_pretrained(vision_model)
    if hasattr(tower.config, "text_config") and hasattr(tower, "vision_model"):
        # A dual text-image checkpoint (SiglipModel): keep its image tower.
        image_tower = tower.vision_model
        if not isinstance(image_tower, PreTrainedModel):  # releases where the tower is a bare transformer
            wrapper = AutoModel.from_config(tower.config.vision_config)
            wrapper.vision_model = image_tower
            image_tower = wrapper
        tower = image_tower
    if getattr(tower.config, "vision_use_head", False) or getattr(tower, "head", None) is not None:
        headless_config = tower.config.__class__(**{**tower.config.to_dict(), "vision_use_head": False})
        headless = AutoModel.from_config(headless_config).to(dtype=tower.dtype)
        headless.load_state_dict({k: v for k, v in tower.state_dict().items()
                                  if not (k.startswith("head.") or ".head." in k)})
        tower = headless
    return tower


def from_backbones(text_model, vision_model, tokenizer=None, **config_kwargs) -> VIST2ForCausalLM:
    """A VIST2 model from a pretrained causal LM and a pretrained SigLIP / SigLIP2 vision encoder.

    `text_model` / `vision_model` are Hub ids, local folders or loaded models (a full SigLIP checkpoint contributes
    its vision half). `tokenizer` (default: the text model's) gets `<|sketch|>` (and a pad token if it lacks one) in
    place; the embeddings are resized to it and the aligner is fresh. The extended tokenizer is kept as
    `model.tokenizer` for `VIST2Processor.from_config(model.config, model.tokenizer)`. `config_kwargs` are
    `VIST2Config` settings (chunk_size, compression_ratio, image geometry, render settings). Without image_height /
    image_width / merge_size, the sketch is the cheapest that holds a chunk of English prose in this tokenizer
    (`sketch_geometry`, at its characters per token on `PROSE_SAMPLE`), or completes the given fields; a geometry that
    cannot hold one is refused.
    """
    language_model = text_model
    if not isinstance(text_model, PreTrainedModel):
        language_model = AutoModelForCausalLM.from_pretrained(text_model)
    # One dtype, the language model's: a bf16 checkpoint beside an fp32 tower would meet in the aligner.
    vision_tower = headless_vision_tower(vision_model).to(device=language_model.device, dtype=language_model.dtype)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(text_model if isinstance(text_model, str) else
                                                  text_model.name_or_path)
    if SKETCH_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(SKETCH_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if language_model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        language_model.resize_token_embeddings(len(tokenizer))
    config_kwargs.setdefault("num_channels", getattr(vision_tower.config, "num_channels", 3))
    config_kwargs.update(text_config=language_model.config, vision_config=vision_tower.config,
                         sketch_token_id=tokenizer.convert_tokens_to_ids(SKETCH_TOKEN))
    chars_per_token = prose_chars_per_token(tokenizer)
    settings = {name: p.default for name, p in inspect.signature(VIST2Config).parameters.items()} | config_kwargs
    chunking = [settings["chunk_size"], settings["compression_ratio"]]
    if not {"image_height", "image_width", "merge_size"} <= config_kwargs.keys() and all(
            isinstance(value, int) and value > 0 for value in chunking):  # (otherwise the config names the field)
        cells = {key: settings[key] for key in ("char_width", "line_height", "margin", "newline_glyph")}
        fitted = sketch_geometry(*chunking, vision_tower.config.patch_size, chars_per_token,
                                 merge_size=config_kwargs.get("merge_size"), **cells)
        config_kwargs = fitted | config_kwargs
    # The config and model built next set the attention implementation of the backbones' configs, which they share.
    implementations = [module.config._attn_implementation for module in (language_model, vision_tower)]
    config = VIST2Config(**config_kwargs)
    check_fit(config, chars_per_token)
    with torch.device("meta"):
        model = VIST2ForCausalLM(config)
    model.vision_tower, model.language_model = vision_tower, language_model
    for module, implementation in zip((language_model, vision_tower), implementations):
        if implementation not in MASKED_ATTENTION:  # (flash attention takes no mask: the layout's would be dropped)
            logger.warning(f"from_backbones: VIST2 models do not take attn_implementation={implementation!r} (the "
                           "language model's layout mask is a tensor or a BlockMask); the model uses 'sdpa'")
        module.config._attn_implementation = implementation if implementation in MASKED_ATTENTION else "sdpa"
    model.aligner = VIST2ModalAligner(config).to(device=language_model.device, dtype=language_model.dtype)
    model.aligner.apply(model._init_weights)
    model.tokenizer = tokenizer
    return model


def tiny_config(vocab_size=512, sketch_token_id=None, text_model_type="qwen3", **overrides) -> VIST2Config:
    """A few-thousand-parameter model for tests: L=16, r=4, 2x2 merge of 16 px patches on 64x64 sketches."""
    text = {
        "model_type": text_model_type, "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    }
    vision = {
        "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "patch_size": 16, "image_size": 64, "num_channels": 3, "vision_use_head": False,
    }
    settings = dict(
        text_config=text, vision_config=vision, chunk_size=16, compression_ratio=4, merge_size=2,
        sketch_token_id=vocab_size - 1 if sketch_token_id is None else sketch_token_id,
        font_size=12, min_font_size=6, char_width=4, line_height=8, image_height=64, image_width=64,
        newline_glyph=None,
    )
    settings.update(overrides)
    return VIST2Config(**settings)


@torch.no_grad()
def read_back_chunk(model, processor, chunk_token_ids, pixel_values=None, max_new_tokens=None) -> list[int]:
    """Transcribe a chunk from its sketch (the OCR warm-up's read-back visibility), greedily, given its first token.

    `pixel_values` substitutes another sketch (the control that shows the model reads); by default the chunk's own.
    The first token is given because no position before a chunk may see that chunk's sketch."""
    if pixel_values is None:
        images, reports = processor.sketch_chunks([chunk_token_ids])
        if images[0] is None:
            raise ValueError(f"this chunk cannot be rendered ({reports[0]}); pick a chunk the font can draw")
        pixel_values = processor.pixel_values(images)
    pixel_values = pixel_values.to(model.device)
    m, tokens = model.config.visual_tokens_per_chunk, [int(chunk_token_ids[0])]
    for _ in range((max_new_tokens or len(chunk_token_ids)) - 1):
        input_ids = torch.tensor([tokens + [model.config.sketch_token_id] * m], device=model.device)
        logits = model(input_ids=input_ids, chunk_ids=torch.ones_like(input_ids), pixel_values=pixel_values,
                       read_back=torch.ones(1, dtype=torch.bool, device=model.device)).logits
        tokens.append(int(logits[0, len(tokens) - 1].argmax()))
    return tokens
