"""The committed demo checkpoint (demo/vist2-demo) and the demo evaluation's metric functions.

The checkpoint is committed; `bash demo/reproduce.sh demo` reproduces it (see demo/NOTES.md). A missing
checkpoint is a failure, not a skip.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
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


@pytest.mark.parametrize("newline_glyph", [None, "«"])
def test_cell_targets_match_the_renderer(newline_glyph):
    """The auxiliary loss's per-cell labels are exactly where the renderer draws ink."""
    train_demo = load_example("train_demo")
    from transformers import AutoTokenizer

    from vist2.processing_vist2 import render_chunk

    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "demo_tokenizer")
    config = train_demo.demo_config(tokenizer, newline_glyph)
    settings = config.sketch_settings
    text = "Return the sum of\n\tx and y (a tab, a newline) and a very long line that has to wrap " * 2
    grid = train_demo.cell_targets(text, settings)
    image, _ = render_chunk(text, settings)
    cells = image.reshape(grid.shape[0], config.line_height, grid.shape[1], config.char_width)
    has_ink = (cells < settings["background"]).any(axis=(1, 3))
    assert ((grid != 0) == has_ink).all()
    patches = train_demo.grid_to_units(grid, config, config.patch_size)
    assert patches.shape == ((config.image_height // 16) * (config.image_width // 16), 2)


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
        pytest.fail(f"{DEMO} is missing: run bash demo/reproduce.sh demo (demo/NOTES.md)")
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


@pytest.mark.parametrize("encoder", ["oracle", "cells"])
def test_readback_oracle_diagnostic_runs_and_logs_right_and_wrong(tmp_path, encoder):
    """examples/readback_oracle.py (demo/NOTES.md, "Third attempt"): two steps through the real VIST2 forward."""
    oracle = load_example("readback_oracle")
    log = tmp_path / "log.jsonl"
    ratio = "1" if encoder == "oracle" else "4"
    threads = torch.get_num_threads()
    try:
        oracle.main(["--encoder", encoder, "--ratio", ratio, "--data", "chars", "--steps", "2", "--batch-size", "2",
                     "--eval-every", "1", "--log", str(log)])
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["m"] == 8 and records[0]["L"] == 8 * int(ratio)
    assert [r["step"] for r in records[1:]] == [0, 1]
    assert all(0 <= r["tf_acc"] <= 1 and 0 <= r["tf_acc_wrong"] <= 1 for r in records[1:])


def test_readback_oracle_trains_the_merge_and_saves_an_encoder(tmp_path):
    """examples/readback_oracle.py --encoder-steps (demo/NOTES.md, "Fourth attempt"): tower + aligner on the glyph head."""
    oracle = load_example("readback_oracle")
    log, out = tmp_path / "log.jsonl", tmp_path / "enc"
    threads = torch.get_num_threads()
    try:
        oracle.main(["--encoder", "vision", "--init", str(DEMO), "--data", "chars", "--encoder-steps", "2",
                     "--encoder-batch", "2", "--aligner-init-std", "0.3", "--head-prior-init", "--aligner-lr", "1e-4",
                     "--eval-every", "1", "--log", str(log), "--save", str(out)])
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["stage"] == "encoder"
    assert [r["encoder_step"] for r in records[1:]] == [0, 1]
    assert all(0 <= r["heldout_char_acc"] <= 1 and 0 <= r["saturated"] <= 1 for r in records[1:])
    assert (out / "model.safetensors").exists() and (out / "glyph_heads.pt").exists()


@pytest.mark.parametrize("stage", [["--aligner-steps", "2", "--steps", "2", "--batch-size", "2"],
                                   ["--patch-probe-steps", "2"]])
def test_readback_oracle_frozen_vision_stages_run_and_log(tmp_path, stage):
    """examples/readback_oracle.py --encoder vision (demo/NOTES.md, "Third attempt"): cached patch features of the
    frozen tower, then an aligner-only stage and read-back, or a linear patch probe."""
    oracle = load_example("readback_oracle")
    log = tmp_path / "log.jsonl"
    threads = torch.get_num_threads()
    try:
        oracle.main(["--encoder", "vision", "--init", str(DEMO), "--ratio", "4", "--data", "chars", "--pool-size", "16",
                     "--eval-every", "1", "--log", str(log), *stage])
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in log.read_text().splitlines()][1:]
    if "--patch-probe-steps" in stage:
        assert [r["patch_probe_step"] for r in records] == [0, 1]
        assert all(0 <= r["heldout_ink_acc"] <= 1 for r in records)
    else:
        assert [r["step"] for r in records if "step" in r] == [0, 1]
        assert all(0 <= r["tf_acc"] <= 1 and 0 <= r["token_ink_acc"] <= 1 for r in records if "step" in r)


def run_train_demo(args):
    threads = torch.get_num_threads()
    try:
        load_example("train_demo").main(args)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("options", [["--chunk-sampling", "first"], ["--chunk-sampling", "any"],
                                     ["--text-token-weight", "1"]])
def test_train_demo_encoder_stage_saves_the_encoder_and_its_glyph_heads(tmp_path, options):
    """`train_demo.py --encoder-steps` (the recipe's first stage): tower + aligner on the glyph-cell loss, no LM."""
    log, out = tmp_path / "log.jsonl", tmp_path / "enc"
    run_train_demo(["--encoder-steps", "2", "--encoder-batch", "2", "--data", "corpus", "--aligner-init-std", "0.3",
                    "--head-prior-init", "--aligner-lr", "1e-4", "--eval-every", "1", "--warmup", "1",
                    "--log", str(log), "--out", str(out), *options])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["encoder_step"] for r in records[1:]] == [0, 1]
    assert all(0 <= r["heldout_char_acc"] <= 1 for r in records[1:])
    assert (out / "model.safetensors").exists() and (out / "glyph_heads.pt").exists()
    text_tokens = "--text-token-weight" in options
    assert (out / "text_token_head.pt").exists() == text_tokens
    assert all(("heldout_text_token_acc" in r) == text_tokens for r in records[1:])


def test_text_token_head_reads_visual_token_j_as_text_tokens_jr_to_jr_plus_r_minus_1():
    """`--text-token-weight`: visual token j stands for the r text tokens t_{jr} ... t_{jr+r-1} of its chunk."""
    from transformers import AutoTokenizer

    train_demo = load_example("train_demo")
    config = train_demo.demo_config(AutoTokenizer.from_pretrained(REPO / "tokenization" / "demo_tokenizer"))
    head = train_demo.TextTokenHead(config)
    r, vocab, m = head.r, head.vocab, train_demo.CHUNK // head.r
    ids = torch.randint(vocab, (1, m * r))
    visual_tokens = torch.eye(m, config.text_config.hidden_size)[None]  # visual token j = unit vector e_j
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.zero_()
        for j in range(m):
            for k in range(r):
                head.proj.weight[k * vocab + ids[0, j * r + k], j] = 30.0
    loss, accuracy = head.scores(visual_tokens, ids)
    assert accuracy == 1.0 and loss.item() < 1e-3
    assert head.scores(visual_tokens, ids.roll(1, dims=1))[1] < 0.1


@pytest.mark.parametrize("data", [[], ["--chunk-sampling", "any", "--mix-chars", "0.5"],
                                  ["--tokenizer", str(REPO / "tokenization" / "byte_tokenizer")],
                                  ["--window-chunks", "3"], ["--mix-chars", "0.5", "--chars-newlines", "0.1"],
                                  ["--mix-chars", "0.5", "--chars-layout", "corpus+eos", "--newline-glyph", "«",
                                   "--separator-glyph", "©", "--readback-noise", "0.1", "--lm-rows", "0.5",
                                   "--boundary-weight", "0.5", "--tail-weight", "0.5", "--overlap-rows", "0.5"]])
def test_train_demo_reader_stage_keeps_the_frozen_encoder_and_trains_a_fresh_lm(tmp_path, data):
    """`train_demo.py --init-encoder DIR --freeze vision+aligner` (the recipe's second stage)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    run_train_demo(["--encoder-steps", "1", "--encoder-batch", "2", "--warmup", "1", "--eval-every", "1",
                    "--log", str(tmp_path / "enc.jsonl"), "--out", str(tmp_path / "enc")])
    log, out = tmp_path / "log.jsonl", tmp_path / "reader"
    run_train_demo(["--init-encoder", str(tmp_path / "enc"), "--freeze", "vision+aligner", "--aux-weight", "0",
                    "--aux-only-steps", "0", "--steps", "2", "--batch-size", "2", "--warmup", "1", "--eval-every", "1",
                    "--log-every", "1", "--log", str(log), "--out", str(out), *data])
    encoder, reader = load_file(str(tmp_path / "enc" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name, value in reader.items():
        if name.startswith(("vision_tower.", "aligner.")):
            assert torch.equal(value, encoder[name]), name
    lm = [n for n in reader if n.startswith("language_model.")]
    assert any(reader[n].shape != encoder[n].shape or not torch.equal(reader[n], encoder[n]) for n in lm)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert reader["language_model.model.embed_tokens.weight"].shape[0] == len(tokenizer)
    if "--tokenizer" in data:  # the LM takes the reader's vocabulary, the encoder is the demo tokenizer's run
        assert len(tokenizer) == 260
    saved = json.loads((out / "config.json").read_text())
    assert saved.get("newline_glyph") == ("«" if "--newline-glyph" in data else None)
    assert saved.get("special_token_glyphs") == ({"<|endoftext|>": "©"} if "--separator-glyph" in data else None)
    records = [json.loads(line) for line in log.read_text().splitlines()][1:]
    assert all(0 <= r[f"{probe}_tf_acc{which}"] <= 1
               for r in records for probe in ("heldout", "chars", "layout") for which in ("", "_wrong"))


def test_random_character_row_reads_back_c1_and_predicts_nothing_after_it():
    """`--mix-chars`: a row `c_1 V_1 <eos>` of random characters whose only targets are c_1's read-back."""
    import random

    from transformers import AutoTokenizer

    from vist2 import VIST2Processor

    train_demo = load_example("train_demo")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "demo_tokenizer")
    config = train_demo.demo_config(tokenizer)
    processor = VIST2Processor.from_config(config, tokenizer)
    draw = train_demo.chunk_sampler(tokenizer, "chars", train_demo.random_token_pool(tokenizer, "chars"))
    chars = draw(1, random.Random(0))[0].tolist()
    sample = train_demo.make_sample(processor, chars + [tokenizer.eos_token_id], config,
                                    trainable=[True] * train_demo.CHUNK + [False])
    m = processor.visual_tokens_per_chunk
    assert sample["input_ids"] == chars + [processor.sketch_token_id] * m + [tokenizer.eos_token_id]
    assert sample["labels"] == [-100] + chars[1:] + [-100] * (m + 1)
    assert len(sample["sketches"]) == 1 and len(sample["token_targets"]) == 1


def test_reproduce_script_commands_parse_with_the_current_scripts():
    """demo/reproduce.sh is the one command that rebuilds the checkpoint: every flag it passes must still exist."""
    import shlex

    script = (REPO / "demo" / "reproduce.sh").read_text().replace("\\\n", " ")
    variables = dict(line.split("=", 1) for line in script.splitlines() if line.startswith("BYTES="))
    commands = [shlex.split(line.replace('"$OUT', '"demo').replace('"$BYTES"', variables["BYTES"]))
                for line in script.splitlines() if line.startswith("python examples/")]
    *trainings, evaluate = commands
    assert [c[1] for c in commands] == ["examples/train_demo.py"] * len(trainings) + ["examples/evaluate_demo.py"]
    train_demo = load_example("train_demo")
    runs = [train_demo.parse_args(c[2:]) for c in trainings]
    vist2, text_only = [r for r in runs if not r.text_only], [r for r in runs if r.text_only]
    encoder, warmup, *readers = vist2
    assert encoder.encoder_steps and warmup.readback_only and warmup.data == "chars" and warmup.init == encoder.out
    assert [r.init for r in readers] == [warmup.out] + [r.out for r in readers[:-1]]  # each stage goes on from the last
    assert [r.init for r in text_only] == [None] + [r.out for r in text_only[:-1]]
    assert len({run.tokenizer for run in runs[1:]}) == 1 and (REPO / readers[-1].tokenizer).is_dir()
    assert len(readers) == len(text_only)
    for reader, control in zip(readers, text_only):  # the control gets the same LM steps, stage by stage
        assert ((control.steps, control.batch_size, control.chunk_sampling, control.lr, control.warmup) ==
                (reader.steps, reader.batch_size, reader.chunk_sampling, reader.lr, reader.warmup))
        assert control.seed == reader.seed  # and the same windows
    for glyph in ("newline_glyph", "separator_glyph"):  # once drawn in one cell, every later stage draws them so
        glyphs = [getattr(r, glyph) for r in readers]
        assert glyphs[-1] and glyphs == sorted(glyphs, key=bool) and len(set(filter(None, glyphs))) == 1
    positions = [r.read_back_positions for r in readers]  # the layout a stage's checkpoint was trained on is kept
    assert positions == sorted(positions, key=lambda p: p == "before_next_chunk")
    seeds = [r.seed for r in readers]  # stages 1-10 ran with seed 0 and replayed their windows; each later one draws anew
    fresh_seeds = seeds[next(i for i, seed in enumerate(seeds) if seed):]
    assert all(fresh_seeds) and len(fresh_seeds) == len(set(fresh_seeds)) >= 4
    assert evaluate[evaluate.index("--model") + 1] == readers[-1].out
    assert evaluate[evaluate.index("--text-only") + 1] == text_only[-1].out


@pytest.mark.parametrize("sampling", ["first", "any"])
def test_chunk_sampler_draws_window_starts_or_chunks_at_any_offset(sampling):
    """`--chunk-sampling`: "first" trains on window starts only; "any" on slices of the stream at any offset."""
    import random

    from transformers import AutoTokenizer

    train_demo = load_example("train_demo")
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

    train_demo = load_example("train_demo")
    demo, byte = (AutoTokenizer.from_pretrained(REPO / "tokenization" / name) for name in ("demo_tokenizer",
                                                                                            "byte_tokenizer"))
    first = train_demo.corpus_windows(demo, "heldout", cache_dir=tmp_path)
    bytes_ = train_demo.corpus_windows(byte, "heldout", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("heldout_tokens.*.npy"))) == 2
    assert bytes_.size > 3 * first.size and int(bytes_.max()) < len(byte)
    assert byte.decode(bytes_[0].tolist()) == demo.decode(first.reshape(-1).tolist())[: train_demo.CHUNK * 2]
    assert np.array_equal(train_demo.corpus_windows(byte, "heldout", cache_dir=tmp_path), bytes_)


def test_evaluation_reports_each_measure_with_its_wrong_image_control(evaluate_demo):
    results = evaluate_demo.evaluate(DEMO, REPO / "demo" / "text-only-baseline", n_ppl=4, n_readback=2, batch=4)
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

    results = evaluate_demo.evaluate(DEMO, REPO / "demo" / "text-only-baseline", n_ppl=4, n_readback=1, batch=4)
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
    shutil.copytree(REPO / "demo" / "text-only-baseline", control)
    other = "demo_tokenizer" if len(AutoTokenizer.from_pretrained(DEMO)) == 260 else "byte_tokenizer"
    AutoTokenizer.from_pretrained(REPO / "tokenization" / other).save_pretrained(control)
    with pytest.raises(ValueError, match="another tokenizer"):
        evaluate_demo.evaluate(DEMO, control, n_ppl=2, n_readback=1, batch=2)


def test_random_newlines_replace_characters_at_the_given_rate_and_draw_nothing_at_zero():
    import random

    train_demo = load_example("train_demo")
    ids, rng = list(range(1000, 5000)), random.Random(0)
    state = rng.getstate()
    assert train_demo.with_random_newlines(ids, 10, 0.0, rng) == ids and rng.getstate() == state
    spread = train_demo.with_random_newlines(ids, 10, 0.25, rng)
    assert 0.22 < spread.count(10) / len(ids) < 0.28
    assert all(new in (old, 10) for new, old in zip(spread, ids))


def test_layout_keeps_spaces_tabs_and_newlines_and_the_document_separator_only_when_asked():
    from transformers import AutoTokenizer

    train_demo = load_example("train_demo")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "byte_tokenizer")
    whitespace = {tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in " \n\t"}
    assert train_demo.layout_token_ids(tokenizer, separators=False) == whitespace
    assert train_demo.layout_token_ids(tokenizer, separators=True) == whitespace | {tokenizer.eos_token_id}


def test_corpus_layout_keeps_the_chunks_whitespace_in_place_and_draws_every_other_token_from_the_pool():
    import random

    train_demo = load_example("train_demo")
    template, whitespace, pool = [5, 1, 6, 7, 2, 2, 8, 1], {1, 2}, list(range(100, 200))
    row = train_demo.with_corpus_layout(template, whitespace, pool, random.Random(0))
    assert [i for i, t in enumerate(row) if t in whitespace] == [i for i, t in enumerate(template) if t in whitespace]
    assert all(t in pool for t, old in zip(row, template) if old not in whitespace)
    assert row != train_demo.with_corpus_layout(template, whitespace, pool, random.Random(1))


def test_a_window_of_k_chunks_holds_k_minus_1_sketches_each_read_back_and_a_last_open_chunk():
    """`--window-chunks K`: `c_1 V_1 c_2 V_2 ... c_K`; every closed chunk's text is a read-back target."""
    import random

    from transformers import AutoTokenizer

    from vist2 import VIST2Processor

    train_demo = load_example("train_demo")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "byte_tokenizer")
    config = train_demo.demo_config(tokenizer)
    processor = VIST2Processor.from_config(config, tokenizer)
    L, m = train_demo.CHUNK, processor.visual_tokens_per_chunk
    window = train_demo.chunk_sampler(tokenizer, "corpus", [], 4 * L)(1, random.Random(3), "heldout")[0].tolist()
    sample = train_demo.make_sample(processor, window, config)
    chunks = [window[i : i + L] for i in range(0, 4 * L, L)]
    sketch = [processor.sketch_token_id] * m
    assert sample["input_ids"] == chunks[0] + sketch + chunks[1] + sketch + chunks[2] + sketch + chunks[3]
    assert len(sample["sketches"]) == len(sample["token_targets"]) == 3
    assert [label for label in sample["labels"] if label != -100] == window[1:]


@pytest.mark.parametrize("chunks", [2, 4])
def test_chunk_sampler_draws_whole_windows_of_the_length_asked(chunks):
    import random

    from transformers import AutoTokenizer

    train_demo = load_example("train_demo")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "byte_tokenizer")
    windows = {tuple(w) for w in train_demo.corpus_windows(tokenizer, "train", chunks).tolist()}
    drawn = train_demo.chunk_sampler(tokenizer, "corpus", [], chunks * train_demo.CHUNK)(8, random.Random(0))
    assert drawn.shape == (8, chunks * train_demo.CHUNK) and all(tuple(w) in windows for w in drawn.tolist())


def test_text_only_control_continues_from_init(tmp_path):
    """`--text-only --init DIR` (reproduce.sh's last control stage) starts from DIR's weights, not from scratch."""
    from safetensors.torch import load_file

    common = ["--text-only", "--tokenizer", str(REPO / "tokenization" / "byte_tokenizer"), "--steps", "1",
              "--batch-size", "2", "--aux-only-steps", "0", "--warmup", "1", "--log-every", "1"]
    run_train_demo([*common, "--out", str(tmp_path / "first"), "--log", str(tmp_path / "first.jsonl")])
    run_train_demo([*common, "--init", str(tmp_path / "first"), "--lr", "0", "--out", str(tmp_path / "next"),
                    "--log", str(tmp_path / "next.jsonl")])
    first, continued = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("first", "next"))
    assert first.keys() == continued.keys()
    assert all(torch.equal(first[name], continued[name]) for name in first)  # lr 0: nothing moved from the init


def test_readback_noise_replaces_only_the_read_back_text_in_a_copy_of_the_inputs():
    """`--readback-noise P`: the text of chunks read back from their sketches gets random inputs at rate P; sketches,
    padding, the open chunk and rows without read-back (`--lm-rows`) stay as they are, and so does the batch (its
    labels keep the true text)."""
    import random

    from transformers import AutoTokenizer

    from vist2 import VIST2Processor

    train_demo = load_example("train_demo")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "byte_tokenizer")
    config = train_demo.demo_config(tokenizer)
    processor = VIST2Processor.from_config(config, tokenizer)
    draw = train_demo.chunk_sampler(tokenizer, "corpus", [], 3 * train_demo.CHUNK)
    samples = [train_demo.make_sample(processor, w, config) for w in draw(64, random.Random(0), "heldout").numpy()]
    batch, _, _ = train_demo.make_batch(processor, [s for s in samples if s is not None])
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


def test_lm_rows_are_the_first_corpus_rows_and_random_character_rows_always_read_back():
    """`--lm-rows F`: that fraction of the corpus rows run with read-back off; random-character rows have nothing to
    language-model, so they always read back."""
    read_back_rows = load_example("train_demo").read_back_rows
    assert read_back_rows(16, 2, 0.5).tolist() == [False] * 7 + [True] * 9
    assert read_back_rows(16, 2, 0.0).all() and read_back_rows(4, 0, 1.0).tolist() == [False] * 4
    assert read_back_rows(16, 4, 1.0).tolist() == [False] * 12 + [True] * 4


def test_boundary_loss_scores_the_open_chunks_bytes_after_its_first_and_nothing_else():
    """`--boundary-weight`: the loss on bytes 2..n+1 of the open chunk, predicted from inside that chunk."""
    import torch.nn.functional as F

    train_demo = load_example("train_demo")
    # two rows: `c_1 (3 tokens) V_1 (2) c_2 (4)`, and a left-padded row whose open chunk is one unlabelled token
    chunk_ids = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 1, 1, 1, 1, 1, 2]])
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, 8, 9, 10], [-100] * 4 + [5, 6, -100, -100, -100]])
    logits = torch.randn(2, 9, 12)
    expected = F.cross_entropy(logits[0, [5, 6]], torch.tensor([8, 9]))  # bytes 2 and 3 of c_2, from bytes 1 and 2
    assert torch.allclose(train_demo.boundary_loss(logits, labels, chunk_ids, 2), expected)
    every_later_byte = F.cross_entropy(logits[0, [5, 6, 7]], torch.tensor([8, 9, 10]))
    assert torch.allclose(train_demo.boundary_loss(logits, labels, chunk_ids, 10), every_later_byte)
    assert train_demo.boundary_loss(logits[1:], labels[1:], chunk_ids[1:], 2).item() == 0


def test_overlap_window_starts_c2_that_many_tokens_before_the_end_of_c1():
    train_demo = load_example("train_demo")
    L = train_demo.CHUNK
    window = train_demo.with_overlap(np.arange(2 * L), 3)
    assert window.shape == (2 * L,) and window[:L].tolist() == list(range(L))
    assert window[L:].tolist() == list(range(L - 3, 2 * L - 3))


def test_tail_heads_name_the_last_bytes_of_the_latest_sketch_each_chunk_sees():
    """`--tail-weight`: from the first bytes of a chunk, the last bytes of the sketch it sees last: its own when it is
    read back, the previous chunk's otherwise; a chunk that sees no sketch is not asked."""
    tail_heads = load_example("train_demo").TailHeads(hidden_size=8, vocab_size=50, tail=2, positions=3)
    S = 49  # the sketch placeholder: `c_1 (4) V_1 (2) c_2 (4)`
    ids = torch.tensor([[1, 2, 3, 4, S, S, 5, 6, 7, 8]])
    chunk_ids = torch.tensor([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2]])
    rows, columns, tails = tail_heads.targets(ids, chunk_ids, torch.tensor([True]), S)
    assert columns.tolist() == [0, 1, 2, 6, 7, 8] and tails.tolist() == [[3, 4]] * 6 and rows.tolist() == [0] * 6
    rows, columns, tails = tail_heads.targets(ids, chunk_ids, torch.tensor([False]), S)
    assert columns.tolist() == [6, 7, 8] and tails.tolist() == [[3, 4]] * 3
    assert len(tail_heads.targets(ids[:, :4], chunk_ids[:, :4], torch.tensor([True]), S)[0]) == 0


def test_tail_heads_loss_is_the_cross_entropy_of_each_named_byte():
    import torch.nn.functional as F

    tail_heads = load_example("train_demo").TailHeads(hidden_size=8, vocab_size=50, tail=2, positions=3)
    hidden = torch.randn(1, 10, 8)
    targets = (torch.tensor([0, 0]), torch.tensor([6, 7]), torch.tensor([[3, 4], [3, 4]]))
    logits = tail_heads.proj(hidden[0, [6, 7]]).view(2, 2, 50)
    expected = F.cross_entropy(logits.reshape(4, 50), torch.tensor([3, 4, 3, 4]))
    assert torch.allclose(tail_heads.loss(hidden, targets), expected)
    assert tail_heads.loss(hidden, (torch.tensor([], dtype=torch.long),) * 3).item() == 0


@pytest.fixture(scope="module")
def diagnose_reader():
    return load_example("diagnose_reader")


def test_reader_diagnosis_shifts_c2_to_start_inside_c1_and_keeps_c1_and_its_sketch(diagnose_reader):
    L = 32
    samples = [{"window": list(range(2 * L)), "sketches": ["V_1"]}]
    shifted = diagnose_reader.overlapping(samples, 4)[0]
    assert shifted["window"] == list(range(L)) + list(range(L - 4, 2 * L - 4))
    assert shifted["sketches"] == ["V_1"] and samples[0]["window"] == list(range(2 * L))


def test_random_inputs_keep_the_first_token_and_draw_the_others_from_the_pool_at_the_given_rate(diagnose_reader):
    tokens = torch.zeros(200, 32, dtype=torch.long)
    pool = [7, 8, 9]
    same = diagnose_reader.with_random_inputs(tokens, 0.0, pool, torch.Generator().manual_seed(0))
    assert torch.equal(same, tokens)
    every = diagnose_reader.with_random_inputs(tokens, 1.0, pool, torch.Generator().manual_seed(0))
    assert (every[:, 0] == 0).all() and set(every[:, 1:].unique().tolist()) == set(pool)
    half = diagnose_reader.with_random_inputs(tokens, 0.5, pool, torch.Generator().manual_seed(0))
    assert 0.45 < (half[:, 1:] != 0).float().mean().item() < 0.55


def test_a_visual_token_is_blank_where_no_sketch_draws_under_it(diagnose_reader):
    white = np.full((8, 12), 255, dtype=np.uint8)  # 2 x 3 visual tokens of 4 x 4 pixels
    inked = white.copy()
    inked[5, 9] = 0  # under token (1, 2), the last one
    assert diagnose_reader.blank_visual_tokens([white, inked], 4, 255) == [1.0] * 5 + [0.5]


def test_reader_diagnosis_reports_each_probe_with_the_wrong_sketch(diagnose_reader):
    results = diagnose_reader.diagnose(DEMO, n=8, batch=4)
    assert len(results["blank_fraction_by_visual_token"]) == 8
    tails = results["tail_accuracy_by_overlap"]
    assert list(tails) == [str(k) for k in diagnose_reader.TAIL_OVERLAPS]
    assert all(set(v) == {"right_sketch", "wrong_sketch"} and all(0 <= a <= 1 for a in v.values())
               for v in tails.values())
    noisy = results["read_back_accuracy_with_random_inputs"]
    assert list(noisy) == [str(f) for f in diagnose_reader.INPUT_NOISE]
    clean = noisy["0.0"]
    # the committed checkpoint reads its own sketch, far better than another text's
    right, wrong = (np.mean(list(clean[k].values())) for k in ("right_sketch", "wrong_sketch"))
    assert right > 0.9 and right > wrong + 0.2
