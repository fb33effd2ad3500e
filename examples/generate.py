"""Compress a long text and write its continuation, printing the KV cache against the text-only backbone's.

    python examples/generate.py --model . --file book.txt --max-new-tokens 200
    cat notes.txt | python examples/generate.py --model .

The text is read chunk group by chunk group (`model.read`), so a book-length input never sits in memory as pixels
or as a text-sized KV cache.
"""

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, AutoProcessor, TextStreamer


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if getattr(layer, "keys", None) is not None)


def text_only_cache_bytes(model, num_tokens: int) -> int:
    """What the backbone alone would hold for `num_tokens` tokens: keys and values for every layer."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * model.dtype.itemsize
    return num_tokens * per_token


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder or Hub id of a VIST2 model (with its processor)")
    parser.add_argument("--file", help="text file to compress (default: standard input)")
    parser.add_argument("--prefix", default="", help="text kept uncompressed before the document, e.g. an instruction")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    text = open(args.file, encoding="utf-8").read() if args.file else sys.stdin.read()
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)

    inputs = model.read(processor, text, prefix=args.prefix)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    print(f"--- continuation ({args.max_new_tokens} tokens max) ---")
    out = model.generate(**inputs, processor=processor, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True,
                         streamer=TextStreamer(processor.tokenizer, skip_prompt=True), **sampling)
    new_tokens = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    total_tokens = len(processor.encode(args.prefix)) + len(processor.encode(text)) + new_tokens
    cache = inputs["cache"]  # generate wrote the continuation into the cache read() filled
    vist2, baseline = cache_bytes(cache), text_only_cache_bytes(model, total_tokens)
    print("\n--- KV cache ---")
    print(f"text + continuation: {total_tokens} tokens; VIST2 cache: {cache.get_seq_length()} entries, "
          f"{vist2 / 1024:.1f} KiB; the text-only backbone would hold {total_tokens} entries, {baseline / 1024:.1f} KiB "
          f"({vist2 / baseline:.1%} of it)")


if __name__ == "__main__":
    main()
