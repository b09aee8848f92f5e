"""The memory planner checked: the setup it chooses, run for a few steps, predicted vs measured peak memory.

    python benchmarks/plan_check.py --backend hf --model random:llama-3.2-1b --budgets card,12 --out plan.json

For each budget, `fastft.train.run` trains a recipe whose batch size and gradient checkpointing
are "auto" (global batch 8, examples of `--seq-len` tokens, 4-bit base, LoRA r=16 on every
linear layer), so the planner chooses the setup as it would for a user; a callback reads
`torch.cuda.max_memory_allocated()` and `max_memory_reserved()`. Budgets: `card` is the GPU's
free memory as `fastft run` sees it; a number N is a card of N GiB, simulated by capping this
process with `torch.cuda.set_per_process_memory_fraction` (and planning with `--gpu-memory N`).

Measured, as in the calibration (`benchmarks/memory_calibration.json`) and tests/test_plan.py:
the peak over the steps after the first (`after_first_step`); the first step's own peak
(`first_step`, from the start of training) is recorded beside it. The error is
(measured - predicted) / predicted. Without a GPU the plan is made for a card of
`fastft.plan.DEFAULT_GPU_GIB` and the run trains on the CPU: predictions only.

The backend is chosen before anything else is imported (Unsloth must come first in its
process); run one process per backend. Exit status 1 if a setup could not be measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
GLOBAL_BATCH = 8

RECIPE = """
[model]
name = "{model}"
quantization = "4bit"

[data]
path = "{data}"
format = "text"
max_length = {seq_len}

[lora]
r = 16
alpha = 16
target_modules = "all-linear"

[train]
max_steps = {steps}
batch_size = "auto"
global_batch_size = {global_batch}
gradient_checkpointing = "auto"
logging_steps = 1
report_to = "none"
seed = 42
"""


class PeakMemory:
    """Trainer callback: peak allocated/reserved GPU memory of the first step, and of the steps after it.

    Duck-typed like fastft.bench's StepClock (every other `on_*` event is a no-op), so that
    transformers is not imported before the backend is chosen.
    """

    def __init__(self):
        self.first_step: dict | None = None
        self.after_first_step: dict | None = None

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    @staticmethod
    def _read() -> dict:
        import torch

        torch.cuda.synchronize()
        return {"allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                "reserved_gib": torch.cuda.max_memory_reserved() / GIB}

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # loading and quantising are not what the planner predicts

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if state.global_step == 1:
            self.first_step = self._read()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.after_first_step = self._read()


def long_examples(path: Path, rows: int = 64) -> Path:
    """Examples longer than any --seq-len used here, so every micro-batch is full, as the plan assumes."""
    rng = random.Random(0)
    words = ["fusion", "plasma", "tokamak", "neutron", "divertor", "stellarator"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(1200))}) + "\n"
                            for _ in range(rows)))
    return path


def check_budget(backend: str, model: str, budget: str, seq_len: int, steps: int, work: Path) -> dict:
    """Plan and train for one budget; return the chosen setup, the prediction and the measurement."""
    import torch

    from fastft.plan import DEFAULT_GPU_GIB
    from fastft.train import run

    cuda = torch.cuda.is_available()
    gpu_memory = None if budget == "card" else float(budget)
    if not cuda and gpu_memory is None:
        gpu_memory = DEFAULT_GPU_GIB  # no card to plan for: the size `fastft plan` assumes
    work.mkdir(parents=True)
    recipe = work / "recipe.toml"
    recipe.write_text(RECIPE.format(model=model, data=long_examples(work / "long.jsonl").as_posix(), seq_len=seq_len,
                                    steps=steps, global_batch=GLOBAL_BATCH))
    result = {"budget": budget, "gpu_memory_gib": gpu_memory, "seq_len": seq_len, "global_batch": GLOBAL_BATCH,
              "steps": steps}
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        result["leftover_allocated_gib"] = torch.cuda.memory_allocated() / GIB  # from a previous budget's run
        if gpu_memory is not None:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_memory * GIB / total))
    peak = PeakMemory() if cuda else None
    started = time.perf_counter()
    try:
        run_dir = run(str(recipe), backend=backend, output=str(work / "run"), gpu_memory=gpu_memory,
                      callbacks=(peak,) if peak else ())
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
    result["seconds"] = round(time.perf_counter() - started, 1)
    summary = json.loads((run_dir / "fastft.json").read_text())
    plan = summary["plan"]
    chosen = plan["chosen"]
    result.update(status="ok", chosen=chosen, usable_gib=plan["usable_gib"], plan_budget=plan["budget"],
                  fallbacks=plan["fallbacks"], steps_run=summary["steps"], final_loss=summary["final_loss"],
                  predicted={"allocated_gib": chosen["predicted_peak_allocated_gib"],
                             "reserved_gib": chosen["predicted_peak_reserved_gib"]})
    if peak:
        result["measured"] = {"first_step": peak.first_step, "after_first_step": peak.after_first_step}
        steady = peak.after_first_step or peak.first_step
        result["error"] = {kind: _error(steady[f"{kind}_gib"], result["predicted"][f"{kind}_gib"])
                           for kind in ("allocated", "reserved")}
    else:
        result["measured"] = None  # no GPU: nothing to measure
        result["note"] = "no GPU: the plan's prediction only (trained on the CPU)"
    return result


def _error(measured: float, predicted: float | None) -> float | None:
    return None if not predicted else round((measured - predicted) / predicted, 4)


def write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=("hf", "unsloth"))
    parser.add_argument("--model", default="random:llama-3.2-1b", help="built-in model (random weights, no download)")
    parser.add_argument("--budgets", default="card", help="comma-separated: `card` or GiB of a simulated card")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per example (default 2048; 128 on a CPU)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per setup (the first is warm-up)")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    a = parser.parse_args()

    report = {"backend": a.backend, "model": a.model, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(sys.argv), "setups": []}
    from fastft.errors import FastftError

    try:
        from fastft.backends import get_backend

        get_backend(a.backend)  # Unsloth, if chosen, is imported here, before transformers
    except (FastftError, ImportError) as e:
        report.update(status="unavailable", reason=str(e))
    else:
        import torch

        cuda = torch.cuda.is_available()
        report.update(status="ok", device=torch.cuda.get_device_name(0) if cuda else "cpu")
        seq_len = a.seq_len or (2048 if cuda else 128)
        with tempfile.TemporaryDirectory(prefix="fastft-plan-check-") as tmp:  # run folders: never in the results
            for budget in (b.strip() for b in a.budgets.split(",") if b.strip()):
                print(f"--- {a.backend} on {a.model}, budget {budget}", flush=True)
                try:
                    setup = check_budget(a.backend, a.model, budget, seq_len, a.steps, Path(tmp) / budget)
                except Exception as e:  # this setup failed (out of memory, nothing fits): record it, try the next
                    import traceback

                    traceback.print_exc()
                    setup = {"budget": budget, "status": "error", "reason": f"{type(e).__name__}: {e}"}
                report["setups"].append(setup)
                print(json.dumps(setup), flush=True)
                if setup["status"] != "ok":
                    report["status"] = "error"
                write(report, Path(a.out))  # after each setup: what was measured survives a stop
    write(report, Path(a.out))
    print(f"{a.backend}: {report['status']}" + (f": {report['reason']}" if report.get("reason") else ""))
    return 1 if report["status"] == "error" else 0


if __name__ == "__main__":
    sys.exit(main())
