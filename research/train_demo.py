"""Train the small demo VIST2 (and its same-size text-only control) from scratch on CPU, reproducibly.

    bash demo/reproduce.sh demo     # the committed checkpoint: the stages below, the control and the evaluation

The committed recipe (demo/NOTES.md, "Seventh attempt" to "Thirteenth attempt"; demo/reproduce.sh runs it) has these
stages and a control, all but the first with `--tokenizer tokenization/byte_tokenizer` (one token per byte):
1. `--encoder-steps N`: the vision tower + aligner alone, from scratch, on the per-visual-token glyph-cell loss
   (no LM), with the aligner initialised in tanh's linear range (`--aligner-init-std`), its own smaller lr
   (`--aligner-lr`) and the glyph head's bias at the class prior (`--head-prior-init`). Without these three the
   aligner saturates and the visual tokens lose the characters.
2. `--readback-only --data chars --init DIR --freeze vision+aligner`: that encoder frozen, a fresh LM reads back
   chunks of random characters, text it cannot guess; with one token per byte this is the corpus task minus the
   language prior, so the reading it learns transfers.
3. `--init DIR --freeze vision+aligner --mix-chars 0.5`: the LM trained on `c_1 V_1 c_2` windows, half of each
   batch still random-character read-back rows; then the same without those rows.
4. `--init DIR --freeze none --mix-chars 0.5`: the encoder trained along at a small lr; then with
   `--chars-newlines P`, the random rows laid over several lines; then with `--chars-layout corpus`, over the lines
   and indentation of real chunks.
5. `--newline-glyph «`: from then on a sketch draws each newline as `«` in line (`VIST2Config.newline_glyph`), so a
   byte's cell is its place in the chunk and the reader no longer has to find the next line; then with
   `--chars-layout corpus+eos --mix-chars 0.25`, random rows that keep document separators, a quarter of the batch,
   then an eighth.
6. `--separator-glyph ©`: the document separator drawn in one cell (`VIST2Config.special_token_glyphs`) instead of
   its 13-character name, which pushed every later byte of its chunk along; with a `--seed` of its own, so that it
   trains on other windows than the stage it goes on from.
7. `--readback-noise P`: a twentieth, then a fiftieth, of the read-back input bytes replaced by random characters
   (labels unchanged), so that greedy read-back reads the next cell after a wrong byte instead of the language prior.
   Tried and not kept (demo/NOTES.md, "Eleventh attempt"): `--lm-rows F`, corpus rows with read-back off;
   `--boundary-weight W`, an extra loss on the first bytes of the open chunk.
8. `--overlap-rows 0.25`: a quarter of the corpus windows with c_2 starting up to `--max-overlap` bytes before the
   end of c_1, so that c_2 begins by reading the last cells of V_1. Tried and not kept (demo/NOTES.md, "Twelfth
   attempt"): `--tail-weight W` (`TailHeads`), heads that name the last bytes of the sketch from a chunk's first ones.
9. `--read-back-positions before_next_chunk` (`VIST2Config.read_back_positions`, saved with the checkpoint): a chunk
   read back from its sketch ends right before the next chunk's first place instead of sharing that chunk's places,
   so read-back no longer teaches the open chunk's first bytes to read the sketch's first cells (demo/NOTES.md,
   "Thirteenth attempt"). Tried and not kept: more and longer overlap windows.
10. `--text-only [--init DIR]`: the control, with the tokenizer, seed, LM steps, batch and schedule of each reader
   stage.
`--chunk-sampling any` draws chunks and windows at any token offset of the training stream instead of fixed windows.
With no stage flags the script runs the first attempt's joint recipe (demo/training_log.first-attempt.jsonl): 450 steps
of batch 8, the first 150 training only the vision tower + aligner on the glyph-cell loss (the text-only control gets
the same 300 LM steps). `--readback-only` is the second attempt's.

Common to the recipes (demo/NOTES.md has the measurements):
- Corpus: CPython standard-library docstrings (`tokenization/build_corpus.py`, PSF-2.0), built offline; the
  held-out documents (`split_documents`, 2 %) are never trained on. Tokenizer: `--tokenizer` (default
  `tokenization/demo_tokenizer`, 4 096 byte-level BPE tokens).
- Geometry: L = 32 tokens, r = 4 -> m = 8 visual tokens. Sketch 128 x 256 px of 8 x 16 px glyph cells
  (8 rows x 32 columns = 256 cells for ~117 characters of the demo tokenizer, 32 of the byte tokenizer), 16 px
  patches (each patch = exactly 2 cells, aligned), 4 x 4 merge -> 2 x 4 = 8 visual tokens. Tiny SigLIP (hidden 128,
  3 layers) + Qwen3 (hidden 256, 4 layers).
- Sample: a window of two chunks (`--window-chunks K`: K) laid out `c_1 V_1 c_2` with read-back on: c_1 learns to
  *read* its own sketch (reconstruction), c_2 sees V_1 only (optical language modelling; the open chunk has no
  sketch of its own, so read-back does not change what c_2 sees).
- Auxiliary loss (training only, not saved): the renderer knows which character sits in each glyph cell, so
  (1) a linear head on every vision patch classifies its 2 cells, and (2) a linear head on every aligned visual
  token (the input the LM gets) classifies its 32 cells. Loss = LM loss + aux_weight * (patch CE + token CE).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config  # noqa: E402

from vist2 import VIST2Config, VIST2ForCausalLM, VIST2Processor  # noqa: E402
from vist2.processing_vist2 import wrap_into_lines  # noqa: E402

CHUNK = 32
NUM_CLASSES = 96  # 0 = blank / whitespace, 1..94 = printable ASCII 33..126, 95 = any other drawable character


def load_build_corpus():
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "tokenization" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_config(tokenizer, newline_glyph=None, separator_glyph=None) -> VIST2Config:
    """The demo geometry; `separator_glyph` draws the document separator (the tokenizer's eos token) as one cell."""
    text = dict(model_type="qwen3", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                  num_attention_heads=4, patch_size=16, image_size=128, num_channels=1, vision_use_head=False)
    return VIST2Config(text_config=text, vision_config=vision, chunk_size=CHUNK, compression_ratio=4, merge_size=4,
                       image_height=128, image_width=256, char_width=8, line_height=16, font_size=16,
                       min_font_size=8, num_channels=1, sketch_token_id=tokenizer.convert_tokens_to_ids("<|sketch|>"),
                       newline_glyph=newline_glyph, tie_word_embeddings=True,
                       special_token_glyphs={tokenizer.eos_token: separator_glyph} if separator_glyph else None)


def load_encoder(model, folder):
    """Vision tower + aligner weights of `folder` (an encoder stage's save); the language model stays as it is."""
    state = {k: v for k, v in load_file(str(Path(folder) / "model.safetensors")).items()
             if k.startswith(("vision_tower.", "aligner."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not any(k.startswith(("vision_tower.", "aligner.")) for k in missing)


def text_only_model(config: VIST2Config):
    return AutoModelForCausalLM.from_config(Qwen3Config(**config.text_config.to_dict()))


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def token_stream(docs, tokenizer) -> list[int]:
    ids = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def corpus_windows(tokenizer, split: str, window_chunks: int = 2, cache_dir: Path | None = None) -> np.ndarray:
    """Non-overlapping windows of `window_chunks * CHUNK` tokens from the train or held-out documents."""
    cache_dir = cache_dir or Path(os.environ.get("VIST2_DEMO_CACHE", Path.home() / ".cache" / "vist2_demo"))
    # Keyed by the tokenizer: the same corpus tokenised by another vocabulary is another stream.
    fingerprint = hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12]
    cache = cache_dir / f"{split}_tokens.{fingerprint}.npy"
    if cache.exists():
        ids = np.load(cache)
    else:
        bc = load_build_corpus()
        train, heldout = bc.split_documents(bc.build_corpus())
        ids = np.array(token_stream(train if split == "train" else heldout, tokenizer), dtype=np.int32)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, ids)
    size = window_chunks * CHUNK
    return ids[: len(ids) // size * size].reshape(-1, size)


def char_class(char: str) -> int:
    if char.isspace():
        return 0
    code = ord(char)
    return code - 32 if 33 <= code <= 126 else NUM_CLASSES - 1


def cell_targets(text: str, settings: dict) -> np.ndarray:
    """Which character the renderer puts in each glyph cell: `(rows, columns)` class ids (0 = blank)."""
    margin = settings["margin"]
    columns = (settings["image_width"] - 2 * margin) // settings["char_width"]
    rows = (settings["image_height"] - 2 * margin) // settings["line_height"]
    grid = np.zeros((rows, columns), dtype=np.int64)
    lines, _ = wrap_into_lines(text, columns, settings.get("newline_glyph"))
    for r, line in enumerate(lines[:rows]):
        grid[r, : len(line)] = [char_class(c) for c in line]
    return grid


def grid_to_units(grid: np.ndarray, config: VIST2Config, unit_px: int) -> np.ndarray:
    """Regroup a cell grid into square units of `unit_px` pixels (a patch, or an s x s merged token), row-major."""
    cell_rows, cell_cols = unit_px // config.line_height, unit_px // config.char_width
    rows, cols = grid.shape
    g = grid.reshape(rows // cell_rows, cell_rows, cols // cell_cols, cell_cols).transpose(0, 2, 1, 3)
    return g.reshape(-1, cell_rows * cell_cols)


def make_sample(processor, window, config, trainable=None):
    """`c_1 V_1 c_2 ... V_{K-1} c_K` layout of a window of K chunks plus per-cell targets of each sketch; None if a
    closed chunk cannot be sketched.

    `trainable` (one bool per token) as in `encode_sample`: which tokens carry a label."""
    sample = processor.encode_sample([], list(map(int, window)), keep_closed_text=True, trainable=trainable)
    if len(sample["sketches"]) != (len(window) - 1) // CHUNK:
        return None
    texts = [processor.chunk_text(list(map(int, window[i : i + CHUNK]))) for i in range(0, len(window) - CHUNK, CHUNK)]
    grids = [cell_targets(t, processor.sketch_settings) for t in texts]
    sample["patch_targets"] = [grid_to_units(g, config, config.patch_size) for g in grids]
    sample["token_targets"] = [grid_to_units(g, config, config.patch_size * config.merge_size) for g in grids]
    return sample


def make_batch(processor, samples):
    batch = processor.collate(samples, return_labels=True)
    batch = {k: v for k, v in batch.items() if k != "chunks_kept_as_text"}
    patch = torch.from_numpy(np.stack([t for s in samples for t in s["patch_targets"]]))
    token = torch.from_numpy(np.stack([t for s in samples for t in s["token_targets"]]))
    return batch, patch, token


def random_token_pool(tokenizer, data: str) -> list[int]:
    """The ids random text is drawn from: printable tokens, or only single characters when `data == "chars"`."""
    pool = printable_token_ids(tokenizer)
    if data == "chars":
        pool = [i for i in pool if len(tokenizer.decode([i], clean_up_tokenization_spaces=False)) == 1]
    return pool


def chunk_sampler(tokenizer, data: str, pool: list[int], length: int = CHUNK, sampling: str = "first"):
    """`draw(n, rng, split) -> (n, length)` token ids: corpus chunks, or random tokens of `pool` for any other `data`.

    Corpus chunks are the first `length` tokens of a window (of two chunks, or of as many as `length` covers); with
    `sampling="any"` training chunks start at any offset of the training stream (about 60x more distinct chunks).
    Held-out chunks are always window starts, so probes stay the same across runs."""
    window_chunks = max(2, -(-length // CHUNK))
    windows = {split: corpus_windows(tokenizer, split, window_chunks) for split in ("train", "heldout")}
    stream = windows["train"].reshape(-1)

    def draw(n, r, split="train"):
        if data == "corpus" and split == "train" and sampling == "any":
            starts = [r.randrange(len(stream) - length + 1) for _ in range(n)]
            return torch.tensor(np.stack([stream[s : s + length] for s in starts]), dtype=torch.long)
        if data == "corpus":
            src = windows[split]
            return torch.tensor(np.stack([src[r.randrange(len(src))][:length] for _ in range(n)]), dtype=torch.long)
        return torch.tensor([[pool[r.randrange(len(pool))] for _ in range(length)] for _ in range(n)])

    return draw


def with_random_newlines(ids: list[int], newline_id: int, probability: float, rng: random.Random) -> list[int]:
    """Random characters laid out over several lines: each becomes a newline with `probability`, so a reader trained on
    them must find where each line starts in the sketch, as in corpus text (demo/NOTES.md, "Eighth attempt")."""
    if not probability:  # draws nothing from rng, so runs without newlines replay as before
        return ids
    return [newline_id if rng.random() < probability else i for i in ids]


def layout_token_ids(tokenizer, separators: bool) -> set[int]:
    """The tokens `with_corpus_layout` keeps in place: spaces, tabs and newlines, and with `separators` the document
    separator too ("<|endoftext|>" is one token but 13 cells: it moves every later byte of the sketch)."""
    whitespace = {i for i in range(len(tokenizer)) if tokenizer.decode([i]) in (" ", "\n", "\t")}
    return whitespace | ({tokenizer.eos_token_id} if separators else set())


def with_corpus_layout(template: list[int], keep: set[int], pool: list[int], rng: random.Random) -> list[int]:
    """A corpus chunk with every token outside `keep` (its whitespace) replaced by a random one of `pool`: the lines,
    indentation and blank lines of real text, characters no prior can guess (demo/NOTES.md, "Ninth attempt")."""
    return [i if i in keep else pool[rng.randrange(len(pool))] for i in template]


def with_overlap(window, overlap: int):
    """A two-chunk window whose second chunk starts `overlap` tokens before the end of the first: c_2 begins by
    writing out the last cells of V_1, then goes on. The bytes that finish a word broken off at a chunk boundary must
    be read from the end of the previous sketch, and reading had only ever started at a sketch's first cell
    (demo/NOTES.md, "Twelfth attempt")."""
    return np.concatenate([window[:CHUNK], window[CHUNK - overlap : 2 * CHUNK - overlap]])


def open_chunk_ids(chunk_ids: torch.Tensor) -> torch.Tensor:
    """`(batch, 1)`: each row's open chunk, the last one, which has no sketch (its highest chunk id)."""
    return chunk_ids.max(dim=1, keepdim=True).values


def with_readback_noise(batch, read_back: torch.Tensor, sketch_token_id: int, pool: list[int], probability: float,
                        generator: torch.Generator) -> torch.Tensor:
    """`batch["input_ids"]` with each text token of a closed chunk of a `read_back` row (one read back from its sketch)
    replaced, with `probability`, by a random one of `pool`; the labels keep the true text, and the open chunk, which
    has no sketch to read, stays as it is, as do rows without read-back, whose text is language-modelled.

    Greedy read-back feeds the reader its own last token, and one wrong byte made it follow the language prior instead
    of the sketch (demo/NOTES.md, "Eleventh attempt"); these rows teach it to read the next cell whatever it wrote
    before: scheduled sampling without the extra forward pass."""
    ids, chunk_ids = batch["input_ids"], batch["chunk_ids"]
    closed_chunk = (chunk_ids >= 1) & (chunk_ids < open_chunk_ids(chunk_ids))
    read_back_text = closed_chunk & read_back[:, None] & (ids != sketch_token_id) & (batch["attention_mask"] == 1)
    noisy = read_back_text & (torch.rand(ids.shape, generator=generator) < probability)
    random_ids = torch.tensor(pool)[torch.randint(len(pool), ids.shape, generator=generator)]
    return torch.where(noisy, random_ids, ids)


def read_back_rows(batch_size: int, chars_rows: int, lm_fraction: float) -> torch.Tensor:
    """Which rows of a batch (corpus windows first, then `chars_rows` random-character rows) read their closed chunks
    back from their sketches: all but the first `lm_fraction` of the corpus rows, which run as generation does, c_1
    language-modelled from nothing, so that they give the LM as many targets as a text-only row."""
    return torch.arange(batch_size) >= round(lm_fraction * (batch_size - chars_rows))


def boundary_loss(logits, labels, chunk_ids, first_bytes: int) -> torch.Tensor:
    """Next-token loss on bytes 2 to `first_bytes + 1` of each row's open chunk: the bytes that finish the word the
    previous chunk broke off, which only the end of that chunk's sketch can tell (its text is gone). The text-only
    control predicts them from the text at 3.8 perplexity, VIST2 from the sketch at 9.8, where most of its gap was
    (demo/NOTES.md, "Eleventh attempt"). Byte 1 is predicted before the previous chunk is closed, from its text."""
    open_chunk = chunk_ids == open_chunk_ids(chunk_ids)
    index_in_chunk = open_chunk.long().cumsum(dim=1) - 1
    target = open_chunk & (index_in_chunk >= 1) & (index_in_chunk <= first_bytes) & (labels != -100)
    predicted_at = target[:, 1:]  # the token before a target is in the open chunk too: the target is not its first
    if not predicted_at.any():
        return logits.new_zeros(())
    return F.cross_entropy(logits[:, :-1][predicted_at].float(), labels[:, 1:][predicted_at])


class TailHeads(nn.Module):
    """Training only: from the LM's hidden state at each of the first `positions` bytes of a chunk that sees a
    sketch, a linear head names each of the last `tail` bytes of the latest sketch it sees.

    The bytes that finish the word the previous chunk broke off can only come from the end of its sketch, and the
    LM loss alone did not teach VIST2 to look there (demo/NOTES.md, "Twelfth attempt"). The target is the same in both
    visibilities: a chunk read back from its own sketch names that sketch's last bytes, an open chunk those of the
    chunk before it, so unlike `boundary_loss` it does not pull read-back and continuation apart. It did not help: the
    hidden states it shapes are the ones the next byte is predicted from, and every perplexity band got worse."""

    def __init__(self, hidden_size: int, vocab_size: int, tail: int, positions: int):
        super().__init__()
        self.tail, self.positions, self.vocab = tail, positions, vocab_size
        self.proj = nn.Linear(hidden_size, tail * vocab_size)

    def targets(self, ids, chunk_ids, read_back, sketch_token_id):
        """`(rows, columns, tails)`: where the heads read and the bytes they name (the true text, not a noisy input)."""
        rows, columns, tails = [], [], []
        for b in range(ids.shape[0]):
            text, sketch = {}, set()
            for column, (token, chunk) in enumerate(zip(ids[b].tolist(), chunk_ids[b].tolist())):
                if chunk >= 1 and token == sketch_token_id:
                    sketch.add(chunk)
                elif chunk >= 1:
                    text.setdefault(chunk, []).append(column)
            for chunk, columns_of_chunk in text.items():
                source = chunk if read_back[b] and chunk in sketch else chunk - 1
                if source not in sketch or len(text[source]) < self.tail:
                    continue
                tail = ids[b, text[source][-self.tail:]].tolist()
                for column in columns_of_chunk[: self.positions]:
                    rows.append(b), columns.append(column), tails.append(tail)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(columns, dtype=torch.long), torch.tensor(tails)

    def loss(self, hidden, targets):
        rows, columns, tails = targets
        if not len(rows):
            return hidden.new_zeros(())
        logits = self.proj(hidden[rows, columns].float()).view(-1, self.tail, self.vocab)
        return F.cross_entropy(logits.reshape(-1, self.vocab), tails.reshape(-1))


# ---------------------------------------------------------------------------------------------------------------------
# Auxiliary glyph-cell heads (training only)
# ---------------------------------------------------------------------------------------------------------------------


class GlyphHeads(nn.Module):
    """Linear per-cell character classifiers on vision patches and on aligned visual tokens."""

    def __init__(self, config: VIST2Config):
        super().__init__()
        p, s = config.patch_size, config.merge_size
        self.cells_per_patch = (p // config.line_height) * (p // config.char_width)
        self.cells_per_token = self.cells_per_patch * s * s
        self.patch = nn.Linear(config.vision_config.hidden_size, self.cells_per_patch * NUM_CLASSES)
        self.token = nn.Linear(config.text_config.hidden_size, self.cells_per_token * NUM_CLASSES)

    def losses(self, patches, tokens, patch_targets, token_targets):
        out = {}
        for name, feats, head, targets in (("patch", patches, self.patch, patch_targets),
                                           ("token", tokens, self.token, token_targets)):
            loss, ink_acc, acc = cell_scores(head(feats), targets)
            out[f"{name}_loss"], out[f"{name}_acc"], out[f"{name}_ink_acc"] = loss, acc, ink_acc
        return out


def cell_scores(logits, targets):
    """Cross-entropy of per-cell character logits `(*targets.shape x NUM_CLASSES)`, their accuracy on ink (non-blank)
    cells and on all cells: `(loss, ink_acc, acc)`."""
    logits = logits.reshape(*targets.shape, NUM_CLASSES)
    loss = F.cross_entropy(logits.reshape(-1, NUM_CLASSES), targets.reshape(-1))
    hit, ink = logits.argmax(-1) == targets, targets != 0
    return loss, (hit & ink).sum().item() / max(int(ink.sum()), 1), hit.float().mean().item()


class TextTokenHead(nn.Module):
    """Visual token j classifies the r text tokens it stands for, t_{jr} ... t_{jr+r-1} (training only): the BPE
    assembly that the LM otherwise has to learn from glyph cells is pushed into the vision tower."""

    def __init__(self, config: VIST2Config):
        super().__init__()
        self.r, self.vocab = config.compression_ratio, config.text_config.vocab_size
        self.proj = nn.Linear(config.text_config.hidden_size, self.r * self.vocab)

    def scores(self, tokens, ids):
        """`(loss, accuracy)` of visual tokens `(n, m, d)` against the chunk's text tokens `(n, m * r)`."""
        logits = self.proj(tokens).reshape(ids.shape[0], -1, self.vocab)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab), ids.reshape(-1))
        return loss, (logits.argmax(-1) == ids).float().mean().item()


class Capture:
    """Forward hooks that keep the vision tower's patches and the aligner's output of the last forward."""

    def __init__(self, model):
        self.patches = self.tokens = None
        model.vision_tower.register_forward_hook(self._vision)
        model.aligner.register_forward_hook(self._aligner)

    def _vision(self, module, args, output):
        self.patches = output.last_hidden_state

    def _aligner(self, module, args, output):
        self.tokens = output


# ---------------------------------------------------------------------------------------------------------------------
# Encoder stage: vision tower + aligner on the glyph-cell loss, no LM (demo/NOTES.md, "Fourth attempt")
# ---------------------------------------------------------------------------------------------------------------------


def sketchable_items(processor, config, draw, n, r, split="train") -> list:
    """n read-back items `(ids, sketch, cell targets)` of freshly drawn chunks, skipping chunks kept as text."""
    items = []
    while len(items) < n:
        item = readback_item(processor, config, draw(1, r, split)[0].tolist())
        if item is not None:
            items.append(item)
    return items


def train_encoder(args, model, heads, processor, config, draw, rng, log_path, save=None):
    """Vision tower + aligner + token glyph head trained jointly on the token-level cell loss (no LM).

    Every step renders a fresh batch of sketches (rendering is under 3 % of a step). Every --eval-every steps it logs
    the held-out per-character accuracy of the visual tokens (ink cells of 64 fixed probe sketches), all-cell accuracy,
    the visual tokens' mean norm and their fraction of saturated tanh units (|tanh| > 0.99).
    """
    vision, aligner = model.vision_tower.train(), model.aligner

    def sketches(n, r, split="train"):
        items = sketchable_items(processor, config, draw, n, r, split)
        return (processor.pixel_values([it[1] for it in items]), torch.from_numpy(np.stack([it[2] for it in items])),
                torch.tensor([it[0] for it in items]))

    def tokens(pixels):
        return aligner(vision(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state)

    def scores(tok, targets):
        return cell_scores(heads.token(tok), targets)

    probe_pixels, probe_targets, probe_ids = sketches(64, random.Random(12345), "heldout")
    text_head = TextTokenHead(config) if args.text_token_weight else None
    saved_heads = Path(args.init) / "glyph_heads.pt" if args.init else None
    if saved_heads and saved_heads.exists():  # continuing an earlier encoder stage (e.g. random characters, then corpus text)
        heads.load_state_dict(torch.load(saved_heads))
        print(f"glyph heads from {saved_heads}", flush=True)
    if args.aligner_init_std:  # W ~ N(0, 1), b = 0, then W scaled so that std(W x + b) = the target on a batch
        pre = []
        hook = aligner.proj.register_forward_hook(lambda module, inputs, output: pre.append(output))
        with torch.no_grad():
            nn.init.normal_(aligner.proj.weight)
            nn.init.zeros_(aligner.proj.bias)
            tokens(sketches(32, random.Random(args.seed + 2))[0])
            aligner.proj.weight.mul_(args.aligner_init_std / pre[0].std())
        hook.remove()
    if args.head_prior_init:  # token-head bias = log class frequencies: "blank" (~90 % of the cells) needs no push
        with torch.no_grad():
            counts = torch.bincount(sketches(256, random.Random(args.seed + 3))[1].flatten(), minlength=NUM_CLASSES)
            prior = torch.log((counts.float() + 1) / (counts.sum() + NUM_CLASSES))
            heads.token.bias.copy_(prior.repeat(heads.cells_per_token))
    head_params = list(heads.token.parameters()) + (list(text_head.parameters()) if text_head else [])
    params = list(vision.parameters()) + list(aligner.parameters()) + head_params
    for p in params:
        p.requires_grad_(True)
    # The aligner gets its own (smaller) lr: with 2 048 inputs of rms ~1, one Adam step of size lr moves a
    # pre-activation by up to ~1 400 lr, so lr 2e-3 saturates a small-initialised tanh within a few steps.
    groups = [{"params": list(vision.parameters()) + head_params, "peak": args.lr},
              {"params": list(aligner.parameters()), "peak": args.aligner_lr or args.lr}]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    log.write(json.dumps({"args": vars(args), "stage": "encoder", "trainable": sum(p.numel() for p in params)}) + "\n")
    start = time.time()
    for step in range(args.encoder_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.encoder_steps, group["peak"], args.warmup)
        pixels, targets, ids = sketches(args.encoder_batch, rng)
        tok = tokens(pixels)
        loss, train_acc, _ = scores(tok, targets)
        if text_head:
            text_loss, text_acc = text_head.scores(tok, ids)
            loss = loss + args.text_token_weight * text_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        out_of_time = args.max_minutes and time.time() - start > 60 * args.max_minutes
        last = step == args.encoder_steps - 1 or step + 1 == args.encoder_stop_step or out_of_time
        if step % args.eval_every == 0 or last:
            vision.eval()
            with torch.no_grad():
                tok = tokens(probe_pixels)
                _, held, held_all = scores(tok, probe_targets)
                text = {"train_text_token_acc": round(text_acc, 4),
                        "heldout_text_token_acc": round(text_head.scores(tok, probe_ids)[1], 4)} if text_head else {}
            vision.train()
            record = {"encoder_step": step, "elapsed_s": round(time.time() - start, 1), "loss": round(loss.item(), 4),
                      "train_char_acc": round(train_acc, 4), "heldout_char_acc": round(held, 4), **text,
                      "heldout_cell_acc": round(held_all, 4), "token_norm": round(tok.norm(dim=-1).mean().item(), 2),
                      "saturated": round((tok.abs() > 0.99).float().mean().item(), 4)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)
            last = last or held >= args.encoder_target
        if last:
            break
    if save:
        model.eval().save_pretrained(save)
        processor.save_pretrained(save)
        torch.save(heads.state_dict(), Path(save) / "glyph_heads.pt")
        if text_head:
            torch.save(text_head.state_dict(), Path(save) / "text_token_head.pt")
        print(f"saved to {save}", flush=True)


def encoder_stage(args):
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model = VIST2ForCausalLM(demo_config(tokenizer, args.newline_glyph, args.separator_glyph))
    if args.init:
        load_encoder(model, args.init)
    processor = VIST2Processor.from_config(model.config, tokenizer)
    draw = chunk_sampler(tokenizer, args.data, random_token_pool(tokenizer, args.data), sampling=args.chunk_sampling)
    out = Path(args.out)
    log_path = Path(args.log) if args.log else out.parent / f"training_log.{out.name}.jsonl"
    train_encoder(args, model, GlyphHeads(model.config), processor, model.config, draw, random.Random(args.seed),
                  log_path, out)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def add_encoder_stage_arguments(parser):
    """The encoder stage's options (demo/NOTES.md, "Fourth attempt"), shared with examples/readback_oracle.py."""
    parser.add_argument("--encoder-steps", type=int, default=0,
                        help="train only the vision tower + aligner + token glyph head on the glyph-cell loss (no LM) "
                             "with this many steps' schedule, save, exit")
    parser.add_argument("--encoder-stop-step", type=int, default=0,
                        help="encoder stage: stop after this many steps of the --encoder-steps schedule (a run that "
                             "--max-minutes cut short, replayed exactly)")
    parser.add_argument("--encoder-batch", type=int, default=32, help="encoder stage: sketches per step")
    parser.add_argument("--encoder-target", type=float, default=1.0,
                        help="encoder stage: stop once held-out per-character accuracy reaches this")
    parser.add_argument("--aligner-init-std", type=float, default=0,
                        help="encoder stage: re-initialise the aligner so that its pre-activation std on a batch of "
                             "sketches is this (0.3: tanh starts in its linear range); 0 = keep the aligner")
    parser.add_argument("--text-token-weight", type=float, default=0,
                        help="encoder stage: weight of a second loss, each visual token classifying the r text tokens "
                             "it stands for (TextTokenHead); 0 = glyph cells only")
    parser.add_argument("--head-prior-init", action="store_true",
                        help="encoder stage: start the token glyph head's bias at the log class frequencies")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo/vist2-demo")
    parser.add_argument("--text-only", action="store_true", help="train the same-size text-only control instead")
    parser.add_argument("--tokenizer", default=str(REPO / "tokenization" / "demo_tokenizer"),
                        help="tokenizer folder; its vocabulary sets the LM's (tokenization/byte_tokenizer: one byte per "
                             "token, demo/NOTES.md \"Seventh attempt\")")
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--aux-weight", type=float, default=1.0, help="0 disables the glyph-cell heads")
    parser.add_argument("--lm-weight", type=float, default=1.0)
    parser.add_argument("--aux-only-steps", type=int, default=150,
                        help="first steps train only the vision tower + aligner on the glyph-cell loss")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the windows drawn: give a stage that goes on from another (--init) its own seed, "
                             "or it trains on the very windows, in the same order, that the earlier stage did")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", default=None, help="JSON-lines log (default: <out>/../training_log.<name>.jsonl)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--probe", action="store_true", help="print geometry / overflow / step time and exit")
    # Read-back-only warm-up from a trained checkpoint (demo/NOTES.md, "Second attempt"). Off by default.
    parser.add_argument("--init", default=None, help="start from this checkpoint (e.g. demo/vist2-demo)")
    parser.add_argument("--readback-only", action="store_true", help="train on `c_1 V_1` read-back samples only")
    parser.add_argument("--data", choices=["corpus", "random", "chars", "mix"], default="corpus",
                        help="read-back text: corpus chunks, random printable-ASCII tokens, random single-character tokens "
                             "(one line of 32 cells), or half corpus / half random tokens")
    parser.add_argument("--freeze", choices=["none", "vision", "vision+aligner"], default="none")
    parser.add_argument("--merge-size", type=int, default=None, help="override merge (new aligner if it changes)")
    parser.add_argument("--init-encoder", default=None,
                        help="take the vision tower + aligner from this folder (an encoder stage's output); LM fresh")
    parser.add_argument("--eval-every", type=int, default=25, help="teacher-forced probe, right vs wrong sketch")
    add_encoder_stage_arguments(parser)
    parser.add_argument("--aligner-lr", type=float, default=None, help="encoder stage: the aligner's lr (default --lr)")
    parser.add_argument("--max-minutes", type=float, default=0, help="encoder stage: stop after this wall time")
    parser.add_argument("--chunk-sampling", choices=["first", "any"], default="first",
                        help="corpus: train on the windows (encoder stage: their first chunks; 6 222 distinct) or on "
                             "chunks / windows at any token offset of the training stream")
    parser.add_argument("--window-chunks", type=int, default=2,
                        help="reader and text-only stages: train on windows `c_1 V_1 ... c_K` of K chunks, so that "
                             "positions and sketch counts of longer contexts are seen (the recipe uses 2)")
    parser.add_argument("--mix-chars", type=float, default=0,
                        help="reader stage: this fraction of each batch are read-back rows of random single characters")
    parser.add_argument("--chars-newlines", type=float, default=0,
                        help="reader stage: each character of a --mix-chars row is a newline with this probability")
    parser.add_argument("--chars-layout", choices=["uniform", "corpus", "corpus+eos"], default="uniform",
                        help="reader stage: --mix-chars rows are uniform random characters, or a training chunk's "
                             "whitespace (corpus+eos: and its document separators) with random characters in between "
                             "(with_corpus_layout)")
    parser.add_argument("--readback-noise", type=float, default=0,
                        help="reader stage: replace this fraction of the read-back chunks' input tokens by random "
                             "characters, labels unchanged (with_readback_noise)")
    parser.add_argument("--lm-rows", type=float, default=0,
                        help="reader stage: this fraction of the corpus rows run with read-back off, as generation "
                             "does: c_1 is language-modelled from nothing instead of read from V_1 (read_back_rows)")
    parser.add_argument("--boundary-weight", type=float, default=0,
                        help="reader stage: add this weight times boundary_loss, the loss on the open chunk's bytes "
                             "2 to --boundary-bytes + 1")
    parser.add_argument("--boundary-bytes", type=int, default=4, help="reader stage: see --boundary-weight")
    parser.add_argument("--overlap-rows", type=float, default=0,
                        help="reader stage: this fraction of the corpus windows drawn with_overlap, c_2 starting 1 to "
                             "--max-overlap tokens before the end of c_1")
    parser.add_argument("--max-overlap", type=int, default=8, help="reader stage: see --overlap-rows")
    parser.add_argument("--tail-weight", type=float, default=0,
                        help="reader stage: add this weight times TailHeads' loss, the last --tail-bytes bytes of the "
                             "latest sketch named from the first --tail-positions bytes of each chunk that sees it")
    parser.add_argument("--tail-bytes", type=int, default=4, help="reader stage: see --tail-weight")
    parser.add_argument("--tail-positions", type=int, default=4, help="reader stage: see --tail-weight")
    parser.add_argument("--tail-layer", type=int, default=2,
                        help="reader stage: the decoder layer (1-based) whose output the tail heads read")
    parser.add_argument("--newline-glyph", default=None,
                        help="sketch each newline as this character in line (VIST2Config.newline_glyph), e.g. '«'; "
                             "every later stage of a recipe must pass the same")
    parser.add_argument("--separator-glyph", default=None,
                        help="sketch the document separator (eos) as this one character (VIST2Config."
                             "special_token_glyphs), e.g. '©'; every later stage of a recipe must pass the same")
    parser.add_argument("--read-back-positions", default="after_sketch", choices=("after_sketch", "before_next_chunk"),
                        help="reader stage: where a chunk read back from its sketch sits (VIST2Config."
                             "read_back_positions); before_next_chunk puts the sketch's last cells right before "
                             "the next chunk; every later stage of a recipe must pass the same")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.readback_only:
        return train_readback(args)
    if args.encoder_steps:
        return encoder_stage(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = demo_config(tokenizer, args.newline_glyph, args.separator_glyph)
    config.read_back_positions = args.read_back_positions
    processor = VIST2Processor.from_config(config, tokenizer)
    windows = corpus_windows(tokenizer, "train")
    out = Path(args.out)
    log_path = Path(args.log) if args.log else out.parent / f"training_log.{out.name}.jsonl"

    if args.probe:
        import warnings

        warnings.simplefilter("ignore")
        picks = [windows[i] for i in rng.sample(range(len(windows)), 400)]
        kept = sum(make_sample(processor, w, config) is not None for w in picks)
        chars = [len(processor.chunk_text(list(map(int, w[:CHUNK])))) for w in picks]
        print(f"train windows {len(windows)}; sketchable c_1: {kept / len(picks):.3f}; chars/chunk mean "
              f"{np.mean(chars):.1f} p95 {np.percentile(chars, 95):.0f}")
        processor.render(processor.chunk_text(list(map(int, picks[0][:CHUNK])))).save("/tmp/vist2_demo_probe.png")

    if args.text_only:
        model = text_only_model(config)
        if args.init:  # a text-only control trained on, as its VIST2 counterpart is with --init
            model.load_state_dict(load_file(str(Path(args.init) / "model.safetensors")), strict=False)
            model.tie_weights()
        heads = tail_heads = None
    else:
        model = VIST2ForCausalLM(config)
        if args.init:  # a read-back warm-up's output: every weight, the LM included
            model.load_state_dict(load_file(str(Path(args.init) / "model.safetensors")), strict=False)
            model.tie_weights()
        elif args.init_encoder:
            load_encoder(model, args.init_encoder)
        heads = GlyphHeads(config) if args.aux_weight > 0 else None
        capture = Capture(model)
        tail_heads = None
        if args.tail_weight:
            tail_heads = TailHeads(config.text_config.hidden_size, config.text_config.vocab_size, args.tail_bytes,
                                   args.tail_positions)
            layer = model.language_model.get_decoder().layers[args.tail_layer - 1]
            layer.register_forward_hook(lambda module, inputs, output: setattr(
                tail_heads, "hidden", output[0] if isinstance(output, tuple) else output))
    model.train()
    frozen = {"none": [], "vision": ["vision_tower"], "vision+aligner": ["vision_tower", "aligner"]}[args.freeze]
    for name in frozen:
        getattr(model, name).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + (list(heads.parameters()) if heads else [])
    params += list(tail_heads.parameters()) if tail_heads else []
    n_model = sum(p.numel() for p in model.parameters())
    print(f"model parameters: {n_model / 1e6:.2f}M", flush=True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    if not args.probe:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w")
        log.write(json.dumps({"args": vars(args), "parameters": n_model}) + "\n")
    draw_window = chunk_sampler(tokenizer, "corpus", [], args.window_chunks * CHUNK, sampling=args.chunk_sampling)
    pool = random_token_pool(tokenizer, "chars")
    draw_chars = chunk_sampler(tokenizer, "chars", pool)
    chars_rows = 0 if args.text_only else round(args.mix_chars * args.batch_size)
    (newline_id,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    whitespace = layout_token_ids(tokenizer, separators=False)
    layout_keep = layout_token_ids(tokenizer, separators=args.chars_layout == "corpus+eos")

    def draw_chars_row(r):
        if args.chars_layout != "uniform":
            return with_corpus_layout(draw_window(1, r)[0][:CHUNK].tolist(), layout_keep, pool, r)
        return with_random_newlines(draw_chars(1, r)[0].tolist(), newline_id, args.chars_newlines, r)

    noise_generator = torch.Generator().manual_seed(args.seed)
    heldout = [] if args.text_only or args.probe else heldout_readback_items(processor, config, tokenizer, 32)
    probes = None if args.text_only or args.probe else {
        "heldout": heldout,
        "chars": sketchable_items(processor, config, draw_chars, 32, random.Random(12345)),  # chance: 1 %
        # held-out chunks' lines filled with random characters: reading over several lines, without the prior
        "layout": [readback_item(processor, config, with_corpus_layout(item[0], whitespace, pool, random.Random(i)))
                   for i, item in enumerate(heldout)]}
    start = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        samples = []
        while len(samples) < args.batch_size:
            if len(samples) >= args.batch_size - chars_rows:
                # Read-back of text the LM cannot guess: c_1 = random characters, nothing to predict after it.
                chars = draw_chars_row(rng) + [tokenizer.eos_token_id]
                sample = make_sample(processor, chars, config, trainable=[True] * CHUNK + [False])
            else:
                window = draw_window(1, rng)[0].numpy()
                if args.overlap_rows and rng.random() < args.overlap_rows:
                    window = with_overlap(window, rng.randint(1, args.max_overlap))
                if args.text_only:
                    samples.append(window)
                    continue
                sample = make_sample(processor, window, config)
            if sample is not None:
                samples.append(sample)
        stats = {}
        if args.text_only:
            ids = torch.tensor(np.stack(samples), dtype=torch.long)
            loss = model(input_ids=ids, labels=ids).loss
            stats["lm_loss"] = loss.item()
        else:
            batch, patch_t, token_t = make_batch(processor, samples)
            read_back = read_back_rows(len(samples), chars_rows, args.lm_rows)
            true_ids = batch["input_ids"]
            if args.readback_noise:
                batch["input_ids"] = with_readback_noise(batch, read_back, processor.sketch_token_id, pool,
                                                         args.readback_noise, noise_generator)
            aux_only = step < args.aux_only_steps
            if aux_only:
                model.encode_sketches(batch["pixel_values"])
                loss = torch.zeros(())
            else:
                outputs = model(**batch, read_back=read_back)
                loss = args.lm_weight * outputs.loss
                stats["lm_loss"] = outputs.loss.item()
                if args.boundary_weight:
                    boundary = boundary_loss(outputs.logits, batch["labels"], batch["chunk_ids"], args.boundary_bytes)
                    loss = loss + args.boundary_weight * boundary
                    stats["boundary_loss"] = boundary.item()
                if tail_heads is not None:
                    targets = tail_heads.targets(true_ids, batch["chunk_ids"], read_back, processor.sketch_token_id)
                    tail = tail_heads.loss(tail_heads.hidden, targets)
                    loss = loss + args.tail_weight * tail
                    stats["tail_loss"] = tail.item()
            if heads is not None:
                aux = heads.losses(capture.patches, capture.tokens, patch_t, token_t)
                loss = loss + args.aux_weight * (aux.pop("patch_loss") + aux.pop("token_loss"))
                stats.update(aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if args.probe and step == 4:
            print(f"step time {(time.time() - start) / 5:.3f}s", stats)
            return
        if args.probe:
            continue
        if probes and (step % args.eval_every == 0 or step == args.steps - 1) and step >= args.aux_only_steps:
            model.eval()
            for name, items in probes.items():
                stats[f"{name}_tf_acc"], stats[f"{name}_loss"] = teacher_forced_accuracy(model, processor, items)
                stats[f"{name}_tf_acc_wrong"], stats[f"{name}_loss_wrong"] = teacher_forced_accuracy(
                    model, processor, items, wrong=True)
            model.train()
        if step % args.log_every == 0 or step == args.steps - 1:
            record = {"step": step, "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.time() - start, 1),
                      **{k: round(v, 4) for k, v in stats.items()}}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if not args.text_only:
        processor.save_pretrained(out)
    else:
        tokenizer.save_pretrained(out)
    print(f"saved to {out} after {time.time() - start:.0f}s", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Read-back-only training (second attempt): `c_1 V_1` with read-back, optionally on unguessable random tokens
# ---------------------------------------------------------------------------------------------------------------------


def printable_token_ids(tokenizer) -> list[int]:
    """Ids of ordinary tokens that decode to non-empty printable ASCII without newlines or tabs."""
    special = set(tokenizer.all_special_ids)
    keep = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i], clean_up_tokenization_spaces=False)
        if text and all(32 <= ord(c) <= 126 for c in text):
            keep.append(i)
    return keep


def readback_item(processor, config, ids):
    """One `c_1 V_1` read-back sample as (ids, uint8 sketch, token-level cell targets, patch targets) or None."""
    from vist2.processing_vist2 import render_chunk

    text = processor.chunk_text(ids)
    image, report = render_chunk(text, processor.sketch_settings)
    if not report.ok:
        return None
    grid = cell_targets(text, processor.sketch_settings)
    return (list(map(int, ids)), image, grid_to_units(grid, config, config.patch_size * config.merge_size),
            grid_to_units(grid, config, config.patch_size))


def readback_batch(processor, items, wrong=False):
    m, sketch_id = processor.visual_tokens_per_chunk, processor.sketch_token_id
    text = torch.tensor([it[0] for it in items])
    n = text.shape[0]
    ids = torch.cat([text, torch.full((n, m), sketch_id)], 1)
    images = [it[1] for it in items]
    if wrong:
        images = images[1:] + images[:1]
    labels = torch.cat([text, torch.full((n, m), -100)], 1)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), chunk_ids=torch.ones_like(ids),
                 pixel_values=processor.pixel_values(images), labels=labels, read_back=torch.ones(n, dtype=torch.bool))
    token_t = torch.from_numpy(np.stack([it[2] for it in items]))
    patch_t = torch.from_numpy(np.stack([it[3] for it in items]))
    return batch, token_t, patch_t


def heldout_readback_items(processor, config, tokenizer, n):
    """Read-back items of the first sketchable chunks of the held-out windows (fixed: the same every run)."""
    items = []
    for window in corpus_windows(tokenizer, "heldout"):
        item = readback_item(processor, config, window[:CHUNK])
        if item is not None:
            items.append(item)
        if len(items) == n:
            return items
    return items


@torch.no_grad()
def teacher_forced_accuracy(model, processor, items, wrong=False):
    batch, _, _ = readback_batch(processor, items, wrong)
    out = model(**batch)
    L = len(items[0][0])
    logits = out.logits[:, : L - 1].float()
    logits[..., processor.sketch_token_id] = -float("inf")
    pred = logits.argmax(-1)
    return (pred == batch["input_ids"][:, 1:L]).float().mean().item(), out.loss.item()


def train_readback(args):
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = demo_config(tokenizer, args.newline_glyph, args.separator_glyph)
    if args.merge_size:
        config.merge_size = args.merge_size
        config.compression_ratio = CHUNK * args.merge_size**2 // ((config.image_height // config.patch_size) *
                                                                  (config.image_width // config.patch_size))
    model = VIST2ForCausalLM(config)
    if args.init:
        state = load_file(str(Path(args.init) / "model.safetensors"))
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing, _ = model.load_state_dict(state, strict=False)
        print(f"loaded {len(state)} tensors from {args.init}; new: {sorted(set(missing))[:8]}", flush=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    processor = VIST2Processor.from_config(model.config, tokenizer)
    print(f"m = {processor.visual_tokens_per_chunk} visual tokens per chunk", flush=True)
    frozen = {"none": [], "vision": [model.vision_tower], "vision+aligner": [model.vision_tower, model.aligner]}[args.freeze]
    for module in frozen:
        module.requires_grad_(False)
    heads = GlyphHeads(model.config) if args.aux_weight > 0 else None
    capture = Capture(model)
    params = [p for p in model.parameters() if p.requires_grad] + (list(heads.parameters()) if heads else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    pool = random_token_pool(tokenizer, args.data)
    windows = corpus_windows(tokenizer, "train")
    heldout = corpus_windows(tokenizer, "heldout")
    print(f"random-token pool: {len(pool)} ids; trainable parameters "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M", flush=True)

    def draw(kind, r):
        while True:
            if kind in ("random", "chars"):
                ids = [pool[r.randrange(len(pool))] for _ in range(CHUNK)]
            else:
                ids = (windows if kind == "corpus" else heldout)[r.randrange(len(windows if kind == "corpus" else heldout))][:CHUNK]
            item = readback_item(processor, model.config, ids)
            if item is not None:
                return item

    probe_rng = random.Random(12345)
    probes = {"random": [draw("chars" if args.data == "chars" else "random", probe_rng) for _ in range(32)],
              "heldout": [draw("heldout", probe_rng) for _ in range(32)]}
    out = Path(args.out)
    log_path = Path(args.log) if args.log else out.parent / f"training_log.{out.name}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    log.write(json.dumps({"args": vars(args)}) + "\n")
    start = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        model.train()
        kinds = [args.data if args.data != "mix" else ("random" if i % 2 else "corpus") for i in range(args.batch_size)]
        items = [draw(k, rng) for k in kinds]
        batch, token_t, patch_t = readback_batch(processor, items)
        outputs = model(**batch)
        loss = args.lm_weight * outputs.loss
        stats = {"lm_loss": outputs.loss.item()}
        if heads is not None:
            aux = heads.losses(capture.patches, capture.tokens, patch_t, token_t)
            loss = loss + args.aux_weight * (aux.pop("patch_loss") + aux.pop("token_loss"))
            stats.update(aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps - 1:
            model.eval()
            for name, its in probes.items():
                stats[f"{name}_tf_acc"], stats[f"{name}_loss"] = teacher_forced_accuracy(model, processor, its)
                stats[f"{name}_tf_acc_wrong"], stats[f"{name}_loss_wrong"] = teacher_forced_accuracy(
                    model, processor, its, wrong=True)
        if step % args.log_every == 0 or step % args.eval_every == 0 or step == args.steps - 1:
            record = {"step": step, "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.time() - start, 1),
                      **{k: round(v, 4) for k, v in stats.items()}}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"saved to {out} after {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
