"""The example scripts users run: generate from a long text, export to the Hub."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SAMPLE_TEXT

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import export_to_hub  # noqa: E402
import generate as generate_example  # noqa: E402


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, model, processor):
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text((EXAMPLES.parent / "chat_template.jinja").read_text())
    return folder


def test_generate_example_compresses_a_file_and_reports_the_cache(saved_model, tmp_path, capsys):
    text = tmp_path / "long.txt"
    text.write_text(SAMPLE_TEXT * 4)
    generate_example.main(["--model", str(saved_model), "--file", str(text), "--max-new-tokens", "8"])
    report = capsys.readouterr().out
    share = float(re.search(r"\(([\d.]+)% of it\)", report).group(1))
    assert "VIST2 cache:" in report and share < 30  # r = 4: a quarter plus one open chunk


def test_text_only_cache_size_counts_keys_and_values_of_every_layer(model):
    text = model.config.text_config
    expected = 10 * 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4
    assert generate_example.text_only_cache_bytes(model, 10) == expected


def test_export_writes_a_hub_ready_folder_with_a_model_card(saved_model, tmp_path):
    fidelity = tmp_path / "fidelity.json"
    fidelity.write_text('{"read-back character accuracy": "0.5", "command": "python research/evaluate_demo.py"}')
    out = export_to_hub.export(saved_model, tmp_path / "hub", "someone/vist2-tiny", fidelity, None)
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "configuration_vist2.py", "modeling_vist2.py",
            "processing_vist2.py", "processor_config.json", "tokenizer.json"} <= names
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "| read-back character accuracy | 0.5 |" in card
    assert "Efficiency\n\nNot measured" in card


def benchmark_case(context, model, ratio, kv, peak, flops, ttft, decode):
    return {"case": {"context": context, "ratio": ratio}, "model": model, "params": 2_000_000, "kv_bytes": kv,
            "peak_delta": peak, "flops": {"total": {"total": flops}}, "ttft_s": ttft, "decode_tok_s": decode,
            "loadavg_before": [1.5, 1.0, 1.0]}


def test_efficiency_section_compares_the_checkpoints_ratio_with_its_backbone_and_names_command_and_machine(tmp_path):
    run = {"command": "python benchmarks/vist2_bench.py --name tiny", "started": "2026-12-01T10:00:00",
           "args": {"preset": "tiny", "chunk_size": 64, "new_tokens": 32, "device": "cpu"},
           "machine": {"lscpu": ["Model name:   Some CPU"], "nproc": "8", "python": "3.11", "torch": "2.13",
                       "transformers": "5.25.0"},
           "cases": [benchmark_case(4096, "baseline", None, 400, 1000, 200, 6.0, 10.0),
                     benchmark_case(4096, "vist2-r4", 4, 100, 300, 50, 2.0, 25.0),
                     benchmark_case(4096, "vist2-r8", 8, 60, 200, 30, 1.0, 30.0)]}
    results = tmp_path / "bench.json"
    results.write_text(json.dumps(run))
    section = export_to_hub.efficiency_section(results, ratio=4)
    assert "| 4096 | vist2-r4 | 25.0% | 30.0% | 25.0% | 3.00x | 2.50x |" in section
    assert "vist2-r8" not in section  # another compression ratio than the checkpoint's
    assert "`python benchmarks/vist2_bench.py --name tiny`" in section and "Some CPU, 8 CPU cores" in section
    assert "transformers 5.25.0" in section
    assert "Not measured at compression ratio 2" in export_to_hub.efficiency_section(results, ratio=2)


def test_export_of_another_checkpoint_claims_no_measurement_of_the_demo_model(saved_model, tmp_path, monkeypatch):
    exported = []
    monkeypatch.setattr(export_to_hub, "export", lambda *args: exported.append(args) or Path(tmp_path))
    export_to_hub.main(["--model", str(saved_model), "--out", str(tmp_path / "hub")])
    export_to_hub.main(["--out", str(tmp_path / "demo")])  # the demo model, the repository root
    assert exported[0][3:] == (None, None)
    assert exported[1][3:] == (export_to_hub.DEMO_FIDELITY, export_to_hub.DEMO_EFFICIENCY)


def test_export_fills_the_cards_efficiency_section_from_the_committed_benchmark_run(saved_model, tmp_path):
    committed = export_to_hub.DEMO_EFFICIENCY  # the demo model's default
    assert committed.exists(), committed
    out = export_to_hub.export(saved_model, tmp_path / "hub", "someone/vist2-tiny", None, committed)
    card = (out / "README.md").read_text()
    efficiency = card.split("## Efficiency\n\n")[1].split("\n## ")[0]
    assert "Not measured" not in efficiency and "| 32768 | vist2-r4 |" in efficiency and "Machine:" in efficiency


USAGE_RUNNER = """
import re, sys
sys.modules["vist2"] = None  # only the exported folder's remote code may be used
folder = sys.argv[1]
card = open(folder + "/README.md").read()
snippets = "\\n".join(re.findall(r"```python\\n(.*?)```", card, re.S))  # every block, in order, as one script
snippets = snippets.replace('repo = "someone/vist2-tiny"', f"repo = {folder!r}")
snippets = snippets.replace("max_new_tokens=512", "max_new_tokens=24")  # the snippets as written, on a smaller budget
exec(compile(snippets, "model-card-usage", "exec"), {})
"""


def test_the_readmes_usage_snippets_run_as_written_on_the_demo_model(monkeypatch, capsys):
    """The README is the demo model's card: its code runs from the repository root as it stands (fewer new tokens)."""
    readme = (REPO / "README.md").read_text()
    snippets = "\n".join(re.findall(r"```python\n(.*?)```", readme, re.S))
    monkeypatch.chdir(REPO)
    exec(compile(re.sub(r"max_new_tokens=\d+", "max_new_tokens=8", snippets), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip(), "the first snippet prints what the model wrote"


def test_model_card_says_how_newlines_and_special_tokens_are_drawn():
    from vist2.training import tiny_config

    plain = tiny_config()
    inline = tiny_config(newline_glyph="«", special_token_glyphs={"<|endoftext|>": "©"})
    assert export_to_hub.drawing_of_newlines_and_special_tokens(plain) == "a newline starts a new line"
    assert (export_to_hub.drawing_of_newlines_and_special_tokens(inline) ==
            "newlines drawn in line as `«`, `<|endoftext|>` drawn as `©`")


def test_exported_folder_runs_the_model_card_usage_snippet_in_a_clean_process(saved_model, tmp_path):
    out = export_to_hub.export(saved_model, tmp_path / "hub", "someone/vist2-tiny", None, None)
    (tmp_path / "my_long_document.txt").write_text(SAMPLE_TEXT * 3)  # the file the card's snippet reads
    (tmp_path / "run.py").write_text(USAGE_RUNNER)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(out)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_quickstart_compresses_saves_sketches_reads_back_and_writes(saved_model, tmp_path, capsys):
    import quickstart

    sheet = tmp_path / "sketches.png"
    quickstart.main(["--model", str(saved_model), "--text", str(EXAMPLES / "data" / "long_text.txt"),
                     "--out", str(sheet), "--max-new-tokens", "8", "--write-context", "4",
                     "--recall-keys", "2"])
    report = capsys.readouterr().out
    from PIL import Image

    assert Image.open(sheet).size[0] > 64
    assert "read back from its sketch" in report and "--- continuation, from the last 4 closed chunks ---" in report
    assert re.search(r"hidden 64 chunks .*\nVIST2 answers '.*'; with another text's sketches: ('.*'|\(none of the "
                     r"same layout\))", report, re.S)
    controls = re.search(r"keys recalled from 64 chunks back: \d of 2; with another text's sketches: (\d) of (\d)", report)
    assert controls and int(controls[1]) <= int(controls[2]) <= 2  # a key without a same-layout prompt has no control
    assert re.search(r"--- beyond ASCII: \d+ characters -> \d+ closed chunks, \d+ kept as text", report)
    assert float(re.search(r"-> ([\d.]+)%", report).group(1)) < 30
