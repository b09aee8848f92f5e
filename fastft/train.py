"""`fastft run`: one fine-tune, top to bottom.

    setup:  recipe -> run folder (decided) -> backend -> tokenizer -> data -> plan   (all before the model loads)
    train:  model + LoRA -> trainer -> train (resumable, interruptible)
    save:   adapter + tokenizer (atomically) -> run summary -> sample answer

The run folder:

    outputs/<name>/
      recipe.toml      the resolved recipe (rerunnable as is)
      fastft.json      run summary: backend, versions, seed, data fingerprint, tokens, losses, wall time
      adapter/         PEFT adapter (safetensors) and tokenizer, loadable with stock PEFT
      checkpoints/     resumable checkpoints, each marked complete only once fully written
      logs/            TensorBoard events

Under torchrun/`accelerate launch` (or `fastft run --nproc N`) every process runs this same
flow on its own GPU; only rank 0 writes the run folder (see `fastft/distributed.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from fastft.distributed import (any_process, check_processes, is_main_process, local_main_first, torchrun_command,
                                wait_for_everyone, world_size)
from fastft.errors import FastftError
from fastft.recipe import Recipe, load_recipe, to_toml

COMPLETE_MARK = "fastft-complete"  # written last into a checkpoint: its absence means "half written"


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
    checkpoint = claim_run_dir(run_dir, resume, overwrite)  # every rank checks; only rank 0 deletes
    from fastft.backends import get_backend

    engine = get_backend(backend, **(backend_options or {}))  # Unsloth, if chosen, is imported here, first
    if checkpoint:
        check_resumable(run_dir, checkpoint, recipe, allow_pickle)
    if Path(recipe.model.name).is_dir():
        refuse_pickle_weights(Path(recipe.model.name), "`model.name`", allow_pickle)

    from fastft.data import prepare
    from fastft.models import load_tokenizer, resolve_model

    with local_main_first():  # one process per machine builds a built-in model into the cache
        tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe, tokenizer, echo=echo)
    # The memory planner turns the recipe's "auto" settings into concrete ones (fastft/plan.py);
    # recipe.toml keeps them "auto", so a rerun plans again for the GPU it runs on.
    from fastft.plan import plan_for_run, train_with_fallback

    planned, plan = plan_for_run(recipe, engine.name, data.stats, echo=echo, gpu_memory=gpu_memory)
    echo(describe_data(data, planned))
    if checkpoint:
        check_same_data(checkpoint, data.fingerprint)
    if is_main_process():
        if overwrite:
            clear_run_dir(run_dir)  # only now that the new run's inputs are known to be good
        if checkpoint:
            drop_incomplete_checkpoints(run_dir, echo)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "recipe.toml", to_toml(recipe))
    wait_for_everyone()  # rank 0 has cleared and created the folder before anyone writes into it

    # --- train (again with the next setup down if an automatic plan runs out of GPU memory early)
    stopper = StopOnSignal()

    def attempt(recipe: Recipe, watch):
        model = engine.load_model(recipe, resolve_model(recipe.model.name))
        trainable, total = model.get_nb_trainable_parameters()
        echo(f"model: {recipe.model.name} ({recipe.model.quantization}), backend {engine.name}, "
             f"LoRA r={recipe.lora.r}: {trainable:,} trainable of {total:,} parameters")
        trainer = engine.make_trainer(
            recipe, model, tokenizer, data.train.to_dataset(), data.eval.to_dataset() if len(data.eval) else None,
            training_arguments(recipe, run_dir, eval_data=len(data.eval) > 0),
            callbacks=[MarkComplete(data.fingerprint), stopper, watch, *callbacks],
        )
        if checkpoint:
            echo(f"resuming from {checkpoint}")
        with stopper.installed():
            return trainer, trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    with explain_out_of_memory(planned, data, run_dir):
        (trainer, result), recipe = train_with_fallback(planned, plan, attempt, echo=echo)
    if stopper.stopped and trainer.state.global_step < trainer.state.max_steps:
        raise Interrupted(
            f"Interrupted at step {trainer.state.global_step} of {trainer.state.max_steps}; a checkpoint was saved in "
            f"{run_dir / 'checkpoints' / f'checkpoint-{trainer.state.global_step}'}. Resume with:",
            command=resume_command(recipe_path, backend, overrides, output, allow_pickle, gpu_memory),
        )

    # --- save
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    runtime = result.metrics.get("train_runtime", 0.0)
    # Non-padding tokens trained on in this session, summed over all processes by the Trainer
    # (a resumed run starts from the checkpoint's count; the Trainer keeps it for its own tokens/s).
    tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    summary = {
        "recipe": str(Path(recipe_path).resolve()), "model": recipe.model.name, "backend": engine.name,
        "seed": recipe.train.seed, "dataset_fingerprint": data.fingerprint, "data": data.stats,
        "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "final_eval_loss": evals[-1] if evals else None,
        "train_runtime_s": round(runtime, 2), "processes": world_size(),
        # Throughput of the whole run, all processes counted: non-padding tokens (prompt included).
        "train_tokens": tokens, "train_tokens_per_second": round(tokens / runtime, 1) if runtime else None,
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "wall_time_s": round(time.time() - started, 2), "versions": library_versions(), "resumed_from": str(checkpoint or ""),
        "plan": plan.summary() if plan else None,
    }
    # Under FSDP each process holds a shard of every weight: gathering them is a collective.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if is_main_process():
        save_adapter(trainer.model, tokenizer, recipe, run_dir / "adapter", state_dict=state_dict)
        atomic_write(run_dir / "fastft.json", json.dumps(summary, indent=2))
        echo(f"loss: first {summary['first_loss']}, last {summary['final_loss']}"
             + (f", eval {summary['final_eval_loss']:.4f}" if evals else ""))
        echo(f"throughput: {summary['train_tokens_per_second']} tokens/s over {world_size()} process(es), "
             f"{tokens:,} tokens in {runtime:.1f} s")
        echo(f"adapter saved in {run_dir / 'adapter'} ({summary['wall_time_s']:.0f} s)")
        # A sharded model can only generate with every process taking part; skip the sample there.
        sample = None if trainer.is_fsdp_enabled else sample_answer(trainer.model, tokenizer, recipe, data)
        if sample:
            echo(f"sample: {sample[0]!r}\n  -> {sample[1]!r}")
    return run_dir


def launch(nproc: int, recipe_path: str, backend: str = "hf", overrides: tuple = (), output: str | None = None,
           resume: bool = False, overwrite: bool = False, gpu_memory: float | None = None,
           allow_pickle: bool = False) -> None:
    """`fastft run --nproc N`: check once here, then replace this process with torchrun running N copies.

    Bad recipes, refused settings and run-folder conflicts are reported once, with exit code 2,
    instead of by every process. Raises `FastftError`; does not return otherwise.
    """
    recipe = load_recipe(recipe_path, overrides)
    check_processes(recipe, backend, nproc)
    claim_run_dir(run_folder(recipe, output), resume, overwrite, processes=nproc)
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise FastftError(f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) are visible here. "
                          "Use one process per GPU (check CUDA_VISIBLE_DEVICES).")
    args = ["run", str(recipe_path), "--backend", backend, *(f"--set={o}" for o in overrides)]
    args += ["--output", str(output)] if output else []
    args += ["--resume"] if resume else []
    args += ["--overwrite"] if overwrite else []  # rank 0 clears the old run once the data checks out
    args += ["--gpu-memory", f"{gpu_memory:g}"] if gpu_memory else []
    args += ["--allow-pickle"] if allow_pickle else []
    sys.stdout.flush()
    os.execv(sys.executable, torchrun_command(nproc, args))


# --------------------------------------------------------------------------- run folder


def run_folder(recipe: Recipe, output: str | None) -> Path:
    return Path(output or recipe.train.output_dir or Path("outputs") / recipe.name)


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool, processes: int | None = None) -> Path | None:
    """Decide what happens to an existing run folder; return the checkpoint to resume from.

    Never writes into a folder holding an earlier run unless told to (`resume`/`overwrite`).
    This only decides and changes nothing: with `overwrite`, `clear_run_dir` deletes the old
    run later, once the new run's recipe and data are known to be good. Every process may call
    it and all reach the same decision. A checkpoint resumes only with the number of processes
    that wrote it (`processes`, default this run's).
    """
    if resume and overwrite:
        raise FastftError("--resume and --overwrite contradict each other: choose one.")
    if run_dir.exists() and not run_dir.is_dir():
        raise FastftError(f"{run_dir} is a file, not a run folder. Choose another --output (or train.output_dir).")
    # A run that failed before saving anything leaves only its recipe and empty folders: not worth keeping.
    # Hidden entries are leftovers of interrupted atomic saves.
    occupied = run_dir.exists() and (
        any(p.name not in ("recipe.toml", "checkpoints", "logs") and not p.name.startswith(".")
            for p in run_dir.iterdir())
        or any((run_dir / "checkpoints").glob("checkpoint-*"))
    )
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            finished = " The run there finished (it has fastft.json); its adapter is in adapter/." \
                if (run_dir / "fastft.json").exists() else ""
            raise FastftError(f"{run_dir}: no complete checkpoint to resume from.{finished} Run without --resume to "
                              "start (add --overwrite to replace what is there, or --output DIR to write elsewhere).")
        written_by, processes = checkpoint_processes(checkpoint), processes or world_size()
        if written_by is not None and written_by != processes:
            # The data order, the global batch and the saved random states all depend on the process count.
            raise FastftError(
                f"{checkpoint} was written by {written_by} process(es) and this run has {processes}. Resume with "
                f"the same count: `--nproc {written_by}` (or `torchrun --nproc-per-node ...` totalling {written_by}), "
                "or start afresh with --overwrite."
            )
        return checkpoint
    if occupied and not overwrite:
        raise FastftError(
            f"{run_dir} already holds an earlier run. Add --resume to continue it from its last checkpoint, "
            "--overwrite to replace it, or --output DIR to write elsewhere."
        )
    run_files = ("recipe.toml", "fastft.json", "adapter", "checkpoints")
    if occupied and not any((run_dir / name).exists() for name in run_files):
        # --overwrite deletes the folder: refuse when it does not look like a run folder (e.g. --output ~).
        raise FastftError(f"{run_dir} holds files that are not a fastft run, so --overwrite will not delete it. "
                          "Choose another --output (or train.output_dir).")
    return None


def clear_run_dir(run_dir: Path) -> None:
    """Delete an earlier run (after `claim_run_dir` allowed it with `overwrite`)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that was completely written (half-written ones are ignored)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    done = [p for p in _checkpoints(folder) if (p / COMPLETE_MARK).exists()]
    return max(done, key=_step, default=None)


def _checkpoints(folder: Path) -> list[Path]:
    return [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def drop_incomplete_checkpoints(run_dir: Path, echo=print) -> None:
    """Delete checkpoints without the completion mark, so a resumed run cannot mix in their files."""
    for p in _checkpoints(run_dir / "checkpoints"):
        if not (p / COMPLETE_MARK).exists():
            echo(f"removing {p}: it was never completely written")
            shutil.rmtree(p)


# Files that `torch.save` writes into every Trainer checkpoint (optimizer, scheduler, RNG, scaler,
# arguments). They are pickle, but the Trainer loads them with `torch.load(weights_only=True)`,
# whose unpickler accepts only tensors and plain containers, never code.
TRAINER_STATE_PICKLES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "rng_state_*.pth",
                         "training_args.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_pickle_weights(folder: Path, what: str, allow_pickle: bool, checkpoint: bool = False) -> None:
    """Raise `FastftError` if `folder` would have model weights loaded from pickle and `allow_pickle` is off.

    fastft writes weights as safetensors only, so pickle weights come from elsewhere; loading
    them can run code hidden in the file. A model folder that also has safetensors is fine
    (transformers loads those); in a checkpoint the Trainer would load any pickle weights.
    """
    if not checkpoint and any(folder.glob("*.safetensors")):
        return
    pickles = sorted(
        p.name for p in folder.iterdir()
        if p.suffix in PICKLE_SUFFIXES and not any(p.match(pattern) for pattern in TRAINER_STATE_PICKLES)
    )
    if pickles and not allow_pickle:
        raise FastftError(
            f"{what} {folder} holds model weights as pickle ({', '.join(pickles)}), which fastft never writes "
            "and which can run code when loaded. Convert them to safetensors, or add --allow-pickle if you trust where they "
            "came from."
        )


def check_resumable(run_dir: Path, checkpoint: Path, recipe: Recipe, allow_pickle: bool) -> None:
    """Raise `FastftError` unless `checkpoint` can continue this recipe's run exactly.

    The checkpoint must hold safetensors weights (see `refuse_pickle_weights`), and the
    recipe must match the one the run started with, except for keys that do not change
    the training (logging, saving, reporting).
    """
    refuse_pickle_weights(checkpoint, "Checkpoint", allow_pickle, checkpoint=True)
    if not any((checkpoint / name).exists() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FastftError(f"Checkpoint {checkpoint} holds no adapter weights, so it cannot be resumed. "
                          "Delete it to resume from an earlier one, or start again with --overwrite.")
    stored = run_dir / "recipe.toml"
    if not stored.exists():
        return
    from fastft.recipe import tomllib

    before, now = tomllib.loads(stored.read_text(encoding="utf-8")), recipe.to_dict()
    changed = [
        f"`{section}.{key}` (was {json.dumps(value)}, now {json.dumps(now[section][key])})"
        for section, values in before.items() if section in now
        for key, value in values.items()
        if key in now[section] and now[section][key] != value and f"{section}.{key}" not in RESUME_MAY_CHANGE
    ]
    if changed:
        raise FastftError(
            f"{recipe.source} differs from the recipe the run in {run_dir} started with: {', '.join(changed)}. "
            "A resumed run must train the same way. Undo the change, or start again with --overwrite "
            "(or --output DIR)."
        )


# Recipe keys that may change between an interrupted run and its resumption: they change what is
# logged, saved or shown, or how memory is traded for compute, not the numbers trained.
RESUME_MAY_CHANGE = {"train.output_dir", "train.logging_steps", "train.save_steps", "train.save_total_limit",
                     "train.eval_steps", "train.report_to", "train.sample_prompt", "train.gradient_checkpointing",
                     "model.attention"}


def check_same_data(checkpoint: Path, fingerprint: str) -> None:
    """Raise `FastftError` if the data changed since `checkpoint` was written (its mark records the fingerprint)."""
    try:
        saved = json.loads((checkpoint / COMPLETE_MARK).read_text()).get("dataset_fingerprint")
    except (ValueError, AttributeError):
        return  # a mark without a fingerprint: nothing to compare
    if saved and saved != fingerprint:
        raise FastftError(
            f"The training data changed since {checkpoint} was written (fingerprint {saved}, now {fingerprint}), "
            "so resuming would not continue the same run. Restore the data, or start again with --overwrite."
        )


def checkpoint_processes(checkpoint: Path) -> int | None:
    """How many processes wrote a complete checkpoint (None if its mark predates the record)."""
    try:
        mark = json.loads((checkpoint / COMPLETE_MARK).read_text())
    except (OSError, ValueError):
        return None
    return mark.get("processes") if isinstance(mark, dict) else None


def atomic_write(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_dir(final: Path):
    """A temporary sibling folder to fill; `commit()` swaps it into place in one rename."""

    class _Swap:
        def __init__(self):
            for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a save that was killed
                shutil.rmtree(stale, ignore_errors=True)
            self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            self.tmp.mkdir(parents=True)

        def commit(self):
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            if final.exists():
                final.rename(old)
            self.tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)

        def abort(self):
            shutil.rmtree(self.tmp, ignore_errors=True)

    return _Swap()


def save_adapter(model, tokenizer, recipe: Recipe, folder: Path, state_dict: dict | None = None) -> None:
    """Save the PEFT adapter and tokenizer into `folder` atomically, pointing at the recipe's model id.

    `state_dict`: the model's full state dict when the model itself holds only shards (FSDP).
    """
    swap = atomic_dir(folder)
    try:
        # Name the recipe's model id, not a cache path, in adapter_config.json and PEFT's model card.
        for config in model.peft_config.values():
            config.base_model_name_or_path = recipe.model.name
        model.get_base_model().config._name_or_path = recipe.model.name
        # fastft never resizes the vocabulary, so the base embeddings need not be saved, and PEFT need not
        # look the base model up (on the Hub, for an id) to find out.
        model.save_pretrained(swap.tmp, safe_serialization=True, state_dict=state_dict, save_embedding_layers=False)
        tokenizer.save_pretrained(swap.tmp)
        swap.commit()
    except BaseException:
        swap.abort()
        raise


# --------------------------------------------------------------------------- trainer pieces


def training_arguments(recipe: Recipe, run_dir: Path, eval_data: bool) -> dict:
    """The training arguments every backend shares (TRL `SFTConfig` keywords)."""
    import torch

    from fastft.backends.hf import compute_dtype
    from fastft.data import sampling_strategy

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
        train_sampling_strategy=sampling_strategy(recipe.data),  # lengths come from input_ids
        logging_steps=t.logging_steps, logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy=("steps" if eval_every else "epoch") if eval_data else "no", eval_steps=eval_every,
        report_to=report, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        gradient_checkpointing=False,  # the backend has already set it up its own way
        # LoRA uses every trainable weight in every step: DDP's search for unused ones only costs a graph
        # walk per step, and it breaks reentrant checkpointing (the `hf-stock` path).
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",  # gathered over processes: the global throughput
        max_length=None,  # the shared pipeline has truncated
        dataset_kwargs={"skip_prepare_dataset": True}, dataloader_num_workers=0,
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


class _Callback:
    """A Trainer callback without importing transformers here: the Trainer calls every on_* event."""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


class MarkComplete(_Callback):
    """Trainer callback: mark a checkpoint complete once the Trainer has finished writing it.

    The mark records the dataset fingerprint, so a resume can tell that the data changed.
    """

    def __init__(self, fingerprint: str = ""):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        wait_for_everyone()  # every process has written its part (its random state) before the mark
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                mark = {"step": state.global_step, "dataset_fingerprint": self.fingerprint,
                        "processes": args.world_size}  # resume needs the same data and process count
                (path / COMPLETE_MARK).write_text(json.dumps(mark))


class StopOnSignal(_Callback):
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


# --------------------------------------------------------------------------- reporting


def describe_data(data, recipe: Recipe) -> str:
    s = data.stats
    steps = optimizer_steps_per_epoch(len(data.train), recipe)
    text = (f"data: {s['train_examples']} train / {s['eval_examples']} eval examples, {s['train_tokens']:,} tokens "
            f"({s['loss_tokens']:,} carry loss); length min/mean/p95/max {s['length_min']}/{s['length_mean']}/"
            f"{s['length_p95']}/{s['length_max']}; {steps} optimizer steps per epoch")
    if s["truncated_examples"]:
        text += (f"\nwarning: {s['truncated_examples']} examples longer than data.max_length = {recipe.data.max_length} "
                 f"were truncated ({s['truncated_tokens']:,} tokens dropped)")
    if s["no_loss_examples"]:
        text += f"\nwarning: {s['no_loss_examples']} examples had no loss-carrying token left and were dropped"
    return text


def describe_padding(data, recipe: Recipe, tokenizer) -> str:
    """One line: the share of computed tokens that is padding at the recipe's batch size, per batching."""
    from fastft.data import padding_waste, sampling_strategy

    t = recipe.train
    if not isinstance(t.batch_size, int):
        return "padding: not computed, `train.batch_size = \"auto\"` is chosen at run time"
    chosen = "packed" if recipe.data.packing else sampling_strategy(recipe.data)
    shares = []
    for name, label, packing in (("random", "of computed tokens in random order", False),
                                 ("group_by_length", "grouped by length", False), ("packed", "packed", True)):
        sampling = "random" if packing else name
        waste = padding_waste(data.train, tokenizer, t.batch_size, packing, sampling, t.grad_accum, t.seed)
        shares.append(f"{100 * waste['padding_fraction']:.1f}% {label}" + (" (this recipe)" if name == chosen else ""))
    return f"padding at batch size {t.batch_size}: " + ", ".join(shares)


def optimizer_steps_per_epoch(n_examples: int, recipe: Recipe) -> int:
    if recipe.train.batch_size == "auto":  # however the planner splits it, global_batch_size examples per step
        return max(1, n_examples // recipe.train.global_batch_size)
    batch = recipe.train.batch_size
    micro_batches = -(-n_examples // (batch * world_size()))
    return max(1, micro_batches // recipe.train.grad_accum)


def sample_answer(model, tokenizer, recipe: Recipe, data, max_new_tokens: int = 48):
    """Answer one prompt with the trained adapter, formatted and stopped exactly as `fastft generate` does."""
    import torch

    from fastft.export import build_prompt, stop_token_ids

    prompt = recipe.train.sample_prompt
    if prompt:
        text, ids = build_prompt(prompt, recipe, tokenizer)
    else:  # the first training example's own prompt, as the pipeline rendered it
        first = data.previews[0] if data.previews else []
        text = "".join(t for t, loss in first if not loss)
        if not text or recipe.data.format == "text":
            return None
        ids = tokenizer(text, add_special_tokens=recipe.data.format != "chat")["input_ids"]
    ids = torch.tensor([ids], device=model.device)
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stop_token_ids(recipe, tokenizer),
                             pad_token_id=tokenizer.pad_token_id)
    return prompt or text, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def resume_command(recipe_path, backend, overrides, output, allow_pickle: bool = False,
                   gpu_memory: float | None = None) -> str:
    """The shell command that resumes this run (quoted for a POSIX shell, run from the same folder)."""
    import shlex

    parts = ["fastft", "run", str(recipe_path), "--backend", backend]
    if world_size() > 1:
        parts += ["--nproc", str(world_size())]
    for o in overrides:
        parts += ["--set", o]
    if output:
        parts += ["--output", str(output)]
    if gpu_memory:
        parts += ["--gpu-memory", f"{gpu_memory:g}"]
    if allow_pickle:
        parts.append("--allow-pickle")
    return shlex.join(parts + ["--resume"])


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("fastft", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets",
                 "unsloth", "liger-kernel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _quiet(*args, **kwargs) -> None:
    pass


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
