"""Packing's gain on CPU: the hf backend's own Trainer, timed per optimizer step (not a test).

For one recipe, three batchings of the same data are trained for WARMUP + STEPS steps each,
in one process, one after the other:

    padded, random order      data.packing = false, data.group_by_length = false
    padded, grouped by length data.packing = false, data.group_by_length = true
    packed                    data.packing = true

Step time is the wall time between consecutive optimizer steps (data loading, forward,
backward and optimizer included); tokens are counted from the batches the Trainer received:
real tokens (no padding, prompt included, as TRL counts) and computed tokens (input_ids
elements); tokens/s is all real tokens of the timed steps over their total time. The
random-order and packed runs see the same examples in the same batches (same
seed, same sampler), so their losses must agree step by step; the grouped run sees others.

The three settings run in turn, `--repeats` times; a shared machine slows some runs down, so
each setting reports its fastest repeat (lowest median step time), and every repeat's median
is printed to show the noise.

    python benchmarks/cpu_packing.py RECIPE [--set section.key=value ...] [--warmup 5] [--steps 20] [--repeats 3]

`fastft bench` is the measurement for GPUs; this script exists for the CPU figures in
benchmarks/results/cpu-packing.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "padded, random order": ["data.packing=false", "data.group_by_length=false"],
    "padded, grouped by length": ["data.packing=false", "data.group_by_length=true"],
    "packed": ["data.packing=true"],
}


def measure(recipe_path: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """Train one setting; return its step times, token counts and logged losses."""
    import torch
    from transformers import TrainerCallback

    from fastft.backends.hf import HFBackend
    from fastft.data import prepare
    from fastft.models import load_tokenizer, resolve_model
    from fastft.recipe import load_recipe
    from fastft.train import training_arguments

    recipe = load_recipe(recipe_path, [*overrides, f"train.max_steps={warmup + steps}", "train.logging_steps=1",
                                       "train.save_steps=0", "train.report_to=\"none\"", "train.grad_accum=1"])
    tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe, tokenizer, echo=lambda *a: None)
    backend = HFBackend()
    model = backend.load_model(recipe, resolve_model(recipe.model.name))

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    clock, batches = StepClock(), []
    with tempfile.TemporaryDirectory() as run_dir:
        args = training_arguments(recipe, Path(run_dir), eval_data=False)
        trainer = backend.make_trainer(recipe, model, tokenizer, data.train.to_dataset(), None, args, [clock])
        collate = trainer.data_collator

        def counting(examples):
            batch = collate(examples)
            mask = batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            batches.append((real, batch["input_ids"].numel()))
            return batch

        trainer.data_collator = counting
        trainer.train()
    step_s = [b - a for a, b in zip(clock.ends, clock.ends[1:])][warmup:]
    timed = batches[warmup:warmup + steps]  # with gradient accumulation 1, batch k is step k
    q = statistics.quantiles(step_s, n=10)
    return dict(
        step_s_median=statistics.median(step_s), step_s_p20=q[1], step_s_p80=q[7],
        real_tokens_per_s=sum(r for r, _ in timed) / sum(step_s),
        padding_share=1 - sum(r for r, _ in timed) / sum(c for _, c in timed),
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        attention=model.config._attn_implementation, threads=torch.get_num_threads(),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()

    import torch
    import transformers

    runs = {name: [] for name in SETTINGS}
    for _ in range(opts.repeats):
        for name, extra in SETTINGS.items():
            runs[name].append(measure(opts.recipe, opts.overrides + extra, opts.warmup, opts.steps))
    results = {name: min(rs, key=lambda r: r["step_s_median"]) for name, rs in runs.items()}
    print(f"machine: {platform.machine()}, {results['packed']['threads']} torch threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"attention {results['packed']['attention']}; {opts.warmup} warm-up + {opts.steps} timed steps, "
          f"fastest of {opts.repeats} repeats")
    base = results["padded, random order"]["real_tokens_per_s"]
    print("| batching | step s (median, p20-p80) | real tokens/s | vs random order | padding share |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s_median']:.3f} ({r['step_s_p20']:.3f}-{r['step_s_p80']:.3f}) | "
              f"{r['real_tokens_per_s']:,.0f} | {r['real_tokens_per_s'] / base:.2f}x | {100 * r['padding_share']:.1f}% |")
    for name, rs in runs.items():
        print(f"median step s of each repeat, {name}: " + ", ".join(f"{r['step_s_median']:.3f}" for r in rs))
    padded, packed = results["padded, random order"]["losses"], results["packed"]["losses"]
    worst = max(abs(a - b) / abs(a) for a, b in zip(padded, packed))
    print(f"losses, padded random order vs packed (same batches), {len(padded)} steps: "
          f"largest relative difference {worst:.1e}")
    print("first losses: padded " + ", ".join(f"{x:.4f}" for x in padded[:5])
          + "; packed " + ", ".join(f"{x:.4f}" for x in packed[:5]))


if __name__ == "__main__":
    main()
