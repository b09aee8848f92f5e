"""After `fastft run`: export the adapter, merge it exactly, and generate as in training.

    export:   run folder -> portable adapter folder: adapter, tokenizer, recipe, prompt template,
              manifest, model card
    merge:    base (16-bit or fp32, never 4-bit) + adapter -> merged, sharded safetensors,
              tokenizer, generation config with the trained stop token; then the fidelity check
    generate: prompts -> answers, formatted as the data pipeline formats them and stopped at the
              trained stop token

`merge` and `generate` accept any of these folders (a "source"):

    run folder      outputs/<name>/ holding adapter/, recipe.toml, fastft.json
    adapter folder  outputs/<name>/adapter/ (recipe and summary in the parent)
    export folder   what `fastft export` writes: adapter files, recipe.toml, fastft.json side by side
    merged folder   what `fastft merge` writes (generate only)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fastft.errors import FastftError
from fastft.recipe import Recipe, load_recipe

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
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class Source:
    """A folder `merge`/`generate` can start from, with what was found beside it."""

    path: Path
    home: Path  # where recipe.toml and fastft.json are (or would be)
    adapter: Path | None  # the folder holding adapter_config.json, if an adapter
    model: Path | None  # the merged model folder, if merged
    recipe: Recipe | None  # the run's resolved recipe, if found
    info: dict = field(default_factory=dict)  # the run summary / export or merge manifest (fastft.json)

    @property
    def tokenizer_dir(self) -> Path:
        return self.adapter or self.model


@dataclass
class Answer:
    prompt: str  # what the user asked
    text: str  # the formatted prompt the model saw (exactly as in training)
    answer: str  # the generated text, special tokens removed
    prompt_ids: list[int]
    answer_ids: list[int]
    stopped: bool  # ended on a stop token rather than at max_new_tokens


# --------------------------------------------------------------------------- locating


def locate(path: str | Path) -> Source:
    """Find the adapter or merged model, the recipe and the summary for a run, adapter, export or merged folder.

    Raises `FastftError` when `path` is none of those.
    """
    p = Path(path)
    if not p.is_dir():
        raise FastftError(f"{p}: no such folder. Give a run folder (outputs/<name>), its adapter/ folder, "
                          "a `fastft export` folder or a `fastft merge` folder.")
    adapter = model = None
    if (p / "adapter" / "adapter_config.json").is_file():
        adapter, home = p / "adapter", p
    elif (p / "adapter_config.json").is_file():
        adapter = p
        home = p if (p / "recipe.toml").is_file() else p.parent
    elif (p / "config.json").is_file():
        model, home = p, p
    else:
        raise FastftError(f"{p}: neither a run folder (adapter/adapter_config.json), an adapter or export folder "
                          "(adapter_config.json) nor a model folder (config.json). Point at the folder `fastft run` "
                          "wrote (outputs/<name>) or one written by `fastft export`/`fastft merge`.")
    recipe = load_recipe(home / "recipe.toml") if (home / "recipe.toml").is_file() else None
    info = json.loads((home / "fastft.json").read_text()) if (home / "fastft.json").is_file() else {}
    return Source(p, home, adapter, model, recipe, info)


def _require_adapter(src: Source, command: str) -> Path:
    if src.adapter is None:
        raise FastftError(f"{src.path}: holds a merged model, not an adapter; `fastft {command}` needs the run "
                          "folder, its adapter/ folder or an export folder.")
    return src.adapter


def base_model(src: Source, base: str | None = None) -> tuple[str, str, str | None]:
    """(model id as recorded, what `from_pretrained` loads, revision) for an adapter's base.

    `base` overrides where the weights come from. Raises `FastftError` when the base is unknown.
    """
    from fastft.models import resolve_model

    config = json.loads((src.adapter / "adapter_config.json").read_text())
    recorded = config.get("base_model_name_or_path") or (src.recipe.model.name if src.recipe else "")
    name = base or recorded
    if not name:
        raise FastftError(f"{src.adapter / 'adapter_config.json'}: no `base_model_name_or_path` and no recipe beside "
                          "it. Pass --base PATH_OR_ID with the model the adapter was trained on.")
    same = src.recipe is not None and name == src.recipe.model.name
    return name, resolve_model(name), (src.recipe.model.revision or None) if same else None


def prepare_out(out: str | Path, overwrite: bool, source: Path) -> Path:
    """Check that `out` may be written. Raises `FastftError` for an occupied folder or one overlapping the source."""
    out = Path(out)
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise FastftError(f"--out {out} overlaps the source folder {source}. Write the output somewhere else, "
                          "e.g. --out outputs/<name>-merged.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FastftError(f"--out {out} already exists and is not empty. Choose another folder, or add --overwrite "
                          "to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------- formatting


def build_prompt(text: str, recipe: Recipe | None, tokenizer) -> tuple[str, list[int]]:
    """The prompt text and token ids for user text `text`, exactly as training put them before an answer.

    Chat templates write their own special tokens; other formats get the tokenizer's, as in
    `fastft.data.tokenize`. Without a recipe, `text` is used as is.
    """
    from fastft.data import render_prompt

    if recipe is None:
        return text, tokenizer(text)["input_ids"]
    prompt = render_prompt(text, recipe.data, tokenizer)
    return prompt, tokenizer(prompt, add_special_tokens=recipe.data.format != "chat")["input_ids"]


def stop_token_ids(recipe: Recipe | None, tokenizer) -> list[int]:
    """The token ids that end an answer: the one training put after every answer first, then the EOS.

    For chat data it is the first special token the chat template writes after an assistant
    message (e.g. <|im_end|>, <|eot_id|>), found by rendering a probe conversation through the
    data pipeline; for the other formats it is the tokenizer's EOS (`data.add_eos`).
    """
    from fastft.data import Record, render

    ids = []
    if recipe is not None and recipe.data.format == "chat":
        probe = "fastft stop-token probe"
        messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": probe}]
        segments = render(Record("<probe>", 1, {recipe.data.messages_field: messages}), recipe.data, tokenizer)
        answer = next(text for text, loss in segments if loss)
        tail = tokenizer(answer[answer.index(probe) + len(probe):], add_special_tokens=False)["input_ids"]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        ids += [i for i in tail if i in special][:1]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def prompt_template(recipe: Recipe, tokenizer) -> str:
    """The training prompt with `{prompt}` where the user's text goes (the answer follows it)."""
    return build_prompt("{prompt}", recipe, tokenizer)[0]


# --------------------------------------------------------------------------- export


def export(run_dir: str | Path, out: str | Path, overwrite: bool = False, echo=print) -> Path:
    """Write a self-contained adapter folder from a run folder and return it.

    The folder holds the PEFT adapter (loadable with stock `PeftModel.from_pretrained`), the
    tokenizer with its chat template, `recipe.toml`, `prompt_template.txt`, a `fastft.json`
    manifest and a model card `README.md`. Written atomically. Raises `FastftError` for a
    folder that is not a finished run or an occupied `out`.
    """
    from fastft.train import atomic_dir, library_versions

    src = locate(run_dir)
    adapter = _require_adapter(src, "export")
    if src.recipe is None:
        raise FastftError(f"{src.path}: no recipe.toml beside the adapter, so the prompt format is unknown. "
                          "Export the run folder that `fastft run` wrote (outputs/<name>).")
    for name in ADAPTER_FILES:
        if not (adapter / name).is_file():
            raise FastftError(f"{adapter}: {name} is missing; the run did not finish saving. Rerun it.")
    out = prepare_out(out, overwrite, src.path)
    from transformers import AutoTokenizer

    recipe, run = src.recipe, src.info
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    swap = atomic_dir(out)
    try:
        for f in sorted(adapter.iterdir()):
            if f.is_file() and f.name != "README.md":  # PEFT's placeholder card is replaced below
                shutil.copy2(f, swap.tmp / f.name)
        shutil.copy2(src.home / "recipe.toml", swap.tmp / "recipe.toml")
        template = prompt_template(recipe, tokenizer)
        (swap.tmp / "prompt_template.txt").write_text(template, encoding="utf-8")
        stops = stop_token_ids(recipe, tokenizer)
        manifest = {
            "kind": "fastft-adapter",
            "base_model": recipe.model.name,
            "base_revision": recipe.model.revision or run.get("base_revision") or None,
            "trained_quantization": recipe.model.quantization,
            "backend": run.get("backend"),
            "lora": recipe.to_dict()["lora"],
            "data_format": recipe.data.format,
            "prompt_template": template,
            "add_special_tokens": recipe.data.format != "chat",
            "stop_tokens": [tokenizer.convert_ids_to_tokens(i) for i in stops],
            "stop_token_ids": stops,
            "dataset_fingerprint": run.get("dataset_fingerprint"),
            "steps": run.get("steps"),
            "first_loss": run.get("first_loss"),
            "final_loss": run.get("final_loss"),
            "final_eval_loss": run.get("final_eval_loss"),
            "train_versions": run.get("versions") or run.get("train_versions", {}),
            "export_versions": library_versions(),
            "exported_from": str(src.path.resolve()),
            "sha256": {f.name: _sha256(f) for f in sorted(swap.tmp.iterdir())},
        }
        (swap.tmp / "fastft.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        (swap.tmp / "README.md").write_text(adapter_card(manifest, out.name), encoding="utf-8")
        swap.commit()
    except BaseException:
        swap.abort()
        raise
    echo(f"exported {src.path} to {out}: adapter for {recipe.model.name}, stop token "
         f"{manifest['stop_tokens'][0] if stops else 'none'}")
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_card(m: dict, folder: str) -> str:
    """The model card of an export folder: what it is, how to load, merge and prompt it."""
    builtin = m["base_model"].startswith(("fastft:", "random:"))
    base_line = (f'base = AutoModelForCausalLM.from_pretrained(resolve_model("{m["base_model"]}"))  '
                 f"# built by fastft, offline" if builtin else
                 f'base = AutoModelForCausalLM.from_pretrained("{m["base_model"]}"'
                 + (f', revision="{m["base_revision"]}"' if m["base_revision"] else "") + ', dtype="auto")')
    lora = m["lora"]
    four_bit = m["trained_quantization"] != "16bit"
    losses = ", ".join(f"{k.replace('_', ' ')} {m[k]:.4f}" for k in ("first_loss", "final_loss", "final_eval_loss")
                       if m.get(k) is not None)
    return f"""---
base_model: {m["base_model"]}
library_name: peft
tags: [fastft, lora{", qlora" if four_bit else ""}]
---

# {folder}

A LoRA adapter for `{m["base_model"]}` trained with fastft ({m["backend"]} backend, on a
{"4-bit (QLoRA)" if four_bit else "16-bit"} base): r={lora["r"]}, alpha={lora["alpha"]}, targets
{", ".join(lora["target_modules"])}{", fully trained: " + ", ".join(lora["modules_to_save"]) if lora["modules_to_save"] else ""}.
{m["steps"]} steps; {losses}; dataset fingerprint `{m["dataset_fingerprint"]}`.

## Load with PEFT

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
{"from fastft.models import resolve_model" + chr(10) if builtin else ""}{base_line}
model = PeftModel.from_pretrained(base, "{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")
```

## Merge into the base, or generate

    fastft merge {folder} --out {folder}-merged      # never into 4-bit weights; checked afterwards
    fastft generate {folder} --prompt "your question"  # formatted and stopped as in training

With PEFT alone: load the base in 16-bit (not 4-bit), then `model.merge_and_unload()`.

## Prompt format

Training put this text before every answer (`{{prompt}}` is the user's text); the
tokenizer's special tokens are {"added" if m["add_special_tokens"] else "not added (the chat template writes them)"}:

```
{m["prompt_template"]}
```

Answers end with {", ".join(f"`{t}`" for t in m["stop_tokens"])}; stop generating there.
`recipe.toml` is the full training recipe, `fastft.json` the manifest (versions, losses, checksums).
"""


# --------------------------------------------------------------------------- merge


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
    from fastft.train import atomic_dir, library_versions

    if dtype not in DTYPES:
        raise FastftError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}.")
    src = locate(source)
    adapter = _require_adapter(src, "merge")
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
    swap = atomic_dir(out)
    try:
        bar.set_postfix_str(f"loading {name}")
        model = _load_model(path, name, revision, torch.float32, trust=trust)
        bar.update()
        bar.set_postfix_str("loading the adapter")
        model = _load_adapter(model, adapter)
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
            merged = _load_model(swap.tmp, str(out), None, torch.float32, trust=trust)  # an exact upcast
            merged_logits = _logits(merged, prompts)
            del merged
            bar.update()
            bar.set_postfix_str("comparing")
            report |= compare(reference, merged_logits)
            report |= {"dtype": dtype, "tolerance": TOLERANCE[dtype], "prompts": len(prompts)}
            bar.update()
            if trained_4bit:
                bar.set_postfix_str("4-bit base+adapter, as trained")
                trained = _load_adapter(_load_model(path, name, revision, torch.float32, four_bit=True, trust=trust),
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
    except BaseException:
        bar.close()
        swap.abort()
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


def _load_model(path, name: str, revision, dtype, four_bit: bool = False, trust: bool = False, device: str = "cpu"):
    """A causal LM from `path` in `dtype` (or 4-bit NF4 as the hf backend trains), in eval mode."""
    from transformers import AutoModelForCausalLM

    from fastft.backends.hf import nf4_config

    kwargs = dict(dtype=dtype, revision=revision, trust_remote_code=trust, device_map={"": device})
    if four_bit:  # the hf backend's QLoRA storage, so this is the model that was trained
        kwargs["quantization_config"] = nf4_config(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise FastftError(f"model `{name}`: could not load its weights ({str(e).splitlines()[0]}). Pass --base "
                          "PATH_OR_ID with the base weights.") from None
    return model.eval()


def _load_adapter(model, adapter: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter).eval()
    except (RuntimeError, ValueError) as e:  # shape mismatches: the adapter belongs to another base
        raise FastftError(f"{adapter}: the adapter does not fit this base model ({str(e).splitlines()[0][:300]}). "
                          "Pass --base with the model it was trained on.") from None


def _as_list(value) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


# --------------------------------------------------------------------------- fidelity


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


# --------------------------------------------------------------------------- GGUF


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


# --------------------------------------------------------------------------- generate


def load_for_generation(src: Source, base: str | None = None):
    """The model to answer with: a merged model in its saved dtype, or base+adapter with the base stored
    as in training (4-bit when the recipe trained on 4-bit). On the GPU when there is one."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    trust = bool(src.recipe and src.recipe.model.trust_remote_code)
    if src.adapter is None:
        return _load_model(src.model, str(src.model), None, "auto", trust=trust, device=device)
    from fastft.backends.hf import compute_dtype

    name, path, revision = base_model(src, base)
    dtype = compute_dtype(src.recipe)
    four_bit = src.recipe.model.quantization != "16bit"
    return _load_adapter(_load_model(path, name, revision, dtype, four_bit=four_bit, trust=trust, device=device),
                         src.adapter)


def generate(source: str | Path, prompts: list[str], base: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[Answer]:
    """Answer each prompt with the model in `source`, formatted and stopped exactly as in training.

    Greedy unless `temperature` > 0. Raises `FastftError` when `source` has no recipe (the
    prompt format would be a guess) or bad sampling settings.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise FastftError("--temperature must be >= 0, --top-p in (0, 1] and --max-new-tokens >= 1.")
    src = locate(source)
    if src.recipe is None:
        raise FastftError(f"{src.path}: no recipe.toml here or in the parent folder, so the training prompt format is "
                          "unknown. Point at the run folder, an export folder or a folder written by `fastft merge`.")
    tokenizer = AutoTokenizer.from_pretrained(src.tokenizer_dir)
    model = load_for_generation(src, base)
    stops = stop_token_ids(src.recipe, tokenizer)
    sampling = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                              temperature=temperature if sampling else 1.0, top_p=top_p if sampling else 1.0,
                              eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    answers = []
    for prompt in prompts:
        text, ids = build_prompt(prompt, src.recipe, tokenizer)
        torch.manual_seed(seed)
        inputs = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
        new = out[0, len(ids):].tolist()
        stopped = bool(new) and new[-1] in stops
        answers.append(Answer(prompt, text, tokenizer.decode(new, skip_special_tokens=True), ids, new, stopped))
    return answers
