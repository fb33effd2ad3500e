"""Specifications of the tokenization/ scripts: corpus, demo tokenizer, VIST2 special tokens.

The scripts are loaded by file path: tokenization/ is a folder of tools, not a package.
Everything here runs offline.
"""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZATION = ROOT / "tokenization"
DEMO_TOKENIZER = TOKENIZATION / "demo_tokenizer"
BYTE_TOKENIZER = TOKENIZATION / "byte_tokenizer"

ROUND_TRIP_TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "a , b . c !  double  spaces\n\n\ttab\r\n",
    "def f(x):\n    return {'k': [1, 2.5e-3]}  # comment",
    "Ünïcödé — 日本語のテキスト, עברית, emoji 🙂👍🏽, ½ ∑ ≠",
    "",
]


def load_script(name):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOKENIZATION / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus():
    return load_script("build_corpus")


@pytest.fixture(scope="module")
def small_docs(corpus):
    return corpus.build_corpus(max_chars=100_000)


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_TOKENIZER, local_files_only=True)


@pytest.fixture
def backbone_dir(tmp_path):
    """A tiny backbone tokenizer folder with an eos token and no pad token, like many base LMs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", extra_special_tokens=["<|im_start|>"]
    )
    tokenizer.save_pretrained(tmp_path / "backbone")
    return tmp_path / "backbone"


# --- corpus -----------------------------------------------------------------


def test_corpus_build_is_deterministic_and_non_empty(corpus, small_docs):
    again = corpus.build_corpus(max_chars=100_000)
    assert again == small_docs
    assert len(small_docs) > 50
    assert sum(map(len, small_docs)) <= 100_000


def test_corpus_documents_are_long_unique_docstrings(corpus, small_docs):
    assert all(len(doc) >= corpus.MIN_DOC_CHARS for doc in small_docs)
    assert len(set(small_docs)) == len(small_docs)
    assert all(doc == doc.strip() for doc in small_docs)


def test_capped_corpus_is_a_prefix_of_a_larger_one(corpus, small_docs):
    smaller = corpus.build_corpus(max_chars=30_000)
    assert small_docs[: len(smaller)] == smaller


def test_corpus_jsonl_keeps_document_boundaries(corpus, tmp_path):
    docs = ["first paragraph\n\nsecond paragraph", 'quotes " and \\ and ü']
    corpus.write_jsonl(docs, tmp_path / "c.jsonl")
    assert corpus.read_jsonl(tmp_path / "c.jsonl") == docs
    assert all("text" in json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines())


def test_heldout_split_is_disjoint_and_covers_the_corpus(corpus, small_docs):
    train, heldout = corpus.split_documents(small_docs, heldout_fraction=0.2)
    assert heldout and train
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(small_docs)


def test_heldout_split_depends_only_on_each_document(corpus, small_docs):
    _, heldout = corpus.split_documents(small_docs, heldout_fraction=0.2)
    shuffled = list(small_docs)
    random.Random(0).shuffle(shuffled)
    subset = shuffled[: len(shuffled) // 2]
    _, heldout_of_subset = corpus.split_documents(subset, heldout_fraction=0.2)
    assert set(heldout_of_subset) == set(heldout) & set(subset)


# --- demo tokenizer -----------------------------------------------------------


def test_demo_tokenizer_loads_offline_with_autotokenizer(demo_tokenizer):
    assert len(demo_tokenizer) == 4096
    assert demo_tokenizer.eos_token == demo_tokenizer.pad_token == demo_tokenizer.bos_token == "<|endoftext|>"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_demo_tokenizer_round_trips_text_exactly(demo_tokenizer, text):
    ids = demo_tokenizer(text)["input_ids"]
    assert demo_tokenizer.decode(ids) == text


def test_demo_tokenizer_round_trips_corpus_documents(demo_tokenizer, small_docs):
    for doc in small_docs[:50]:
        assert demo_tokenizer.decode(demo_tokenizer(doc)["input_ids"]) == doc


def test_sketch_is_a_single_special_token_in_demo_tokenizer(demo_tokenizer):
    sketch = load_script("add_special_tokens").SKETCH_TOKEN
    sketch_id = demo_tokenizer.convert_tokens_to_ids(sketch)
    assert demo_tokenizer(sketch)["input_ids"] == [sketch_id]
    assert sketch_id in demo_tokenizer.all_special_ids
    ids = demo_tokenizer("before" + sketch + "after")["input_ids"]
    assert demo_tokenizer.decode(ids, skip_special_tokens=True) == "beforeafter"


def test_demo_tokenizer_has_chatml_template(demo_tokenizer):
    text = demo_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_training_is_deterministic(small_docs, tmp_path):
    train_script = load_script("train_demo_tokenizer")
    texts = small_docs[:150]
    for name in ("a", "b"):
        train_script.train_demo_tokenizer(vocab_size=300, texts=texts).save_pretrained(tmp_path / name)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_trained_tokenizer_puts_special_tokens_first(small_docs):
    train_script = load_script("train_demo_tokenizer")
    tokenizer = train_script.train_demo_tokenizer(vocab_size=300, texts=small_docs[:50])
    assert tokenizer.convert_tokens_to_ids(train_script.SPECIAL_TOKENS) == [0, 1, 2, 3]
    assert len(tokenizer) == 300


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_byte_tokenizer_gives_one_token_per_utf8_byte_and_round_trips(text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BYTE_TOKENIZER, local_files_only=True)
    ids = tokenizer(text)["input_ids"]
    assert len(tokenizer) == 260 and len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_committed_byte_tokenizer_is_what_the_script_builds_at_vocab_260(small_docs, tmp_path):
    """No merges at 256 bytes + 4 special tokens, so the corpus cannot change it."""
    train_script = load_script("train_demo_tokenizer")
    train_script.train_demo_tokenizer(vocab_size=260, texts=small_docs[:20]).save_pretrained(tmp_path)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / file).read_bytes() == (BYTE_TOKENIZER / file).read_bytes()


# --- add_special_tokens ----------------------------------------------------


def test_add_special_tokens_adds_sketch_as_special_token(backbone_dir):
    from transformers import AutoTokenizer

    script = load_script("add_special_tokens")
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    size = len(tokenizer)
    assert script.add_vist2_special_tokens(tokenizer) == 1
    assert len(tokenizer) == size + 1
    sketch_id = tokenizer.convert_tokens_to_ids(script.SKETCH_TOKEN)
    assert tokenizer("a" + script.SKETCH_TOKEN + "b")["input_ids"].count(sketch_id) == 1
    ids = tokenizer("the fox" + script.SKETCH_TOKEN + " jumps")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the fox jumps"


def test_add_special_tokens_is_idempotent(backbone_dir):
    from transformers import AutoTokenizer

    script = load_script("add_special_tokens")
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    script.add_vist2_special_tokens(tokenizer)
    size, specials = len(tokenizer), list(tokenizer.all_special_tokens)
    assert script.add_vist2_special_tokens(tokenizer) == 0
    assert len(tokenizer) == size
    assert tokenizer.all_special_tokens == specials


def test_add_special_tokens_sets_pad_to_eos_when_missing(backbone_dir):
    from transformers import AutoTokenizer

    script = load_script("add_special_tokens")
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    assert tokenizer.pad_token is None
    script.add_vist2_special_tokens(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def test_add_special_tokens_keeps_backbone_special_tokens(backbone_dir):
    from transformers import AutoTokenizer

    script = load_script("add_special_tokens")
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    script.add_vist2_special_tokens(tokenizer)
    assert "<|im_start|>" in tokenizer.all_special_tokens


def test_converted_tokenizer_folder_reloads_with_sketch_and_pad(backbone_dir, tmp_path):
    from transformers import AutoTokenizer

    script = load_script("add_special_tokens")
    _, added = script.convert(str(backbone_dir), str(tmp_path / "vist2"))
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "vist2")
    assert added == 1
    assert script.SKETCH_TOKEN in reloaded.all_special_tokens
    assert reloaded.pad_token == "<|endoftext|>"
    config = json.loads((tmp_path / "vist2" / "tokenizer_config.json").read_text())
    assert "is_local" not in config
