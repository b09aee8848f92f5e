"""`fastft bench`: every backend on the same recipe, side by side, measured the same way.

    parent:  recipe + overrides -> build the model once -> one fresh worker process per row -> table, JSON, MD, PNG
    worker:  get_backend (Unsloth first in its process) -> data -> load_model -> make_trainer -> train, timed

Each row runs in its own process because Unsloth patches transformers/peft/trl when
imported: a row must not inherit another row's patches, and one row crashing or
running out of memory must not take the others with it. A worker writes one JSON
result file; a backend that cannot run here (`get_backend` refuses it) is a row with
status "unavailable" and the reason.

What is counted follows `BENCHMARKING.md` (see `benchmarks/README.md`):
- the clock is read at every optimizer step's end, after `torch.cuda.synchronize()`;
  a step's time is the interval since the previous step's end (data loading, forward,
  backward, optimizer and logging: everything a user waits for); warm-up steps are skipped;
- tokens are counted from the batches the trainer actually received (the collator is
  wrapped): non-padding tokens (the headline), tokens that carry the loss, and all
  positions including padding;
- peak memory is reset after warm-up and read after the last timed step;
- MFU = (4 * N * tokens + 6 * n_layers * hidden * sum of squared sequence lengths) / time
  / the GPU's dense bf16 peak, N = parameters of the linear layers including the output head.

Run as a module, `python -m fastft.bench worker SPEC RESULT` is one row (internal).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from fastft.bench_count import MFU_FORMULA, CountingCollator, model_flops, model_shape, peak_tflops
from fastft.bench_report import summary_line, terminal_table, write_outputs
from fastft.errors import FastftError

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.toml"
# Row name -> (backend name for `get_backend`, its options).
ROWS = {"unsloth": ("unsloth", {}), "hf": ("hf", {}), "hf-stock": ("hf", {"stock": True})}
WORKLOADS = ("synthetic", "dataset")
# No GPU and no --model: exercise the harness on the tiny model with shapes a CPU runs in seconds.
CPU_FALLBACK = dict(model="fastft:tiny", batch_size=2, seq_len=128, warmup=2, steps=5)
PROGRESS = "[bench] "  # worker lines the parent shows; everything else is kept only for error reports


# --------------------------------------------------------------------------- parent


def run_bench(recipe_path: str | None = None, backends: str = "unsloth,hf,hf-stock", model: str | None = None,
              batch_size: int | None = None, seq_len: int | None = None, steps: int | None = None,
              warmup: int | None = None, workload: str = "synthetic", overrides: tuple = (), out: str | None = None,
              echo=print, command: str | None = None) -> dict:
    """Benchmark each backend row in its own process and return the report (also written to `out`).

    Raises `FastftError` for a bad recipe, an unknown row or workload, or shapes that cannot be set.
    A row that cannot run here is reported as unavailable; one that crashes, as an error.
    """
    rows = [b.strip() for b in backends.split(",") if b.strip()]
    for row in rows:
        if row not in ROWS:
            raise FastftError(f"--backends {backends}: unknown row `{row}`. "
                              f"Choose from {', '.join(ROWS)} (comma-separated).")
    if workload not in WORKLOADS:
        raise FastftError(f"--workload {workload}: choose `synthetic` or `dataset`.")
    path = Path(recipe_path) if recipe_path else DEFAULT_RECIPE
    if not recipe_path and not path.is_file():
        raise FastftError(f"the default benchmark recipe {path} is missing (it ships in the repository's benchmarks/ "
                          "folder). Pass a recipe: `fastft bench RECIPE`.")
    from fastft.recipe import load_recipe

    recipe = load_recipe(path, overrides)  # a bad recipe is answered before torch loads

    import torch
    from transformers import AutoConfig

    from fastft.models import resolve_model
    from fastft.runs import library_versions

    cuda = torch.cuda.is_available()
    notes = []
    defaults = dict(steps=20, warmup=10)
    if not cuda and model is None:
        # CI and laptops: prove the harness works; the figures mean nothing about GPUs.
        defaults = CPU_FALLBACK
        model = CPU_FALLBACK["model"]
        batch_size, seq_len = batch_size or CPU_FALLBACK["batch_size"], seq_len or CPU_FALLBACK["seq_len"]
        notes.append(f"no GPU here: running on {model} with batch {batch_size} x {seq_len} on the CPU to test the "
                     "harness; these figures are not performance claims (pass --model to override)")
    elif not cuda:
        notes.append("no GPU here: running on the CPU")
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        # Multi-threaded torch on a CPU shared with other jobs stalls for seconds a step: one thread keeps it honest.
        notes.append("one CPU thread per row (set OMP_NUM_THREADS to change it)")
    steps = defaults["steps"] if steps is None else steps
    warmup = defaults["warmup"] if warmup is None else warmup
    if steps < 1 or warmup < 1:
        raise FastftError(f"--steps {steps} --warmup {warmup}: both must be at least 1 (BENCHMARKING.md asks for "
                          "20 timed steps after 10 warm-up steps).")
    if cuda and (steps < 20 or warmup < 10):
        notes.append("fewer than the 10 warm-up and 20 timed steps BENCHMARKING.md asks for: figures are indicative")
    if model:
        recipe.model.name = model
    if batch_size:
        recipe.train.batch_size = batch_size
    if not isinstance(recipe.train.batch_size, int):
        raise FastftError(f"{path}: `train.batch_size = \"auto\"` cannot be benchmarked: pass --batch-size N.")
    if seq_len:
        recipe.data.max_length = seq_len
    seq_len = recipe.data.max_length

    echo(f"fastft bench: {', '.join(rows)} on {recipe.model.name} ({recipe.model.quantization}), {workload} workload, "
         f"batch {recipe.train.batch_size} x {seq_len}, grad_accum {recipe.train.grad_accum}, "
         f"{warmup} warm-up + {steps} timed steps")
    for note in notes:
        echo(f"note: {note}")
    model_path = resolve_model(recipe.model.name)  # built once here, not raced by the rows
    shape = model_shape(AutoConfig.from_pretrained(model_path))
    spec = {"recipe": recipe.to_dict(), "recipe_source": str(path), "model_path": model_path, "workload": workload,
            "seq_len": seq_len, "steps": steps, "warmup": warmup, "shape": shape,
            "cpu_threads": None if cuda else os.environ.get("OMP_NUM_THREADS", "1")}

    results, interrupted = [], False
    with tempfile.TemporaryDirectory(prefix="fastft-bench-") as tmp:
        try:
            for row in rows:
                echo(f"--- {row}")
                result = run_row(row, spec, Path(tmp), echo)
                results.append(result)
                echo(f"    {summary_line(result)}")
                if result["status"] == "error" and result["output_tail"].strip():  # how it ended; all in the JSON
                    echo("\n".join("    | " + line for line in result["output_tail"].splitlines()[-15:]))
        except KeyboardInterrupt:  # Ctrl-C or a time box: the rows already measured are still written
            interrupted = True
            notes.append(f"interrupted: {', '.join(rows[len(results):])} not measured")
            echo(f"note: {notes[-1]}")

    stock = next((r for r in results if r["backend"] == "hf-stock" and r["status"] == "ok"), None)
    for r in results:
        if r["status"] == "ok" and stock:
            r["vs_hf_stock"] = {
                "tokens_per_second": _ratio(r["tokens_per_second"], stock["tokens_per_second"]),
                "peak_memory_allocated": _ratio(r["peak_memory_allocated_gib"], stock["peak_memory_allocated_gib"]),
            }
    device = next((r["device"] for r in results if r.get("device")), None)
    report = {
        "command": command or "fastft " + shlex.join(sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "workload": workload, "notes": notes, "device": device, "versions": library_versions(),
        "settings": {"model": recipe.model.name, "quantization": recipe.model.quantization,
                     "batch_size": recipe.train.batch_size, "seq_len": seq_len, "grad_accum": recipe.train.grad_accum,
                     "warmup_steps": warmup, "timed_steps": steps, "lora_r": recipe.lora.r,
                     "lora_target_modules": recipe.lora.target_modules,
                     "gradient_checkpointing": recipe.train.gradient_checkpointing},
        "model_shape": shape, "mfu_formula": MFU_FORMULA,
        "recipe_path": str(path), "recipe": recipe.to_dict(), "rows": results,
    }
    echo("")
    echo(terminal_table(report))
    if out:
        for written in write_outputs(report, Path(out), echo):
            echo(f"wrote {written}")
    if interrupted:
        raise KeyboardInterrupt
    return report


def run_row(row: str, spec: dict, tmp: Path, echo) -> dict:
    """Run one row in a fresh `python -m fastft.bench worker` process; return its result (never raises for the row)."""
    spec_file, result_file = tmp / f"{row}.spec.json", tmp / f"{row}.result.json"
    spec_file.write_text(json.dumps(dict(spec, row=row)))
    # The worker must import the same fastft as this process, whatever is installed.
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               PYTHONUNBUFFERED="1")
    if spec["cpu_threads"]:
        env["OMP_NUM_THREADS"] = spec["cpu_threads"]
    # Its own working directory, so a file a library drops there cannot reach another row (Unsloth's
    # compiled cache goes to $FASTFT_CACHE: the backend sets UNSLOTH_COMPILE_LOCATION).
    workdir = tmp / row
    workdir.mkdir(exist_ok=True)
    tail: deque[str] = deque(maxlen=40)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fastft.bench", "worker", str(spec_file), str(result_file)],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(PROGRESS):
                echo("    " + line[len(PROGRESS):])
            else:
                tail.append(line)
    except BaseException:  # interrupted: the row is not measured, and its worker must not run on
        proc.kill()
        proc.wait()
        raise
    code = proc.wait()
    if result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        result = {"backend": row, "status": "error", "pid": proc.pid,
                  "reason": f"the worker exited with code {code} without writing a result"}
    if result["status"] == "error" and "output_tail" not in result:
        result["output_tail"] = "\n".join(tail)
    result["wall_time_s"] = round(time.perf_counter() - started, 2)
    return result


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


# --------------------------------------------------------------------------- worker


class StepClock:
    """Trainer callback: time each optimizer step, attribute its micro-batches, reset/read peak memory."""

    def __init__(self, row: str, warmup: int, steps: int, counter: CountingCollator | None = None):
        import torch

        self.row, self.warmup, self.total = row, warmup, warmup + steps
        self.cuda = torch.cuda.is_available()
        self.counter = counter
        self.micro_batches = 0  # micro-batches trained so far (the trainer signals each one's end)
        self.step_counts: list[dict] = []  # per optimizer step: summed count_batch of its micro-batches
        self.ends: list[float] = []
        self.peak: dict = {}
        self.start = 0.0

    def __getattr__(self, name):  # the Trainer calls every on_* event; only a few matter here
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()  # the clock must not run ahead of queued GPU work
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self._now()

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batches += 1

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.micro_batches += 1
        done = sum(c.get("micro_batches", 0) for c in self.step_counts)
        records = self.counter.records[done:self.micro_batches] if self.counter else []
        summed = {k: sum(rec[k] for rec in records) for k in (records[0] if records else {})}
        self.step_counts.append(dict(summed, micro_batches=self.micro_batches - done))
        self.ends.append(now)
        if self.cuda:
            import torch

            if state.global_step == self.warmup:
                torch.cuda.reset_peak_memory_stats()
            elif state.global_step == self.total:
                self.peak = {"allocated": torch.cuda.max_memory_allocated(),
                             "reserved": torch.cuda.max_memory_reserved()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and self.ends:
            k = state.global_step
            took = self.ends[-1] - (self.ends[-2] if len(self.ends) > 1 else self.start)
            phase = "warm-up" if k <= self.warmup else "timed"
            print(f"{PROGRESS}{self.row}: step {k}/{self.total} ({phase}) {took:.3f} s, loss {logs['loss']:.4f}",
                  flush=True)

    def timed(self) -> tuple[list[float], list[dict]]:
        """Step times (s) and counts of the timed steps, warm-up excluded."""
        ends = [self.start] + self.ends
        times = [ends[k + 1] - ends[k] for k in range(self.warmup, len(self.ends))]
        return times, self.step_counts[self.warmup:]


def synthetic_dataset(vocab_size: int, rows: int, seq_len: int, seed: int):
    """`rows` full rows of `seq_len` random token ids, the loss on every token (labels = ids)."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)  # every row of the bench sees the same batches
    ids = torch.randint(0, vocab_size, (rows, seq_len), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def measure(engine, row: str, spec: dict) -> dict:
    """Train `warmup + steps` steps through `engine`'s real path and return the row's figures."""
    import torch

    from fastft.batching import sampling_strategy
    from fastft.models import load_tokenizer
    from fastft.recipe import recipe_from_dict
    from fastft.train import training_arguments

    recipe = recipe_from_dict(spec["recipe"], source=spec["recipe_source"])
    warmup, steps, workload = spec["warmup"], spec["steps"], spec["workload"]
    if row == "hf-stock" or workload == "synthetic":
        # The seed scripts padded to the longest and drew batches in random order; full synthetic
        # rows have nothing to pack or group, and every row then sees the same batches.
        recipe.data.packing = recipe.data.group_by_length = False
    tokenizer = load_tokenizer(recipe.model)
    if workload == "synthetic":
        rows = recipe.train.batch_size * recipe.train.grad_accum * (warmup + steps)
        dataset = synthetic_dataset(spec["shape"]["vocab_size"], rows, spec["seq_len"], recipe.train.seed)
    else:
        from fastft.data import prepare

        dataset = prepare(recipe, tokenizer, echo=lambda *a: None).train.to_dataset()

    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    model = engine.load_model(recipe, spec["model_path"])
    if cuda:
        torch.cuda.synchronize()
    load_time = time.perf_counter() - started
    trainable, _ = model.get_nb_trainable_parameters()

    with tempfile.TemporaryDirectory(prefix="fastft-bench-run-") as run_dir:
        args = training_arguments(recipe, Path(run_dir), eval_data=False)
        args.update(max_steps=warmup + steps, logging_steps=1, logging_first_step=True, save_strategy="no",
                    report_to="none", disable_tqdm=True)
        clock = StepClock(row, warmup, steps)
        trainer = engine.make_trainer(recipe, model, tokenizer, dataset, None, args, callbacks=[clock])
        clock.counter = trainer.data_collator = CountingCollator(trainer.data_collator)
        trainer.train()

    times, counts = clock.timed()
    if not clock.counter.records:
        raise FastftError(f"the {row} trainer never called its data collator, so its tokens cannot be counted.")
    if len(times) < steps:
        raise FastftError(f"only {len(times)} of {steps} timed steps ran (the trainer stopped early).")
    total_s = sum(times)
    keys = ("sequences", "tokens", "loss_tokens", "positions", "sum_sq_lengths")
    total = {k: sum(c[k] for c in counts) for k in keys}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    device = device_info()
    peak = peak_tflops(device["name"]) if cuda else None
    achieved = model_flops(spec["shape"], total["tokens"], total["sum_sq_lengths"]) / total_s
    gib = 1024 ** 3
    return {
        "status": "ok", "packing": recipe.data.packing, "sampling": sampling_strategy(recipe.data), "device": device,
        "step_time_s": _spread(times), "step_times_s": [round(t, 5) for t in times],
        "tokens_per_second": total["tokens"] / total_s,
        "loss_tokens_per_second": total["loss_tokens"] / total_s,
        "padded_tokens_per_second": total["positions"] / total_s,
        "samples_per_second": total["sequences"] / total_s,
        "timed_counts": total, "timed_seconds": total_s,
        "model_tflops_per_second": achieved / 1e12, "peak_tflops": peak,
        "mfu": achieved / (peak * 1e12) if peak else None,
        "peak_memory_allocated_gib": clock.peak["allocated"] / gib if clock.peak else None,
        "peak_memory_reserved_gib": clock.peak["reserved"] / gib if clock.peak else None,
        "load_time_s": load_time, "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "losses": losses, "trainable_parameters": trainable,
    }


def _spread(times: list[float]) -> dict:
    if len(times) < 2:
        return {"median": times[0], "p20": times[0], "p80": times[0]}
    q = statistics.quantiles(times, n=5, method="inclusive")
    return {"median": statistics.median(times), "p20": q[0], "p80": q[3]}


def device_info() -> dict:
    """The device this worker trains on: name, driver, CUDA runtime, memory (CPU: its name only)."""
    import platform

    import torch

    if not torch.cuda.is_available():
        return {"name": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", "driver": None}
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                                capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        driver = None
    return {"name": torch.cuda.get_device_name(0), "driver": driver, "cuda": torch.version.cuda,
            "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 1024 ** 3, 1)}


def worker(spec_file: str, result_file: str) -> None:
    """One row: choose the backend first (Unsloth must be imported before transformers), measure, write JSON."""
    spec = json.loads(Path(spec_file).read_text())
    row = spec["row"]
    result = {"backend": row, "pid": os.getpid(), "workload": spec["workload"]}
    name, options = ROWS[row]
    try:
        from fastft.backends import get_backend

        engine = get_backend(name, **options)
    except FastftError as e:  # not installed, no GPU: the backend says why
        result.update(status="unavailable", reason=str(e))
    except ImportError as e:  # a backend module that is missing here, or whose package fails to import
        result.update(status="unavailable", reason=f"the `{name}` backend cannot be imported here: {e}")
    else:
        try:
            result.update(measure(engine, row, spec))
        except FastftError as e:  # e.g. a recipe setting this backend cannot honour
            result.update(status="error", reason=str(e))
        except Exception as e:  # the row failed; the others still run
            import traceback

            traceback.print_exc()
            result.update(status="error", reason=f"{type(e).__name__}: {e}")
    from fastft.runs import atomic_write

    atomic_write(Path(result_file), json.dumps(result, default=str))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "worker":
        sys.exit("usage: python -m fastft.bench worker SPEC.json RESULT.json  (internal; use `fastft bench`)")
    worker(sys.argv[2], sys.argv[3])
