"""The sketch geometry: which sketches hold a chunk of English prose, and what each costs per chunk.

For every tokenizer (characters per token) and candidate geometry (sketch size, glyph cell, aligner merge s), the
fraction of 256-token chunks of held-out prose whose text fits the sketch (`wrap_into_lines`, the renderer's own
wrap, so line-end waste counts), and the FLOPs of one chunk at the `qwen3-0.6b` preset's shapes (SigLIP2-base tower
+ aligner on one sketch, the Qwen3-0.6B decoder on its m visual tokens, the backbone on its L text tokens).

Text (no downloads; a corpus whose source is absent is skipped and the run says so):
- `python-docs`: the prose paragraphs of the CPython documentation's tutorial, HOWTOs, FAQ, language reference and
  What's New (Debian `python3.11-doc`, reStructuredText sources: code blocks, directives and headings dropped, inline
  markup reduced to its text, each paragraph on one line).
- `kjv`: the King James Bible (Debian `bible-kjv`, `bible -f Gen1:1-Rev22:21`), one paragraph per chapter.
- `licenses`: the licence texts of /usr/share/common-licenses, each paragraph on one line.
- `docstrings`: the benchmark text of `common.benchmark_documents` (CPython docstrings, whitespace collapsed).
Documents are split 4:1 (every fifth held out, in sorted order); BPE tokenizers are trained on the 4 parts, chunks
are measured on the held-out fifth only, documents joined by blank lines as one stream.

`--write-prose-sample` writes tokenization/prose_sample.txt (the first 16 000 characters of ASCII held-out
python-docs paragraphs: the default font draws them all), which the tests render with the geometry
`vist2.training.from_backbones` picks.

Tokenizers: the repo's byte tokenizer and 4096-BPE demo tokenizer; byte-level BPEs with Qwen2/3's pre-tokenizer
regex trained here at 8k-32k tokens (this text holds about 32k merges at min_frequency 2: the trainer stops there);
GPT-2's 50k BPE when `--gpt2-ranks` points at `gpt2.tiktoken` (shipped in the PyPI sdist of `openai-whisper`,
`whisper/assets/gpt2.tiktoken`; read with `tiktoken`).

    python benchmarks/geometry.py --gpt2-ranks /path/to/gpt2.tiktoken --name geometry
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PRESETS, REPO, TOKENIZER_DIR, attention_flops_per_entry, benchmark_documents, flop_counter, machine_description)

from vist2.configuration_vist2 import VIST2Config  # noqa: E402
from vist2.modeling_vist2 import VIST2ForCausalLM  # noqa: E402
from vist2.processing_vist2 import wrap_into_lines  # noqa: E402
from vist2.training.models import FIT_MARGIN, FIT_MARGIN_LINE_BREAKS, PROSE_SAMPLE, sketch_geometry  # noqa: E402

CHUNK_SIZE, RATIO, PATCH = 256, 4, 16
# (label, image_height, image_width, merge_size, char_width, line_height); m = 64 visual tokens for each.
CANDIDATES = [
    ("128x128 s1 4x8", 128, 128, 1, 4, 8),  # the former default
    ("128x128 s1 3x6", 128, 128, 1, 3, 6),
    ("128x128 s1 3x5", 128, 128, 1, 3, 5),
    ("128x128 s1 3x4", 128, 128, 1, 3, 4),
    ("128x128 s1 2x4", 128, 128, 1, 2, 4),
    ("256x256 s2 8x16", 256, 256, 2, 8, 16),
    ("256x256 s2 6x12", 256, 256, 2, 6, 12),
    ("256x256 s2 5x10", 256, 256, 2, 5, 10),
    ("256x256 s2 4x8", 256, 256, 2, 4, 8),  # the benchmark geometry at r = 4, and the new default
    ("256x256 s2 4x6", 256, 256, 2, 4, 6),
    ("384x384 s3 4x8", 384, 384, 3, 4, 8),
]
NEWLINE_GLYPH = "\u00ab"  # one cell per newline, as the default newline_glyph="\n" (a byte mark) takes
QWEN_PRETOKENIZER = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DOCS = Path("/usr/share/doc/python3.11/html/_sources")
PROSE_FILE = REPO / "tokenization" / "prose_sample.txt"
SAMPLE_CHARS = 16000


# -- text ---------------------------------------------------------------------------------------------------------------


def rst_prose(text: str) -> list[str]:
    """The prose paragraphs of a reStructuredText page, each on one line, inline markup reduced to its text."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        first = lines[0]
        if (not first.strip() or first[0].isspace() or first.startswith(("..", ">>>", "|", "+", "="))
                or any(re.fullmatch(r"([=*\-~^\"'`#+])\1{2,}", line.strip()) for line in lines)):
            continue
        para = " ".join(line.strip() for line in lines)
        para = re.sub(r":[\w:.+-]+:`!?~?([^`<]*?)\s*(<[^>]*>)?`", r"\1", para)
        para = re.sub(r"`([^`<]*?)\s*(<[^>]*>)?`_{0,2}", r"\1", para.replace("``", "`"))
        para = re.sub(r"\*\*?([^*]+)\*\*?", r"\1", para).replace("::", ":")
        para = " ".join(para.split())
        letters = sum(c.isalpha() or c == " " for c in para)
        if len(para) >= 60 and letters >= 0.8 * len(para):
            paragraphs.append(para)
    return paragraphs


def corpora() -> tuple[dict[str, list[str]], dict[str, str]]:
    """{name: documents} of every source found here, and {name: why skipped} for the others."""
    found, skipped = {}, {}
    if DOCS.is_dir():
        pages = sorted(p for part in ("tutorial", "howto", "faq", "reference", "whatsnew")
                       for p in (DOCS / part).glob("*.rst.txt"))
        found["python-docs"] = [d for d in ("\n\n".join(rst_prose(p.read_text())) for p in pages) if d]
    else:
        skipped["python-docs"] = f"{DOCS} absent (apt-get install python3.11-doc)"
    if shutil.which("bible"):
        dump = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
        books: dict[str, dict[str, list[str]]] = {}
        for line in dump.splitlines():
            match = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
            if match:
                books.setdefault(match[1], {}).setdefault(match[2], []).append(match[4].strip())
        found["kjv"] = ["\n\n".join(" ".join(verses) for verses in chapters.values()) for chapters in books.values()]
    else:
        skipped["kjv"] = "no `bible` program (apt-get install bible-kjv)"
    licenses = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    found["licenses"] = ["\n\n".join(" ".join(b.split()) for b in re.split(r"\n\s*\n", p.read_text()) if b.strip())
                         for p in licenses]
    found["docstrings"] = benchmark_documents()[0]
    return found, skipped


def split(documents: list[str]) -> tuple[list[str], list[str]]:
    return [d for i, d in enumerate(documents) if i % 5], [d for i, d in enumerate(documents) if i % 5 == 0]


# -- tokenizers ---------------------------------------------------------------------------------------------------------


class Codec:
    """encode(text) -> ids, decode(ids) -> text, for every kind of tokenizer measured."""

    def __init__(self, name, encode, decode, vocab_size):
        self.name, self.encode, self.decode, self.vocab_size = name, encode, decode, vocab_size


def hf_codec(name, path) -> Codec:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return Codec(name, lambda t: tok(t, add_special_tokens=False)["input_ids"],
                 lambda ids: tok.decode(ids, clean_up_tokenization_spaces=False), len(tok))


def trained_bpe(vocab_size: int, texts: list[str], cache: Path) -> Codec:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    path = cache / f"bpe-{vocab_size}.json"
    if path.exists():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZER), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        cache.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return Codec(f"bpe-{vocab_size // 1000}k", lambda t: tok.encode(t).ids, tok.decode, tok.get_vocab_size())


def gpt2_codec(ranks_path: str) -> Codec:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(ranks_path),
                            special_tokens={"<|endoftext|>": 50256})
    return Codec("gpt2-50k", enc.encode_ordinary, lambda ids: enc.decode(ids, errors="replace"), enc.n_vocab)


# -- measurements -------------------------------------------------------------------------------------------------------


def chunk_texts(codec: Codec, documents: list[str]) -> tuple[list[str], float]:
    """The text of every full chunk of the held-out stream, and the stream's characters per token."""
    stream = "\n\n".join(documents)
    ids = codec.encode(stream)
    chunks = [codec.decode(ids[i : i + CHUNK_SIZE]) for i in range(0, len(ids) - CHUNK_SIZE + 1, CHUNK_SIZE)]
    return chunks, len(stream) / len(ids)


def fits(text: str, height: int, width: int, char_width: int, line_height: int, newline_glyph=None) -> bool:
    return len(wrap_into_lines(text, width // char_width, newline_glyph)[0]) <= height // line_height


def cells_needed(text: str, columns: int, newline_glyph=None) -> int:
    """Cells a chunk takes at `columns` per line, counting what each line break leaves blank."""
    return len(wrap_into_lines(text, columns, newline_glyph)[0]) * columns


def flops_per_chunk(candidates) -> dict:
    """FLOPs of one chunk at the qwen3-0.6b shapes: tower + aligner per sketch, per candidate; the decoder on m visual
    tokens (VIST2) and on L text tokens (backbone), with no earlier context. The decoder is counted at 1 and 2 layers
    and extrapolated to 28 (every layer is the same), which needs no 2.4 GB of random Qwen3-0.6B weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    preset = PRESETS["qwen3-0.6b"]
    text = dict(preset["text"])
    text_type, layers = text.pop("model_type"), text["num_hidden_layers"]
    lm = {}
    for n in (1, 2):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(text_type, **{**text, "num_hidden_layers": n}))
        for tokens in (CHUNK_SIZE, CHUNK_SIZE // RATIO):
            with torch.no_grad(), flop_counter() as counter:
                model(inputs_embeds=torch.zeros(1, tokens, text["hidden_size"]), logits_to_keep=1, use_cache=False)
            lm[(n, tokens)] = counter.get_total_flops()
    decoder = {t: lm[(1, t)] + (layers - 1) * (lm[(2, t)] - lm[(1, t)]) for t in (CHUNK_SIZE, CHUNK_SIZE // RATIO)}
    out = {"backbone_lm": decoder[CHUNK_SIZE], "vist2_lm": decoder[CHUNK_SIZE // RATIO], "tower": {},
           "attention_per_entry": attention_flops_per_entry(AutoConfig.for_model(text_type, **text))}
    for label, height, width, merge, *_ in candidates:
        if label in out["tower"] or any(v["shape"] == (height, width, merge) for v in out["tower"].values()):
            continue
        config = VIST2Config(text_config={**preset["text"], "num_hidden_layers": 1, "vocab_size": 8},
                             vision_config=preset["vision"], chunk_size=CHUNK_SIZE, compression_ratio=RATIO,
                             sketch_token_id=7, image_height=height, image_width=width, merge_size=merge)
        model = VIST2ForCausalLM(config).eval()
        pixels = torch.zeros(1, height, width, dtype=torch.uint8)  # a sketch as the processor gives it (grey, uint8)
        with torch.no_grad(), flop_counter() as counter:
            model.encode_sketches(pixels)
        out["tower"][label] = {"shape": (height, width, merge), "patches": (height // PATCH) * (width // PATCH),
                               "flops": counter.get_total_flops()}
    return out


def prefill_flops(flops: dict, tower: int, context: int) -> tuple[float, float]:
    """Prefill FLOPs of `context` tokens, (backbone, VIST2), from the counted chunks plus causal attention across
    chunks (the lower triangle, as a one-pass causal kernel computes it): K = context / L - 1 closed chunks (a sketch
    and m visual tokens each) and the open chunk as text in VIST2."""
    per_entry, m, k = flops["attention_per_entry"], CHUNK_SIZE // RATIO, context // CHUNK_SIZE - 1

    def across(entries, blocks):  # pairs of the causal triangle outside the counted diagonal blocks
        return (entries * entries - sum(b * b for b in blocks)) / 2 * per_entry

    backbone = (k + 1) * flops["backbone_lm"] + across(context, [CHUNK_SIZE] * (k + 1))
    vist2 = k * (tower + flops["vist2_lm"]) + flops["backbone_lm"] + across(k * m + CHUNK_SIZE, [m] * k + [CHUNK_SIZE])
    return backbone, vist2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-sizes", type=int, nargs="*", default=[8192, 16384, 32768],
                        help="BPE vocabularies to train (this text holds about 32k merges at min_frequency 2)")
    parser.add_argument("--gpt2-ranks", help="path of gpt2.tiktoken (openai-whisper sdist: whisper/assets/)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vist2-geometry-tokenizers"))
    parser.add_argument("--name", default="geometry")
    parser.add_argument("--write-prose-sample", action="store_true",
                        help=f"(re)write {PROSE_FILE.relative_to(REPO)} from the held-out python-docs, then stop")
    args = parser.parse_args(argv)
    start = time.time()
    texts, skipped = corpora()
    if args.write_prose_sample:
        paragraphs = [p for doc in split(texts["python-docs"])[1] for p in doc.split("\n\n") if p.isascii()]
        keep = [p for i, p in enumerate(paragraphs) if sum(map(len, paragraphs[: i + 1])) <= SAMPLE_CHARS]
        PROSE_FILE.write_text("\n\n".join(keep) + "\n", encoding="utf-8")
        return
    train = [d for docs in texts.values() for d in split(docs)[0]]
    held_out = {name: split(docs)[1] for name, docs in texts.items()}
    codecs = [hf_codec("bytes", REPO / "tokenization" / "byte_tokenizer"), hf_codec("demo-4k", TOKENIZER_DIR)]
    codecs += [trained_bpe(v, train, Path(args.cache)) for v in args.vocab_sizes]
    if args.gpt2_ranks:
        codecs.append(gpt2_codec(args.gpt2_ranks))

    rows, picked = [], {}
    for codec in codecs:
        cpt = len(PROSE_SAMPLE) / len(codec.encode(PROSE_SAMPLE))
        picked[codec.name] = {"chars_per_token": cpt, **sketch_geometry(CHUNK_SIZE, RATIO, PATCH, cpt)}
        for corpus, documents in held_out.items():
            chunks, cpt = chunk_texts(codec, documents)
            lengths = np.array([len(c) for c in chunks])
            # Cells needed at 64 columns (the default's), as a multiple of L x (characters per token): the margin
            # the geometry rule must leave, with newlines drawn as a glyph (FIT_MARGIN) and as line breaks.
            need = {glyph: np.array([cells_needed(c, 64, glyph) for c in chunks]) / (CHUNK_SIZE * cpt)
                    for glyph in (NEWLINE_GLYPH, None)}
            rows.append({
                "tokenizer": codec.name, "vocab": codec.vocab_size, "corpus": corpus, "chunks": len(chunks),
                "chars_per_token": cpt, "chunk_chars_mean": float(lengths.mean()),
                "chunk_chars_p99": float(np.percentile(lengths, 99)), "chunk_chars_max": int(lengths.max()),
                "need_p99_glyph": float(np.percentile(need[NEWLINE_GLYPH], 99)),
                "need_p99_breaks": float(np.percentile(need[None], 99)),
                "fit_glyph": {label: float(np.mean([fits(c, h, w, cw, lh, NEWLINE_GLYPH) for c in chunks]))
                              for label, h, w, _, cw, lh in CANDIDATES},
                "fit_breaks": {label: float(np.mean([fits(c, h, w, cw, lh) for c in chunks]))
                               for label, h, w, _, cw, lh in CANDIDATES},
            })
            print(f"{codec.name:10s} {corpus:12s} {len(chunks):5d} chunks  {cpt:.2f} chars/token", flush=True)
    flops = flops_per_chunk(CANDIDATES)
    result = {"command": " ".join(["python", "benchmarks/geometry.py"] + (argv or sys.argv[1:])),
              "machine": machine_description(), "seconds": time.time() - start, "skipped_corpora": skipped,
              "corpora": {n: {"documents": len(d), "held_out": len(held_out[n]),
                              "held_out_chars": sum(map(len, held_out[n]))} for n, d in texts.items()},
              "from_backbones": picked, "fit_margin": FIT_MARGIN, "fit_margin_line_breaks": FIT_MARGIN_LINE_BREAKS, "rows": rows, "flops": flops}
    out = REPO / "benchmarks" / "results"
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    rows, flops = result["rows"], result["flops"]
    labels = [c[0] for c in CANDIDATES]
    lines = [f"# Sketch geometry: fit and cost per chunk (L = {CHUNK_SIZE}, r = {RATIO}, m = {CHUNK_SIZE // RATIO})",
             "", f"Command: `{result['command']}` ({result['seconds']:.0f} s).", "",
             "Held-out text: " + ", ".join(f"{n} ({c['held_out']} of {c['documents']} documents, "
                                           f"{c['held_out_chars'] / 1e6:.2f} M chars)"
                                           for n, c in result["corpora"].items()) + ".", ""]
    if result["skipped_corpora"]:
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped_corpora"].items()), ""]
    lines += ["## Characters per token and per chunk", "",
              "| tokenizer | vocab | corpus | chunks | chars/token | chunk chars mean / p99 / max | cells needed, p99, "
              "in units of L x chars/token (64 columns): newline glyph / line breaks |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokenizer']} | {r['vocab']} | {r['corpus']} | {r['chunks']} | {r['chars_per_token']:.2f} "
                     f"| {r['chunk_chars_mean']:.0f} / {r['chunk_chars_p99']:.0f} / {r['chunk_chars_max']} | "
                     f"{r['need_p99_glyph']:.2f} / {r['need_p99_breaks']:.2f} |")
    for key, what in (("fit_glyph", f"newlines drawn as one glyph (newline_glyph={NEWLINE_GLYPH!r}, the default)"),
                      ("fit_breaks", "newlines break lines (newline_glyph=None)")):
        lines += ["", f"## Chunks that fit, {what}", "",
                  "Sketch, merge s, cell (px). A chunk fits when the renderer's hard wrap at the cell grid leaves no "
                  "line over.", "", "| tokenizer | corpus | " + " | ".join(labels) + " |",
                  "|---|---|" + "---|" * len(labels)]
        for r in rows:
            lines.append(f"| {r['tokenizer']} | {r['corpus']} | " + " | ".join(
                f"{100 * r[key][label]:.1f} %" for label in labels) + " |")
    lines += ["", "## The geometry from_backbones picks (L = 256, r = 4, 4x8-px cells, newline glyph)", "",
              "Characters per token on `vist2.training.models.PROSE_SAMPLE` (1 444 characters of narrative and "
              f"expository English) and `sketch_geometry` at that rate (FIT_MARGIN {result['fit_margin']}).", "",
              "| tokenizer | chars/token on PROSE_SAMPLE | sketch | merge s |", "|---|---|---|---|"]
    for name, g in result["from_backbones"].items():
        lines.append(f"| {name} | {g['chars_per_token']:.2f} | {g['image_height']}x{g['image_width']} | "
                     f"{g['merge_size']} |")
    lines += ["", "## FLOPs per chunk at the qwen3-0.6b shapes (SigLIP2-base tower, Qwen3-0.6B decoder)", "",
              f"Backbone decoder on L = {CHUNK_SIZE} text tokens: {flops['backbone_lm'] / 1e9:.1f} GFLOP; VIST2's "
              f"decoder on m = {CHUNK_SIZE // RATIO} visual tokens: {flops['vist2_lm'] / 1e9:.1f} GFLOP (no earlier "
              "context; attention to earlier context adds the same per entry in both, over r times fewer entries "
              "in VIST2).", "",
              "The last two columns: prefill of an 8k / 32k-token prompt, the backbone's FLOPs over VIST2's (the counted "
              "chunks plus causal attention across them, `prefill_flops`); the first-token targets on a GPU are 2x / 3x.",
              "", "| sketch | merge s | patches per chunk | cells (4x8 px) | tower + aligner GFLOP | tower / VIST2 decoder | "
              "VIST2 chunk / backbone chunk | prefill 8k | prefill 32k |", "|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for label, height, width, merge, *_ in CANDIDATES:
        if (height, width, merge) in seen:
            continue
        seen.add((height, width, merge))
        tower = next(v for v in flops["tower"].values() if tuple(v["shape"]) == (height, width, merge))
        total = tower["flops"] + flops["vist2_lm"]
        lines.append(f"| {height}x{width} | {merge} | {tower['patches']} | {(height // 8) * (width // 4)} | "
                     f"{tower['flops'] / 1e9:.1f} | {tower['flops'] / flops['vist2_lm']:.2f} | "
                     f"{total / flops['backbone_lm']:.2f} ({flops['backbone_lm'] / total:.2f}x fewer) | "
                     + " | ".join(f"{b / v:.2f}x" for b, v in (prefill_flops(flops, tower["flops"], n)
                                                               for n in (8192, 32768))) + " |")
    machine = result["machine"]
    cpu = "; ".join(" ".join(line.split()) for line in machine["lscpu"] if not line.startswith("Flags"))
    lines += ["", f"Machine: {cpu}; torch {machine['torch']}, transformers {machine['transformers']}; 2 cores shared "
              "with other jobs (FLOPs and fit rates do not depend on the machine).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
