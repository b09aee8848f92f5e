"""Shared test fixtures: offline, CPU, tiny models built in the test process."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"

# Never reach for the network; build models into a cache shared by the whole session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FASTFT_CACHE", str(ROOT / ".pytest_cache" / "fastft"))


@pytest.fixture(scope="session")
def tokenizer():
    from fastft.models import load_tokenizer
    from fastft.recipe import ModelConfig

    return load_tokenizer(ModelConfig(name="fastft:tiny"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(path: Path, text: str) -> Path:
    """Write a recipe file (TOML text) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


TINY_QA = """
[model]
name = "fastft:tiny"
quantization = "16bit"

[data]
path = "{data}"
format = "qa"
template = "Q: {{question}}\\nA: {{answer}}"
max_length = 256

[lora]
r = 4
alpha = 8

[train]
max_steps = {steps}
batch_size = 4
learning_rate = 1e-3
logging_steps = 1
gradient_checkpointing = false
report_to = "none"
seed = 7
"""


def qa_rows(n: int = 16) -> list:
    return [{"question": f"Combien font {i} et {i + 1} ?", "answer": f"Cela fait {2 * i + 1}."} for i in range(n)]


def tiny_recipe(tmp_path: Path, steps: int = 4, rows: list | None = None, extra: str = "") -> Path:
    """A small qa recipe on fastft:tiny with its own data file, for fast end-to-end runs."""
    data = write_jsonl(tmp_path / "data.jsonl", rows if rows is not None else qa_rows())
    return write_recipe(tmp_path / "tiny.toml", TINY_QA.format(data=data.as_posix(), steps=steps) + extra)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m fastft ARGS` in a subprocess; return the CompletedProcess (text)."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastft", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
