"""`fastft run`: one fine-tune, top to bottom.

    setup:  recipe -> backend -> run folder -> tokenizer -> data   (all checked before the model loads)
    train:  model + LoRA -> trainer -> train (resumable, interruptible)
    save:   adapter + tokenizer (atomically) -> run summary -> sample answer

The run folder:

    outputs/<name>/
      recipe.toml      the resolved recipe (rerunnable as is)
      fastft.json      run summary: backend, versions, seed, data fingerprint, tokens, losses, wall time
      adapter/         PEFT adapter (safetensors) and tokenizer, loadable with stock PEFT
      checkpoints/     resumable checkpoints, each marked complete only once fully written
      logs/            TensorBoard events
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from fastft.errors import FastftError
from fastft.recipe import Recipe, load_recipe, to_toml

COMPLETE_MARK = "fastft-complete"  # written last into a checkpoint: its absence means "half written"


class Interrupted(FastftError):
    """Training stopped on Ctrl-C/SIGTERM after saving a checkpoint."""

    exit_code = 130


def run(recipe_path: str, backend: str = "hf", overrides: tuple = (), output: str | None = None,
        resume: bool = False, overwrite: bool = False, echo=print, backend_options: dict | None = None) -> Path:
    """Fine-tune per the recipe and return the run folder. Raises `FastftError` on bad input."""
    started = time.time()
    # --- setup: everything that can be wrong is found before the model loads
    recipe = load_recipe(recipe_path, overrides)
    from fastft.backends import get_backend

    engine = get_backend(backend, **(backend_options or {}))  # Unsloth, if chosen, is imported here, first
    run_dir = Path(output or recipe.train.output_dir or Path("outputs") / recipe.name)
    checkpoint = claim_run_dir(run_dir, resume, overwrite)

    from fastft.data import prepare
    from fastft.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe, tokenizer, echo=echo)
    echo(describe_data(data, recipe))
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "recipe.toml", to_toml(recipe))

    # --- train
    model = engine.load_model(recipe, resolve_model(recipe.model.name))
    trainable, total = model.get_nb_trainable_parameters()
    echo(f"model: {recipe.model.name} ({recipe.model.quantization}), backend {engine.name}, "
         f"LoRA r={recipe.lora.r}: {trainable:,} trainable of {total:,} parameters")
    stopper = StopOnSignal()
    trainer = engine.make_trainer(
        recipe, model, tokenizer, data.train.to_dataset(), data.eval.to_dataset() if len(data.eval) else None,
        training_arguments(recipe, run_dir, eval_data=len(data.eval) > 0), callbacks=[MarkComplete(), stopper],
    )
    with stopper.installed():
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stopper.stopped:
        raise Interrupted(
            f"Interrupted at step {trainer.state.global_step}; a checkpoint was saved in {run_dir / 'checkpoints'}. "
            f"Resume with: {resume_command(recipe_path, backend, overrides, output)}"
        )

    # --- save
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    summary = {
        "recipe": str(Path(recipe_path).resolve()), "model": recipe.model.name, "backend": engine.name,
        "seed": recipe.train.seed, "dataset_fingerprint": data.fingerprint, "data": data.stats,
        "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "final_eval_loss": evals[-1] if evals else None,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "wall_time_s": round(time.time() - started, 2), "versions": library_versions(), "resumed_from": str(checkpoint or ""),
    }
    if is_main_process():
        save_adapter(trainer.model, tokenizer, recipe, run_dir / "adapter")
        atomic_write(run_dir / "fastft.json", json.dumps(summary, indent=2))
        echo(f"loss: first {summary['first_loss']}, last {summary['final_loss']}"
             + (f", eval {summary['final_eval_loss']:.4f}" if evals else ""))
        echo(f"adapter saved in {run_dir / 'adapter'} ({summary['wall_time_s']:.0f} s)")
        sample = sample_answer(trainer.model, tokenizer, recipe, data)
        if sample:
            echo(f"sample: {sample[0]!r}\n  -> {sample[1]!r}")
    return run_dir


# --------------------------------------------------------------------------- run folder


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Decide what happens to an existing run folder; return the checkpoint to resume from.

    Never writes into a folder holding an earlier run unless told to (`resume`/`overwrite`).
    """
    if resume and overwrite:
        raise FastftError("--resume and --overwrite contradict each other: choose one.")
    # A run that failed before saving anything leaves only its recipe and empty folders: not worth keeping.
    occupied = run_dir.exists() and (
        any(p.name not in ("recipe.toml", "checkpoints", "logs") for p in run_dir.iterdir())
        or any((run_dir / "checkpoints").glob("checkpoint-*"))
    )
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FastftError(f"{run_dir}: no complete checkpoint to resume from. Run without --resume to start "
                              "(add --overwrite to replace what is there).")
        return checkpoint
    if occupied and not overwrite:
        raise FastftError(
            f"{run_dir} already holds an earlier run. Add --resume to continue it from its last checkpoint, "
            "--overwrite to replace it, or --output DIR to write elsewhere."
        )
    if run_dir.exists() and overwrite and is_main_process():
        shutil.rmtree(run_dir)
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that was completely written (half-written ones are ignored)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE_MARK).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def atomic_write(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_dir(final: Path):
    """A temporary sibling folder to fill; `commit()` swaps it into place in one rename."""

    class _Swap:
        def __init__(self):
            self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            shutil.rmtree(self.tmp, ignore_errors=True)
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


def save_adapter(model, tokenizer, recipe: Recipe, folder: Path) -> None:
    """Save the PEFT adapter and tokenizer into `folder` atomically, pointing at the recipe's model id."""
    swap = atomic_dir(folder)
    try:
        model.save_pretrained(swap.tmp, safe_serialization=True)
        tokenizer.save_pretrained(swap.tmp)
        config_path = swap.tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = recipe.model.name  # not a cache or temporary path
        config_path.write_text(json.dumps(config, indent=2))
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
        max_length=None,  # the shared pipeline has truncated
        dataset_kwargs={"skip_prepare_dataset": True}, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


class MarkComplete:
    """Trainer callback: mark a checkpoint complete once the Trainer has finished writing it."""

    def __getattr__(self, name):  # the Trainer calls every on_* event; only on_save matters here
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                (path / COMPLETE_MARK).write_text(str(state.global_step))


class StopOnSignal(MarkComplete):
    """Ctrl-C/SIGTERM: finish the current step, save a checkpoint, stop. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped:
            control.should_save = True
            control.should_training_stop = True
        return control

    def installed(self):
        import contextlib

        @contextlib.contextmanager
        def handlers():
            def handle(signum, frame):
                if self.stopped:
                    raise KeyboardInterrupt
                self.stopped = True
                print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort now)", file=sys.stderr)

            previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

        return handlers()


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
    batch = recipe.train.batch_size if isinstance(recipe.train.batch_size, int) else 1
    micro_batches = -(-n_examples // (batch * world_size()))
    return max(1, micro_batches // recipe.train.grad_accum)


def sample_answer(model, tokenizer, recipe: Recipe, data, max_new_tokens: int = 48):
    """Answer one prompt with the trained adapter, formatted exactly as in training."""
    import torch

    from fastft.data import read_records, render, render_prompt

    prompt = recipe.train.sample_prompt
    if not prompt:
        first = data.previews[0] if data.previews else []
        text = "".join(t for t, loss in first if not loss)
        if not text or recipe.data.format == "text":
            return None
    else:
        text = render_prompt(prompt, recipe.data, tokenizer)
    ids = tokenizer(text, add_special_tokens=recipe.data.format != "chat", return_tensors="pt").to(model.device)
    model.eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return prompt or text, tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def resume_command(recipe_path, backend, overrides, output) -> str:
    parts = ["fastft", "run", str(recipe_path), "--backend", backend]
    parts += [f"--set {o}" for o in overrides]
    if output:
        parts += ["--output", str(output)]
    return " ".join(parts + ["--resume"])


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


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
