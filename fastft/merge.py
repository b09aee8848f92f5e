"""`fastft merge`: an adapter added into its base exactly, checked against base+adapter, optionally GGUF.

The base is loaded from its 16-bit or fp32 checkpoint (never 4-bit) and upcast to fp32 on the
CPU; the LoRA update is added there and the sum rounded to the output dtype once. The saved
model is reloaded and its logits compared with base+adapter's (the fidelity check) before the
folder is published.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fastft.data import build_prompt, prompt_template, stop_token_ids
from fastft.errors import FastftError
from fastft.export import base_model, load_adapter, load_model, locate, prepare_out, require_adapter
from fastft.recipe import Recipe
from fastft.runs import atomic_dir, disk_full_error, library_versions

# Fidelity tolerance: the largest logit difference between base+adapter and the merged model
# (both computed in fp32), as a fraction of the largest logit (at least 1). An fp32 merge differs
# only in summation order; a 16-bit one also rounds every merged weight W + BA once to 16 bits.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


CHECK_PROMPTS = [
    "What is a tokamak?",
    "Écris une phrase sur la mer.",
    "List three prime numbers, then explain why they are prime.",
    "Summarise in one line: the cat sat on the mat because it was warm.",
]


DTYPES = ("auto", "bf16", "fp16", "fp32")


def merge(source: str | Path, out: str | Path, dtype: str = "auto", base: str | None = None, check: bool = True,
          overwrite: bool = False, max_shard_size: str = "5GB", gguf: bool = False, echo=print) -> Path:
    """Merge an adapter into its base in `dtype` and save the result to `out`; return `out`.

    The base is loaded from its 16-bit or fp32 checkpoint (never 4-bit, even for adapters trained
    on a 4-bit base) and upcast to fp32 on the CPU; the LoRA update is added there and the sum is
    rounded to `dtype` once. So it needs about 4 bytes of RAM per parameter. The output holds
    sharded safetensors, the tokenizer with its chat template, a generation config whose EOS is
    the trained stop token, the recipe and a manifest. Unless `check` is false, the saved model is
    reloaded and compared with base+adapter in fp32 (`fidelity`), which measures exactly what the
    merge and the rounding changed, fast on any CPU; the output is written only when that passes.
    Raises `FastftError` for bad input, an occupied `out`, a missing GGUF converter, or a failed
    fidelity check.
    """
    if dtype not in DTYPES:
        raise FastftError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}.")
    src = locate(source)
    adapter = require_adapter(src, "merge")
    out = prepare_out(out, overwrite, src.path)  # before the slow imports: a refusal is instant
    converter = find_gguf_converter() if gguf else None
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    name, path, revision = base_model(src, base)
    trust = bool(src.recipe and src.recipe.model.trust_remote_code)
    config = _base_config(name, path, revision, trust)
    if getattr(config, "quantization_config", None):
        raise FastftError(f"base model `{name}` is stored pre-quantised ({config.quantization_config.get('quant_method', '?')}"
                          "), and merging into quantised weights loses the adapter's precision. Pass --base with the "
                          "16-bit original of that model.")
    if dtype == "auto":
        dtype = {torch.float32: "fp32", torch.float16: "fp16"}.get(_config_dtype(config), "bf16")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    stops = stop_token_ids(src.recipe, tokenizer)
    prompts = check_prompts(src.recipe, tokenizer) if check else []

    trained_4bit = check and src.recipe is not None and src.recipe.model.quantization != "16bit"
    # load, adapter, merge, save; with the check: reference logits, reload, compare, and the 4-bit model
    bar = tqdm(total=4 + 3 * check + trained_4bit, desc="merge", unit="step", file=sys.stderr)
    report: dict = {}
    swap, merged_size = atomic_dir(out), 0
    try:
        bar.set_postfix_str(f"loading {name}")
        model = load_model(path, name, revision, torch.float32, trust=trust)
        bar.update()
        bar.set_postfix_str("loading the adapter")
        model = load_adapter(model, adapter)
        bar.update()
        if check:
            bar.set_postfix_str("base+adapter logits")
            reference = _logits(model, prompts)
            with model.disable_adapter():
                base_logits = _logits(model, prompts)
            report["adapter_effect"] = compare(base_logits, reference)["max_abs_logit_diff"]
            bar.update()
        bar.set_postfix_str("merging")
        model = model.merge_and_unload(safe_merge=True).to(torch_dtype)  # safe_merge refuses NaNs
        merged_size = sum(t.numel() for t in model.state_dict().values()) * torch_dtype.itemsize
        bar.update()
        bar.set_postfix_str("saving")
        gen = model.generation_config
        gen.eos_token_id = stops + [i for i in _as_list(gen.eos_token_id) if i not in stops]
        gen.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(swap.tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(swap.tmp)
        del model
        bar.update()
        if check:
            bar.set_postfix_str("reloading the merged model")
            merged = load_model(swap.tmp, str(out), None, torch.float32, trust=trust)  # an exact upcast
            merged_logits = _logits(merged, prompts)
            del merged
            bar.update()
            bar.set_postfix_str("comparing")
            report |= compare(reference, merged_logits)
            report |= {"dtype": dtype, "tolerance": TOLERANCE[dtype], "prompts": len(prompts)}
            bar.update()
            if trained_4bit:
                bar.set_postfix_str("4-bit base+adapter, as trained")
                trained = load_adapter(load_model(path, name, revision, torch.float32, four_bit=True, trust=trust),
                                       adapter)
                report["trained_4bit_vs_merged"] = compare(_logits(trained, prompts), merged_logits)
                del trained
                bar.update()
        bar.close()
        if check:
            echo(describe_fidelity(report))
            check_fidelity(report)
        if src.recipe:  # generate formats prompts from these
            shutil.copy2(src.home / "recipe.toml", swap.tmp / "recipe.toml")
            (swap.tmp / "prompt_template.txt").write_text(prompt_template(src.recipe, tokenizer), encoding="utf-8")
        manifest = {
            "kind": "fastft-merged", "base_model": name, "base_revision": revision, "dtype": dtype,
            "merged_from": str(src.path.resolve()), "stop_tokens": [tokenizer.convert_ids_to_tokens(i) for i in stops],
            "stop_token_ids": stops, "fidelity": report or None, "run": src.info, "merge_versions": library_versions(),
        }
        (swap.tmp / "fastft.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        if converter:
            run_gguf_converter(converter, swap.tmp, dtype)
        swap.commit()
    except BaseException as e:
        bar.close()
        swap.abort()
        # The merged weights in the chosen precision, and the tokenizer's files.
        full = disk_full_error(e, "the merged model", out, merged_size + 20_000_000)
        if full:
            raise full from None
        raise
    echo(f"merged {name} + {adapter} ({dtype}) into {out}")
    return out


def _base_config(name: str, path: str, revision: str | None, trust: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust)
    except OSError as e:
        raise FastftError(f"base model `{name}`: could not load its config ({str(e).splitlines()[0]}). Pass --base "
                          "PATH_OR_ID with the base weights; without network, only local folders, `fastft:tiny` and "
                          "`random:` models load.") from None


def _config_dtype(config):
    import torch

    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value


def _as_list(value) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def check_prompts(recipe: Recipe | None, tokenizer) -> list[list[int]]:
    """Token ids of the fidelity prompts, formatted as in training."""
    texts = CHECK_PROMPTS + ([recipe.train.sample_prompt] if recipe and recipe.train.sample_prompt else [])
    return [build_prompt(t, recipe, tokenizer)[1] for t in texts]


def _logits(model, prompts: list[list[int]]):
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float().cpu() for ids in prompts]


def compare(reference: list, other: list) -> dict:
    """Largest absolute logit difference and greedy next-token agreement over every prompt position."""
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, other))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, other))
    positions = sum(a.shape[0] for a in reference)
    scale = max(float(a.abs().max()) for a in reference)
    return {"max_abs_logit_diff": diff, "greedy_agreement": agree / positions, "positions": positions,
            "max_abs_logit": scale}


def check_fidelity(report: dict) -> None:
    """Raise `FastftError` when the merged model's logits are further from base+adapter than the dtype allows."""
    limit = report["tolerance"] * max(1.0, report["max_abs_logit"])
    if report["max_abs_logit_diff"] > limit:
        raise FastftError(
            f"fidelity check failed: the merged model's logits differ from base+adapter by up to "
            f"{report['max_abs_logit_diff']:.3g} (allowed {limit:.3g} in {report['dtype']}; greedy tokens agree at "
            f"{report['greedy_agreement']:.1%} of positions). Nothing was written. Try --dtype fp32, check that "
            "--base is the model the adapter was trained on, or pass --no-check to write it anyway."
        )


def describe_fidelity(r: dict) -> str:
    limit = r["tolerance"] * max(1.0, r["max_abs_logit"])
    text = (f"fidelity ({r['prompts']} prompts, {r['positions']} positions, {r['dtype']}): merged vs base+adapter "
            f"max |logit diff| {r['max_abs_logit_diff']:.3g} (allowed {limit:.3g}), greedy next token agrees at "
            f"{r['greedy_agreement']:.1%}; the adapter itself moves logits by up to {r['adapter_effect']:.3g}")
    if r["adapter_effect"] <= limit:
        text += "\nwarning: the adapter changes the logits less than the tolerance, so this check cannot tell a " \
                "merged adapter from a missing one"
    if "trained_4bit_vs_merged" in r:
        q = r["trained_4bit_vs_merged"]
        text += (f"\n4-bit base+adapter (what was trained) vs merged {r['dtype']}: max |logit diff| "
                 f"{q['max_abs_logit_diff']:.3g}, greedy next token agrees at {q['greedy_agreement']:.1%} "
                 "(the cost of training on a quantised base; not an error)")
    return text


def find_gguf_converter() -> Path:
    """llama.cpp's `convert_hf_to_gguf.py`, from $LLAMA_CPP_DIR or the PATH. Raises `FastftError` if absent."""
    candidates = [Path(os.environ["LLAMA_CPP_DIR"]) / "convert_hf_to_gguf.py"] if os.environ.get("LLAMA_CPP_DIR") else []
    on_path = shutil.which("convert_hf_to_gguf.py")
    candidates += [Path(on_path)] if on_path else []
    for c in candidates:
        if c.is_file():
            return c
    raise FastftError("--gguf needs llama.cpp's converter `convert_hf_to_gguf.py`, which was not found. Clone "
                      "https://github.com/ggml-org/llama.cpp, `pip install -r llama.cpp/requirements.txt`, and set "
                      "LLAMA_CPP_DIR to the checkout (or put the script on the PATH); or merge without --gguf.")


def run_gguf_converter(converter: Path, folder: Path, dtype: str) -> Path:
    """Write `model.gguf` into the merged `folder`. Raises `FastftError` when the converter fails."""
    outfile = folder / "model.gguf"
    outtype = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}[dtype]
    done = subprocess.run([sys.executable, str(converter), str(folder), "--outfile", str(outfile), "--outtype", outtype],
                          capture_output=True, text=True)
    if done.returncode != 0 or not outfile.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FastftError(f"{converter} failed (exit {done.returncode}): {' | '.join(tail)}. The merged model was "
                          "not written; merge without --gguf, or update llama.cpp.")
    return outfile
