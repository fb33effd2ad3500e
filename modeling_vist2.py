"""VIST2: a decoder-only LM that never keeps old text in its context.

The sequence is `P c_1 V_1 c_2 V_2 ... c_K`: a prefix kept as text, text chunks `c_i`, and the visual tokens `V_i`
of each closed chunk's sketch. The attention rule (DESIGN §2):

    a query in P        sees P causally
    a query in c_i      sees P, every V_j (j < i) and c_i up to itself -- never the text of an earlier chunk
    a query in V_i      sees P, every V_j (j < i) and V_i bidirectionally -- never any text chunk

and positions follow the layout generation keeps in its cache, `P V_1 ... V_{i-1} c_i`. A chunk that could not be
rendered is *kept as text*: it then plays the part of its V_i (later chunks see its text). Because the rule hides
every closed chunk's text, `generate` can drop that text from the KV cache the moment the chunk closes: the cache
holds `|P| + m * closed_chunks + L` entries at most, while reading the prompt and while writing.

Only public, documented transformers hooks are used, so the remote code survives transformers releases:
`GenerationMixin.generate` (called through, with a caller-supplied cache) and `prepare_inputs_for_generation`
(overridden), a `DynamicCache` subclass (`Cache.layers[i].keys/values`), `masking_utils.create_causal_mask` with
`or_mask_function` / `and_mask_function`, and the decoder's `inputs_embeds`, `position_ids` and prepared 4D
`attention_mask` inputs. transformers 5.24 renamed `past_key_values` to `cache` in all of these; VIST2 takes either
name and speaks the installed release's (`CACHE_KWARG`).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoModel, AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationMixin,
                          LogitsProcessor, LogitsProcessorList, PreTrainedModel)
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

from .configuration_vist2 import VIST2Config
from .processing_vist2 import SKETCH_TOKEN, VIST2Processor, prose_chars_per_token

PAD, TEXT, SKETCH = 0, 1, 2  # token kinds
REPORT_KEYS = ("chunks_kept_as_text", "undrawable_characters")  # what a processor call reports, not a model input
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ---------------------------------------------------------------------------------------------------------------------
# Layout: token kinds, memory, positions and the attention rule -- pure functions of the layout tensors
# ---------------------------------------------------------------------------------------------------------------------


def token_kinds(input_ids, attention_mask, sketch_token_id):
    kinds = torch.where(input_ids == sketch_token_id, SKETCH, TEXT)
    return kinds.masked_fill(attention_mask == 0, PAD) if attention_mask is not None else kinds


def per_chunk_count(chunk_ids, flags):
    """How many flagged tokens each chunk has: `(batch, max_chunk + 1)`."""
    counts = torch.zeros(chunk_ids.shape[0], int(chunk_ids.max()) + 1, dtype=torch.long, device=chunk_ids.device)
    return counts.scatter_add_(1, chunk_ids, flags.long())


def memory_flags(kinds, chunk_ids):
    """Tokens later chunks may see: the prefix, sketches, and the text of chunks kept as text (no sketch)."""
    has_sketch = per_chunk_count(chunk_ids, kinds == SKETCH).gather(1, chunk_ids) > 0
    return (kinds == SKETCH) | ((kinds == TEXT) & ~has_sketch)


def layout_position_ids(kinds, chunk_ids, memory, read_back=None, read_back_before=0):
    """Positions in the generation layout `P V_1 ... V_{i-1} c_i` (with read-back: `P V_1 ... V_i c_i`, moved back
    by `read_back_before` places: the chunk size, for `read_back_positions="before_next_chunk"`).

    A block (the run of one chunk's text, or of its sketch) starts after all memory of earlier chunks; each
    block must be contiguous in the flat sequence.
    """
    memory_per_chunk = per_chunk_count(chunk_ids, memory)
    chunk_start = memory_per_chunk.cumsum(1) - memory_per_chunk
    block = chunk_ids * 4 + kinds
    index = torch.arange(kinds.shape[1], device=kinds.device).expand_as(kinds)
    new_block = torch.ones_like(kinds, dtype=torch.bool)
    new_block[:, 1:] = block[:, 1:] != block[:, :-1]
    block_start = torch.where(new_block, index, 0).cummax(1).values
    positions = chunk_start.gather(1, chunk_ids) + index - block_start
    if read_back is not None:
        sketch_len = per_chunk_count(chunk_ids, kinds == SKETCH).gather(1, chunk_ids)
        shift = torch.where(sketch_len > 0, sketch_len - read_back_before, 0)
        positions = positions + shift * ((kinds == TEXT) & read_back[:, None])
    return positions.masked_fill(kinds == PAD, 0)


def check_layout(kinds, chunk_ids, visual_tokens_per_chunk):
    """Reject layouts the rule is not defined for, naming the row and chunk: chunk ids must not decrease, the prefix
    (chunk 0) holds no sketch, a chunk holds 0 or m placeholders, after its text."""
    real = kinds != PAD
    same_chunk = chunk_ids[:, 1:] == chunk_ids[:, :-1]
    problems = {
        "a negative chunk id": (chunk_ids < 0) & real,
        "a chunk id lower than the one before it": F.pad((chunk_ids[:, 1:] < chunk_ids[:, :-1]) & real[:, 1:], (1, 0)),
        "a '<|sketch|>' in the prefix (chunk 0)": (kinds == SKETCH) & (chunk_ids == 0),
        "text after its chunk's '<|sketch|>' run": F.pad(same_chunk & (kinds[:, 1:] == TEXT) & (kinds[:, :-1] == SKETCH),
                                                         (1, 0)),
    }
    if not problems["a negative chunk id"].any():
        sketches = per_chunk_count(chunk_ids, kinds == SKETCH).gather(1, chunk_ids)
        problems[f"a chunk whose '<|sketch|>' count is not 0 or {visual_tokens_per_chunk}"] = (
            (sketches != 0) & (sketches != visual_tokens_per_chunk) & real)
    for problem, where in problems.items():
        if where.any():
            row, column = where.nonzero()[0].tolist()
            raise ValueError(f"chunk_ids disagree with input_ids: row {row} has {problem} (chunk "
                             f"{int(chunk_ids[row, column])}, position {column}). Fix: pass input_ids, chunk_ids and "
                             "pixel_values from one VIST2Processor call.")


def prefill_block_ends(kinds, chunk_ids, block: int) -> list[int]:
    """Where to end the blocks of a prefill of about `block` entries each: never inside a sketch, in any row, because
    a sketch's tokens see each other (a later token of a cut sketch would not be in the cache yet)."""
    inside_sketch = (kinds[:, 1:] == SKETCH) & (kinds[:, :-1] == SKETCH) & (chunk_ids[:, 1:] == chunk_ids[:, :-1])
    length, ends = kinds.shape[1], []
    cuts = ((~inside_sketch.any(0)).nonzero()[:, 0] + 1).tolist() + [length]
    for cut in cuts:
        if cut - (ends[-1] if ends else 0) >= block or cut == length:
            ends.append(cut)
    return ends


def vist2_mask_function(kinds, chunk_ids, memory, read_back):
    """The attention rule as a transformers mask function over flat indices of `(batch, kv_length)` layout tensors."""

    def allowed(batch_idx, head_idx, q_idx, kv_idx):
        q_kind, kv_kind = kinds[batch_idx, q_idx], kinds[batch_idx, kv_idx]
        q_chunk, kv_chunk = chunk_ids[batch_idx, q_idx], chunk_ids[batch_idx, kv_idx]
        earlier_memory = (kv_chunk < q_chunk) & memory[batch_idx, kv_idx]
        same_chunk = kv_chunk == q_chunk
        own_text = same_chunk & (q_kind == TEXT) & (kv_kind == TEXT) & (kv_idx <= q_idx)
        own_sketch = same_chunk & (q_kind == SKETCH) & (kv_kind == SKETCH)
        reads_own_sketch = same_chunk & (q_kind == TEXT) & (kv_kind == SKETCH) & read_back[batch_idx]
        visible = (earlier_memory | own_text | own_sketch | reads_own_sketch) & (q_kind != PAD) & (kv_kind != PAD)
        # A padding query attends to itself only, so no softmax row is empty.
        return visible | ((q_kind == PAD) & (kv_idx == q_idx))

    return allowed


# ---------------------------------------------------------------------------------------------------------------------
# The compressing KV cache
# ---------------------------------------------------------------------------------------------------------------------


class VIST2Cache(DynamicCache):
    """A `DynamicCache` that also records the layout of its entries, so closed chunks can be cut out of it.

    Per row it tracks the open chunk's token ids (to render them when the chunk closes), its chunk index, and how
    many memory entries precede it (its first position). Rows are left-padded with `PAD` entries.
    """

    def __init__(self, config=None, processor=None, prefill_chunk_size: int | None = 512):
        super().__init__(config=config)
        self.processor = processor
        # The prompt is prefilled this many layout entries at a time (None: in one pass): peak memory then holds one
        # block's activations and attention mask beside the compressed cache, never the whole prompt's.
        self.prefill_chunk_size = prefill_chunk_size
        self.kinds = self.chunk_ids = self.memory = None
        self.open_tokens: list[list[int]] = []
        self.open_chunk = self.memory_length = None
        self.reports = []  # how each chunk closed while writing was rendered (for generate's summary warning)

    @property
    def is_prefilled(self) -> bool:
        return self.kinds is not None

    def entries_per_row(self) -> torch.Tensor:
        """Live (non-padding) entries each row holds."""
        return (self.kinds != PAD).sum(1)

    def record_prefill(self, kinds, chunk_ids, memory, input_ids):
        if ((kinds == TEXT) & ~memory & (per_chunk_count(chunk_ids, kinds == SKETCH).gather(1, chunk_ids) > 0)).any():
            raise ValueError("generate() takes the generation layout, in which closed chunks are sketches only: "
                             "call the processor without keep_closed_text=True.")
        # The last chunk is open if it is text without a sketch (the prefix, chunk 0, never is).
        last_chunk = chunk_ids.masked_fill(kinds == PAD, 0).max(1).values
        last_has_sketch = per_chunk_count(chunk_ids, kinds == SKETCH).gather(1, last_chunk[:, None])[:, 0] > 0
        self.open_chunk = torch.where((last_chunk > 0) & ~last_has_sketch, last_chunk, last_chunk + 1)
        open_mask = (chunk_ids == self.open_chunk[:, None]) & (kinds == TEXT)
        self.kinds, self.chunk_ids, self.memory = kinds, chunk_ids, memory & ~open_mask
        self.open_tokens = [row[mask].tolist() for row, mask in zip(input_ids, open_mask)]
        self.memory_length = self.memory.sum(1)

    def append_layout(self, kinds, chunk_ids, memory):
        self.kinds = torch.cat([self.kinds, kinds], 1)
        self.chunk_ids = torch.cat([self.chunk_ids, chunk_ids], 1)
        self.memory = torch.cat([self.memory, memory], 1)

    def compact(self):
        """Physically drop `PAD` entries (cut chunks, unused slots) and left-align every row."""
        keep = self.kinds != PAD
        length = int(keep.sum(1).max())
        # Stable sort puts each row's kept entries last, in order; the first `length` columns from the end survive.
        order = torch.sort(keep.int(), dim=1, stable=True).indices[:, -length:]
        kept = keep.gather(1, order)
        self.kinds = self.kinds.gather(1, order).masked_fill(~kept, PAD)
        self.chunk_ids = self.chunk_ids.gather(1, order).masked_fill(~kept, 0)
        self.memory = self.memory.gather(1, order) & kept
        for layer in self.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)

    def select_rows(self, rows: torch.Tensor):
        """Keep, repeat or reorder rows (beam search, `num_return_sequences`): every per-row state follows its row."""
        if self.is_prefilled:
            rows = rows.to(self.kinds.device)
            self.kinds, self.chunk_ids, self.memory = self.kinds[rows], self.chunk_ids[rows], self.memory[rows]
            self.open_chunk, self.memory_length = self.open_chunk[rows], self.memory_length[rows]
            self.open_tokens = [list(self.open_tokens[row]) for row in rows.tolist()]

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.select_rows(torch.arange(len(self.open_tokens)).repeat_interleave(repeats))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self.select_rows(indices)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


class TokenizerIdsOnly(LogitsProcessor):
    """Ids past the tokenizer (padded embedding rows) decode to nothing: a chunk holding one would be drawn without
    it. Applied after beam search takes its log-probabilities, so scores stay those of the training forward."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids, scores):
        return scores.index_fill(-1, torch.arange(self.size, scores.shape[-1], device=scores.device), -float("inf"))


class VIST2ModalAligner(nn.Module):
    """`tanh(v W + b)` over the vision tower's patches, after concatenating each `s x s` group of patches."""

    def __init__(self, config: VIST2Config):
        super().__init__()
        self.merge_size = config.merge_size
        self.grid = (config.image_height // config.patch_size, config.image_width // config.patch_size)
        vision_width = config.vision_config.hidden_size * config.merge_size**2
        self.proj = nn.Linear(vision_width, config.text_config.hidden_size)

    def forward(self, patches):
        n, _, width = patches.shape
        (h, w), s = self.grid, self.merge_size
        merged = patches.reshape(n, h // s, s, w // s, s, width).permute(0, 1, 3, 2, 4, 5)
        return torch.tanh(self.proj(merged.reshape(n, (h // s) * (w // s), s * s * width)))


class VIST2PreTrainedModel(PreTrainedModel):
    config_class = VIST2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = []  # collected from the vision tower and language model
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # The layout mask is a full 4D mask or a flex BlockMask; flash-attention kernels take neither.
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = False
    _supports_attention_backend = False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Weights travel only as safetensors: a folder with pickled weights alone is refused, never unpickled.
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(*args, **kwargs)


class VIST2TextDecoder(nn.Module):
    """The backbone's decoder alone, under the attribute its causal-LM class keeps it in (`model` for Qwen3 or Llama,
    `transformer` for GPT-2): `VIST2Model`'s weights are then named as `VIST2ForCausalLM`'s, less the LM head."""

    def __init__(self, text_config):
        super().__init__()
        decoder = AutoModel.from_config(text_config)
        self.prefix = decoder.base_model_prefix
        setattr(self, self.prefix, decoder)
        self._no_split_modules = decoder._no_split_modules

    def get_decoder(self):
        return getattr(self, self.prefix)


class VIST2Model(VIST2PreTrainedModel):
    """Vision tower, aligner and the backbone's decoder: the hidden states of the compressed sequence, no LM head
    (`AutoModel`). `VIST2ForCausalLM` is this model with the backbone's head; both name their weights alike, so one
    checkpoint loads as either."""

    _keys_to_ignore_on_load_unexpected = [r"^language_model\.lm_head\."]  # a VIST2ForCausalLM checkpoint's head

    def __init__(self, config: VIST2Config):
        super().__init__(config)
        if config.sketch_token_id is None:
            raise ValueError("VIST2Config.sketch_token_id is None: set it to the tokenizer's '<|sketch|>' id "
                             "(tokenization/add_special_tokens.py adds it).")
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.aligner = VIST2ModalAligner(config)
        self.language_model = self.build_language_model(config.text_config)
        # Whole decoder / encoder layers stay on one device under device_map="auto".
        self._no_split_modules = sorted(
            set(self.vision_tower._no_split_modules or []) | set(self.language_model._no_split_modules or [])
        )
        self.post_init()

    def build_language_model(self, text_config):
        return VIST2TextDecoder(text_config)

    # -- transformers plumbing ----------------------------------------------------------------------------------------

    def get_input_embeddings(self):
        return self.get_decoder().get_input_embeddings()

    def set_input_embeddings(self, value):
        self.get_decoder().set_input_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    # -- sketches -----------------------------------------------------------------------------------------------------

    def check_pixel_values(self, pixel_values):
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_height, cfg.image_width)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected or not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a float tensor of shape (num_sketches, {', '.join(map(str, expected))}),"
                             f" got {tuple(pixel_values.shape)} {pixel_values.dtype}: pass what VIST2Processor returns")

    def sketches_per_encoder_pass(self, block: int) -> int:
        """As many sketches as hold `block` patches: the vision tower's activations then match a prefill block's."""
        patch_rows, patch_columns = self.aligner.grid
        return max(1, block // (patch_rows * patch_columns))

    def encode_sketches(self, pixel_values):
        """`(n, C, H, W)` sketches -> `(n, m, hidden)` visual tokens."""
        cfg = self.config
        self.check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        h, w = cfg.image_height // cfg.patch_size, cfg.image_width // cfg.patch_size
        if cfg.vision_config.model_type == "siglip2_vision_model":
            p, n = cfg.patch_size, pixel_values.shape[0]
            patches = pixel_values.reshape(n, cfg.num_channels, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
            outputs = self.vision_tower(
                pixel_values=patches.reshape(n, h * w, p * p * cfg.num_channels),
                pixel_attention_mask=torch.ones(n, h * w, dtype=torch.long, device=pixel_values.device),
                spatial_shapes=torch.tensor([[h, w]] * n, device=pixel_values.device),
            )
        else:
            native = getattr(cfg.vision_config, "image_size", None)
            resized = native not in (None, cfg.image_height) or cfg.image_height != cfg.image_width
            outputs = self.vision_tower(pixel_values=pixel_values, interpolate_pos_encoding=resized)
        patches = outputs.last_hidden_state
        if patches.shape[1] != h * w:
            raise ValueError(f"the vision tower gave {patches.shape[1]} tokens per sketch, expected {h}x{w}: use a "
                             "patch encoder without class token (SigLIP / SigLIP2 vision)")
        return self.aligner(patches)

    def embed(self, input_ids, kinds, pixel_values, sketches_per_pass=None):
        if pixel_values is not None:
            self.check_pixel_values(pixel_values)
            if not torch.isfinite(pixel_values).all():
                raise ValueError("pixel_values hold NaN or infinite values. Fix: pass the pixel_values VIST2Processor "
                                 "returns (finite by construction)")
        embeds = self.get_input_embeddings()(input_ids)
        num_slots = int((kinds == SKETCH).sum())
        num_sketches = 0 if pixel_values is None else pixel_values.shape[0]
        if num_slots != num_sketches * self.config.visual_tokens_per_chunk:
            raise ValueError(f"input_ids hold {num_slots} '<|sketch|>' positions but pixel_values has {num_sketches} "
                             f"sketches of {self.config.visual_tokens_per_chunk} tokens: pass input_ids and pixel_values "
                             "from the same processor call")
        if num_sketches:
            step = sketches_per_pass or num_sketches
            visual = torch.cat([self.encode_sketches(pixel_values[i : i + step]) for i in range(0, num_sketches, step)])
            visual = visual.to(embeds.dtype)
            embeds = embeds.masked_scatter((kinds == SKETCH)[..., None], visual)
        return embeds

    # -- forward ------------------------------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, chunk_ids=None, pixel_values=None, cache=None, use_cache=None,
                read_back=None, past_key_values=None, **kwargs):
        r"""
        input_ids (`(batch, seq)`): flat layout from `VIST2Processor`: text, and `<|sketch|>` placeholders where
            visual tokens go. Plain token ids (no `chunk_ids`) are laid out here as the processor lays out text.
        chunk_ids (`(batch, seq)`): 0 for the prefix, i for the text and sketch of chunk i.
        pixel_values (`(num_sketches, C, H, W)`): one sketch per run of placeholders, in order.
        read_back (`(batch,)` bool): OCR warm-up; a chunk's text also sees its own sketch.
        past_key_values: the name transformers < 5.24 gives `cache`.

        Returns `last_hidden_state`, one per position of the laid-out sequence (for plain ids, of the compressed
        sequence `P V_1 ... V_{K-1} c_K` they are laid out into).
        """
        for key in REPORT_KEYS:
            kwargs.pop(key, None)
        cache = past_key_values if cache is None else cache
        if chunk_ids is None:
            if (input_ids == self.config.sketch_token_id).any():
                raise ValueError("chunk_ids is required: pass the batch VIST2Processor returns")
            laid_out, _ = self.lay_out(input_ids, attention_mask)
            return self(**laid_out, cache=cache, use_cache=use_cache, read_back=read_back)
        if chunk_ids.shape != input_ids.shape or (attention_mask is not None and attention_mask.shape != input_ids.shape):
            raise ValueError(f"input_ids {tuple(input_ids.shape)}, chunk_ids {tuple(chunk_ids.shape)} and attention_mask "
                             f"{None if attention_mask is None else tuple(attention_mask.shape)} must have one shape")
        vocab_size = self.get_input_embeddings().num_embeddings
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab_size:
            raise ValueError(f"input_ids hold ids outside the model's vocabulary (0..{vocab_size - 1}). Fix: use the "
                             "tokenizer saved with the model, or model.resize_token_embeddings(len(tokenizer))")
        if attention_mask is not None and not attention_mask.any(1).all():
            raise ValueError(f"attention_mask: row {int((~attention_mask.any(1)).nonzero()[0])} masks every token, "
                             "so the row has nothing to start from. Fix: drop that row, or encode it with the "
                             "processor (an empty text gets its bos token)")
        batch = input_ids.shape[0]
        read_back = torch.zeros(batch, dtype=torch.bool, device=input_ids.device) if read_back is None else read_back.bool()
        kinds = token_kinds(input_ids, attention_mask, self.config.sketch_token_id)
        chunk_ids = chunk_ids.masked_fill(kinds == PAD, 0).long()
        check_layout(kinds, chunk_ids, self.config.visual_tokens_per_chunk)
        memory = memory_flags(kinds, chunk_ids)
        if use_cache and cache is None:
            cache = VIST2Cache(config=self.config.text_config)
        if isinstance(cache, VIST2Cache):
            cache.record_prefill(kinds, chunk_ids, memory, input_ids)

        block = cache.prefill_chunk_size if isinstance(cache, VIST2Cache) else None
        embeds = self.embed(input_ids, kinds, pixel_values, block and self.sketches_per_encoder_pass(block))
        before = self.config.chunk_size if self.config.read_back_positions == "before_next_chunk" else 0
        positions = layout_position_ids(kinds, chunk_ids, memory, read_back, before)
        layout = (kinds, chunk_ids, memory, read_back)
        if block:
            hidden = self.prefill_in_blocks(embeds, positions, layout, cache, block)
        else:
            hidden = self.run_language_model(embeds, positions, layout, cache, use_cache)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_KWARG: cache if use_cache else None})

    def lay_out(self, input_ids, attention_mask=None, processor=None, keep_closed_text=False):
        """Plain token ids -> the processor's batch for them, and which input positions are real (not padding)."""
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = [row[keep].tolist() for row, keep in zip(input_ids, real)]
        processor = self.own_processor() if processor is None else processor
        return processor.layout_token_ids(rows, keep_closed_text).to(input_ids.device), real

    def build_attention_mask(self, embeds, layout, cache=None):
        """The attention rule in the form the configured attention implementation takes (eager: additive float,
        sdpa: boolean, flex: a BlockMask that skips fully masked blocks)."""
        mask_function = vist2_mask_function(*layout)
        implementation = self.config.text_config._attn_implementation
        if implementation in ("sdpa", "eager"):
            # The rule is elementwise, so one broadcast call builds the whole (batch, 1, q, kv) mask; transformers'
            # generic path would vmap it pair by pair, which dominated decode time.
            kinds = layout[0]
            batch, kv_length, q_length = kinds.shape[0], kinds.shape[1], embeds.shape[1]
            rows = torch.arange(batch, device=kinds.device)[:, None, None, None]
            keys = torch.arange(kv_length, device=kinds.device)
            queries = keys[kv_length - q_length :][None, None, :, None]  # queries are the last q_length entries
            allowed = mask_function(rows, None, queries, keys[None, None, None, :])
            if implementation == "sdpa":
                return allowed
            return torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(
                ~allowed, torch.finfo(embeds.dtype).min)
        # The VIST2 rule replaces causality: OR-ing it admits the bidirectional sketch blocks and read-back, AND-ing it
        # removes what causality alone would allow (the text of earlier chunks).
        return create_causal_mask(
            config=self.config.text_config,
            inputs_embeds=embeds,
            attention_mask=None,
            or_mask_function=mask_function,
            and_mask_function=mask_function,
            **{CACHE_KWARG: cache},
        )

    def run_language_model(self, embeds, positions, layout, cache, use_cache):
        outputs = self.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=self.build_attention_mask(embeds, layout, cache),
            position_ids=positions,
            use_cache=bool(use_cache),
            **{CACHE_KWARG: cache},
        )
        return outputs.last_hidden_state

    def prefill_in_blocks(self, embeds, positions, layout, cache: VIST2Cache, block: int):
        """Run the prompt through the language model `block` entries at a time, appending to `cache`. Exact: each
        query sees the cache of every earlier block plus its own block, under the same rule and positions."""
        kinds, chunk_ids, memory, read_back = layout
        hidden, start = [], 0
        for end in prefill_block_ends(kinds, chunk_ids, block):
            seen = (kinds[:, :end], chunk_ids[:, :end], memory[:, :end], read_back)
            hidden.append(self.run_language_model(embeds[:, start:end], positions[:, start:end], seen, cache, True))
            start = end
        return torch.cat(hidden, 1)

    def own_processor(self):
        """The processor that lays out and renders when none is passed: the config's sketch settings and the tokenizer
        saved with the model (its folder, or `model.tokenizer` after `from_backbones`). Built once, on first use."""
        if getattr(self, "_own_processor", None) is None:
            tokenizer, source = getattr(self, "tokenizer", None), self.config._name_or_path
            try:
                tokenizer = tokenizer or (AutoTokenizer.from_pretrained(source, trust_remote_code=False) if source else None)
            except (OSError, ValueError) as error:
                source = f"{source} ({type(error).__name__}: {error})"
            if tokenizer is None:
                raise ValueError(f"VIST2 needs its tokenizer to render closed chunks, and the model has none: it was "
                                 f"{'loaded from ' + source if source else 'built in memory'}. Fix: pass "
                                 "processor=VIST2Processor.from_config(model.config, tokenizer) to generate() / read(), "
                                 "or set model.tokenizer = tokenizer.")
            self._own_processor = VIST2Processor.from_config(self.config, tokenizer)
        return self._own_processor


class VIST2ForCausalLM(VIST2Model, GenerationMixin):
    """`VIST2Model` with the backbone's LM head: training loss along the text stream, and `generate` with a cache
    that compresses closed chunks as it goes."""

    def build_language_model(self, text_config):
        return AutoModelForCausalLM.from_config(text_config)

    @classmethod
    def from_backbones(cls, text_model, vision_model, tokenizer=None, **config_kwargs):
        """A VIST2 model from a pretrained causal LM and a pretrained SigLIP / SigLIP2 vision encoder.

        `text_model` / `vision_model` are Hub ids, local folders or loaded models (a full SigLIP checkpoint
        contributes its vision half). `tokenizer` (default: the text model's) gets `<|sketch|>` (and a pad token if
        it lacks one) in place; the embeddings are resized to it and the aligner is fresh. The extended tokenizer is
        kept as `model.tokenizer` for `VIST2Processor.from_config(model.config, model.tokenizer)`.
        `config_kwargs` are `VIST2Config` settings (chunk_size, compression_ratio, image geometry, render settings).
        Without image_height / image_width / merge_size, the sketch is the cheapest that holds a chunk of English
        prose in this tokenizer (`VIST2Config.sketch_geometry`, at its characters per token on `PROSE_SAMPLE`); a
        given geometry that cannot hold one is refused.
        """
        from transformers import AddedToken

        language_model = text_model
        if not isinstance(language_model, PreTrainedModel):
            language_model = AutoModelForCausalLM.from_pretrained(text_model)
        vision_tower = vision_model
        if not isinstance(vision_tower, PreTrainedModel):
            vision_tower = AutoModel.from_pretrained(vision_model)
        if hasattr(vision_tower.config, "text_config") and hasattr(vision_tower, "vision_model"):
            # A dual text-image checkpoint (SiglipModel): keep its image tower.
            tower = vision_tower.vision_model
            if not isinstance(tower, PreTrainedModel):  # releases where the tower is a bare transformer
                wrapper = AutoModel.from_config(vision_tower.config.vision_config)
                wrapper.vision_model = tower
                tower = wrapper
            vision_tower = tower
        if getattr(vision_tower.config, "vision_use_head", False) or getattr(vision_tower, "head", None) is not None:
            # VIST2 reads patch tokens; the pooling head would be dead weight (and unused parameters break DDP).
            headless_config = vision_tower.config.__class__(**{**vision_tower.config.to_dict(), "vision_use_head": False})
            headless = AutoModel.from_config(headless_config).to(dtype=vision_tower.dtype)
            weights = {k: v for k, v in vision_tower.state_dict().items() if not (k.startswith("head.") or ".head." in k)}
            headless.load_state_dict(weights)
            vision_tower = headless
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(text_model if isinstance(text_model, str) else text_model.name_or_path)
        if SKETCH_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(SKETCH_TOKEN, special=True, normalized=False)], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
            language_model.resize_token_embeddings(len(tokenizer))
        config_kwargs.setdefault("num_channels", getattr(vision_tower.config, "num_channels", 3))
        config_kwargs.update(text_config=language_model.config, vision_config=vision_tower.config,
                             sketch_token_id=tokenizer.convert_tokens_to_ids(SKETCH_TOKEN))
        config = VIST2Config(**config_kwargs)
        chars_per_token = prose_chars_per_token(tokenizer)
        if not {"image_height", "image_width", "merge_size"} & config_kwargs.keys():
            config = VIST2Config(**config_kwargs, **config.fitted_geometry(chars_per_token))
        config.check_fit(chars_per_token)
        with torch.device("meta"):
            model = cls(config)
        model.vision_tower, model.language_model = vision_tower, language_model
        model.aligner = VIST2ModalAligner(config).to(device=language_model.device, dtype=language_model.dtype)
        model.aligner.apply(model._init_weights)
        model.tokenizer = tokenizer
        return model

    # -- transformers plumbing ----------------------------------------------------------------------------------------

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    # -- forward ------------------------------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, chunk_ids=None, pixel_values=None, labels=None, cache=None,
                use_cache=None, read_back=None, logits_to_keep=0, past_key_values=None, **kwargs):
        r"""
        As `VIST2Model.forward`; during decoding (a prefilled `VIST2Cache`), `input_ids` are only the new tokens.
        labels (`(batch, seq)`): next-token targets; the loss runs over the text stream `P c_1 c_2 ...` in order
            (the token after the last of `c_i` is the first of `c_{i+1}`), sketches and -100 carry no label.
        """
        kwargs.pop("chunks_kept_as_text", None)
        cache = past_key_values if cache is None else cache
        if isinstance(cache, VIST2Cache) and cache.is_prefilled:
            return self.decode_step(input_ids, cache, logits_to_keep)
        if chunk_ids is None and not (input_ids == self.config.sketch_token_id).any():
            return self.forward_text(input_ids, attention_mask, labels, cache, use_cache, logits_to_keep, **kwargs)
        out = super().forward(input_ids, attention_mask, chunk_ids, pixel_values, cache=cache, use_cache=use_cache,
                              read_back=read_back)
        loss = None
        if labels is not None:
            kinds = token_kinds(input_ids, attention_mask, self.config.sketch_token_id)
            loss = self.text_stream_loss(out.last_hidden_state, labels, kinds, kwargs.get("num_items_in_batch"))
        logits = self.lm_head_for(out.last_hidden_state, logits_to_keep)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KWARG: getattr(out, CACHE_KWARG)})

    def forward_text(self, input_ids, attention_mask=None, labels=None, cache=None, use_cache=None, logits_to_keep=0,
                     **kwargs):
        """Plain token ids, as any causal-LM client passes them, laid out by the processor as it lays out text.

        With a cache (generation), the generation layout is prefilled into it and the logits are the compressed
        sequence's. Without, the training layout runs and the logits (and the loss over `labels`) come back at the
        caller's token positions: at each token, the logits generation would give there."""
        processor = getattr(cache, "processor", None)
        if use_cache or isinstance(cache, VIST2Cache):
            layout, _ = self.lay_out(input_ids, attention_mask, processor)
            return self(**layout, cache=cache, use_cache=True, logits_to_keep=logits_to_keep, **kwargs)
        layout, real = self.lay_out(input_ids, attention_mask, processor, keep_closed_text=True)
        text = token_kinds(layout["input_ids"], layout["attention_mask"], self.config.sketch_token_id) == TEXT
        if labels is not None:
            layout["labels"] = torch.full_like(layout["input_ids"], -100).masked_scatter(text, labels[real])
        out = self(**layout, **kwargs)
        logits = out.logits.new_zeros(*input_ids.shape, out.logits.shape[-1])
        logits[real] = out.logits[text]
        return CausalLMOutputWithPast(loss=out.loss, logits=logits)

    def lm_head_for(self, hidden, logits_to_keep=0):
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return self.next_token_logits(hidden[:, kept])

    def next_token_logits(self, hidden):
        """The LM head, with `<|sketch|>` ruled out: written text must never hold a placeholder without a sketch
        (the layout would break), and training and generation rule it out alike, so their logits stay equal."""
        logits = self.get_output_embeddings()(hidden)
        logits[..., self.config.sketch_token_id] = torch.finfo(logits.dtype).min
        return logits

    def text_stream_loss(self, hidden, labels, kinds, num_items_in_batch=None):
        """Next-token loss along the text stream: sketches are skipped, not predicted."""
        is_text = kinds == TEXT
        order = torch.sort((~is_text).int(), dim=1, stable=True).indices  # text positions first, in flat order
        stream_labels = labels.gather(1, order).masked_fill(~is_text.gather(1, order), -100)
        targets = torch.full_like(stream_labels, -100)
        targets[:, :-1] = stream_labels[:, 1:]
        picked = targets != -100
        rows, cols = picked.nonzero(as_tuple=True)
        logits = self.next_token_logits(hidden[rows, order[rows, cols]]).float()
        loss = F.cross_entropy(logits, targets[rows, cols], reduction="sum")
        denominator = num_items_in_batch if num_items_in_batch is not None else max(int(picked.sum()), 1)
        return loss / denominator

    # -- generation ---------------------------------------------------------------------------------------------------

    def close_full_chunks(self, cache: VIST2Cache):
        """Rows whose open chunk holds L tokens close it: render, encode, cut its text from the cache. Returns the
        visual tokens of the rendered chunks and which rows they belong to; a chunk the policy keeps as text stays in
        the cache as memory instead."""
        device, m, L = cache.kinds.device, self.config.visual_tokens_per_chunk, self.config.chunk_size
        batch = len(cache.open_tokens)
        closing = torch.tensor([len(tokens) == L for tokens in cache.open_tokens], device=device)
        sketched = torch.zeros(batch, dtype=torch.bool, device=device)
        if not closing.any():
            return None, sketched
        if cache.processor is None:
            cache.processor = self.own_processor()
        rows = closing.nonzero()[:, 0].tolist()
        images, reports = cache.processor.sketch_chunks([cache.open_tokens[b] for b in rows])
        cache.reports += reports
        rendered = [b for b, image in zip(rows, images) if image is not None]
        visual = None
        if rendered:
            visual = self.encode_sketches(cache.processor.pixel_values([i for i in images if i is not None]).to(device))
            sketched[rendered] = True
        open_entries = (cache.chunk_ids == cache.open_chunk[:, None]) & (cache.kinds == TEXT)
        kept = closing & ~sketched
        cache.memory |= open_entries & kept[:, None]
        cache.kinds = cache.kinds.masked_fill(open_entries & sketched[:, None], PAD)
        cache.compact()
        open_length = torch.tensor([len(t) for t in cache.open_tokens], device=device)
        cache.memory_length = cache.memory_length + torch.where(sketched, m, 0) + torch.where(kept, open_length, 0)
        cache.open_chunk = cache.open_chunk + closing.long()
        cache.open_tokens = [[] if closing[b] else cache.open_tokens[b] for b in range(batch)]
        return visual, sketched

    def decode_step(self, input_ids, cache: VIST2Cache, logits_to_keep=0):
        """Feed one new token per row, after closing full chunks; sketches of just-closed chunks go in the same pass."""
        device, m = input_ids.device, self.config.visual_tokens_per_chunk
        batch = input_ids.shape[0]
        visual, sketched = self.close_full_chunks(cache)
        token_embeds = self.get_input_embeddings()(input_ids)
        open_length = torch.tensor([len(t) for t in cache.open_tokens], device=device)
        kinds = torch.full((batch, 1), TEXT, device=device)
        chunks = cache.open_chunk[:, None]
        positions = (cache.memory_length + open_length)[:, None]
        memory = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        embeds = token_embeds
        if visual is not None:
            slots = torch.zeros(batch, m, token_embeds.shape[-1], dtype=token_embeds.dtype, device=device)
            slots[sketched] = visual.to(slots.dtype)
            slot_kinds = torch.where(sketched[:, None], SKETCH, PAD).expand(-1, m)
            slot_positions = (cache.memory_length - m)[:, None] + torch.arange(m, device=device)
            embeds = torch.cat([slots, token_embeds], 1)
            kinds = torch.cat([slot_kinds, kinds], 1)
            chunks = torch.cat([(cache.open_chunk - 1)[:, None].expand(-1, m), chunks], 1)
            positions = torch.cat([slot_positions.clamp(min=0), positions], 1)
            memory = torch.cat([slot_kinds == SKETCH, memory], 1)

        hidden = self.extend_cache(cache, embeds, kinds, chunks, memory, positions)
        for b in range(batch):
            cache.open_tokens[b].append(int(input_ids[b, -1]))
        if visual is not None:
            cache.compact()
        return CausalLMOutputWithPast(logits=self.lm_head_for(hidden, logits_to_keep or 1), **{CACHE_KWARG: cache})

    def extend_cache(self, cache: VIST2Cache, embeds, kinds, chunk_ids, memory, positions):
        """Append entries of the given layout to the cache, running the language model over them."""
        cache.append_layout(kinds, chunk_ids, memory)
        no_read_back = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
        layout = (cache.kinds, cache.chunk_ids, cache.memory, no_read_back)
        return self.run_language_model(embeds, positions, layout, cache, use_cache=True)

    @torch.no_grad()
    def read(self, processor=None, text="", prefix="", sketches_per_step: int = 8, progress: bool | None = None
             ) -> dict:
        """Compress a long `text` into a `VIST2Cache` while streaming it, and return inputs for `generate`.

        The text is tokenized, rendered and encoded `sketches_per_step` chunks at a time (`processor.iter_chunks`),
        so memory holds the compressed cache and one group of sketches, never the whole text as pixels or KV::

            inputs = model.read(processor, book)
            out = model.generate(**inputs, processor=processor, max_new_tokens=200)   # out[:, 1:] is the new text

        `inputs["cache"]` is the `VIST2Cache` that `generate` goes on writing into (under any transformers release);
        `chunks_kept_as_text` and `undrawable_characters` report the text as a processor call does (one warning).
        `progress` shows a progress bar over the chunks (default: for texts of 100 000 characters or more).
        `text` may be token ids (a list or a one-row tensor): leading system turns then stay the prefix, as in
        `generate`. `processor` defaults to `own_processor()`.
        """
        processor = self.own_processor() if processor is None else processor
        self.check_processor(processor)
        device, m = self.device, self.config.visual_tokens_per_chunk
        if isinstance(text, torch.Tensor):
            text = text.reshape(-1).tolist()
        if not isinstance(text, str) and not prefix:
            cut = processor.prefix_length(text)
            prefix, text = text[:cut], text[cut:]
        prefix_ids = processor.encode(prefix) if isinstance(prefix, str) else list(prefix)
        cache = VIST2Cache(config=self.config.text_config, processor=processor)
        if not len(text):
            return dict(processor.collate([processor.encode_sample(prefix_ids, [])]).to(device), cache=cache)
        cache.kinds = torch.zeros(1, 0, dtype=torch.long, device=device)
        cache.chunk_ids, cache.memory = cache.kinds.clone(), cache.kinds.bool()
        cache.open_chunk = torch.ones(1, dtype=torch.long, device=device)
        cache.memory_length = torch.zeros(1, dtype=torch.long, device=device)

        def append(blocks):  # blocks: [(token_ids, sketch or None)] of closed chunks, in order
            kinds, chunks, tokens, images = [], [], [], []
            for token_ids, sketch in blocks:
                size = m if sketch is not None else len(token_ids)
                kinds += [SKETCH if sketch is not None else TEXT] * size
                tokens += [self.config.sketch_token_id] * m if sketch is not None else list(token_ids)
                chunks += [int(cache.open_chunk)] * size
                images += [sketch] if sketch is not None else []
                cache.open_chunk += 1
            as_tensor = lambda values: torch.tensor([values], device=device)  # noqa: E731
            kinds, chunks = as_tensor(kinds), as_tensor(chunks)
            pixels = processor.pixel_values(images).to(device) if images else None
            embeds = self.embed(as_tensor(tokens), kinds, pixels, self.sketches_per_encoder_pass(m * sketches_per_step))
            positions = cache.memory_length + torch.arange(kinds.shape[1], device=device)[None]
            self.extend_cache(cache, embeds, kinds, chunks, kinds != PAD, positions)
            cache.memory_length += kinds.shape[1]

        if prefix_ids:
            cache.open_chunk -= 1  # the prefix is chunk 0
            append([(prefix_ids, None)])
        group, open_ids = [], []
        reports, chunks = [], hf_logging.tqdm(processor.iter_chunks(text), desc="VIST2 read", unit=" chunks",
                                              disable=not (len(text) >= 100_000 if progress is None else progress))
        for token_ids, sketch, report in chunks:
            if report is None:
                open_ids = token_ids
                break
            reports.append(report)
            group.append((token_ids, sketch))
            if len(group) == sketches_per_step:
                append(group)
                group = []
        if group:
            append(group)
        # Feed the open chunk but its last token, which generate feeds as its first input.
        if len(open_ids) > 1:
            head = torch.tensor([open_ids[:-1]], device=device)
            kinds = torch.full_like(head, TEXT)
            positions = cache.memory_length + torch.arange(head.shape[1], device=device)[None]
            self.extend_cache(cache, self.get_input_embeddings()(head), kinds, cache.open_chunk[:, None].expand_as(head),
                              torch.zeros_like(head, dtype=torch.bool), positions)
        cache.open_tokens = [list(open_ids[:-1])]
        chunks.close()
        kept, undrawable = processor.kept_as_text(reports, stacklevel=3)  # 3: the caller, above torch.no_grad's wrapper
        return {"input_ids": torch.tensor([[open_ids[-1]]], device=device), "cache": cache,
                "chunks_kept_as_text": torch.tensor([kept], device=device),
                "undrawable_characters": ["".join(undrawable)]}

    @torch.no_grad()
    def read_back_chunk(self, processor, chunk_token_ids, pixel_values=None, max_new_tokens=None) -> list[int]:
        """Transcribe a chunk from its sketch (the OCR warm-up's read-back visibility), greedily, given its first token.

        `pixel_values` substitutes another sketch (the control that shows the model reads); by default the chunk's own.
        The first token is given because no position before a chunk may see that chunk's sketch."""
        if pixel_values is None:
            images, reports = processor.sketch_chunks([chunk_token_ids])
            if images[0] is None:
                raise ValueError(f"this chunk cannot be rendered ({reports[0]}); pick a chunk the font can draw")
            pixel_values = processor.pixel_values(images)
        pixel_values = pixel_values.to(self.device)
        m, tokens = self.config.visual_tokens_per_chunk, [int(chunk_token_ids[0])]
        for _ in range((max_new_tokens or len(chunk_token_ids)) - 1):
            input_ids = torch.tensor([tokens + [self.config.sketch_token_id] * m], device=self.device)
            logits = self(input_ids=input_ids, chunk_ids=torch.ones_like(input_ids), pixel_values=pixel_values,
                          read_back=torch.ones(1, dtype=torch.bool, device=self.device)).logits
            tokens.append(int(logits[0, len(tokens) - 1].argmax()))
        return tokens

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, chunk_ids=None,
                                      pixel_values=None, past_key_values=None, **kwargs):
        # Public override point of GenerationMixin: after prefill only the newest token goes in; the cache keeps the
        # layout, so generate's own attention_mask / cache_position bookkeeping is not used.
        cache = past_key_values if cache is None else cache
        if isinstance(cache, VIST2Cache) and cache.is_prefilled:
            if len(cache.open_tokens) != input_ids.shape[0]:  # a cache from `read`, for several beams or sequences
                cache.batch_repeat_interleave(input_ids.shape[0] // len(cache.open_tokens))
            return {"input_ids": input_ids[:, -1:], CACHE_KWARG: cache, "use_cache": True}
        if isinstance(pixel_values, (list, tuple)):  # per prompt row (see `generate`): each copy of a row gets its own
            copies = input_ids.shape[0] // len(pixel_values)
            pixel_values = torch.cat([row for row in pixel_values for _ in range(copies)])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "chunk_ids": chunk_ids,
                "pixel_values": pixel_values, CACHE_KWARG: cache, "use_cache": True,
                "logits_to_keep": kwargs.get("logits_to_keep") or 0}

    def check_processor(self, processor):
        mismatch = processor.settings_mismatch(self.config)
        if mismatch:
            raise ValueError(f"processor and model disagree on {mismatch} (processor, model): build the processor "
                             "with VIST2Processor.from_config(model.config, tokenizer)")
        if len(processor.tokenizer) > self.get_input_embeddings().num_embeddings:
            raise ValueError(f"the processor's tokenizer has {len(processor.tokenizer)} tokens but the model embeds "
                             f"{self.get_input_embeddings().num_embeddings}. Fix: use the tokenizer saved with the "
                             "model, or model.resize_token_embeddings(len(tokenizer))")

    def generate(self, inputs=None, processor=None, prefill_chunk_size: int | None = 512, **kwargs):
        """`GenerationMixin.generate` with a compressing cache. Takes the processor's batch or plain token ids (laid out
        here as the processor lays out text); `processor=` renders closed chunks (default: `own_processor()`).

        The compressed prompt is prefilled `prefill_chunk_size` entries at a time (sketches encoded block by block), so
        peak memory is the compressed cache plus one block; `None` prefills in one pass. Same logits either way."""
        self.check_generation_mode(kwargs)
        generation_config = kwargs.get("generation_config")
        if getattr(generation_config, "prefill_chunk_size", None) is not None:
            # transformers' own chunked prefill cannot split sketches: VIST2 takes the setting and blocks it itself.
            prefill_chunk_size = generation_config.prefill_chunk_size
            kwargs["generation_config"] = generation_config.from_dict(generation_config.to_dict(), prefill_chunk_size=None)
        if processor is not None:
            self.check_processor(processor)
            if len(processor.tokenizer) < self.get_output_embeddings().out_features:  # padded embedding rows
                kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []),
                                                                  TokenizerIdsOnly(len(processor.tokenizer))])
        if kwargs.get("stop_strings") is not None and kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = (self.own_processor() if processor is None else processor).tokenizer
        cache, legacy_cache = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
        cache = legacy_cache if cache is None else cache
        if cache is None:
            cache = VIST2Cache(config=self.config.text_config, processor=processor, prefill_chunk_size=prefill_chunk_size)
        elif processor is not None:
            cache.processor = processor
        kwargs[CACHE_KWARG] = cache
        input_ids = kwargs.get("input_ids", inputs)
        placeholders = input_ids is not None and (input_ids == self.config.sketch_token_id).any()
        if kwargs.get("chunk_ids") is None and placeholders and not cache.is_prefilled:
            raise ValueError("chunk_ids is required when input_ids hold '<|sketch|>' placeholders: pass the whole "
                             "processor batch, model.generate(**processor(text=...), processor=processor)")
        pixel_values = kwargs.get("pixel_values")
        if isinstance(pixel_values, torch.Tensor) and input_ids is not None and not cache.is_prefilled:
            # generate repeats every tensor row by row for beams and num_return_sequences, but pixel_values holds
            # sketches, not rows: split them by row, so that prepare_inputs_for_generation repeats each row's own.
            kinds = token_kinds(input_ids, kwargs.get("attention_mask"), self.config.sketch_token_id)
            per_row = ((kinds == SKETCH).sum(1) // self.config.visual_tokens_per_chunk).tolist()
            if sum(per_row) == pixel_values.shape[0]:  # (otherwise forward names the mismatch)
                kwargs["pixel_values"] = list(pixel_values.split(per_row))
        for key in REPORT_KEYS:
            kwargs.pop(key, None)
        closed_before = len(cache.reports)
        output = super().generate(inputs, **kwargs)
        if cache.processor is not None:
            cache.processor.kept_as_text(cache.reports[closed_before:], stacklevel=2)
        return output

    def check_generation_mode(self, kwargs):
        """Refuse, before any work, the decoding strategies whose results would not be exact with the compressing
        cache; greedy decoding, sampling and beam search (any `num_return_sequences`) are."""
        base = kwargs.get("generation_config") or self.generation_config
        config = base.from_dict(base.to_dict())
        config.update(**kwargs)
        mode = str(getattr(config.get_generation_mode(kwargs.get("assistant_model")), "value", ""))
        mode = "custom_generate" if kwargs.get("custom_generate") else mode
        if mode not in ("greedy_search", "sample", "beam_search", "beam_sample"):
            why = ("it feeds guessed tokens and crops the cache back, which cannot undo a chunk that closed (its text "
                   "is a sketch by then)" if mode == "assisted_generation" else "transformers runs it from custom "
                   "code written for caches that keep every token, not for one whose closed chunks are sketches")
            raise ValueError(f"VIST2 generate: {mode} is not supported: {why}. Fix: use greedy "
                             "decoding, sampling or beam search (num_beams, num_return_sequences)")


__all__ = ["VIST2PreTrainedModel", "VIST2Model", "VIST2ForCausalLM", "VIST2Cache", "VIST2ModalAligner"]

VIST2Model.register_for_auto_class("AutoModel")
VIST2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
