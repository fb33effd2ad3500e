"""VIST2 installs as the `vist2` package, mapped onto the repository root: the three *_vist2.py files at the top
level are the only copy of the model code. On the Hub the same folder is the model repo and the files load flat with
`trust_remote_code=True` (they import each other only relatively). The training helpers fine-tuners import live in
`training/` (`vist2.training`), outside the remote code."""

from setuptools import setup

setup(
    name="vist2",
    version="0.1.0",
    description="Global context compression with interleaved vision-text transformation, for transformers",
    packages=["vist2", "vist2.training"],
    package_dir={"vist2": "."},
    python_requires=">=3.10",
    install_requires=[
        "transformers>=5.6.0,<6",  # exactly what passes the suite: docs/VERSIONS.md
        "torch>=2.6",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "pillow>=10.1",
        "tokenizers>=0.21",
        "peft>=0.17",
        "numpy",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6"],
        "train": ["accelerate>=1.0", "datasets>=3.0", "tqdm", "matplotlib"],
        "eval": ["lm-eval>=0.4.13"],  # benchmarks/lm_eval_harness.py, tests/test_clients.py
    },
)
