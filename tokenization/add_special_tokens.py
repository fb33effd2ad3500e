"""Add the VIST2 special tokens to a backbone tokenizer (e.g. a saved Qwen3 tokenizer).

Why: a VIST2 model marks where the visual tokens of a closed chunk sit with the
placeholder ``<|sketch|>``. It must be a *special* token: it is never split by
the tokenizer, and ``decode(..., skip_special_tokens=True)`` drops it, so the
placeholders never leak into generated text or into the text of a chunk that is
rendered. Batched training and left-padded generation also need a pad token;
a backbone without one gets its EOS token as pad (no new embedding row).

Adding a token grows the vocabulary by one: resize the LLM's embeddings to
``len(tokenizer)`` afterwards (``model.resize_token_embeddings(len(tokenizer))``).

Written against the transformers 5 tokenizer API, where the list of extra special
tokens is ``extra_special_tokens`` (``additional_special_tokens`` in 4.x).

CLI::

    python tokenization/add_special_tokens.py SRC_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

SKETCH_TOKEN = "<|sketch|>"
VIST2_SPECIAL_TOKENS = (SKETCH_TOKEN,)


def add_vist2_special_tokens(tokenizer) -> int:
    """Make the VIST2 tokens special tokens of `tokenizer`, in place; idempotent.

    Returns the number of tokens added to the vocabulary (0 on a second call, or
    when the token already existed and was only marked special).
    """
    size_before = len(tokenizer)
    missing = [t for t in VIST2_SPECIAL_TOKENS if t not in tokenizer.all_special_tokens]
    if missing:
        # replace_extra_special_tokens=False keeps the backbone's own extra
        # special tokens (Qwen's <|im_start|>, <|vision_pad|>, ...) special.
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set one before adding VIST2 tokens")
        tokenizer.pad_token = tokenizer.eos_token
    return len(tokenizer) - size_before


def convert(src_dir: str, out_dir: str):
    """Load a tokenizer folder, add the VIST2 tokens and save the result elsewhere."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    added = add_vist2_special_tokens(tokenizer)
    # transformers 5 records these load-time flags in init_kwargs and would write
    # them into tokenizer_config.json; they describe this machine, not the tokenizer.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out_dir)
    return tokenizer, added


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src_dir", help="folder of the backbone tokenizer")
    parser.add_argument("out_dir", help="folder to write the tokenizer with VIST2 tokens to")
    args = parser.parse_args(argv)

    tokenizer, added = convert(args.src_dir, args.out_dir)
    print(
        f"added {added} token(s); {SKETCH_TOKEN} id {tokenizer.convert_tokens_to_ids(SKETCH_TOKEN)}, "
        f"pad {tokenizer.pad_token!r} id {tokenizer.pad_token_id}, vocabulary {len(tokenizer)}; saved {args.out_dir}"
    )


if __name__ == "__main__":
    main()
