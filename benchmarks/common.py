"""Shared helpers of the VIST2 benchmarks: presets, benchmark text, identical inputs for VIST2 and its text-only
backbone, the KV-byte counter, a FLOP counter that sees CPU attention, and wall-clock/RSS phase timers.

Nothing here changes the model: timers wrap bound methods of one processor / model instance (or a module-level name)
inside the benchmark process only, and undo the wrap on exit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import resource
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:
    import vist2  # noqa: E402, F401
except ImportError:  # a checkout not installed (an offline GPU machine): the repository root is the package
    import importlib.util

    _spec = importlib.util.spec_from_file_location("vist2", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    sys.modules["vist2"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["vist2"])

from vist2.configuration_vist2 import VIST2Config  # noqa: E402
from vist2.processing_vist2 import SKETCH_TOKEN, VIST2Processor  # noqa: E402

TOKENIZER_DIR = REPO / "tokenization" / "demo_tokenizer"

# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------

# Sketch geometry per compression ratio, for chunk_size L = 256, 16 px patches and a 2 x 2 aligner merge
# (one visual token = a 32 x 32 px block). With the demo tokenizer a 256-token chunk of the benchmark text is
# ~970 characters (max ~1250), so the sketch must hold ~1250 cells: the pixel budget, not the ratio, sets the image.
#   r = 2: m = 128 = (256/32) * (512/32)  -> 256 x 512 sketch, 4 x 8 px cells, 128 cols x 32 rows
#   r = 4: m =  64 = (256/32) * (256/32)  -> 256 x 256 sketch, 4 x 8 px cells,  64 cols x 32 rows (the default)
#   r = 8: m =  32 = (128/32) * (256/32)  -> 128 x 256 sketch, 4 x 6 px cells,  64 cols x 21 rows
#          (3 px wide cells would hold more, but the built-in font then draws `{` and `}` alike: reported, kept as text)
GEOMETRY = {
    2: dict(image_height=256, image_width=512, char_width=4, line_height=8, merge_size=2),
    4: dict(image_height=256, image_width=256, char_width=4, line_height=8, merge_size=2),
    8: dict(image_height=128, image_width=256, char_width=4, line_height=6, merge_size=2),
}
CHUNK_SIZE = 256

PRESETS = {
    # Runs on 2 CPU cores: Qwen3-style decoder (GQA 4q/2kv heads, head_dim 64) and a SigLIP-style ViT. Its ratios of
    # attention to linear FLOPs (crossover near 2.9k tokens of context) and of vision to LM FLOPs per chunk (~24 %)
    # are close to those of the Qwen3-0.6B / SigLIP2-base preset (~3.8k tokens, ~20 %), at ~1/50 of the cost.
    "cpu-small": {
        "text": dict(model_type="qwen3", hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=65536,
                     rope_theta=1_000_000.0, tie_word_embeddings=False),
        "vision": dict(model_type="siglip_vision_model", hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=3, patch_size=16, num_channels=3, vision_use_head=False),
        "font_size": 16,
        "dtype": "float32",
    },
    # Shapes of Qwen/Qwen3-0.6B and google/siglip2-base-patch16-naflex, random weights; for a GPU (--device cuda).
    # vocab_size is Qwen3's (the lm_head cost is real); the benchmark feeds demo-tokenizer ids, all < 4096.
    "qwen3-0.6b": {
        "text": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                     num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=True),
        "vision": dict(model_type="siglip2_vision_model", hidden_size=768, intermediate_size=3072,
                       num_hidden_layers=12, num_attention_heads=12, patch_size=16, num_channels=3, num_patches=256,
                       vision_use_head=False),
        "font_size": 16,
        "dtype": "bfloat16",
    },
}


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def build_config(preset: str, ratio: int, tokenizer, chunk_size: int = CHUNK_SIZE) -> VIST2Config:
    """The VIST2 config of `preset` at compression ratio `ratio` (geometry from `GEOMETRY`)."""
    spec = PRESETS[preset]
    text = dict(spec["text"])
    text.setdefault("vocab_size", len(tokenizer))
    if text["vocab_size"] < len(tokenizer):
        raise ValueError(f"preset {preset}: vocab_size {text['vocab_size']} < tokenizer size {len(tokenizer)}")
    geometry = dict(GEOMETRY[ratio])
    vision = dict(spec["vision"])
    if vision["model_type"] == "siglip_vision_model":
        vision["image_size"] = geometry["image_height"]  # native position grid; a wide sketch interpolates it
    return VIST2Config(
        text_config=text, vision_config=vision, chunk_size=chunk_size, compression_ratio=ratio,
        sketch_token_id=tokenizer.convert_tokens_to_ids(SKETCH_TOKEN), font_size=spec["font_size"],
        min_font_size=min(8, spec["font_size"]), **geometry,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark text
# ---------------------------------------------------------------------------------------------------------------------


def benchmark_documents() -> tuple[list[str], dict]:
    """Stdlib docstrings (tokenization/build_corpus.py), whitespace collapsed, printable ASCII only.

    - ASCII only: Pillow's default font draws ASCII; a chunk with other characters would be kept as text (never
      compressed), and the benchmark measures compression.
    - Whitespace collapsed (one paragraph per docstring): docstrings are full of short code lines and indentation,
      and the renderer wraps at newlines, so raw docstrings overflow even a 4096-cell sketch; prose does not.
    """
    sys.path.insert(0, str(REPO / "tokenization"))
    try:
        from build_corpus import build_corpus
    finally:
        sys.path.pop(0)
    raw = build_corpus()
    docs = [" ".join(doc.split()) for doc in raw]
    kept = [doc for doc in docs if doc and doc.isascii() and doc.isprintable()]
    return kept, {"documents": len(raw), "ascii_documents": len(kept),
                  "dropped_non_ascii": len(raw) - len(kept), "characters": sum(map(len, kept))}


def benchmark_token_ids(tokenizer, total_tokens: int) -> tuple[list[int], dict]:
    """At least `total_tokens` token ids of the benchmark text (documents joined by newlines)."""
    docs, info = benchmark_documents()
    ids, text_parts = [], []
    for doc in docs:
        text_parts.append(doc)
        if len(text_parts) % 64 == 0:
            ids = tokenizer("\n".join(text_parts), add_special_tokens=False)["input_ids"]
            if len(ids) >= total_tokens:
                break
    ids = tokenizer("\n".join(text_parts), add_special_tokens=False)["input_ids"]
    if len(ids) < total_tokens:
        raise ValueError(f"benchmark text has {len(ids)} tokens, {total_tokens} needed")
    info["chars_per_token"] = len("\n".join(text_parts)) / len(ids)
    return ids[:total_tokens], info


# ---------------------------------------------------------------------------------------------------------------------
# Identical inputs and forced continuation
# ---------------------------------------------------------------------------------------------------------------------


def baseline_inputs(prompt_ids: list[int]) -> dict:
    """The text-only backbone's prompt: exactly `prompt_ids`, no compression."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def vist2_inputs(processor: VIST2Processor, prompt_ids: list[int]) -> dict:
    """VIST2's prompt for the same token ids: closed chunks rendered to sketches, the open chunk as text.

    Goes through the processor's own layout (`encode_sample`, `collate`) with the ids the baseline gets, so the two
    models read the same tokens (`processor(text=...)` would re-tokenize a string, which may not round-trip ids).
    """
    sample = processor.encode_sample([], list(prompt_ids))
    batch = processor.collate([sample])
    return dict(batch)


class ForceTokens:
    """LogitsProcessor: step t may only emit `tokens[t]` (the benchmark text's continuation).

    Random weights would otherwise write arbitrary tokens (non-ASCII bytes, endless newlines) that the renderer
    must keep as text; forcing real English keeps every generated chunk compressible and makes the baseline and
    VIST2 generate the very same tokens. The full forward and lm_head run at every step all the same.
    """

    def __init__(self, tokens: list[int], prompt_length: int):
        self.tokens = torch.tensor(tokens, dtype=torch.long)
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = self.tokens[min(step, len(self.tokens) - 1)].to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        out[:, forced] = 0.0
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


def kv_cache_bytes(cache) -> int:
    """Bytes of the keys and values the cache holds (all layers). A layer of fixed capacity (VIST2's `FixedLayer`, for
    CUDA graphs) counts the entries it holds, not its spare slots: those are in the peak memory, measured apart."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is None:  # legacy tuple-of-tuples cache
        layers = [type("Layer", (), {"keys": k, "values": v}) for k, v in cache]
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                if tensor.dim() == 4 and hasattr(layer, "get_seq_length"):
                    tensor = tensor[:, :, : layer.get_seq_length()]
                total += tensor.numel() * tensor.element_size()
    return total


def decode_graph_state(cache) -> str:
    """How VIST2's decode steps that closed no chunk ran: "captured" (a CUDA graph), "uncaptured" (the fixed-shape step
    as it is: `cuda_graphs=True` off a GPU), "no" (the dynamic step)."""
    graph = getattr(cache, "decode_graph", None)
    if not getattr(cache, "cuda_graphs", False) or graph is None:
        return "no"
    return "captured" if graph.graph is not None else "uncaptured"


def kv_cache_entries(cache) -> int:
    """Sequence entries per row the first layer holds (rows are left-aligned and equal in a batch of one)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # legacy tuple-of-tuples cache
        return int(cache[0][0].shape[-2])
    return int(layers[0].get_seq_length())  # (a fixed-capacity layer: what it holds, not its buffer's length)


def sdpa_flops(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None,
               **kwargs) -> int:
    """Attention FLOPs as the kernel computes them, GQA-aware: QK^T and AV, 2 FLOPs per multiply-add per pair.

    A masked call computes every (query, key) pair of its block, masked or not, so all are counted (VIST2's prefill
    blocks: block x cache so far); a causal call (the baseline's prefill) skips the pairs above the diagonal, so only
    the triangle is counted. torch's registry has no formula for the CPU kernel and would count attention as 0.
    """
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    pairs = s_q * s_k
    if is_causal:  # torch's causal mask is the top-left triangle
        pairs = s_q * (s_q + 1) // 2 if s_q <= s_k else s_k * (s_k + 1) // 2 + (s_q - s_k) * s_k
    return 2 * b * h * pairs * d_q + 2 * b * h * pairs * d_v


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


_PARTS = {  # module paths as torch's ModuleTracker names them, for VIST2ForCausalLM and for the bare backbone
    "vision_tower": re.compile(r"^[^.]+\.vision_tower$"),
    "aligner": re.compile(r"^[^.]+\.aligner$"),
    "decoder": re.compile(r"^[^.]+(\.language_model)?\.model$"),
    "lm_head": re.compile(r"^[^.]+(\.language_model)?\.lm_head$"),
}


def flops_by_part(counter) -> dict:
    """Total FLOPs and those of the parts: vision tower, aligner, language model (= decoder + lm_head)."""
    parts = {"total": counter.get_total_flops()}
    for module, ops in counter.get_flop_counts().items():
        for part, pattern in _PARTS.items():
            if pattern.match(module):
                parts[part] = parts.get(part, 0) + sum(ops.values())
    parts["language_model"] = parts.get("decoder", 0) + parts.get("lm_head", 0)
    return parts


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size since start, or since the last `reset_peak_rss()` (Linux VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart the peak-RSS watermark (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Wall time per (stage, phase), and the peak RSS seen while each phase runs (sampled by a thread).

    `stage` is "prefill" until the first token is out, then "decode". Phases nest: time is charged to the innermost.
    """

    def __init__(self, sample_every: float = 0.002, clock=time.perf_counter):
        self.clock = clock  # time.thread_time: CPU time of this thread, which a shared machine's load does not inflate
        self.stage = "prefill"
        self.stack: list[str] = []
        self.time: dict[tuple[str, str], float] = {}
        self.calls: dict[tuple[str, str], int] = {}
        self.peak: dict[tuple[str, str], int] = {}
        self.sample_every = sample_every
        self._stop = threading.Event()
        self._thread = None
        self._undo = []
        self.sync = None  # called at each phase boundary when set (a GPU's torch.cuda.synchronize)

    def current(self) -> str:
        return self.stack[-1] if self.stack else "other"

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.sync is not None:
            self.sync()
        self.stack.append(name)
        start = self.clock()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            elapsed = self.clock() - start
            self.stack.pop()
            key = (self.stage, name)
            self.time[key] = self.time.get(key, 0.0) + elapsed
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.stack:  # charge only the innermost phase
                outer = (self.stage, self.stack[-1])
                self.time[outer] = self.time.get(outer, 0.0) - elapsed

    def wrap(self, owner, attribute: str, name: str):
        """Time `owner.attribute` (a method of one instance, or a module-level function) as phase `name`."""
        original = getattr(owner, attribute)
        had_own = attribute in getattr(owner, "__dict__", {})

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)
        self._undo.append((owner, attribute, original, had_own))

    def unwrap(self):
        for owner, attribute, original, had_own in reversed(self._undo):
            if had_own or isinstance(owner, type(sys)):
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)
        self._undo.clear()

    def _sample(self):
        while not self._stop.wait(self.sample_every):
            key = (self.stage, self.current())
            rss = rss_bytes()
            if rss > self.peak.get(key, 0):
                self.peak[key] = rss

    def start_sampling(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop_sampling(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def reset(self):
        self.stage, self.stack = "prefill", []
        self.time, self.calls, self.peak = {}, {}, {}

    def as_dict(self) -> dict:
        out = {}
        for (stage, name), seconds in self.time.items():
            out.setdefault(stage, {})[name] = {"seconds": seconds, "calls": self.calls.get((stage, name), 0)}
        for (stage, name), peak in self.peak.items():
            out.setdefault(stage, {}).setdefault(name, {"seconds": 0.0, "calls": 0})["peak_rss"] = peak
        return out


class FirstTokenClock:
    """A generate() streamer that notes when the first new token comes out (time to first token)."""

    def __init__(self, on_first=None):
        self.puts = 0
        self.t_first = None
        self.on_first = on_first

    def put(self, value):
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt
            self.t_first = time.perf_counter()
            if self.on_first is not None:
                self.on_first()

    def end(self):
        pass


class StepRecorder:
    """A generate() streamer that calls `on_step()` after every new token (not for the prompt), keeping the values."""

    def __init__(self, on_step):
        self.puts = 0
        self.values = []
        self.on_step = on_step

    def put(self, value):
        self.puts += 1
        if self.puts >= 2:
            self.values.append(self.on_step())

    def end(self):
        pass


def per_step(cumulative: list[dict]) -> list[dict]:
    """Differences of cumulative FLOP snapshots: the FLOPs of each forward."""
    steps, previous = [], {}
    for snapshot in cumulative:
        steps.append({k: v - previous.get(k, 0) for k, v in snapshot.items()})
        previous = snapshot
    return steps


def attention_flops_per_entry(text_config) -> int:
    """FLOPs one query token spends on one more cache entry (all layers; the `sdpa_flops` convention)."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_attention_heads * (head_dim + head_dim) * text_config.num_hidden_layers


ATTENTION_KEYS = ("total", "decoder", "language_model")


def decode_flops_from_reference(window, entries, first_window, per_entry, closure_queries) -> tuple[dict, bool]:
    """FLOPs of decode forwards 1 .. first_window-1 from a few counted forwards after them.

    `entries[t]` is the number of cache entries after forward t (0 = prefill), for every forward of the run and
    of the window; `window[i]` the counted FLOPs (by part) of forward `first_window + i`. A forward is a plain step
    (one query token) when it adds exactly one entry, else a chunk closure (VIST2: `closure_queries` = m + 1 query
    tokens, one sketch encoded). Two forwards of the same kind differ only in attention over a different number of
    entries, `per_entry * queries` FLOPs per entry (dense attention), so each kind needs one counted reference.
    Returns the summed FLOPs and whether every counted forward agrees with that model exactly.
    """
    def kind(t):
        return "plain" if entries[t] == entries[t - 1] + 1 else "closure"

    queries = {"plain": 1, "closure": closure_queries}
    reference = {}
    for i, counted in enumerate(window):
        reference.setdefault(kind(first_window + i), (first_window + i, counted))

    def predict(t):
        t_ref, counted = reference[kind(t)]
        flops = dict(counted)
        extra = (entries[t] - entries[t_ref]) * per_entry * queries[kind(t)]
        for key in ATTENTION_KEYS:
            flops[key] = flops.get(key, 0) + extra
        return flops

    consistent = all(predict(first_window + i).get(key, 0) == value
                     for i, counted in enumerate(window) for key, value in counted.items())
    missing = {kind(t) for t in range(1, first_window)} - set(reference)
    if missing:
        raise ValueError(f"the counted window has no {sorted(missing)} forward to scale from")
    total = {}
    for t in range(1, first_window):
        for key, value in predict(t).items():
            total[key] = total.get(key, 0) + value
    return total, consistent


def machine_description() -> dict:
    import platform
    import subprocess

    import transformers

    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception as error:  # noqa: BLE001 - description only
            return f"unavailable ({error})"

    lscpu = run(["lscpu"])
    keep = ("Architecture", "Model name", "CPU(s):", "Thread(s) per core", "Core(s) per socket", "L2 cache",
            "L3 cache", "Hypervisor vendor", "Flags")
    lines = [line for line in lscpu.splitlines() if line.startswith(keep)]
    lines = [line if not line.startswith("Flags") else "Flags: " + " ".join(
        f for f in line.split()[1:] if f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")) for line in lines]
    return {
        "lscpu": lines,
        "nproc": run(["nproc"]),
        "gpu": ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                if torch.cuda.is_available() else []),
        "nvidia_smi": run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
        if torch.cuda.is_available() else "",
        "free_g": run(["free", "-g"]).splitlines()[:2],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
