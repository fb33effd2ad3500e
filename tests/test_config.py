"""VIST2Config: derived sizes, validation that names the field and the fix, persistence."""

from pathlib import Path

import pytest
from transformers import AutoConfig

from vist2 import VIST2Config
from conftest import tiny_config as model_config
from vist2.training import tiny_config
from vist2.training.models import PROSE_CHARS_PER_TOKEN, characters_needed, check_fit, sketch_geometry


def test_visual_tokens_per_chunk_is_chunk_size_over_compression_ratio():
    config = tiny_config(chunk_size=16, compression_ratio=4)
    assert config.visual_tokens_per_chunk == 4


def test_default_config_is_qwen3_with_siglip_vision():
    config = VIST2Config()
    assert config.text_config.model_type == "qwen3"
    assert config.vision_config.model_type == "siglip_vision_model"
    side = 16 * config.merge_size
    assert config.visual_tokens_per_chunk == (config.image_height // side) * (config.image_width // side)


@pytest.mark.parametrize("chunk_size, ratio, chars_per_token, newline_glyph", [
    (256, 4, 1.0, "«"), (256, 4, PROSE_CHARS_PER_TOKEN, "«"), (256, 4, 4.4, None), (256, 8, 4.4, "«"),
    (96, 2, 3.0, "«"), (256, 4, 9.0, "«"),
])
def test_sketch_geometry_is_the_cheapest_that_holds_a_chunk(chunk_size, ratio, chars_per_token, newline_glyph):
    geometry = sketch_geometry(chunk_size, ratio, 16, chars_per_token, newline_glyph=newline_glyph)
    config = VIST2Config(chunk_size=chunk_size, compression_ratio=ratio, newline_glyph=newline_glyph, **geometry)
    s = config.merge_size
    assert (config.image_height // (16 * s)) * (config.image_width // (16 * s)) == config.visual_tokens_per_chunk
    need = characters_needed(chunk_size, chars_per_token, newline_glyph)
    assert config.sketch_cells >= need
    if s > 1:  # the same token grid with one merge step less has too few cells
        smaller = VIST2Config(chunk_size=chunk_size, compression_ratio=ratio, newline_glyph=newline_glyph,
                              merge_size=s - 1, image_height=config.image_height // s * (s - 1),
                              image_width=config.image_width // s * (s - 1))
        assert smaller.sketch_cells < need


def test_default_geometry_holds_a_chunk_of_large_vocabulary_prose():
    config = VIST2Config()
    assert config.sketch_cells >= characters_needed(config.chunk_size, PROSE_CHARS_PER_TOKEN, config.newline_glyph)
    assert {k: getattr(config, k) for k in ("image_height", "image_width", "merge_size")} == sketch_geometry(
        config.chunk_size, config.compression_ratio, config.patch_size)


@pytest.mark.parametrize("merge_size", [1, 2, 3])
def test_sketch_geometry_completes_a_given_merge_size(merge_size):
    config = VIST2Config(**sketch_geometry(256, 4, 16, merge_size=merge_size))
    assert config.merge_size == merge_size
    side = config.patch_size * merge_size
    assert (config.image_height // side) * (config.image_width // side) == config.visual_tokens_per_chunk


def test_ratio_no_sketch_can_hold_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"^VIST2Config\.compression_ratio: .*Fix: use a lower compression_ratio"):
        sketch_geometry(256, 4, 16, chars_per_token=40.0)
    assert sketch_geometry(256, 2, 16, chars_per_token=40.0)["merge_size"] >= 1


def test_sketch_too_small_for_a_tokenizer_is_refused_with_the_geometry_that_fits():
    config = VIST2Config(image_height=128, image_width=128, merge_size=1)
    check_fit(config, 1.0)
    with pytest.raises(ValueError, match=r"^VIST2Config\.image_height: .* holds 512 characters.*Fix: .*merge_size"):
        check_fit(config, 4.0)


def test_a_ratio_without_a_geometry_is_refused_with_a_fix_that_works():
    with pytest.raises(ValueError, match=r"^VIST2Config\.image_height: .*gives 64 visual tokens.*= 32\. Fix: .*"
                                         r"image_height=128, image_width=256.*vist2\.training\.sketch_geometry"):
        VIST2Config(compression_ratio=8)
    assert VIST2Config(compression_ratio=8, image_height=128, image_width=256).visual_tokens_per_chunk == 32
    config = VIST2Config(compression_ratio=8, **sketch_geometry(256, 8, 16))
    assert config.visual_tokens_per_chunk == 32


@pytest.mark.parametrize(
    "overrides, field, fix",
    [
        ({"chunk_size": 18}, "chunk_size", "multiple of compression_ratio"),
        ({"image_height": 72, "image_width": 64}, "image_height", "multiple of patch_size*merge_size"),
        ({"image_width": 40}, "image_width", "multiple of patch_size*merge_size"),
        ({"image_height": 128}, "image_height", "gives 8 visual tokens"),
        ({"chunk_size": 0}, "chunk_size", "positive integer"),
        ({"char_width": -1}, "char_width", "positive integer"),
        ({"margin": 40}, "margin", "no room"),
        ({"min_font_size": 20}, "min_font_size", "exceeds font_size"),
        ({"overflow_policy": "truncate"}, "overflow_policy", "unknown policy"),
        ({"read_back_positions": "before_sketch"}, "read_back_positions", "before_next_chunk"),
        ({"num_channels": 1}, "num_channels", "vision_config.num_channels"),
        ({"foreground": 300}, "foreground", "grey level"),
        ({"foreground": 255}, "foreground", "equals background"),
        ({"newline_glyph": " "}, "newline_glyph", "one visible character"),
        ({"newline_glyph": "<<"}, "newline_glyph", "one visible character"),
        ({"special_token_glyphs": {"<|endoftext|>": "EOT"}}, "special_token_glyphs", "one visible character"),
        ({"special_token_glyphs": ["©"]}, "special_token_glyphs", "map token strings"),
        ({"byte_aligned": 1}, "byte_aligned", "byte-level tokenizer"),
        ({"special_token_glyphs": {"<|endoftext|>": "«"}, "newline_glyph": "«"}, "special_token_glyphs",
         "its own character"),
    ],
)
def test_invalid_setting_raises_value_error_naming_field_and_fix(overrides, field, fix):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    message = str(error.value)
    assert message.startswith(f"VIST2Config.{field}:")
    assert fix in message and "Fix:" in message


def test_sliding_window_backbone_is_rejected():
    with pytest.raises(ValueError, match="VIST2Config.text_config: sliding-window"):
        tiny_config(text_config={"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 8})


def test_config_round_trips_through_save_and_load(tmp_path):
    config = tiny_config(margin=4, overflow_policy="shrink_font", foreground=20, newline_glyph="«",
                         special_token_glyphs={"<|endoftext|>": "©"})
    config.save_pretrained(tmp_path)
    loaded = VIST2Config.from_pretrained(tmp_path)
    assert loaded.sketch_settings == config.sketch_settings
    assert loaded.text_config.to_dict() == config.text_config.to_dict()
    assert loaded.vision_config.to_dict() == config.vision_config.to_dict()
    assert loaded.merge_size == config.merge_size and loaded.sketch_token_id == config.sketch_token_id


def test_saved_config_names_remote_code_in_auto_map(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "vist2"
    assert '"AutoConfig": "configuration_vist2.VIST2Config"' in (tmp_path / "config.json").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# The font is part of the model: saved with it, found with it
# ---------------------------------------------------------------------------------------------------------------------


def font_file(folder):
    """Pillow's built-in scalable font written out as a .ttf file in `folder`."""
    from PIL import ImageFont

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "builtin.ttf"
    path.write_bytes(ImageFont.load_default(size=12).path.getvalue())
    return str(path)


def saved_with_font(tokenizer, tmp_path):
    from vist2 import VIST2ForCausalLM, VIST2Processor

    config = model_config(tokenizer, font_path=font_file(tmp_path / "fonts"))
    processor = VIST2Processor.from_config(config, tokenizer)
    VIST2ForCausalLM(config).save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return processor, tmp_path / "model"


def test_save_pretrained_copies_the_font_into_the_model_folder_and_records_its_file_name(tokenizer, tmp_path):
    import json

    _, folder = saved_with_font(tokenizer, tmp_path)
    assert (folder / "builtin.ttf").read_bytes() == (tmp_path / "fonts" / "builtin.ttf").read_bytes()
    assert json.loads((folder / "config.json").read_text())["font_path"] == "builtin.ttf"
    assert json.loads((folder / "processor_config.json").read_text())["sketch_settings"]["font_path"] == "builtin.ttf"


def test_a_system_font_given_by_name_is_the_file_saved_with_the_model(tokenizer, tmp_path, monkeypatch):
    from PIL import ImageFont

    monkeypatch.chdir(tmp_path)  # no file of that name here: Pillow finds it among the system's fonts, or not at all
    try:
        found = ImageFont.truetype("DejaVuSansMono.ttf").path
    except OSError:
        pytest.skip("no system font DejaVuSansMono.ttf on this machine")
    tiny_config(font_path="DejaVuSansMono.ttf").save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "DejaVuSansMono.ttf").read_bytes() == Path(found).read_bytes()


def test_a_config_made_from_a_loaded_configs_dict_draws_with_the_same_font_anywhere(tokenizer, tmp_path, monkeypatch):
    _, folder = saved_with_font(tokenizer, tmp_path)
    loaded = VIST2Config.from_pretrained(folder)
    monkeypatch.chdir(tmp_path)  # another working directory than the model's folder
    assert VIST2Config.from_dict(loaded.to_dict()).font_path == loaded.font_path == str(folder.resolve() / "builtin.ttf")


def test_a_loaded_model_draws_with_the_font_in_its_own_folder(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor, folder = saved_with_font(tokenizer, tmp_path)
    text = "The font is part of the model. " * 8
    before = processor(text=text)["pixel_values"]
    (tmp_path / "fonts" / "builtin.ttf").unlink()  # the font it was built with is gone: only the saved copy is left
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert model.config.font_path == loaded.sketch_settings["font_path"] == str((folder / "builtin.ttf").resolve())
    assert loaded.settings_mismatch(model.config) == {} and len(before) > 1
    assert (loaded(text=text)["pixel_values"] == before).all()


def test_a_model_loaded_from_a_relative_folder_finds_its_font(tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    _, folder = saved_with_font(tokenizer, tmp_path)
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True)
    assert model.config.font_path == str((folder / "builtin.ttf").resolve())


def test_a_model_from_a_hub_cache_keeps_its_fonts_name_not_its_blobs(tokenizer, tmp_path):
    """In a Hub cache a snapshot's file is a link to a blob named by its hash: saved again, the font keeps its name."""
    from transformers import AutoModelForCausalLM

    from vist2 import VIST2Processor

    processor, folder = saved_with_font(tokenizer, tmp_path)
    blob = tmp_path / "blobs" / "0f5db4f1"
    blob.parent.mkdir()
    (folder / "builtin.ttf").rename(blob)
    (folder / "builtin.ttf").symlink_to(blob)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert Path(model.config.font_path).name == "builtin.ttf"
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "builtin.ttf").read_bytes() == blob.read_bytes()
    assert VIST2Processor.from_pretrained(folder).settings_mismatch(model.config) == {}


def test_autoconfig_with_the_package_imported_finds_the_font_in_the_models_folder(tokenizer, tmp_path, monkeypatch):
    """The package registers VIST2Config with AutoConfig, which reads config.json without VIST2Config.get_config_dict."""
    _, folder = saved_with_font(tokenizer, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert AutoConfig.from_pretrained(folder).font_path == str(folder / "builtin.ttf")


@pytest.mark.parametrize("how", ["subfolder", "config.json path"])
def test_a_model_loaded_through_autoconfig_from_a_subfolder_or_a_config_file_finds_its_font(tokenizer, tmp_path, how):
    from transformers import AutoModelForCausalLM

    from vist2 import VIST2ForCausalLM

    VIST2ForCausalLM(model_config(tokenizer, font_path=font_file(tmp_path / "fonts"))).save_pretrained(
        tmp_path / "repo" / "sub")
    if how == "subfolder":
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "repo", subfolder="sub")
        assert model.config.font_path == str(tmp_path / "repo" / "sub" / "builtin.ttf")
    assert VIST2Config.from_pretrained(tmp_path / "repo" / "sub" / "config.json").font_path == str(
        tmp_path / "repo" / "sub" / "builtin.ttf")


def test_the_fonts_licence_beside_it_travels_with_it(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    tiny_config(font_path=str(repo / "DejaVuSansMono.ttf")).save_pretrained(tmp_path)
    assert (tmp_path / "DejaVuSansMono-LICENSE.txt").read_bytes() == (repo / "DejaVuSansMono-LICENSE.txt").read_bytes()


def test_the_fonts_licence_travels_with_a_model_loaded_from_the_hub(tmp_path, monkeypatch):
    """A Hub cache holds only the files asked for: the licence is fetched with the font, so a save finds it beside it."""
    import shutil

    from vist2 import configuration_vist2

    repo, snapshot = Path(__file__).resolve().parent.parent, tmp_path / "snapshot"
    snapshot.mkdir()

    def download(repo_id, filename, _raise_exceptions_for_missing_entries=True, **kwargs):  # as the Hub's cache does
        if not (repo / filename).exists():
            return None
        return shutil.copy(repo / filename, snapshot / filename)
    monkeypatch.setattr(configuration_vist2, "cached_file", download)
    font = configuration_vist2.locate_font("DejaVuSansMono.ttf", "someone/vist2-demo", {})
    configuration_vist2.copy_font(font, tmp_path / "saved")
    assert (tmp_path / "saved" / "DejaVuSansMono-LICENSE.txt").read_bytes() == (
        repo / "DejaVuSansMono-LICENSE.txt").read_bytes()


def test_a_setting_changed_after_the_config_was_made_is_refused_where_it_would_take_effect(tokenizer, tmp_path):
    import torch

    from vist2 import VIST2ForCausalLM, VIST2Processor
    from vist2.modeling_vist2 import token_kinds

    config = model_config(tokenizer)
    model = VIST2ForCausalLM(config)
    model.tokenizer = tokenizer
    pixels = VIST2Processor.from_config(config, tokenizer)(text="Sketches replace old text. " * 12)["pixel_values"]
    config.compression_ratio = 2 * config.compression_ratio  # m = L / r halves; a sketch still gives the old m
    ids = torch.tensor([[10, 11] + [config.sketch_token_id] * config.visual_tokens_per_chunk + [12]])
    for where in (lambda: VIST2Processor.from_config(config, tokenizer), lambda: config.save_pretrained(tmp_path),
                  lambda: model.generate(input_ids=torch.tensor([[10, 11, 12]]), max_new_tokens=1),
                  lambda: model.embed(ids, token_kinds(ids, None, config.sketch_token_id), pixels[:1])):
        with pytest.raises(ValueError, match=r"VIST2Config\.image_height: .* Fix: "):
            where()
    with pytest.raises(ValueError, match=r"VIST2Config\.image_height"):
        AutoConfig.from_pretrained(saved_config(tokenizer, tmp_path), compression_ratio=8)


def saved_config(tokenizer, tmp_path):
    model_config(tokenizer).save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def test_a_model_whose_font_file_is_missing_is_refused_naming_the_file_and_the_fix(tokenizer, tmp_path):
    _, folder = saved_with_font(tokenizer, tmp_path)
    (folder / "builtin.ttf").unlink()
    with pytest.raises(OSError, match=r"font_path: the model names the font 'builtin.ttf', which .* does not hold\. "
                                      r"Fix: save the model with save_pretrained"):
        VIST2Config.from_pretrained(folder)
