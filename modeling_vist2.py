"""VIST2: a decoder-only LM that never keeps old text in its context.

The sequence is `P c_1 V_1 c_2 V_2 ... c_K`: a prefix kept as text, text chunks `c_i`, and the visual tokens `V_i`
of each closed chunk's sketch. The attention rule (docs/DESIGN.md §2):

    a query in P        sees P causally
    a query in c_i      sees P, every V_j (j < i) and c_i up to itself -- never the text of an earlier chunk
    a query in V_i      sees P, every V_j (j < i) and V_i bidirectionally -- never any text chunk

Positions follow the cache's layout `P V_1 ... V_{i-1} c_i`, so `generate` cuts a chunk's text from the KV cache when
it closes: at most `|P| + m * closed_chunks + L` entries. Only public transformers hooks are used (docs/DESIGN.md §4).
"""

import contextlib
import copy
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoModel, AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig,
                          GenerationMixin, LogitsProcessor, LogitsProcessorList, PreTrainedModel)
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

from .configuration_vist2 import HUB_KWARGS, VIST2Config, locate_font
from .processing_vist2 import VIST2Processor

PAD, TEXT, SKETCH = 0, 1, 2  # token kinds
REPORT_KEYS = ("chunks_kept_as_text", "undrawable_characters")  # what a processor call reports, not a model input
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
MASK_TENSOR_ATTENTION = ("sdpa", "eager")  # attention implementations that take the mask as a tensor
SAVED_PREFILL_SETTING = threading.Lock()  # see VIST2ForCausalLM.holding_prefill_setting
IDS_ONLY = ("VIST2 reads input_ids, not inputs_embeds: it draws closed chunks from their text. Fix: pass "
            "input_ids (a processor batch, or plain token ids)")


# -- Layout: token kinds, memory, positions and the attention rule -- pure functions of the layout tensors -------------
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
    """Positions in the generation layout `P V_1 ... V_{i-1} c_i` (read-back rows: `P V_1 ... V_i c_i`, moved back
    `read_back_before`): a block (a chunk's text, or its sketch; contiguous) starts after earlier chunks' memory."""
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


def check_layout(kinds, chunk_ids, visual_tokens_per_chunk, generation=False):
    """Reject layouts the rule is not defined for, naming the row and chunk: chunk ids must not decrease, the prefix
    (chunk 0) holds no sketch, a chunk holds 0 or m placeholders, after its text; no padding inside a row (positions
    would start again after it), nor after its tokens in the `generation` layout (a cache takes a row's last column as
    its newest token)."""
    real, chunk, previous = kinds != PAD, chunk_ids[:, 1:], chunk_ids[:, :-1]
    same_chunk = chunk == previous
    after_real = real.cummax(1).values != real  # padding after a real token of its row
    if generation:
        problems = {"padding after a real token (generate takes rows left-padded)": after_real}
    else:
        problems = {"padding between real tokens": after_real & (real.flip(1).cummax(1).values.flip(1) != real)}
    problems |= {
        "a negative chunk id": (chunk_ids < 0) & real,
        "a chunk id lower than the one before it": F.pad((chunk < previous) & real[:, 1:], (1, 0)),
        "a '<|sketch|>' in the prefix (chunk 0)": (kinds == SKETCH) & (chunk_ids == 0),
        "text after its chunk's '<|sketch|>' run": F.pad(same_chunk & (kinds[:, 1:] == TEXT) & (kinds[:, :-1] == SKETCH),
                                                         (1, 0))}
    counted = chunk_ids.clamp(min=0)  # (a negative id is reported above)
    sketches = per_chunk_count(counted, kinds == SKETCH).gather(1, counted)
    problems[f"a chunk whose '<|sketch|>' count is not 0 or {visual_tokens_per_chunk}"] = (
        (sketches != 0) & (sketches != visual_tokens_per_chunk) & real)
    if not torch.stack(list(problems.values())).any():  # one synchronisation when the layout is sound
        return
    for problem, where in problems.items():
        if where.any():
            row, column = where.nonzero()[0].tolist()
            raise ValueError(f"input_ids, chunk_ids and attention_mask disagree: row {row} has {problem} (chunk "
                             f"{int(chunk_ids[row, column])}, position {column}). Fix: pass the batch of one "
                             "VIST2Processor call as it is (left-padded), or plain token ids with their attention_mask")


def check_rows_hold_tokens(attention_mask):
    if attention_mask is not None and not attention_mask.any(1).all():
        raise ValueError(f"attention_mask: row {int((~attention_mask.any(1)).nonzero()[0])} masks every token, so the "
                         "row has nothing to start from. Fix: drop that row, or encode it with the processor (an empty "
                         "text gets its bos token)")


def holds_placeholders(input_ids, sketch_token_id, m: int) -> bool:
    """Whether ids without `chunk_ids` hold a processor batch's placeholders, m `<|sketch|>` in a row; a tokenizer
    reads the name typed in text as one, which plain ids spell out as text (`VIST2Processor.layout_token_ids`)."""
    return input_ids.shape[1] >= m and bool((input_ids == sketch_token_id).unfold(1, m, 1).all(-1).any())


def prefill_block_ends(kinds, chunk_ids, block: int) -> list[int]:
    """Where to end a prefill's blocks of about `block` entries: never inside a sketch (its tokens see each other)."""
    inside_sketch = (kinds[:, 1:] == SKETCH) & (kinds[:, :-1] == SKETCH) & (chunk_ids[:, 1:] == chunk_ids[:, :-1])
    length, ends = kinds.shape[1], []
    for cut in ((~inside_sketch.any(0)).nonzero()[:, 0] + 1).tolist() + [length]:
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


def sketch_reach(kinds, chunk_ids):
    """The last entry each entry may see in the generation layout `P V_1 ... V_{i-1} c_i` (itself, or its sketch's
    last token), where the rule reduces to `key <= reach[query]`: causal, each sketch's block filled in."""
    length, sketch = kinds.shape[1], kinds == SKETCH
    same_sketch_next = F.pad(sketch[:, 1:] & sketch[:, :-1] & (chunk_ids[:, 1:] == chunk_ids[:, :-1]), (0, 1))
    index = torch.arange(length, device=kinds.device)
    return torch.where(same_sketch_next, length, index).flip(1).cummin(1).values.flip(1)


def generation_mask_function(reach, live=None, first_query=0):
    """The generation layout's rule as a mask function: query `q` sees keys up to `reach[:, q - first_query]`; a dead
    key (`live` False: padding, a cut chunk, an unused slot) is seen by no live query, a dead query sees itself."""
    def allowed(batch_idx, head_idx, q_idx, kv_idx):
        seen = kv_idx <= reach[batch_idx, q_idx - first_query]
        return seen if live is None else seen & (live[batch_idx, kv_idx] | ~live[batch_idx, q_idx])
    return allowed


# -- The compressing KV cache ------------------------------------------------------------------------------------------
class VIST2Cache(DynamicCache):
    """A `DynamicCache` that knows where each row's open chunk is, so a closed chunk's text can be cut out of it.
    Generation appends to the layout `P V_1 ... V_{i-1} c_i`, rows left-padded. Per row: which entries are `live` (None
    without padding), how many (`entries`), the open chunk's index, length and last L token ids (`open_chunk`,
    `open_length`, `recent`), `next_position`, and after `read` the logits of the prompt's last token (`next_logits`).
    Counts live on the host (no synchronisation), token ids on the device. `seen`: how many columns of the caller's
    sequence (its `input_ids`, then generate's `sequences`) it has taken in. A row that ended (eos) goes on being fed
    padding while others write: the chunks it fills are cut, not drawn (`VIST2ForCausalLM.close_chunks`)."""

    def __init__(self, config=None, processor=None, prefill_chunk_size: int | str | None = "auto",
                 cuda_graphs: bool | None = None):
        super().__init__(config=config)
        self.processor, self.prefill_chunk_size = processor, prefill_chunk_size  # see VIST2Model.prefill_passes
        self.cuda_graphs, self.decode_graph = cuda_graphs, None  # see VIST2ForCausalLM.uses_decode_graph
        self.live = self.recent = self.next_position = self.open_chunk = self.next_logits = None
        self.entries, self.open_length, self.prefix_length = [], [], []  # per row; prefix_length: the prompt's chunk 0
        self.seen, self.not_continuable = 0, None  # why a caller's sequence may not go on from it
        self.stop = self.sequences = None  # while generate writes: (its eos ids, its first new column), its sequences
        self.reports = []  # how each chunk closed while writing was rendered (for generate's summary warning)

    is_croppable = False  # what a step closed is a sketch by then: generate must not run a step it would undo

    @property
    def is_prefilled(self) -> bool:
        return self.recent is not None

    def crop(self, tokens_to_remove: int):
        if tokens_to_remove:
            raise ValueError("VIST2Cache cannot be cropped: a step that closed a chunk cut its text. Fix: generate "
                             "again from the sequence you want to keep")

    def begin(self, input_ids, kinds, chunk_ids, next_position, chunk_size: int):
        """Take over a prompt in the generation layout (rows left-padded, the last chunk open unless it is a sketch)."""
        last_chunk = chunk_ids[:, -1]  # rows are left-padded: the last column is real
        self.open_chunk = torch.where((last_chunk > 0) & (kinds[:, -1] == TEXT), last_chunk, last_chunk + 1)
        is_open = (chunk_ids == self.open_chunk[:, None]) & (kinds == TEXT)
        live = kinds != PAD
        counts = torch.stack([is_open, live, live & (chunk_ids == 0)]).sum(2).tolist()
        self.open_length, self.entries, self.prefix_length = counts
        self.live = None if min(self.entries) == kinds.shape[1] else live
        # The open chunk's text ends every row, so its tokens are the row's last ones.
        self.recent = input_ids[:, -chunk_size:]
        if input_ids.shape[1] < chunk_size:
            self.recent = F.pad(self.recent, (chunk_size - input_ids.shape[1], 0))
        self.next_position = next_position

    def compact(self):
        """Physically drop dead entries (cut chunks, unused slots): rows stay left-padded, in order."""
        length = max(self.entries)
        # A stable sort puts each row's live entries last, in order; the last `length` columns survive.
        order = torch.sort(self.live.int(), dim=1, stable=True).indices[:, -length:]
        self.live = None if min(self.entries) == length else self.live.gather(1, order)
        for layer in self.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            if isinstance(layer, FixedLayer):
                layer.keep(index)
            else:
                layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)

    def reserve(self, entries: int, spare: int):
        """Room for `entries` more in every layer, as `FixedLayer`s: a full buffer grows by `spare` and an eighth more
        (so rarely), and a captured step, which reads the old buffers, is dropped. Buffers made under
        `torch.inference_mode` are made again outside it (they could not be written there)."""
        length, keys = self.get_seq_length(), self.layers[0].keys
        frozen = keys.is_inference() and not torch.is_inference_mode_enabled()
        if not isinstance(self.layers[0], FixedLayer) or length + entries > keys.shape[2] or frozen:
            capacity = -(-(length + entries + spare + length // 8) // 64) * 64
            for index, layer in enumerate(self.layers):  # one at a time: the peak is the cache and one layer's copy
                self.layers[index] = FixedLayer(layer, capacity)
            self.decode_graph = None

    def __getstate__(self):  # a copy captures its own step, on its own buffers (the step holds the model and these)
        return {**self.__dict__, "decode_graph": None}

    def __deepcopy__(self, memo):
        """A copy (to reuse a prompt) shares the processor, which holds no cache's state (and a large vocabulary is
        slow to copy)."""
        twin = memo[id(self)] = type(self).__new__(type(self))
        state = {key: value for key, value in self.__getstate__().items() if key != "processor"}
        twin.__dict__.update(copy.deepcopy(state, memo), processor=self.processor)
        return twin

    def select_rows(self, rows: torch.Tensor):
        """Keep, repeat or reorder rows (beam search, `num_return_sequences`): every per-row state follows its row."""
        self.decode_graph = None  # it reads the old rows' buffers
        if self.is_prefilled:
            rows = rows.to(self.recent.device)
            self.recent, self.open_chunk = self.recent[rows], self.open_chunk[rows]
            self.next_position = self.next_position[rows]
            self.next_logits = None if self.next_logits is None else self.next_logits[rows]
            self.live = None if self.live is None else self.live[rows]
            listed = rows.tolist()
            self.entries, self.open_length, self.prefix_length = (
                [values[i] for i in listed] for values in (self.entries, self.open_length, self.prefix_length))

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.select_rows(torch.arange(len(self.entries)).repeat_interleave(repeats))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self.select_rows(indices)


class FixedLayer(DynamicLayer):
    """A cache layer in buffers of fixed capacity, written in place, so that a captured decode step (`DecodeGraph`) finds
    them where it left them. It holds `length` entries; while `write_at` (an index on the device) is set, an update
    writes there and returns the whole buffers, whose entries past `length` the step's mask rules out."""

    def __init__(self, layer: DynamicLayer, capacity: int):
        super().__init__()
        self.length, self.write_at, self.is_initialized = layer.get_seq_length(), None, True
        self.dtype, self.device = layer.keys.dtype, layer.keys.device
        # Zeros, not garbage, in unused slots: a masked-out NaN value would still poison the attention's sum.
        self.keys, self.values = (t.new_zeros(*t.shape[:2], capacity, t.shape[3]) for t in (layer.keys, layer.values))
        self.keys[:, :, : self.length] = layer.keys[:, :, : self.length]
        self.values[:, :, : self.length] = layer.values[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        if self.write_at is not None:
            self.keys.index_copy_(2, self.write_at, key_states)
            self.values.index_copy_(2, self.write_at, value_states)
            return self.keys, self.values
        start, self.length = self.length, self.length + key_states.shape[2]
        self.keys[:, :, start : self.length], self.values[:, :, start : self.length] = key_states, value_states
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def keep(self, index):
        """Compaction in place: entry `index[..., j, :]` moves to slot j."""
        self.keys[:, :, : index.shape[2]] = self.keys[:, :, : self.length].gather(2, index)
        self.values[:, :, : index.shape[2]] = self.values[:, :, : self.length].gather(2, index)
        self.length = index.shape[2]


class DecodeGraph:
    """The decode step that closes no chunk, in fixed shapes, captured once as a CUDA graph and replayed: one launch
    instead of the decoder's (about 2 000 at Qwen3-0.6B's 28 layers), which bound a step at small batches on a GPU.
    The token, its position and where it is written are copied into fixed buffers; `visible` (which buffer slots each
    row sees) is the step's mask. Off a GPU the same step runs as it is (so that tests check what a GPU captures). It
    keeps no reference to the cache that keeps it (a cycle would hold GPU memory until Python's collector ran)."""

    def __init__(self, model, cache: VIST2Cache):
        implementation = model.config.text_config._attn_implementation
        if implementation not in MASK_TENSOR_ATTENTION:
            raise ValueError(f"a captured decode step needs a mask tensor, which attn_implementation={implementation!r} "
                             "does not take. Fix: load the model with attn_implementation='sdpa', or cuda_graphs=False")
        batch, capacity, device = cache.layers[0].keys.shape[0], cache.layers[0].keys.shape[2], cache.layers[0].device
        self.model, self.graph, self.logits, self.stale, self.checked = model, None, None, True, False
        self.token, self.position = (torch.zeros(batch, 1, dtype=torch.long, device=device) for _ in range(2))
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = torch.zeros(batch, capacity, dtype=torch.bool, device=device)

    def step(self, cache: VIST2Cache):
        self.visible.index_fill_(1, self.write_at, True)
        embeds = self.model.get_input_embeddings()(self.token)
        mask = self.model.build_attention_mask(embeds, lambda batch, head, query, key: self.visible[batch, key],
                                               kv_length=self.visible.shape[1])
        for layer in cache.layers:
            layer.write_at = self.write_at
        try:
            hidden = self.model.run_language_model(embeds, self.position, mask, cache)
        finally:
            for layer in cache.layers:
                layer.write_at = None
        return self.model.next_token_logits(hidden, 1)

    def capture(self, cache: VIST2Cache):
        """Warm up on a side stream, capture, and replay once against the warm-up's logits (the step is idempotent: it
        writes the same entry again). Everything on the buffers' device: a graph captured on another is empty."""
        device = self.visible.device
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    expected = self.step(cache)
            torch.cuda.current_stream(device).wait_stream(stream)
            expected.record_stream(torch.cuda.current_stream(device))
            try:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"):
                    self.logits = self.step(cache)  # (thread_local: a streamer's thread may use the GPU meanwhile)
                self.graph.replay()
                self.check(self.logits, expected, cache, "at its capture")
            except Exception as failure:  # noqa: BLE001 - the warm-up ran the same step: what fails is the capture
                self.give_up(cache, f"the capture failed ({failure})")
        return expected

    def check(self, logits, expected, cache: VIST2Cache, when: str):
        """The replayed logits against the step's own (the ruled-out `<|sketch|>` logit, the dtype's minimum, aside)."""
        finite = expected.float().clamp(-1e4, 1e4)
        error = (logits.float().clamp(-1e4, 1e4) - finite).abs().max().item()
        if error > 1e-2 * finite.abs().max().item() + 1e-3:
            self.give_up(cache, f"{when}, its logits differ from the step's own by {error:.3g}")

    def give_up(self, cache: VIST2Cache, problem: str):
        hf_logging.get_logger(__name__).warning(f"VIST2: decoding without CUDA graphs: {problem}. "
                                                "generate(..., cuda_graphs=False) skips the capture.")
        cache.cuda_graphs, self.graph = False, None

    def __call__(self, token, cache: VIST2Cache):
        length = cache.get_seq_length()
        if self.stale:  # a step outside the graph changed which entries are held
            self.visible[:, length:] = False
            self.visible[:, :length] = True if cache.live is None else cache.live
            self.stale = False
        self.token.copy_(token)
        self.position.copy_(cache.next_position)
        self.write_at.fill_(length)
        capturable = self.visible.is_cuda and not torch.is_autocast_enabled("cuda")  # autocast's weight casts are freed
        if self.graph is not None:
            with torch.cuda.device(self.visible.device):
                self.graph.replay()
                logits = self.logits.clone()
            if not self.checked:  # once, at another length than the capture's: the step's own again
                expected, self.checked = self.step(cache), True
                self.check(logits, expected, cache, "one step after its capture")
                logits = expected
        elif capturable:
            logits = self.capture(cache)
        else:
            logits = self.step(cache)
        for layer in cache.layers:
            layer.length += 1
        cache.live = None if cache.live is None else self.visible[:, : length + 1]
        return logits


# -- Model -------------------------------------------------------------------------------------------------------------
def kept_positions(values, logits_to_keep):
    """`values[:, positions]` for transformers' `logits_to_keep`: the last n positions (0: all), or a tensor of them."""
    return values[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else values[:, logits_to_keep]


class TokenizerIdsOnly(LogitsProcessor):
    """Ids past the tokenizer (padded embedding rows) decode to nothing, so a chunk would be drawn without them.
    Applied after beam search takes its log-probabilities (scores stay the training forward's)."""

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
        self.proj = nn.Linear(config.vision_config.hidden_size * config.merge_size**2, config.text_config.hidden_size)

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
    _supports_sdpa = _supports_flex_attn = True
    _supports_flash_attn = _supports_attention_backend = False

    def save_pretrained(self, save_directory, *args, **kwargs):
        # FSDP2 gives a sharded model a class of torch's making: the folder must name, and hold the file of, VIST2's.
        own = next(c for c in type(self).__mro__ if not c.__module__.startswith("torch."))
        sharded, self.__class__ = type(self), own
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = sharded

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Weights travel only as safetensors: a folder with pickled weights alone is refused, never unpickled.
        kwargs.setdefault("use_safetensors", True)
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (with output_loading_info: a pair)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        model.config.font_path = locate_font(model.config.font_path, source, kwargs)  # the font saved with it
        model.config.validate_vist2()
        # Where `own_processor` finds the tokenizer: the same folder (whatever the working directory is by then) or
        # repo, revision and subfolder.
        local = isinstance(source, (str, Path)) and Path(source).is_dir()
        model.tokenizer_source = (str(Path(source).absolute()) if local else source,
                                  {key: kwargs[key] for key in HUB_KWARGS if key in kwargs})
        return loaded


class VIST2TextDecoder(nn.Module):
    """The backbone's decoder, under its causal-LM class's attribute (`model`, `transformer`): weights named alike."""

    def __init__(self, text_config):
        super().__init__()
        decoder = AutoModel.from_config(text_config)
        self.prefix = decoder.base_model_prefix
        setattr(self, self.prefix, decoder)
        self._no_split_modules = decoder._no_split_modules

    def get_decoder(self):
        return getattr(self, self.prefix)


class VIST2Model(VIST2PreTrainedModel):
    """Vision tower, aligner and decoder: the compressed sequence's hidden states (`AutoModel`; one checkpoint loads
    as this or as `VIST2ForCausalLM`, which adds the LM head)."""

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
        self._no_split_modules = sorted(set(self.vision_tower._no_split_modules or [])
                                        | set(self.language_model._no_split_modules or []))
        self.post_init()

    def build_language_model(self, text_config):
        return VIST2TextDecoder(text_config)

    def forward(self, input_ids=None, attention_mask=None, chunk_ids=None, pixel_values=None, cache=None, use_cache=None,
                read_back=None, past_key_values=None, **kwargs):
        r"""
        input_ids, chunk_ids (`(batch, seq)`): the flat layout from `VIST2Processor`, `<|sketch|>` placeholders where
            visual tokens go; chunk ids 0 for the prefix, i for chunk i. Plain ids (no `chunk_ids`) are laid out here,
            and the hidden states are then those of the compressed sequence `P V_1 ... V_{K-1} c_K`.
        pixel_values (`(num_sketches, H, W)` uint8): one sketch per run of placeholders, in order.
        read_back (`(batch,)` bool): OCR warm-up; a chunk's text also sees its own sketch.
        """
        if input_ids is None:
            raise ValueError(IDS_ONLY)
        cache = past_key_values if cache is None else cache
        if chunk_ids is None:
            if pixel_values is not None or holds_placeholders(input_ids, self.config.sketch_token_id,
                                                              self.config.visual_tokens_per_chunk):
                raise ValueError("chunk_ids is required: pass the batch VIST2Processor returns")
            # (stacklevel: forward, then Module.__call__'s two frames)
            laid_out, _ = self.lay_out(input_ids, attention_mask, stacklevel=4)
            return self(**laid_out, cache=cache, use_cache=use_cache, read_back=read_back)
        self.check_inputs(input_ids, attention_mask, chunk_ids)
        kinds = token_kinds(input_ids, attention_mask, self.config.sketch_token_id)
        chunk_ids = chunk_ids.masked_fill(kinds == PAD, 0)
        chunk_ids = chunk_ids if chunk_ids.dtype == torch.long else chunk_ids.long()
        generation = isinstance(cache, VIST2Cache) or bool(use_cache and cache is None)
        check_layout(kinds, chunk_ids, self.config.visual_tokens_per_chunk, generation)
        memory = memory_flags(kinds, chunk_ids)
        before = self.config.chunk_size if self.config.read_back_positions == "before_next_chunk" else 0
        read_back = None if read_back is None else read_back.bool()
        positions = layout_position_ids(kinds, chunk_ids, memory, read_back, before)
        if use_cache and cache is None:
            cache = VIST2Cache(config=self.config.text_config)
        if isinstance(cache, VIST2Cache):
            hidden = self.prefill(cache, input_ids, kinds, chunk_ids, memory, read_back, positions, pixel_values)
        else:
            if read_back is None:
                read_back = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            embeds = self.embed(input_ids, kinds, pixel_values)
            mask = self.build_attention_mask(embeds, vist2_mask_function(kinds, chunk_ids, memory, read_back), cache)
            hidden = self.run_language_model(embeds, positions, mask, cache, use_cache)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_KWARG: cache if use_cache else None})

    def check_inputs(self, input_ids, attention_mask, chunk_ids):
        """Refuse what no processor call returns: shapes that differ, ids the model cannot embed, an empty row."""
        if chunk_ids.shape != input_ids.shape or (attention_mask is not None and attention_mask.shape != input_ids.shape):
            raise ValueError(f"input_ids {tuple(input_ids.shape)}, chunk_ids {tuple(chunk_ids.shape)} and attention_mask "
                             f"{None if attention_mask is None else tuple(attention_mask.shape)} must have one shape")
        vocab_size = self.get_input_embeddings().weight.shape[0]  # (PEFT's trainable-row wrapper: no num_embeddings)
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab_size:
            raise ValueError(f"input_ids hold ids outside the model's vocabulary (0..{vocab_size - 1}). Fix: use the "
                             "tokenizer saved with the model, or model.resize_token_embeddings(len(tokenizer))")
        check_rows_hold_tokens(attention_mask)

    def lay_out(self, input_ids, attention_mask=None, processor=None, keep_closed_text=False, reports=None,
                stacklevel=1):
        """Plain token ids -> the processor's batch for them, and which input positions are real (not padding). How
        the closed chunks were drawn goes to `reports` (a cache's, summed up by generate), or into a warning now, at
        the line `stacklevel` frames up."""
        check_rows_hold_tokens(attention_mask)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = [row[keep].tolist() for row, keep in zip(input_ids, real)]
        processor = self.own_processor() if processor is None else processor
        warn_at = None if reports is not None else stacklevel + 1
        batch = processor.layout_token_ids(rows, keep_closed_text, stacklevel=warn_at, reports=reports)
        return batch.to(input_ids.device), real

    # -- sketches -----------------------------------------------------------------------------------------------------
    def check_pixel_values(self, pixel_values):
        cfg = self.config
        if pixel_values.ndim != 3 or tuple(pixel_values.shape[1:]) != (cfg.image_height, cfg.image_width) or \
                pixel_values.dtype != torch.uint8:
            raise ValueError(f"pixel_values must be uint8 sketches of shape (num_sketches, {cfg.image_height}, "
                             f"{cfg.image_width}), got {tuple(pixel_values.shape)} {pixel_values.dtype}: pass what "
                             "VIST2Processor returns")

    def encode_sketches(self, pixel_values):
        """`(n, H, W)` uint8 sketches -> `(n, m, hidden)` visual tokens."""
        cfg = self.config
        self.check_pixel_values(pixel_values)
        # Normalised here, on the model's device, one tower pass at a time: the sketches travel as 1 byte per pixel.
        grey = (pixel_values.to(torch.float32) / 255 - cfg.image_mean) / cfg.image_std
        pixel_values = grey.to(self.vision_tower.dtype)[:, None].expand(-1, cfg.num_channels, -1, -1)
        h, w = cfg.image_height // cfg.patch_size, cfg.image_width // cfg.patch_size
        if cfg.vision_config.model_type == "siglip2_vision_model":
            p, n = cfg.patch_size, pixel_values.shape[0]
            patches = pixel_values.reshape(n, cfg.num_channels, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
            # Every sketch has one grid: its position embeddings are resized once, from host ints (one row of
            # spatial_shapes, broadcast over the sketches), and no patch is padding (no mask). Per-sketch shapes on
            # the device would be read back, sketch by sketch in some transformers releases.
            outputs = self.vision_tower(pixel_values=patches.reshape(n, h * w, p * p * cfg.num_channels),
                                        pixel_attention_mask=None, spatial_shapes=torch.tensor([[h, w]], device="cpu"))
        else:
            native = getattr(cfg.vision_config, "image_size", None)
            resized = native not in (None, cfg.image_height) or cfg.image_height != cfg.image_width
            outputs = self.vision_tower(pixel_values=pixel_values, interpolate_pos_encoding=resized)
        patches = outputs.last_hidden_state
        if patches.shape[1] != h * w:
            raise ValueError(f"the vision tower gave {patches.shape[1]} tokens per sketch, expected {h}x{w}: use a "
                             "patch encoder without class token (SigLIP / SigLIP2 vision)")
        weight = self.aligner.proj.weight  # (a tower cast apart from the rest; a quantized aligner casts for itself)
        if patches.dtype != weight.dtype and weight.dtype.is_floating_point:
            patches = patches.to(weight.dtype)
        return self.aligner(patches)

    def embed(self, input_ids, kinds, pixel_values, sketches_per_pass=None):
        if pixel_values is not None:
            self.check_pixel_values(pixel_values)
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
            if visual.shape[1] != self.config.visual_tokens_per_chunk:  # (a config changed after the model was built)
                self.config.validate_vist2()
            visual = visual.to(embeds.dtype)
            embeds = embeds.masked_scatter((kinds == SKETCH)[..., None], visual)
        return embeds

    # -- the language model --------------------------------------------------------------------------------------------
    def build_attention_mask(self, embeds, mask_function, cache=None, kv_length=None):
        """A mask function over flat indices as the attention implementation takes it (sdpa, eager: additive; flex: a
        BlockMask that skips fully masked blocks), for the last `embeds.shape[1]` entries, after `cache`'s (or
        over `kv_length` keys: a `DecodeGraph`'s whole buffers)."""
        implementation = self.config.text_config._attn_implementation
        if implementation in MASK_TENSOR_ATTENTION:
            # The rules are elementwise, so one broadcast call builds the whole (batch, 1, q, kv) mask; transformers'
            # generic path would vmap it pair by pair.
            batch, q_length = embeds.shape[:2]
            if kv_length is None:
                kv_length = q_length + (cache.get_seq_length() if cache is not None else 0)
            rows = torch.arange(batch, device=embeds.device)[:, None, None, None]
            keys = torch.arange(kv_length, device=embeds.device)
            queries = keys[kv_length - q_length :][None, None, :, None]
            allowed = mask_function(rows, None, queries, keys[None, None, None, :])
            # Additive, for sdpa too: given a boolean mask, SDPA would convert it in every layer (launches and a copy).
            minimum = torch.finfo(embeds.dtype).min
            return torch.full(allowed.shape, minimum, dtype=embeds.dtype, device=embeds.device).masked_fill_(allowed, 0)
        # The VIST2 rule replaces causality: OR-ing it admits the bidirectional sketch blocks and read-back, AND-ing it
        # removes what causality alone would allow (the text of earlier chunks).
        return create_causal_mask(config=self.config.text_config, inputs_embeds=embeds, attention_mask=None,
                                  or_mask_function=mask_function, and_mask_function=mask_function,
                                  **{CACHE_KWARG: cache})

    def run_language_model(self, embeds, positions, attention_mask, cache, use_cache=True):
        outputs = self.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                     use_cache=bool(use_cache), **{CACHE_KWARG: cache})
        return outputs.last_hidden_state

    def prefill_passes(self, setting, keys: int, device) -> tuple[int, int | None]:
        """(entries per language-model pass, sketches per tower pass) for `prefill_chunk_size` = an int, None (one pass)
        or "auto": a budget for transient tensors, 4 GiB on an accelerator (a pass costs launches), 8 MiB on a CPU."""
        patches = self.aligner.grid[0] * self.aligner.grid[1]
        if setting is None:
            return max(keys, 1), None
        if setting != "auto":
            return setting, max(1, setting // patches)
        budget, size = (8 << 20 if torch.device(device).type == "cpu" else 4 << 30), self.dtype.itemsize
        text, vision = self.config.text_config, self.config.vision_config
        # One entry of a pass: its mask row (the boolean rule and the additive mask built from it), its MLP activations.
        per_entry = keys * (1 + size) + 4 * getattr(text, "intermediate_size", 4 * text.hidden_size) * size
        per_sketch = patches * 4 * getattr(vision, "intermediate_size", 4 * vision.hidden_size) * size
        return max(1, budget // per_entry), max(1, budget // per_sketch)

    def prefill(self, cache: VIST2Cache, input_ids, kinds, chunk_ids, memory, read_back, positions, pixel_values):
        """Run a prompt in the generation layout into `cache` in `prefill_passes` passes, exact whatever they are."""
        # Text that is not memory is the text of a chunk with a sketch: the training layout.
        if (read_back is not None and read_back.any()) or ((kinds == TEXT) & ~memory).any():
            raise ValueError("generate() takes the generation layout, in which closed chunks are sketches only: "
                             "call the processor without keep_closed_text=True (and the model without read_back).")
        length = kinds.shape[1]
        block, sketches_per_pass = self.prefill_passes(cache.prefill_chunk_size, length, input_ids.device)
        # begin() reads counts back to the host: before the tower's kernels are queued, not after (it would wait for them)
        cache.begin(input_ids, kinds, chunk_ids, positions[:, -1:] + 1, self.config.chunk_size)
        cache.seen = length
        embeds = self.embed(input_ids, kinds, pixel_values, sketches_per_pass)
        mask_function = generation_mask_function(sketch_reach(kinds, chunk_ids), cache.live)
        hidden, start = [], 0
        for end in prefill_block_ends(kinds, chunk_ids, block) if block < length else [length]:
            mask = self.build_attention_mask(embeds[:, start:end], mask_function, cache)
            hidden.append(self.run_language_model(embeds[:, start:end], positions[:, start:end], mask, cache))
            start = end
        return torch.cat(hidden, 1) if len(hidden) > 1 else hidden[0]

    def own_processor(self):
        """The processor used when none is passed: the config's settings and `model.tokenizer` or the one saved. Built
        again when either changes (a curriculum's final geometry, a tokenizer set after a first call) and after
        `resize_token_embeddings`, and refused while its tokenizer holds fewer tokens than a resize was for."""
        own, given = getattr(self, "_own_processor", None), getattr(self, "tokenizer", None)
        if own is None or given not in (None, own.tokenizer) or own.settings_mismatch(self.config):
            tokenizer = given if given is not None else getattr(own, "tokenizer", None)
            source, hub_kwargs = getattr(self, "tokenizer_source", (self.config._name_or_path, {}))
            try:
                # Given the config, AutoTokenizer does not read config.json again as a model type it does not know.
                if tokenizer is None and source:
                    tokenizer = AutoTokenizer.from_pretrained(source, config=self.config, trust_remote_code=False,
                                                              **hub_kwargs)
            except (OSError, ValueError) as error:
                source = f"{source} ({type(error).__name__}: {error})"
            if tokenizer is None:
                raise ValueError(f"VIST2 needs its tokenizer to render closed chunks, and the model has none: it was "
                                 f"{'loaded from ' + source if source else 'built in memory'}. Fix: pass "
                                 "processor=VIST2Processor.from_config(model.config, tokenizer) to generate() / read(), "
                                 "or set model.tokenizer = tokenizer.")
            self._own_processor = VIST2Processor.from_config(self.config, tokenizer)
        tokens, resized_for = len(self._own_processor.tokenizer), getattr(self, "resized_for", 0)
        if tokens < resized_for:
            raise ValueError(f"the embeddings were resized for {resized_for} tokens, but the tokenizer VIST2 draws "
                             f"closed chunks with has {tokens}: a new token could be neither drawn nor written. Fix: "
                             "set model.tokenizer = tokenizer (the one holding the new tokens), or pass "
                             "processor=VIST2Processor.from_config(model.config, tokenizer)")
        return self._own_processor

    # -- transformers plumbing ----------------------------------------------------------------------------------------
    def resize_token_embeddings(self, new_num_tokens=None, *args, **kwargs):
        # New tokens need a tokenizer that holds them, to be drawn and written: `own_processor` asks for one, and is
        # built again (a tokenizer grown in place has new names to find in text). A resize that changes nothing asks
        # for nothing.
        if new_num_tokens not in (None, self.get_input_embeddings().weight.shape[0]):
            self.resized_for, self._own_processor = max(getattr(self, "resized_for", 0), new_num_tokens), None
        return super().resize_token_embeddings(new_num_tokens, *args, **kwargs)

    def get_input_embeddings(self):
        return self.get_decoder().get_input_embeddings()

    def set_input_embeddings(self, value):
        self.get_decoder().set_input_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()


class VIST2ForCausalLM(VIST2Model, GenerationMixin):
    """`VIST2Model` with the LM head: loss along the text stream, `generate` with a cache that compresses."""

    def build_language_model(self, text_config):
        return AutoModelForCausalLM.from_config(text_config)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers records the saved class's auto class only; the checkpoint also loads as VIST2Model (AutoModel).
        module = __name__.split(".")[-1]
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": f"{module}.VIST2Model"}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, chunk_ids=None, pixel_values=None, labels=None, cache=None,
                use_cache=None, read_back=None, logits_to_keep=0, past_key_values=None, **kwargs):
        r"""
        As `VIST2Model.forward`; during decoding (a prefilled `VIST2Cache`), `input_ids` are only the new tokens. Plain
        ids (no `chunk_ids`) go to `forward_text`: logits and loss at the caller's positions (with `use_cache=True`,
        and the prefilled cache).
        labels (`(batch, seq)`): next-token targets along the text stream `P c_1 c_2 ...`, across chunk boundaries;
            sketches and -100 carry no label. `label_smoothing` (a float kwarg): see `text_stream_loss`.
        """
        if input_ids is None:
            raise ValueError(IDS_ONLY)
        for key in REPORT_KEYS:
            kwargs.pop(key, None)
        cache = past_key_values if cache is None else cache
        if isinstance(cache, VIST2Cache) and cache.is_prefilled:
            if input_ids.shape[1] == 1:
                return self.decode_step(input_ids, cache, logits_to_keep)
            logits = self.feed_tokens(cache, input_ids)  # several new tokens (a decoding loop of one's own)
            return CausalLMOutputWithPast(logits=kept_positions(logits, logits_to_keep), **{CACHE_KWARG: cache})
        if chunk_ids is None and pixel_values is None and not holds_placeholders(
                input_ids, self.config.sketch_token_id, self.config.visual_tokens_per_chunk):
            return self.forward_text(input_ids, attention_mask, labels, cache, use_cache, logits_to_keep, **kwargs)
        out = super().forward(input_ids, attention_mask, chunk_ids, pixel_values, cache=cache, use_cache=use_cache,
                              read_back=read_back)
        loss = None
        if labels is not None:
            kinds = token_kinds(input_ids, attention_mask, self.config.sketch_token_id)
            loss = self.text_stream_loss(out.last_hidden_state, labels, kinds, chunk_ids,
                                         kwargs.get("num_items_in_batch"), kwargs.get("label_smoothing", 0.0))
        logits = self.next_token_logits(out.last_hidden_state, logits_to_keep)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KWARG: getattr(out, CACHE_KWARG)})

    def generate(self, inputs=None, generation_config=None, *, processor=None,
                 prefill_chunk_size: int | str | None = "auto", cuda_graphs: bool | None = None, **kwargs):
        """`GenerationMixin.generate` with a compressing cache, on the processor's batch or plain token ids (laid out
        here); `processor` renders closed chunks (default: `own_processor()`). `prefill_chunk_size`: entries per prefill
        pass, "auto" as many as memory allows (`prefill_passes`), `None` all in one; the logits are the same.
        `cuda_graphs`: decode steps replayed as a CUDA graph, by default on a GPU without beam search
        (`uses_decode_graph`)."""
        if generation_config is not None:
            kwargs["generation_config"] = generation_config
        options = self.generation_options(kwargs)
        self.check_generation_mode(options, kwargs)
        # transformers' own chunked prefill cannot split sketches: VIST2 takes the setting (of the caller's
        # generation_config; of the model's own unless prefill_chunk_size is given) and blocks the prefill itself.
        passed = getattr(generation_config, "prefill_chunk_size", None)
        with SAVED_PREFILL_SETTING:
            saved = getattr(self, "held_prefill_chunk_size", None) or self.generation_config.prefill_chunk_size
        if passed is not None:
            prefill_chunk_size, settings = passed, generation_config.to_dict()
            kwargs["generation_config"] = generation_config.from_dict(settings, prefill_chunk_size=None)
        elif saved is not None and prefill_chunk_size == "auto":
            prefill_chunk_size = saved
        if processor is not None:
            self.check_processor(processor)
        try:  # the tokenizer that reads what is written (a model without one still writes within its open chunk)
            tokenizer = (self.own_processor() if processor is None else processor).tokenizer
        except ValueError:
            tokenizer = None
        if tokenizer is not None and len(tokenizer) < self.get_output_embeddings().out_features:  # padded embeddings
            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []),
                                                              TokenizerIdsOnly(len(tokenizer))])
        if options.stop_strings is not None and kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = self.own_processor().tokenizer if tokenizer is None else tokenizer  # (or names the fix)
        cache, legacy_cache = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
        cache = legacy_cache if cache is None else cache
        if cache is not None and not isinstance(cache, VIST2Cache):
            raise ValueError(f"VIST2 generate: a {type(cache).__name__} keeps every token, which a VIST2 model never "
                             "does. Fix: pass no cache (generate makes a VIST2Cache), or the cache of an earlier "
                             "generate or of model.read")
        if cache is None:
            cache = VIST2Cache(config=self.config.text_config, processor=processor, prefill_chunk_size=prefill_chunk_size)
        else:  # the caller's cache: what this call sets, it takes
            cache.processor = cache.processor if processor is None else processor
            cache.prefill_chunk_size = cache.prefill_chunk_size if prefill_chunk_size == "auto" else prefill_chunk_size
        beams = (options.num_beams or 1) > 1
        if cuda_graphs is not None or beams:  # beam search reorders the rows every step: a graph would not last
            cache.cuda_graphs = cuda_graphs if cuda_graphs is not None else False
        kwargs[CACHE_KWARG] = cache
        input_ids, closed_before, eos = kwargs.get("input_ids", inputs), len(cache.reports), options.eos_token_id
        if cache.is_prefilled and input_ids is not None:
            self.take_in(cache, input_ids, kwargs.get("attention_mask"))
        placeholders = input_ids is not None and (kwargs.get("pixel_values") is not None or holds_placeholders(
            input_ids, self.config.sketch_token_id, self.config.visual_tokens_per_chunk))
        if kwargs.get("chunk_ids") is None and placeholders and not cache.is_prefilled:
            raise ValueError("chunk_ids is required when input_ids hold '<|sketch|>' placeholders: pass the whole "
                             "processor batch, model.generate(**processor(text=...), processor=processor)")
        if placeholders and options.token_healing:
            raise ValueError("VIST2 generate: token_healing re-tokenizes the prompt's text, and a processor batch "
                             "holds its closed chunks as '<|sketch|>' placeholders. Fix: pass the prompt as plain "
                             "token ids (model.generate(input_ids=...)), which the model lays out itself")
        penalties = [name for name in ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                                       "encoder_no_repeat_ngram_size") if getattr(options, name) not in (None, 0, 1.0)]
        if placeholders and penalties:
            hf_logging.get_logger(__name__).warning(
                f"VIST2 generate: {', '.join(penalties)} sees the prompt's closed chunks as '<|sketch|>' placeholders, "
                "not their text. Fix: pass the prompt as plain token ids (model.generate(input_ids=...)): the penalty "
                "then sees its text, and the model lays it out as the processor would")
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
        try:
            if eos is not None and input_ids is not None and not beams:
                cache.stop = torch.tensor(eos).flatten(), input_ids.shape[1]
            with self.holding_prefill_setting():
                output = super().generate(inputs, **kwargs)
        finally:
            cache.stop = cache.sequences = None
        if beams:  # beam search returns its finished beams, not the rows its cache holds
            cache.not_continuable = ("this cache ended a beam search, whose sequences are its finished beams, not the "
                                     "rows the cache holds")
        if len(cache.reports) > closed_before:  # (drawn by the caller's processor, or the model's own)
            (cache.processor or self.own_processor()).kept_as_text(cache.reports[closed_before:], stacklevel=2)
        return output

    @contextlib.contextmanager
    def holding_prefill_setting(self):
        """The model's saved `prefill_chunk_size` held out of its generation_config while transformers' generate runs
        (it would merge it into any config it is given and run its own chunked prefill, which cannot split sketches);
        put back when the last of the calls running at once (a server's threads) ends."""
        with SAVED_PREFILL_SETTING:
            if self.generation_config.prefill_chunk_size is not None:
                self.held_prefill_chunk_size, self.generation_config.prefill_chunk_size = (
                    self.generation_config.prefill_chunk_size, None)
            self.generate_calls = getattr(self, "generate_calls", 0) + 1
        try:
            yield
        finally:
            with SAVED_PREFILL_SETTING:
                self.generate_calls -= 1
                if not self.generate_calls and getattr(self, "held_prefill_chunk_size", None) is not None:
                    self.generation_config.prefill_chunk_size, self.held_prefill_chunk_size = (
                        self.held_prefill_chunk_size, None)

    @torch.no_grad()
    def read(self, processor=None, text="", prefix=None, sketches_per_step: int | None = None,
             progress: bool | None = None) -> dict:
        """Stream a long `text` (or token ids) into a `VIST2Cache` a group of chunks at a time (at least 8, as many as
        memory allows, or `sketches_per_step`), and return inputs for `generate`: `out = model.generate(**model.read(
        processor, book), processor=processor)`, `out[:, 1:]` the new text. `progress`: a bar (default: 100k+ chars)."""
        processor = self.own_processor() if processor is None else processor
        self.check_processor(processor)
        device, L, m = self.device, self.config.chunk_size, self.config.visual_tokens_per_chunk
        if isinstance(text, torch.Tensor):
            text = text.tolist() if text.ndim == 1 or text.shape[0] != 1 else text[0].tolist()
        if not isinstance(text, str) and len(text) and not isinstance(text[0], int):
            raise ValueError(f"read takes one text (a string, or the token ids of one), got {len(text)} rows. Fix: "
                             "read each text into a cache of its own")
        if prefix is None:  # the text's leading system turns, as a processor call keeps them
            cut = processor.prefix_length(text)
            prefix, text = text[:cut], text[cut:]
        prefix_ids = processor.encode(prefix) if isinstance(prefix, str) else list(prefix)
        cache = VIST2Cache(config=self.config.text_config, processor=processor)
        if not len(text):
            return dict(processor.collate([processor.encode_sample(prefix_ids, [])]).to(device), cache=cache)
        cache.entries, cache.prefix_length = [0], [len(prefix_ids)]
        cache.next_position = torch.zeros(1, 1, dtype=torch.long, device=device)

        def group_size():  # at least 8: each language-model pass also copies the cache (transformers' cache update)
            block, _ = self.prefill_passes(cache.prefill_chunk_size, cache.get_seq_length() + m, device)
            return sketches_per_step or max(8, block // m)
        group, open_ids, size = ([(0, prefix_ids, None)] if prefix_ids else []), [], group_size()
        reports, chunks = [], hf_logging.tqdm(processor.iter_chunks(text), desc="VIST2 read", unit=" chunks",
                                              disable=not (len(text) >= 100_000 if progress is None else progress))
        for index, (token_ids, sketch, report) in enumerate(chunks, start=1):
            if report is None:
                open_ids, open_index = token_ids, index
                break
            reports.append(report)
            group.append((index, token_ids, sketch))
            if len(group) >= size:
                self.extend_cache(cache, processor, group)
                group, size = [], group_size()
        # The open chunk goes in the last group's pass, whose last logits are generate's first step (`next_logits`):
        # generate feeds the prompt's last token, which this pass has run already.
        hidden = self.extend_cache(cache, processor, group + [(open_index, open_ids, None)])
        cache.next_logits = self.next_token_logits(hidden, 1)
        cache.open_chunk = torch.tensor([open_index], device=device)
        cache.open_length = [len(open_ids)]
        cache.recent = F.pad(torch.tensor([open_ids], dtype=torch.long, device=device), (L - len(open_ids), 0))
        chunks.close()
        kept, undrawable = processor.kept_as_text(reports, stacklevel=3)  # 3: the caller, above torch.no_grad's wrapper
        cache.seen = 1  # the returned input_ids' one token, already run: its logits wait in next_logits
        return {"input_ids": torch.tensor([[open_ids[-1]]], device=device), "cache": cache,
                "chunks_kept_as_text": torch.tensor([kept], device=device),
                "undrawable_characters": ["".join(undrawable)]}

    # -- training: plain ids, the head, the loss -----------------------------------------------------------------------
    def forward_text(self, input_ids, attention_mask=None, labels=None, cache=None, use_cache=None, logits_to_keep=0,
                     **kwargs):
        """Plain token ids, laid out as the processor lays out text. The logits (and loss over `labels`) come back at
        the caller's token positions, from the training layout: at each token, the logits generation would give there.
        With a cache, the generation layout is prefilled into it; its last logits are the caller's last token's, so
        `logits_to_keep=1` without labels (generate's prefill) runs that pass alone."""
        processor, callers, prefilled = getattr(cache, "processor", None), 5, None  # (5: this, forward, Module's two)
        prefill = bool(use_cache) or isinstance(cache, VIST2Cache)
        last_only = prefill and labels is None and isinstance(logits_to_keep, int) and logits_to_keep == 1
        if not last_only and (input_ids == self.config.sketch_token_id).any():
            raise ValueError("input_ids hold the '<|sketch|>' id, which VIST2 reads in plain ids as its name spelled as "
                             "text (several tokens), so the training layout's logits would not line up with them. Fix: "
                             "tokenize with the processor (processor.encode spells it), or drop it")
        if prefill:
            layout, _ = self.lay_out(input_ids, attention_mask, processor, reports=getattr(cache, "reports", None),
                                     stacklevel=callers)
            out = self(**layout, cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
            prefilled = getattr(out, CACHE_KWARG)
            prefilled.seen = input_ids.shape[1]  # the caller's columns, not the layout's
            if last_only:
                return out
            # The prefill's other positions are sketches, not the caller's tokens: theirs take the training layout.
        layout, real = self.lay_out(input_ids, attention_mask, processor, keep_closed_text=True, stacklevel=callers,
                                    reports=None if prefilled is None else [])  # (the prefill reported those chunks)
        text = token_kinds(layout["input_ids"], layout["attention_mask"], self.config.sketch_token_id) == TEXT
        if labels is not None:
            layout["labels"] = torch.full_like(layout["input_ids"], -100).masked_scatter(text, labels[real])
        out = self(**layout, **kwargs)
        logits = out.logits.new_zeros(*input_ids.shape, out.logits.shape[-1])
        logits[real] = out.logits[text]
        return CausalLMOutputWithPast(loss=out.loss, logits=kept_positions(logits, logits_to_keep),
                                      **{CACHE_KWARG: prefilled})

    def next_token_logits(self, hidden, logits_to_keep=None):
        """The LM head (over the last `logits_to_keep` positions; 0: all), with `<|sketch|>` ruled out: written text
        must never hold a placeholder without a sketch, and training and generation rule it out alike."""
        if logits_to_keep is not None:
            hidden = kept_positions(hidden, logits_to_keep)
        logits = self.get_output_embeddings()(hidden)
        logits[..., self.config.sketch_token_id] = torch.finfo(logits.dtype).min
        return logits

    def text_stream_loss(self, hidden, labels, kinds, chunk_ids, num_items_in_batch=None, label_smoothing=0.0):
        """Next-token loss along the text stream: sketches are skipped, not predicted. Where the stream skips a chunk
        (the generation layout holds no text of sketched chunks), the token after the gap is not the next one: no loss.
        `label_smoothing` spreads its share over the tokens that can be written (not `<|sketch|>`)."""
        is_text = kinds == TEXT
        order = torch.sort((~is_text).int(), dim=1, stable=True).indices  # text positions first, in flat order
        stream_labels = labels.gather(1, order).masked_fill(~is_text.gather(1, order), -100)
        stream_chunks = chunk_ids.gather(1, order)
        targets = torch.full_like(stream_labels, -100)
        targets[:, :-1] = stream_labels[:, 1:].masked_fill(stream_chunks[:, 1:] > stream_chunks[:, :-1] + 1, -100)
        picked = targets != -100
        rows, cols = picked.nonzero(as_tuple=True)
        logits, targets = self.next_token_logits(hidden[rows, order[rows, cols]]).float(), targets[rows, cols]
        if label_smoothing:  # (the ruled-out `<|sketch|>` has log-probability -inf: it takes no share)
            sketch = self.config.sketch_token_id
            logits = torch.cat([logits[:, :sketch], logits[:, sketch + 1 :]], 1)
            targets = targets - (targets > sketch).long()
        loss = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)
        denominator = num_items_in_batch if num_items_in_batch is not None else max(int(picked.sum()), 1)
        return loss / denominator

    # -- generation machinery: checks, decode steps, closing chunks, read's prefill ------------------------------------
    def generation_options(self, kwargs):
        """The options generate runs with, merged as transformers merges them: the model's `generation_config`, what a
        passed one sets apart from the defaults, then keyword arguments."""
        passed, own = kwargs.get("generation_config"), self.generation_config
        options = own.from_dict(own.to_dict())
        if passed is not None:
            defaults = GenerationConfig().to_dict()
            options.update(**{key: value for key, value in passed.to_dict().items() if value != defaults.get(key)})
        options.update(**kwargs)
        return options

    def check_generation_mode(self, config, kwargs):
        """Refuse, before any work, decoding strategies and options that would not be exact with the compressing cache
        (`config`: `generation_options`)."""
        mode = str(getattr(config.get_generation_mode(kwargs.get("assistant_model")), "value", ""))
        mode = "custom_generate" if kwargs.get("custom_generate") else mode
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError(f"VIST2 generate: {IDS_ONLY}")
        for option in ("output_attentions", "output_hidden_states"):
            if getattr(config, option, False):
                raise ValueError(f"VIST2 generate: {option}=True is not supported: the decoder's attentions and hidden "
                                 "states are over the compressed sequence, not the tokens, and are not returned. Fix: "
                                 "drop it (output_logits and output_scores are supported)")
        if mode not in ("greedy_search", "sample", "beam_search", "beam_sample"):
            why = ("it feeds guessed tokens and crops the cache back, which cannot undo a chunk that closed (its text "
                   "is a sketch by then)" if mode == "assisted_generation" else "transformers runs it from custom "
                   "code written for caches that keep every token, not for one whose closed chunks are sketches")
            raise ValueError(f"VIST2 generate: {mode} is not supported: {why}. Fix: use greedy "
                             "decoding, sampling or beam search (num_beams, num_return_sequences)")
        if config.cache_implementation not in (None, "hybrid"):  # (transformers drops "hybrid", which Gemma's save)
            raise ValueError(f"VIST2 generate: cache_implementation={config.cache_implementation!r} would replace the "
                             "VIST2Cache, the cache that cuts closed chunks' text. Fix: drop it (from the "
                             "generation_config too)")

    def check_processor(self, processor):
        mismatch = processor.settings_mismatch(self.config)
        if mismatch:
            raise ValueError(f"processor and model disagree on {mismatch} (processor, model): build the processor "
                             "with VIST2Processor.from_config(model.config, tokenizer)")
        embedded = self.get_input_embeddings().weight.shape[0]
        if len(processor.tokenizer) > embedded:
            raise ValueError(f"the processor's tokenizer has {len(processor.tokenizer)} tokens but the model embeds "
                             f"{embedded}. Fix: use the tokenizer saved with the model, or "
                             "model.resize_token_embeddings(len(tokenizer))")

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, chunk_ids=None,
                                      pixel_values=None, past_key_values=None, **kwargs):
        # Public override point of GenerationMixin: after prefill only the newest token goes in; the cache keeps the
        # layout, so generate's own attention_mask / cache_position bookkeeping is not used.
        cache = past_key_values if cache is None else cache
        if isinstance(cache, VIST2Cache) and cache.is_prefilled:
            if len(cache.entries) != input_ids.shape[0]:  # a cache from `read`, for several beams or sequences
                cache.batch_repeat_interleave(input_ids.shape[0] // len(cache.entries))
            cache.sequences = input_ids  # (which rows have ended, should a chunk close)
            return {"input_ids": input_ids[:, -1:], CACHE_KWARG: cache, "use_cache": True}
        if isinstance(pixel_values, (list, tuple)):  # per prompt row (see `generate`): each copy of a row gets its own
            copies = input_ids.shape[0] // len(pixel_values)
            pixel_values = torch.cat([row for row in pixel_values for _ in range(copies)])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "chunk_ids": chunk_ids,
                "pixel_values": pixel_values, CACHE_KWARG: cache, "use_cache": True,
                "logits_to_keep": kwargs.get("logits_to_keep") or 1}  # (generate reads the last)

    @torch.no_grad()
    def take_in(self, cache: VIST2Cache, input_ids, attention_mask=None):
        """A prefilled cache continued with its sequence and new tokens after it (a reply appended to an earlier
        generate's `sequences`, a question after `read`'s `input_ids`): all new tokens but the last, which generate
        feeds, go in as decode steps, one at a time, closing chunks as writing does."""
        if cache.not_continuable:
            raise ValueError(f"{cache.not_continuable}. Fix: pass the sequence without the cache")
        seen, pending, last = cache.seen, cache.next_logits is not None, min(cache.open_length + [cache.seen])
        new = input_ids.shape[1] - seen  # `last`: the open chunk's tokens, the caller's last columns in every row
        recent = cache.recent[:, cache.recent.shape[1] - last :]
        if input_ids.shape[0] != len(cache.entries) or new < (0 if pending else 1) or not torch.equal(
                input_ids[:, seen - last : seen].to(recent.device), recent):
            raise ValueError(f"input_ids ({tuple(input_ids.shape)}) do not continue the sequence this cache has taken "
                             f"in ({len(cache.entries)} rows, {seen} columns, ending {recent.tolist()})"
                             ". Fix: pass the whole sequence (the earlier output's sequences, or read's input_ids) with "
                             "the new tokens after it")
        if attention_mask is not None and not attention_mask[:, seen:].all():
            raise ValueError("attention_mask: the tokens after those the cache has taken in hold padding. Fix: append "
                             "the same number of new tokens to every row")
        taken = None if attention_mask is None else attention_mask[:, :seen].bool()
        masked_inside = None if taken is None else ~taken & (taken.cumsum(1) > 0)  # after a row's first token
        if masked_inside is not None and masked_inside.any():
            row = int(masked_inside.any(1).nonzero()[0])
            raise ValueError(f"attention_mask: row {row} masks tokens after its start that the cache has taken in (the "
                             "padding after a row finished, say), which it cannot unsee: they may be sketches by now. "
                             "Fix: pass attention_mask 1 there (as generate fed them), or the sequence without the cache")
        if new > (0 if pending else 1):
            cache.next_logits = None  # they were the last seen token's: the new tokens come first
            self.feed_tokens(cache, input_ids[:, seen:-1].to(cache.recent.device))

    def feed_tokens(self, cache: VIST2Cache, input_ids):
        """New tokens into a prefilled cache, a decode step each, closing chunks as writing does: their logits."""
        logits = [self.decode_step(input_ids[:, i : i + 1], cache).logits for i in range(input_ids.shape[1])]
        return torch.cat(logits, 1) if logits else None

    def uses_decode_graph(self, cache: VIST2Cache) -> bool:
        """`cache.cuda_graphs`: None (the default) captures the decode step on a GPU where the attention takes a mask
        tensor (sdpa, eager) over full-attention layers and the model sits whole on it (not spread or offloaded by
        accelerate); True runs the fixed-shape step anywhere (uncaptured off a GPU); False never. generate makes it
        False for beam search, whose rows change every step. Never with gradients: its writes are in place."""
        if cache.cuda_graphs is None:
            plain = all(type(layer) in (DynamicLayer, FixedLayer) for layer in cache.layers)
            masks = self.config.text_config._attn_implementation in MASK_TENSOR_ATTENTION
            placed = set(map(str, getattr(self, "hf_device_map", {}).values()))
            whole = len(placed) <= 1 and not placed & {"cpu", "disk", "meta"}
            cache.cuda_graphs = plain and masks and whole and cache.recent.is_cuda
        return cache.cuda_graphs and not torch.is_grad_enabled()

    def decode_step(self, input_ids, cache: VIST2Cache, logits_to_keep=0):
        """Feed one new token per row. Where no open chunk is full, the step is the backbone's own (no host-device
        synchronisation, and without padding no mask), on a GPU captured once and replayed (`DecodeGraph`); otherwise
        `close_chunks` runs in the same pass."""
        if cache.next_logits is not None:  # the token was run already (by `read`): these are its logits
            if not torch.equal(input_ids[:, -1:].to(cache.recent.device), cache.recent[:, -1:]):
                raise ValueError("this cache from read has run the token of its input_ids already and holds its "
                                 "logits: that token goes in first. Fix: feed read's input_ids (model(**inputs)), then "
                                 "the new tokens, or pass read's input_ids with the new tokens after them")
            logits, cache.next_logits = cache.next_logits, None
            return CausalLMOutputWithPast(logits=logits, **{CACHE_KWARG: cache})
        token, graph = input_ids[:, -1:], self.uses_decode_graph(cache)
        cache.seen += 1
        L, m = self.config.chunk_size, self.config.visual_tokens_per_chunk
        if graph or isinstance(cache.layers[0], FixedLayer):  # room for the step: a closing one adds m + 1, then cuts L
            cache.reserve(m + 1 if L in cache.open_length else 1, spare=L + 4 * m)
        if cache.decode_graph is not None and (L in cache.open_length or not graph):
            cache.decode_graph.stale = True  # a step outside it changes the entries it holds
        if L in cache.open_length:
            logits = self.next_token_logits(self.close_chunks(cache, token), logits_to_keep or 1)
        else:
            if graph:
                cache.decode_graph = cache.decode_graph or DecodeGraph(self, cache)
                logits = cache.decode_graph(token, cache)
            else:
                embeds, mask = self.get_input_embeddings()(token), None
                if cache.live is not None:  # padding: the token sees the live entries (and itself)
                    live = cache.live = torch.cat([cache.live, torch.ones_like(token, dtype=torch.bool)], 1)
                    mask = self.build_attention_mask(embeds, lambda batch, head, query, key: live[batch, key], cache)
                hidden = self.run_language_model(embeds, cache.next_position, mask, cache)
                logits = self.next_token_logits(hidden, logits_to_keep or 1)
            cache.next_position = cache.next_position + 1
            cache.entries = [n + 1 for n in cache.entries]
            cache.open_length = [n + 1 for n in cache.open_length]
        cache.recent = torch.cat([cache.recent[:, 1:], token], 1)
        return CausalLMOutputWithPast(logits=logits, **{CACHE_KWARG: cache})

    def close_chunks(self, cache: VIST2Cache, token):
        """Some rows' open chunks hold L tokens: one tower pass over their sketches, one language-model pass over the
        sketches (in their chunks' places) and the new token, one compaction that cuts the chunks' text."""
        L, m = self.config.chunk_size, self.config.visual_tokens_per_chunk
        batch, device = token.shape[0], token.device
        if cache.processor is None:
            cache.processor = self.own_processor()
        closing, ended = [length == L for length in cache.open_length], [False] * batch
        if cache.stop is not None and cache.sequences is not None:  # rows that wrote eos: they are fed padding since
            eos, start = cache.stop
            ended = torch.isin(cache.sequences[:, start:-1], eos.to(device)).any(1).tolist()
        rows = [b for b in range(batch) if closing[b] and not ended[b]]
        images, reports = cache.processor.sketch_chunks(cache.recent[rows].tolist())
        cache.reports += reports
        drawn = dict(zip(rows, images))
        sketched = [drawn.get(b) is not None for b in range(batch)]
        dropped = [c and e for c, e in zip(closing, ended)]  # an ended row's chunk: cut, not drawn
        cut = [s or d for s, d in zip(sketched, dropped)]
        if any(dropped):
            cache.not_continuable = ("rows of this cache ended (eos) before others, and the chunks they went on filling "
                                     "with padding were cut from it, so it does not hold their sequences")
        is_sketched, is_cut = torch.tensor(sketched, device=device), torch.tensor(cut, device=device)
        slots = m if any(sketched) else 0
        # The step's entries: what `VIST2Processor.chunk_layout` adds for a closing chunk whose text is already cached
        # (its m placeholders if sketched; unused slots in other rows), then the token, which opens the next chunk in
        # closing rows. Built on the device, as the hot path needs; kinds and positions come from the same rule.
        slot_ids = torch.where(is_sketched, self.config.sketch_token_id, 0)[:, None].expand(batch, slots)
        ids = torch.cat([slot_ids, token], 1)
        live = torch.cat([is_sketched[:, None].expand(batch, slots), torch.ones_like(token, dtype=torch.bool)], 1)
        kinds = token_kinds(ids, live, self.config.sketch_token_id)
        next_chunk = cache.open_chunk + torch.tensor(closing, device=device)
        chunk_ids = torch.cat([cache.open_chunk[:, None].expand(batch, slots), next_chunk[:, None]], 1)
        positions = layout_position_ids(kinds, chunk_ids, memory_flags(kinds, chunk_ids))
        positions = positions + cache.next_position - L * is_sketched[:, None]  # a sketch takes its chunk's place
        # A sketched chunk's text, the row's last L entries, is dead from this step on.
        cached = cache.get_seq_length()
        old = cache.live if cache.live is not None else torch.ones(batch, cached, dtype=torch.bool, device=device)
        cache.live = torch.cat([old[:, : cached - L], old[:, cached - L :] & ~is_cut[:, None], live], 1)
        sketches = [image for image in images if image is not None]
        pixels = cache.processor.pixel_values(sketches).to(device) if slots else None
        embeds = self.embed(ids, kinds, pixels)
        hidden = self.run_after_cache(cache, embeds, kinds, chunk_ids, positions, cache.live)
        cache.entries = [n + 1 + m * s - L * c for n, s, c in zip(cache.entries, sketched, cut)]
        cache.open_length = [1 if c else n + 1 for n, c in zip(cache.open_length, closing)]
        cache.open_chunk = next_chunk
        if any(cut):
            cache.compact()
        elif min(cache.entries) == max(cache.entries) == cache.live.shape[1]:
            cache.live = None
        return hidden

    def run_after_cache(self, cache: VIST2Cache, embeds, kinds, chunk_ids, positions, live=None):
        """Run entries after all `cache` holds: each sees its live entries and new ones up to its reach."""
        cached = cache.get_seq_length()
        reach = sketch_reach(kinds, chunk_ids) + cached
        mask = self.build_attention_mask(embeds, generation_mask_function(reach, live, cached), cache)
        hidden = self.run_language_model(embeds, positions, mask, cache)
        cache.next_position = positions[:, -1:] + 1
        return hidden

    def extend_cache(self, cache: VIST2Cache, processor, chunks):
        """Append `[(chunk index, token ids, sketch or None)]` by the layout rule to `read`'s one-row cache."""
        ids, chunk_ids = [], []
        for index, token_ids, sketch in chunks:
            entries = processor.chunk_layout(index, token_ids, sketch is not None)
            ids, chunk_ids = ids + entries[0], chunk_ids + entries[1]
        sketches = [sketch for _, _, sketch in chunks if sketch is not None]
        device = cache.next_position.device
        pixel_values = processor.pixel_values(sketches).to(device) if sketches else None
        input_ids, chunk_ids = torch.tensor([ids], device=device), torch.tensor([chunk_ids], device=device)
        kinds = token_kinds(input_ids, None, self.config.sketch_token_id)
        chunk_ids = chunk_ids - chunk_ids[:, :1]  # the rule compares these entries' chunks only with each other
        length, keys = input_ids.shape[1], cache.get_seq_length() + input_ids.shape[1]
        positions = layout_position_ids(kinds, chunk_ids, memory_flags(kinds, chunk_ids)) + cache.next_position
        _, sketches_per_pass = self.prefill_passes(cache.prefill_chunk_size, keys, input_ids.device)
        embeds = self.embed(input_ids, kinds, pixel_values, sketches_per_pass)
        hidden = self.run_after_cache(cache, embeds, kinds, chunk_ids, positions)
        cache.entries = [cache.entries[0] + length]
        return hidden

    # -- transformers plumbing ----------------------------------------------------------------------------------------
    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)


__all__ = ["VIST2PreTrainedModel", "VIST2Model", "VIST2ForCausalLM", "VIST2Cache", "VIST2ModalAligner"]

VIST2Model.register_for_auto_class("AutoModel")
VIST2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
