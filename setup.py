"""VIST2 installs as the `vist2` package; the same three *_vist2.py files also load flat from a Hub model folder
with `trust_remote_code=True` (they import each other only relatively)."""

from setuptools import setup

setup(
    name="vist2",
    version="0.1.0",
    description="Global context compression with interleaved vision-text transformation, for transformers",
    packages=["vist2"],
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
    },
)
