"""`fastft export`, and finding what a run left behind for `merge`, `generate` and `eval`.

    export:   run folder -> portable adapter folder: adapter, tokenizer, recipe, prompt template,
              manifest, model card

`export`, `merge` (`fastft/merge.py`) and `generate` (`fastft/generate.py`) accept any of these
folders (a "source"), found by `locate`:

    run folder      outputs/<name>/ holding adapter/, recipe.toml, fastft.json
    adapter folder  outputs/<name>/adapter/ (recipe and summary in the parent)
    export folder   what `fastft export` writes: adapter files, recipe.toml, fastft.json side by side
    merged folder   what `fastft merge` writes (generate only)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fastft.data import prompt_template, stop_token_ids
from fastft.errors import FastftError
from fastft.recipe import Recipe, load_recipe
from fastft.runs import atomic_dir, disk_full_error, library_versions

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


def require_adapter(src: Source, command: str) -> Path:
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


# --------------------------------------------------------------------------- export


def export(run_dir: str | Path, out: str | Path, overwrite: bool = False, echo=print) -> Path:
    """Write a self-contained adapter folder from a run folder and return it.

    The folder holds the PEFT adapter (loadable with stock `PeftModel.from_pretrained`), the
    tokenizer with its chat template, `recipe.toml`, `prompt_template.txt`, a `fastft.json`
    manifest and a model card `README.md`. Written atomically. Raises `FastftError` for a
    folder that is not a finished run or an occupied `out`.
    """
    src = locate(run_dir)
    adapter = require_adapter(src, "export")
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
    except BaseException as e:
        swap.abort()
        full = disk_full_error(e, "the export", out, sum(f.stat().st_size for f in adapter.iterdir()) + 20_000)
        if full:
            raise full from None
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


def load_model(path, name: str, revision, dtype, four_bit: bool = False, trust: bool = False, device: str = "cpu"):
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


def load_adapter(model, adapter: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter).eval()
    except (RuntimeError, ValueError) as e:  # shape mismatches: the adapter belongs to another base
        raise FastftError(f"{adapter}: the adapter does not fit this base model ({str(e).splitlines()[0][:300]}). "
                          "Pass --base with the model it was trained on.") from None
