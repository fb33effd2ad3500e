"""Training (DESIGN §5): data pipeline, curriculum, stage-1 and stage-2 scripts, LoRA adapters, resume.

Everything runs on tiny models on CPU. The script tests call `examples/pretrain.py` / `examples/instruct.py`
in-process through their `main(argv)`.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from conftest import SAMPLE_TEXT, tiny_config
from vist2 import VIST2ForCausalLM, VIST2Processor
from vist2.modeling_vist2 import SKETCH, TEXT, memory_flags, token_kinds, vist2_mask_function
from vist2.training import (
    ConversationDataset,
    CurriculumPhase,
    CurriculumSchedule,
    PackedTextDataset,
    StreamingTextDataset,
    VIST2DataCollator,
    VIST2Trainer,
    iter_texts,
    load_documents,
    render_window,
)

REPO = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER = REPO / "tokenization" / "demo_tokenizer"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core machine run ~8x faster on one thread than fighting over two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def documents():
    paragraphs = [p.strip() for p in SAMPLE_TEXT.split(". ") if p.strip()]
    return [". ".join(paragraphs[i : i + 6]) + "." for i in range(0, len(paragraphs), 2)] * 3


def tiny_training_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                    remove_unused_columns=False, seed=0, disable_tqdm=True)
    settings.update(overrides)
    return TrainingArguments(**settings)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def test_packed_windows_are_chunk_aligned_and_collate(processor, documents):
    L, m = processor.chunk_size, processor.visual_tokens_per_chunk
    dataset = PackedTextDataset.from_documents(documents, processor, window_tokens=4 * L, show_progress=False)
    assert len(dataset) == len(dataset.token_ids) // (4 * L) > 2
    eos = processor.tokenizer.eos_token_id
    assert (dataset.token_ids == eos).sum() == len(documents)  # one separator per document

    (sample,) = dataset[1]
    ids, chunk_ids, labels = map(torch.tensor, (sample["input_ids"], sample["chunk_ids"], sample["labels"]))
    rendered = 3 - sample["chunks_kept_as_text"]
    assert len(ids) == 4 * L + rendered * m and len(sample["sketches"]) == rendered
    is_sketch = ids == processor.sketch_token_id
    assert (labels[is_sketch] == -100).all() and labels[0] == -100  # nothing predicts the first token
    assert (labels[1:][~is_sketch[1:]] == ids[1:][~is_sketch[1:]]).all()
    # Layout c_1 V_1 c_2 V_2 c_3 V_3 c_4: every chunk's text is exactly L tokens, the last chunk has no sketch.
    for chunk in range(1, 5):
        assert int(((chunk_ids == chunk) & ~is_sketch).sum()) == L
    assert not is_sketch[chunk_ids == 4].any()
    assert ids[~is_sketch].tolist() == dataset.token_ids[4 * L : 8 * L].tolist()

    shorter = render_window(processor, dataset.token_ids[: 2 * L].tolist(), 2 * L)  # left-padded in the batch
    batch = VIST2DataCollator(processor)([dataset[0], shorter, dataset[2]])
    assert {"input_ids", "attention_mask", "chunk_ids", "pixel_values", "labels", "read_back"} <= set(batch)
    assert batch["read_back"].tolist() == [False] * 3 and (batch["attention_mask"][1] == 0).any()
    assert batch["pixel_values"].shape[0] * m == int((batch["input_ids"] == processor.sketch_token_id).sum())
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    # Trainer counts `labels[:, 1:] != -100` for num_items_in_batch; the model's targets are the text stream's
    # labels shifted by one. With left padding the two must still agree.
    text = (batch["attention_mask"] == 1) & (batch["input_ids"] != processor.sketch_token_id)
    targets = sum(int((row_labels[row_text][1:] != -100).sum()) for row_labels, row_text in zip(batch["labels"], text))
    assert int((batch["labels"][:, 1:] != -100).sum()) == targets


def test_context_length_and_ratio_phases_change_what_is_rendered(processor, documents):
    L, m = processor.chunk_size, processor.visual_tokens_per_chunk
    schedule = CurriculumSchedule([
        CurriculumPhase("short", 2, context_length=2 * L),
        CurriculumPhase("full", 2),
        CurriculumPhase("ratio8", 2, compression_ratio=8, render_overrides={"char_width": 2, "line_height": 4}),
    ])
    dataset = PackedTextDataset.from_documents(documents, processor, 4 * L, schedule, show_progress=False)

    schedule.current_step = 0  # short context: the window becomes two samples of two chunks (same tokens per step)
    pieces = dataset[0]
    assert len(pieces) == 2 and all(max(p["chunk_ids"]) == 2 for p in pieces)
    assert sum((torch.tensor(p["input_ids"]) != processor.sketch_token_id).sum() for p in pieces) == 4 * L

    schedule.current_step = 2
    (full,) = dataset[0]
    assert max(full["chunk_ids"]) == 4

    schedule.current_step = 5  # r = 8 at the model's m: chunks of 2L tokens, each still m visual tokens
    (dense,) = dataset[0]
    ids, chunk_ids = torch.tensor(dense["input_ids"]), torch.tensor(dense["chunk_ids"])
    assert max(dense["chunk_ids"]) == 2
    assert int(((chunk_ids == 1) & (ids != processor.sketch_token_id)).sum()) == 2 * L
    assert int((ids == processor.sketch_token_id).sum()) == m * len(dense["sketches"])
    assert dense["sketches"][0].shape == (processor.sketch_settings["image_height"],
                                          processor.sketch_settings["image_width"])

    with pytest.raises(ValueError, match="multiple of its chunk size"):
        PackedTextDataset(dataset.token_ids, processor, 4 * L,
                          CurriculumSchedule([CurriculumPhase("bad", 1, context_length=L + 1)]))


@pytest.mark.parametrize("steps, ratio", [(2, 4), (3, 8), (None, 8)])  # stopped in phase 1, in phase 2, at the end
def test_the_model_keeps_the_geometry_of_the_phase_its_training_ended_in(tokenizer, processor, steps, ratio):
    from vist2.training import apply_final_geometry

    schedule = CurriculumSchedule([CurriculumPhase("ratio4", 2), CurriculumPhase(
        "ratio8", 2, compression_ratio=8, render_overrides={"char_width": 2, "line_height": 4})])
    model = VIST2ForCausalLM(tiny_config(tokenizer))
    final = apply_final_geometry(model, processor, schedule, steps)
    assert model.config.compression_ratio == final.sketch_settings["compression_ratio"] == ratio


def test_streaming_dataset_matches_packed_and_files_load(tmp_path, processor, documents):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in documents))
    stream = load_documents([path], text_column="body", streaming=True)
    packed = PackedTextDataset.from_documents(documents, processor, 4 * processor.chunk_size, show_progress=False)
    windows = list(StreamingTextDataset(stream, processor, 4 * processor.chunk_size))
    assert len(windows) == len(packed)
    assert [w.render()[0]["input_ids"] for w in windows[:3]] == [packed[i][0]["input_ids"] for i in range(3)]
    collator = VIST2DataCollator(processor)
    streamed, in_memory = collator(windows[:2]), collator([packed[0], packed[1]])
    assert all(torch.equal(streamed[k], in_memory[k]) for k in in_memory)


@pytest.mark.parametrize("streaming", [True, False])
def test_streaming_dataset_in_two_dataloader_workers_reads_every_document_once(tmp_path, processor, streaming):
    from torch.utils.data import DataLoader

    for part in range(2):  # two files: a `datasets` stream of two shards, one for each worker
        (tmp_path / f"part{part}.jsonl").write_text("".join(
            json.dumps({"text": f"document {10 * part + i}: " + SAMPLE_TEXT[:300]}) + "\n" for i in range(10)))
    documents = load_documents(sorted(tmp_path.glob("*.jsonl")), streaming=True)
    documents = documents if streaming else list(iter_texts(documents))

    def windows(workers):
        dataset = StreamingTextDataset(documents, processor, 2 * processor.chunk_size)
        return len(list(DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=lambda window: window)))
    assert windows(2) >= windows(0) - 2  # each worker may leave one window short of full


def test_rendering_runs_in_dataloader_workers(processor, documents):
    schedule = CurriculumSchedule([CurriculumPhase("all", 10, read_back=1.0)])
    dataset = PackedTextDataset.from_documents(documents, processor, 4 * processor.chunk_size, schedule,
                                               show_progress=False)
    collator = VIST2DataCollator(processor)
    in_workers = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collator)
    in_process = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=0, collate_fn=collator)
    for a, b in zip(in_workers, in_process):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# Curriculum
# ---------------------------------------------------------------------------------------------------------------------


def test_schedule_parses_and_ramps():
    schedule = CurriculumSchedule.parse([
        "ocr:steps=2,read_back=1,freeze=language_model+vision_tower",
        "withdraw:steps=4,read_back=1:0",
        "olm:steps=3,read_back=0,context=64,ratio=8,char_width=2",
    ])
    assert schedule.total_steps == 9
    assert [schedule.phase_index(s) for s in range(11)] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert schedule.phases[0].freeze == ("language_model", "vision_tower")
    assert [schedule.read_back_probability(s) for s in range(2, 7)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    olm = schedule.phases[2]
    assert (olm.context_length, olm.compression_ratio, olm.render_overrides) == (64, 8, {"char_width": 2})
    assert schedule.read_back_flags(16, 0).all() and not schedule.read_back_flags(16, 7).any()
    mixed = schedule.read_back_flags(1000, 4, seed=3)
    assert 0.4 < mixed.float().mean() < 0.6 and torch.equal(mixed, schedule.read_back_flags(1000, 4, seed=3))
    with pytest.raises(ValueError, match="cannot freeze"):
        CurriculumPhase("x", 1, freeze=("lm_head",))
    default = CurriculumSchedule.default(10)
    assert default.read_back_probability(0) == 1.0 and default.read_back_probability(9) == 0.0


def test_read_back_is_the_visibility_the_mask_claims(model, processor):
    """read_back=True: the text of c_i sees its own sketch V_i; False: it does not. Later chunks see V_i either way."""
    text = SAMPLE_TEXT[:600]
    batch = processor(text=[text, text], keep_closed_text=True)
    kinds = token_kinds(batch["input_ids"], batch["attention_mask"], processor.sketch_token_id)
    chunk_ids = batch["chunk_ids"]
    memory = memory_flags(kinds, chunk_ids)
    read_back = torch.tensor([True, False])
    allowed = vist2_mask_function(kinds, chunk_ids, memory, read_back)
    text_1 = ((chunk_ids[0] == 1) & (kinds[0] == TEXT)).nonzero()[:, 0]
    sketch_1 = ((chunk_ids[0] == 1) & (kinds[0] == SKETCH)).nonzero()[:, 0]
    text_2 = ((chunk_ids[0] == 2) & (kinds[0] == TEXT)).nonzero()[:, 0]
    for b, expected in ((0, True), (1, False)):
        seen = [bool(allowed(torch.tensor(b), 0, q, kv)) for q in text_1 for kv in sketch_1]
        assert all(s == expected for s in seen)
        assert all(bool(allowed(torch.tensor(b), 0, q, kv)) for q in text_2 for kv in sketch_1)
        assert not any(bool(allowed(torch.tensor(b), 0, q, kv)) for q in text_2 for kv in text_1)

    # The same claim, measured on logits: blank out V_1 and see who notices.
    changed = dict(batch)
    changed["pixel_values"] = batch["pixel_values"].clone()
    changed["pixel_values"][[0, batch["pixel_values"].shape[0] // 2]] = 1.0  # first sketch of each row
    with torch.no_grad():
        for flag in (True, False):
            rb = torch.tensor([flag, flag])
            before = model(**batch, read_back=rb).logits[0]
            after = model(**changed, read_back=rb).logits[0]
            own_chunk_moved = (before[text_1] - after[text_1]).abs().max() > 1e-6
            assert bool(own_chunk_moved) == flag
            assert (before[text_2] - after[text_2]).abs().max() > 1e-6


def test_curriculum_flags_and_freezing_reach_the_model_per_phase(tmp_path, tokenizer, processor, documents):
    """Run the Trainer through three phases and record, at every forward, what the model was given."""
    torch.manual_seed(0)
    model = VIST2ForCausalLM(tiny_config(tokenizer))
    schedule = CurriculumSchedule([
        CurriculumPhase("ocr_warmup", 2, read_back=1.0, freeze=("language_model",)),
        CurriculumPhase("withdraw", 4, read_back=(1.0, 0.0)),
        CurriculumPhase("optical_lm", 2, read_back=0.0, freeze=("vision_tower",)),
    ])
    dataset = PackedTextDataset.from_documents(documents, processor, 4 * processor.chunk_size, schedule,
                                               show_progress=False)
    seen = []

    def record(module, args, kwargs):
        if module.training:
            seen.append({
                "read_back": kwargs["read_back"].tolist(),
                "lm_trainable": module.language_model.lm_head.weight.requires_grad,
                "vision_trainable": module.vision_tower.embeddings.patch_embedding.weight.requires_grad,
                "lm_weight": module.language_model.lm_head.weight.detach().clone(),
                "vision_weight": module.vision_tower.embeddings.patch_embedding.weight.detach().clone(),
            })

    model.register_forward_pre_hook(record, with_kwargs=True)
    trainer = VIST2Trainer(model=model, args=tiny_training_args(tmp_path, max_steps=8, per_device_train_batch_size=8),
                           train_dataset=dataset, data_collator=VIST2DataCollator(processor), curriculum=schedule)
    trainer.train()

    assert len(seen) == 8
    for step in (0, 1):  # OCR warm-up: every sample reads back, the LLM is frozen and does not move
        assert all(seen[step]["read_back"]) and not seen[step]["lm_trainable"] and seen[step]["vision_trainable"]
    assert torch.equal(seen[0]["lm_weight"], seen[2]["lm_weight"])
    assert not torch.equal(seen[0]["vision_weight"], seen[2]["vision_weight"])
    assert all(seen[2]["read_back"])  # withdrawal starts at p = 1 ...
    assert 0 < sum(seen[4]["read_back"]) < 8  # ... is mixed half-way ...
    for step in (2, 3, 4, 5):
        assert seen[step]["lm_trainable"] and seen[step]["vision_trainable"]
    for step in (6, 7):  # pure optical LM: no read-back; the vision tower is frozen
        assert not any(seen[step]["read_back"]) and seen[step]["lm_trainable"] and not seen[step]["vision_trainable"]
    assert torch.equal(seen[6]["vision_weight"], seen[7]["vision_weight"])
    assert not torch.equal(seen[6]["lm_weight"], seen[7]["lm_weight"])
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["phase"] for entry in logged] == [0, 0, 1, 1, 1, 1, 2, 2]


# ---------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing, resume
# ---------------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, processor):
    torch.manual_seed(0)
    model = VIST2ForCausalLM(tiny_config(tokenizer)).train()
    batch = processor(text=[SAMPLE_TEXT[:500], SAMPLE_TEXT[100:400]], keep_closed_text=True, return_labels=True)
    read_back = torch.tensor([True, False])
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.zero_grad()
        loss = model(**batch, read_back=read_back).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_trainer_logs_and_warns_when_closed_chunks_are_kept_as_text(tmp_path, tokenizer, processor, caplog):
    """A phase whose sketches cannot show its chunks trains on their text: that must be seen in the logs."""
    documents = [SAMPLE_TEXT[:200] + " 漢字漢字漢字漢字漢字漢字 " + SAMPLE_TEXT[200:400]] * 8  # the font draws no CJK
    dataset = PackedTextDataset.from_documents(documents, processor, 4 * processor.chunk_size, show_progress=False)
    torch.manual_seed(0)
    trainer = VIST2Trainer(model=VIST2ForCausalLM(tiny_config(tokenizer)), train_dataset=dataset,
                           args=tiny_training_args(tmp_path, max_steps=2), data_collator=VIST2DataCollator(processor))
    with caplog.at_level("WARNING"):
        trainer.train()
    shares = [entry["chunks_kept_as_text"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(shares) == 2 and all(0 < share < 1 for share in shares)
    assert sum("closed chunks of the last logged steps are kept as text" in r.message for r in caplog.records) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Trainer options and fine-tuning set-ups that must not change what is trained without a word
# ---------------------------------------------------------------------------------------------------------------------


def text_stream_loss_with_smoothing(model, batch, epsilon):
    """The reference: label smoothing over the writable tokens, along the text stream, computed by hand."""
    out = model(**batch, output_hidden_states=False)
    kinds = token_kinds(batch["input_ids"], batch["attention_mask"], model.config.sketch_token_id)
    losses = []
    for row in range(len(batch["input_ids"])):
        text = (kinds[row] == TEXT).nonzero()[:, 0]
        labels, logits = batch["labels"][row, text], out.logits[row, text]
        chunks = batch["chunk_ids"][row, text]
        for i in range(len(text) - 1):
            if labels[i + 1] != -100 and chunks[i + 1] <= chunks[i] + 1:
                writable = torch.cat([logits[i, : model.config.sketch_token_id],
                                      logits[i, model.config.sketch_token_id + 1 :]]).log_softmax(-1)
                target = int(labels[i + 1]) - int(labels[i + 1] > model.config.sketch_token_id)
                losses.append((1 - epsilon) * -writable[target] - epsilon * writable.mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_label_smoothing_smooths_the_text_stream_loss(tmp_path, model, processor, epsilon):
    """Trainer's own smoother would score the interleaved layout (and the ruled-out `<|sketch|>` made it inf)."""
    batch = dict(VIST2DataCollator(processor)([processor.encode_sample([], processor.encode(SAMPLE_TEXT[:500]),
                                                                        keep_closed_text=True)]))
    trainer = VIST2Trainer(model=model, args=tiny_training_args(tmp_path, label_smoothing_factor=epsilon),
                           data_collator=VIST2DataCollator(processor))
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        torch.testing.assert_close(loss, text_stream_loss_with_smoothing(model, batch, epsilon), rtol=1e-5, atol=1e-5)


def test_a_curriculum_never_trains_what_the_caller_froze(tmp_path, tokenizer, processor, documents):
    """A phase that freezes nothing leaves a LoRA model's base and a tower frozen by hand as they were."""
    from peft import get_peft_model

    from vist2.training import language_model_lora_config

    torch.manual_seed(0)
    model = get_peft_model(VIST2ForCausalLM(tiny_config(tokenizer)), language_model_lora_config(r=4, lora_dropout=0.0))
    model.base_model.model.vision_tower.requires_grad_(False)  # (already frozen by LoRA: stays so)
    before = {name for name, p in model.named_parameters() if p.requires_grad}
    schedule = CurriculumSchedule.parse(["ocr:steps=1,read_back=1,freeze=aligner", "olm:steps=1,read_back=0"])
    dataset = PackedTextDataset.from_documents(documents, processor, 4 * processor.chunk_size, show_progress=False)
    trainable = []
    model.register_forward_pre_hook(lambda module, args: trainable.append(
        {name for name, p in model.named_parameters() if p.requires_grad}))
    VIST2Trainer(model=model, args=tiny_training_args(tmp_path, max_steps=2), train_dataset=dataset,
                 data_collator=VIST2DataCollator(processor), curriculum=schedule).train()
    assert trainable[0] == {name for name in before if ".aligner." not in name} and trainable[1] == before


def test_a_checkpoint_saved_mid_schedule_carries_the_geometry_its_weights_were_trained_in(tmp_path, tokenizer,
                                                                                          processor, documents):
    torch.manual_seed(0)
    model = VIST2ForCausalLM(tiny_config(tokenizer))
    schedule = CurriculumSchedule.parse(["r4:steps=2,read_back=0", "r8:steps=2,read_back=0,ratio=8"])
    dataset = PackedTextDataset.from_documents(documents, processor, 8 * processor.chunk_size, schedule,
                                               show_progress=False)
    VIST2Trainer(model=model, args=tiny_training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=1),
                 train_dataset=dataset, data_collator=VIST2DataCollator(processor), processing_class=processor,
                 curriculum=schedule).train()
    for step, ratio in ((1, 4), (2, 4), (3, 8), (4, 8)):
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / f"checkpoint-{step}", trust_remote_code=True)
        saved_processor = VIST2Processor.from_pretrained(tmp_path / f"checkpoint-{step}")
        assert saved.config.compression_ratio == saved_processor.sketch_settings["compression_ratio"] == ratio
    assert model.config.compression_ratio == 4, "the model in training keeps the geometry it started with"


def test_num_items_in_batch_counts_what_the_loss_scores_for_left_padded_plain_ids(tmp_path, model, processor):
    """A language-modelling collator labels every token: a left-padded row's first label is not a target."""
    from transformers import DataCollatorForLanguageModeling

    tokenizer = processor.tokenizer
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    features = [{"input_ids": processor.encode(text)} for text in (SAMPLE_TEXT[:300], SAMPLE_TEXT[50:200])]
    counts = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        try:
            batch = collate(features)
        finally:
            tokenizer.padding_side = "left"
        trainer = VIST2Trainer(model=model, args=tiny_training_args(tmp_path), data_collator=collate)
        (batch,), counts[side] = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
        scored = sum(len(processor.encode(text)) - 1 for text in (SAMPLE_TEXT[:300], SAMPLE_TEXT[50:200]))
        assert int(counts[side]) == scored


def test_counting_the_labels_leaves_a_collators_input_ids_as_they_are(tmp_path, model, processor):
    """A plain collator may give the input_ids tensor itself as the labels."""
    ids = torch.tensor([processor.encode(SAMPLE_TEXT[:100])])
    trainer = VIST2Trainer(model=model, args=tiny_training_args(tmp_path), data_collator=lambda features: features)
    (batch,), _ = trainer.get_batch_samples(iter([{"input_ids": ids, "labels": ids}]), 1, torch.device("cpu"))
    assert ids[0, 0] != -100 and batch["labels"][0, 0] == -100 and batch["input_ids"] is ids


def test_peft_trainable_token_rows_train_and_generate(model, processor):
    """PEFT's way to train new tokens' rows wraps the embedding (no `num_embeddings`)."""
    import copy

    from peft import LoraConfig, get_peft_model

    last = len(processor.tokenizer) - 1
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, target_modules=r"language_model\..*\.(q_proj|v_proj)", trainable_token_indices={"embed_tokens": [last]}))
    peft_model(**processor(text=SAMPLE_TEXT[:300], keep_closed_text=True, return_labels=True)).loss.backward()
    out = peft_model.generate(**processor(text=SAMPLE_TEXT[:300]), processor=processor, max_new_tokens=3,
                              do_sample=False)
    assert out.shape[1] > 3


def test_the_lora_config_takes_the_callers_modules_to_save_and_targets():
    from vist2.training import language_model_lora_config

    config = language_model_lora_config(modules_to_save=["aligner", "lm_head"], target_modules=["q_proj"])
    assert config.modules_to_save == ["aligner", "lm_head"] and config.target_modules == {"q_proj"}


def test_the_collator_names_the_fix_when_trainer_dropped_the_sketches(processor):
    sample = {key: value for key, value in processor.encode_sample([], processor.encode(SAMPLE_TEXT[:300])).items()
              if key in ("input_ids", "labels")}  # what remove_unused_columns=True leaves of a conversation sample
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        VIST2DataCollator(processor)([sample])


def test_a_batch_with_nothing_trainable_in_its_loss_trains_nothing_instead_of_failing(tmp_path, tokenizer):
    """An OCR warm-up phase (language model frozen) meets a batch whose chunks were all kept as text."""
    torch.manual_seed(0)
    model = VIST2ForCausalLM(tiny_config(tokenizer))
    processor = VIST2Processor.from_config(model.config, tokenizer)
    documents = [" 漢字" * 400] * 4  # the built-in font draws no CJK: every chunk stays text
    dataset = PackedTextDataset.from_documents(documents, processor, 4 * processor.chunk_size, show_progress=False)
    schedule = CurriculumSchedule.parse(["ocr:steps=1,read_back=1,freeze=language_model"])
    tower = [p.detach().clone() for p in model.vision_tower.parameters()]
    VIST2Trainer(model=model, args=tiny_training_args(tmp_path, max_steps=1), train_dataset=dataset,
                 data_collator=VIST2DataCollator(processor), curriculum=schedule).train()
    assert all(torch.equal(a, b) for a, b in zip(tower, model.vision_tower.parameters()))


def test_resume_continues_from_the_saved_step(tmp_path, tokenizer, processor, documents):
    schedule_specs = ["ocr:steps=2,read_back=1,freeze=language_model", "withdraw:steps=2,read_back=1:0",
                      "olm:steps=2,read_back=0"]

    def make_trainer(output_dir, **overrides):
        torch.manual_seed(0)
        model = VIST2ForCausalLM(tiny_config(tokenizer))
        schedule = CurriculumSchedule.parse(schedule_specs)
        dataset = PackedTextDataset.from_documents(documents, processor, 4 * processor.chunk_size, schedule,
                                                   show_progress=False)
        args = tiny_training_args(output_dir, max_steps=6, **overrides)
        return VIST2Trainer(model=model, args=args, train_dataset=dataset, data_collator=VIST2DataCollator(processor),
                            processing_class=processor, curriculum=schedule)

    def losses(trainer):
        return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}

    straight = make_trainer(tmp_path / "straight")
    straight.train()
    interrupted = make_trainer(tmp_path / "run", save_strategy="steps", save_steps=3)
    interrupted.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3

    resumed = make_trainer(tmp_path / "run", save_strategy="steps", save_steps=3)
    forwards = []
    resumed.model.register_forward_pre_hook(lambda module, args: forwards.append(module.training))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    assert forwards == [True] * 3  # it went on after the saved step: steps 1-3 were not trained again
    for step in (4, 5, 6):  # same data, same read-back draws, same optimizer state: the same losses
        assert losses(resumed)[step] == pytest.approx(losses(straight)[step], rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Scripts: stage 1 and stage 2 end to end, adapters
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Stage 1 on the demo tokenizer and a slice of the stdlib corpus; its output is the stage-2 base."""
    out = tmp_path_factory.mktemp("pretrain")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = load_example("pretrain").main([
        "--config", "tiny", "--output-dir", str(out), "--max-steps", "30", "--max-chars", "200000",
        "--num-workers", "0", "--eval-windows", "8", "--logging-steps", "1", "--batch-size", "8",
    ])
    torch.set_num_threads(threads)
    return out, result


def test_pretrain_script_loss_falls_and_saves_a_loadable_model(pretrained):
    out, result = pretrained
    losses = result["train_losses"]
    assert len(losses) >= 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert result["eval_loss_after"] < result["eval_loss_before"] - 0.3
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    processor = VIST2Processor.from_pretrained(out)
    assert not processor.settings_mismatch(model.config)
    assert (out / "modeling_vist2.py").exists() and "auto_map" in json.loads((out / "config.json").read_text())


DATA_PARALLEL_SCRIPT = """
import hashlib, importlib.util, sys
import torch.distributed as dist
spec = importlib.util.spec_from_file_location("pretrain", sys.argv[1])
pretrain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain)
result = pretrain.main(["--config", "tiny", "--cpu", "--max-steps", "2", "--output-dir", sys.argv[2], "--num-workers",
                        "0", "--max-chars", "100000", "--eval-windows", "4", "--batch-size", "4", "--logging-steps", "1"])
trainer = result["trainer"]
weights = trainer.accelerator.unwrap_model(trainer.model_wrapped).parameters()
mine = (type(trainer.model_wrapped).__name__, hashlib.md5(b"".join(p.detach().numpy().tobytes() for p in weights)).hexdigest())
ranks = [None, None]
dist.all_gather_object(ranks, mine)
assert ranks[0] == ranks[1] and ranks[0][0] == "DistributedDataParallel", ranks
assert result["eval_loss_before"] is not None
"""


def test_pretraining_on_two_processes_trains_one_model_on_both(tmp_path):
    """The example evaluates held-out loss before training: done before train(), it would leave the model unwrapped
    and each process would train a replica of its own on half the data."""
    import subprocess
    import sys

    (tmp_path / "ddp.py").write_text(DATA_PARALLEL_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(tmp_path / "ddp.py"), str(REPO / "examples" / "pretrain.py"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


SHARDED_SCRIPT = """
import hashlib, importlib.util, json, sys
import accelerate.state as state
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

# accelerate takes FSDP only on accelerators (on a CPU it falls back to DDP): this one decision is taken here.
setup = state.AcceleratorState.__init__
def fsdp_on_cpu(self, *args, **kwargs):
    setup(self, *args, **kwargs)
    if kwargs.get("fsdp_plugin") is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = kwargs["fsdp_plugin"]
state.AcceleratorState.__init__ = fsdp_on_cpu

spec = importlib.util.spec_from_file_location("pretrain", sys.argv[1])
pretrain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain)
result = pretrain.main(sys.argv[3:] + ["--output-dir", sys.argv[2]])
trainer = result["trainer"]
assert trainer.is_fsdp_enabled, trainer.accelerator.distributed_type
full = get_model_state_dict(trainer.model_wrapped, options=StateDictOptions(full_state_dict=True))
mine = hashlib.md5(b"".join(full[k].detach().contiguous().numpy().tobytes() for k in sorted(full))).hexdigest()
ranks = [None, None]
dist.all_gather_object(ranks, mine)
assert ranks[0] == ranks[1], ranks
if dist.get_rank() == 0:
    open(sys.argv[2] + ".losses.json", "w").write(json.dumps(result["train_losses"]))
dist.barrier()
dist.destroy_process_group()  # (a process that exits with gloo's threads alive can abort)
"""
TINY_RUN = ["--config", "tiny", "--cpu", "--max-steps", "4", "--num-workers", "0", "--max-chars", "100000",
            "--eval-windows", "4", "--logging-steps", "1", "--phase", "ocr:steps=2,read_back=1,freeze=language_model",
            "--phase", "olm:steps=2,read_back=0"]


def test_pretraining_sharded_by_fsdp2_on_two_processes_trains_what_one_process_trains(tmp_path):
    """examples/accelerate_fsdp.yaml's FSDP2 settings on two CPU processes (gloo): the same weights on both, the
    losses of one process with their global batch, a phase that unfreezes the language model, and a saved folder that
    loads with remote code."""
    import subprocess
    import sys

    import yaml

    settings = yaml.safe_load((REPO / "examples" / "accelerate_fsdp.yaml").read_text())["fsdp_config"]
    env = {f"FSDP_{key[len('fsdp_'):].upper()}": str(value).lower() if isinstance(value, bool) else str(value)
           for key, value in settings.items()}
    (tmp_path / "sharded.py").write_text(SHARDED_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(tmp_path / "sharded.py"), str(REPO / "examples" / "pretrain.py"),
                             str(tmp_path / "sharded"), *TINY_RUN, "--batch-size", "4"], capture_output=True, text=True,
                            timeout=600, env={**os.environ, **env, "ACCELERATE_USE_FSDP": "true", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    sharded_losses = json.loads((tmp_path / "sharded.losses.json").read_text())
    alone = load_example("pretrain").main(TINY_RUN + ["--batch-size", "8", "--output-dir", str(tmp_path / "alone")])
    assert sharded_losses == pytest.approx(alone["train_losses"], rel=1e-4)
    saved = json.loads((tmp_path / "sharded" / "config.json").read_text())["auto_map"]
    assert saved["AutoModelForCausalLM"] == "modeling_vist2.VIST2ForCausalLM", saved  # not the class FSDP2 made
    assert (tmp_path / "sharded" / "modeling_vist2.py").exists() and not list((tmp_path / "sharded").glob("_fsdp*"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", trust_remote_code=True)
    for name, tensor in alone["trainer"].model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def instructed(pretrained, tmp_path_factory):
    base, _ = pretrained
    out = tmp_path_factory.mktemp("instruct")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # 8 conversations and a batch of 8: every step sees the same data, so the loss trend is not sampling noise.
    result = load_example("instruct").main([
        "--base", str(base), "--output-dir", str(out), "--max-steps", "25", "--demo-conversations", "8",
        "--batch-size", "8", "--max-chars", "60000", "--num-workers", "0", "--lora-dropout", "0",
        "--logging-steps", "1", "--merge",
    ])
    torch.set_num_threads(threads)
    return base, out, result


def test_instruct_script_loss_falls_on_assistant_text(instructed):
    _, _, result = instructed
    losses = result["train_losses"]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.2, (first, last)


def test_an_instructed_model_stops_writing_at_the_end_of_its_reply(instructed):
    _, out, result = instructed
    end = result["processor"].tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = result["processor"].tokenizer.eos_token_id
    assert result["model"].generation_config.eos_token_id == [end, eos]
    saved = json.loads((out / "merged" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [end, eos]


def test_conversation_labels_cover_assistant_replies_only(processor):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": SAMPLE_TEXT[:300] + "\nSummarise."},
                {"role": "assistant", "content": "Text becomes sketches."}]
    (sample,) = [ConversationDataset([{"messages": messages}], processor)[0]]
    labelled = [t for t in sample["labels"] if t != -100]
    assert processor.decode(labelled) == "Text becomes sketches.<|im_end|>\n"


def test_lora_targets_only_the_language_model(instructed):
    _, _, result = instructed
    trainable = [name for name, p in result["model"].named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".aligner.modules_to_save." in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert any("language_model" in n and "lora_A" in n for n in trainable)


def test_adapter_reloads_and_merges_to_the_same_logits(instructed):
    from peft import PeftModel

    base_dir, out, result = instructed
    processor = result["processor"]
    batch = processor(text=[SAMPLE_TEXT[:400], SAMPLE_TEXT[200:500]], keep_closed_text=True)
    trained = result["model"].eval()
    with torch.no_grad():
        expected = trained(**batch).logits
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["aligner"] and config["target_modules"].startswith("language_model")

        base = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True)
        reloaded = PeftModel.from_pretrained(base, out).eval()
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-5)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)
        saved_merged = AutoModelForCausalLM.from_pretrained(out / "merged", trust_remote_code=True).eval()
        torch.testing.assert_close(saved_merged(**batch).logits, expected, rtol=0, atol=1e-5)


REMOTE_CODE_CHECK = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base_dir, adapter_dir, data = sys.argv[1:]
saved = torch.load(data)
base = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True)
assert type(base).__module__.startswith("transformers_modules"), type(base).__module__
model = PeftModel.from_pretrained(base, adapter_dir).eval()
with torch.no_grad():
    torch.testing.assert_close(model(**saved["batch"]).logits, saved["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.merge_and_unload()(**saved["batch"]).logits, saved["logits"], rtol=0, atol=1e-5)
print("remote-code base + adapter: same logits")
"""


def test_adapter_loads_onto_a_remote_code_base_in_a_fresh_interpreter(instructed, tmp_path):
    """What a Hub user does: no `vist2` import, the base's own *_vist2.py files via trust_remote_code."""
    import subprocess
    import sys

    base_dir, out, result = instructed
    batch = result["processor"](text=[SAMPLE_TEXT[:400], SAMPLE_TEXT[200:500]], keep_closed_text=True)
    with torch.no_grad():
        logits = result["model"].eval()(**batch).logits
    torch.save({"batch": dict(batch), "logits": logits}, tmp_path / "expected.pt")
    completed = subprocess.run([sys.executable, "-c", REMOTE_CODE_CHECK, str(base_dir), str(out),
                                str(tmp_path / "expected.pt")], capture_output=True, text=True, timeout=300,
                               cwd=tmp_path, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "same logits" in completed.stdout


def test_pretrain_script_builds_from_backbones(tmp_path):
    """--text-model/--vision-model: local tiny Qwen3 + SigLIP folders stand in for Hub checkpoints."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    text_dir, vision_dir = tmp_path / "text", tmp_path / "vision"
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=8)).save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, patch_size=16, image_size=64)).save_pretrained(vision_dir)
    out = tmp_path / "out"
    result = load_example("pretrain").main([
        "--text-model", str(text_dir), "--vision-model", str(vision_dir), "--chunk-size", "16",
        "--compression-ratio", "4", "--merge-size", "2", "--image-size", "64", "--output-dir", str(out),
        "--max-steps", "3", "--max-chars", "20000", "--num-workers", "0", "--eval-windows", "0",
        "--gradient-checkpointing", "--logging-steps", "1",
    ])
    assert len(result["train_losses"]) == 3
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.config.chunk_size == 16 and model.config.visual_tokens_per_chunk == 4
