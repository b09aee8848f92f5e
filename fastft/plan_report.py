"""`fastft plan`: the memory planner's table, for a recipe, before anything loads."""

from __future__ import annotations

from fastft.memory import GIB, RESERVED_PER_ALLOCATED
from fastft.plan import DEFAULT_GPU_GIB, Plan, gpu_budget, make_plan, proposal_line


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
        lines.append(proposal_line(plan))
    return "\n".join(lines)
