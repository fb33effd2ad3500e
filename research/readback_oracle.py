"""Oracle read-back diagnostic for the demo VIST2 (demo/NOTES.md, "Third attempt").

Can the language-model side learn read-back at all with the VIST2 mask and positions? The vision tower is replaced
by an oracle: visual token j of a chunk is a trainable embedding of the r text tokens it covers
(`tanh(W [E(t_jr) ... E(t_jr+r-1)] + b)`), so the visual tokens carry the text perfectly. The rest is the real
`VIST2ForCausalLM` forward: layout `c_1 V_1` with read-back, `layout_position_ids`, `vist2_mask_function`, and the
text-stream loss. The geometry keeps m = 8 visual tokens (the demo's), so r = 1 means L = 8 and r = 4 means L = 32.

    python examples/readback_oracle.py --ratio 1 --data chars --steps 1500      # one character per visual token
    python examples/readback_oracle.py --ratio 4 --data chars --steps 3000      # four per visual token (the demo's r)
    python examples/readback_oracle.py --encoder cells --init demo/vist2-demo --data corpus   # perfect glyph-cell tokens
    python examples/readback_oracle.py --encoder vision --init demo/vist2-demo --data chars --patch-probe-steps 1500
    python examples/readback_oracle.py --encoder vision --init demo/vist2-demo --data chars --encoder-steps 3000 \
        --aligner-init-std 0.3 --save /tmp/enc    # "Fourth attempt": train tower + aligner on the token glyph head

Every --eval-every steps it logs teacher-forced token accuracy and loss on 64 fixed probe chunks with the right
visual tokens and with the wrong ones (another probe's, rotated by one): reading shows as right >> wrong.
No rendering, so a step is pure compute (0.55 s at L = 8, 1.3 s at L = 32, batch 32, one CPU thread).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO))

import train_demo as td  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from vist2 import VIST2ForCausalLM  # noqa: E402


class CellOracle(nn.Module):
    """Visual token j = tanh(W [C(cell_1), ..., C(cell_k)] + b) over the k glyph cells its sketch tile covers."""

    def __init__(self, hidden, cells_per_token, width=64):
        super().__init__()
        self.embed = nn.Embedding(td.NUM_CLASSES, width)
        self.proj = nn.Linear(width * cells_per_token, hidden)

    def forward(self, cells):  # (n, m, k) class ids -> (n, m, hidden)
        return torch.tanh(self.proj(self.embed(cells).flatten(2)))


class OracleEncoder(nn.Module):
    """Visual token j = tanh(W [E(t_{jr}), ..., E(t_{jr+r-1})] + b): a perfect 'eye' for the LM to read from."""

    def __init__(self, vocab, hidden, ratio):
        super().__init__()
        self.ratio = ratio
        self.embed = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden * ratio, hidden)

    def forward(self, ids):  # (n, L) -> (n, L / r, hidden)
        e = self.embed(ids)
        return torch.tanh(self.proj(e.reshape(ids.shape[0], ids.shape[1] // self.ratio, -1)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=int, default=4, help="text tokens per visual token (m stays 8, L = 8 r)")
    p.add_argument("--data", choices=["chars", "random", "corpus"], default="chars",
                   help="random single-character tokens (95 ids), random printable tokens, or corpus chunks")
    p.add_argument("--init", default=None, help="start the LM from this checkpoint (e.g. demo/vist2-demo)")
    p.add_argument("--encoder", choices=["oracle", "cells", "vision"], default="oracle",
                   help="oracle token embeddings, the glyph cells each visual token covers in the real sketch layout "
                        "(a perfect vision tower + aligner: 4 lines x 8 columns per token at r = 4), or the --init checkpoint's frozen vision tower on rendered sketches "
                        "(patch features computed once for a pool of --pool-size chunks) + its trainable aligner")
    p.add_argument("--tile", choices=["merge", "lines"], default="merge",
                   help="cells mode: a visual token covers its 4 x 4-patch tile (4 lines x 8 columns, the demo's "
                        "merge), or one whole text line of 32 cells (what a 1 x 16 'line merge' would give)")
    p.add_argument("--pool-size", type=int, default=4096, help="vision mode: rendered training chunks in the pool")
    p.add_argument("--aux-weight", type=float, default=1.0, help="vision mode: token-level glyph-cell head weight")
    p.add_argument("--fresh-aligner", action="store_true", help="vision mode: re-initialise the aligner")
    p.add_argument("--fresh-lm", action="store_true", help="take only vision tower + aligner from --init")
    p.add_argument("--aligner-steps", type=int, default=0,
                   help="vision mode: first train only the aligner + token-level glyph head (batch 64, no LM) this long")
    p.add_argument("--patch-probe-steps", type=int, default=0,
                   help="vision mode: only fit a linear per-patch glyph head (2 cells) on the frozen patch features "
                        "this long, report its held-out ink-cell accuracy, and exit (does the tower see the characters?)")
    p.add_argument("--aligner-lr", type=float, default=None, help="vision mode: lr of the aligner in the aligner-only and encoder stages (default --lr)")
    p.add_argument("--freeze-aligner", action="store_true", help="vision mode: then keep the aligner fixed")
    td.add_encoder_stage_arguments(p)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=0, help="stop (and log) after this wall time; 0 = no limit")
    p.add_argument("--log", required=True, help="JSON-lines log")
    p.add_argument("--save", default=None, help="oracle: torch.save the state dicts to this file; vision: save_pretrained "
                                                "the whole VIST2 (frozen vision tower put back) into this folder")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "demo_tokenizer")
    config = td.demo_config(tokenizer)
    L = 8 * args.ratio
    config.chunk_size, config.compression_ratio = L, args.ratio
    model = VIST2ForCausalLM(config)
    if args.init:
        from safetensors.torch import load_file

        state = load_file(str(Path(args.init) / "model.safetensors"))
        if args.fresh_lm:
            state = {k: v for k, v in state.items() if not k.startswith("language_model.")}
        own = model.state_dict()  # a checkpoint of another vocabulary (the byte-level demo) gives all but the embeddings
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(state, strict=False)
        model.tie_weights()
    current = {}
    if args.encoder == "oracle":
        oracle = OracleEncoder(len(tokenizer), config.text_config.hidden_size, args.ratio)
        model.encode_sketches = lambda pixel_values: oracle(current["ids"])  # the oracle replaces vision + aligner
        extra = list(oracle.parameters())
    elif args.encoder == "cells":
        assert args.ratio == 4, "the cell oracle keeps the demo geometry (r = 4)"
        p_, s_ = config.patch_size, config.merge_size
        oracle = CellOracle(config.text_config.hidden_size, (p_ * s_ // config.line_height) * (p_ * s_ // config.char_width))
        model.encode_sketches = lambda pixel_values: oracle(current["ids"])
        extra = list(oracle.parameters())
    else:
        assert args.ratio == 4, "vision mode keeps the demo geometry (r = 4)"
        assert args.init or args.encoder_steps, "read-back on a vision tower needs --init"
        if args.fresh_aligner:
            model.aligner.apply(model._init_weights)
        heads = td.GlyphHeads(config)
        model.encode_sketches = lambda pixel_values: model.aligner(current["feats"])
        extra = list(heads.token.parameters())
    m, sketch_id = config.visual_tokens_per_chunk, config.sketch_token_id
    assert m == 8, m
    dummy_pixels = torch.zeros(1, config.num_channels, config.image_height, config.image_width)

    pool = td.random_token_pool(tokenizer, args.data)
    draw = td.chunk_sampler(tokenizer, args.data, pool, length=L)

    processor = None
    if args.encoder != "oracle":
        from vist2 import VIST2Processor

        processor = VIST2Processor.from_config(config, tokenizer)
    if args.encoder == "vision" and args.encoder_steps:
        return td.train_encoder(args, model, heads, processor, config, draw, rng, args.log, args.save)
    vision = model.vision_tower.eval().requires_grad_(False)
    del model.vision_tower  # frozen / unused: not trained

    @torch.no_grad()
    def rendered(n, r, split="train"):
        """n sketchable chunks: ids (n, L), frozen patch features (n, 128, 128), token-level cell targets."""
        items = td.sketchable_items(processor, config, draw, n, r, split)
        feats = torch.cat([vision(pixel_values=processor.pixel_values([it[1] for it in items[i : i + 64]]),
                                  interpolate_pos_encoding=True)
                           .last_hidden_state for i in range(0, n, 64)])
        return (torch.tensor([it[0] for it in items]), feats,
                torch.from_numpy(np.stack([it[2] for it in items])), torch.from_numpy(np.stack([it[3] for it in items])))

    def with_cells(n, r, split="train"):
        """n chunks that fit the sketch, with the glyph cells of each visual token: (n, L), (n, m, cells)."""
        rows = (config.image_height - 2 * processor.sketch_settings["margin"]) // config.line_height
        columns = (config.image_width - 2 * processor.sketch_settings["margin"]) // config.char_width
        texts, cells = [], []
        while len(texts) < n:
            ids = draw(1, r, split)[0]
            text = processor.chunk_text(ids.tolist())
            if len(td.wrap_into_lines(text, columns)[0]) > rows:
                continue
            grid = td.cell_targets(text, processor.sketch_settings)
            texts.append(ids)
            units = grid if args.tile == "lines" else td.grid_to_units(grid, config, config.patch_size * config.merge_size)
            cells.append(torch.from_numpy(units))
        return torch.stack(texts), torch.stack(cells)

    def forward(text, vis):
        n = text.shape[0]
        ids = torch.cat([text, torch.full((n, m), sketch_id)], 1)
        labels = torch.cat([text, torch.full((n, m), -100)], 1)
        current["feats" if args.encoder == "vision" else "ids"] = vis
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), chunk_ids=torch.ones_like(ids),
                     pixel_values=dummy_pixels.expand(n, -1, -1, -1), labels=labels,
                     read_back=torch.ones(n, dtype=torch.bool))

    @torch.no_grad()
    def probe(text, vis, wrong):
        model.eval()
        out = forward(text, vis.roll(1, 0) if wrong else vis)
        logits = out.logits[:, : L - 1].float()
        logits[..., sketch_id] = -float("inf")
        acc = (logits.argmax(-1) == text[:, 1:]).float().mean().item()
        model.train()
        return acc, out.loss.item()

    t0 = time.time()
    if args.encoder == "oracle":
        probe_text = probe_vis = draw(64, random.Random(12345), "heldout")
    elif args.encoder == "cells":
        probe_text, probe_vis = with_cells(64, random.Random(12345), "heldout")
    else:
        probe_text, probe_vis, _, probe_patch_targets = rendered(64, random.Random(12345), "heldout")
        pool_ids, pool_feats, pool_targets, pool_patch_targets = rendered(args.pool_size, random.Random(args.seed + 1))
    print(f"data ready in {time.time() - t0:.0f}s", flush=True)
    if args.encoder == "vision" and args.patch_probe_steps:
        return patch_probe(args, heads, pool_feats, pool_patch_targets, probe_vis, probe_patch_targets, rng)
    aligner_log = []
    if args.encoder == "vision" and args.aligner_steps:
        t0 = time.time()
        opt = torch.optim.AdamW(list(model.aligner.parameters()) + extra, lr=args.aligner_lr or args.lr, weight_decay=0.01)
        for step in range(args.aligner_steps):
            pick = torch.tensor([rng.randrange(len(pool_ids)) for _ in range(64)])
            targets = pool_targets[pick]
            aux, acc, _ = td.cell_scores(heads.token(model.aligner(pool_feats[pick])), targets)
            opt.zero_grad(set_to_none=True)
            aux.backward()
            opt.step()
            if step % 250 == 0 or step == args.aligner_steps - 1:
                aligner_log.append({"aligner_step": step, "aux": round(aux.item(), 4), "token_ink_acc": round(acc, 4),
                                    "elapsed_s": round(time.time() - t0, 1)})
                print(aligner_log[-1], flush=True)
    if args.encoder == "vision" and args.freeze_aligner:
        model.aligner.requires_grad_(False)
    params = [p for p in list(model.parameters()) + extra if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    log = open(args.log, "w")
    log.write(json.dumps({"args": vars(args), "L": L, "m": m, "pool": len(pool),
                          "trainable": sum(p.numel() for p in params)}) + "\n")
    log.writelines(json.dumps(record) + "\n" for record in aligner_log)
    print(f"L = {L}, m = {m}, pool {len(pool)}, trainable {sum(p.numel() for p in params) / 1e6:.2f}M", flush=True)
    start = time.time()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = td.lr_at(step, args.steps, args.lr, args.warmup)
        stats = {}
        if args.encoder == "oracle":
            text = draw(args.batch_size, rng)
            loss = forward(text, text).loss
        elif args.encoder == "cells":
            text, cells = with_cells(args.batch_size, rng)
            loss = forward(text, cells).loss
        else:
            pick = torch.tensor([rng.randrange(len(pool_ids)) for _ in range(args.batch_size)])
            text, feats, targets = pool_ids[pick], pool_feats[pick], pool_targets[pick]
            aligned = model.aligner(feats)
            current["feats"] = feats
            loss = forward(text, feats).loss
            if args.aux_weight > 0:
                aux, ink_acc, _ = td.cell_scores(heads.token(aligned), targets)
                stats["token_ink_acc"] = round(ink_acc, 4)
                loss = loss + args.aux_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        out_of_time = args.max_minutes and time.time() - start > 60 * args.max_minutes
        last = step == args.steps - 1 or out_of_time
        if step % args.eval_every == 0 or last:
            acc, ploss = probe(probe_text, probe_vis, False)
            acc_w, ploss_w = probe(probe_text, probe_vis, True)
            record = {"step": step, "elapsed_s": round(time.time() - start, 1), "loss": round(loss.item(), 4), **stats,
                      "tf_acc": round(acc, 4), "tf_acc_wrong": round(acc_w, 4),
                      "probe_loss": round(ploss, 4), "probe_loss_wrong": round(ploss_w, 4)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)
        if out_of_time:
            break
    if args.save and args.encoder != "vision":
        torch.save({"model": model.state_dict(), "oracle": oracle.state_dict()}, args.save)
    elif args.save:
        del model.encode_sketches  # back to the class method: vision tower + aligner
        model.vision_tower = vision
        model.eval()
        model.save_pretrained(args.save)
        processor.save_pretrained(args.save)
        print(f"saved to {args.save}", flush=True)


def patch_probe(args, heads, feats, targets, probe_feats, probe_targets, rng):
    """Linear per-patch glyph head on frozen patch features: held-out ink-cell accuracy every 250 steps."""
    opt = torch.optim.AdamW(heads.patch.parameters(), lr=args.lr, weight_decay=0.01)

    def run(f, t):
        loss, ink_acc, _ = td.cell_scores(heads.patch(f), t)
        return loss, ink_acc

    with open(args.log, "w") as log:
        log.write(json.dumps({"args": vars(args)}) + "\n")
        start = time.time()
        for step in range(args.patch_probe_steps):
            pick = torch.tensor([rng.randrange(len(feats)) for _ in range(64)])
            loss, acc = run(feats[pick], targets[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 250 == 0 or step == args.patch_probe_steps - 1:
                with torch.no_grad():
                    _, held = run(probe_feats, probe_targets)
                record = {"patch_probe_step": step, "loss": round(loss.item(), 4), "train_ink_acc": round(acc, 4),
                          "heldout_ink_acc": round(held, 4), "elapsed_s": round(time.time() - start, 1)}
                log.write(json.dumps(record) + "\n")
                print(record, flush=True)


if __name__ == "__main__":
    main()
