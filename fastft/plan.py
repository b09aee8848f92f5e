"""The memory planner: the fastest training setup that fits the GPU, chosen before the model loads.

A setup is a micro-batch size (with gradient accumulation keeping the global batch fixed),
a gradient-checkpointing mode (`off`, `on`, `offload`) and a base precision (`4bit`,
`16bit`). For each one, `estimate` predicts the peak GPU memory from the model's shapes,
component by component, and `relative_speed` its throughput relative to the others.
`make_plan` keeps the setups the recipe allows, marks those that fit with a safety margin
and picks the fastest. `fastft plan` prints the table; `fastft run` applies the choice to
the recipe's `"auto"` settings (`plan_for_run`) and, on an out-of-memory error in the first
steps, retries with the next setup down (`train_with_fallback`).

What is measured and what is not: the constants marked FITTED below were set so that the
model reproduces peak *allocated* memory and throughput measured on one H100
(`benchmarks/memory_calibration.json`); everything else follows from counting bytes. The
plan compares peak *reserved* memory (what the caching allocator holds, what nvidia-smi
shows) with the free memory, taking reserved = allocated x RESERVED_PER_ALLOCATED, an
allowance not yet measured.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.util
import json
from dataclasses import dataclass, field

from fastft.errors import FastftError
from fastft.train import is_out_of_memory

GIB = 2**30

# --- base weights
# NF4 with double quantisation (bitsandbytes): 4 bits per weight, one 8-bit absmax per block of
# 64 weights, one fp32 absmax per 256 of those blocks. Only linear layers inside the blocks are
# quantised; embeddings, the LM head and norms stay in the compute dtype.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

# --- trainable weights
# PEFT upcasts LoRA weights to fp32 (`autocast_adapter_dtype`), so each has an fp32 gradient, and
# mixed-precision autocast caches a 16-bit copy of each during the forward pass.
LORA_BYTES_PER_PARAM = 4 + 4 + 2
ADAM_STATES = 2  # exp_avg and exp_avg_sq, in the parameter's dtype (1 byte each for the 8-bit optimizers)
EIGHT_BIT_OPTIMIZERS = {"adamw_8bit", "paged_adamw_8bit"}

# --- activations
# Tensors kept for the backward pass per token and per decoder block, in elements of the compute
# dtype, as multiples of (hidden, q width, kv width, MLP width), counted from what each
# implementation saves:
#   unsloth: norm inputs (2 h), normed inputs to the fused QKV and MLP LoRA kernels (2 h),
#            q/k/v (q + 2 kv), attention output and its contiguous copy for o_proj (2 q), and
#            the MLP's gate and up outputs (2 I); Unsloth recomputes silu(gate) * up in backward.
#   hf:      the same with Liger's RMSNorm and SwiGLU, plus the SwiGLU output that PEFT's
#            down_proj LoRA keeps as its input (3 I).
#   hf-nokernels: without Liger, each RMSNorm also keeps an fp32 copy of its input (+2 h each)
#            and the MLP keeps gate, silu(gate), up and their product (4 I).
#   hf-stock: `prepare_model_for_kbit_training` upcasts norms to fp32, so their outputs and
#            the tensors they keep are fp32 too (about +4 h more).
ACTIVATION_ELEMENTS = {
    "unsloth": (4, 3, 2, 2),
    "hf": (4, 3, 2, 3),
    "hf-nokernels": (8, 3, 2, 4),
    "hf-stock": (12, 3, 2, 4),
}

# --- loss
# Full logits (the stock path: the model's own loss): bf16 logits (2 bytes), their fp32 upcast (4),
# the log-softmax output kept for backward (4) and its fp32 gradient (4), per token and vocabulary
# entry. FITTED: 14 reproduces the stock 1B point (the derivation above gives 14 exactly; 16 with the
# bf16 gradient of the logits would overshoot it by 7%).
FULL_LOGITS_BYTES = 14
# TRL's fused LM head (the hf backend on CUDA) projects [4096 tokens x 32768 vocab] tiles and keeps
# an fp32 gradient for the hidden states (trl/kernels/chunked_logprob.py).
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768
# Unsloth's fused cross-entropy works in chunks of its own; FITTED to the Unsloth 1B point with
# checkpointing (the only free term there): the residual is about the same at 1B and 8B.
UNSLOTH_LOSS_GIB = 0.30

# --- reserved vs allocated, and the budget
RESERVED_PER_ALLOCATED = 1.10  # caching-allocator rounding and fragmentation: NOT YET MEASURED
CUDA_CONTEXT_GIB = 0.5  # CUDA context and kernel images, outside torch's counters (with --gpu-memory)
SAFETY_MARGIN = 0.10  # of the memory available: kept free for what the model does not count
DEFAULT_GPU_GIB = 24.0  # `fastft plan` on a machine without a GPU and without --gpu-memory

# --- speed, relative
# Checkpointing recomputes the forward pass; with the base frozen there are no weight gradients,
# so the backward costs about one forward and recomputing adds ~50% (speed x 0.67). FITTED: 0.68,
# the mean of the measured 0.70 (1B) and 0.67 (8B) of Unsloth's offloaded checkpointing vs off.
OFFLOAD_SPEED = 0.68
CHECKPOINT_SPEED = OFFLOAD_SPEED / 0.98  # the same recompute without the CPU copies: assumed 2% faster, not measured
# Dequantising NF4 weights costs time a 16-bit base does not. FITTED: 1 / 0.93 = 1.075, the mean of
# the measured 16-bit speed-ups 1.11 (1B) and 1.04 (8B).
NF4_SPEED = 0.93
# Small micro-batches leave the GPU underused: speed ~ tokens / (tokens + SATURATION_TOKENS) per
# micro-batch. An assumption, not measured.
SATURATION_TOKENS = 256

FALLBACK_STEPS = 10  # an out-of-memory error within this many steps falls back to the next setup down


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that decide its memory (Llama-style blocks)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    def linears(self) -> dict[str, tuple[int, int]]:
        """The linear layers of one block: name -> (in features, out features)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params


def shape_from_config(config: dict) -> Shape:
    """A `Shape` from a model's config.json values. Raises `FastftError` for configs without Llama-style sizes."""
    config = config.get("text_config") or config
    try:
        heads = config["num_attention_heads"]
        return Shape(
            layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate=config["intermediate_size"], vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError) as e:
        raise FastftError(
            f"the memory planner reads Llama-style configs (hidden_size, num_hidden_layers, num_attention_heads, "
            f"intermediate_size, vocab_size); this model's config lacks {e}. Set train.batch_size, "
            "train.gradient_checkpointing and model.quantization explicitly instead of \"auto\"."
        ) from None


def model_shape(model_cfg) -> Shape:
    """The shape of the recipe's model, read without loading weights (built-in shapes are not even built).

    Raises `FastftError` when a Hub model's config.json is not available here.
    """
    from fastft.models import ARCHITECTURES, SPECIAL_TOKENS, TINY, cache_dir, is_builtin

    if is_builtin(model_cfg.name):
        arch = "tiny" if model_cfg.name == TINY else model_cfg.name.removeprefix("random:")
        built = cache_dir() / "models" / arch / "config.json"
        if built.exists():
            return shape_from_config(json.loads(built.read_text()))
        if arch not in ARCHITECTURES:
            from fastft.models import resolve_model

            resolve_model(model_cfg.name)  # raises the error listing the built-in models
        config = dict(ARCHITECTURES[arch])
        if config["vocab_size"] is None:  # the tiny model's byte-level tokenizer: 256 bytes + special tokens
            config["vocab_size"] = 256 + len(SPECIAL_TOKENS)
        return shape_from_config(config)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_cfg.name, revision=model_cfg.revision or None,
                                            trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise FastftError(
            f"`model.name` = \"{model_cfg.name}\": the planner needs its config.json and could not read it "
            f"({str(e).splitlines()[0]}). Without network, plan with a built-in model of the same shape, "
            "e.g. --set model.name=random:llama-3.1-8b."
        ) from None
    return shape_from_config(config.to_dict())


# --------------------------------------------------------------------------- the memory model


@dataclass(frozen=True)
class Job:
    """What is fixed while the planner varies the setup: the model, the backend, the work per example."""

    shape: Shape
    backend: str  # a key of ACTIVATION_ELEMENTS: unsloth, hf, hf-nokernels, hf-stock
    seq_len: int  # tokens per example (the longest)
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("all-linear",)
    trained_modules: tuple[str, ...] = ()  # lora.modules_to_save (embed_tokens, lm_head)
    optimizer: str = "adamw_torch"
    elem_bytes: int = 2  # compute dtype: 2 for bf16/fp16, 4 for fp32
    eager_attention: bool = False

    @property
    def lora_params(self) -> int:
        targets = self.lora_targets
        linears = self.shape.linears()
        chosen = linears if "all-linear" in targets else {k: v for k, v in linears.items() if k in targets}
        return self.shape.layers * sum(self.lora_r * (a + b) for a, b in chosen.values())


@dataclass(frozen=True)
class Setup:
    """One candidate: how the global batch is split, how activations are kept, how the base is stored."""

    micro_batch: int
    grad_accum: int
    checkpointing: str  # off | on | offload
    quantization: str  # 4bit | 16bit

    def describe(self) -> str:
        return (f"micro-batch {self.micro_batch} x {self.grad_accum} accumulation, "
                f"checkpointing {self.checkpointing}, {self.quantization} base")


def estimate(job: Job, setup: Setup) -> dict[str, float]:
    """Predicted peak allocated GPU memory in bytes, per component (their sum is the total)."""
    s, e = job.shape, job.elem_bytes
    stock = job.backend == "hf-stock"
    tokens = setup.micro_batch * job.seq_len
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim

    # Frozen base. The stock path's prepare_model_for_kbit_training upcasts every weight it does not
    # quantise to fp32.
    if setup.quantization == "4bit":
        weights = s.linear_params * NF4_BYTES_PER_PARAM + (s.embedding_params + s.norm_params) * (4 if stock else e)
    else:
        weights = s.params * e

    # Trainable weights, their gradients and optimizer states. Fully trained modules
    # (modules_to_save) are copies in the compute dtype with optimizer states of that dtype.
    state_bytes = 1 if job.optimizer in EIGHT_BIT_OPTIMIZERS else None
    trainable = job.lora_params * (LORA_BYTES_PER_PARAM + ADAM_STATES * (state_bytes or 4))
    full = sum(s.vocab * s.hidden for m in job.trained_modules if m in ("embed_tokens", "lm_head"))
    trainable += full * (e + e + ADAM_STATES * (state_bytes or e))

    # Activations kept for backward. Off: every block's. On: the block boundaries (the residual
    # stream, fp32 in the stock path) plus one block recomputed at a time. Offload: boundaries go to
    # CPU memory; one is in flight each way.
    a_h, a_q, a_kv, a_i = ACTIVATION_ELEMENTS[job.backend]
    block = tokens * e * (a_h * s.hidden + a_q * q + a_kv * kv + a_i * s.intermediate)
    if job.eager_attention:  # eager attention materialises scores and probabilities per head
        block += setup.micro_batch * s.heads * job.seq_len**2 * e * 2
    boundary = tokens * s.hidden * (4 if stock else e)
    if setup.checkpointing == "off":
        activations = s.layers * block
    elif setup.checkpointing == "on":
        activations = s.layers * boundary + block
    else:
        activations = 2 * boundary + block

    # The loss: full logits, TRL's tiles, or Unsloth's chunks.
    if stock:
        loss = tokens * s.vocab * FULL_LOGITS_BYTES
    elif job.backend == "unsloth":
        loss = UNSLOTH_LOSS_GIB * GIB
    else:
        loss = min(tokens, TRL_TOKEN_TILE) * min(s.vocab, TRL_VOCAB_TILE) * e + tokens * s.hidden * (4 + e)

    # Backward workspace: gradients flowing through the block being differentiated (hidden-sized and
    # MLP-sized), and for a 4-bit base one weight dequantised at a time for the input gradient.
    workspace = tokens * (2 * s.hidden + 2 * s.intermediate) * e
    if setup.quantization == "4bit":
        workspace += max(a * b for a, b in s.linears().values()) * e

    return {"weights": weights, "trainable": trainable, "activations": activations, "loss": loss,
            "workspace": workspace}


def relative_speed(job: Job, setup: Setup) -> float:
    """Throughput (tokens/s) relative to an ideal 16-bit run without checkpointing: comparable within one job."""
    tokens = setup.micro_batch * job.seq_len
    speed = tokens / (tokens + SATURATION_TOKENS)
    speed *= {"off": 1.0, "on": CHECKPOINT_SPEED, "offload": OFFLOAD_SPEED}[setup.checkpointing]
    if setup.quantization == "4bit":
        speed *= NF4_SPEED
    return speed


@dataclass
class Candidate:
    setup: Setup
    parts: dict[str, float]  # bytes per component (empty where nothing was estimated: CPU)
    speed: float

    @property
    def allocated_gib(self) -> float:
        return sum(self.parts.values()) / GIB

    @property
    def reserved_gib(self) -> float:
        return self.allocated_gib * RESERVED_PER_ALLOCATED


# --------------------------------------------------------------------------- the plan


CHECKPOINT_MODES = {"unsloth": ("off", "on", "offload"), "hf": ("off", "on"), "hf-stock": ("off", "on")}


@dataclass
class Plan:
    """The candidates a recipe allows on one GPU budget, the one chosen, and what to do otherwise."""

    job: Job | None
    global_batch: int  # examples per optimizer step on this process
    usable_gib: float | None  # None: no GPU, nothing to fit
    budget_note: str
    seq_note: str
    candidates: list[Candidate]  # allowed by the recipe, fastest first
    chosen: Candidate | None
    fixed: list[str]  # the recipe settings that constrained the candidates
    proposal: Candidate | None = None  # faster and fits, but needs a recipe change
    proposal_changes: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    fallbacks: list[dict] = field(default_factory=list)  # what train_with_fallback went through

    def fits(self, c: Candidate) -> bool:
        return self.usable_gib is None or c.reserved_gib <= self.usable_gib

    def next_down(self, failed: Candidate) -> Candidate | None:
        """The fastest allowed candidate predicted to need less memory than `failed`."""
        smaller = [c for c in self.candidates if c.reserved_gib < failed.reserved_gib]
        return smaller[0] if smaller else None

    def summary(self) -> dict:
        """What fastft.json records."""
        def one(c):
            return None if c is None else {
                "micro_batch": c.setup.micro_batch, "grad_accum": c.setup.grad_accum,
                "gradient_checkpointing": c.setup.checkpointing, "quantization": c.setup.quantization,
                "predicted_peak_allocated_gib": round(c.allocated_gib, 2) if c.parts else None,
                "predicted_peak_reserved_gib": round(c.reserved_gib, 2) if c.parts else None,
                "relative_speed": round(c.speed, 3)}
        usable = None if self.usable_gib is None else round(self.usable_gib, 2)
        return {"chosen": one(self.chosen), "usable_gib": usable,
                "budget": self.budget_note, "sequence": self.seq_note, "global_batch": self.global_batch,
                "fixed_by_recipe": self.fixed, "proposal": self.proposal_changes, "fallbacks": self.fallbacks}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def recipe_setting(setup_mode: str):
    """The `train.gradient_checkpointing` value that runs a planner mode."""
    return {"off": False, "on": True, "offload": "offload"}[setup_mode]


def _recipe_mode(value, backend: str) -> str:
    """The planner mode of a fixed `train.gradient_checkpointing` value (hf has no offloaded checkpointing)."""
    if value is False:
        return "off"
    return "offload" if value == "offload" and "offload" in CHECKPOINT_MODES.get(backend, ()) else "on"


def job_for(recipe, backend: str, seq_len: int) -> Job:
    """The memory model's view of a recipe on a backend (a GPU is assumed: compute in 16 bits unless fp32)."""
    flavour = backend if backend in ACTIVATION_ELEMENTS else "hf-nokernels"  # a backend without its own model
    if backend == "hf" and not importlib.util.find_spec("liger_kernel"):
        flavour = "hf-nokernels"
    return Job(shape=model_shape(recipe.model), backend=flavour, seq_len=seq_len, lora_r=recipe.lora.r,
               lora_targets=tuple(recipe.lora.target_modules), trained_modules=tuple(recipe.lora.modules_to_save),
               optimizer=recipe.train.optimizer, elem_bytes=4 if recipe.model.dtype == "fp32" else 2,
               eager_attention=recipe.model.attention == "eager")


def per_process_batch(recipe) -> int:
    """Examples per optimizer step on this process. Raises `FastftError` if it does not divide among processes."""
    from fastft.train import world_size

    t = recipe.train
    total = t.global_batch_size if t.batch_size == "auto" else t.batch_size * t.grad_accum * world_size()
    if total % world_size():
        raise FastftError(f"{recipe.source}: `train.global_batch_size` = {total} does not divide among "
                          f"{world_size()} processes; make it a multiple of {world_size()}.")
    return total // world_size()


def make_plan(recipe, backend: str, usable_gib: float | None, budget_note: str, seq_len: int, seq_note: str) -> Plan:
    """Estimate every setup of the recipe's global batch; choose the fastest allowed one that fits `usable_gib`.

    Raises `FastftError` if the model's shape cannot be read.
    """
    job = job_for(recipe, backend, seq_len)
    global_batch = per_process_batch(recipe)
    modes = CHECKPOINT_MODES.get(backend, ("off", "on"))
    every = [Candidate(setup, estimate(job, setup), relative_speed(job, setup))
             for setup in (Setup(m, global_batch // m, mode, quant) for m in divisors(global_batch)
                           for mode in modes for quant in ("4bit", "16bit"))]
    every.sort(key=lambda c: (-c.speed, c.reserved_gib))
    allowed = _allowed(recipe, backend)
    fixed = [f"{key} = {_toml(value)}" for key, value in _fixed(recipe).items()]
    plan = Plan(job, global_batch, usable_gib, budget_note, seq_note, [c for c in every if allowed(c.setup)],
                None, fixed)
    plan.chosen = next((c for c in plan.candidates if plan.fits(c)), None)
    best = next((c for c in every if plan.fits(c)), None)
    if best and (plan.chosen is None or best.speed > plan.chosen.speed * 1.03):
        plan.proposal, plan.proposal_changes = best, _changes(recipe, backend, best.setup)
    if plan.chosen is None:
        plan.advice = _advice(recipe, backend, plan, every)
    return plan


def _fixed(recipe) -> dict:
    """The recipe's settings the planner may not change (those not "auto")."""
    t = recipe.train
    values = {"train.batch_size": t.batch_size, "train.gradient_checkpointing": t.gradient_checkpointing,
              "model.quantization": recipe.model.quantization}
    return {k: v for k, v in values.items() if v != "auto"}


def _allowed(recipe, backend: str, free: tuple[str, ...] = ()):
    """A predicate: do the recipe's fixed settings (other than the keys in `free`) allow this setup?"""
    fixed = {k: v for k, v in _fixed(recipe).items() if k not in free}
    checkpointing = fixed.get("train.gradient_checkpointing")
    mode = None if checkpointing is None else _recipe_mode(checkpointing, backend)
    return lambda s: (fixed.get("train.batch_size", s.micro_batch) == s.micro_batch
                      and mode in (None, s.checkpointing)
                      and fixed.get("model.quantization", s.quantization) == s.quantization)


def _changes(recipe, backend: str, setup: Setup) -> list[str]:
    """The recipe edits that would run `setup`."""
    t, out = recipe.train, []
    if t.batch_size != "auto" and t.batch_size != setup.micro_batch:
        out.append(f"train.batch_size {t.batch_size} -> {setup.micro_batch} with train.grad_accum "
                   f"{t.grad_accum} -> {setup.grad_accum}")
    if t.gradient_checkpointing != "auto" and _recipe_mode(t.gradient_checkpointing, backend) != setup.checkpointing:
        out.append(f"train.gradient_checkpointing {_toml(t.gradient_checkpointing)} -> "
                   f"{_toml(recipe_setting(setup.checkpointing))}")
    if recipe.model.quantization not in ("auto", setup.quantization):
        out.append(f"model.quantization \"{recipe.model.quantization}\" -> \"{setup.quantization}\"")
    return out


def _advice(recipe, backend: str, plan: Plan, every: list[Candidate]) -> list[str]:
    """What to change when nothing the recipe allows fits: one setting, else several, and the sequence length."""
    lines, fixed = [], tuple(_fixed(recipe))
    for key in fixed:  # one setting alone, the fastest way
        allowed = _allowed(recipe, backend, free=(key,))
        c = next((c for c in every if allowed(c.setup) and plan.fits(c)), None)
        if c:
            lines.append(f"{'; '.join(_changes(recipe, backend, c.setup))}: predicted {c.reserved_gib:.1f} GiB, fits")
    if not lines and plan.proposal:  # several settings together
        lines.append(f"together, {'; '.join(plan.proposal_changes)}: predicted {plan.proposal.reserved_gib:.1f} GiB, "
                     "fits")
    for free in ((), fixed):  # shorter examples, with the recipe's settings, else with any
        if free and lines:
            break
        allowed = _allowed(recipe, backend, free)
        length = _longest_that_fits(plan, [c.setup for c in every if allowed(c.setup)])
        if length:
            job = dataclasses.replace(plan.job, seq_len=length)
            c = max((Candidate(c.setup, estimate(job, c.setup), relative_speed(job, c.setup)) for c in every
                     if allowed(c.setup)), key=lambda c: (plan.fits(c), c.speed))
            also = "".join(f"; {change}" for change in _changes(recipe, backend, c.setup))
            lines.append(f"data.max_length {recipe.data.max_length} -> {length}{also}: fits "
                         "(longer examples are truncated)")
            break
    if not lines:
        job = dataclasses.replace(plan.job, seq_len=64)
        least = min((Candidate(c.setup, estimate(job, c.setup), 0.0) for c in every), key=lambda c: c.reserved_gib)
        lines.append(f"nothing fits even with 64-token examples: the smallest setup ({least.setup.describe()}) needs "
                     f"{least.reserved_gib:.1f} GiB, {least.parts['weights'] / GIB:.1f} of it base weights and "
                     f"{least.parts['trainable'] / GIB:.1f} trained weights with their optimizer states; use a smaller "
                     "model, fewer lora.modules_to_save, or a GPU with more memory")
    return lines


def _longest_that_fits(plan: Plan, setups: list[Setup]) -> int | None:
    """The longest sequence (a multiple of 64, shorter than the plan's) at which one of `setups` fits."""
    def fits_at(length: int) -> bool:
        job = dataclasses.replace(plan.job, seq_len=length)
        return any(plan.fits(Candidate(s, estimate(job, s), 0.0)) for s in setups)

    lo, hi = 0, (plan.job.seq_len - 1) // 64  # in units of 64 tokens; 0 means nothing fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits_at(mid * 64) else (lo, mid - 1)
    return lo * 64 or None


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int) else f"\"{value}\""


# --------------------------------------------------------------------------- the GPU budget


def gpu_budget(gpu_memory: float | None, label: str = "--gpu-memory") -> tuple[float | None, str]:
    """Memory usable for the peak reserved (GiB, after the safety margin) and where the figure comes from.

    `gpu_memory` (the card's size, named `label` in the note) wins; otherwise the free memory of
    the current CUDA device, capped by `torch.cuda.set_per_process_memory_fraction` where one is
    set. (None, why) without a GPU.
    """
    keep = 1 - SAFETY_MARGIN
    if gpu_memory is not None:
        avail = gpu_memory - CUDA_CONTEXT_GIB
        return avail * keep, (f"{gpu_memory:g} GiB ({label}) less {CUDA_CONTEXT_GIB:g} GiB CUDA context, "
                              f"less {SAFETY_MARGIN:.0%} margin")
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA GPU here"
    free, total = torch.cuda.mem_get_info()
    # get_per_process_memory_fraction is recent (torch 2.13 has it); without it assume no cap
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    avail = min(free, total * fraction - torch.cuda.memory_reserved()) / GIB
    capped = f", process capped at {fraction:.0%} of {total / GIB:.0f} GiB" if fraction < 1 else ""
    return avail * keep, (f"{avail:.1f} GiB free on {torch.cuda.get_device_name()}{capped}, "
                          f"less {SAFETY_MARGIN:.0%} margin")


def plan_command(recipe_path: str, backend: str, overrides=(), gpu_memory: float | None = None) -> str:
    """What `fastft plan` prints. Raises `FastftError` for a bad recipe or a model config it cannot read."""
    from fastft.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    usable, note = gpu_budget(gpu_memory)
    if usable is None:
        usable, note = gpu_budget(DEFAULT_GPU_GIB, "no GPU here and no --gpu-memory: a card of this size assumed")
    seq = recipe.data.max_length
    plan = make_plan(recipe, backend, usable, note, seq,
                     f"{seq} tokens each (data.max_length; `fastft run` plans for the longest tokenised example)")
    return format_plan(plan, recipe.model.name, backend)


def format_plan(plan: Plan, model_name: str, backend: str) -> str:
    """The table `fastft plan` prints: every allowed candidate, fastest first, and the choice."""
    s, job = plan.job.shape, plan.job
    lines = [
        f"model    {model_name}: {s.layers} layers, hidden {s.hidden}, MLP {s.intermediate}, vocab {s.vocab}"
        f"{' (tied)' if s.tied else ''}; {s.params / 1e9:.2f}B parameters",
        f"backend  {backend}; LoRA r={job.lora_r} ({job.lora_params / 1e6:.1f}M trainable), optimizer {job.optimizer}",
        f"batch    {plan.global_batch} examples per optimizer step, {plan.seq_note}",
        f"GPU      {plan.usable_gib:.1f} GiB usable: {plan.budget_note}",
    ]
    if plan.fixed:
        lines.append(f"fixed    by the recipe: {', '.join(plan.fixed)} (\"auto\" lets the planner choose)")
    lines += ["", "  micro x accum  checkpointing  base   weights  LoRA+opt  activations  loss+work  "
                  "peak reserved  speed"]
    for c in plan.candidates:
        p = {k: v / GIB for k, v in c.parts.items()}
        mark = ">" if c is plan.chosen else " "
        status = "chosen" if c is plan.chosen else ("fits" if plan.fits(c) else "too big")
        lines.append(f"{mark} {c.setup.micro_batch:>5} x {c.setup.grad_accum:<5}  {c.setup.checkpointing:<13}  "
                     f"{c.setup.quantization:<5}  {p['weights']:>7.1f}  {p['trainable']:>8.1f}  "
                     f"{p['activations']:>11.1f}  {p['loss'] + p['workspace']:>9.1f}  {c.reserved_gib:>9.1f} GiB  "
                     f"{c.speed / plan.candidates[0].speed:>5.2f}  {status}")
    lines.append(f"(GiB; peak reserved = allocated x {RESERVED_PER_ALLOCATED}; speed relative to the first row)")
    if plan.chosen:
        lines.append(f"chosen: {plan.chosen.setup.describe()}: predicted peak {plan.chosen.reserved_gib:.1f} GiB "
                     f"reserved of {plan.usable_gib:.1f} usable")
    else:
        lines.append("nothing the recipe allows fits. Change one of:")
        lines += [f"  {a}" for a in plan.advice]
    if plan.chosen and plan.proposal and plan.proposal_changes:
        lines.append(_proposal_line(plan))
    return "\n".join(lines)


def _proposal_line(plan: Plan) -> str:
    gain = f"{plan.proposal.speed / plan.chosen.speed:.2f}x faster, " if plan.chosen else ""
    numerics = " (changes the numerics)" if any("quantization" in c for c in plan.proposal_changes) else ""
    return (f"proposed, not applied: {'; '.join(plan.proposal_changes)}{numerics}: {gain}"
            f"predicted {plan.proposal.reserved_gib:.1f} GiB, fits")


# --------------------------------------------------------------------------- fastft run


def apply_setup(recipe, setup: Setup):
    """A copy of the recipe with the setup's concrete values (what the backends expect)."""
    out = copy.deepcopy(recipe)
    out.train.batch_size, out.train.grad_accum = setup.micro_batch, setup.grad_accum
    out.train.global_batch_size = 0  # the rule "only with batch_size auto" holds for the concrete recipe
    out.train.gradient_checkpointing = recipe_setting(setup.checkpointing)
    out.model.quantization = setup.quantization
    return out


def plan_for_run(recipe, backend: str, data_stats: dict, echo=print, gpu_memory: float | None = None):
    """Resolve the recipe's `"auto"` settings before the model loads; return (concrete recipe, plan or None).

    Only `"auto"` settings change; the global batch stays fixed, so the training math is the
    same whatever is chosen (the base precision changes only when `model.quantization = "auto"`).
    Without a GPU (and without `gpu_memory`) there is nothing to fit: the whole per-process
    batch goes in one micro-batch, checkpointing off, a 16-bit base. Raises `FastftError` when
    nothing the recipe allows is predicted to fit, with what to change.
    """
    t = recipe.train
    if "auto" not in (t.batch_size, t.gradient_checkpointing, recipe.model.quantization):
        return recipe, None
    usable, note = gpu_budget(gpu_memory)
    global_batch = per_process_batch(recipe)
    seq_len = min(recipe.data.max_length, data_stats.get("length_max") or recipe.data.max_length)
    if usable is None:
        micro = global_batch if t.batch_size == "auto" else t.batch_size
        setup = Setup(micro, global_batch // micro,
                      "off" if t.gradient_checkpointing == "auto" else _recipe_mode(t.gradient_checkpointing, backend),
                      "16bit" if recipe.model.quantization == "auto" else recipe.model.quantization)
        plan = Plan(None, global_batch, None, note, f"longest example {seq_len} tokens", [],
                    Candidate(setup, {}, 1.0), [])
        echo(f"plan: {note}, so nothing to fit: {setup.describe()} (the \"auto\" settings resolved for a CPU)")
        return apply_setup(recipe, setup), plan
    plan = make_plan(recipe, backend, usable, note, seq_len, f"longest example {seq_len} tokens")
    if plan.chosen is None:
        raise FastftError(f"{recipe.source}: no setup the recipe allows is predicted to fit in {plan.usable_gib:.1f} "
                          f"GiB ({note}; examples up to {seq_len} tokens). Change one of: " + "; ".join(plan.advice)
                          + ". `fastft plan` shows the predictions.")
    echo(f"plan: {plan.chosen.setup.describe()}: predicted peak {plan.chosen.reserved_gib:.1f} GiB reserved of "
         f"{plan.usable_gib:.1f} usable ({note}; examples up to {seq_len} tokens)")
    if plan.proposal and plan.proposal_changes:
        echo(f"plan: {_proposal_line(plan)}")
    return apply_setup(recipe, plan.chosen.setup), plan


def _step_watch():
    """A Trainer callback counting the optimizer steps this attempt has run."""
    from transformers import TrainerCallback

    class StepWatch(TrainerCallback):
        start = steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = state.global_step  # non-zero when resuming

        def on_step_end(self, args, state, control, **kwargs):
            self.steps = state.global_step - self.start

    return StepWatch()


def train_with_fallback(recipe, plan: Plan | None, attempt, echo=print):
    """Return (`attempt(recipe, watch)`, the recipe it succeeded with).

    `attempt` loads the model, builds the trainer with `watch` among its callbacks and trains.
    With an automatic plan on a GPU budget, an out-of-memory error within the first
    FALLBACK_STEPS steps frees the memory and retries with the next candidate down, saying so.
    Raises `FastftError` when no smaller candidate is left or the error came later; other errors
    propagate unchanged.
    """
    current = plan.chosen if plan is not None else None
    while True:
        watch = _step_watch()
        try:
            return attempt(recipe, watch), recipe
        except RuntimeError as e:
            if not is_out_of_memory(e) or plan is None or not plan.candidates:
                raise
            failed = f"out of memory at step {watch.steps} with {current.setup.describe()}"
            following = plan.next_down(current)
            late = watch.steps >= FALLBACK_STEPS
        # Outside the except block: the traceback, which holds the model and trainer, is gone.
        gc.collect()
        _empty_cuda_cache()
        if following is None:
            raise FastftError(
                f"{failed} (predicted {current.reserved_gib:.1f} GiB), and no smaller setup is left among those the "
                "recipe allows. Lower data.max_length, free GPU memory, or set more of train.batch_size, "
                "train.gradient_checkpointing and model.quantization to \"auto\"; `fastft plan` shows the predictions.")
        if late:
            s = following.setup
            raise FastftError(
                f"{failed} (predicted {current.reserved_gib:.1f} GiB). fastft falls back automatically only in the "
                f"first {FALLBACK_STEPS} steps, since a later fallback would start over. Resume with the next setup "
                f"down fixed: --resume --set train.batch_size={s.micro_batch} --set train.grad_accum={s.grad_accum} "
                "--set train.global_batch_size=0 --set "
                f"train.gradient_checkpointing={_toml(recipe_setting(s.checkpointing))} --set "
                f"model.quantization={s.quantization}.")
        plan.fallbacks.append({"failed": failed, "next": following.setup.describe()})
        echo(f"plan: {failed} (predicted {current.reserved_gib:.1f} GiB); falling back to "
             f"{following.setup.describe()} (predicted {following.reserved_gib:.1f} GiB)")
        current = plan.chosen = following
        recipe = apply_setup(recipe, following.setup)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
