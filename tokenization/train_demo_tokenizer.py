"""Train the small byte-level BPE tokenizer that the VIST2 demo model uses.

Why a tokenizer of our own: the demo model must be buildable offline on a fresh
machine, and a backbone's 150k-token vocabulary would dwarf a toy model. A 4096
token byte-level BPE trained on the stdlib docstring corpus (see build_corpus.py)
is small, covers every string (byte-level: no unknown token) and decodes back to
exactly the input text, which the sketch renderer relies on when it turns the
tokens of a closed chunk back into text.

Special tokens, in id order 0..3:
  ``<|endoftext|>``  end of document; also used as BOS and as padding
  ``<|im_start|>``, ``<|im_end|>``  chat turns (ChatML, as in Qwen)
  ``<|sketch|>``  placeholder for the visual tokens of a chunk

Determinism: same corpus and vocab size => byte-identical tokenizer.json. The
tokenizers 0.23 BPE trainer breaks ties between equally frequent pairs on token
ids, and runs with 1 and 2 rayon threads gave identical files; the thread pool
still defaults to one thread (set before `tokenizers` is imported) as insurance
against other versions, which costs nothing noticeable at this corpus size.

CLI::

    python tokenization/train_demo_tokenizer.py --out tokenization/demo_tokenizer --vocab-size 4096
"""

from __future__ import annotations

import os

# Must precede the first import of `tokenizers` (rayon reads it once, when its
# global pool starts). setdefault: a caller may still choose more threads.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import argparse
import importlib.util
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SKETCH_TOKEN = "<|sketch|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, SKETCH_TOKEN]
DEFAULT_VOCAB_SIZE = 4096

# ChatML, the format of Qwen chat models, so that demo and real backbones share
# one conversation layout.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _load_sibling(name: str):
    """Import a script of this folder by path, so the folder needs no install."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train a raw `tokenizers.Tokenizer` (GPT-2 style byte-level BPE)."""
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would change the text on decode.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any string is encodable however small the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer


def wrap_for_transformers(tokenizer: Tokenizer):
    """Wrap the raw tokenizer so that `AutoTokenizer.from_pretrained` can load it.

    In transformers 5 `PreTrainedTokenizerFast` is an alias of
    `TokenizersBackend`, and `additional_special_tokens` was renamed
    `extra_special_tokens`.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[IM_START_TOKEN, IM_END_TOKEN, SKETCH_TOKEN],
        # The ByteLevel decoder already restores the exact text; the legacy
        # clean-up would delete spaces before punctuation ("a , b" -> "a, b").
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def train_demo_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_chars: int | None = None,
    texts: Sequence[str] | None = None,
):
    """Train on the training split of the stdlib corpus (or on `texts`) and wrap it."""
    if texts is None:
        corpus = _load_sibling("build_corpus")
        texts, _ = corpus.split_documents(corpus.build_corpus(max_chars=max_chars))
    return wrap_for_transformers(train_bpe(texts, vocab_size=vocab_size))


def chars_per_token(tokenizer, texts: Sequence[str]) -> float:
    """Compression of the tokenizer on `texts`; VIST2's chunk size is in tokens, so this
    sets how many characters each sketch image must hold."""
    n_tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    return sum(map(len, texts)) / max(n_tokens, 1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "demo_tokenizer"), help="output folder")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--max-chars", type=int, default=None, help="cap on the corpus size")
    args = parser.parse_args(argv)

    corpus = _load_sibling("build_corpus")
    train, heldout = corpus.split_documents(corpus.build_corpus(max_chars=args.max_chars))
    tokenizer = train_demo_tokenizer(args.vocab_size, texts=train)
    tokenizer.save_pretrained(args.out)
    print(f"trained on {len(train)} documents ({sum(map(len, train))} chars); saved {args.out}")
    print(
        f"vocab size {len(tokenizer)}; held-out: {len(heldout)} documents, "
        f"{chars_per_token(tokenizer, heldout):.3f} chars/token"
    )


if __name__ == "__main__":
    main()
