"""Shared fixtures: a tiny byte-level BPE tokenizer, a tiny VIST2 config/model/processor, all built offline."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vist2.modeling_vist2 import VIST2ForCausalLM
from vist2.processing_vist2 import SKETCH_TOKEN, VIST2Processor
from vist2.training import tiny_config as tiny_vist2_config

SAMPLE_TEXT = (
    "Global context compression renders every finished chunk of text into a small sketch image. "
    "A vision encoder reads the sketch and the language model sees a quarter as many visual tokens. "
    "The open chunk stays as text, so the model keeps writing while its memory stays small. "
) * 8

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", SKETCH_TOKEN]

# Operators that copy a value from the device to the host: on a GPU each waits for every kernel queued before it.
READ_BACK_OPERATORS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero"}


def build_tokenizer(vocab_size=384, special_tokens=SPECIAL_TOKENS):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", additional_special_tokens=special_tokens[1:],
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def tiny_config(tokenizer, **overrides):
    return tiny_vist2_config(vocab_size=len(tokenizer), sketch_token_id=tokenizer.convert_tokens_to_ids(SKETCH_TOKEN),
                             **overrides)


@pytest.fixture(scope="session")
def config(tokenizer):
    return tiny_config(tokenizer)


@pytest.fixture(scope="session")
def processor(config, tokenizer):
    return VIST2Processor.from_config(config, tokenizer)


@pytest.fixture(scope="session")
def model(config):
    torch.manual_seed(0)
    return VIST2ForCausalLM(config).eval()
