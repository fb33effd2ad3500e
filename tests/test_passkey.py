"""The passkey evaluation (examples/passkey.py): where the key is put, how answers are scored, the control's layout."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from conftest import SAMPLE_TEXT
from vist2.processing_vist2 import split_into_chunks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import passkey  # noqa: E402


def chunk_of_character(processor, prompt, index):
    """Which chunk of the prompt's tokens holds character `index`: decode growing prefixes of whole chunks."""
    chunks = split_into_chunks(processor.encode(prompt), processor.chunk_size)
    for position in range(len(chunks)):
        prefix = [token for chunk in chunks[: position + 1] for token in chunk]
        if len(processor.decode(prefix, clean_up_tokenization_spaces=False)) > index:
            return position, len(chunks)
    raise AssertionError("character beyond the prompt")


@pytest.mark.parametrize("k", [1, 2, 5])
def test_the_key_line_ends_k_chunks_before_the_open_chunk(processor, k):
    trial = passkey.make_trial(processor, SAMPLE_TEXT, k, random.Random(k))
    key_chunk, num_chunks = chunk_of_character(processor, trial.prompt, trial.key_end - 1)
    assert trial.prompt[: trial.key_end].endswith(passkey.key_line(trial.key))
    assert (num_chunks - 1) - key_chunk == k
    assert passkey.chunks_back(processor, trial.prompt, trial.key_end) == k
    assert trial.prompt.endswith("\n" + passkey.QUESTION)


def test_the_key_reaches_vist2_only_through_sketches(processor):
    trial = passkey.make_trial(processor, SAMPLE_TEXT, 1, random.Random(0))
    ids = processor(text=trial.prompt)["input_ids"][0]
    text_part = processor.decode(ids[ids != processor.sketch_token_id], clean_up_tokenization_spaces=False)
    assert trial.key in trial.prompt and trial.key not in text_part
    assert text_part and passkey.QUESTION.endswith(text_part)  # only the open chunk, the question's end, is text


def test_trials_are_drawn_from_the_seed_with_varied_alignment(processor):
    first = [passkey.make_trial(processor, SAMPLE_TEXT, 3, random.Random(7)) for _ in range(2)]
    rng = random.Random(7)
    draws = [passkey.make_trial(processor, SAMPLE_TEXT, 3, rng) for _ in range(12)]
    assert first[0] == first[1] == draws[0]
    assert len({t.key for t in draws}) == len(draws)
    assert len({len(processor.encode(t.prompt)) % processor.chunk_size for t in draws}) > 1  # open chunk fill varies


def test_a_short_filler_is_read_again_from_its_start():
    assert passkey.filler_text("abcd", 2, 7) == "cdabcda"
    assert passkey.filler_text("abcd", 6, 2) == "cd"


def test_the_key_must_lie_in_a_closed_chunk(processor):
    with pytest.raises(ValueError, match="k >= 1"):
        passkey.make_trial(processor, SAMPLE_TEXT, 0, random.Random(0))


def test_the_control_prompt_has_the_same_layout_and_another_key(processor):
    trial = passkey.make_trial(processor, SAMPLE_TEXT, 4, random.Random(1))
    other, pixel_values = passkey.same_layout_trial(processor, trial, SAMPLE_TEXT, random.Random(2))
    mine = processor(text=trial.prompt)
    is_sketch = processor.sketch_token_id
    assert other.key != trial.key and other.k == trial.k
    assert pixel_values.shape == mine["pixel_values"].shape
    assert not torch.equal(pixel_values, mine["pixel_values"])
    assert torch.equal(processor(text=other.prompt)["input_ids"] == is_sketch, mine["input_ids"] == is_sketch)


@pytest.mark.parametrize("generated, correct, digits", [
    (" 12345", True, 5), ("\n 12345.", True, 5), ("12345 is", True, 5),
    (" 123456", False, 5), (" 1234", False, 4), (" 12354", False, 3), (" abcde", False, 0), ("", False, 0),
])
def test_an_answer_is_the_five_digits_after_any_whitespace(generated, correct, digits):
    assert passkey.is_correct(generated, "12345") is correct
    assert passkey.digits_correct(generated, "12345") == digits


def test_score_counts_whole_keys_digits_and_the_other_prompts_key():
    answers = [("12345", " 12345"), ("11111", " 11121"), ("22222", " 98765")]
    result = passkey.score(answers, other_keys=["00000", "00000", "98765"])
    assert result["n"] == 3
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["digit_accuracy"] == pytest.approx((5 + 4 + 0) / 15)
    assert result["answers_other_key"] == pytest.approx(1 / 3)


def test_the_script_writes_a_json_for_every_k_and_condition(model, processor, tokenizer, tmp_path):
    folder = tmp_path / "vist2"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    text = model.config.text_config
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(Qwen3Config(
        vocab_size=text.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))
    reference.save_pretrained(tmp_path / "text-only")
    tokenizer.save_pretrained(tmp_path / "text-only")
    filler = tmp_path / "filler.txt"
    filler.write_text(SAMPLE_TEXT)
    out = tmp_path / "passkey.json"
    passkey.main(["--model", str(folder), "--text-only", str(tmp_path / "text-only"), "--filler", str(filler),
                  "--keys", "2", "--k", "1", "3", "--max-new-tokens", "3", "--json", str(out),
                  "--markdown", str(tmp_path / "passkey.md")])
    results = json.loads(out.read_text())
    assert list(results["by_k"]) == ["1", "3"]
    for row in results["by_k"].values():
        for condition in ("vist2", "vist2_other_sketches", "text_only"):
            assert row[condition]["n"] == 2 and 0 <= row[condition]["accuracy"] <= 1
            assert len(row[condition]["examples"]) == 2
    assert results["chance"] == {"accuracy": 1e-05, "digit_accuracy": 0.1}
    assert results["command"].startswith("python examples/passkey.py --model")
    for row in results["by_k"].values():  # VIST2 apart by whether the answer closes the open chunk: every key once
        assert sum(split["n"] for split in row["vist2_by_answer"].values()) == 2


@pytest.mark.parametrize("prompt_tokens, closes", [(1, False), (26, False), (27, True), (31, True), (64, True)])
def test_an_answer_closes_the_open_chunk_when_the_chunk_fills_before_its_last_token(prompt_tokens, closes):
    """A 6-token answer after a prompt of `prompt_tokens` (L = 32): the open chunk holds the prompt's tail; a full
    one (64 tokens: 32 in it) is closed by the answer's first token."""
    assert passkey.closes_open_chunk(32, prompt_tokens, 6) is closes


def test_a_trial_whose_open_chunk_has_no_room_for_the_answer_is_marked_as_closing_it(processor):
    rng = random.Random(0)
    L = processor.chunk_size
    for _ in range(20):
        trial = passkey.make_trial(processor, SAMPLE_TEXT * 4, 2, rng)
        room = L - len(processor.encode(trial.prompt)) % L
        answer = len(processor.encode(" " + trial.key))
        assert passkey.answer_closes_chunk(processor, trial) == (room == L or room < answer)


def test_the_markdown_page_has_a_row_per_k_with_every_conditions_accuracy(tmp_path):
    row = {"prompt_tokens_mean": 150.0, "vist2": {"accuracy": 0.97, "digit_accuracy": 0.99},
           "vist2_other_sketches": {"accuracy": 0.0, "digit_accuracy": 0.11}}
    results = {"model": ".", "command": "python examples/passkey.py", "date": "2026-12-05 04:00 UTC", "machine": "cpu",
               "seconds": {"total": 12.0}, "keys_per_k": 100, "seed": 0, "filler": "f", "filler_chars": 10,
               "by_k": {"1": row, "64": row}}
    page = passkey.markdown_table(results)
    assert "| k | prompt tokens (mean) | VIST2 | VIST2, another prompt's sketches (control) |" in page
    assert "| 1 | 150 | 97% (99%) | 0% (11%) |" in page and "| 64 | 150 | 97% (99%) | 0% (11%) |" in page
    assert "text-only" not in page  # a condition that was not run has no column


def test_the_markdown_page_gives_vist2_apart_for_answers_that_close_the_open_chunk():
    row = {"prompt_tokens_mean": 150.0, "vist2": {"accuracy": 0.82, "digit_accuracy": 0.95},
           "vist2_by_answer": {"fits_open_chunk": {"accuracy": 0.9, "n": 80},
                               "closes_open_chunk": {"accuracy": 0.5, "n": 20}}}
    results = {"model": ".", "command": "python examples/passkey.py", "date": "2026-12-05 04:00 UTC", "machine": "cpu",
               "seconds": {"total": 12.0}, "keys_per_k": 100, "seed": 0, "filler": "f", "filler_chars": 10,
               "by_k": {"1": row}}
    page = passkey.markdown_table(results)
    assert "| VIST2, answer fits the open chunk / closes it (keys) |" in page
    assert "| 1 | 150 | 82% (95%) | 90% (80) / 50% (20) |" in page
