"""Safety of the remote code: what loading a VIST2 model can do to the machine that loads it.

- The three *_vist2.py files (a Hub repo's remote code) contain no eval/exec/compile, no pickle or torch.load, no
  process, socket or URL module, and never pass trust_remote_code on to another model (static check with `ast`).
- Importing them and loading a saved model + processor, both as remote code and as the installed package, opens no
  socket, starts no process, unpickles nothing and reads no pickle file: a fresh interpreter with an audit hook
  (installed before torch is imported) that refuses those operations, then imports, loads, runs a forward and a
  generation that closes a chunk.
- Weights travel only as safetensors: save_pretrained never writes a pickle, a pickle payload in a folder is never
  executed, and a folder holding only pickle weights is refused.
- The renderer reads a font file only from the configured `font_path` (the default font is in memory); the only files
  the remote code writes are that font and its licence, into the folder `save_pretrained` writes the model to.
"""

import ast
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_config
from PIL import ImageFont
from transformers import AutoModelForCausalLM

from vist2 import VIST2ForCausalLM, VIST2Processor
from vist2.processing_vist2 import glyph_atlas, render_chunk

PACKAGE = Path(__file__).resolve().parent.parent
REMOTE_CODE = ["configuration_vist2.py", "modeling_vist2.py", "processing_vist2.py"]
ALLOWED_IMPORTS = {"__future__", "bisect", "collections", "contextlib", "copy", "dataclasses", "difflib", "functools",
                   "itertools", "logging", "math", "pathlib", "re", "threading", "typing", "unicodedata", "warnings",
                   "numpy", "torch", "PIL", "transformers"}  # copy: deepcopy of objects in memory, never of bytes
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "open", "input", "breakpoint", "globals", "vars"}
FORBIDDEN_ATTRIBUTES = ("torch.load", "torch.jit.load", "torch.hub", "np.load", "numpy.load", "pickle.", "os.system",
                        "os.popen", "os.exec", "os.spawn", "importlib.", "subprocess.", "socket.", "urllib.", "shutil.")


def dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


@pytest.mark.parametrize("filename", REMOTE_CODE)
def test_remote_code_has_no_dynamic_code_pickle_process_or_network(filename):
    tree = ast.parse((PACKAGE / filename).read_text(), filename)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            roots = [] if node.level else [(node.module or "").split(".")[0]]
        else:
            roots = []
        problems += [f"line {node.lineno}: imports {root}" for root in roots if root not in ALLOWED_IMPORTS]
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
                problems.append(f"line {node.lineno}: calls {node.func.id}()")
            for keyword in node.keywords:
                if keyword.arg == "trust_remote_code" and not (isinstance(keyword.value, ast.Constant)
                                                               and keyword.value.value is False):
                    problems.append(f"line {node.lineno}: passes trust_remote_code on to {name}")
                if keyword.arg == "weights_only" and not (isinstance(keyword.value, ast.Constant)
                                                          and keyword.value.value is True):
                    problems.append(f"line {node.lineno}: weights_only other than True")
        if isinstance(node, ast.Attribute):
            name = dotted(node) or ""
            if any(name == bad or name.startswith(bad) for bad in FORBIDDEN_ATTRIBUTES if bad.endswith(".")) or \
                    name in FORBIDDEN_ATTRIBUTES:
                problems.append(f"line {node.lineno}: uses {name}")
        if isinstance(node, ast.Name) and node.id in ("__builtins__", "builtins"):
            problems.append(f"line {node.lineno}: touches {node.id}")
    assert problems == []


GUARDED_LOAD = textwrap.dedent(r"""
    import json, os, sys
    OURS = {"configuration_vist2.py", "modeling_vist2.py", "processing_vist2.py"}
    REFUSED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
               "os.forkpty", "pty.spawn", "http.client.", "urllib.", "webbrowser.", "pickle.")
    PICKLE_FILES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
    violations = []

    def refuse(event, args):
        violations.append(f"{event} {args!r}"[:300])
        raise PermissionError(f"refused during VIST2 import/load: {event}")

    def hook(event, args):
        if event.startswith(REFUSED):
            refuse(event, args)
        elif event in ("exec", "compile"):
            caller = sys._getframe(1)  # the frame that called eval/exec/compile
            if os.path.basename(caller.f_code.co_filename) in OURS:
                refuse(event, f"called from {caller.f_code.co_filename}:{caller.f_lineno}")
        elif event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            if os.fsdecode(args[0]).endswith(PICKLE_FILES) and "w" not in str(args[1]):
                refuse(event, args)

    sys.addaudithook(hook)  # before torch, transformers or vist2 is imported; audit hooks cannot be removed

    # The harness refuses what it should (else an empty violation list would prove nothing).
    for attempt in (lambda: __import__("socket").getaddrinfo("localhost", 80),
                    lambda: __import__("subprocess").Popen(["true"]),
                    lambda: exec(compile("eval('1')", "/x/modeling_vist2.py", "exec"))):
        try:
            attempt()
            raise SystemExit("the guard let a refused operation through")
        except PermissionError:
            pass
    violations.clear()

    import torch
    def no_torch_load(*args, **kwargs):
        raise PermissionError("torch.load called during VIST2 load")
    torch.load = no_torch_load

    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

    folder, text = sys.argv[1], sys.argv[2]
    results = {}

    def exercise(model, processor):
        batch = processor(text=text)
        with torch.no_grad():
            logits = model(**batch).logits
        out = model.generate(**batch, processor=processor, max_new_tokens=20, do_sample=False)  # closes a chunk
        return [float(logits.sum()), out.shape[1] - batch["input_ids"].shape[1]]

    # 1. As remote code, with the installed package made unimportable.
    sys.modules["vist2"] = None
    AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    results["remote"] = exercise(model, processor)

    # 2. As the installed package: importing its modules, then loading the same folder.
    del sys.modules["vist2"]
    import vist2.configuration_vist2, vist2.modeling_vist2, vist2.processing_vist2
    from vist2 import VIST2ForCausalLM, VIST2Processor
    model = VIST2ForCausalLM.from_pretrained(folder).eval()
    processor = VIST2Processor.from_pretrained(folder)
    results["package"] = exercise(model, processor)

    print("RESULT " + json.dumps({"violations": violations, "results": results}))
""")


def save(model, processor, folder):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def test_import_and_load_open_no_socket_start_no_process_and_unpickle_nothing(model, processor, tmp_path):
    folder = tmp_path / "model"
    save(model, processor, folder)
    script = tmp_path / "guarded_load.py"
    script.write_text(GUARDED_LOAD)
    # No HF_HUB_OFFLINE: should anything try to reach the Hub, the guard would refuse the socket and say so.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(script), str(folder), SAMPLE_TEXT[:120]], check=False,
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    report = json.loads(line[len("RESULT "):])
    assert report["violations"] == []
    assert report["results"]["remote"] == pytest.approx(report["results"]["package"])
    assert report["results"]["remote"][1] == 20


def test_save_pretrained_writes_safetensors_only_even_when_asked_for_pickle(model, processor, tmp_path):
    try:
        model.save_pretrained(tmp_path, safe_serialization=False)
    except TypeError:  # a release without the argument: nothing to ask for
        model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files
    assert all(name.endswith((".json", ".safetensors", ".py", ".txt", ".jinja", ".model")) for name in files), files


def write_pickle_weights(model, folder, payload=None):
    """A folder with config and code like save_pretrained's, but weights as a pickle `pytorch_model.bin`."""
    model.save_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if payload is not None:
        state["payload"] = payload
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


class MakeDirectoryWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("how", ["package", "remote_code"])
def test_a_pickle_payload_in_a_weights_file_never_runs(model, tmp_path, how):
    folder, marker = tmp_path / "model", tmp_path / "payload_ran"
    write_pickle_weights(model, folder, payload=MakeDirectoryWhenUnpickled(str(marker)))
    try:
        if how == "package":
            VIST2ForCausalLM.from_pretrained(folder)
        else:
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    except Exception:  # noqa: BLE001 - refusing is the expected outcome; running the payload is the failure
        pass
    assert not marker.exists(), "unpickling a weights file executed code"


@pytest.mark.parametrize("how", ["package", "remote_code"])
def test_a_folder_with_only_pickle_weights_is_refused(model, tmp_path, how):
    folder = tmp_path / "model"
    write_pickle_weights(model, folder)
    with pytest.raises((OSError, ValueError), match="safetensors"):
        if how == "package":
            VIST2ForCausalLM.from_pretrained(folder)
        else:
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture
def font_calls(monkeypatch):
    """Every font Pillow is asked to open, while the glyph-atlas cache is empty (so fonts are really loaded)."""
    calls = []
    for name in ("truetype", "load", "load_path"):
        original = getattr(ImageFont, name)

        def record(font, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, font))
            return _original(font, *args, **kwargs)

        monkeypatch.setattr(ImageFont, name, record)
    glyph_atlas.cache_clear()
    yield calls
    glyph_atlas.cache_clear()


def test_the_default_font_is_read_from_memory_not_from_disk(font_calls, config):
    render_chunk("Default font, ASCII only.", config.sketch_settings)
    assert font_calls, "the renderer loads its font through Pillow"
    assert all(isinstance(font, io.BytesIO) for _, font in font_calls), font_calls


def test_fonts_are_read_only_from_the_configured_path(font_calls, tokenizer, tmp_path):
    font_file = tmp_path / "fonts" / "configured.ttf"
    font_file.parent.mkdir()
    font_file.write_bytes(ImageFont.load_default(size=12).path.getvalue())
    font_calls.clear()
    config = tiny_config(tokenizer, font_path=str(font_file), overflow_policy="shrink_font")
    processor = VIST2Processor.from_config(config, tokenizer)
    processor(text=SAMPLE_TEXT[:300] + " ünïcödé 中文 " + "\n" * 60)  # newlines overflow: smaller fonts tried
    paths = {font for _, font in font_calls}
    assert len(font_calls) >= 2 and paths == {str(font_file)}, font_calls
