"""`fastft run`: one fine-tune, top to bottom.

    setup:  recipe -> run folder (claimed) -> backend -> tokenizer + data -> plan -> run folder opened
            (everything that can be wrong is found before the model loads)
    train:  model + LoRA -> trainer -> train (resumable, interruptible; retried with a smaller
            setup if an automatic plan runs out of GPU memory in the first steps)
    save:   adapter + tokenizer (atomically) -> base and fine-tuned sample answers -> run summary
            -> loss plot -> end-of-run report (fastft/run_report.py)

The run folder and its files are `fastft/runs.py`'s job; the data pipeline is `fastft/data.py`'s.
Under torchrun/`accelerate launch` (or `fastft run --nproc N`) every process runs this same
flow on its own GPU; only rank 0 writes the run folder (see `fastft/distributed.py`).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

# TRL's trainers ping the Hugging Face Hub on every start (trl/trainer/base_trainer.py
# _send_telemetry). huggingface_hub reads this variable once, when it is first imported, so it is
# set here, before anything fastft runs can import it; a value the user set is kept.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from fastft.batching import describe_data
from fastft.claim import claim_for_run, take
from fastft.data import prepare
from fastft.distributed import (any_process, check_processes, is_main_process, local_main_first, torchrun_command,
                                world_size)
from fastft.errors import FastftError
from fastft.models import load_tokenizer, resolve_model
from fastft.plan import FALLBACK_STEPS, Plan, apply_setup, plan_for_run, recipe_setting, toml_value
from fastft.recipe import Recipe, load_recipe
from fastft.run_report import eval_losses, evaluate_at_end, report_end_of_run, sample_answers, write_loss_plot
from fastft.runs import (Callback, MarkComplete, atomic_write, check_resumable, check_same_data, claim_run_dir,
                         drop_incomplete_checkpoints, explain_disk_full, latest_checkpoint, library_versions,
                         open_run_dir, refuse_pickle_weights, resume_command, run_folder, save_adapter)


class Interrupted(FastftError):
    """Training stopped on Ctrl-C/SIGTERM after saving a checkpoint; `command` resumes it."""

    exit_code = 130

    def __init__(self, message: str, command: str = ""):
        super().__init__(message)
        self.command = command  # printed on a line of its own, so it can be copied as is


def run(recipe_path: str, backend: str = "hf", overrides: tuple = (), output: str | None = None,
        resume: bool = False, overwrite: bool = False, echo=print, backend_options: dict | None = None,
        callbacks: tuple = (), gpu_memory: float | None = None, allow_pickle: bool = False) -> Path:
    """Fine-tune per the recipe and return the run folder.

    Raises `FastftError` on bad input (before the model loads) and when memory runs out,
    and `Interrupted` (exit code 130) after Ctrl-C/SIGTERM has saved a checkpoint.
    `callbacks` are extra `transformers.TrainerCallback`s (tests and benchmarks observe the run with them).
    `gpu_memory` (GiB) makes the memory planner plan for that much instead of the free GPU memory.
    """
    started = time.time()
    # --- setup: everything that can be wrong is found before the model loads
    recipe = load_recipe(recipe_path, overrides)
    check_processes(recipe, backend, world_size())
    if not is_main_process():
        echo = _quiet  # one log per run, from rank 0
    run_dir = run_folder(recipe, output)
    # Claimed before anything takes time, held until the run ends however it ends (fastft/claim.py).
    with claim_for_run(run_dir, echo):
        command = resume_command(recipe_path, backend, overrides, output, allow_pickle, gpu_memory)
        # Out of disk space while writing: one paragraph saying what, where, how much, and how to go on.
        disk_full = functools.partial(explain_disk_full, run_dir=run_dir, resume=command)
        checkpoint = claim_run_dir(run_dir, resume, overwrite)  # every rank checks; only rank 0 deletes
        from fastft.backends import get_backend

        engine = get_backend(backend, **(backend_options or {}))  # Unsloth, if chosen, is imported here, first
        check_sources(recipe, run_dir, checkpoint, allow_pickle)
        tokenizer, data = load_data(recipe, echo)
        # The memory planner turns the recipe's "auto" settings into concrete ones (fastft/plan.py);
        # recipe.toml keeps them "auto", so a rerun plans again for the GPU it runs on.
        planned, plan = plan_for_run(recipe, engine.name, data.stats, echo=echo, gpu_memory=gpu_memory)
        echo(describe_data(data, planned))
        if checkpoint:
            check_same_data(checkpoint, data.fingerprint)

        # --- train (the run folder is opened, and an earlier run there deleted with --overwrite, only
        # once the model has loaded and the trainer is built: a refusal there loses nothing)
        stopper = StopOnSignal()

        def open_folder():
            with disk_full("the recipe", run_dir / "recipe.toml", 10_000):
                open_run_dir(run_dir, recipe, overwrite, checkpoint, echo)

        trainer, result, planned = train(engine, planned, plan, tokenizer, data, run_dir, checkpoint, open_folder,
                                         stopper, callbacks, disk_full, echo)
        if stopper.stopped and trainer.state.global_step < trainer.state.max_steps:
            raise Interrupted(
                f"Interrupted at step {trainer.state.global_step} of {trainer.state.max_steps}; a checkpoint was saved "
                f"in {run_dir / 'checkpoints' / f'checkpoint-{trainer.state.global_step}'}. Resume with:",
                command=command,
            )

        # --- save
        evaluate_at_end(trainer, eval_data=len(data.eval) > 0)  # every process: evaluation is a collective
        summary = run_summary(recipe_path, planned, engine.name, data, trainer, result, plan, checkpoint, started)
        save_run(trainer, tokenizer, planned, data, run_dir, summary, disk_full, echo)
        return run_dir


def check_sources(recipe: Recipe, run_dir: Path, checkpoint: Path | None, allow_pickle: bool) -> None:
    """Refuse a checkpoint that cannot continue this recipe, and pickle weights not explicitly allowed."""
    if checkpoint:
        check_resumable(run_dir, checkpoint, recipe, allow_pickle)
    if Path(recipe.model.name).is_dir():
        refuse_pickle_weights(Path(recipe.model.name), "`model.name`", allow_pickle)


def load_data(recipe: Recipe, echo):
    """The tokenizer and the prepared (formatted, tokenised, masked) data."""
    with local_main_first():  # one process per machine builds a built-in model into the cache
        tokenizer = load_tokenizer(recipe.model)
    return tokenizer, prepare(recipe, tokenizer, echo=echo)


def train(engine, recipe: Recipe, plan, tokenizer, data, run_dir: Path, checkpoint: Path | None, open_folder,
          stopper: StopOnSignal, callbacks, disk_full, echo):
    """Load the model, attach LoRA and train; return (trainer, train output, the recipe it succeeded with).

    `open_folder()` readies the run folder; it is called once, right before the first training step.
    With an automatic plan, an out-of-memory error in the first steps retries with the next
    setup down (`train_with_fallback`); running out of memory otherwise is explained.
    """
    opened = False

    def attempt(recipe: Recipe, watch):
        nonlocal opened
        model = engine.load_model(recipe, resolve_model(recipe.model.name))
        trainable, total = model.get_nb_trainable_parameters()
        echo(f"model: {recipe.model.name} ({recipe.model.quantization}), backend {engine.name}, "
             f"LoRA r={recipe.lora.r}: {trainable:,} trainable of {total:,} parameters")
        trainer = engine.make_trainer(
            recipe, model, tokenizer, data.train.to_dataset(), data.eval.to_dataset() if len(data.eval) else None,
            training_arguments(recipe, run_dir, eval_data=len(data.eval) > 0),
            callbacks=[MarkComplete(data.fingerprint, keep=recipe.train.save_total_limit), CurrentSchedule(), stopper,
                       watch, *callbacks],
        )
        if not opened:
            open_folder()
            opened = True
        if checkpoint:
            echo(f"resuming from {checkpoint}")
        # A checkpoint holds the trainable weights and Adam's two moments, all in fp32, and some small files.
        last = latest_checkpoint(run_dir)
        size = sum(f.stat().st_size for f in last.iterdir()) if last else 12 * trainable + 100_000
        drop = (lambda: drop_incomplete_checkpoints(run_dir, _quiet)) if is_main_process() else None
        with stopper.installed(), disk_full("a checkpoint", run_dir / "checkpoints", size, cleanup=drop):
            return trainer, trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    with explain_out_of_memory(recipe, data, run_dir):
        (trainer, result), recipe = train_with_fallback(recipe, plan, attempt, echo=echo)
    return trainer, result, recipe


def run_summary(recipe_path, recipe: Recipe, backend: str, data, trainer, result, plan, checkpoint, started) -> dict:
    """What fastft.json records about the run."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    runtime = result.metrics.get("train_runtime", 0.0)
    # Non-padding tokens trained on in this session, summed over all processes by the Trainer
    # (a resumed run starts from the checkpoint's count; the Trainer keeps it for its own tokens/s).
    tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    return {
        "recipe": str(Path(recipe_path).resolve()), "model": recipe.model.name, "backend": backend,
        "seed": recipe.train.seed, "dataset_fingerprint": data.fingerprint, "data": data.stats,
        "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "final_eval_loss": evals[-1] if evals else None,
        "eval_loss_before": eval_losses(trainer.state.log_history)[0],
        "train_runtime_s": round(runtime, 2), "processes": world_size(),
        # Throughput of the whole run, all processes counted: non-padding tokens (prompt included).
        "train_tokens": tokens, "train_tokens_per_second": round(tokens / runtime, 1) if runtime else None,
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "wall_time_s": round(time.time() - started, 2), "versions": library_versions(),
        "resumed_from": str(checkpoint or ""), "plan": plan.summary() if plan else None,
    }


def save_run(trainer, tokenizer, recipe: Recipe, data, run_dir: Path, summary: dict, disk_full, echo) -> None:
    """Save the adapter, the summary and the loss plot (rank 0), then report (fastft/run_report.py)."""
    # Under FSDP each process holds a shard of every weight: gathering them is a collective.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if not is_main_process():
        return
    tokenizer_files = Path(tokenizer.name_or_path)
    size = 4 * trainer.model.get_nb_trainable_parameters()[0] + (  # fp32 weights, and the tokenizer's files
        sum(f.stat().st_size for f in tokenizer_files.glob("*.json")) if tokenizer_files.is_dir() else 10_000_000)
    with disk_full("the adapter", run_dir / "adapter", size):
        save_adapter(trainer.model, tokenizer, recipe, run_dir / "adapter", state_dict=state_dict)
    # A sharded model can only generate with every process taking part; skip the sample there.
    summary["sample"] = None if trainer.is_fsdp_enabled else sample_answers(trainer.model, tokenizer, recipe, data)
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    with disk_full("the run summary", run_dir / "fastft.json", len(text.encode())):
        atomic_write(run_dir / "fastft.json", text)
    with disk_full("the loss plot", run_dir / "loss.png", 100_000):
        plotted = write_loss_plot(trainer.state.log_history, run_dir / "loss.png", f"{recipe.name}: {recipe.model.name}")
    report_end_of_run(run_dir, summary, trainer.state.log_history, echo, plotted)


def launch(nproc: int, recipe_path: str, backend: str = "hf", overrides: tuple = (), output: str | None = None,
           resume: bool = False, overwrite: bool = False, gpu_memory: float | None = None,
           allow_pickle: bool = False) -> None:
    """`fastft run --nproc N`: check once here, then replace this process with torchrun running N copies.

    Bad recipes, refused settings and run-folder conflicts are reported once, with exit code 2,
    instead of by every process. Raises `FastftError`; does not return otherwise.
    """
    recipe = load_recipe(recipe_path, overrides)
    check_processes(recipe, backend, nproc)
    run_dir = run_folder(recipe, output)
    claim = take(run_dir)  # this process becomes torchrun, which keeps holding it; its rank 0 adopts it
    try:
        claim_run_dir(run_dir, resume, overwrite, processes=nproc)
        import torch

        if torch.cuda.is_available() and nproc > torch.cuda.device_count():
            raise FastftError(f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) are visible here. "
                              "Use one process per GPU (check CUDA_VISIBLE_DEVICES).")
    except BaseException:
        claim.release()
        raise
    args = ["run", str(recipe_path), "--backend", backend, *(f"--set={o}" for o in overrides)]
    args += ["--output", str(output)] if output else []
    args += ["--resume"] if resume else []
    args += ["--overwrite"] if overwrite else []  # rank 0 clears the old run once the data checks out
    args += ["--gpu-memory", f"{gpu_memory:g}"] if gpu_memory else []
    args += ["--allow-pickle"] if allow_pickle else []
    sys.stdout.flush()
    claim.keep_across_exec()
    os.execv(sys.executable, torchrun_command(nproc, args))


# --------------------------------------------------------------------------- trainer pieces


def training_arguments(recipe: Recipe, run_dir: Path, eval_data: bool) -> dict:
    """The training arguments every backend shares (TRL `SFTConfig` keywords)."""
    import torch

    from fastft.backends.hf import compute_dtype
    from fastft.batching import sampling_strategy

    t = recipe.train
    dtype = compute_dtype(recipe)
    report = t.report_to
    if report == "auto":
        report = "tensorboard" if _installed("tensorboard") else "none"
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "logs"))
    eval_every = t.eval_steps if eval_data and t.eval_steps else None
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps or t.warmup_ratio, weight_decay=t.weight_decay, optim=t.optimizer,
        max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed,
        train_sampling_strategy=sampling_strategy(recipe.data),  # lengths: the data's `length` column
        logging_steps=t.logging_steps, logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        save_total_limit=None,  # fastft deletes old checkpoints itself, once the new one is complete (MarkComplete)
        eval_strategy=("steps" if eval_every else "epoch") if eval_data else "no", eval_steps=eval_every,
        eval_on_start=eval_data,  # the eval loss before training (the untrained adapter leaves the base as is)
        report_to=report, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        gradient_checkpointing=False,  # the backend has already set it up its own way
        # LoRA uses every trainable weight in every step: DDP's search for unused ones only costs a graph
        # walk per step, and it breaks reentrant checkpointing (the `hf-stock` path).
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",  # gathered over processes: the global throughput
        max_length=None,  # the shared pipeline has truncated
        dataset_kwargs={"skip_prepare_dataset": True}, dataloader_num_workers=0,
        # Unsloth's trainer changes these two Trainer defaults (unsloth/models/rl.py); pinned so both
        # backends log the same losses (a NaN/inf loss is logged, not replaced by the running mean)
        # and free the CUDA cache alike.
        logging_nan_inf_filter=False, torch_empty_cache_steps=250,
        use_cpu=not torch.cuda.is_available(),
        **fsdp_arguments(recipe),
    )


def fsdp_arguments(recipe: Recipe) -> dict:
    """`train.fsdp`: shard the frozen base, LoRA weights, gradients and optimizer state over the processes.

    FSDP2 through accelerate, one unit per decoder layer (the model's `_no_split_modules`), each
    layer's weights gathered for its forward/backward and freed after (`reshard_after_forward`).
    4-bit weights can be sharded because the backend stores them in the compute dtype
    (`bnb_4bit_quant_storage`); accelerate keeps them as bitsandbytes parameters.
    """
    if not recipe.train.fsdp:
        return {}
    return dict(fsdp=True, fsdp_config={
        "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",  # checkpoints hold the whole (small) adapter, gathered on rank 0
        "cpu_ram_efficient_loading": False,  # each process loads the 4-bit model onto its GPU, then it is sharded
    })


class CurrentSchedule(Callback):
    """Log, evaluate and save at the recipe's steps also after --resume.

    The Trainer restores its state from the checkpoint, logging/eval/save steps included, so
    changes to them (allowed on resume: `fastft.runs.RESUME_MAY_CHANGE`) would be silently ignored.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)


class StopOnSignal(Callback):
    """Ctrl-C/SIGTERM: finish the current step, save a checkpoint, stop. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        # Processes get the signal at slightly different moments: they must stop at the same step,
        # or those still training wait forever for the others' gradients.
        if any_process(self.stopped):
            self.stopped = True
            control.should_save = True  # whatever train.save_steps says
            control.should_training_stop = True
        return control

    def installed(self):
        """A context manager that handles SIGINT/SIGTERM while it is open, then restores the old handlers."""
        import contextlib

        @contextlib.contextmanager
        def handlers():
            def handle(signum, frame):
                if self.stopped:
                    raise KeyboardInterrupt  # the second signal: the user wants out now
                self.stopped = True
                if is_main_process():
                    print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort now)",
                          file=sys.stderr)

            previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

        return handlers()


# --------------------------------------------------------------------------- out of memory


def explain_out_of_memory(recipe: Recipe, data, run_dir: Path):
    """A context manager that turns running out of memory into a `FastftError` naming the recipe keys to change."""
    import contextlib

    @contextlib.contextmanager
    def explained():
        try:
            yield
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            import torch

            t, where = recipe.train, "GPU memory" if torch.cuda.is_available() else "memory"
            last = latest_checkpoint(run_dir)
            raise FastftError(
                f"Out of {where} ({str(e).splitlines()[0] if str(e) else type(e).__name__}). Ask for less in "
                f"{recipe.source}: lower `train.batch_size` = {t.batch_size} (raise `train.grad_accum` = "
                f"{t.grad_accum} to keep the batch per step), lower `data.max_length` = {recipe.data.max_length} (the longest "
                f"example has {data.stats['length_max']} tokens), set `train.gradient_checkpointing` = true "
                f"(now {json.dumps(t.gradient_checkpointing)}), or `model.quantization` = \"4bit\" (now "
                f"\"{recipe.model.quantization}\"). Then rerun with --overwrite"
                + (f", or with --resume to continue from {last} if you changed only gradient checkpointing."
                   if last else ".")
            ) from None

    return explained()


def is_out_of_memory(e: BaseException) -> bool:
    """True for torch's out-of-memory error and the RuntimeErrors that mean the same (accelerate's list)."""
    import torch
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(e, torch.OutOfMemoryError) or should_reduce_batch_size(e)


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
                f"train.gradient_checkpointing={toml_value(recipe_setting(s.checkpointing))} --set "
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


def _quiet(*args, **kwargs) -> None:
    pass


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
