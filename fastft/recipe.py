"""Recipes: one TOML file describes a fine-tune, validated at the door.

A recipe has four sections, `[model]`, `[data]`, `[lora]` and `[train]`, each loaded
into a dataclass below. Every field carries its documentation beside its default
(`doc(...)`); `reference_markdown()` turns them into the README's reference table.

Validation happens once, here, before anything heavy is imported or loaded:
unknown keys (with the nearest valid name), wrong types, out-of-range values and
cross-field rules all raise `FastftError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from fastft.errors import FastftError


def doc(default: Any, text: str, *, min: float | None = None, max: float | None = None, factory=None):
    """A dataclass field with its documentation and allowed range kept beside the default."""
    meta = {"doc": text, "min": min, "max": max}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = doc(
        "fastft:tiny",
        "Base model: a Hugging Face id, a local folder, `fastft:tiny` (embedded tiny Llama, CPU) "
        "or `random:<arch>` (random weights with a real shape: llama-3.2-1b, llama-3.2-3b, "
        "llama-3.1-8b, qwen2.5-1.5b).",
    )
    revision: str = doc("", "Hub revision (branch, tag or commit) of `name`; empty for the default.")
    quantization: Literal["4bit", "16bit", "auto"] = doc(
        "4bit",
        "How the frozen base is stored: `4bit` (QLoRA, bitsandbytes NF4 with double quantisation), "
        "`16bit` (LoRA on a bf16/fp16 base), or `auto` (let `fastft plan` choose what fits).",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = doc(
        "auto",
        "Compute dtype: `auto` is bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU.",
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = doc(
        "auto", "Attention kernel: `auto` is PyTorch SDPA (FlashAttention-2 when installed on GPU)."
    )
    liger_kernels: Union[bool, Literal["auto"]] = doc(
        "auto",
        "`hf` backend: Liger's fused Triton kernels for RMSNorm, RoPE and SwiGLU. `auto` uses them on an NVIDIA "
        "GPU when `liger-kernel` is installed (`pip install -e \".[fast]\"`); `true` insists (an error where they "
        "cannot run); `false` keeps the model's PyTorch code.",
    )
    upcast_fp32: bool = doc(
        False,
        "`hf` backend, 4-bit only: keep the frozen weights that are not quantised (norms, embeddings, LM head) in "
        "fp32, as `prepare_model_for_kbit_training` does; the hidden states between layers then become fp32 too, "
        "so it is slower and takes more memory. The default keeps them in the compute dtype.",
    )
    chat_template: str = doc(
        "", "Jinja chat template to use instead of the tokenizer's own (for `chat` data); empty keeps the tokenizer's."
    )
    trust_remote_code: bool = doc(
        False, "Run Python code shipped with the model on the Hub. Off unless you trust the model's authors."
    )


@dataclass
class DataConfig:
    path: list[str] = doc(
        None,
        "Training data: one path or a list of paths (.jsonl, .json, .csv, .parquet, .txt; relative to the "
        "recipe file), or `hf:owner/name` for a Hugging Face dataset.",
        factory=list,
    )
    format: Literal["qa", "alpaca", "chat", "text"] = doc(
        "qa",
        "How a record becomes text: `qa` (fill `template`), `alpaca` (instruction/input/output), "
        "`chat` (role/content messages through the chat template), `text` (raw text).",
    )
    template: str = doc(
        "### Question:\n{question}\n\n### Answer:\n{answer}",
        "`qa` only: the text of one example, with `{field}` placeholders filled from the record.",
    )
    response_field: str = doc(
        "",
        "`qa` only: the placeholder where the answer starts; the loss covers it and what follows. "
        "Empty means the last placeholder in `template`.",
    )
    field_map: dict[str, str] = doc(
        None, "Rename record fields before formatting: `{template_name = \"column_name\"}`.", factory=dict
    )
    text_field: str = doc("text", "`text` only: the record field holding the text (`.txt` lines are put there).")
    messages_field: str = doc("messages", "`chat` only: the record field holding the list of messages.")
    system_prompt: str = doc("", "`chat` only: a system message added to conversations that have none.")
    train_on: Literal["completion", "all"] = doc(
        "completion",
        "Which tokens carry the loss: `completion` (the answer / assistant turns, and the EOS) or `all`.",
    )
    add_eos: bool = doc(True, "Append the tokenizer's EOS to each `qa`/`alpaca`/`text` example so the model learns to stop.")
    max_length: int = doc(2048, "Tokens per example; longer examples are truncated (and counted).", min=8)
    split: str = doc("train", "`hf:` datasets only: the split to read.")
    config: str = doc("", "`hf:` datasets only: the dataset configuration name.")
    eval_path: list[str] = doc(None, "Evaluation data, in the same format as `path`.", factory=list)
    eval_fraction: float = doc(
        0.0, "Hold out this fraction of the training data for evaluation (seeded by `train.seed`).", min=0.0, max=0.5
    )
    packing: bool = doc(
        False,
        "Padding-free packing: the examples of a micro-batch are concatenated into one row with position ids "
        "reset per example, so no compute is spent on padding and no attention crosses examples. FlashAttention-2 "
        "attends within each example only; SDPA and eager compute the whole row's attention and mask it, which "
        "can be slower than padding (see Speed).",
    )
    group_by_length: bool = doc(
        True,
        "With `packing` off: put examples of similar length in the same micro-batch (transformers' length "
        "grouping: random mega-batches of up to 50 optimizer steps' examples, all processes together, each sorted "
        "by length), so less compute goes to padding. The order stays random across groups, but the loss per step "
        "then varies with length. Each epoch's order depends on `train.seed` and the epoch only. Ignored with "
        "`packing`.",
    )
    on_error: Literal["fail", "skip"] = doc(
        "fail", "A bad record stops the run (`fail`) or is skipped and reported with its line (`skip`)."
    )
    num_proc: int = doc(
        0,
        "Processes that tokenise the data (with `datasets.map`) when it is not in the data cache yet; 0 means one per "
        "CPU core, at most 8, with at least 2,000 examples each. The result is the same for any value.",
        min=0, max=256,
    )


@dataclass
class LoraConfig:
    r: int = doc(16, "LoRA rank.", min=1, max=4096)
    alpha: float = doc(16, "LoRA scaling numerator (the update is scaled by alpha / r).", min=0)
    dropout: float = doc(0.0, "Dropout on the LoRA input.", min=0.0, max=0.9)
    target_modules: list[str] = doc(
        None,
        "Linear layers that get adapters: `all-linear` or a list of module names "
        "(for Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).",
        factory=lambda: ["all-linear"],
    )
    modules_to_save: list[str] = doc(
        None, "Modules trained in full and saved with the adapter, e.g. `[\"embed_tokens\", \"lm_head\"]`.", factory=list
    )
    use_rslora: bool = doc(False, "Rank-stabilised LoRA: scale by alpha / sqrt(r).")


@dataclass
class TrainConfig:
    output_dir: str = doc("", "Run folder (relative to the working directory); empty means `outputs/<recipe name>`.")
    epochs: float = doc(1.0, "Passes over the training data (ignored when `max_steps` > 0).", min=0)
    max_steps: int = doc(-1, "Optimizer steps to run; -1 means run `epochs`.", min=-1)
    batch_size: Union[int, Literal["auto"]] = doc(
        8, "Examples per device per micro-batch, or `auto`: the memory planner splits `global_batch_size` into "
        "micro-batch x accumulation (see `fastft plan`).", min=1
    )
    grad_accum: int = doc(1, "Micro-batches per optimizer step (gradient accumulation).", min=1)
    global_batch_size: int = doc(
        0, "With `batch_size = \"auto\"`, and required then: examples per optimizer step (all processes together), "
        "kept fixed whatever the planner picks.", min=0
    )
    learning_rate: float = doc(2e-4, "Peak learning rate of the LoRA weights.", min=0)
    embedding_learning_rate: float = doc(
        0.0, "Learning rate for `embed_tokens`/`lm_head` in `lora.modules_to_save`; 0 means `learning_rate`.", min=0
    )
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = doc(
        "linear", "Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = doc(0.0, "Fraction of the steps spent warming up the learning rate.", min=0, max=1)
    warmup_steps: int = doc(0, "Warm-up steps (overrides `warmup_ratio` when > 0).", min=0)
    weight_decay: float = doc(0.0, "AdamW weight decay.", min=0)
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = doc(
        "adamw_torch", "Optimizer (the 8-bit and paged ones come from bitsandbytes and need a GPU)."
    )
    max_grad_norm: float = doc(1.0, "Gradient clipping norm; 0 disables clipping.", min=0)
    seed: int = doc(42, "Seed for data order, LoRA initialisation, dropout and the eval split.", min=0)
    gradient_checkpointing: Union[bool, Literal["auto", "offload", "reentrant"]] = doc(
        True,
        "Recompute activations in the backward pass to save memory: true, false, `offload` or `auto` (chosen by "
        "the memory planner). `reentrant` uses PyTorch's older reentrant checkpointing (as the seed scripts did), "
        "slower than the default non-reentrant one.",
    )
    fused_loss: Union[bool, Literal["auto"]] = doc(
        "auto",
        "`hf` backend: compute the loss with TRL's chunked LM head, so the full (tokens x vocabulary) logits are "
        "never stored. `auto` uses it on CUDA/XPU GPUs (it is a Triton kernel); `true` insists; `false` lets the "
        "model compute full logits.",
    )
    fsdp: bool = doc(
        False,
        "With several GPUs (`--nproc N`): shard the frozen base (4-bit or 16-bit), LoRA weights, gradients and "
        "optimizer state across them with PyTorch FSDP, one unit per decoder layer, instead of a full copy per GPU.",
    )
    logging_steps: int = doc(10, "Log the loss every N optimizer steps.", min=1)
    save_steps: int = doc(0, "Save a checkpoint every N steps; 0 saves only at the end.", min=0)
    save_total_limit: int = doc(2, "Checkpoints kept on disk (the oldest are deleted).", min=1)
    eval_steps: int = doc(0, "Evaluate every N steps; 0 evaluates once per epoch when there is eval data.", min=0)
    report_to: Literal["auto", "none", "tensorboard", "wandb"] = doc(
        "auto", "Where metrics go besides the terminal: `auto` is TensorBoard when installed."
    )
    sample_prompt: str = doc(
        "", "A prompt answered with the trained adapter at the end of the run; empty uses the first eval or train example."
    )


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = "<recipe>"  # the file it came from, for messages
    name: str = "recipe"  # the file's stem, the default run folder name

    def to_dict(self) -> dict:
        """The resolved recipe as plain TOML-able data (what a run folder records)."""
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}


SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig}
# Fields that hold paths relative to the recipe file.
_PATH_FIELDS = {("data", "path"), ("data", "eval_path")}


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe.

    Raises `FastftError` for a missing file, malformed TOML (with line and column),
    unknown keys, wrong types, out-of-range values and inconsistent settings.
    """
    path = Path(path)
    if not path.is_file():
        raise FastftError(f"{path}: recipe file not found. Check the path; shipped recipes are in `recipes/`.")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise FastftError(f"{path}: not UTF-8 text (byte {e.start}). Save the recipe as UTF-8.") from None
    except tomllib.TOMLDecodeError as e:
        raise FastftError(f"{path}: malformed TOML: {e}. Fix the syntax at that line and column.") from None
    for item in overrides:
        _apply_override(raw, item)
    return recipe_from_dict(raw, source=str(path), base_dir=path.parent, name=path.stem)


def recipe_from_dict(raw: dict, source: str = "<recipe>", base_dir: Path | None = None, name: str = "recipe") -> Recipe:
    """Validate plain data (as read from TOML) into a `Recipe`. Paths resolve against `base_dir`."""
    unknown = set(raw) - set(SECTIONS)
    for key in sorted(unknown):
        raise FastftError(f"{source}: unknown section [{key}]{_suggest(key, SECTIONS)}. Sections are {_names(SECTIONS)}.")
    sections = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section, {})
        if not isinstance(values, dict):
            raise FastftError(f"{source}: `{section}` must be a table ([{section}]), not {_show(values)}.")
        sections[section] = _build_section(cls, section, values, source)
    recipe = Recipe(**sections, source=source, name=name)
    if base_dir is not None:
        for section, key in _PATH_FIELDS:
            cfg = getattr(recipe, section)
            setattr(cfg, key, [_resolve(p, base_dir) for p in getattr(cfg, key)])
    _check_rules(recipe)
    return recipe


def _resolve(p: str, base_dir: Path) -> str:
    if p.startswith("hf:") or Path(p).is_absolute():
        return p
    return str((base_dir / p).resolve())


def _build_section(cls, section: str, values: dict, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise FastftError(
                f"{source}: unknown key `{section}.{key}`{_suggest(key, fields)}. "
                f"Valid keys in [{section}] are {_names(fields)}."
            )
        where = f"{source}: `{section}.{key}`"
        value = _check_type(value, hints[key], where)
        meta = fields[key].metadata
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = meta.get("min"), meta.get("max")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                allowed = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
                raise FastftError(f"{where} = {value} is out of range: it must be {allowed}.")
        kwargs[key] = value
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return `value` coerced to `hint` (int -> float, str -> [str]) or raise a clear error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        for option in args:
            try:
                return _check_type(value, option, where)
            except FastftError:
                continue
        raise FastftError(f"{where} = {_show(value)} is not allowed: expected {_describe(hint)}.")
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise FastftError(f"{where} = {_show(value)} is not allowed: choose one of {', '.join(map(_show, args))}.")
    if origin is list:
        if isinstance(value, str):  # one path or module name stands for a list of one
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise FastftError(f"{where} = {_show(value)} is not allowed: expected a string or a list of strings.")
    if origin is dict:
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            return value
        raise FastftError(f"{where} = {_show(value)} is not allowed: expected a table of strings.")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise FastftError(f"{where} = {_show(value)} is not allowed: expected {_describe(hint)}.")


def _check_rules(r: Recipe) -> None:
    """Cross-field rules, each with what to change."""
    src = r.source
    if not r.data.path:
        raise FastftError(f"{src}: `data.path` is missing. Set it to a data file (relative to the recipe) or `hf:owner/name`.")
    if r.data.format == "qa":
        names = template_fields(r.data.template)
        if not names:
            raise FastftError(f"{src}: `data.template` has no `{{field}}` placeholder. Put the record's fields in it, "
                              "e.g. \"### Question:\\n{question}\\n\\n### Answer:\\n{answer}\".")
        if r.data.response_field and r.data.response_field not in names:
            raise FastftError(f"{src}: `data.response_field` = \"{r.data.response_field}\" is not a placeholder of "
                              f"`data.template` (it has {', '.join(names)}).")
    if r.data.eval_path and r.data.eval_fraction:
        raise FastftError(f"{src}: set either `data.eval_path` or `data.eval_fraction`, not both.")
    if r.train.embedding_learning_rate and not set(r.lora.modules_to_save) & {"embed_tokens", "lm_head"}:
        raise FastftError(
            f"{src}: `train.embedding_learning_rate` is set but no embedding is trained. Add "
            "`modules_to_save = [\"embed_tokens\", \"lm_head\"]` to [lora], or remove the learning rate."
        )
    if r.train.global_batch_size and r.train.batch_size != "auto":
        raise FastftError(f"{src}: `train.global_batch_size` only applies with `train.batch_size = \"auto\"`; "
                          "otherwise the global batch is batch_size x grad_accum.")
    if r.train.batch_size == "auto" and not r.train.global_batch_size:
        raise FastftError(f"{src}: `train.batch_size = \"auto\"` needs `train.global_batch_size` (examples per optimizer "
                          "step, e.g. 8), which the memory planner splits into micro-batch x accumulation.")
    if r.train.batch_size == "auto" and r.train.grad_accum != 1:
        raise FastftError(f"{src}: with `train.batch_size = \"auto\"` the memory planner chooses the accumulation: "
                          "remove `train.grad_accum` and set `train.global_batch_size` to the examples per step.")
    if r.model.upcast_fp32 and r.model.quantization == "16bit":
        raise FastftError(f"{src}: `model.upcast_fp32` only applies to a 4-bit base (it upcasts what 4-bit leaves "
                          "unquantised); with `quantization = \"16bit\"` it would upcast the whole model. Remove it.")
    if r.model.trust_remote_code:
        print(f"warning: {src}: `model.trust_remote_code = true` runs code shipped with {r.model.name}.", file=sys.stderr)


def template_fields(template: str) -> list[str]:
    """The `{field}` names of a qa template, in order of appearance."""
    import string

    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as e:
        raise FastftError(f"`data.template` is not a valid template ({e}). Write literal braces as {{{{ and }}}}.") from None


def to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML, loadable again by `load_recipe` (paths are absolute)."""
    lines = [f"# resolved from {recipe.source}"]
    for section, values in recipe.to_dict().items():
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


# --------------------------------------------------------------------------- overrides


def _apply_override(raw: dict, item: str) -> None:
    """Apply one `--set section.key=value`, the value typed as in TOML (bare words are strings)."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise FastftError(f"--set {item}: expected `section.key=value`, for example `--set train.max_steps=20`.")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word such as fastft:tiny is a string
    raw.setdefault(parts[0], {})
    if not isinstance(raw[parts[0]], dict):
        raise FastftError(f"--set {item}: `{parts[0]}` is not a section.")
    raw[parts[0]][parts[1]] = value


# --------------------------------------------------------------------------- messages


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _names(options) -> str:
    return ", ".join(f"`{o}`" for o in options)


def _show(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value).replace("True", "true").replace("False", "false")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return " or ".join(_show(a) for a in args)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def reference_markdown() -> str:
    """The README's recipe reference: every option, its default and what it does."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = _show(default).replace("\n", "\\n").replace("|", "\\|")
            lines.append(f"| `{section}.{f.name}` | `{shown}` | {f.metadata['doc']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
