"""Assemble a Hub-ready VIST2 model repo: weights, config with auto_map, the three remote-code files, tokenizer,
processor config and a model card; optionally push it.

    python examples/export_to_hub.py --model path/to/checkpoint --out dist/vist2-demo
    python examples/export_to_hub.py --model path/to/checkpoint --out dist/vist2-demo --push --repo-id you/vist2-demo

Numbers in the card come only from measurement files of the checkpoint exported (`--fidelity`, `--efficiency`); for
the demo model (the repository root, the default `--model`) they default to its committed ones,
research/eval_results.json and benchmarks/results/cpu-small.json. Without them the card says "Not measured".
"""

import argparse
import json
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from transformers import AutoModelForCausalLM, AutoProcessor

REPO = Path(__file__).resolve().parents[1]
DEMO_FIDELITY, DEMO_EFFICIENCY = REPO / "research" / "eval_results.json", REPO / "benchmarks/results/cpu-small.json"

USAGE = '''```python
from transformers import AutoModelForCausalLM, AutoProcessor

repo = "{repo_id}"
long_text = open("my_long_document.txt").read()  # any long text
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
inputs = processor(text=long_text, return_tensors="pt")      # closed chunks become pixel_values
out = model.generate(**inputs, processor=processor, max_new_tokens=512)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```

Clients that tokenize for themselves get the compressed model too: plain token ids are laid out and their closed
chunks rendered by the model (with the processor built from its config and tokenizer). In a chat, leading system
turns stay text; later turns are compressed as they scroll out of the open chunk.

```python
from transformers import pipeline

pipe = pipeline("text-generation", model=repo, trust_remote_code=True)
print(pipe(long_text, max_new_tokens=512, do_sample=True, temperature=0.7, return_full_text=False)[0]["generated_text"])
chat = [{{"role": "system", "content": "Answer briefly."}}, {{"role": "user", "content": long_text + "\\nSummarise."}}]
print(pipe(chat, max_new_tokens=512)[0]["generated_text"][-1]["content"])
```'''

CARD = """---
{{ card_data }}
---

# {{ model_name }}

A VIST2 model ("Global Context Compression with Interleaved Vision-Text Transformation", arXiv 2601.10378): text is
cut into chunks of {{ chunk_size }} tokens; every closed chunk is rendered into a {{ image_size }} sketch, read by the
vision encoder and kept as {{ visual_tokens }} visual tokens (compression ratio {{ ratio }}), while reading the prompt
and while generating. The KV cache holds at most `|prefix| + {{ visual_tokens }} x closed chunks + {{ chunk_size }}`
entries.

## Usage

{{ usage }}

For book-length inputs, `inputs = model.read(processor, text)` streams the text chunk group by chunk group.

## Architecture

- Language model: {{ text_model }} ({{ text_params }} parameters)
- Vocabulary: {{ vocab_size }} tokens (the chunk size above is counted in these tokens)
- Vision encoder: {{ vision_model }} ({{ vision_params }} parameters)
- Modal aligner: `tanh(v W + b)` after a {{ merge }}x{{ merge }} patch merge
- Sketches: {{ image_size }}, glyph cells of {{ cell }} px, font `{{ font }}`, {{ newlines }}

## Fidelity

{{ fidelity }}

## Efficiency

{{ efficiency }}

## Limitations

- A chunk holding characters its font (`{{ font }}`) cannot draw, or text that overflows its sketch, is kept as
  plain text (reported by the processor), so such text is not compressed.
- Reading quality depends on training; see the fidelity section and its control (another text's sketches).
- The sketch layout is a fixed character grid: no shaping, bidirectional text or ligatures.
"""


def markdown_table(metrics: dict) -> str:
    rows = "\n".join(f"| {name} | {value} |" for name, value in metrics.items())
    return "| metric | value |\n| --- | --- |\n" + rows


def flatten(report: dict, prefix="") -> dict:
    """Nested metric groups become `group / metric` rows; examples and other lists stay out of the table."""
    rows = {}
    for name, value in report.items():
        if isinstance(value, dict):
            rows.update(flatten(value, f"{prefix}{name} / "))
        elif not isinstance(value, list):
            rows[f"{prefix}{name}"] = f"{value:.4g}" if isinstance(value, float) else value
    return rows


def fidelity_section(path: Path | None) -> str:
    if path is None or not path.exists():
        return "Not measured for this checkpoint."
    report = json.loads(path.read_text())
    command = report.pop("command", None)
    report.pop("model", None)  # (the path it was measured at: the card's model is this one)
    text = markdown_table(flatten(report))
    return text + (f"\n\nReproduce with `{command}`." if command else "")


def efficiency_section(path: Path | None, ratio: int | None = None) -> str:
    """The card's efficiency numbers, from a benchmark run (`benchmarks/vist2_bench.py` writes its JSON): VIST2
    against its own text-only backbone, in the same run, at the checkpoint's compression ratio, with the command and
    the machine. A markdown file is taken as written; a missing file is said so."""
    if path is None or not path.exists():
        return "Not measured for this checkpoint."
    if path.suffix != ".json":
        return path.read_text().strip()
    run = json.loads(path.read_text())
    cases = {(c["case"]["context"], c["model"]): c for c in run["cases"] if "error" not in c}
    rows, measured = [], []
    for (context, name), case in sorted(cases.items()):
        base = cases.get((context, "baseline"))
        if name == "baseline" or base is None or (ratio is not None and case["case"].get("ratio") != ratio):
            continue
        total_flops = [c.get("flops", {}).get("total", {}).get("total") for c in (case, base)]
        flops = f"{total_flops[0] / total_flops[1]:.1%}" if all(total_flops) else "not counted"
        measured += [case, base]
        rows.append(f"| {context} | {name} | {case['kv_bytes'] / base['kv_bytes']:.1%} | "
                    f"{case['peak_delta'] / base['peak_delta']:.1%} | {flops} | "
                    f"{base['ttft_s'] / case['ttft_s']:.2f}x | {case['decode_tok_s'] / base['decode_tok_s']:.2f}x |")
    if not rows:
        return f"Not measured at compression ratio {ratio} (`{path}` has other ratios)."
    machine = run["machine"]
    cpu = next((line.split(":", 1)[1].strip() for line in machine.get("lscpu", []) if line.startswith("Model name")),
               "unknown CPU")
    device = run["args"].get("device", "cpu")
    params = max(c.get("params", 0) for c in measured)
    load = [c["loadavg_before"][0] for c in measured if c.get("loadavg_before")]
    load = f", load average {min(load):.1f}-{max(load):.1f} before its cases" if load else ""
    return "\n".join([
        f"Measured against the text-only backbone of the same model, on the same tokens, in one run of "
        f"`{run['command']}` ({run['started']}); preset `{run['args'].get('preset')}`, a model of "
        f"{params / 1e6:.1f}M parameters with chunks of {run['args'].get('chunk_size')} tokens: the costs depend "
        "on the architecture and the sketch geometry, not on the weights. Ratios are VIST2 / backbone (KV cache after "
        "generation, peak memory of the generation, FLOPs of prefill + decode) or speed-ups (time to first token, "
        f"decode tokens/s), {run['args'].get('new_tokens')} generated tokens. `-read` rows read the prompt with "
        "`model.read` instead of `processor(text=...)`.",
        "",
        "| context (tokens) | model | KV cache | peak memory | FLOPs | first token | decode speed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Machine: {cpu}, {machine.get('nproc', '?')} {device.upper()} cores{load}; Python {machine.get('python')}, "
        f"torch {machine.get('torch')}, transformers {machine.get('transformers')}.",
    ])


def count(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M"


def drawing_of_newlines_and_special_tokens(config) -> str:
    # getattr: a checkpoint's own remote code may predate these settings
    newline = getattr(config, "newline_glyph", None)
    said = [f"newlines drawn in line as `{newline}`" if newline else "a newline starts a new line"]
    special = getattr(config, "special_token_glyphs", None) or {}
    said += [f"`{token}` drawn as `{glyph}`" for token, glyph in special.items()]
    return ", ".join(said)


def build_card(model, repo_id: str, fidelity: Path | None, efficiency: Path | None) -> ModelCard:
    config = model.config
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", license="apache-2.0",
                         tags=["vist2", "context-compression", "custom_code"], model_name=repo_id.split("/")[-1])
    return ModelCard.from_template(
        data,
        template_str=CARD,
        usage=USAGE.format(repo_id=repo_id),
        chunk_size=config.chunk_size,
        visual_tokens=config.visual_tokens_per_chunk,
        ratio=config.compression_ratio,
        image_size=f"{config.image_height}x{config.image_width}",
        merge=config.merge_size,
        cell=f"{config.char_width}x{config.line_height}",
        font=Path(config.font_path).name if config.font_path else "Pillow built-in",
        newlines=drawing_of_newlines_and_special_tokens(config),
        text_model=config.text_config.model_type,
        vision_model=config.vision_config.model_type,
        text_params=count(model.language_model),
        vocab_size=config.text_config.vocab_size,
        vision_params=count(model.vision_tower),
        fidelity=fidelity_section(fidelity),
        efficiency=efficiency_section(efficiency, config.compression_ratio),
    )


def export(model_dir, out_dir, repo_id, fidelity=None, efficiency=None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    build_card(model, repo_id, fidelity, efficiency).save(out / "README.md")
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO),
                        help="a saved VIST2 checkpoint (default: the demo model at the repository root)")
    parser.add_argument("--out", default="dist/vist2-demo")
    parser.add_argument("--repo-id", default="vist2/vist2-demo")
    parser.add_argument("--fidelity", type=Path, help="JSON of this checkpoint's fidelity metrics, as "
                        "research/evaluate_demo.py writes it (the demo model: its committed file)")
    parser.add_argument("--efficiency", type=Path, help="a benchmarks/vist2_bench.py run's JSON (or a markdown summary) "
                        "of this checkpoint, for the efficiency section (the demo model: its committed run)")
    parser.add_argument("--push", action="store_true", help="upload to --repo-id (needs a Hugging Face token)")
    parser.add_argument("--private", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    demo = Path(args.model).resolve() == REPO  # only the demo model's measurements are committed here
    fidelity = args.fidelity or (DEMO_FIDELITY if demo else None)
    efficiency = args.efficiency or (DEMO_EFFICIENCY if demo else None)
    out = export(args.model, args.out, args.repo_id, fidelity, efficiency)
    print(f"Hub-ready folder: {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    if args.push:
        if get_token() is None:
            raise SystemExit("No Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again.")
        api = HfApi()
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=args.repo_id, commit_message="Upload VIST2 model")
        print(f"Pushed to https://huggingface.co/{args.repo_id}")


if __name__ == "__main__":
    main()
