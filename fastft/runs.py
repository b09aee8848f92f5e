"""The run folder: claimed, written atomically, checkpointed, resumed.

    outputs/<name>/
      recipe.toml      the resolved recipe (rerunnable as is)
      fastft.json      run summary: backend, versions, seed, data fingerprint, tokens, losses, wall time,
                       eval loss before/after, the sample prompt's base and fine-tuned answers
      loss.png         training and eval losses (fastft/run_report.py)
      adapter/         PEFT adapter (safetensors) and tokenizer, loadable with stock PEFT
      checkpoints/     resumable checkpoints, each marked complete only once fully written
      logs/            TensorBoard events

Everything here decides or writes files; nothing trains. `fastft/train.py` calls it in order:
decide what happens to the folder, check a checkpoint can resume, write the recipe, mark
checkpoints complete, save the adapter and the summary; running out of disk space on the way
becomes one paragraph (`explain_disk_full`). Which run may write the folder at all is
`fastft/claim.py`'s job.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path

from fastft.distributed import is_main_process, wait_for_everyone, world_size
from fastft.errors import FastftError
from fastft.recipe import Recipe, to_toml

COMPLETE_MARK = "fastft-complete"  # written last into a checkpoint: its absence means "half written"


# --------------------------------------------------------------------------- the folder


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
    # A run that failed (or was killed) before saving anything leaves only its recipe, logs and
    # half-written checkpoints: not worth keeping. Hidden entries are leftovers of interrupted atomic saves.
    occupied = run_dir.exists() and (
        any(p.name not in ("recipe.toml", "checkpoints", "logs") and not p.name.startswith(".")
            for p in run_dir.iterdir())
        or latest_checkpoint(run_dir) is not None
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


def open_run_dir(run_dir: Path, recipe: Recipe, overwrite: bool, checkpoint: Path | None, echo=print) -> None:
    """Make the run folder ready to write, once the new run's recipe, data and model are known to be good.

    Rank 0 deletes the earlier run (`overwrite`) and half-written checkpoints, creates the folder
    and writes the resolved recipe; every process waits until it has.
    """
    if is_main_process():
        if overwrite:
            clear_run_dir(run_dir)
        if run_dir.exists():  # a checkpoint cut short by a kill or a full disk: nothing to keep
            drop_incomplete_checkpoints(run_dir, echo)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "recipe.toml", to_toml(recipe))
    wait_for_everyone()  # rank 0 has cleared and created the folder before anyone writes into it


def clear_run_dir(run_dir: Path) -> None:
    """Delete an earlier run (after `claim_run_dir` allowed it with `overwrite`)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)


# --------------------------------------------------------------------------- checkpoints and resuming


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


def drop_incomplete_checkpoints(run_dir: Path, echo=print) -> list[Path]:
    """Delete checkpoints without the completion mark, so a resumed run cannot mix in their files; return them."""
    dropped = [p for p in _checkpoints(run_dir / "checkpoints") if not (p / COMPLETE_MARK).exists()]
    for p in dropped:
        echo(f"removing {p}: it was never completely written")
        shutil.rmtree(p)
    return dropped


def rotate_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (fastft's `train.save_total_limit`).

    Done here rather than by the Trainer, which deletes old checkpoints before the new one is
    marked complete: a kill in between could leave none that counts. Each mark goes first, so
    a deletion cut short leaves nothing that looks complete.
    """
    done = sorted((p for p in _checkpoints(run_dir / "checkpoints") if (p / COMPLETE_MARK).exists()), key=_step)
    for p in done[:-keep] if keep else []:
        (p / COMPLETE_MARK).unlink()
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
                     "model.attention", "data.num_proc"}  # num_proc: the same examples for any value


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


# --------------------------------------------------------------------------- writing


def atomic_write(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it (nor a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        # PEFT holds target_modules as a set and writes it in hash order, which differs from process to
        # process: sorted, the same adapter gives the same file.
        saved = swap.tmp / "adapter_config.json"
        config = json.loads(saved.read_text())
        config.update({k: sorted(v) for k, v in vars(model.peft_config["default"]).items() if isinstance(v, set)})
        saved.write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(swap.tmp)
        swap.commit()
    except BaseException:
        swap.abort()
        raise


class Callback:
    """A Trainer callback without importing transformers here: the Trainer calls every on_* event."""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


class MarkComplete(Callback):
    """Trainer callback: mark a checkpoint complete once the Trainer has finished writing it.

    The mark records the dataset fingerprint, so a resume can tell that the data changed.
    Then the oldest complete checkpoints beyond `keep` are deleted (`rotate_checkpoints`).
    """

    def __init__(self, fingerprint: str = "", keep: int = 0):
        self.fingerprint, self.keep = fingerprint, keep  # keep: the newest complete checkpoints kept (0: all)

    def on_save(self, args, state, control, **kwargs):
        wait_for_everyone()  # every process has written its part (its random state) before the mark
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                mark = {"step": state.global_step, "dataset_fingerprint": self.fingerprint,
                        "processes": args.world_size}  # resume needs the same data and process count
                atomic_write(path / COMPLETE_MARK, json.dumps(mark))  # a mark cut short by a full disk does not count
                rotate_checkpoints(Path(args.output_dir).parent, self.keep)


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


# --------------------------------------------------------------------------- a full disk


class DiskFull(FastftError):
    """Out of disk space (or over the file-size limit) while writing; `command` goes on (resumes or restarts)."""

    def __init__(self, message: str, command: str = ""):
        super().__init__(message)
        self.command = command


# What writers say when the disk is full: Python and safetensors give the errno, torch.save only
# "unexpected pos" (its zip writer noticed the short write) or "PytorchStreamWriter failed writing".
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
DISK_FULL_SIGNS = ("No space left on device", "File too large", "Disk quota exceeded", "(os error 28)",
                   "(os error 27)", "(os error 122)", "unexpected pos", "PytorchStreamWriter failed writing")


def is_disk_full(e: BaseException | None) -> bool:
    """True if `e`, or an exception it was raised from or while handling, is a write refused for lack of space."""
    return any(isinstance(x, OSError) and x.errno in DISK_FULL_ERRNOS or any(s in str(x) for s in DISK_FULL_SIGNS)
               for x in _chain(e))


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


@contextlib.contextmanager
def explain_disk_full(what: str, where: Path, needs: float, run_dir: Path | None = None, resume: str = "",
                      cleanup=None):
    """Turn running out of disk space inside the block into a `DiskFull` paragraph (exit code 2).

    `cleanup()` removes the half-written piece and returns what it removed; see `disk_full_error`.
    """
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise disk_full_error(e, what, where, needs, run_dir, resume, cleanup() if cleanup else []) from None


def disk_full_error(e: BaseException, what: str, where: Path, needs: float, run_dir: Path | None = None,
                    resume: str = "", removed=()) -> DiskFull | None:
    """The `DiskFull` error for `e` if it is a write refused for lack of space, else None.

    It says what was being written (`what`) and where, about how much it needs (`needs`, bytes)
    against what is free, what half-written piece was `removed`, and how to go on: in a run
    folder (`run_dir`), from the last complete checkpoint with the `resume` command, or with the
    same command without --resume when no checkpoint is complete.
    """
    if not is_disk_full(e):
        return None
    place = next((p for p in (Path(where), *Path(where).parents) if p.exists()), Path("."))
    free = shutil.disk_usage(place).free
    # torch.save does not say why its write failed: with space left and a file-size limit set, it was the limit.
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    size_limit = any(isinstance(x, OSError) and x.errno == errno.EFBIG or "File too large" in str(x)
                     or "(os error 27)" in str(x) for x in _chain(e)) or (limit != resource.RLIM_INFINITY
                                                                           and free > needs)
    why = (f"a file grew past this process's file-size limit (`ulimit -f`, {_size(limit)})" if size_limit
           else "the disk is full")
    message = (f"Could not write {what} to {where}: {why}. It needs about {_size(needs)}, and {_size(free)} is free "
               "on that filesystem. ")
    message += f"The half-written {', '.join(p.name for p in removed)} was removed. " if removed else \
        "Nothing half-written was kept. "
    if run_dir is None:
        return DiskFull(message + "Free some space (or raise the limit) and run the command again.")
    last = latest_checkpoint(run_dir)
    if last:
        return DiskFull(message + f"The last complete checkpoint is {last}. Free some space (or raise the limit), "
                        "then resume with:", command=resume)
    return DiskFull(message + "No checkpoint is complete yet. Free some space (or raise the limit), then start "
                    "again with:", command=resume.removesuffix(" --resume"))


def _chain(e: BaseException | None):
    """`e` and the exceptions it was raised from or while handling."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


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
