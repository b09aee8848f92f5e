"""The memory planner: the fastest training setup that fits the GPU, chosen before the model loads.

`make_plan` estimates every setup of the recipe's global batch with the memory model
(`fastft/memory.py`), keeps those the recipe allows, marks those that fit with a safety margin
and picks the fastest; when nothing fits it says what to change. `fastft plan` prints the plan
(`fastft/plan_report.py`); `fastft run` applies the choice to the recipe's `"auto"` settings
(`plan_for_run`) and, on an out-of-memory error in the first steps, asks `Plan.next_down` for the
setup to retry with (`fastft/train.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from dataclasses import dataclass, field

from fastft.errors import FastftError
from fastft.memory import ACTIVATION_ELEMENTS, GIB, Candidate, Job, Setup, estimate, model_shape, relative_speed

# --- the budget
CUDA_CONTEXT_GIB = 0.5  # CUDA context and kernel images, outside torch's counters (with --gpu-memory)
SAFETY_MARGIN = 0.10  # of the memory available: kept free for what the model does not count
DEFAULT_GPU_GIB = 24.0  # `fastft plan` on a machine without a GPU and without --gpu-memory

FALLBACK_STEPS = 10  # an out-of-memory error within this many steps falls back to the next setup down


# --------------------------------------------------------------------------- the plan


CHECKPOINT_MODES = {"unsloth": ("off", "on", "offload"), "hf": ("off", "on"), "hf-stock": ("off", "on")}
# Below this `data.max_length` (Unsloth's max_seq_length), Unsloth's offloaded checkpointing is plain
# recomputation (unsloth/models/_utils.py apply_unsloth_gradient_checkpointing): no `offload` there.
UNSLOTH_OFFLOAD_MIN_LENGTH = 512


def checkpoint_modes(recipe, backend: str) -> tuple[str, ...]:
    """The gradient-checkpointing modes `backend` really has for this recipe."""
    if backend == "unsloth" and recipe.data.max_length < UNSLOTH_OFFLOAD_MIN_LENGTH:
        return ("off", "on")
    return CHECKPOINT_MODES.get(backend, ("off", "on"))


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


def _recipe_mode(recipe, backend: str) -> str:
    """The planner mode of the recipe's fixed `train.gradient_checkpointing` (`offload` is `on` where the backend has none)."""
    value = recipe.train.gradient_checkpointing
    if value is False:
        return "off"
    return "offload" if value == "offload" and "offload" in checkpoint_modes(recipe, backend) else "on"


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
    from fastft.distributed import world_size

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
    modes = checkpoint_modes(recipe, backend)
    every = [Candidate(setup, estimate(job, setup), relative_speed(job, setup))
             for setup in (Setup(m, global_batch // m, mode, quant) for m in divisors(global_batch)
                           for mode in modes for quant in ("4bit", "16bit"))]
    every.sort(key=lambda c: (-c.speed, c.reserved_gib))
    allowed = _allowed(recipe, backend)
    fixed = [f"{key} = {toml_value(value)}" for key, value in _fixed(recipe).items()]
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
    mode = None if checkpointing is None else _recipe_mode(recipe, backend)
    return lambda s: (fixed.get("train.batch_size", s.micro_batch) == s.micro_batch
                      and mode in (None, s.checkpointing)
                      and fixed.get("model.quantization", s.quantization) == s.quantization)


def _changes(recipe, backend: str, setup: Setup) -> list[str]:
    """The recipe edits that would run `setup`."""
    t, out = recipe.train, []
    if t.batch_size != "auto" and t.batch_size != setup.micro_batch:
        out.append(f"train.batch_size {t.batch_size} -> {setup.micro_batch} with train.grad_accum "
                   f"{t.grad_accum} -> {setup.grad_accum}")
    if t.gradient_checkpointing != "auto" and _recipe_mode(recipe, backend) != setup.checkpointing:
        out.append(f"train.gradient_checkpointing {toml_value(t.gradient_checkpointing)} -> "
                   f"{toml_value(recipe_setting(setup.checkpointing))}")
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


def toml_value(value) -> str:
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


def proposal_line(plan: Plan) -> str:
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
                      "off" if t.gradient_checkpointing == "auto" else _recipe_mode(recipe, backend),
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
        echo(f"plan: {proposal_line(plan)}")
    return apply_setup(recipe, plan.chosen.setup), plan


