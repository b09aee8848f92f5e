"""Where base models come from, including the ones fastft ships or builds itself.

- `fastft:tiny`: a 4-layer Llama (hidden size 64, 0.28M parameters) with a byte-level
  tokenizer and a chat template, pretrained by `scripts/pretrain_tiny.py` on the fusion texts
  in `recipes/data/text/` and shipped inside the package (`fastft/assets/tiny/`, safetensors).
  It makes `fastft run` work on a CPU with no network (the embedded default), already writes
  French, so a one-minute fine-tune visibly learns, and is what the tests train.
- `random:<arch>`: random weights with the exact shapes of a real architecture
  (`ARCHITECTURES`), so GPU runs and benchmarks need no download.
- anything else: a Hugging Face id or a local folder, loaded as usual.

Random models are built once under the cache folder (`$FASTFT_CACHE`, default
`~/.cache/fastft`) as safetensors and then loaded like any local model.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from fastft.errors import FastftError

TINY = "fastft:tiny"
TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"  # written by scripts/pretrain_tiny.py

# The shapes that matter for speed and memory, from each model's published config.json.
ARCHITECTURES = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072),
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                         tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=131072),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768),
    # The embedded default's shape (scripts/pretrain_tiny.py trains it): small enough to fine-tune
    # on two CPU cores in seconds, big enough to write French after pretraining.
    # Every in/out size is a multiple of 64: bitsandbytes' CPU 4-bit kernels need that to generate.
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, vocab_size=None,
                 tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=4096),
}

# ChatML-style turns; <|im_end|> closes every turn and is the stop token.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def cache_dir() -> Path:
    return Path(os.environ.get("FASTFT_CACHE", Path.home() / ".cache" / "fastft"))


def is_builtin(name: str) -> bool:
    return name == TINY or name.startswith("random:")


def resolve_model(name: str) -> str:
    """Return what `from_pretrained` should load for `name`, building `random:` models on first use."""
    if not is_builtin(name):
        return name
    if name == TINY:
        if not (TINY_DIR / "model.safetensors").exists():
            raise FastftError(f"`fastft:tiny` is missing from this installation ({TINY_DIR}); reinstall fastft, "
                              "or rebuild it with `python scripts/pretrain_tiny.py` from a fastft checkout.")
        return str(TINY_DIR)
    arch = name.removeprefix("random:")
    if arch not in ARCHITECTURES or arch == "tiny":
        raise FastftError(
            f"`model.name` = \"{name}\" is not a known built-in model. Use `fastft:tiny` or one of "
            + ", ".join(f"`random:{a}`" for a in ARCHITECTURES if a != "tiny") + "."
        )
    folder = cache_dir() / "models" / arch
    if not (folder / "config.json").exists():
        _build(arch, folder)
    return str(folder)


def build_tokenizer():
    """A byte-level tokenizer: every byte is a token, plus pad and chat-turn tokens.

    Fast (Rust) tokenizers give character offsets, which the data pipeline uses to
    decide which tokens carry the loss.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"pad_token": "<|pad|>", "eos_token": "<|im_end|>",
                            "additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 4096
    return tok


def _build(arch: str, folder: Path) -> None:
    """Create a random model of `arch` and its tokenizer in `folder` (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(ARCHITECTURES[arch])
    tokenizer = build_tokenizer()
    if shape["vocab_size"] is None:
        shape["vocab_size"] = len(tokenizer)
    model_type = shape.pop("model_type")
    config = AutoConfig.for_model(
        model_type, **shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, torch_dtype="bfloat16",
    )
    dtype = torch.bfloat16
    device = "cpu"
    if torch.cuda.is_available():
        # Random init is the slow part: about a minute per billion parameters on a few CPU cores
        # (an 8B model would take many minutes), seconds on a GPU. Use the GPU when the model fits.
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config, dtype=dtype).parameters())
        device = "cuda" if size * dtype.itemsize < 0.8 * torch.cuda.mem_get_info()[0] else "cpu"
    torch.manual_seed(0)  # the same weights on every machine that builds on the same kind of device
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # One temporary folder per process: machines sharing a cache may build the same model at once.
    tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the run that asked for the model loads it next
    try:
        tmp.replace(folder)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(tmp)


def load_tokenizer(model_cfg):
    """The tokenizer every backend uses (so token ids are identical across backends)."""
    from transformers import AutoTokenizer

    path = resolve_model(model_cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=model_cfg.revision or None, trust_remote_code=model_cfg.trust_remote_code
        )
    except OSError as e:
        raise FastftError(
            f"`model.name` = \"{model_cfg.name}\": could not load its tokenizer ({str(e).splitlines()[0]}). "
            "Check the id or folder; without network, only local folders, `fastft:tiny` and `random:` models load."
        ) from None
    if not tok.is_fast:
        raise FastftError(f"`model.name` = \"{model_cfg.name}\" has no fast tokenizer; fastft needs one for loss masking.")
    if model_cfg.chat_template:
        tok.chat_template = model_cfg.chat_template
    if tok.pad_token is None:  # Llama tokenizers ship without one; padding never carries loss
        tok.pad_token = tok.eos_token
    return tok
