"""The `unsloth` backend: Unsloth's fused kernels (NVIDIA GPU) on the shared recipe, data and trainer.

Unsloth patches transformers, PEFT and TRL when it is imported, so it must be the first of them
in its process: `check()` imports it, and `fastft run` calls `check()` before anything imports
transformers. Only `get_backend("unsloth")` imports this module.

Same training as `hf`: the tokenizer (`fastft.models.load_tokenizer`), the token ids and labels
(`fastft.data.prepare`), the collator (`fastft.data.make_collator`), the training arguments and
the optimizer's parameter groups (`fastft.backends.hf.trainer_class`) are the shared ones. Only
the model side is Unsloth's: `FastLanguageModel.from_pretrained` and `get_peft_model`.

`OPTIONS` says where each recipe option goes; APIs as read in the source of Unsloth 2026.10.9
(unsloth/models/loader.py, llama.py, _utils.py, unsloth/trainer.py, unsloth/utils/packing.py).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile

from fastft.errors import FastftError

INSTALL = 'pip install -e ".[unsloth]"'
EMBEDDINGS = ("embed_tokens", "lm_head")

_DATA = "the shared data pipeline (fastft.data.prepare), as for `hf`"
_ARGS = "UnslothTrainingArguments: the shared training arguments (train.training_arguments), as for `hf`"
# Every recipe option and where it reaches Unsloth; options Unsloth cannot honour are refused with
# a FastftError naming them. tests/test_unsloth.py checks that no recipe option is missing here.
OPTIONS = {
    "model.name": "from_pretrained(model_name=<resolved folder or id>, use_exact_model_name=True): the very "
                  "checkpoint `hf` loads, not Unsloth's pre-quantised substitute",
    "model.revision": "from_pretrained(revision=...)",
    "model.quantization": "from_pretrained(load_in_4bit=True): NF4 with double quantisation, as `hf`; "
                          "`16bit`: load_in_16bit=True",
    "model.dtype": "from_pretrained(dtype=...), and the shared bf16/fp16 training flags; `fp32` refused (Unsloth's "
                   "trainer turns bf16 autocast on when bf16 and fp16 are both off, and drops its fused LoRA kernels)",
    "model.attention": "`auto` only: Unsloth picks its own kernel and drops attn_implementation; others refused",
    "model.chat_template": "the shared tokenizer (fastft.models.load_tokenizer), as for `hf`",
    "model.trust_remote_code": "from_pretrained(trust_remote_code=...)",
    **dict.fromkeys(["data.path", "data.format", "data.template", "data.response_field", "data.field_map",
                     "data.text_field", "data.messages_field", "data.system_prompt", "data.train_on", "data.add_eos",
                     "data.split", "data.config", "data.eval_path", "data.eval_fraction", "data.on_error",
                     "data.num_proc"], _DATA),
    "data.max_length": "the shared pipeline truncates; from_pretrained(max_seq_length=...); refused above the "
                       "model's context, where Unsloth would stretch RoPE and `hf` does not",
    "data.packing": "the shared padding-free collator, plus Unsloth's packed_seq_lengths metadata",
    "lora.r": "get_peft_model(r=...)",
    "lora.alpha": "get_peft_model(lora_alpha=...)",
    "lora.dropout": "get_peft_model(lora_dropout=...)",
    "lora.target_modules": "get_peft_model(target_modules=<explicit names>): `all-linear` resolved by PEFT's own "
                           "rule; embed_tokens/lm_head refused (Unsloth would silently train them in full)",
    "lora.modules_to_save": "get_peft_model(modules_to_save=..., ensure_weight_tying=False as PEFT's default): "
                            "embeddings, lm_head and norms; Unsloth refuses others",
    "lora.use_rslora": "get_peft_model(use_rslora=...)",
    **dict.fromkeys(["train.output_dir", "train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum",
                     "train.global_batch_size", "train.learning_rate", "train.lr_scheduler", "train.warmup_ratio",
                     "train.warmup_steps", "train.weight_decay", "train.optimizer", "train.max_grad_norm",
                     "train.logging_steps", "train.save_steps", "train.save_total_limit", "train.eval_steps",
                     "train.report_to", "train.sample_prompt"], _ARGS),
    "train.seed": "the shared LoRA init (hf.init_lora, after get_peft_model) and the shared training arguments",
    "train.embedding_learning_rate": "the shared parameter groups (hf.trainer_class) on UnslothTrainer",
    "train.gradient_checkpointing": "get_peft_model(use_gradient_checkpointing=...): true is plain recomputation "
                                    "(True), `offload` Unsloth's offloaded one (\"unsloth\", plain below 512 tokens)",
    "train.fsdp": "refused: fastft runs Unsloth in one process (fastft.distributed.check_processes)",
    "model.liger_kernels": "`auto`/false: Unsloth's own Triton kernels do that work; true refused (Liger would "
                           "patch over Unsloth's)",
    "model.upcast_fp32": "false only: Unsloth keeps norms in the compute dtype; true refused",
    "train.fused_loss": "`auto`/true: Unsloth's own fused cross-entropy; false refused (Unsloth always fuses)",
    "data.group_by_length": "UnslothTrainingArguments(train_sampling_strategy=...), the shared training arguments",
}


def make(**options):
    if options:
        raise FastftError(f"--backend unsloth takes no options (got {', '.join(options)}).")
    return UnslothBackend()


class UnslothBackend:
    name = "unsloth"

    def __init__(self):
        self.zeroed_rows: list[int] = []  # embedding rows Unsloth's loader zeroed (load_model)

    def check(self) -> None:
        """Import Unsloth, first in this process. Raises `FastftError` if it or a CUDA GPU is missing."""
        missing = []
        if importlib.util.find_spec("unsloth") is None:
            missing.append("the `unsloth` package is not installed")
        import torch  # torch is fine before Unsloth; transformers, PEFT and TRL are not

        if not torch.cuda.is_available() or torch.version.cuda is None:
            build = "" if torch.version.cuda else f" (this PyTorch {torch.__version__} is built without CUDA)"
            missing.append(f"PyTorch sees no NVIDIA CUDA GPU{build}")
        if missing:
            raise FastftError(
                f"--backend unsloth needs an NVIDIA GPU with CUDA and the Unsloth packages, but {' and '.join(missing)}. "
                f"On an NVIDIA machine, install the CUDA build of torch, then `{INSTALL}`. "
                "On this machine, `--backend hf` trains the same recipe with transformers + PEFT + TRL."
            )
        early = [m for m in ("transformers", "peft", "trl") if m in sys.modules]
        if early and "unsloth" not in sys.modules:
            raise FastftError(
                f"Unsloth must be imported before {', '.join(early)}, which this process has already imported, "
                "so its patches would be missing. Run `fastft run ... --backend unsloth` in a fresh process "
                "(in a script, put `import unsloth` first)."
            )
        from fastft.models import cache_dir

        # Unsloth writes its compiled modules into ./unsloth_compiled_cache (unsloth_zoo/compiler.py)
        # and pings Hugging Face for usage statistics (unsloth/models/_utils.py get_statistics).
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(cache_dir() / "unsloth_compiled_cache"))
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        try:
            import unsloth  # noqa: F401  (patches transformers/PEFT/TRL; must come first)
        except (ImportError, NotImplementedError) as e:
            raise FastftError(
                f"`import unsloth` failed: {str(e).strip().splitlines()[0]} Reinstall with `{INSTALL}` "
                "next to the CUDA build of torch, or use `--backend hf`."
            ) from None

    def load_model(self, recipe, model_path: str):
        """The base model loaded by Unsloth, with LoRA attached. Raises `FastftError` for what Unsloth cannot honour."""
        from transformers import AutoConfig
        from unsloth import FastLanguageModel

        from fastft.backends.hf import init_lora
        from fastft.models import cache_dir

        config = AutoConfig.from_pretrained(model_path, revision=recipe.model.revision or None,
                                            trust_remote_code=recipe.model.trust_remote_code)
        model, unsloth_tokenizer = FastLanguageModel.from_pretrained(**load_arguments(recipe, model_path, config))
        self.zeroed_rows = zeroed_pad_rows(model, unsloth_tokenizer)  # refused by make_trainer if the data uses them
        # Unsloth loads its own tokenizer and may give it a pad token; fastft trains with its own
        # (`load_tokenizer`), so only the model side matters: it must keep its vocabulary.
        rows, vocab = model.get_input_embeddings().weight.shape[0], config.get_text_config().vocab_size
        if rows != vocab:
            raise FastftError(
                f"`model.name` = \"{recipe.model.name}\": Unsloth resized the embeddings from {vocab} to {rows} rows "
                "while repairing the tokenizer's pad token, which changes the model `hf` would train. "
                "Use a tokenizer with a pad (or reserved) token, or `--backend hf`."
            )
        # With "unsloth" checkpointing, trained embeddings get their frozen originals offloaded to
        # torch.save files at join(temporary_location, config._name_or_path) (unsloth/models/_utils.py
        # offload_to_disk): an absolute _name_or_path would put them inside the model folder. Point
        # both at a scratch folder that lives as long as the process (the files are memory-mapped).
        cache_dir().mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="unsloth-offload-", dir=cache_dir())
        atexit.register(shutil.rmtree, scratch, True)
        base_config = model.config
        name, base_config._name_or_path = base_config._name_or_path, "model"
        try:
            model = FastLanguageModel.get_peft_model(model, temporary_location=scratch, **peft_arguments(recipe, model))
        except TypeError as e:
            if not str(e).startswith("Unsloth: Module ="):
                raise
            raise FastftError(f"`lora.modules_to_save` = {recipe.lora.modules_to_save}: {e} Or use `--backend hf`.") from None
        finally:
            base_config._name_or_path = name
        # The adapter is saved by train.save_adapter: PEFT's own save_pretrained behind Unsloth's thin
        # wrapper (unsloth/save.py unsloth_model_save_pretrained), then base_model_name_or_path is set
        # to the recipe's id. unsloth_zoo's fix_lora_auto_mapping also stamps {"unsloth_fixed": true}
        # into the config; stock PEFT writes no auto_mapping for a causal LM, so drop it.
        for peft_config in model.peft_config.values():
            if (peft_config.auto_mapping or {}).get("unsloth_fixed"):
                peft_config.auto_mapping = None
        init_lora(model, recipe.train.seed)  # the same LoRA start as `hf`, whatever Unsloth drew before PEFT
        return model

    def make_trainer(self, recipe, model, tokenizer, train_dataset, eval_dataset, args: dict, callbacks: list):
        from unsloth import UnslothTrainer, UnslothTrainingArguments

        from fastft.backends.hf import keep_trainable_fp32, trainer_class

        # Unsloth's own embedding_learning_rate grouping (unsloth/trainer.py _create_unsloth_optimizer)
        # decays the embeddings and counts any modules_to_save entry (a norm too) as an embedding;
        # `hf` does neither. The shared grouping keeps the optimizer identical on both backends.
        trainer_cls = trainer_class(recipe.train.embedding_learning_rate, base=UnslothTrainer)
        refuse_zeroed_rows_in_data(recipe, self.zeroed_rows, train_dataset, eval_dataset)
        skip_untrained_token_fix(model)
        # Unsloth's trainer sets padding_side = "right" on the tokenizer (unsloth/models/rl.py, the
        # generated __init__). fastft's collator pads on the right whatever the tokenizer says, so
        # only the saved tokenizer would change: keep the one `hf` saves.
        padding_side = tokenizer.padding_side
        trainer = trainer_cls(
            model=model, args=UnslothTrainingArguments(**args), train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=tokenizer, data_collator=data_collator(recipe, tokenizer),
            callbacks=callbacks,
        )
        tokenizer.padding_side = padding_side
        keep_trainable_fp32(trainer.model)  # as on `hf`: TRL casts them to bf16 on a 4-bit base
        if recipe.data.packing:
            # A custom collator makes Unsloth skip its own padding-free setup (trainer.py
            # _patch_sft_trainer_auto_packing: `blocked`). This adds what it would: each batch's
            # `packed_seq_lengths`, which Unsloth's attention reads as the example boundaries
            # (ids and labels unchanged), and leave to exceed max_seq_length in one packed row.
            from unsloth.utils import enable_padding_free_metadata

            enable_padding_free_metadata(trainer.model, trainer)
        return trainer


IGNORED_NAMES = "UNSLOTH_IGNORED_TOKENIZER_NAMES"


def skip_untrained_token_fix(model) -> None:
    """Keep UnslothTrainer from rewriting the embedding rows it takes for untrained, as `hf` never does.

    Its generated __init__ runs unsloth_zoo's fix_untrained_tokens (unsloth/models/rl_replacements.py
    sft_trainer_fix_untrained_tokens): when the data uses a token whose embedding and LM-head rows
    look untrained (Llama-3 base's `<|start_header_id|>`...), it raises ValueError if they are
    frozen and resets them to the mean if they are trained. It skips a model whose
    `config._name_or_path` is listed, case-insensitively, in UNSLOTH_IGNORED_TOKENIZER_NAMES (one
    name a line), read when the trainer is built. `import unsloth` overwrites that variable
    (unsloth/tokenizer_utils.py), so this adds the model's name to it afterwards, just before.
    """
    name = model.config._name_or_path
    names = [n for n in os.environ.get(IGNORED_NAMES, "").split("\n") if n]
    if name.lower() not in {n.lower() for n in names}:
        os.environ[IGNORED_NAMES] = "\n".join([*names, name])


def zeroed_pad_rows(model, unsloth_tokenizer) -> list[int]:
    """The input-embedding rows Unsloth's loader has zeroed: its tokenizer's pad token, on untied models.

    unsloth/tokenizer_utils.py zero_pad_embedding_rows zeroes row `pad_token_id` of every
    `nn.Embedding` whose padding_idx it is, unless the pad is an EOS or an id the tokenizer adds
    to every input, or the embedding is tied to the LM head. `hf` keeps the row.
    """
    import torch

    pad = getattr(unsloth_tokenizer, "pad_token_id", None)
    if not isinstance(pad, int):
        return []
    head = getattr(model.get_output_embeddings(), "weight", None)
    for module in model.modules():
        if (type(module) is torch.nn.Embedding and module.padding_idx == pad and pad < module.weight.shape[0]
                and (head is None or module.weight.data_ptr() != head.data_ptr())
                and not module.weight[pad].any()):
            return [pad]
    return []


def refuse_zeroed_rows_in_data(recipe, rows: list[int], *datasets) -> None:
    """Raise `FastftError` if an example uses a token whose embedding row Unsloth zeroed (`zeroed_pad_rows`)."""
    if not rows:
        return
    for dataset in datasets:
        for number, ids in enumerate(dataset["input_ids"] if dataset is not None else []):
            used = sorted(set(rows).intersection(ids))
            if used:
                raise FastftError(
                    f"`model.name` = \"{recipe.model.name}\": Unsloth zeroes the input embedding of this model's pad "
                    f"token (id {used[0]}) because the model does not tie it to the LM head, and example {number + 1} "
                    "of the data uses that token, so `unsloth` would train on a different model from `hf`. "
                    "Use `--backend hf`, or data without that token."
                )


def data_collator(recipe, tokenizer):
    """The collator this backend hands to the trainer: the shared one, as `hf` uses.

    Unsloth's fast Llama path also derives example boundaries from the position ids of a
    padding-free row (llama.py LlamaModel_fast_forward), so packed examples never attend to
    each other either way.
    """
    from fastft.batching import make_collator

    return make_collator(tokenizer, recipe.data.packing)


def load_arguments(recipe, model_path: str, config) -> dict:
    """Keyword arguments for `FastLanguageModel.from_pretrained`. Raises `FastftError` for what Unsloth cannot honour."""
    from fastft.backends.hf import compute_dtype

    for key, value, allowed in (("model.liger_kernels", recipe.model.liger_kernels, ("auto", False)),
                                ("model.upcast_fp32", recipe.model.upcast_fp32, (False,)),
                                ("train.fused_loss", recipe.train.fused_loss, ("auto", True))):
        if value not in allowed:
            raise FastftError(f"`{key}` = {str(value).lower()}: {OPTIONS[key]}. Remove it, or use `--backend hf`.")
    if recipe.model.dtype == "fp32":
        raise FastftError(
            "`model.dtype` = \"fp32\": Unsloth's trainer would train in bf16 anyway (it turns bf16 autocast on when "
            "bf16 and fp16 are both off) and without its fused LoRA kernels (16-bit weights only). Set it to \"auto\", "
            "\"bf16\" or \"fp16\", or use `--backend hf` for fp32 training."
        )
    if recipe.model.attention != "auto":
        raise FastftError(
            f"`model.attention` = \"{recipe.model.attention}\": Unsloth chooses its own attention kernel "
            "(FlashAttention-2, xformers or SDPA) and ignores this choice. Set it to \"auto\", or use `--backend hf`."
        )
    context = config.get_text_config().max_position_embeddings
    if recipe.data.max_length > context:
        raise FastftError(
            f"`data.max_length` = {recipe.data.max_length} is longer than the {context} positions of "
            f"{recipe.model.name}; Unsloth would stretch its RoPE to fit, which changes the model. "
            f"Lower `data.max_length` to {context} or less."
        )
    four_bit = recipe.model.quantization != "16bit"  # as in `hf`: 4-bit unless 16-bit is asked for
    return dict(
        model_name=model_path, max_seq_length=recipe.data.max_length, dtype=compute_dtype(recipe),
        load_in_4bit=four_bit, load_in_16bit=not four_bit, revision=recipe.model.revision or None,
        trust_remote_code=recipe.model.trust_remote_code, use_exact_model_name=True,
        fix_tokenizer=False,  # its tokenizer is not the one fastft trains with
    )


def peft_arguments(recipe, model) -> dict:
    """Keyword arguments for `FastLanguageModel.get_peft_model`. Raises `FastftError` for LoRA on embeddings."""
    lora = recipe.lora
    targets = all_linear_modules(model) if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    on_embeddings = [t for t in targets if t.rsplit(".", 1)[-1] in EMBEDDINGS]
    if on_embeddings:
        raise FastftError(
            f"`lora.target_modules` includes {', '.join(on_embeddings)}: Unsloth trains embeddings and lm_head "
            "only in full. Move them to `lora.modules_to_save`, or use `--backend hf` for LoRA on them."
        )
    return dict(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none",
        use_rslora=lora.use_rslora, modules_to_save=list(lora.modules_to_save) or None,
        ensure_weight_tying=False,  # PEFT's default, so a tied model's saved modules train as in `hf`
        init_lora_weights=True, random_state=recipe.train.seed,
        use_gradient_checkpointing=checkpointing(recipe.train.gradient_checkpointing),
    )


def checkpointing(value):
    """Unsloth's `use_gradient_checkpointing` for `train.gradient_checkpointing`.

    True is plain recomputation, as `on` is on `hf`. "unsloth" adds the asynchronous offload of
    each layer's saved input to CPU memory (what `offload` asks for, and Unsloth's default); Unsloth
    itself makes it plain recomputation when `data.max_length` is below 512 tokens
    (models/_utils.py apply_unsloth_gradient_checkpointing), as the planner knows.
    """
    if value is False:
        return False
    return "unsloth" if value == "offload" else True


def all_linear_modules(model) -> list[str]:
    """The leaf names of the layers PEFT's "all-linear" selects in `model` (what `hf` adapts).

    Unsloth's fast LoRA path wants explicit names, so PEFT's own rule resolves them.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    resolved = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM"), model)
    return sorted({name.rsplit(".", 1)[-1] for name in resolved.target_modules})
