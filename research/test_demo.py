"""The committed demo checkpoint (the repository root), the recipe that trains it and the evaluation's metrics.

`bash research/reproduce.sh demo` reproduces the checkpoint (research/README.md). A missing checkpoint is a failure,
not a skip.
"""

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO  # the checkout is the model repo
CONTROL = REPO / "research" / "text-only-baseline"
RESEARCH = REPO / "research"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, RESEARCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def evaluate_demo():
    return load_script("evaluate_demo")


def test_char_accuracy_identical_is_one(evaluate_demo):
    assert evaluate_demo.char_accuracy("def f(x):\n    return x", "def f(x):\n    return x") == 1.0
    assert evaluate_demo.char_accuracy("", "") == 1.0


def test_char_accuracy_disjoint_is_low(evaluate_demo):
    assert evaluate_demo.char_accuracy("xxxxxxxxxx", "abcdefghij") == 0.0
    assert evaluate_demo.char_accuracy("", "abc") == 0.0
    assert evaluate_demo.char_accuracy("a much longer wrong answer", "abc") == 0.0  # floored, never negative


def test_char_accuracy_counts_edits(evaluate_demo):
    assert evaluate_demo.char_accuracy("kitten", "sitting") == pytest.approx(1 - 3 / 7)  # three edits
    assert evaluate_demo.char_accuracy("abcdefghiX", "abcdefghij") == pytest.approx(0.9)
    assert evaluate_demo.char_accuracy("abcdefghi", "abcdefghij") == pytest.approx(0.9)


@pytest.mark.parametrize("newline_glyph, byte_aligned", [(None, False), ("«", False), ("«", True)])
def test_cell_targets_match_the_renderer(newline_glyph, byte_aligned):
    """The encoder stage's per-cell labels are exactly where the renderer draws ink."""
    train_demo = load_script("train_demo")
    from transformers import AutoTokenizer

    from vist2.processing_vist2 import render_chunk

    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "demo_tokenizer")
    config = train_demo.demo_config(tokenizer, newline_glyph)
    settings = {**config.sketch_settings, "byte_aligned": byte_aligned}
    text = "Return the sum of\n\tx and y (a tab, a newline) and a very long line that has to wrap, it’s said " * 2
    grid = train_demo.cell_targets(text, settings)
    image, _ = render_chunk(text, settings)
    cells = image.reshape(grid.shape[0], config.line_height, grid.shape[1], config.char_width)
    has_ink = (cells < settings["background"]).any(axis=(1, 3))
    assert ((grid != 0) == has_ink).all()
    tokens = train_demo.grid_to_units(grid, config, config.patch_size * config.merge_size)
    assert tokens.shape == (processor_tokens(config), 32)  # one row of 4 x 8 cells per visual token


def processor_tokens(config):
    return (config.image_height // (config.patch_size * config.merge_size)) * (
        config.image_width // (config.patch_size * config.merge_size))


def test_ratio_interval_of_a_constant_gap_is_that_gap(evaluate_demo):
    nll_control = torch.rand(64, 31, generator=torch.Generator().manual_seed(0)) * 3
    low, high = evaluate_demo.ratio_interval(nll_control + 0.1, nll_control)
    assert low == pytest.approx(np.exp(0.1)) and high == pytest.approx(np.exp(0.1))


def test_ratio_interval_holds_the_ratio_and_narrows_with_more_windows(evaluate_demo):
    generator = torch.Generator().manual_seed(0)
    widths = []
    for n in (64, 1024):
        nll_control = torch.rand(n, 31, generator=generator) * 3
        nll = nll_control + 0.1 + torch.randn(n, 31, generator=generator)
        ratio = np.exp((nll - nll_control).mean().item())
        low, high = evaluate_demo.ratio_interval(nll, nll_control)
        assert low < ratio < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


@pytest.fixture(scope="module")
def demo_model():
    from transformers import AutoModelForCausalLM, AutoProcessor

    if not (DEMO / "config.json").exists():
        pytest.fail(f"{DEMO} holds no checkpoint: run bash research/reproduce.sh demo (research/README.md)")
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


def run_train_demo(args):
    threads = torch.get_num_threads()
    try:
        load_script("train_demo").main(args)
    finally:
        torch.set_num_threads(threads)


BYTES = str(REPO / "tokenization" / "byte_tokenizer")


def run_encoder_stage(folder, *options):
    run_train_demo(["--encoder-steps", "2", "--encoder-batch", "2", "--data", "corpus", "--aligner-init-std", "0.3",
                    "--head-prior-init", "--aligner-lr", "1e-4", "--eval-every", "1", "--warmup", "1",
                    "--log", str(folder / "encoder.jsonl"), "--out", str(folder / "encoder"), *options])


@pytest.mark.parametrize("options", [["--chunk-sampling", "first"], ["--chunk-sampling", "any"]])
def test_encoder_stage_logs_held_out_character_accuracy_and_saves_the_encoder(tmp_path, options):
    """Stage 1: tower + aligner on the glyph-cell loss, no LM."""
    run_encoder_stage(tmp_path, *options)
    records = [json.loads(line) for line in (tmp_path / "encoder.jsonl").read_text().splitlines()]
    assert [r["encoder_step"] for r in records[1:]] == [0, 1]
    assert all(0 <= r["heldout_char_acc"] <= 1 for r in records[1:])
    assert (tmp_path / "encoder" / "model.safetensors").exists()


def test_read_back_warm_up_keeps_the_frozen_encoder_and_trains_a_byte_level_lm(tmp_path):
    """Stage 2: the encoder frozen, a fresh LM of the byte tokenizer's vocabulary reads back random characters."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    run_encoder_stage(tmp_path)
    log, out = tmp_path / "warmup.jsonl", tmp_path / "warmup"
    run_train_demo(["--tokenizer", BYTES, "--readback-only", "--init", str(tmp_path / "encoder"), "--freeze",
                    "vision+aligner", "--data", "chars", "--steps", "2", "--batch-size", "2", "--warmup", "1",
                    "--eval-every", "1", "--log-every", "1", "--log", str(log), "--out", str(out)])
    encoder, warm = load_file(str(tmp_path / "encoder" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(value, encoder[name]) for name, value in warm.items()
               if name.startswith(("vision_tower.", "aligner.")))
    assert warm["language_model.model.embed_tokens.weight"].shape[0] == len(AutoTokenizer.from_pretrained(out)) == 260
    records = [json.loads(line) for line in log.read_text().splitlines()][1:]
    assert all(0 <= r[f"{probe}_tf_acc{which}"] <= 1
               for r in records for probe in ("random", "heldout") for which in ("", "_wrong"))


@pytest.fixture(scope="module")
def warm_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("warm")
    run_encoder_stage(folder)
    run_train_demo(["--tokenizer", BYTES, "--readback-only", "--init", str(folder / "encoder"), "--freeze",
                    "vision+aligner", "--data", "chars", "--steps", "1", "--batch-size", "2", "--warmup", "1",
                    "--eval-every", "1", "--log", str(folder / "warmup.jsonl"), "--out", str(folder / "warmup")])
    return folder / "warmup"


@pytest.mark.parametrize("options", [
    ["--freeze", "vision+aligner", "--chunk-sampling", "any", "--mix-chars", "0.5"],
    ["--freeze", "vision+aligner", "--mix-chars", "0.5", "--chars-newlines", "0.1"],
    ["--mix-chars", "0.5", "--chars-layout", "corpus+eos", "--newline-glyph", "«", "--separator-glyph", "©",
     "--readback-noise", "0.1", "--overlap-rows", "0.5", "--read-back-positions", "before_next_chunk"]])
def test_reader_stage_goes_on_from_its_init_and_saves_its_sketch_settings(tmp_path, warm_checkpoint, options):
    """Stages 3-18: `c_1 V_1 c_2` windows; a frozen encoder stays as it was; the glyph and read-back settings a stage
    trains with are saved in its checkpoint's config."""
    from safetensors.torch import load_file

    log, out = tmp_path / "log.jsonl", tmp_path / "reader"
    run_train_demo(["--tokenizer", BYTES, "--init", str(warm_checkpoint), "--steps", "2", "--batch-size", "2",
                    "--warmup", "1", "--eval-every", "1", "--log-every", "1", "--log", str(log), "--out", str(out),
                    *options])
    init, reader = load_file(str(warm_checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    encoder_kept = all(torch.equal(value, init[name]) for name, value in reader.items()
                       if name.startswith(("vision_tower.", "aligner.")))
    assert encoder_kept == ("vision+aligner" in options)
    assert any(not torch.equal(reader[n], init[n]) for n in reader if n.startswith("language_model."))
    saved = json.loads((out / "config.json").read_text())
    assert saved.get("newline_glyph") == ("«" if "--newline-glyph" in options else None)
    assert saved.get("special_token_glyphs") == ({"<|endoftext|>": "©"} if "--separator-glyph" in options else None)
    assert saved["read_back_positions"] == ("before_next_chunk" if "--read-back-positions" in options
                                            else "after_sketch")
    records = [json.loads(line) for line in log.read_text().splitlines()][1:]
    assert all(0 <= r[f"{probe}_tf_acc{which}"] <= 1
               for r in records for probe in ("heldout", "chars", "layout") for which in ("", "_wrong"))


def test_random_character_row_reads_back_c1_and_predicts_nothing_after_it():
    """`--mix-chars`: a row `c_1 V_1 <eos>` of random characters whose only targets are c_1's read-back."""
    import random

    from transformers import AutoTokenizer

    from vist2 import VIST2Processor

    train_demo = load_script("train_demo")
    tokenizer = AutoTokenizer.from_pretrained(BYTES)
    processor = VIST2Processor.from_config(train_demo.demo_config(tokenizer), tokenizer)
    draw = train_demo.chunk_sampler(tokenizer, "chars", train_demo.random_token_pool(tokenizer, "chars"))
    chars = draw(1, random.Random(0))[0].tolist()
    sample = train_demo.make_sample(processor, chars + [tokenizer.eos_token_id],
                                    trainable=[True] * train_demo.CHUNK + [False])
    m = processor.visual_tokens_per_chunk
    assert sample["input_ids"] == chars + [processor.sketch_token_id] * m + [tokenizer.eos_token_id]
    assert sample["labels"] == [-100] + chars[1:] + [-100] * (m + 1)
    assert len(sample["sketches"]) == 1


def recipe():
    """research/reproduce.sh's training and evaluation commands, split into arguments, for its default output."""
    import shlex

    script = (RESEARCH / "reproduce.sh").read_text().replace("\\\n", " ")
    variables = {"$BYTES": "tokenization/byte_tokenizer", "$BUILD": "research/build", "$LOGS": "research/build/logs"}
    commands = []
    for line in script.splitlines():
        line = line.strip()
        if re.fullmatch(r'[A-Z]+="[^"$]*"', line):  # a shared set of flags, e.g. COMMON="..."
            name, value = line.split("=", 1)
            variables["$" + name] = value.strip('"')
        if line.startswith(("python research/", "python examples/")):
            for name, value in variables.items():
                line = line.replace(name, value)
            commands.append(shlex.split(line))
    return commands


def test_reproduce_script_commands_parse_with_the_current_scripts():
    """research/reproduce.sh is the one command that rebuilds the checkpoint: every flag it passes must exist, and its
    stages must chain."""
    commands = recipe()
    trainings = [c for c in commands if c[1] == "research/train_demo.py"]
    recall = [c for c in commands if c[1] == "research/passkey_finetune.py"]
    evaluations = [c for c in commands if c[1] == "research/evaluate_demo.py"]
    passkeys = [c for c in commands if c[1] == "examples/passkey.py"]
    distills = [c for c in commands if c[1] == "research/font_distill.py"]
    assert len(trainings) + len(recall) + len(evaluations) + len(passkeys) + len(distills) == len(commands)
    assert len(evaluations) == len(passkeys) == 2  # into build/, or the root
    train_demo = load_script("train_demo")
    runs = [train_demo.parse_args(c[2:]) for c in trainings]
    vist2, text_only = [r for r in runs if not r.text_only], [r for r in runs if r.text_only]
    encoder, warmup, *readers = vist2
    assert encoder.encoder_steps and warmup.readback_only and warmup.data == "chars" and warmup.init == encoder.out
    assert [r.init for r in readers] == [warmup.out] + [r.out for r in readers[:-1]]  # each stage goes on from the last
    assert [r.init for r in text_only] == [None] + [r.out for r in text_only[:-1]]
    assert len({run.tokenizer for run in runs[1:]}) == 1 and (REPO / readers[-1].tokenizer).is_dir()
    assert len(readers) == len(text_only) == 16
    for reader, control in zip(readers, text_only):  # the control gets the same LM steps, stage by stage
        assert ((control.steps, control.batch_size, control.chunk_sampling, control.lr, control.warmup) ==
                (reader.steps, reader.batch_size, reader.chunk_sampling, reader.lr, reader.warmup))
        assert control.seed == reader.seed  # and the same windows
    for glyph in ("newline_glyph", "separator_glyph"):  # once drawn in one cell, every later stage draws them so
        glyphs = [getattr(r, glyph) for r in readers]
        assert glyphs[-1] and glyphs == sorted(glyphs, key=bool) and len(set(filter(None, glyphs))) == 1
    positions = [r.read_back_positions for r in readers]  # the layout a stage's checkpoint was trained on is kept
    assert positions == sorted(positions, key=lambda p: p == "before_next_chunk")
    seeds = [r.seed for r in readers]  # stages 3-10 ran with seed 0 and replayed their windows; each later one draws anew
    fresh_seeds = seeds[next(i for i, seed in enumerate(seeds) if seed):]
    assert all(fresh_seeds) and len(fresh_seeds) == len(set(fresh_seeds)) >= 4
    finetune = load_script("passkey_finetune")
    recall = [finetune.parse_args(c[2:]) for c in recall]
    vist2_recall, text_only_recall = [r for r in recall if not r.text_only], [r for r in recall if r.text_only]
    # a new font before the last step: its tower distilled from the old one, then Latin-1 read back by the whole model
    font, latin1 = [load_script("font_distill").parse_args(c[2:]) for c in distills]
    assert font.init == vist2_recall[-6].out and latin1.init == font.out and font.byte_aligned and latin1.byte_aligned
    assert (font.latin1_rows, font.train_lm, bool(latin1.latin1_rows), latin1.train_lm) == (0, "none", True, "all")
    assert [r.init for r in vist2_recall] == ([readers[-1].out] + [r.out for r in vist2_recall[:-6]] + [latin1.out] +
                                              [r.out for r in vist2_recall[-5:-1]])
    assert [r.init for r in text_only_recall] == [text_only[-1].out] + [r.out for r in text_only_recall[:-1]]
    assert [r.max_k for r in vist2_recall] == [1, 8, 64, 64, 64, 64, 64, 64] + [96] * 11
    assert vist2_recall[-1].answer_across_chunks
    assert [bool(r.readback_rows) for r in vist2_recall] == [False] + [True] * 18  # kept once windows come
    # the last eight steps sharpen reading (random-character rows, the tower trained), then make 80 % of the prompts'
    # answers close the open chunk, the case recall missed most, then draw k past the longest window, then read back
    # the chunks those answers close, four times, then draw more prompts at the distances still short of the target;
    # the last five, after the new font, also read back rows of Latin-1 characters, the last three drawing their prompts
    # where the steps before them still missed
    assert [(bool(r.chars_rows), r.train_encoder) for r in vist2_recall[-14:]] == [(False, False)] + [(True, True)] * 13
    assert [r.closing_share for r in vist2_recall[-14:]] == [0.5, 0.5] + [0.8] * 12
    assert [r.closing_readback_rows for r in vist2_recall] == [0] * 9 + [4] * 10
    assert [(r.focus_k, r.focus_share) for r in vist2_recall if r.focus_k] == ([([(1, 2), (48, 80)], 0.4)] * 3 +
                                                                                [([(1, 4), (24, 80)], 0.4)] +
                                                                                [([(1, 2)], 0.4)] * 2)
    assert [r.wide_share > 0 for r in vist2_recall] == [False] * 14 + [True] * 5
    for reader, control in zip(vist2_recall, text_only_recall, strict=True):  # the same prompts and windows per stage
        same = ("steps", "batch_size", "min_k", "max_k", "seed", "lr", "warmup", "answer_suffix", "answer_across_chunks",
                "window_rows", "window_chunks", "closing_share", "focus_k", "focus_share")
        assert [getattr(control, k) for k in same] == [getattr(reader, k) for k in same]
    for build in evaluations[-1], passkeys[-1]:
        assert build[build.index("--model") + 1] == vist2_recall[-1].out
        assert build[build.index("--text-only") + 1] == text_only_recall[-1].out
    logs = {Path(r.log).name for r in runs + recall + [font, latin1]}
    assert logs == {p.name for p in (RESEARCH / "logs").glob("training_log.*.jsonl")}  # the committed logs, no other


def test_committed_checkpoint_has_the_sketch_settings_of_the_recipes_last_stage():
    runs = [load_script("train_demo").parse_args(c[2:]) for c in recipe() if c[1] == "research/train_demo.py"]
    font = [load_script("font_distill").parse_args(c[2:]) for c in recipe() if c[1] == "research/font_distill.py"][-1]
    last = [r for r in runs if not r.text_only][-1]
    config = json.loads((DEMO / "config.json").read_text())
    assert config["newline_glyph"] == font.newline_glyph
    assert config["special_token_glyphs"] == {"<|endoftext|>": font.separator_glyph}
    assert (config["font_path"], config["byte_aligned"]) == (Path(font.font_path).name, font.byte_aligned)
    assert (DEMO / font.font_path).is_file() and (DEMO / "DejaVuSansMono-LICENSE.txt").is_file()  # with its licence
    assert config["read_back_positions"] == last.read_back_positions


@pytest.mark.parametrize("sampling", ["first", "any"])
def test_chunk_sampler_draws_window_starts_or_chunks_at_any_offset(sampling):
    """`--chunk-sampling`: "first" trains on window starts only; "any" on slices of the stream at any offset."""
    import random

    from transformers import AutoTokenizer

    train_demo = load_script("train_demo")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "demo_tokenizer")
    windows = train_demo.corpus_windows(tokenizer, "train")
    stream = windows.reshape(-1).tolist()
    starts = {tuple(w[: train_demo.CHUNK].tolist()) for w in windows}
    draw = train_demo.chunk_sampler(tokenizer, "corpus", [], sampling=sampling)
    chunks = [tuple(c) for c in draw(64, random.Random(0)).tolist()]
    window_starts = sum(c in starts for c in chunks)
    if sampling == "first":
        assert window_starts == len(chunks)
    else:
        assert window_starts < len(chunks) // 4
        text = f" {' '.join(map(str, stream))} "
        assert all(f" {' '.join(map(str, c))} " in text for c in chunks)
    windows_drawn = train_demo.chunk_sampler(tokenizer, "corpus", [], 2 * train_demo.CHUNK, sampling)(8, random.Random(0))
    whole_windows = sum(tuple(w) in set(map(tuple, windows.tolist())) for w in windows_drawn.tolist())
    assert whole_windows == (8 if sampling == "first" else 0)  # the reader and text-only stages draw 2-chunk windows
    heldout = {tuple(w[: train_demo.CHUNK].tolist()) for w in train_demo.corpus_windows(tokenizer, "heldout")}
    assert all(tuple(c) in heldout for c in draw(16, random.Random(0), "heldout").tolist())


def test_corpus_token_streams_are_cached_per_tokenizer(tmp_path):
    """`--tokenizer`: a cached stream of one vocabulary is never served to another."""
    from transformers import AutoTokenizer

    train_demo = load_script("train_demo")
    demo, byte = (AutoTokenizer.from_pretrained(REPO / "tokenization" / name) for name in ("demo_tokenizer",
                                                                                            "byte_tokenizer"))
    first = train_demo.corpus_windows(demo, "heldout", cache_dir=tmp_path)
    bytes_ = train_demo.corpus_windows(byte, "heldout", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("heldout_tokens.*.npy"))) == 2
    assert bytes_.size > 3 * first.size and int(bytes_.max()) < len(byte)
    assert byte.decode(bytes_[0].tolist()) == demo.decode(first.reshape(-1).tolist())[: train_demo.CHUNK * 2]
    assert np.array_equal(train_demo.corpus_windows(byte, "heldout", cache_dir=tmp_path), bytes_)


def test_evaluation_reports_each_measure_with_its_wrong_image_control(evaluate_demo):
    results = evaluate_demo.evaluate(DEMO, CONTROL, n_ppl=4, n_readback=2, batch=4)
    read_back, perplexity = results["read_back"], results["perplexity_c2"]
    assert read_back["n"] == 2 and results["n_ppl"] == 4
    assert all(0 <= read_back[k] <= 1 for k in ("char_accuracy", "char_accuracy_special_tokens_as_names",
                                                "wrong_image_char_accuracy"))
    by_newlines = read_back["char_accuracy_by_newlines_in_chunk"].values()
    assert sum(part["n"] for part in by_newlines) == 2
    assert sum(part["n"] * part["char_accuracy"] for part in by_newlines) / 2 == pytest.approx(read_back["char_accuracy"])
    worst = read_back["worst"]  # the lowest read-backs first, each with its teacher-forced accuracy
    assert len(worst) == 2 and worst[0]["char_accuracy"] <= worst[1]["char_accuracy"]
    assert min(w["char_accuracy"] for w in worst) == pytest.approx(worst[0]["char_accuracy"])
    assert all(0 <= w["token_accuracy_teacher_forced"] <= 1 for w in worst)
    assert {"vist2_visual_context", "vist2_wrong_image", "vist2_no_context", "text_only_text_context",
            "text_only_no_context"} <= set(perplexity)
    assert perplexity["ratio_vist2_to_text_only"] == pytest.approx(
        perplexity["vist2_visual_context"] / perplexity["text_only_text_context"])
    leak = results["probability_of_c1_byte_at_c2_byte"]
    assert set(leak) == set(results["perplexity_c2_by_byte"])
    assert all(set(v) == {"vist2_visual_context", "text_only_text_context"} for v in leak.values())


def test_perplexity_by_byte_bands_averages_to_the_whole_chunks_perplexity(evaluate_demo):
    import math

    results = evaluate_demo.evaluate(DEMO, CONTROL, n_ppl=4, n_readback=1, batch=4)
    bands = results["perplexity_c2_by_byte"]
    assert [(a, b) for a, b in evaluate_demo.BYTE_BANDS] == [(2, 4), (5, 8), (9, 16), (17, 32)]
    for measure, perplexity in results["perplexity_c2"].items():
        if measure.startswith("ratio"):
            continue
        mean_log = sum((b - a + 1) * math.log(bands[f"bytes {a}-{b}"][measure]) for a, b in evaluate_demo.BYTE_BANDS)
        assert mean_log / 31 == pytest.approx(math.log(perplexity)), measure


def test_evaluated_per_byte_loss_is_the_models_own_loss_on_c2(evaluate_demo, demo_model):
    """The evaluation scores c_2[1:] from the logits; the model's `labels` loss over the same bytes must agree."""
    model, processor = demo_model
    samples = evaluate_demo.heldout_samples(processor, model.config, processor.tokenizer, 3)
    L, m = model.config.chunk_size, processor.visual_tokens_per_chunk
    window = torch.tensor([s["window"][: 2 * L] for s in samples])
    ids = torch.cat([window[:, :L], torch.full((3, m), processor.sketch_token_id), window[:, L:]], 1)
    labels = torch.full_like(ids, -100)
    labels[:, L + m + 1 :] = window[:, L + 1 :]
    chunks = torch.cat([torch.ones(3, L + m, dtype=torch.long), torch.full((3, L), 2)], 1)
    pixels = evaluate_demo.sketches(processor, samples)
    with torch.no_grad():
        loss = model(input_ids=ids, chunk_ids=chunks, pixel_values=pixels, labels=labels,
                     read_back=torch.zeros(3, dtype=torch.bool)).loss
    logprobs = evaluate_demo.vist2_logprobs(model, processor, samples, pixels, L)
    nll = evaluate_demo.nll_of(logprobs, window[:, L:])
    assert nll.shape == (3, L - 1) and nll.mean().item() == pytest.approx(loss.item(), rel=1e-5)


def test_long_window_nll_of_a_two_chunk_window_is_the_next_chunk_nll(evaluate_demo, demo_model):
    """(d) over a window of two chunks scores what (b) scores: c_2's bytes 2..L given V_1, NaN where no text of the
    chunk precedes (c_1's first byte and c_2's)."""
    model, processor = demo_model
    samples = evaluate_demo.heldout_samples(processor, model.config, processor.tokenizer, 2)
    L = model.config.chunk_size
    windows = [np.array(s["window"]) for s in samples]
    nll = evaluate_demo.long_window_nll(model, processor, windows)
    assert nll.shape == (2, 2 * L) and nll[:, [0, L]].isnan().all() and not nll[:, 1:L].isnan().any()
    logprobs = evaluate_demo.vist2_logprobs(model, processor, samples, evaluate_demo.sketches(processor, samples), L)
    expected = evaluate_demo.nll_of(logprobs, torch.tensor(np.stack(windows)[:, L:]))
    assert torch.allclose(nll[:, L + 1 :], expected, atol=1e-4)


def test_text_only_window_nll_is_the_models_own_loss(evaluate_demo):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(CONTROL).eval()
    windows = [np.arange(40, 104) % 200, np.arange(100, 164) % 200]
    nll = evaluate_demo.text_only_window_nll(model, windows)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor(np.stack(windows)), labels=torch.tensor(np.stack(windows))).loss
    assert nll[:, 0].isnan().all() and nll[:, 1:].mean().item() == pytest.approx(loss.item(), rel=1e-5)


def test_long_window_evaluation_reports_the_control_and_bands_by_preceding_chunks(evaluate_demo, demo_model):
    from transformers import AutoModelForCausalLM

    model, processor = demo_model
    baseline = AutoModelForCausalLM.from_pretrained(CONTROL).eval()
    result = evaluate_demo.long_windows(model, processor, baseline, window_chunks=4, limit=3)
    assert result["windows"] == 3 and set(result["perplexity"]) == {
        "vist2_visual_context", "vist2_other_windows_sketches", "text_only_text_context"}
    assert list(result["perplexity_by_chunk"]) == ["chunks 2-2", "chunks 3-4"]
    low, high = result["ratio_vist2_to_text_only_95ci"]
    assert low <= result["ratio_vist2_to_text_only"] <= high


def test_read_back_leak_is_the_probability_of_c1s_byte_where_it_differs_from_c2s(evaluate_demo):
    """Under the layout a chunk read back from V_1 and the chunk after it see the same thing: the evaluation reports how
    much probability c_2's bytes give to c_1's byte at the same place, undefined where the two bytes agree."""
    L = 4
    samples = [{"window": [1, 2, 3, 4, 5, 2, 7, 8]}]  # c_1 = 1 2 3 4, c_2 = 5 2 7 8: byte 2 agrees
    nll_of_c1 = torch.log(torch.tensor([[2.0, 4.0, 5.0]]))  # probabilities 1/2, 1/4, 1/5 of c_1's bytes 2, 3, 4
    leak = evaluate_demo.read_back_leak(nll_of_c1, samples, L)
    assert torch.isnan(leak[0, 0]) and leak[0, 1:].tolist() == pytest.approx([0.25, 0.2])


def test_evaluation_refuses_a_text_only_control_with_another_tokenizer(evaluate_demo, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    control = tmp_path / "control"
    shutil.copytree(CONTROL, control)
    other = "demo_tokenizer" if len(AutoTokenizer.from_pretrained(DEMO)) == 260 else "byte_tokenizer"
    AutoTokenizer.from_pretrained(REPO / "tokenization" / other).save_pretrained(control)
    with pytest.raises(ValueError, match="another tokenizer"):
        evaluate_demo.evaluate(DEMO, control, n_ppl=2, n_readback=1, batch=2)


def test_random_newlines_replace_characters_at_the_given_rate_and_draw_nothing_at_zero():
    import random

    train_demo = load_script("train_demo")
    ids, rng = list(range(1000, 5000)), random.Random(0)
    state = rng.getstate()
    assert train_demo.with_random_newlines(ids, 10, 0.0, rng) == ids and rng.getstate() == state
    spread = train_demo.with_random_newlines(ids, 10, 0.25, rng)
    assert 0.22 < spread.count(10) / len(ids) < 0.28
    assert all(new in (old, 10) for new, old in zip(spread, ids))


def test_layout_keeps_spaces_tabs_and_newlines_and_the_document_separator_only_when_asked():
    from transformers import AutoTokenizer

    train_demo = load_script("train_demo")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "byte_tokenizer")
    whitespace = {tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in " \n\t"}
    assert train_demo.layout_token_ids(tokenizer, separators=False) == whitespace
    assert train_demo.layout_token_ids(tokenizer, separators=True) == whitespace | {tokenizer.eos_token_id}


def test_corpus_layout_keeps_the_chunks_whitespace_in_place_and_draws_every_other_token_from_the_pool():
    import random

    train_demo = load_script("train_demo")
    template, whitespace, pool = [5, 1, 6, 7, 2, 2, 8, 1], {1, 2}, list(range(100, 200))
    row = train_demo.with_corpus_layout(template, whitespace, pool, random.Random(0))
    assert [i for i, t in enumerate(row) if t in whitespace] == [i for i, t in enumerate(template) if t in whitespace]
    assert all(t in pool for t, old in zip(row, template) if old not in whitespace)
    assert row != train_demo.with_corpus_layout(template, whitespace, pool, random.Random(1))


def test_corpus_layout_with_wide_characters_keeps_whitespace_and_places_whole_characters_only():
    import random

    train_demo = load_script("train_demo")
    template, whitespace, pool = [5, 1, 6, 7, 8, 2, 9, 10, 11, 12, 1, 13] * 4, {1, 2}, list(range(100, 200))
    wide = [(300, 301), (310, 311, 312)]
    row = train_demo.with_corpus_layout(template, whitespace, pool, random.Random(0), wide)
    assert len(row) == len(template)
    assert [i for i, t in enumerate(row) if t in whitespace] == [i for i, t in enumerate(template) if t in whitespace]
    i, placed = 0, 0
    while i < len(row):  # every token is from the pool, or starts a whole wide character
        char = next((c for c in wide if tuple(row[i : i + len(c)]) == c), None)
        assert char or row[i] in pool or row[i] in whitespace
        i, placed = i + (len(char) if char else 1), placed + bool(char)
    assert placed > 0


def test_wide_characters_are_the_repertoires_characters_of_several_tokens():
    from transformers import AutoTokenizer

    train_demo = load_script("train_demo")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "byte_tokenizer")
    wide = train_demo.wide_characters(tokenizer, "aé«€")
    assert [tokenizer.decode(list(ids)) for ids in wide] == ["é", "«", "€"]
    assert all(len(ids) > 1 for ids in wide)
    assert all(c in train_demo.LATIN1_REPERTOIRE for c in "éÅ«»©“”–—…€") and "\xad" not in train_demo.LATIN1_REPERTOIRE


def test_text_only_control_continues_from_init(tmp_path):
    """`--text-only --init DIR` (reproduce.sh's last control stage) starts from DIR's weights, not from scratch."""
    from safetensors.torch import load_file

    common = ["--text-only", "--tokenizer", str(REPO / "tokenization" / "byte_tokenizer"), "--steps", "1",
              "--batch-size", "2", "--warmup", "1", "--log-every", "1"]
    run_train_demo([*common, "--out", str(tmp_path / "first"), "--log", str(tmp_path / "first.jsonl")])
    run_train_demo([*common, "--init", str(tmp_path / "first"), "--lr", "0", "--out", str(tmp_path / "next"),
                    "--log", str(tmp_path / "next.jsonl")])
    first, continued = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("first", "next"))
    assert first.keys() == continued.keys()
    assert all(torch.equal(first[name], continued[name]) for name in first)  # lr 0: nothing moved from the init


def test_readback_noise_replaces_only_the_read_back_text_in_a_copy_of_the_inputs():
    """`--readback-noise P`: the text of chunks read back from their sketches gets random inputs at rate P; sketches,
    padding, the open chunk and rows without read-back stay as they are, and so does the batch (its
    labels keep the true text)."""
    import random

    from transformers import AutoTokenizer

    from vist2 import VIST2Processor

    train_demo = load_script("train_demo")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "byte_tokenizer")
    config = train_demo.demo_config(tokenizer)
    processor = VIST2Processor.from_config(config, tokenizer)
    draw = train_demo.chunk_sampler(tokenizer, "corpus", [], 3 * train_demo.CHUNK)
    samples = [train_demo.make_sample(processor, w) for w in draw(64, random.Random(0), "heldout").numpy()]
    batch = train_demo.make_batch(processor, [s for s in samples if s is not None])
    pool = list(range(200, 210))
    sketch_id, original = processor.sketch_token_id, batch["input_ids"].clone()
    read_back_rows = torch.arange(len(original)) % 2 == 0

    def noise(probability, seed=0):
        generator = torch.Generator().manual_seed(seed)
        return train_demo.with_readback_noise(batch, read_back_rows, sketch_id, pool, probability, generator)

    noisy = noise(0.25)
    closed_text = (batch["chunk_ids"] >= 1) & (batch["chunk_ids"] <= 2) & (batch["input_ids"] != sketch_id)
    read_back = closed_text & read_back_rows[:, None]
    changed = noisy != batch["input_ids"]
    assert not changed[~read_back].any()
    assert 0.22 < changed[read_back].float().mean() < 0.28
    assert all(int(i) in pool for i in noisy[changed])
    assert torch.equal(noisy, noise(0.25)) and not torch.equal(noisy, noise(0.25, seed=1))
    assert torch.equal(noise(0.0), original) and torch.equal(batch["input_ids"], original)


def test_overlap_window_starts_c2_that_many_tokens_before_the_end_of_c1():
    train_demo = load_script("train_demo")
    L = train_demo.CHUNK
    window = train_demo.with_overlap(np.arange(2 * L), 3)
    assert window.shape == (2 * L,) and window[:L].tolist() == list(range(L))
    assert window[L:].tolist() == list(range(L - 3, 2 * L - 3))


def test_passkey_training_samples_carry_labels_on_the_answer_alone_in_the_generation_layout():
    import random

    from vist2 import VIST2Processor

    finetune = load_script("passkey_finetune")
    processor = VIST2Processor.from_pretrained(str(DEMO))
    filler = finetune.passkey.corpus_filler()
    rng = random.Random(0)
    sample = next(s for s in (finetune.passkey_sample(processor, filler, 4, rng) for _ in range(20)) if s is not None)
    labels = [t for t in sample["labels"] if t != -100]
    assert processor.decode(labels).strip().isdigit() and len(processor.decode(labels).strip()) == 5
    assert sample["sketches"] and sample["labels"][-len(labels):] == labels  # the answer ends the open chunk
    closed = sample["input_ids"].count(processor.sketch_token_id) // processor.visual_tokens_per_chunk
    assert closed == len(sample["sketches"]) >= 5  # every closed chunk is a sketch only: the key line is among them
    assert len([c for c in sample["chunk_ids"] if c == max(sample["chunk_ids"])]) <= processor.chunk_size


def test_passkey_answer_suffix_is_labelled_so_the_model_learns_where_the_key_ends():
    import random

    from vist2 import VIST2Processor

    finetune = load_script("passkey_finetune")
    processor = VIST2Processor.from_pretrained(str(DEMO))
    filler = finetune.passkey.corpus_filler()
    rng = random.Random(0)
    sample = next(s for s in (finetune.passkey_sample(processor, filler, 2, rng, suffix=".") for _ in range(20)) if s)
    answer = processor.decode([t for t in sample["labels"] if t != -100])
    assert answer.startswith(" ") and answer.endswith(".") and answer[1:-1].isdigit() and len(answer) == 7


def test_a_passkey_answer_that_closes_the_open_chunk_is_trained_on_the_logits_generation_gives(demo_model):
    """Generation compresses the chunk the answer's first tokens close and goes on from its sketch; with
    `across_chunks` such a sample is laid out so that the loss sees exactly the logits of those generation steps."""
    import random

    finetune = load_script("passkey_finetune")
    model, processor = demo_model
    filler, L = finetune.passkey.corpus_filler(), processor.chunk_size
    seed = next(seed for seed in range(200)  # a prompt whose open chunk the answer's first tokens close
                if len(processor.encode(finetune.passkey.make_trial(processor, filler, 2, random.Random(seed)).prompt))
                % L > L - 4)
    trial = finetune.passkey.make_trial(processor, filler, 2, random.Random(seed))
    inputs = processor(text=trial.prompt)
    with torch.no_grad():
        out = model.generate(**inputs, processor=processor, max_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    written = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert finetune.passkey_sample(processor, filler, 2, random.Random(seed)) is None  # rejected without the option
    ids = processor.encode(trial.prompt)
    sample = processor.encode_sample([], ids + written, keep_closed_text=True,
                                     trainable=[False] * len(ids) + [True] * len(written))
    crossing = finetune.passkey_sample(processor, filler, 2, random.Random(seed), across_chunks=True)
    assert crossing["chunk_ids"] == sample["chunk_ids"]  # the layout the loss sees: this one
    batch = processor.collate([sample])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "chunks_kept_as_text"}).logits[0]
    text = batch["input_ids"][0] != processor.sketch_token_id
    stream = logits[text][len(ids) - 1 : len(ids) - 1 + len(written)]  # the logits that predict the answer
    torch.testing.assert_close(stream, torch.cat(out.logits), atol=1e-4, rtol=0)
    # The probe reads the same logits: greedy wrote `written`, so teacher-forced it is right on every token.
    assert finetune.key_accuracy(model, processor, [sample]) == 1.0


def test_closing_share_sets_the_share_of_passkey_rows_whose_answer_closes_the_open_chunk():
    import random

    from vist2 import VIST2Processor

    finetune = load_script("passkey_finetune")
    processor = VIST2Processor.from_pretrained(str(DEMO))
    filler, L = finetune.passkey.corpus_filler(), processor.chunk_size

    def text_and_answer(row):
        return ([t for t in row["input_ids"] if t != processor.sketch_token_id],
                [t for t in row["labels"] if t != -100])

    for row in finetune.samples(processor, filler, random.Random(3), 6, k=8, across_chunks=True, closing_share=1.0):
        text, answer = text_and_answer(row)  # the training layout: every chunk's text is there, the answer closes one
        assert len(text) > 8 * L and finetune.passkey.closes_open_chunk(L, len(text) - len(answer), len(answer))
    for row in finetune.samples(processor, filler, random.Random(3), 6, k=8, across_chunks=True, closing_share=0.0):
        text, answer = text_and_answer(row)  # the generation layout: the open chunk holds the prompt's end and answer
        assert len(text) <= L


def test_focus_bands_draw_their_share_of_k_and_leave_the_log_uniform_draws_unchanged_without_them():
    """passkey_finetune --focus-k 1-2 48-80 --focus-share 0.4: that share of the rows is drawn uniformly from the bands;
    without bands the draws are those of the steps trained before the option existed (same seed, same k)."""
    import random

    finetune = load_script("passkey_finetune")
    plain, unfocused = random.Random(7), random.Random(7)
    assert [finetune.draw_k(plain, 96) for _ in range(200)] == [finetune.draw_k(unfocused, 96, 1, (), 0.9)
                                                                  for _ in range(200)]
    rng, bands = random.Random(7), [(1, 2), (48, 80)]
    assert {finetune.draw_k(rng, 96, 1, bands, 1.0) for _ in range(2000)} == {1, 2, *range(48, 81)}
    log_uniform_share = (math.log(3) + math.log(81 / 48)) / math.log(97)  # what the bands get from the plain draw
    draws = [finetune.draw_k(rng, 96, 1, bands, 0.4) for _ in range(20000)]
    in_bands = sum(k <= 2 or 48 <= k <= 80 for k in draws) / len(draws)
    assert abs(in_bands - (0.4 + 0.6 * log_uniform_share)) < 0.015


def test_focus_bands_are_parsed_as_low_high_and_refused_when_empty_or_below_one():
    finetune = load_script("passkey_finetune")
    assert finetune.parse_args(["--out", "x", "--focus-k", "1-2", "64"]).focus_k == [(1, 2), (64, 64)]
    for band in ("0-2", "80-48"):
        with pytest.raises(SystemExit):
            finetune.parse_args(["--out", "x", "--focus-k", band])


def test_closing_chunk_rows_read_back_the_chunk_a_passkey_answer_closes_while_it_is_written():
    """passkey_finetune --closing-readback-rows: c_1 is the chunk generation compresses in the middle of an answer
    (the question's end, then the answer's first tokens), read back from its sketch; nothing after it is labelled."""
    import random
    import re

    from vist2 import VIST2Processor

    finetune = load_script("passkey_finetune")
    processor = VIST2Processor.from_pretrained(str(DEMO))
    filler, L = finetune.passkey.corpus_filler(), processor.chunk_size
    tails = set()
    for row in finetune.closing_chunks(processor, filler, random.Random(0), 12, max_k=8, suffix="."):
        chunk = [t for t, c in zip(row["input_ids"], row["chunk_ids"]) if c == 1 and t != processor.sketch_token_id]
        assert len(chunk) == L and len(row["sketches"]) == 1
        tail = re.search(r"The pass key is( \d{0,5})?$", processor.decode(chunk))
        assert tail, processor.decode(chunk)
        tails.add(tail.group(1))
        labelled = [t for t in row["labels"] if t != -100]
        assert labelled == chunk[1:]  # every token read back but the first, which nothing precedes
    assert len(tails) >= 3  # broken off at different places in the key


def test_text_only_passkey_rows_are_the_same_prompt_and_answer_as_text():
    import random

    from vist2 import VIST2Processor

    finetune = load_script("passkey_finetune")
    processor = VIST2Processor.from_pretrained(str(DEMO))
    filler = finetune.passkey.corpus_filler()
    vist2 = next(s for s in (finetune.passkey_sample(processor, filler, 3, random.Random(5), ".") for _ in range(20)) if s)
    ids, labels = next(s for s in (finetune.passkey_sample(processor, filler, 3, random.Random(5), ".", text_only=True)
                                   for _ in range(20)) if s)
    text = processor.decode(ids)
    assert processor.sketch_token_id not in ids and len(ids) == len(labels)
    assert "The pass key is" in text and text.endswith(processor.decode([t for t in vist2["labels"] if t != -100]))
    assert [t for t in labels if t != -100] == [t for t in vist2["labels"] if t != -100]
    open_chunk = len(ids) % processor.chunk_size  # the same prompt: its open chunk is the same text in both
    assert vist2["input_ids"][-open_chunk:] == ids[-open_chunk:]


def test_window_rows_are_the_training_layout_with_every_chunk_labelled():
    finetune = load_script("passkey_finetune")
    from vist2 import VIST2Processor

    processor = VIST2Processor.from_pretrained(str(DEMO))
    L, m = processor.chunk_size, processor.visual_tokens_per_chunk
    window = np.array(processor.encode("def f(x):\n    return x + 1\n" * 12)[: 4 * L])
    batch = finetune.window_batch(processor, [window])
    assert batch["input_ids"].shape == (1, 4 * L + 3 * m) and batch["pixel_values"].shape[0] == 3
    labels = batch["labels"][0]
    assert labels[labels != -100].tolist() == window.tolist()[1:]
    text_batch = finetune.window_batch(processor, [window], text_only=True)
    assert text_batch["input_ids"][0].tolist() == window.tolist()


def test_random_character_rows_without_a_wide_share_are_single_characters_over_a_corpus_chunks_whitespace():
    """passkey_finetune --chars-rows (default --wide-share 0): rows of one token per character, the whitespace kept."""
    import random

    from transformers import AutoTokenizer

    train_demo = load_script("train_demo")
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    template = tokenizer("def f(x):\n    return x + 1\n\nclass A:\n", add_special_tokens=False)["input_ids"][:32]
    row = train_demo.random_chars_layout(tokenizer, 0.0)(template, random.Random(0))
    whitespace = train_demo.layout_token_ids(tokenizer, separators=True)
    assert len(row) == len(template) and row != template
    assert all(r == t for r, t in zip(row, template) if t in whitespace)
    assert all(len(tokenizer.decode([r])) == 1 and tokenizer.decode([r]).isascii() for r in row)
    assert load_script("passkey_finetune").parse_args(["--out", "unused"]).wide_share == 0.0


def test_latin1_read_back_rows_keep_c2_and_the_layout_and_draw_characters_beyond_ascii(evaluate_demo, demo_model):
    _, processor = demo_model  # its font draws Latin-1
    L = processor.chunk_size
    samples = evaluate_demo.heldout_samples(processor, None, processor.tokenizer, 8)
    rows = evaluate_demo.latin1_samples(processor, samples, L)
    assert rows and all(len(r["sketches"]) == 1 for r in rows)
    whitespace = load_script("train_demo").layout_token_ids(processor.tokenizer, separators=True)
    for row in rows:
        source = next(s for s in samples if s["window"][L:] == row["window"][L:])  # c_2 is the held-out one
        assert all(t == s for t, s in zip(row["window"], source["window"]) if s in whitespace)  # its layout kept
        assert any(not c.isascii() for c in processor.chunk_text(row["window"][:L]))


def test_latin1_read_back_rows_are_none_with_a_font_that_draws_ascii_only(evaluate_demo, demo_model):
    import copy

    from transformers import AutoTokenizer

    from vist2 import VIST2Processor

    model, _ = demo_model
    config = copy.deepcopy(model.config)
    config.font_path, config.newline_glyph, config.byte_aligned = None, "«", False  # Pillow's built-in font
    config.special_token_glyphs = {"<|endoftext|>": "©"}
    processor = VIST2Processor.from_config(config, AutoTokenizer.from_pretrained(DEMO))
    samples = evaluate_demo.heldout_samples(processor, None, processor.tokenizer, 8)
    assert evaluate_demo.latin1_samples(processor, samples, processor.chunk_size) == []
