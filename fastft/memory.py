"""The memory model: peak GPU memory and relative speed of one training setup, from the model's shapes.

A setup is a micro-batch size (with gradient accumulation keeping the global batch fixed),
a gradient-checkpointing mode (`off`, `on`, `offload`) and a base precision (`4bit`,
`16bit`). `estimate` predicts the peak allocated GPU memory component by component, and
`relative_speed` the throughput relative to other setups of the same job. `fastft/plan.py`
chooses among them.

What is measured and what is not: the constants marked FITTED below were set so that the
model reproduces peak *allocated* memory and throughput measured on one H100
(`benchmarks/memory_calibration.json`); everything else follows from counting bytes. The
plan compares peak *reserved* memory (what the caching allocator holds, what nvidia-smi
shows) with the free memory, taking reserved = allocated x RESERVED_PER_ALLOCATED, an
allowance not yet measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fastft.errors import FastftError

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

# --- reserved vs allocated
RESERVED_PER_ALLOCATED = 1.10  # caching-allocator rounding and fragmentation: NOT YET MEASURED

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
    from fastft.models import ARCHITECTURES, SPECIAL_TOKENS, TINY, TINY_DIR, cache_dir, is_builtin

    if is_builtin(model_cfg.name):
        arch = "tiny" if model_cfg.name == TINY else model_cfg.name.removeprefix("random:")
        if arch not in ARCHITECTURES or model_cfg.name == "random:tiny":
            from fastft.models import resolve_model

            resolve_model(model_cfg.name)  # raises the error listing the built-in models
        built = (TINY_DIR if arch == "tiny" else cache_dir() / "models" / arch) / "config.json"
        if built.exists():
            return shape_from_config(json.loads(built.read_text()))
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


