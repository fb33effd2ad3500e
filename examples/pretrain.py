"""Stage 1: curriculum pretraining for optical language modelling (DESIGN §5).

The curriculum: an OCR warm-up in which every text chunk also sees its own sketch (read-back), so the model learns
to read; a phase that withdraws that visibility (read-back probability 1 -> 0); then pure optical language
modelling, where a chunk sees only the sketches of earlier chunks. Phases can freeze modules and shorten the context
or change the compression ratio (see `vist2.training`). Built on transformers' `Trainer`: `accelerate launch` gives
DDP / FSDP / DeepSpeed.

    # CPU, tiny random model on the offline stdlib corpus (about a minute)
    python examples/pretrain.py --config tiny --output-dir runs/pretrain-tiny

    # explicit phases: warm-up with the LLM frozen, withdrawal, optical LM at a shorter context first
    python examples/pretrain.py --phase "ocr:steps=20,read_back=1,freeze=language_model" \\
        --phase "withdraw:steps=20,read_back=1:0" --phase "olm:steps=20,read_back=0"

    # pretrained backbones, several GPUs
    accelerate launch --config_file examples/accelerate_config.yaml examples/pretrain.py \\
        --text-model Qwen/Qwen3-0.6B --vision-model google/siglip2-base-patch16-256 --chunk-size 256 \\
        --compression-ratio 4 --image-size 256 --data corpus/*.jsonl --streaming --context-length 4096 --lr 1e-4 \\
        --phase "ocr:steps=2000,read_back=1,freeze=language_model" --phase "withdraw:steps=4000,read_back=1:0" \\
        --phase "olm:steps=20000,read_back=0" --batch-size 8 --gradient-checkpointing
"""

import argparse
import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import set_seed

from vist2.training import (
    CurriculumSchedule,
    PackedTextDataset,
    StreamingTextDataset,
    VIST2DataCollator,
    VIST2Trainer,
    apply_final_geometry,
    final_phase,
    load_documents,
    load_or_build_model,
    processor_for_phase,
    vist2_training_arguments,
)

REPO = Path(__file__).resolve().parent.parent
logger = logging.getLogger("pretrain")


def stdlib_corpus(max_chars):
    """The repo's offline demo corpus (CPython docstrings), split into (train, held-out) documents."""
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "tokenization" / "build_corpus.py")
    build_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_corpus)
    return build_corpus.split_documents(build_corpus.build_corpus(max_chars=max_chars))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    model = parser.add_argument_group("model (one of: --model, --text-model + --vision-model, --config + --tokenizer)")
    model.add_argument("--model", help="a saved VIST2 model folder to continue from")
    model.add_argument("--text-model", help="causal LM backbone: Hub id or folder (with --vision-model)")
    model.add_argument("--vision-model", help="SigLIP / SigLIP2 vision backbone: Hub id or folder")
    model.add_argument("--config", default="tiny", help="'tiny' or a VIST2 config folder/file, random weights")
    model.add_argument("--tokenizer", help="tokenizer folder (for --config: one with '<|sketch|>', default the demo "
                                           "tokenizer; for --text-model: overrides the text model's)")
    model.add_argument("--chunk-size", type=int, help="L, text tokens per chunk (from_backbones)")
    model.add_argument("--compression-ratio", type=int, help="r; a chunk becomes L/r visual tokens (from_backbones)")
    model.add_argument("--image-size", type=int, help="square sketch side in pixels (from_backbones)")
    model.add_argument("--merge-size", type=int, help="s x s patches merged per visual token (from_backbones)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", help="text/jsonl/parquet files or folders, or a `datasets` name "
                                                "(default: the offline stdlib docstring corpus)")
    data.add_argument("--dataset-config", help="`datasets` configuration name")
    data.add_argument("--split", default="train")
    data.add_argument("--text-column", default="text")
    data.add_argument("--streaming", action="store_true", help="read, tokenise and render on the fly")
    data.add_argument("--eval-data", nargs="+", help="held-out documents (default corpus: its held-out split)")
    data.add_argument("--eval-windows", type=int, default=32, help="held-out windows to evaluate on (0: none)")
    data.add_argument("--max-chars", type=int, default=400_000, help="cap on the default corpus")
    data.add_argument("--context-length", type=int, help="text tokens per window (default: 8 chunks)")

    curriculum = parser.add_argument_group("curriculum")
    curriculum.add_argument("--phase", action="append", default=[], metavar="SPEC",
                            help="name:steps=N,read_back=P|A:B,freeze=M1+M2,context=T,ratio=R[,render key=int]\n"
                                 "(repeat in order; default: warm-up / withdrawal / optical LM over --max-steps)")
    curriculum.add_argument("--warmup-fraction", type=float, default=0.2)
    curriculum.add_argument("--withdraw-fraction", type=float, default=0.3)
    curriculum.add_argument("--warmup-freeze", default="", help="modules frozen in the default warm-up, e.g. "
                            "'language_model' or 'vision_tower+language_model' (pretrained backbones)")

    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", default="runs/pretrain")
    train.add_argument("--max-steps", type=int, help="default: the phases' total, or 60")
    train.add_argument("--batch-size", type=int, default=8, help="windows per device and micro-batch")
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--lr", type=float, default=1e-2,
                       help="peak learning rate; the default suits the tiny demo model, use ~1e-4 for backbones")
    train.add_argument("--lr-warmup-steps", type=int, default=0)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--num-workers", type=int, default=1, help="DataLoader workers (they render the sketches)")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto", help="auto: on where supported")
    train.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    train.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    train.add_argument("--resume", nargs="?", const="last", help="resume from a checkpoint folder, or the last one "
                                                                 "in --output-dir")
    train.add_argument("--logging-steps", type=int, default=5)
    train.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_schedule(args):
    if args.phase:
        return CurriculumSchedule.parse(args.phase)
    return CurriculumSchedule.default(args.max_steps or 60, args.warmup_fraction, args.withdraw_fraction,
                                      tuple(filter(None, args.warmup_freeze.split("+"))))


def build_datasets(args, processor, schedule, window_tokens, max_steps=None):
    if args.data:
        train_docs = load_documents(args.data, split=args.split, text_column=args.text_column,
                                    streaming=args.streaming, name=args.dataset_config)
        eval_docs = load_documents(args.eval_data, text_column=args.text_column) if args.eval_data else None
    else:
        train_docs, eval_docs = stdlib_corpus(args.max_chars)
        if args.eval_data:
            eval_docs = load_documents(args.eval_data, text_column=args.text_column)
    if args.streaming:
        train = StreamingTextDataset(train_docs, processor, window_tokens, schedule)
    else:
        train = PackedTextDataset.from_documents(train_docs, processor, window_tokens, schedule)
    evaluation = None
    if eval_docs is not None and args.eval_windows:
        # Held-out loss is pure optical LM (no read-back) at the geometry the model ends with.
        final = final_phase(schedule, max_steps)
        try:
            evaluation = PackedTextDataset.from_documents(eval_docs, processor_for_phase(processor, final),
                                                          final.context_length or window_tokens, show_progress=False)
            evaluation = torch.utils.data.Subset(evaluation, range(min(args.eval_windows, len(evaluation))))
        except ValueError as error:  # a held-out split shorter than one window
            logger.warning(f"no held-out evaluation: {error}")
    return train, evaluation


def main(argv=None):
    args = parse_args(argv)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun / accelerate launch, one log suffices
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    set_seed(args.seed)  # before the model is built: random weights depend on it
    config_kwargs = {k: v for k, v in {"chunk_size": args.chunk_size, "compression_ratio": args.compression_ratio,
                                       "image_height": args.image_size, "image_width": args.image_size,
                                       "merge_size": args.merge_size}.items()
                     if v is not None}
    tokenizer = args.tokenizer
    if tokenizer is None and not (args.model or args.text_model):
        tokenizer = str(REPO / "tokenization" / "demo_tokenizer")
    model, processor = load_or_build_model(args.model, args.text_model, args.vision_model, args.config, tokenizer,
                                           **config_kwargs)
    schedule = build_schedule(args)
    max_steps = args.max_steps or schedule.total_steps
    window_tokens = args.context_length or 8 * processor.chunk_size
    logger.info(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, L={processor.chunk_size}, "
                f"m={processor.visual_tokens_per_chunk}; window {window_tokens} tokens; curriculum:\n"
                f"{schedule.describe()}")
    train_dataset, eval_dataset = build_datasets(args, processor, schedule, window_tokens, max_steps)

    training_args = vist2_training_arguments(
        args, args.output_dir, max_steps,
        per_device_eval_batch_size=args.batch_size,
        warmup_steps=args.lr_warmup_steps,
        weight_decay=args.weight_decay,
        # Batches of an iterable dataset cannot be sliced across processes: pixel_values has one row per sketch.
        accelerator_config={"dispatch_batches": False} if args.streaming else None,
        # The held-out loss before training, inside train(): a Trainer.evaluate() before it would prepare the model
        # for evaluation, and train() would then never wrap it for data parallelism (each process its own replica).
        eval_on_start=eval_dataset is not None and not args.resume,
    )
    trainer = VIST2Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=VIST2DataCollator(processor),
        processing_class=processor,
        curriculum=schedule,
    )
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    logger.info(f"{training_args.world_size} process(es) ({training_args.parallel_mode.value}, backend {backend}) "
                f"on {training_args.device}, bf16={training_args.bf16}, {max_steps} steps")
    resume = True if args.resume == "last" else args.resume
    trainer.train(resume_from_checkpoint=resume)
    before = next((entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry), None)
    after = trainer.evaluate()["eval_loss"] if eval_dataset is not None else None
    if before is not None:
        logger.info(f"held-out optical LM loss: {before:.4f} before, {after:.4f} after")

    final_processor = apply_final_geometry(model, processor, schedule, max_steps)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        final_processor.save_pretrained(args.output_dir)
        logger.info(f"saved model and processor to {args.output_dir}")
    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"trainer": trainer, "train_losses": train_losses, "eval_loss_before": before, "eval_loss_after": after}


if __name__ == "__main__":
    main()
