"""The `hf` backend: transformers + bitsandbytes + PEFT + TRL's SFTTrainer.

Two flavours share this file:
- the default fast path, each piece a recipe switch (`fast_path`): norms stay in the compute
  dtype (`model.upcast_fp32`), non-reentrant gradient checkpointing
  (`train.gradient_checkpointing`), TRL's fused LM head with no full logits
  (`train.fused_loss`), Liger's fused RMSNorm/RoPE/SwiGLU kernels where installed on a GPU
  (`model.liger_kernels`), SDPA or FlashAttention-2 (`model.attention`);
- `stock=True` (the `hf-stock` bench row): what the seed scripts did whatever the recipe
  says, i.e. `prepare_model_for_kbit_training` (fp32 norms, embeddings and head, reentrant
  checkpointing), SDPA, full logits, no fused kernels. It exists to measure against.
"""

from __future__ import annotations

import importlib.util

import torch

from fastft.errors import FastftError


def make(stock: bool = False):
    return HFBackend(stock=stock)


def compute_dtype(recipe) -> torch.dtype:
    """The recipe's compute dtype, with `auto` resolved for this machine."""
    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if recipe.model.dtype != "auto":
        return named[recipe.model.dtype]
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def nf4_config(dtype: torch.dtype):
    """QLoRA's 4-bit storage: NF4 with double quantisation, computing in `dtype`.

    Stored in `dtype` too, so FSDP can shard the packed weights like any other tensor.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def lora_config(recipe):
    """PEFT's LoraConfig for the recipe (shared with the merge/export code)."""
    from peft import LoraConfig

    targets = recipe.lora.target_modules
    return LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=recipe.lora.modules_to_save or None,
        use_rslora=recipe.lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def fast_path(recipe, stock: bool = False) -> dict:
    """The speed switches a load with this recipe uses on this machine, `auto` resolved.

    `stock` is the seed scripts' path whatever the recipe says. Raises `FastftError` when the
    recipe insists (`true`) on a piece that cannot run here.
    """
    if stock:
        return dict(attention="sdpa", liger_kernels=False, fused_loss=False,
                    upcast_fp32=recipe.model.quantization != "16bit", checkpointing=_checkpointing(recipe, True))
    gpu = torch.cuda.is_available()
    liger = recipe.model.liger_kernels
    if liger is True and not (gpu and importlib.util.find_spec("liger_kernel")):
        raise FastftError("`model.liger_kernels = true` needs an NVIDIA GPU and the liger-kernel package "
                          "(`pip install -e \".[fast]\"`); here " + ("it is not installed" if gpu else "there is no GPU")
                          + ". Set it to \"auto\" to use them only where they run.")
    fused = recipe.train.fused_loss
    if fused is True and not _fused_loss_available():
        raise FastftError("`train.fused_loss = true` needs a CUDA or XPU GPU with Triton (TRL's chunked LM head is a "
                          "Triton kernel); there is none here. Set it to \"auto\" to use it only where it runs.")
    return dict(
        attention=_attention(recipe),
        liger_kernels=bool(liger) and gpu and importlib.util.find_spec("liger_kernel") is not None,
        fused_loss=bool(fused) and _fused_loss_available(),
        upcast_fp32=recipe.model.upcast_fp32 and recipe.model.quantization != "16bit",
        checkpointing=_checkpointing(recipe, False),
    )


def _checkpointing(recipe, stock: bool) -> str:
    """`off`, `reentrant` or `non-reentrant`."""
    if recipe.train.gradient_checkpointing is False:
        return "off"
    return "reentrant" if stock or recipe.train.gradient_checkpointing == "reentrant" else "non-reentrant"


def _fused_loss_available() -> bool:
    if not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())):
        return False
    from trl.trainer import utils

    return utils._ChunkedLogProbFunction is not None  # None where Triton is missing


class HFBackend:
    def __init__(self, stock: bool = False):
        self.stock = stock
        self.name = "hf-stock" if stock else "hf"

    def check(self) -> None:
        pass  # runs wherever torch does; 4-bit needs bitsandbytes, a hard dependency

    def load_model(self, recipe, model_path: str):
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM

        fast = fast_path(recipe, self.stock)
        dtype = compute_dtype(recipe)
        kwargs = dict(dtype=dtype, attn_implementation=fast["attention"], revision=recipe.model.revision or None,
                      trust_remote_code=recipe.model.trust_remote_code)
        if recipe.model.quantization != "16bit":
            kwargs["quantization_config"] = nf4_config(dtype)
        if torch.cuda.is_available():
            from accelerate import PartialState

            kwargs["device_map"] = {"": PartialState().local_process_index}  # one full model per rank
        if fast["liger_kernels"]:
            _apply_liger(model_path, recipe)
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        if self.stock and _has_liger_modules(model):
            raise FastftError("The hf-stock baseline was loaded in a process where Liger kernels were already applied "
                              "(they patch transformers for the whole process), so it would not be the seeds' path. "
                              "Run hf-stock in its own process, or before the hf backend.")
        # Without a KV cache the mask code reads packed rows from the position ids; with one it
        # ignores them and lets packed examples attend to each other. Training never needs the cache.
        model.config.use_cache = False
        checkpointing = fast["checkpointing"] != "off"
        reentrant = {"use_reentrant": fast["checkpointing"] == "reentrant"}
        if fast["upcast_fp32"]:
            # The seed scripts' path: every float weight 4-bit left alone (norms, embeddings, head) in fp32.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                    gradient_checkpointing_kwargs=reentrant)
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=reentrant)
            model.enable_input_require_grads()  # reentrant checkpointing only backpropagates into inputs needing grads
        model = get_peft_model(model, lora_config(recipe))
        init_lora(model, recipe.train.seed)  # the same LoRA start on every backend
        return model

    def make_trainer(self, recipe, model, tokenizer, train_dataset, eval_dataset, args: dict, callbacks: list):
        from trl import SFTConfig

        from fastft.batching import make_collator

        fast = fast_path(recipe, self.stock)
        config = SFTConfig(**args)
        trainer_cls = trainer_class(recipe.train.embedding_learning_rate, full_logits=not fast["fused_loss"])
        trainer = trainer_cls(
            model=model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=tokenizer, data_collator=make_collator(tokenizer, recipe.data.packing),
            callbacks=callbacks,
        )
        keep_trainable_fp32(trainer.model)
        return trainer


def init_lora(model, seed: int) -> None:
    """Give every LoRA adapter of `model` its starting weights from `seed` and the module names alone.

    PEFT draws lora_A from torch's global random state, so whatever draws random numbers between
    seeding and attaching shifts every A matrix (Unsloth's `get_peft_model` seeds, then builds a
    throwaway `nn.Linear` before PEFT runs). Both backends call this right after attaching: the
    adapters are visited in sorted name order and redrawn from one CPU generator with PEFT's own
    rule (`reset_lora_parameters`, `init_lora_weights=True`): A kaiming-uniform (a = sqrt(5)),
    B zero, so the adapted model starts exactly as the base model. Scaling (alpha, rsLoRA) is
    untouched. LoRA on embeddings (hf only) follows PEFT's rule for them: A zero, B normal.
    """
    import math

    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(seed)

    def drawn(weight, draw):
        values = torch.empty(weight.shape, dtype=torch.float32)  # on the CPU: the same numbers on any device
        draw(values)
        return values.to(device=weight.device, dtype=weight.dtype)

    layers = sorted(((name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)), key=lambda x: x[0])
    with torch.no_grad():
        for _, layer in layers:
            for adapter in sorted(layer.lora_A):
                a = layer.lora_A[adapter].weight
                a.copy_(drawn(a, lambda t: torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)))
                layer.lora_B[adapter].weight.zero_()
                if getattr(layer.lora_B[adapter], "bias", None) is not None:
                    layer.lora_B[adapter].bias.zero_()
            for adapter in sorted(layer.lora_embedding_A):
                layer.lora_embedding_A[adapter].zero_()
                b = layer.lora_embedding_B[adapter]
                b.copy_(drawn(b, lambda t: torch.nn.init.normal_(t, generator=generator)))


def keep_trainable_fp32(model) -> None:
    """Undo TRL's cast of a quantised model's trainable weights to bf16.

    Trained weights stay fp32 (as PEFT makes them; autocast still computes in bf16): a small
    learning rate's updates (e.g. 5e-6 on embeddings) fall below bf16's resolution and would
    be lost, and fp32 compute (CPU) needs fp32 weights.
    """
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _attention(recipe) -> str:
    if recipe.model.attention != "auto":
        if recipe.model.attention == "flash_attention_2" and not importlib.util.find_spec("flash_attn"):
            raise FastftError("`model.attention = \"flash_attention_2\"` needs the flash-attn package "
                              "(`pip install flash-attn`); or use \"sdpa\".")
        return recipe.model.attention
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def _apply_liger(model_path: str, recipe) -> None:
    """Liger's fused Triton kernels for norms, RoPE and SwiGLU (NVIDIA GPU), patched into transformers.

    The patch is process-wide and cannot be undone: every model loaded afterwards gets it.
    """
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel
    from transformers import AutoConfig

    # Cross-entropy is left to TRL's fused LM head (`train.fused_loss`), which already avoids full logits.
    model_type = AutoConfig.from_pretrained(model_path, revision=recipe.model.revision or None,
                                            trust_remote_code=recipe.model.trust_remote_code).model_type
    _apply_liger_kernel(model_type, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                        fused_linear_cross_entropy=False)


def _has_liger_modules(model) -> bool:
    return any(type(m).__module__.startswith("liger_kernel") for m in model.modules())


def trainer_class(embedding_lr: float = 0.0, full_logits: bool = False, base=None):
    """TRL's SFTTrainer (or `base`), adjusted where fastft needs it.

    - TRL's fused LM head (chunked log-probs, no full logits) is a Triton kernel for CUDA/XPU;
      elsewhere, and for the stock baseline (`full_logits`), the model computes its own loss.
    - With `embedding_lr`, trained embeddings get their own parameter group and learning rate.
    - Each epoch's data order is a function of (seed, epoch) alone (`fastft.batching.EpochOrder`),
      so `--resume` continues any epoch with the order the uninterrupted run had. Length grouping
      (training and evaluation) reads the lengths from the prepared data's `length` column in one go.
    """
    from transformers import Trainer

    if base is None:
        from trl import SFTTrainer as base

    class FastftTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if full_logits or inputs["input_ids"].device.type not in ("cuda", "xpu"):
                inputs = dict(inputs, use_cache=False)  # a cache would hide packed rows from the mask code
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _get_train_sampler(self, train_dataset=None):
            from fastft.batching import EpochOrder

            dataset = self.train_dataset if train_dataset is None else train_dataset
            strategy = self.args.train_sampling_strategy
            if strategy not in ("random", "group_by_length"):
                return super()._get_train_sampler(train_dataset)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            lengths = lengths_of(dataset, self.train_dataset) if strategy == "group_by_length" else None
            # Grouped over the examples of one optimizer step on all processes (the Trainer groups per
            # process), so N processes see the batches one process sees with the same global batch.
            step = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            self.epoch_order = EpochOrder(len(dataset), seed, lengths, group_size=step if lengths else 0)
            return self.epoch_order

        def _get_eval_sampler(self, eval_dataset):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            if self.args.train_sampling_strategy != "group_by_length" or eval_dataset is None:
                return super()._get_eval_sampler(eval_dataset)
            # The Trainer's own, with the lengths read as for training rather than row by row
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(self.args.eval_batch_size, lengths=lengths_of(eval_dataset, self.eval_dataset),
                                        generator=torch.Generator().manual_seed(seed))

        def _run_epoch(self, *args, **kwargs):
            # The Trainer passes the epoch on through the dataloader's set_epoch, which does not reach
            # the sampler when several processes resume mid-epoch (accelerate's skip and shard wrappers).
            if getattr(self, "epoch_order", None) is not None:
                self.epoch_order.set_epoch(kwargs["epoch"])
            return super()._run_epoch(*args, **kwargs)

        def create_optimizer(self, model=None):
            if not embedding_lr or self.optimizer is not None:
                return super().create_optimizer(model)
            model = model or self.model
            embed, rest = [], []
            for name, p in model.named_parameters():
                if p.requires_grad:
                    is_embedding = ("embed_tokens" in name or "lm_head" in name) and "lora_" not in name
                    (embed if is_embedding else rest).append(p)
            opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            groups = [{"params": rest, "weight_decay": self.args.weight_decay},
                      {"params": embed, "weight_decay": 0.0, "lr": embedding_lr}]
            self.optimizer = opt_cls([g for g in groups if g["params"]], **opt_kwargs)
            return self.optimizer

    return FastftTrainer


def lengths_of(dataset, given) -> list[int]:
    """Each example's length: the `length` column of `dataset`, or of `given` (the dataset the trainer was
    handed), read in one go.

    The Trainer drops the columns the model does not take, `length` among them, before it asks
    for a sampler; reading the examples' tokens row by row instead took 3.5 s per 200,000 examples
    before the first step. Row counts are checked: the column must describe these very examples.
    """
    import datasets

    for source in (dataset, given):
        if isinstance(source, datasets.Dataset) and "length" in source.column_names and len(source) == len(dataset):
            return source.select_columns(["length"]).with_format("arrow")[:]["length"].to_pylist()
    return [len(x) for x in dataset["input_ids"]]
