"""Stage 2: modal-interleaved instruction tuning with LoRA on the language model (DESIGN §5).

Conversations use the ChatML template. Leading system messages form the never-compressed prefix; every later turn
is compressed chunk by chunk as it scrolls out of the open chunk, so the model learns to answer from the sketches of
earlier turns. The loss is on assistant replies only. LoRA adapts the language model's linear layers (never the
vision tower); the modal aligner is trained in full and saved with the adapter (`modules_to_save`).

    # CPU demo on the stage-1 tiny model, instructions built from the offline stdlib corpus
    python examples/pretrain.py --output-dir runs/pretrain-tiny
    python examples/instruct.py --base runs/pretrain-tiny --output-dir runs/instruct-tiny

    # on a stage-1 model, with your own data (JSON lines with a "messages" list), merged copy saved too
    python examples/instruct.py --base runs/pretrain --data chats.jsonl --output-dir runs/instruct --merge --lr 2e-4

Load the result:

    base = AutoModelForCausalLM.from_pretrained(BASE, trust_remote_code=True)
    model = PeftModel.from_pretrained(base, OUT)          # or: model.merge_and_unload()
    processor = AutoProcessor.from_pretrained(OUT, trust_remote_code=True)
"""

import argparse
import importlib.util
import logging
import os
import random
from pathlib import Path

from peft import PeftModel, get_peft_model
from transformers import set_seed

from vist2 import VIST2ForCausalLM
from vist2.training import (
    ConversationDataset,
    VIST2DataCollator,
    VIST2Trainer,
    language_model_lora_config,
    load_dataset_source,
    load_or_build_model,
    vist2_training_arguments,
)

REPO = Path(__file__).resolve().parent.parent
logger = logging.getLogger("instruct")

SYSTEM_PROMPT = "You are a careful reader. Earlier text reaches you as images of its chunks."


def demo_conversations(documents, chunk_size, count, seed=0):
    """Instruction data made from plain documents, for the offline demo.

    Each passage spans several chunks, so by the time the question is asked its start is only visible as sketches:
    answering "first line" needs reading them, "continue" is optical language modelling in chat form.
    """
    rng = random.Random(seed)
    passage_chars = 3 * 6 * chunk_size  # about six chunks at ~3 characters per token
    long_enough = [d for d in documents if len(d) > passage_chars + 100]
    conversations = []
    for _ in range(count):
        document = rng.choice(long_enough)
        passage = document[:passage_chars]
        if rng.random() < 0.5:
            question, answer = "What is the first line of the text above?", passage.split("\n")[0][:120]
        else:
            question, answer = "Continue the text.", document[passage_chars : passage_chars + 100]
        conversations.append([
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{passage}\n\n{question}"},
            {"role": "assistant", "content": answer},
        ])
    return conversations


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    model = parser.add_argument_group("base model (one of: --base, --text-model + --vision-model, --config)")
    model.add_argument("--base", help="a saved VIST2 model folder, e.g. the output of examples/pretrain.py")
    model.add_argument("--text-model", help="causal LM backbone (with --vision-model); the built base is saved")
    model.add_argument("--vision-model", help="SigLIP / SigLIP2 vision backbone")
    model.add_argument("--config", default="tiny", help="'tiny' or a VIST2 config: random base, saved to OUT/base")
    model.add_argument("--tokenizer", help="tokenizer folder for --config (default: the demo tokenizer)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", help="JSON-lines/parquet files or a `datasets` name with a messages column "
                                                "(default: demo instructions from the stdlib corpus)")
    data.add_argument("--messages-column", default="messages")
    data.add_argument("--split", default="train")
    data.add_argument("--demo-conversations", type=int, default=64)
    data.add_argument("--max-chars", type=int, default=400_000, help="cap on the demo corpus")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=16)
    lora.add_argument("--lora-alpha", type=int, default=32)
    lora.add_argument("--lora-dropout", type=float, default=0.05)

    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", default="runs/instruct")
    train.add_argument("--max-steps", type=int, default=40)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--lr", type=float, default=1e-2,
                       help="peak learning rate; the default suits the tiny demo model, use ~2e-4 for real backbones")
    train.add_argument("--num-workers", type=int, default=1, help="DataLoader workers (they render the sketches)")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto")
    train.add_argument("--cpu", action="store_true")
    train.add_argument("--save-steps", type=int, default=0)
    train.add_argument("--resume", nargs="?", const="last", help="checkpoint folder, or the last in --output-dir")
    train.add_argument("--logging-steps", type=int, default=5)
    train.add_argument("--merge", action="store_true", help="also save the merged model to OUT/merged")
    train.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_conversations(args, chunk_size):
    if args.data:
        return load_dataset_source(args.data, split=args.split)
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "tokenization" / "build_corpus.py")
    build_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_corpus)
    train_docs, _ = build_corpus.split_documents(build_corpus.build_corpus(max_chars=args.max_chars))
    conversations = demo_conversations(train_docs, chunk_size, args.demo_conversations, args.seed)
    return [{"messages": messages} for messages in conversations]


def stop_at_reply_end(model, tokenizer):
    """Replies are trained to end with `<|im_end|>` (`encode_conversation`): generation stops there too, not only at
    the eos token, or a chat model would write on past its turn."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [end] + [i for i in ids if i != end]


def main(argv=None):
    args = parse_args(argv)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun / accelerate launch, one log suffices
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    output_dir = Path(args.output_dir)
    set_seed(args.seed)
    tokenizer = args.tokenizer
    if tokenizer is None and not (args.base or args.text_model):
        tokenizer = str(REPO / "tokenization" / "demo_tokenizer")
    model, processor = load_or_build_model(args.base, args.text_model, args.vision_model, args.config, tokenizer)
    stop_at_reply_end(model, processor.tokenizer)
    if not args.base:
        if not args.text_model:
            logger.warning("training LoRA on a randomly initialised base: with a frozen random LM head the loss can "
                           "hardly fall; pass --base with the output of examples/pretrain.py")
        # The adapter must name a base it can be loaded onto: save the one built here (with its remote code).
        base_dir = output_dir / "base"
        model.save_pretrained(base_dir)
        processor.save_pretrained(base_dir)
        model.name_or_path = str(base_dir)
        logger.info(f"saved the base model to {base_dir}")

    model = get_peft_model(model, language_model_lora_config(args.lora_r, args.lora_alpha, args.lora_dropout))
    model.print_trainable_parameters()

    conversations = load_conversations(args, processor.chunk_size)
    train_dataset = ConversationDataset(conversations, processor, messages_column=args.messages_column)

    training_args = vist2_training_arguments(args, output_dir, args.max_steps)
    trainer = VIST2Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=VIST2DataCollator(processor, read_back=False),  # stage 2 is pure optical: no read-back
        processing_class=processor,
    )
    trainer.train(resume_from_checkpoint=True if args.resume == "last" else args.resume)

    trainer.save_model(str(output_dir))  # a PeftModel saves the adapter (LoRA + aligner) only
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        logger.info(f"saved the adapter and processor to {output_dir}")
        if args.merge:
            # Merge a reloaded copy (merge_and_unload rewrites the model it is called on): base + saved adapter.
            base = VIST2ForCausalLM.from_pretrained(model.peft_config["default"].base_model_name_or_path)
            merged = PeftModel.from_pretrained(base, output_dir).merge_and_unload()
            stop_at_reply_end(merged, processor.tokenizer)
            merged.save_pretrained(output_dir / "merged")
            processor.save_pretrained(output_dir / "merged")
            logger.info(f"saved the merged model to {output_dir / 'merged'}")
    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"trainer": trainer, "model": model, "processor": processor, "train_losses": train_losses}


if __name__ == "__main__":
    main()
