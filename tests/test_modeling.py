"""VIST2ForCausalLM: loss, transformers plumbing, pretrained backbones, remote-code save/load."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM, SiglipConfig,
                          SiglipModel, SiglipVisionConfig, SiglipVisionModel)

from conftest import SAMPLE_TEXT, build_tokenizer, tiny_config
from vist2 import VIST2Config, VIST2ForCausalLM, VIST2Processor
from vist2.configuration_vist2 import SKETCH_SETTING_KEYS
from vist2.modeling_vist2 import TEXT, token_kinds
from vist2.processing_vist2 import IGNORE_INDEX
from vist2.training import from_backbones
from vist2.training.models import characters_needed, prose_chars_per_token

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def training_batch(processor):
    return processor(text=[SAMPLE_TEXT[:300], SAMPLE_TEXT[:120]], prefix=["Sys.", ""], keep_closed_text=True,
                     return_labels=True)


def test_loss_is_next_token_prediction_along_the_text_stream(model, training_batch, config):
    out = model(**training_batch)
    kinds = token_kinds(training_batch["input_ids"], training_batch["attention_mask"], config.sketch_token_id)
    logits, targets = [], []
    for row in range(kinds.shape[0]):
        text = (kinds[row] == TEXT).nonzero()[:, 0]
        logits.append(out.logits[row, text[:-1]])
        targets.append(training_batch["labels"][row, text[1:]])
    expected = F.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected)


def test_sketch_positions_carry_no_label(model, training_batch, config):
    labels = training_batch["labels"].clone()
    sketch = training_batch["input_ids"] == config.sketch_token_id
    labels[sketch] = 7  # a label placed on a visual position must be ignored
    torch.testing.assert_close(model(**dict(training_batch, labels=labels)).loss, model(**training_batch).loss)


def test_the_generation_layout_trains_no_token_on_the_text_before_a_sketched_chunk(model, processor, config):
    """`P V_1 ... V_{K-1} c_K` holds no text of the sketched chunks: the prefix's last token is not followed by c_K's
    first, so that pair carries no loss, whether the labels come from the processor or are the input ids."""
    batch = processor(text=SAMPLE_TEXT[:300], prefix="Sys.", return_labels=True)
    kinds = token_kinds(batch["input_ids"], batch["attention_mask"], config.sketch_token_id)[0]
    text = (kinds == TEXT).nonzero()[:, 0]
    prefix = int(((batch["chunk_ids"][0] == 0) & (kinds == TEXT)).sum())
    assert (batch["chunk_ids"][0, text] > 1).any(), "closed chunks were sketched"
    assert batch["labels"][0, text[prefix]] == IGNORE_INDEX  # the open chunk's first token
    stream = (kinds[None] == TEXT) & (batch["chunk_ids"] > 0)  # the processor labels no prefix token
    as_ids = dict(batch, labels=batch["input_ids"].masked_fill(~stream, IGNORE_INDEX))
    logits = model(**batch).logits[0]
    expected = F.cross_entropy(logits[text[prefix:-1]], batch["input_ids"][0, text[prefix + 1 :]])  # after the gap
    torch.testing.assert_close(model(**batch).loss, expected)
    torch.testing.assert_close(model(**as_ids).loss, expected)


@pytest.mark.parametrize("tie", [True, False])
def test_tie_word_embeddings_given_to_the_config_ties_the_head_and_is_saved_as_it_is(tokenizer, tmp_path, tie):
    config = tiny_config(tokenizer, text_config=dict(tiny_config(tokenizer).text_config.to_dict(),
                                                     tie_word_embeddings=not tie), tie_word_embeddings=tie)
    model = VIST2ForCausalLM(config)
    tied = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert tied == tie == saved["tie_word_embeddings"] == saved["text_config"]["tie_word_embeddings"]


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, training_batch):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = VIST2ForCausalLM(tiny_config(tokenizer)).train()
        if checkpointing:  # renamed activation_checkpointing_enable in later 5.x releases
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            assert model.language_model.model.gradient_checkpointing and model.vision_tower.encoder.gradient_checkpointing
        model(**training_batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_input_embeddings_are_the_language_models_and_can_be_resized(tokenizer, training_batch):
    model = VIST2ForCausalLM(tiny_config(tokenizer))
    assert model.get_input_embeddings() is model.language_model.get_input_embeddings()
    model.resize_token_embeddings(len(tokenizer) + 8)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) + 8
    assert model(**training_batch).logits.shape[-1] == len(tokenizer) + 8


def test_bfloat16_runs_on_cpu(model, training_batch):
    reference = model(**training_batch).logits
    low = VIST2ForCausalLM(model.config).eval()
    low.load_state_dict(model.state_dict())
    out = low.to(torch.bfloat16)(**training_batch).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)


def test_no_split_modules_name_the_decoder_and_encoder_layers(model):
    assert {"Qwen3DecoderLayer", "SiglipEncoderLayer"} <= set(model._no_split_modules)


def test_attention_flags_are_honest(model):
    assert model._supports_sdpa and model._supports_flex_attn and not model._supports_flash_attn


def test_invalid_pixel_values_name_the_fix(model, processor):
    batch = processor(text=SAMPLE_TEXT[:300])
    with pytest.raises(ValueError, match="pixel_values must be uint8 sketches of shape"):
        model(**dict(batch, pixel_values=batch["pixel_values"][:, :1]))
    with pytest.raises(ValueError, match="from the same processor call"):
        model(**dict(batch, pixel_values=batch["pixel_values"][:1]))
    with pytest.raises(ValueError, match="must have one shape"):
        model(**dict(batch, chunk_ids=batch["chunk_ids"][:, 1:]))


def test_sketches_are_normalised_by_the_model_as_the_config_says(model, processor, config):
    sketches = processor(text=SAMPLE_TEXT[:300])["pixel_values"]
    assert sketches.dtype == torch.uint8 and sketches.shape[1:] == (config.image_height, config.image_width)
    grey = (sketches.float() / 255 - config.image_mean) / config.image_std
    pixels = grey[:, None].expand(-1, config.num_channels, -1, -1)
    expected = model.aligner(model.vision_tower(pixel_values=pixels).last_hidden_state)
    torch.testing.assert_close(model.encode_sketches(sketches), expected, rtol=0, atol=0)


@pytest.mark.parametrize("text_model_type", ["llama", "qwen3"])
def test_other_causal_lm_families_work_as_backbone(tokenizer, text_model_type):
    config = tiny_config(tokenizer, text_model_type=text_model_type)
    model = VIST2ForCausalLM(config).eval()
    processor = VIST2Processor.from_config(config, tokenizer)
    out = model.generate(**processor(text=SAMPLE_TEXT[:120]), processor=processor, max_new_tokens=20,
                         do_sample=False)
    assert out.shape[1] > 20


SIGLIP2_TOWER = {"model_type": "siglip2_vision_model", "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 16, "num_patches": 9,
                 "num_channels": 3, "vision_use_head": False}  # a 3x3 position grid, resized to the 4x4 of a sketch


def test_siglip2_vision_tower_works(tokenizer, processor):
    model = VIST2ForCausalLM(tiny_config(tokenizer, vision_config=SIGLIP2_TOWER)).eval()
    batch = processor(text=SAMPLE_TEXT[:200], keep_closed_text=True, return_labels=True)
    assert torch.isfinite(model(**batch).loss)


def test_a_siglip2_tower_gives_the_visual_tokens_of_its_documented_call(tokenizer, processor):
    """`encode_sketches` passes one row of spatial shapes and no patch mask (every sketch has one grid, no patch is
    padding): what the tower gives must equal its documented call, per-sketch shapes and an all-ones mask."""
    torch.manual_seed(0)
    model = VIST2ForCausalLM(tiny_config(tokenizer, vision_config=SIGLIP2_TOWER)).eval()
    pixels = processor(text=SAMPLE_TEXT[:200])["pixel_values"]
    n, (h, w), p = pixels.shape[0], model.aligner.grid, model.config.patch_size
    grey = ((pixels.float() / 255 - model.config.image_mean) / model.config.image_std)[:, None].expand(-1, 3, -1, -1)
    patches = grey.reshape(n, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(n, h * w, p * p * 3)
    with torch.no_grad():
        documented = model.vision_tower(pixel_values=patches, pixel_attention_mask=torch.ones(n, h * w, dtype=torch.long),
                                        spatial_shapes=torch.tensor([[h, w]] * n)).last_hidden_state
        assert n > 1 and torch.allclose(model.encode_sketches(pixels), model.aligner(documented), atol=1e-6)


@pytest.fixture(params=[None, SIGLIP2_TOWER], ids=["siglip", "siglip2"])
def model_with_each_tower(request, tokenizer):
    """A model with each vision tower VIST2 supports."""
    return VIST2ForCausalLM(tiny_config(tokenizer, **({"vision_config": request.param} if request.param else {}))).eval()


def test_a_tower_pass_dispatches_as_many_operators_for_many_sketches_as_for_one(model_with_each_tower, processor):
    """Dispatched operators are kernel launches on a GPU: a prompt's sketches cost one pass, whatever their number."""
    from benchmarks.op_count import count_ops

    model = model_with_each_tower
    many = processor(text=SAMPLE_TEXT[:400])["pixel_values"]
    one = many[:1]
    with torch.no_grad():
        assert many.shape[0] > 4 and count_ops(lambda: model.encode_sketches(many))[0] == count_ops(
            lambda: model.encode_sketches(one))[0]


def test_a_tower_pass_reads_nothing_back_from_the_device(model_with_each_tower, processor):
    """A read-back stalls the host until the device has run every kernel queued so far. On the `meta` device a tensor
    has no values, so reading one back raises; what the host builds from its own ints may still be read, even where a
    `torch.device` context sends every tensor built without a device to the device."""
    model = model_with_each_tower
    pixels = processor(text=SAMPLE_TEXT[:400])["pixel_values"]
    with torch.no_grad(), torch.device("meta"):
        visual = model.to("meta").encode_sketches(pixels.to("meta"))
    assert visual.shape == (pixels.shape[0], model.config.visual_tokens_per_chunk, model.config.text_config.hidden_size)


@pytest.fixture(scope="module")
def backbone_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    tokenizer = build_tokenizer()
    text = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer) - 1, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8))
    text.save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    vision_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         patch_size=16, image_size=224)
    SiglipVisionModel(SiglipVisionConfig(**vision_config)).save_pretrained(root / "vision")
    SiglipModel(SiglipConfig(vision_config=vision_config, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=1))).save_pretrained(root / "siglip")
    return root


GEOMETRY = dict(chunk_size=16, compression_ratio=4, merge_size=2, image_height=64, image_width=64, font_size=12,
                min_font_size=6)


@pytest.mark.parametrize("vision", ["vision", "siglip"])
def test_from_backbones_keeps_pretrained_weights_and_adds_the_sketch_token(backbone_folders, vision):
    model = from_backbones(str(backbone_folders / "text"), str(backbone_folders / vision), **GEOMETRY)
    text = Qwen3ForCausalLM.from_pretrained(backbone_folders / "text")
    assert torch.equal(model.language_model.model.layers[1].mlp.up_proj.weight, text.model.layers[1].mlp.up_proj.weight)
    reference_vision = (SiglipVisionModel.from_pretrained(backbone_folders / "vision") if vision == "vision"
                        else SiglipModel.from_pretrained(backbone_folders / "siglip").vision_model)
    assert torch.equal(model.vision_tower.embeddings.patch_embedding.weight,
                       reference_vision.embeddings.patch_embedding.weight)
    assert not hasattr(model.vision_tower, "head") or model.vision_tower.head is None
    assert model.tokenizer.convert_tokens_to_ids("<|sketch|>") == model.config.sketch_token_id
    assert model.get_input_embeddings().num_embeddings == len(model.tokenizer)
    assert not any(p.is_meta for p in model.parameters())
    processor = VIST2Processor.from_config(model.config, model.tokenizer)
    out = model.generate(**processor(text=SAMPLE_TEXT[:150]), processor=processor, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 1


def test_from_backbones_of_a_bf16_language_model_and_an_fp32_tower_is_one_bf16_model(backbone_folders):
    text = Qwen3ForCausalLM.from_pretrained(backbone_folders / "text", dtype=torch.bfloat16)  # as Qwen3 is stored
    model = from_backbones(text, str(backbone_folders / "vision"), tokenizer=build_tokenizer(), **GEOMETRY)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    processor = VIST2Processor.from_config(model.config, model.tokenizer)
    assert model.generate(**processor(text=SAMPLE_TEXT[:150]), processor=processor, max_new_tokens=2).shape[0] == 1


def test_from_backbones_keeps_the_attention_implementations_the_backbones_were_loaded_with(backbone_folders):
    text = Qwen3ForCausalLM.from_pretrained(backbone_folders / "text", attn_implementation="eager")
    vision = SiglipVisionModel.from_pretrained(backbone_folders / "vision", attn_implementation="sdpa")
    model = from_backbones(text, vision, tokenizer=build_tokenizer(), **GEOMETRY)
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_from_backbones_gives_a_language_model_whose_attention_takes_no_mask_sdpa(backbone_folders):
    text = Qwen3ForCausalLM.from_pretrained(backbone_folders / "text")
    text.config._attn_implementation = "flash_attention_2"  # (as loaded with it: its kernels take no layout mask)
    model = from_backbones(text, str(backbone_folders / "vision"), tokenizer=build_tokenizer(), **GEOMETRY)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_a_vision_tower_cast_to_another_dtype_still_feeds_the_aligner(model, training_batch):
    reference = model(**training_batch).logits
    mixed = VIST2ForCausalLM(model.config).eval()
    mixed.load_state_dict(model.state_dict())
    mixed.vision_tower.to(torch.bfloat16)
    torch.testing.assert_close(mixed(**training_batch).logits, reference, atol=0.05, rtol=0.05)


def tiny_backbones(tokenizer):
    torch.manual_seed(0)
    text = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer) + 1, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, patch_size=16, image_size=224))
    return text, vision


@pytest.mark.parametrize("name", ["byte_tokenizer", "demo_tokenizer"])
def test_from_backbones_picks_the_cheapest_sketch_that_holds_the_tokenizers_prose(name):
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / name)
    model = from_backbones(*tiny_backbones(tokenizer), tokenizer=tokenizer)
    config, s = model.config, model.config.merge_size
    assert config.chunk_size == VIST2Config().chunk_size
    assert (config.image_height // (16 * s)) * (config.image_width // (16 * s)) == config.visual_tokens_per_chunk
    need = characters_needed(config.chunk_size, prose_chars_per_token(tokenizer), config.newline_glyph)
    assert config.sketch_cells >= need
    assert s == 1 or VIST2Config(merge_size=s - 1, image_height=config.image_height // s * (s - 1),
                                 image_width=config.image_width // s * (s - 1)).sketch_cells < need
    assert VIST2Config().sketch_cells >= need  # the default geometry holds it too
    processor = VIST2Processor.from_config(config, model.tokenizer)
    batch = processor(text=(REPO / "tokenization" / "prose_sample.txt").read_text())  # held-out prose
    assert batch["pixel_values"].shape[0] > 0 and batch["chunks_kept_as_text"].item() == 0


def test_from_backbones_refuses_a_sketch_too_small_for_the_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenization" / "demo_tokenizer")
    small = dict(image_height=128, image_width=128, merge_size=1)  # 512 cells for ~1 000 characters
    with pytest.raises(ValueError, match=r"^VIST2Config\.image_height: a 128x128 sketch .* holds 512 characters, but "
                                         r"a chunk of 256 tokens .* needs \d+.*Fix: leave image_height"):
        from_backbones(*tiny_backbones(tokenizer), tokenizer=tokenizer, **small)
    from_backbones(*tiny_backbones(tokenizer), tokenizer=tokenizer, chunk_size=64, **{
        **small, "compression_ratio": 1})  # the same sketch for 64 tokens holds them


def test_demo_checkpoint_keeps_its_own_geometry():
    saved = json.loads((REPO / "config.json").read_text())
    config = VIST2Config.from_pretrained(REPO)
    saved["font_path"] = saved["font_path"] and str(REPO / saved["font_path"])  # found in the model's folder
    assert {key: getattr(config, key) for key in SKETCH_SETTING_KEYS} == {key: saved[key]
                                                                          for key in SKETCH_SETTING_KEYS}
    assert config.merge_size == saved["merge_size"]


def save_model_and_processor(model, processor, folder):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def test_save_pretrained_writes_safetensors_remote_code_and_auto_map(model, processor, tmp_path):
    save_model_and_processor(model, processor, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "configuration_vist2.py", "modeling_vist2.py",
            "processing_vist2.py", "processor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_vist2.VIST2Config", "AutoModel": "modeling_vist2.VIST2Model",
                        "AutoModelForCausalLM": "modeling_vist2.VIST2ForCausalLM"}


def test_device_map_auto_loads(model, processor, tmp_path, training_batch):
    save_model_and_processor(model, processor, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, device_map="auto")
    torch.testing.assert_close(loaded(**training_batch).logits, model(**training_batch).logits)


REMOTE_CODE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["vist2"] = None  # the installed package must not be importable here
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor
    folder, text = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    from transformers import AutoModel
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "VIST2Model"
    batch = processor(text=text, keep_closed_text=True)
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save({"logits": logits, "input_ids": batch["input_ids"], "config": config.to_dict()}, folder + "/out.pt")
""")


def test_remote_code_loads_in_a_process_without_the_package_and_gives_identical_logits(model, processor, tmp_path):
    save_model_and_processor(model, processor, tmp_path)
    script = tmp_path / "load.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path), SAMPLE_TEXT[:250]], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    batch = processor(text=SAMPLE_TEXT[:250], keep_closed_text=True)
    assert torch.equal(remote["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(remote["logits"], model(**batch).logits)


def test_remote_code_draws_with_the_font_saved_with_the_model(tokenizer, tmp_path):
    from PIL import ImageFont

    font = tmp_path / "fonts" / "builtin.ttf"  # a TrueType file that exists only until the model is saved
    font.parent.mkdir()
    font.write_bytes(ImageFont.load_default(size=12).path.getvalue())
    config = tiny_config(tokenizer, font_path=str(font))
    model, processor = VIST2ForCausalLM(config).eval(), VIST2Processor.from_config(config, tokenizer)
    folder = tmp_path / "model"
    save_model_and_processor(model, processor, folder)
    batch = processor(text=SAMPLE_TEXT[:250], keep_closed_text=True)
    font.unlink()
    (tmp_path / "load.py").write_text(REMOTE_CODE_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(folder), SAMPLE_TEXT[:250]],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(folder / "out.pt")
    assert remote["config"]["font_path"] == str((folder / "builtin.ttf").resolve()) and batch["pixel_values"].shape[0] > 1
    assert torch.equal(remote["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(remote["logits"], model(**batch).logits)


PLAIN_IDS_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["vist2"] = None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, text = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # as the pipeline and lm-eval load it
    ids = tokenizer(text, return_tensors="pt").input_ids
    print(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape[1] - ids.shape[1])
""")


def test_plain_ids_generate_with_remote_code_finds_the_tokenizer_without_a_warning(model, processor, tmp_path):
    """A client that tokenizes for itself (a pipeline, lm-eval) gets the saved tokenizer loaded for rendering, and no
    warning that a `vist2` config was read as another model type."""
    save_model_and_processor(model, processor, tmp_path)
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_IDS_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path), SAMPLE_TEXT[:250]], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "4" and "model of type" not in result.stderr, result.stderr[-2000:]


def test_the_base_model_gives_the_hidden_states_the_lm_head_reads(model, processor, tokenizer, training_batch):
    from vist2 import VIST2Model

    base = VIST2Model(model.config).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lm_head" not in k})
    assert not any("lm_head" in name for name in base.state_dict())
    with torch.no_grad():
        hidden = base(**training_batch).last_hidden_state
        torch.testing.assert_close(model.next_token_logits(hidden), model(**training_batch).logits)
        base.tokenizer = tokenizer  # plain ids are laid out into the compressed sequence, as the processor lays out text
        plain = base(input_ids=torch.tensor([processor.encode(SAMPLE_TEXT[:300])])).last_hidden_state
        torch.testing.assert_close(plain, base(**processor(text=SAMPLE_TEXT[:300])).last_hidden_state)


def test_one_checkpoint_loads_as_the_base_model_or_the_causal_lm(model, tmp_path):
    from transformers import AutoModel

    from vist2 import VIST2Model

    model.save_pretrained(tmp_path / "causal")
    base, info = AutoModel.from_pretrained(tmp_path / "causal", output_loading_info=True)
    assert isinstance(base, VIST2Model) and not isinstance(base, VIST2ForCausalLM)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for name, weight in base.state_dict().items():
        torch.testing.assert_close(weight, model.state_dict()[name])
    base.save_pretrained(tmp_path / "base")
    causal, info = AutoModelForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert not info["unexpected_keys"] and set(info["missing_keys"]) <= {"language_model.lm_head.weight"}


def test_automodel_loads_the_demo_checkpoint_with_remote_code_and_no_loading_warnings():
    from pathlib import Path

    from transformers import AutoModel, AutoProcessor

    root = Path(__file__).resolve().parent.parent
    base, info = AutoModel.from_pretrained(root, trust_remote_code=True, output_loading_info=True)
    causal = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=True)
    assert type(base).__name__ == "VIST2Model" and not any(info[k] for k in ("missing_keys", "unexpected_keys"))
    processor = AutoProcessor.from_pretrained(root, trust_remote_code=True)
    inputs = processor(text=SAMPLE_TEXT[:400])
    with torch.no_grad():
        hidden = base.eval()(**inputs).last_hidden_state
        torch.testing.assert_close(causal.next_token_logits(hidden), causal.eval()(**inputs).logits)


def test_a_model_sharded_by_fsdp2_saves_a_folder_that_loads_with_remote_code(model, tokenizer, tmp_path):
    """FSDP2 gives the sharded model a class of torch's making; the saved folder must still name and hold VIST2's."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = copy.deepcopy(model)
        for layer in sharded.language_model.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        assert type(sharded) is not VIST2ForCausalLM
        full = {name: tensor.full_tensor() for name, tensor in sharded.state_dict().items()}
        sharded.save_pretrained(tmp_path / "saved", state_dict=full)
    finally:
        dist.destroy_process_group()
    tokenizer.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "modeling_vist2.py").exists() and not list((tmp_path / "saved").glob("_fsdp*"))
    auto_map = json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_vist2.VIST2ForCausalLM", auto_map
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert type(loaded).__name__ == "VIST2ForCausalLM"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
