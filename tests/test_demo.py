"""The committed demo checkpoint (demo/vist2-demo) and the demo evaluation's metric functions.

The checkpoint is committed; `python examples/train_demo.py --out demo/vist2-demo` reproduces it (see
demo/NOTES.md). A missing checkpoint is a failure, not a skip.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo" / "vist2-demo"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def evaluate_demo():
    return load_example("evaluate_demo")


def test_char_accuracy_identical_is_one(evaluate_demo):
    assert evaluate_demo.char_accuracy("def f(x):\n    return x", "def f(x):\n    return x") == 1.0
    assert evaluate_demo.char_accuracy("", "") == 1.0


def test_char_accuracy_disjoint_is_low(evaluate_demo):
    assert evaluate_demo.char_accuracy("xxxxxxxxxx", "abcdefghij") == 0.0
    assert evaluate_demo.char_accuracy("", "abc") == 0.0
    assert evaluate_demo.char_accuracy("a much longer wrong answer", "abc") == 0.0  # floored, never negative


def test_char_accuracy_counts_edits(evaluate_demo):
    assert evaluate_demo.levenshtein("kitten", "sitting") == 3
    assert evaluate_demo.char_accuracy("abcdefghiX", "abcdefghij") == pytest.approx(0.9)
    assert evaluate_demo.char_accuracy("abcdefghi", "abcdefghij") == pytest.approx(0.9)


def test_cell_targets_match_the_renderer():
    """The auxiliary loss's per-cell labels are exactly where the renderer draws ink."""
    train_demo = load_example("train_demo")
    from transformers import AutoTokenizer

    from vist2.processing_vist2 import render_chunk

    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "demo_tokenizer")
    config = train_demo.demo_config(tokenizer)
    settings = config.sketch_settings
    text = "Return the sum of\n\tx and y (a tab, a newline) and a very long line that has to wrap " * 2
    grid = train_demo.cell_targets(text, settings)
    image, _ = render_chunk(text, settings)
    cells = image.reshape(grid.shape[0], config.line_height, grid.shape[1], config.char_width)
    has_ink = (cells < settings["background"]).any(axis=(1, 3))
    assert ((grid != 0) == has_ink).all()
    patches = train_demo.grid_to_units(grid, config, config.patch_size)
    assert patches.shape == ((config.image_height // 16) * (config.image_width // 16), 2)


@pytest.fixture(scope="module")
def demo_model():
    from transformers import AutoModelForCausalLM, AutoProcessor

    if not (DEMO / "config.json").exists():
        pytest.fail(f"{DEMO} is missing: run python examples/train_demo.py --out demo/vist2-demo (demo/NOTES.md)")
    model = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)
    return model, processor


def test_demo_checkpoint_is_small():
    weights = DEMO / "model.safetensors"
    assert weights.exists(), f"{weights} missing"
    assert weights.stat().st_size <= 50 * 2**20


def test_demo_checkpoint_loads_with_matching_processor(demo_model):
    model, processor = demo_model
    assert type(model).__name__ == "VIST2ForCausalLM"
    assert model.config.model_type == "vist2"
    assert processor.settings_mismatch(model.config) == {}
    assert model.config.chunk_size == 32 and model.config.compression_ratio == 4
    assert sum(p.numel() for p in model.parameters()) < 50_000_000
    auto_map = json.loads((DEMO / "config.json").read_text())["auto_map"]
    assert "AutoModelForCausalLM" in auto_map


def test_demo_checkpoint_generates_across_a_chunk_boundary(demo_model):
    model, processor = demo_model
    text = "Return a new list containing all items from the iterable in ascending order. " * 2
    inputs = processor(text=text, return_tensors="pt")
    assert inputs["pixel_values"].shape[0] >= 1  # a closed chunk was compressed into a sketch
    with torch.no_grad():
        out = model.generate(**inputs, processor=processor, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert isinstance(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0], str)
