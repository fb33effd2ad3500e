"""Train the small demo VIST2 and its same-size text-only control from scratch on CPU, reproducibly.

    bash research/reproduce.sh          # every stage below, the control and the evaluation, into research/build
    bash research/reproduce.sh demo     # the same, then rewrites the committed checkpoint (repository root)

research/README.md has the recipe's story and numbers. Its stages, all but the first with
`--tokenizer tokenization/byte_tokenizer` (one token per byte):
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
8. `--overlap-rows 0.25`: a quarter of the corpus windows with c_2 starting up to `--max-overlap` bytes before the
   end of c_1, so that c_2 begins by reading the last cells of V_1.
9. `--read-back-positions before_next_chunk` (`VIST2Config.read_back_positions`, saved with the checkpoint): a chunk
   read back from its sketch ends right before the next chunk's first place instead of sharing that chunk's places,
   so read-back no longer teaches the open chunk's first bytes to read the sketch's first cells.
10. `--text-only [--init DIR]`: the control, with the tokenizer, seed, LM steps, batch and schedule of each reader
   stage.
`--chunk-sampling any` draws chunks and windows at any token offset of the training stream instead of fixed windows.

Common to the stages:
- Corpus: CPython standard-library docstrings (`tokenization/build_corpus.py`, PSF-2.0), built offline; the
  held-out documents (`split_documents`, 2 %) are never trained on. Tokenizer: `--tokenizer` (default
  `tokenization/demo_tokenizer`, 4 096 byte-level BPE tokens, which only the encoder stage uses: it sees sketches,
  not token ids).
- Geometry: L = 32 tokens, r = 4 -> m = 8 visual tokens. Sketch 128 x 256 px of 8 x 16 px glyph cells
  (8 rows x 32 columns = 256 cells), 16 px patches (each patch = exactly 2 cells, aligned), 4 x 4 merge -> 2 x 4 = 8
  visual tokens. Tiny SigLIP (hidden 128, 3 layers) + Qwen3 (hidden 256, 4 layers).
- Sample: a window of two chunks laid out `c_1 V_1 c_2` with read-back on: c_1 learns to *read* its own sketch
  (reconstruction), c_2 sees V_1 only (optical language modelling; the open chunk has no sketch of its own, so
  read-back does not change what c_2 sees).
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
from vist2.processing_vist2 import CONTINUATION, sketch_lines  # noqa: E402
CHUNK = 32
NUM_CLASSES = 96  # 0 = blank (a space), 1..94 = printable ASCII 33..126, 95 = any other drawn cell (glyph or byte mark)


def load_build_corpus():
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "tokenization" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_config(tokenizer, newline_glyph=None, separator_glyph=None, font_path=None) -> VIST2Config:
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
                       min_font_size=8, num_channels=1, font_path=font_path,
                       sketch_token_id=tokenizer.convert_tokens_to_ids("<|sketch|>"),
                       newline_glyph=newline_glyph, tie_word_embeddings=True,
                       special_token_glyphs={tokenizer.eos_token: separator_glyph} if separator_glyph else None)


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
    if char == " ":  # the only character drawn without ink: tabs, carriage returns and the like are byte marks
        return 0
    code = ord(char)
    return code - 32 if 33 <= code <= 126 else NUM_CLASSES - 1


def cell_targets(text: str, settings: dict) -> np.ndarray:
    """Which character the renderer puts in each glyph cell: `(rows, columns)` class ids (0 = blank)."""
    margin = settings["margin"]
    columns = (settings["image_width"] - 2 * margin) // settings["char_width"]
    rows = (settings["image_height"] - 2 * margin) // settings["line_height"]
    grid = np.zeros((rows, columns), dtype=np.int64)
    lines, _ = sketch_lines(text, settings, columns)
    for r, line in enumerate(lines[:rows]):
        grid[r, : len(line)] = [0 if c == CONTINUATION else char_class(c) for c in line]
    return grid


def grid_to_units(grid: np.ndarray, config: VIST2Config, unit_px: int) -> np.ndarray:
    """Regroup a cell grid into square units of `unit_px` pixels (a patch, or an s x s merged token), row-major."""
    cell_rows, cell_cols = unit_px // config.line_height, unit_px // config.char_width
    rows, cols = grid.shape
    g = grid.reshape(rows // cell_rows, cell_rows, cols // cell_cols, cell_cols).transpose(0, 2, 1, 3)
    return g.reshape(-1, cell_rows * cell_cols)


def make_sample(processor, window, trainable=None):
    """`c_1 V_1 c_2` layout of a window of two chunks (`encode_sample` with read-back targets); None if c_1 cannot be
    sketched. `trainable` (one bool per token) as in `encode_sample`: which tokens carry a label."""
    sample = processor.encode_sample([], list(map(int, window)), keep_closed_text=True, trainable=trainable)
    return sample if len(sample["sketches"]) == (len(window) - 1) // CHUNK else None


def make_batch(processor, samples):
    batch = processor.collate(samples, return_labels=True)
    return {k: v for k, v in batch.items() if k != "chunks_kept_as_text"}


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
    them must find where each line starts in the sketch, as in corpus text (research/README.md, stage 6)."""
    if not probability:  # draws nothing from rng, so runs without newlines replay as before
        return ids
    return [newline_id if rng.random() < probability else i for i in ids]


def layout_token_ids(tokenizer, separators: bool) -> set[int]:
    """The tokens `with_corpus_layout` keeps in place: spaces, tabs and newlines, and with `separators` the document
    separator too ("<|endoftext|>" is one token but 13 cells: it moves every later byte of the sketch)."""
    whitespace = {i for i in range(len(tokenizer)) if tokenizer.decode([i]) in (" ", "\n", "\t")}
    return whitespace | ({tokenizer.eos_token_id} if separators else set())


def with_corpus_layout(template: list[int], keep: set[int], pool: list[int], rng: random.Random,
                       wide: list[tuple[int, ...]] = (), wide_share: float = 0.5) -> list[int]:
    """A corpus chunk with every token outside `keep` (its whitespace) replaced by a random one of `pool`: the lines,
    indentation and blank lines of real text, characters no prior can guess (research/README.md, stage 7). With
    `wide` (characters of several tokens each, as token ids), `wide_share` of the replaced places try one of them
    first, which then takes the places of as many tokens (research/README.md, "A font that draws Latin-1")."""
    if not wide:  # draws from rng as before, so earlier stages replay
        return [i if i in keep else pool[rng.randrange(len(pool))] for i in template]
    out = []
    while len(out) < len(template):
        place = template[len(out)]
        if place not in keep and rng.random() < wide_share:
            char = wide[rng.randrange(len(wide))]
            places = template[len(out) : len(out) + len(char)]
            if len(places) == len(char) and not keep.intersection(places):
                out += char
                continue
        out.append(place if place in keep else pool[rng.randrange(len(pool))])
    return out


# Characters beyond ASCII that a Latin-1 font must draw: Latin-1's printable half, and the punctuation of typeset text.
LATIN1_REPERTOIRE = "".join(map(chr, range(0xA1, 0x100))).replace("\xad", "") + "‘’‚“”„–—…•€™‹›†‡‰"


def wide_characters(tokenizer, repertoire: str) -> list[tuple[int, ...]]:
    """The characters of `repertoire` that take more than one token, as token ids."""
    ids = [tuple(tokenizer(char, add_special_tokens=False)["input_ids"]) for char in repertoire]
    return [i for i in ids if len(i) > 1]


def random_chars_layout(tokenizer, wide_share: float):
    """`(template, rng) -> ids`: a corpus chunk's layout (separators kept) filled with random characters, Latin-1 ones
    of several tokens at `wide_share` of the places (`with_corpus_layout`)."""
    wide = wide_characters(tokenizer, LATIN1_REPERTOIRE)
    keep, pool = layout_token_ids(tokenizer, separators=True), random_token_pool(tokenizer, "chars")
    return lambda template, rng: with_corpus_layout(template, keep, pool, rng, wide, wide_share)


def chars_readback_sample(processor, chars: list[int]):
    """Read-back of text the LM cannot guess: c_1 = `chars`, then the separator with nothing to predict after it."""
    return make_sample(processor, chars + [processor.tokenizer.eos_token_id], trainable=[True] * len(chars) + [False])


def start_run(args, default_log: str):
    """A script's run: threads and seeds set, `--out` made, the JSON-lines log begun with the arguments. Returns
    (rng, out, log)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Path(args.log or out / default_log)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(json.dumps({"args": vars(args)}, ensure_ascii=False) + "\n")
    return random.Random(args.seed), out, log


def with_overlap(window, overlap: int):
    """A two-chunk window whose second chunk starts `overlap` tokens before the end of the first: c_2 begins by
    writing out the last cells of V_1, then goes on. The bytes that finish a word broken off at a chunk boundary must
    be read from the end of the previous sketch, and reading had only ever started at a sketch's first cell
    (research/README.md, stage 14)."""
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
    of the sketch (research/README.md, stages 12-13); these rows teach it to read the next cell whatever it wrote
    before: scheduled sampling without the extra forward pass."""
    ids, chunk_ids = batch["input_ids"], batch["chunk_ids"]
    closed_chunk = (chunk_ids >= 1) & (chunk_ids < open_chunk_ids(chunk_ids))
    read_back_text = closed_chunk & read_back[:, None] & (ids != sketch_token_id) & (batch["attention_mask"] == 1)
    noisy = read_back_text & (torch.rand(ids.shape, generator=generator) < probability)
    random_ids = torch.tensor(pool)[torch.randint(len(pool), ids.shape, generator=generator)]
    return torch.where(noisy, random_ids, ids)


# ---------------------------------------------------------------------------------------------------------------------
# Encoder stage: vision tower + aligner on the glyph-cell loss, no LM
# ---------------------------------------------------------------------------------------------------------------------


class GlyphHeads(nn.Module):
    """Linear per-cell character classifiers (training only, not saved with the model). The encoder stage trains
    `token`, on each aligned visual token (what the LM receives): it classifies that token's 32 cells. `patch` (on each
    vision patch) is built first and left untrained, so that the weights drawn after it are those of the committed
    run."""

    def __init__(self, config: VIST2Config):
        super().__init__()
        p, s = config.patch_size, config.merge_size
        cells_per_patch = (p // config.line_height) * (p // config.char_width)
        self.cells_per_token = cells_per_patch * s * s
        self.patch = nn.Linear(config.vision_config.hidden_size, cells_per_patch * NUM_CLASSES)
        self.token = nn.Linear(config.text_config.hidden_size, self.cells_per_token * NUM_CLASSES)


def cell_scores(logits, targets):
    """Cross-entropy of per-cell character logits `(*targets.shape x NUM_CLASSES)`, their accuracy on ink (non-blank)
    cells and on all cells: `(loss, ink_acc, acc)`."""
    logits = logits.reshape(*targets.shape, NUM_CLASSES)
    loss = F.cross_entropy(logits.reshape(-1, NUM_CLASSES), targets.reshape(-1))
    hit, ink = logits.argmax(-1) == targets, targets != 0
    return loss, (hit & ink).sum().item() / max(int(ink.sum()), 1), hit.float().mean().item()


def sketchable_items(processor, config, draw, n, r, split="train") -> list:
    """n read-back items `(ids, sketch, cell targets)` of freshly drawn chunks, skipping chunks kept as text."""
    items = []
    while len(items) < n:
        item = readback_item(processor, config, draw(1, r, split)[0].tolist())
        if item is not None:
            items.append(item)
    return items


def train_encoder(args, model, heads, processor, config, draw, rng, log_path, save):
    """Vision tower + aligner + token glyph head trained jointly on the token-level cell loss (no LM).

    Every step renders a fresh batch of sketches (rendering is under 3 % of a step). Every --eval-every steps it logs
    the held-out per-character accuracy of the visual tokens (ink cells of 64 fixed probe sketches), all-cell accuracy,
    the visual tokens' mean norm and their fraction of saturated tanh units (|tanh| > 0.99).
    """
    vision, aligner = model.vision_tower.train(), model.aligner

    def sketches(n, r, split="train"):
        items = sketchable_items(processor, config, draw, n, r, split)
        return processor.pixel_values([it[1] for it in items]), torch.from_numpy(np.stack([it[2] for it in items]))

    def tokens(pixels):
        return model.encode_sketches(pixels)

    def scores(tok, targets):
        return cell_scores(heads.token(tok), targets)

    probe_pixels, probe_targets = sketches(64, random.Random(12345), "heldout")
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
    head_params = list(heads.token.parameters())
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
        pixels, targets = sketches(args.encoder_batch, rng)
        loss, train_acc, _ = scores(tokens(pixels), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        last = step == args.encoder_steps - 1 or step + 1 == args.encoder_stop_step
        if step % args.eval_every == 0 or last:
            vision.eval()
            with torch.no_grad():
                tok = tokens(probe_pixels)
                _, held, held_all = scores(tok, probe_targets)
            vision.train()
            record = {"encoder_step": step, "elapsed_s": round(time.time() - start, 1), "loss": round(loss.item(), 4),
                      "train_char_acc": round(train_acc, 4), "heldout_char_acc": round(held, 4),
                      "heldout_cell_acc": round(held_all, 4), "token_norm": round(tok.norm(dim=-1).mean().item(), 2),
                      "saturated": round((tok.abs() > 0.99).float().mean().item(), 4)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)
            last = last or held >= args.encoder_target
        if last:
            break
    model.eval().save_pretrained(save)
    processor.save_pretrained(save)
    print(f"saved to {save}", flush=True)


def fresh_model(args):
    """The stage's tokenizer and a freshly initialised demo model, seeded, on the stage's threads."""
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    return tokenizer, VIST2ForCausalLM(demo_config(tokenizer, args.newline_glyph, args.separator_glyph))


def encoder_stage(args):
    tokenizer, model = fresh_model(args)
    processor = VIST2Processor.from_config(model.config, tokenizer)
    draw = chunk_sampler(tokenizer, args.data, random_token_pool(tokenizer, args.data), sampling=args.chunk_sampling)
    train_encoder(args, model, GlyphHeads(model.config), processor, model.config, draw, random.Random(args.seed),
                  log_path(args), Path(args.out))


# ---------------------------------------------------------------------------------------------------------------------
# Read-back warm-up: `c_1 V_1` with read-back, on random characters
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
    """One `c_1 V_1` read-back sample as (ids, uint8 sketch, token-level cell targets), or None if it overflows."""
    from vist2.processing_vist2 import render_chunk

    text = processor.chunk_text(ids)
    image, report = render_chunk(text, processor.sketch_settings)
    if not report.ok:
        return None
    grid = cell_targets(text, processor.sketch_settings)
    return list(map(int, ids)), image, grid_to_units(grid, config, config.patch_size * config.merge_size)


def readback_batch(processor, items, wrong=False):
    """A batch of `c_1 V_1` read-back rows; `wrong` gives each row the next row's sketch (the control)."""
    m, sketch_id = processor.visual_tokens_per_chunk, processor.sketch_token_id
    text = torch.tensor([it[0] for it in items])
    n = text.shape[0]
    ids = torch.cat([text, torch.full((n, m), sketch_id)], 1)
    images = [it[1] for it in items]
    if wrong:
        images = images[1:] + images[:1]
    labels = torch.cat([text, torch.full((n, m), -100)], 1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), chunk_ids=torch.ones_like(ids),
                pixel_values=processor.pixel_values(images), labels=labels, read_back=torch.ones(n, dtype=torch.bool))


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
    out = model(**(batch := readback_batch(processor, items, wrong)))
    L = len(items[0][0])
    logits = out.logits[:, : L - 1].float()
    logits[..., processor.sketch_token_id] = -float("inf")
    pred = logits.argmax(-1)
    return (pred == batch["input_ids"][:, 1:L]).float().mean().item(), out.loss.item()


def load_weights(model, folder):
    """Every weight of `folder`'s checkpoint whose name and shape `model` has (a new vocabulary starts fresh)."""
    state = load_file(str(Path(folder) / "model.safetensors"))
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing, _ = model.load_state_dict(state, strict=False)
    print(f"loaded {len(state)} tensors from {folder}; new: {sorted(set(missing))[:8]}", flush=True)


def train_readback(args):
    tokenizer, model = fresh_model(args)
    rng = random.Random(args.seed)
    if args.init:
        load_weights(model, args.init)
    model.tie_weights()
    processor = VIST2Processor.from_config(model.config, tokenizer)
    print(f"m = {processor.visual_tokens_per_chunk} visual tokens per chunk", flush=True)
    freeze(model, args.freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    pool = random_token_pool(tokenizer, "chars")
    heldout = corpus_windows(tokenizer, "heldout")
    print(f"random-token pool: {len(pool)} ids; trainable parameters "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M", flush=True)

    def draw(kind, r):
        while True:
            if kind == "chars":
                ids = [pool[r.randrange(len(pool))] for _ in range(CHUNK)]
            else:
                ids = heldout[r.randrange(len(heldout))][:CHUNK]
            item = readback_item(processor, model.config, ids)
            if item is not None:
                return item

    probe_rng = random.Random(12345)
    probes = {"random": [draw("chars", probe_rng) for _ in range(32)],
              "heldout": [draw("heldout", probe_rng) for _ in range(32)]}
    out = Path(args.out)
    path = log_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "w")
    log.write(json.dumps({"args": vars(args)}) + "\n")
    start = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        model.train()
        outputs = model(**readback_batch(processor, [draw("chars", rng) for _ in range(args.batch_size)]))
        stats = {"lm_loss": outputs.loss.item()}
        optimizer.zero_grad(set_to_none=True)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps - 1:
            model.eval()
            stats.update(probe_stats(model, processor, probes))
        if step % args.log_every == 0 or step % args.eval_every == 0 or step == args.steps - 1:
            log_step(log, step, optimizer, start, stats)
    save_stage(model, processor, out, start)


# ---------------------------------------------------------------------------------------------------------------------
# Reader and text-only stages: `c_1 V_1 c_2` windows (the control: `c_1 c_2`)
# ---------------------------------------------------------------------------------------------------------------------


def probe_stats(model, processor, probes) -> dict:
    """Teacher-forced accuracy and loss of each probe, with its own sketches and with wrong ones."""
    stats = {}
    for name, items in probes.items():
        stats[f"{name}_tf_acc"], stats[f"{name}_loss"] = teacher_forced_accuracy(model, processor, items)
        stats[f"{name}_tf_acc_wrong"], stats[f"{name}_loss_wrong"] = teacher_forced_accuracy(
            model, processor, items, wrong=True)
    return stats


def log_step(log, step, optimizer, start, stats):
    record = {"step": step, "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.time() - start, 1),
              **{k: round(v, 4) for k, v in stats.items()}}
    log.write(json.dumps(record) + "\n")
    log.flush()
    print(record, flush=True)


def save_stage(model, tokenizer_or_processor, out, start):
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer_or_processor.save_pretrained(out)
    print(f"saved to {out} after {time.time() - start:.0f}s", flush=True)


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def freeze(model, which: str):
    for name in {"none": [], "vision+aligner": ["vision_tower", "aligner"]}[which]:
        getattr(model, name).requires_grad_(False)


def log_path(args) -> Path:
    out = Path(args.out)
    return Path(args.log) if args.log else out.parent / f"training_log.{out.name}.jsonl"


def train(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = demo_config(tokenizer, args.newline_glyph, args.separator_glyph, args.font_path)
    config.read_back_positions = args.read_back_positions
    processor = VIST2Processor.from_config(config, tokenizer)
    out = Path(args.out)
    if args.text_only:
        model = text_only_model(config)
    else:
        model = VIST2ForCausalLM(config)
    if args.init:  # every weight of the stage it goes on from, the LM included
        model.load_state_dict(load_file(str(Path(args.init) / "model.safetensors")), strict=False)
        model.tie_weights()
    model.train()
    freeze(model, args.freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    n_model = sum(p.numel() for p in model.parameters())
    print(f"model parameters: {n_model / 1e6:.2f}M", flush=True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    path = log_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "w")
    log.write(json.dumps({"args": vars(args), "parameters": n_model}) + "\n")
    draw_window = chunk_sampler(tokenizer, "corpus", [], 2 * CHUNK, sampling=args.chunk_sampling)
    pool = random_token_pool(tokenizer, "chars")
    draw_chars = chunk_sampler(tokenizer, "chars", pool)
    chars_rows = 0 if args.text_only else round(args.mix_chars * args.batch_size)
    (newline_id,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    whitespace = layout_token_ids(tokenizer, separators=False)
    layout_keep = layout_token_ids(tokenizer, separators=args.chars_layout == "corpus+eos")

    wide = wide_characters(tokenizer, LATIN1_REPERTOIRE) if args.chars_repertoire == "latin1" else []

    def draw_chars_row(r):
        if args.chars_layout != "uniform":
            return with_corpus_layout(draw_window(1, r)[0][:CHUNK].tolist(), layout_keep, pool, r, wide,
                                      args.wide_share)
        return with_random_newlines(draw_chars(1, r)[0].tolist(), newline_id, args.chars_newlines, r)

    noise_generator = torch.Generator().manual_seed(args.seed)
    heldout = [] if args.text_only else heldout_readback_items(processor, config, tokenizer, 32)
    probes = None if args.text_only else {
        "heldout": heldout,
        "chars": sketchable_items(processor, config, draw_chars, 32, random.Random(12345)),  # chance: 1 %
        # held-out chunks' lines filled with random characters: reading over several lines, without the prior
        "layout": [readback_item(processor, config, with_corpus_layout(item[0], whitespace, pool, random.Random(i)))
                   for i, item in enumerate(heldout)]}
    if probes and wide:  # the same lines with characters of several bytes among the random ones
        probes["latin1"] = [item for i, h in enumerate(heldout) if (item := readback_item(
            processor, config, with_corpus_layout(h[0], whitespace, pool, random.Random(i), wide, args.wide_share)))
            is not None]
    start = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        samples = []
        while len(samples) < args.batch_size:
            if len(samples) >= args.batch_size - chars_rows:
                # Read-back of text the LM cannot guess: c_1 = random characters, nothing to predict after it.
                sample = chars_readback_sample(processor, draw_chars_row(rng))
            else:
                window = draw_window(1, rng)[0].numpy()
                if args.overlap_rows and rng.random() < args.overlap_rows:
                    window = with_overlap(window, rng.randint(1, args.max_overlap))
                if args.text_only:
                    samples.append(window)
                    continue
                sample = make_sample(processor, window)
            if sample is not None:
                samples.append(sample)
        if args.text_only:
            ids = torch.tensor(np.stack(samples), dtype=torch.long)
            loss = model(input_ids=ids, labels=ids).loss
        else:
            batch = make_batch(processor, samples)
            read_back = torch.ones(len(samples), dtype=torch.bool)  # every closed chunk is read back from its sketch
            if args.readback_noise:
                batch["input_ids"] = with_readback_noise(batch, read_back, processor.sketch_token_id, pool,
                                                         args.readback_noise, noise_generator)
            loss = model(**batch, read_back=read_back).loss
        stats = {"lm_loss": loss.item()}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if probes and (step % args.eval_every == 0 or step == args.steps - 1):
            model.eval()
            stats.update(probe_stats(model, processor, probes))
            model.train()
        if step % args.log_every == 0 or step == args.steps - 1:
            log_step(log, step, optimizer, start, stats)
    save_stage(model, tokenizer if args.text_only else processor, out, start)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder this stage saves its checkpoint to")
    parser.add_argument("--log", default=None, help="JSON-lines log (default: <out>/../training_log.<name>.jsonl)")
    parser.add_argument("--init", default=None, help="start from this stage's checkpoint")
    parser.add_argument("--text-only", action="store_true", help="train the same-size text-only control instead")
    parser.add_argument("--tokenizer", default=str(REPO / "tokenization" / "demo_tokenizer"),
                        help="tokenizer folder; its vocabulary sets the LM's (tokenization/byte_tokenizer: one byte per "
                             "token)")
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the windows drawn: give a stage that goes on from another (--init) its own seed, "
                             "or it trains on the very windows, in the same order, that the earlier stage did")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=25, help="teacher-forced probe, right vs wrong sketch")
    parser.add_argument("--freeze", choices=["none", "vision+aligner"], default="none")
    # the encoder stage
    parser.add_argument("--encoder-steps", type=int, default=0,
                        help="train only the vision tower + aligner + token glyph head on the glyph-cell loss (no LM) "
                             "with this many steps' schedule, save, exit")
    parser.add_argument("--encoder-stop-step", type=int, default=0,
                        help="encoder stage: stop after this many steps of the --encoder-steps schedule (the committed "
                             "run was cut short by a time limit; this replays it exactly)")
    parser.add_argument("--encoder-batch", type=int, default=32, help="encoder stage: sketches per step")
    parser.add_argument("--encoder-target", type=float, default=1.0,
                        help="encoder stage: stop once held-out per-character accuracy reaches this")
    parser.add_argument("--aligner-init-std", type=float, default=0,
                        help="encoder stage: re-initialise the aligner so that its pre-activation std on a batch of "
                             "sketches is this (0.3: tanh starts in its linear range); 0 = keep the aligner")
    parser.add_argument("--aligner-lr", type=float, default=None, help="encoder stage: the aligner's lr (default --lr)")
    parser.add_argument("--head-prior-init", action="store_true",
                        help="encoder stage: start the token glyph head's bias at the log class frequencies")
    parser.add_argument("--data", choices=["corpus", "chars"], default="corpus",
                        help="encoder stage: sketches of corpus chunks; --readback-only: must be chars (random single "
                             "characters, one line of 32 cells)")
    parser.add_argument("--chunk-sampling", choices=["first", "any"], default="first",
                        help="corpus: train on the windows (encoder stage: their first chunks; 6 222 distinct) or on "
                             "chunks / windows at any token offset of the training stream")
    # the read-back warm-up
    parser.add_argument("--readback-only", action="store_true",
                        help="train on `c_1 V_1` read-back samples of random characters only")
    # the reader stages
    parser.add_argument("--mix-chars", type=float, default=0,
                        help="this fraction of each batch are read-back rows of random single characters")
    parser.add_argument("--chars-newlines", type=float, default=0,
                        help="each character of a --mix-chars row is a newline with this probability")
    parser.add_argument("--chars-layout", choices=["uniform", "corpus", "corpus+eos"], default="uniform",
                        help="--mix-chars rows are uniform random characters, or a training chunk's whitespace "
                             "(corpus+eos: and its document separators) with random characters in between "
                             "(with_corpus_layout)")
    parser.add_argument("--readback-noise", type=float, default=0,
                        help="replace this fraction of the read-back chunks' input tokens by random characters, labels "
                             "unchanged (with_readback_noise)")
    parser.add_argument("--overlap-rows", type=float, default=0,
                        help="this fraction of the corpus windows drawn with_overlap, c_2 starting 1 to --max-overlap "
                             "tokens before the end of c_1")
    parser.add_argument("--max-overlap", type=int, default=8, help="see --overlap-rows")
    parser.add_argument("--font-path", default=None, help="the sketches' font (default: Pillow's built-in one)")
    parser.add_argument("--chars-repertoire", choices=["ascii", "latin1"], default="ascii",
                        help="random rows' characters: printable ASCII, or with latin1 also LATIN1_REPERTOIRE's (with "
                             "--chars-layout corpus*: each of several tokens)")
    parser.add_argument("--wide-share", type=float, default=0.5,
                        help="with --chars-repertoire latin1: the share of replaced places that try a character of "
                             "several tokens")
    parser.add_argument("--newline-glyph", default=None,
                        help="sketch each newline as this character in line (VIST2Config.newline_glyph), e.g. '«'; "
                             "every later stage of a recipe must pass the same")
    parser.add_argument("--separator-glyph", default=None,
                        help="sketch the document separator (eos) as this one character (VIST2Config."
                             "special_token_glyphs), e.g. '©'; every later stage of a recipe must pass the same")
    parser.add_argument("--read-back-positions", default="after_sketch", choices=("after_sketch", "before_next_chunk"),
                        help="where a chunk read back from its sketch sits (VIST2Config.read_back_positions); "
                             "before_next_chunk puts the sketch's last cells right before the next chunk; every later "
                             "stage of a recipe must pass the same")
    args = parser.parse_args(argv)
    if args.readback_only and args.data != "chars":
        parser.error("--readback-only reads back random characters: pass --data chars")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.readback_only:
        return train_readback(args)
    if args.encoder_steps:
        return encoder_stage(args)
    return train(args)


if __name__ == "__main__":
    main()
