"""Training VIST2 with transformers' `Trainer`: data, collator, curriculum (DESIGN §5).

This module belongs to the installed `vist2` package only; it is not part of a Hub model repo's remote code.

Data. Documents (plain-text files, JSON lines, a `datasets` dataset, streamed or not) are tokenised, joined with
EOS between documents and cut into *windows* of `window_tokens` text tokens. Windows are chunk-aligned: a window is a
whole number of chunks, so every chunk but the last is closed, rendered, and laid out for training as
`c_1 V_1 c_2 V_2 ... c_K` (`VIST2Processor.encode_sample(..., keep_closed_text=True)`). Rendering happens in the
dataset's `__getitem__` / `__iter__`, i.e. in DataLoader worker processes when `dataloader_num_workers > 0`.

Curriculum (stage 1). A `CurriculumSchedule` is a list of phases. Each phase says for how many optimizer steps it
lasts, the probability that a sample is trained with *read-back* (OCR warm-up: chunk `c_i` also sees its own sketch
`V_i`, so the model must learn to read; ramps are allowed, e.g. 1 -> 0 to withdraw raw-text visibility), which
modules are frozen, and optionally a shorter context or a higher compression ratio. Who applies what, and why there:

- read-back is drawn in `VIST2Trainer.compute_loss`, in the training process at the step the batch is used in.
  A DataLoader `collate_fn` runs inside the worker processes, batches ahead of the step that consumes them, so it
  cannot know the step exactly; the trainer can, and its draw is a pure function of (seed, rank, step), so a resumed
  run draws the same flags as an uninterrupted one.
- freezing is applied by `CurriculumCallback` at the start of each optimizer step (`requires_grad_`). The optimizer
  is built over every parameter before the first phase freezes anything, so a module unfrozen later trains; a frozen
  parameter gets no gradient and AdamW skips it. Under DDP set `ddp_find_unused_parameters=True`.
- context length and compression ratio change what is rendered, so the dataset reads the current phase from a
  step counter in shared memory that the callback advances. A batch is rendered when it is fetched, ahead of its
  step: accelerate's data loader fetches one batch ahead even with `dataloader_num_workers=0`, so the first batch of
  a new phase keeps the previous geometry (one step late), and with workers the batches already prefetched (at most
  `num_workers * prefetch_factor`) do too. A phase change reaches the data within that many steps.

Context-length schedule: a phase with `context_length < window_tokens` splits every window into consecutive
samples of `context_length` tokens, so the number of text tokens per optimizer step stays constant.

Compression-ratio schedule: `r = L / m`. The model's weights fix `m` (sketch size, patch size, merge size and the
aligner's input width all follow from it), so one model can only raise `r` by raising the chunk size `L` at the
same `m`: the same sketch must then hold `r'/r` times more text (set smaller glyph cells with the phase's
`render_overrides`). Raising `r` at fixed `L` would need fewer visual tokens per sketch, i.e. a new sketch
geometry or merge size, and a new aligner (its input width is `vision_hidden * merge_size**2`): that is a different
model, not a phase. The model's forward does not depend on `L` (chunks come from `chunk_ids`), so windows of
different `L` train the same weights; `apply_final_geometry` writes the last phase's `L`, `r` and render settings
into the config and processor that are saved.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from ..processing_vist2 import VIST2Processor
from .models import from_backbones, read_back_chunk, sketch_geometry, tiny_config

logger = logging.getLogger(__name__)

FREEZABLE_MODULES = ("vision_tower", "aligner", "language_model")

# LoRA goes on the language model's linear layers only: the vision tower has `q_proj`/`k_proj`/`v_proj` too, and
# stage 2 keeps it frozen. PEFT full-matches a string `target_modules` against each module's qualified name.
LANGUAGE_MODEL_LORA_TARGETS = r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

SAMPLE_KEYS = ("input_ids", "chunk_ids", "labels", "sketches", "chunks_kept_as_text")


# ---------------------------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------------------------

_FILE_BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                  ".csv": "csv"}


def load_dataset_source(source, split="train", streaming=False, name=None):
    """A `datasets` dataset from files, a folder of files, a saved dataset folder, or a dataset name.

    Files: `.txt`/`.md` hold one document each; `.jsonl`/`.json`/`.parquet`/`.csv` one record per row.
    `streaming=True` reads lazily (an `IterableDataset`), for corpora that do not fit in memory.
    """
    import datasets

    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            files += sorted(p for p in path.rglob("*") if p.suffix in _FILE_BUILDERS)
        elif path.is_file():
            files.append(path)
    if files:
        builders = {_FILE_BUILDERS.get(p.suffix) for p in files}
        if len(builders) != 1 or None in builders:
            raise ValueError(f"mixed or unknown file types {sorted({p.suffix for p in files})}; "
                             f"use one of {sorted(_FILE_BUILDERS)} at a time")
        builder = builders.pop()
        extra = {"sample_by": "document"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train",
                                     streaming=streaming, **extra)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        dataset = datasets.load_from_disk(str(paths[0]))
        dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
        return dataset.to_iterable_dataset() if streaming else dataset
    if len(paths) == 1:
        return datasets.load_dataset(str(paths[0]), name, split=split, streaming=streaming)
    raise FileNotFoundError(f"none of {paths} is a file, a folder or a dataset name")


def load_documents(source, split="train", text_column="text", streaming=False, name=None):
    """Documents (see `load_dataset_source`) as a dataset whose `text` column holds the text."""
    documents = load_dataset_source(source, split=split, streaming=streaming, name=name)
    return documents.rename_column(text_column, "text") if text_column != "text" else documents


def iter_texts(documents) -> Iterator[str]:
    """Strings out of a list of strings or a `datasets` dataset with a `text` column."""
    for document in documents:
        yield document if isinstance(document, str) else document["text"]


def tokenize_documents(documents, tokenizer, batch_size=256, show_progress=True) -> Iterator[int]:
    """A token stream: each document's tokens followed by EOS, so the model sees where documents end.

    Packed windows may span a document boundary; attention then crosses it, as in usual packed LM pretraining.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    total = len(documents) if hasattr(documents, "__len__") else None
    texts = iter_texts(documents)
    with tqdm(total=total, desc="tokenizing", unit="doc", disable=not show_progress) as progress:
        while batch := list(itertools.islice(texts, batch_size)):
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                yield from ids
                yield from eos
            progress.update(len(batch))


def render_window(processor: VIST2Processor, tokens: Sequence[int], context_length: int) -> list[dict]:
    """One window of text tokens -> training samples of `context_length` tokens each, sketches rendered.

    Every sample is laid out `c_1 V_1 ... c_K` (closed chunks keep their text for the loss); its last chunk stays
    open, as in generation.
    """
    samples = []
    for start in range(0, len(tokens), context_length):
        sample = processor.encode_sample([], list(tokens[start : start + context_length]), keep_closed_text=True)
        samples.append({key: sample[key] for key in SAMPLE_KEYS})  # the render report stays in the worker
    return samples


# ---------------------------------------------------------------------------------------------------------------------
# Curriculum
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurriculumPhase:
    """One stage of the stage-1 curriculum.

    read_back: probability that a sample is trained with read-back (chunk `c_i` also sees its own sketch `V_i`).
        A pair `(start, end)` ramps linearly over the phase. 1.0 is the OCR warm-up, 0.0 pure optical LM.
    freeze: modules without gradient in this phase, out of `FREEZABLE_MODULES`.
    context_length: text tokens per sample (must divide the dataset's window); None: the whole window.
    compression_ratio: r for this phase; the chunk size becomes `r * m` at the model's fixed `m` (module docstring).
    render_overrides: sketch settings for this phase, e.g. smaller `char_width` / `line_height` so that the longer
        chunks of a higher ratio fit their sketch.
    """

    name: str
    steps: int
    read_back: float | tuple[float, float] = 0.0
    freeze: tuple[str, ...] = ()
    context_length: int | None = None
    compression_ratio: int | None = None
    render_overrides: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"CurriculumPhase {self.name!r}: steps must be positive, got {self.steps}")
        for p in self.read_back_range:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"CurriculumPhase {self.name!r}: read_back probability {p} is not in [0, 1]")
        unknown = set(self.freeze) - set(FREEZABLE_MODULES)
        if unknown:
            raise ValueError(f"CurriculumPhase {self.name!r}: cannot freeze {sorted(unknown)}; "
                             f"choose from {FREEZABLE_MODULES}")
        object.__setattr__(self, "freeze", tuple(self.freeze))

    @property
    def read_back_range(self) -> tuple[float, float]:
        rb = self.read_back
        return (float(rb), float(rb)) if isinstance(rb, (int, float)) else (float(rb[0]), float(rb[1]))

    def read_back_probability(self, step_in_phase: int) -> float:
        start, end = self.read_back_range
        return start + (end - start) * min(max(step_in_phase, 0), self.steps) / self.steps

    @classmethod
    def parse(cls, spec: str) -> "CurriculumPhase":
        """`"name:steps=N,read_back=1.0:0.0,freeze=language_model+vision_tower,context=256,ratio=8,char_width=2"`.

        `read_back=a:b` ramps from a to b; unknown keys are render overrides (integers).
        """
        name, _, rest = spec.partition(":")
        fields: dict = {"name": name.strip()}
        overrides = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, _, value = item.partition("=")
            if key == "steps":
                fields["steps"] = int(value)
            elif key == "read_back":
                start, _, end = value.partition(":")
                fields["read_back"] = (float(start), float(end)) if end else float(start)
            elif key == "freeze":
                fields["freeze"] = tuple(filter(None, value.split("+")))
            elif key == "context":
                fields["context_length"] = int(value)
            elif key == "ratio":
                fields["compression_ratio"] = int(value)
            else:
                overrides[key] = int(value)
        if "steps" not in fields:
            raise ValueError(f"curriculum phase {spec!r} needs steps=N")
        return cls(**fields, render_overrides=overrides)


class CurriculumSchedule:
    """Phases in order; steps past the last phase stay in the last phase.

    It also carries a step counter in shared memory (`current_step`), which `CurriculumCallback` advances and
    datasets read, also from DataLoader worker processes, to render with the current phase's geometry.
    """

    def __init__(self, phases: Sequence[CurriculumPhase]):
        if not phases:
            raise ValueError("CurriculumSchedule needs at least one phase")
        self.phases = list(phases)
        self.starts = np.cumsum([0] + [phase.steps for phase in self.phases[:-1]]).tolist()
        self._current_step = multiprocessing.Value("q", 0)

    @classmethod
    def default(cls, total_steps: int, warmup_fraction=0.2, withdraw_fraction=0.3, warmup_freeze=()):
        """OCR warm-up (read-back 1), linear withdrawal (1 -> 0), then pure optical language modelling (0)."""
        warmup = max(1, round(total_steps * warmup_fraction))
        withdraw = max(1, round(total_steps * withdraw_fraction))
        olm = max(1, total_steps - warmup - withdraw)
        return cls([
            CurriculumPhase("ocr_warmup", warmup, read_back=1.0, freeze=tuple(warmup_freeze)),
            CurriculumPhase("withdraw_text", withdraw, read_back=(1.0, 0.0)),
            CurriculumPhase("optical_lm", olm, read_back=0.0),
        ])

    @classmethod
    def parse(cls, specs: Sequence[str]) -> "CurriculumSchedule":
        return cls([CurriculumPhase.parse(spec) for spec in specs])

    @property
    def total_steps(self) -> int:
        return sum(phase.steps for phase in self.phases)

    def phase_index(self, step: int) -> int:
        return max(i for i, start in enumerate(self.starts) if step >= start) if step >= 0 else 0

    def phase(self, step: int) -> CurriculumPhase:
        return self.phases[self.phase_index(step)]

    def read_back_probability(self, step: int) -> float:
        index = self.phase_index(step)
        return self.phases[index].read_back_probability(step - self.starts[index])

    def read_back_flags(self, batch_size: int, step: int, seed: int = 0, rank: int = 0, draw: int = 0) -> torch.Tensor:
        """Per-sample read-back for a batch used at `step`: Bernoulli(p(step)), a pure function of its arguments."""
        probability = self.read_back_probability(step)
        generator = torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_033 + step) * 1009 + draw)
        return torch.rand(batch_size, generator=generator) < probability

    @property
    def current_step(self) -> int:
        return self._current_step.value

    @current_step.setter
    def current_step(self, step: int):
        self._current_step.value = int(step)

    def describe(self) -> str:
        lines = []
        for phase, start in zip(self.phases, self.starts):
            start_p, end_p = phase.read_back_range
            read_back = f"{start_p:g}" if start_p == end_p else f"{start_p:g}->{end_p:g}"
            extras = [f"freeze={'+'.join(phase.freeze)}" if phase.freeze else "",
                      f"context={phase.context_length}" if phase.context_length else "",
                      f"ratio={phase.compression_ratio}" if phase.compression_ratio else ""]
            lines.append(f"  steps {start}-{start + phase.steps - 1}: {phase.name} read_back={read_back} "
                         + " ".join(e for e in extras if e))
        return "\n".join(lines)


def processor_for_phase(processor: VIST2Processor, phase: CurriculumPhase | None) -> VIST2Processor:
    """The processor that renders a phase: same tokenizer, chunk size `r' * m` and the phase's render overrides."""
    if phase is None or (phase.compression_ratio is None and not phase.render_overrides):
        return processor
    settings = dict(processor.sketch_settings)
    if phase.compression_ratio is not None:
        settings["chunk_size"] = phase.compression_ratio * processor.visual_tokens_per_chunk
        settings["compression_ratio"] = phase.compression_ratio
    settings.update(phase.render_overrides)
    return VIST2Processor(processor.tokenizer, sketch_settings=settings, sketch_token_id=processor.sketch_token_id,
                          chat_template=processor.chat_template)


def apply_final_geometry(model, processor: VIST2Processor, schedule: CurriculumSchedule | None,
                         steps: int | None = None) -> VIST2Processor:
    """After a ratio schedule: write the chunk size, ratio and render settings of the phase training ended in (after
    `steps` steps; by default the last phase) into `model.config`, and return the matching processor (to save next to
    the model)."""
    final = processor_for_phase(processor, final_phase(schedule, steps))
    for key, value in final.sketch_settings.items():
        setattr(model.config, key, value)
    model.config.validate_vist2()
    return final


def final_phase(schedule: CurriculumSchedule | None, steps: int | None = None) -> CurriculumPhase | None:
    """The phase of a schedule's last step, or of step `steps - 1` when training stops after `steps` steps."""
    return None if schedule is None else schedule.phases[-1] if steps is None else schedule.phase(steps - 1)


def set_frozen(model, frozen: Iterable[str], trainable: dict | None = None):
    """`requires_grad` off for the named top-level modules; the other freezable ones' parameters get back the flag
    `trainable` recorded for them when training began (all on without it), so a phase never trains what the caller
    froze (a LoRA model's base, a tower frozen by hand)."""
    frozen = set(frozen)
    for name in FREEZABLE_MODULES:
        for parameter in getattr(model, name).parameters():
            parameter.requires_grad_(name not in frozen and (trainable or {}).get(parameter, True))


class CurriculumCallback(TrainerCallback):
    """Advances the curriculum: freezes modules per phase and tells datasets the step."""

    def __init__(self, schedule: CurriculumSchedule):
        self.schedule = schedule
        self.active_phase, self.trainable = None, None

    def _enter(self, step, model):
        index = self.schedule.phase_index(step)
        if index != self.active_phase and model is not None:
            phase = self.schedule.phases[index]
            set_frozen(model, phase.freeze, self.trainable)
            logger.info(f"curriculum: step {step} enters phase {index} {phase.name!r} "
                        f"(frozen: {', '.join(phase.freeze) or 'nothing'})")
            self.active_phase = index

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.active_phase = None
        if model is not None and self.trainable is None:  # what the caller left trainable, before any phase
            self.trainable = {parameter: parameter.requires_grad for parameter in model.parameters()}
        self.schedule.current_step = state.global_step  # also right after resuming from a checkpoint
        self._enter(state.global_step, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._enter(state.global_step, model)

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer fetches the batches of step s before `on_step_begin(s)`: publish the step the next batch is for.
        self.schedule.current_step = state.global_step


class VIST2Trainer(Trainer):
    """`Trainer` plus the curriculum: read-back flags are drawn here, at the step the batch is trained on. Logs the
    share of closed chunks kept as text (`chunks_kept_as_text`: they overflow their sketch or hold characters it cannot
    show, so the model trains on their text) and warns the first time a phase has any. `label_smoothing_factor` is
    applied by the model's text-stream loss (Trainer's own smoother would score the interleaved layout), and a
    checkpoint carries the sketch geometry its weights were trained in."""

    def __init__(self, *args, curriculum: CurriculumSchedule | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.curriculum, self.label_smoothing, self.label_smoother = curriculum, self.args.label_smoothing_factor, None
        self._draw = (None, 0)  # (step, micro-batches drawn at that step)
        self._closed, self._kept, self._warned = 0, 0, set()  # closed chunks since the last log, of them kept as text
        if curriculum is not None:
            self.add_callback(CurriculumCallback(curriculum))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and inputs.get("chunks_kept_as_text") is not None:  # (summed on its device: no sync a step)
            self._kept = self._kept + inputs["chunks_kept_as_text"].sum()
            self._closed = self._closed + inputs["chunks_kept_as_text"].sum() + inputs["pixel_values"].shape[0]
        if self.curriculum is not None and model.training:
            step = self.state.global_step
            draw = self._draw[1] + 1 if self._draw[0] == step else 0
            self._draw = (step, draw)
            flags = self.curriculum.read_back_flags(inputs["input_ids"].shape[0], step, seed=self.args.seed,
                                                    rank=self.args.process_index, draw=draw)
            inputs = {**inputs, "read_back": flags.to(inputs["input_ids"].device)}
        if self.label_smoothing and "labels" in inputs:
            inputs = {**inputs, "label_smoothing": self.label_smoothing}
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = out[0] if return_outputs else out
        if model.training and torch.is_grad_enabled() and not loss.requires_grad:
            # The phase freezes the language model and no chunk of this batch was drawn (the logged share of chunks
            # kept as text says so): nothing trainable is in its loss. It trains nothing, instead of failing the run.
            trainable = next((p for p in model.parameters() if p.requires_grad), None)
            loss = loss if trainable is None else loss + 0.0 * trainable.sum()
        return (loss, out[1]) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer normalises the loss by the labels it counts (`num_items_in_batch`): a row's first label, never a
        target wherever padding puts it, is dropped first, so the count is what the text-stream loss scores (for plain
        ids from any collator too, in every transformers release)."""
        return super().get_batch_samples(map(without_first_labels, epoch_iterator), num_batches, device)

    def _save(self, output_dir=None, state_dict=None):
        """Mid-schedule, the config and processor saved are those of the phase the last step trained in."""
        steps, processor = self.state.global_step, self.processing_class
        model = self.accelerator.unwrap_model(self.model)
        if self.curriculum is None or not steps or not isinstance(processor, VIST2Processor):
            return super()._save(output_dir, state_dict)
        started = {key: getattr(model.config, key) for key in processor.sketch_settings}
        try:
            self.processing_class = apply_final_geometry(model, processor, self.curriculum, steps)
            return super()._save(output_dir, state_dict)
        finally:
            self.processing_class = processor
            for key, value in started.items():
                setattr(model.config, key, value)

    def log(self, logs, *args, **kwargs):
        step = max(self.state.global_step - 1, 0)  # the step these losses were trained at
        if self.curriculum is not None and "loss" in logs:
            logs["phase"] = self.curriculum.phase_index(step)
            logs["read_back_p"] = round(self.curriculum.read_back_probability(step), 3)
        if "loss" in logs and int(self._closed):
            logs["chunks_kept_as_text"] = round(int(self._kept) / int(self._closed), 4)
            phase = self.curriculum.phase(step).name if self.curriculum is not None else "training"
            if int(self._kept) and phase not in self._warned:
                self._warned.add(phase)
                logger.warning(f"VIST2 {phase}: {int(self._kept)} of {int(self._closed)} closed chunks of the last "
                               f"logged steps are kept as text (they overflow their sketch or hold characters it "
                               f"cannot show), so the model trains on their text, not on sketches. Fix: a sketch "
                               f"geometry that holds a chunk (vist2.training.sketch_geometry), a font that draws them")
            self._closed, self._kept = 0, 0
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------


class _PhaseGeometry:
    """What the current curriculum phase renders: its processor and its context length."""

    def __init__(self, processor, window_tokens, curriculum):
        self.processor, self.window_tokens, self.curriculum = processor, window_tokens, curriculum
        self._processors = {}
        for phase in curriculum.phases if curriculum else [None]:
            chunk = processor_for_phase(processor, phase).chunk_size
            context = (phase.context_length if phase else None) or window_tokens
            if window_tokens % context or context % chunk:
                raise ValueError(f"phase {phase.name if phase else ''!r}: context length {context} must divide the "
                                 f"window ({window_tokens} tokens) and be a multiple of its chunk size ({chunk})")

    def current(self) -> tuple[VIST2Processor, int]:
        if self.curriculum is None:
            return self.processor, self.window_tokens
        index = self.curriculum.phase_index(self.curriculum.current_step)
        phase = self.curriculum.phases[index]
        if index not in self._processors:  # built lazily in each worker process
            self._processors[index] = processor_for_phase(self.processor, phase)
        return self._processors[index], phase.context_length or self.window_tokens


class PackedTextDataset(Dataset):
    """Map-style: a corpus tokenised once (with a progress bar) and packed into windows of `window_tokens`.

    Item `i` is a list of training samples (one, or several under a shorter-context phase), rendered on access.
    """

    def __init__(self, token_ids, processor: VIST2Processor, window_tokens: int,
                 curriculum: CurriculumSchedule | None = None):
        if window_tokens % processor.chunk_size:
            raise ValueError(f"window_tokens={window_tokens} must be a multiple of chunk_size={processor.chunk_size}")
        self.token_ids = np.asarray(token_ids, dtype=np.int32)
        self.window_tokens = window_tokens
        self.geometry = _PhaseGeometry(processor, window_tokens, curriculum)
        if len(self) == 0:
            raise ValueError(f"the corpus has {len(self.token_ids)} tokens, fewer than one window of {window_tokens}")

    @classmethod
    def from_documents(cls, documents, processor, window_tokens, curriculum=None, show_progress=True):
        tokens = np.fromiter(tokenize_documents(documents, processor.tokenizer, show_progress=show_progress),
                             dtype=np.int32)
        return cls(tokens, processor, window_tokens, curriculum)

    def __len__(self):
        return len(self.token_ids) // self.window_tokens

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        processor, context_length = self.geometry.current()
        window = self.token_ids[index * self.window_tokens : (index + 1) * self.window_tokens]
        return render_window(processor, window.tolist(), context_length)


@dataclass
class PendingWindow:
    """A packed window whose sketches are not rendered yet; `VIST2DataCollator` renders it (in the same worker)."""

    tokens: list[int]
    geometry: _PhaseGeometry

    def render(self) -> list[dict]:
        processor, context_length = self.geometry.current()
        return render_window(processor, self.tokens, context_length)


class StreamingTextDataset(IterableDataset):
    """Iterable: documents are read, tokenised and packed on the fly (for corpora too large to tokenise up front,
    e.g. `load_documents(..., streaming=True)`); DataLoader workers split the documents between them.

    It yields `PendingWindow`s that the collator renders, still inside the worker. Rendering after the DataLoader
    has formed the batch matters with several processes: accelerate splits an iterable dataset across processes by
    letting every process read the whole stream and keep its share (`IterableDatasetShard`), so rendering in
    `__iter__` would render every window on every process. Pass `accelerator_config={"dispatch_batches": False}`
    to `TrainingArguments`: accelerate's default for iterable datasets reads batches on one process and slices them
    along dim 0, which does not fit `pixel_values` (one row per sketch).
    """

    def __init__(self, documents, processor: VIST2Processor, window_tokens: int,
                 curriculum: CurriculumSchedule | None = None):
        if window_tokens % processor.chunk_size:
            raise ValueError(f"window_tokens={window_tokens} must be a multiple of chunk_size={processor.chunk_size}")
        self.documents, self.processor, self.window_tokens = documents, processor, window_tokens
        self.geometry = _PhaseGeometry(processor, window_tokens, curriculum)

    def __iter__(self):
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        # A `datasets` stream gives each worker its own shards already; any other iterable is split here.
        texts = iter_texts(self.documents)
        if not hasattr(self.documents, "n_shards"):
            texts = itertools.islice(texts, worker_id, None, workers)
        tokens = tokenize_documents(texts, self.processor.tokenizer, show_progress=False)
        while len(window := list(itertools.islice(tokens, self.window_tokens))) == self.window_tokens:
            yield PendingWindow(window, self.geometry)


def encode_conversation(processor: VIST2Processor, messages, keep_closed_text=True, add_generation_prompt=False):
    """ChatML conversation -> one sample. Leading system messages form the prefix (never compressed); every later
    turn is compressed as it scrolls out of the open chunk. Only assistant replies carry labels."""
    token_ids, trainable = [], []
    for message in messages:
        header = processor.encode(f"<|im_start|>{message['role']}\n")
        body = processor.encode(message["content"]) + processor.encode("<|im_end|>\n")
        token_ids += header + body
        trainable += [False] * len(header) + [message["role"] == "assistant"] * len(body)
    if add_generation_prompt:
        prompt = processor.encode("<|im_start|>assistant\n")
        token_ids += prompt
        trainable += [False] * len(prompt)
    cut = processor.prefix_length(token_ids)
    return processor.encode_sample(token_ids[:cut], token_ids[cut:], keep_closed_text, trainable[cut:])


class ConversationDataset(Dataset):
    """Stage 2: chat conversations (`[{"role": ..., "content": ...}, ...]`), encoded and rendered on access.

    Leading system messages form the never-compressed prefix; labels sit on assistant replies only.
    """

    def __init__(self, conversations, processor: VIST2Processor, messages_column="messages"):
        self.conversations, self.processor, self.messages_column = conversations, processor, messages_column

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, index):
        conversation = self.conversations[index]
        messages = conversation[self.messages_column] if isinstance(conversation, dict) else conversation
        sample = encode_conversation(self.processor, messages, keep_closed_text=True)
        return {key: sample[key] for key in SAMPLE_KEYS}


# ---------------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------------


def without_first_labels(batch):
    """Nothing precedes a row's first token, so its label is never a target. Dropping it makes Trainer's count of
    labels (`num_items_in_batch`, which normalises the loss under gradient accumulation) equal the number of targets
    the model's text-stream loss has; with left padding it would otherwise count one extra per row."""
    labels, mask = (batch.get("labels"), batch.get("attention_mask")) if hasattr(batch, "get") else (None, None)
    if isinstance(labels, torch.Tensor) and labels.ndim == 2 and labels.shape[1]:
        first = mask.long().argmax(1) if mask is not None else torch.zeros(len(labels), dtype=torch.long)
        batch["labels"] = labels = labels.clone()  # (a collator may have given input_ids themselves as the labels)
        labels[torch.arange(len(labels)), first.to(labels.device)] = -100
    return batch


@dataclass
class VIST2DataCollator:
    """Samples (or lists of samples, one per packed window, or `PendingWindow`s) -> the batch the model takes.

    Left-pads, stacks the uint8 sketches into `pixel_values`, puts -100 on sketches and padding, and adds a
    `read_back` flag per sample (`VIST2Trainer` replaces it with the curriculum's draw while training).
    """

    processor: VIST2Processor
    read_back: bool = False

    def __call__(self, features):
        features = [f.render() if isinstance(f, PendingWindow) else f for f in features]
        samples = [sample for feature in features for sample in (feature if isinstance(feature, list) else [feature])]
        if samples and "sketches" not in samples[0]:
            raise ValueError(f"VIST2DataCollator: a sample without its sketches (keys: {sorted(samples[0])}): "
                             "Trainer's remove_unused_columns=True drops the keys forward() does not name. Fix: "
                             "TrainingArguments(remove_unused_columns=False), as vist2_training_arguments sets it")
        batch = without_first_labels(self.processor.collate(samples, return_labels=True))
        batch["read_back"] = torch.full((len(samples),), self.read_back, dtype=torch.bool)
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2 helpers
# ---------------------------------------------------------------------------------------------------------------------


def language_model_lora_config(r=16, lora_alpha=32, lora_dropout=0.05, **kwargs):
    """LoRA on the language model's linear layers; the aligner is trained in full and saved with the adapter."""
    from peft import LoraConfig

    kwargs = {"target_modules": LANGUAGE_MODEL_LORA_TARGETS, "modules_to_save": ["aligner"], **kwargs}
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, task_type="CAUSAL_LM", **kwargs)


def bf16_supported() -> bool:
    """bf16 autocast where it is fast: a CUDA device with native bf16 (CPU bf16 works, but slowly)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def load_or_build_model(model_path=None, text_model=None, vision_model=None, config=None, tokenizer=None,
                        **config_kwargs):
    """(model, processor) from one of three sources, in this order of precedence:

    - `model_path`: a saved VIST2 model folder (e.g. the output of stage 1);
    - `text_model` + `vision_model`: pretrained backbones (Hub ids or folders), fresh aligner (`from_backbones`);
    - `config` (`"tiny"` or a config folder / file) + `tokenizer` (a folder or a tokenizer holding `<|sketch|>`):
      a model with random weights.
    `config_kwargs` are `VIST2Config` settings for the last two (chunk_size, compression_ratio, geometry, ...).
    """
    from transformers import AutoTokenizer

    from ..configuration_vist2 import VIST2Config
    from ..modeling_vist2 import VIST2ForCausalLM
    from ..processing_vist2 import SKETCH_TOKEN

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if model_path:
        model = VIST2ForCausalLM.from_pretrained(model_path)
        processor = VIST2Processor.from_pretrained(model_path)
        return model, processor
    if text_model or vision_model:
        if not (text_model and vision_model):
            raise ValueError("building from backbones needs both text_model and vision_model")
        model = from_backbones(text_model, vision_model, tokenizer=tokenizer, **config_kwargs)
        return model, VIST2Processor.from_config(model.config, model.tokenizer)
    if tokenizer is None:
        raise ValueError("a model from a config needs a tokenizer with the '<|sketch|>' token")
    sketch_token_id = tokenizer.convert_tokens_to_ids(SKETCH_TOKEN)
    if config in (None, "tiny"):
        config = tiny_config(vocab_size=len(tokenizer), sketch_token_id=sketch_token_id, **config_kwargs)
    elif not isinstance(config, VIST2Config):
        config = VIST2Config.from_pretrained(config, **config_kwargs)
    if config.sketch_token_id != sketch_token_id or config.text_config.vocab_size < len(tokenizer):
        raise ValueError(f"config (sketch_token_id={config.sketch_token_id}, vocab {config.text_config.vocab_size}) "
                         f"does not fit the tokenizer ('<|sketch|>'={sketch_token_id}, {len(tokenizer)} tokens)")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # generation and Trainer read them here
        for holder in (config, config.text_config):
            if getattr(holder, name, None) is None:
                setattr(holder, name, getattr(tokenizer, name))
    model = VIST2ForCausalLM(config)
    return model, VIST2Processor.from_config(config, tokenizer)


__all__ = [
    "FREEZABLE_MODULES", "LANGUAGE_MODEL_LORA_TARGETS", "load_dataset_source", "load_documents", "tokenize_documents", "render_window",
    "CurriculumPhase", "CurriculumSchedule", "CurriculumCallback", "VIST2Trainer", "processor_for_phase",
    "apply_final_geometry", "final_phase", "set_frozen", "without_first_labels", "PackedTextDataset", "StreamingTextDataset", "PendingWindow", "ConversationDataset",
    "VIST2DataCollator", "language_model_lora_config", "bf16_supported", "load_or_build_model", "vist2_training_arguments",
    "from_backbones", "sketch_geometry", "tiny_config", "read_back_chunk", "encode_conversation",
]


def vist2_training_arguments(args, output_dir, max_steps: int, **overrides):
    """The `TrainingArguments` both example scripts share, from their common command-line flags (batch_size,
    grad_accum, lr, logging_steps, save_steps, bf16, cpu, gradient_checkpointing, num_workers, seed)."""
    from transformers import TrainingArguments

    bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and not args.cpu and bf16_supported())
    return TrainingArguments(**{
        "output_dir": str(output_dir),
        "max_steps": max_steps,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "learning_rate": args.lr,
        "lr_scheduler_type": "cosine",
        "logging_steps": args.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps" if args.save_steps else "no",
        "save_steps": args.save_steps or 500,
        "bf16": bf16,
        "use_cpu": args.cpu,
        **checkpointing_argument(args.gradient_checkpointing),
        "dataloader_num_workers": args.num_workers,
        "dataloader_pin_memory": torch.cuda.is_available() and not args.cpu,
        "remove_unused_columns": False,  # chunk_ids, pixel_values, read_back are not in a text model's signature
        # Frozen phases, and batches whose chunks were all kept as text, leave parameters without gradient.
        "ddp_find_unused_parameters": True,
        "report_to": [],
        "seed": args.seed,
        **overrides,
    })


def checkpointing_argument(enabled: bool) -> dict:
    """`TrainingArguments` names the flag `activation_checkpointing` from transformers 5.23, `gradient_checkpointing`
    before."""
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}
