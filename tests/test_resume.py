"""Nothing lost: interruption, exact resume, atomic saves, protected run folders, no foreign pickle.

One uninterrupted tiny run (module fixture) is the reference; the other runs resume copies of
its folder or are interrupted in a subprocess, and must end on the same loss.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PYTHONPATH, qa_rows, tiny_recipe, write_jsonl

from fastft.errors import FastftError
from fastft.runs import COMPLETE_MARK, latest_checkpoint, save_adapter
from fastft.train import StopOnSignal, run

STEPS = 8
# Dropout makes the result depend on the restored RNG state; checkpoints at steps 3, 6 and 8 (the end).
OVERRIDES = ("lora.dropout=0.1", "train.save_steps=3", "train.save_total_limit=4")


def quiet(*_):
    pass


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "fastft.json").read_text())


def losses(checkpoint: Path) -> list:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * abs(b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The recipe and the folder of one uninterrupted run of STEPS steps."""
    tmp = tmp_path_factory.mktemp("resume")
    recipe = tiny_recipe(tmp, steps=STEPS)
    run_dir = run(str(recipe), overrides=OVERRIDES, output=str(tmp / "reference"), echo=quiet)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-3", "checkpoint-6", "checkpoint-8"]
    return recipe, run_dir


def copy_run(reference_dir: Path, to: Path, keep: int) -> Path:
    """A copy of the reference run as it stood when checkpoint `keep` had just been written."""
    shutil.copytree(reference_dir, to)
    for p in (to / "checkpoints").glob("checkpoint-*"):
        if int(p.name.split("-")[1]) > keep:
            shutil.rmtree(p)
    for name in ("adapter", "fastft.json"):
        shutil.rmtree(to / name) if (to / name).is_dir() else (to / name).unlink()
    return to


def test_resume_reaches_the_uninterrupted_loss_and_skips_half_written_checkpoints(reference, tmp_path):
    recipe, ref = reference
    run_dir = copy_run(ref, tmp_path / "run", keep=6)
    # checkpoint-6 was being written when the process died: no completion mark, truncated weights
    half = run_dir / "checkpoints" / "checkpoint-6"
    (half / COMPLETE_MARK).unlink()
    weights = half / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "checkpoint-3"

    run(str(recipe), overrides=OVERRIDES, output=str(run_dir), resume=True, echo=quiet)
    resumed, expected = summary(run_dir), summary(ref)
    assert resumed["resumed_from"] == str(run_dir / "checkpoints" / "checkpoint-3")
    assert resumed["steps"] == STEPS
    assert close(resumed["final_loss"], expected["final_loss"]), (resumed["final_loss"], expected["final_loss"])
    # every step after the resume point, not only the last, is the same
    final = losses(run_dir / "checkpoints" / "checkpoint-8")
    assert len(final) == STEPS and all(close(a, b) for a, b in zip(final, losses(ref / "checkpoints" / "checkpoint-8")))
    assert (half / COMPLETE_MARK).exists() and weights.stat().st_size > 100  # written again, completely


def test_interrupt_saves_a_checkpoint_and_prints_the_exact_resume_command(reference, tmp_path, monkeypatch):
    """SIGINT after the first logged step: exit 130, a complete checkpoint, a command that finishes the run."""
    recipe, ref = reference
    out = tmp_path / "interrupted"
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    args = ["run", str(recipe), *sets, "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastft", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    output = ""
    while "{'loss': " not in output:  # the Trainer prints each logged step as a dict
        line = proc.stdout.readline()
        assert line, f"run ended before logging a step: {output}"
        output += line
    proc.send_signal(signal.SIGINT)
    output += proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    from fastft.claim import lock_file

    assert not lock_file(out).exists()  # Ctrl-C released the folder's claim

    step = int(output.split("Interrupted at step ")[1].split()[0])
    assert 1 <= step < STEPS
    checkpoint = out / "checkpoints" / f"checkpoint-{step}"
    assert latest_checkpoint(out) == checkpoint
    assert json.loads((checkpoint / COMPLETE_MARK).read_text())["step"] == step
    command = output.strip().splitlines()[-1].strip()
    expected = ["fastft", "run", str(recipe), "--backend", "hf", *sets, "--output", str(out), "--resume"]
    assert command == shlex.join(expected)

    # the printed command, through the same command line, in this process (saves a second start-up)
    from fastft.cli import main

    monkeypatch.setattr(sys, "argv", shlex.split(command))
    main()  # returns on success; a failure would exit with its code
    resumed = summary(out)
    assert resumed["resumed_from"] == str(checkpoint) and resumed["steps"] == STEPS
    assert close(resumed["final_loss"], summary(ref)["final_loss"])


def test_a_second_signal_aborts_at_once():
    from transformers import TrainerControl

    previous = signal.getsignal(signal.SIGINT)
    stopper = StopOnSignal()
    with stopper.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # Python runs handlers between bytecodes of the main thread
            if stopper.stopped:
                break
            time.sleep(0.01)
        assert stopper.stopped
        control = stopper.on_step_end(None, None, TrainerControl())
        assert control.should_save and control.should_training_stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is previous


@pytest.fixture(scope="module")
def model_and_tokenizer(reference):
    from fastft.backends.hf import HFBackend
    from fastft.models import load_tokenizer, resolve_model
    from fastft.recipe import load_recipe

    recipe = load_recipe(reference[0])
    return recipe, HFBackend().load_model(recipe, resolve_model(recipe.model.name)), load_tokenizer(recipe.model)


def test_a_failed_save_leaves_no_adapter_that_looks_complete(model_and_tokenizer, tmp_path, monkeypatch):
    recipe, model, tokenizer = model_and_tokenizer
    folder = tmp_path / "adapter"
    real_save = model.save_pretrained

    def save_then_fail(path, **kwargs):
        real_save(path, **kwargs)  # the weights are written, the rest of the save is not
        raise OSError("No space left on device")

    monkeypatch.setattr(model, "save_pretrained", save_then_fail)
    with pytest.raises(OSError):
        save_adapter(model, tokenizer, recipe, folder)
    assert not folder.exists() and list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    save_adapter(model, tokenizer, recipe, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(before)
    monkeypatch.setattr(model, "save_pretrained", save_then_fail)
    with pytest.raises(OSError):
        save_adapter(model, tokenizer, recipe, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the earlier adapter, untouched


def test_a_killed_save_leaves_no_adapter_that_looks_complete(model_and_tokenizer, tmp_path):
    """SIGKILL midway through a save (no cleanup code can run): no `adapter/`; the next save succeeds."""
    recipe, model, tokenizer = model_and_tokenizer
    folder = tmp_path / "adapter"
    pid = os.fork()
    if pid == 0:  # the child writes the weights, then dies before the save completes
        try:
            real_save = model.save_pretrained
            model.save_pretrained = lambda path, **kw: (real_save(path, **kw), os.kill(os.getpid(), signal.SIGKILL))
            save_adapter(model, tokenizer, recipe, folder)
        finally:
            os._exit(1)  # never return into pytest in the child
    deadline = time.time() + 120
    while (result := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.time() < deadline:
        time.sleep(0.05)
    assert result[0] == pid and os.WIFSIGNALED(result[1]) and os.WTERMSIG(result[1]) == signal.SIGKILL
    assert not folder.exists()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".adapter.tmp-")
    assert (leftovers[0] / "adapter_model.safetensors").exists()  # it was killed midway, not before starting

    save_adapter(model, tokenizer, recipe, folder)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the stale temporary folder is gone


def test_run_folders_are_protected(reference, tmp_path, monkeypatch):
    """Never write into an earlier run without --resume or --overwrite; never delete a folder that is not a run."""
    recipe, ref = reference
    earlier = copy_run(ref, tmp_path / "earlier", keep=STEPS)
    (earlier / "fastft.json").write_text("{}")
    state = sorted(str(p.relative_to(earlier)) for p in earlier.rglob("*"))
    with pytest.raises(FastftError, match=r"already holds an earlier run. Add --resume .* --overwrite to replace it"):
        run(str(recipe), overrides=OVERRIDES, output=str(earlier), echo=quiet)
    with pytest.raises(FastftError, match="contradict"):
        run(str(recipe), overrides=OVERRIDES, output=str(earlier), resume=True, overwrite=True, echo=quiet)
    # --overwrite with bad data fails before the earlier run is deleted
    bad = tiny_recipe(tmp_path / "bad", rows=qa_rows(2) + [{"question": "Q"}])
    with pytest.raises(FastftError, match=r"line 3: the record has no field `answer`"):
        run(str(bad), output=str(earlier), overwrite=True, echo=quiet)
    assert sorted(str(p.relative_to(earlier)) for p in earlier.rglob("*")) == state
    # ... and so does a setting the backend refuses only when it loads the model (no GPU for Liger here)
    with pytest.raises(FastftError, match=r"model\.liger_kernels = true"):
        run(str(recipe), overrides=OVERRIDES + ("model.liger_kernels=true",), output=str(earlier), overwrite=True,
            echo=quiet)
    assert sorted(str(p.relative_to(earlier)) for p in earlier.rglob("*")) == state

    home = tmp_path / "home"
    write_jsonl(home / "notes.jsonl", [{"mine": 1}])
    with pytest.raises(FastftError, match="not a fastft run, so --overwrite will not delete it"):
        run(str(recipe), output=str(home), overwrite=True, echo=quiet)
    assert (home / "notes.jsonl").exists()
    with pytest.raises(FastftError, match="no complete checkpoint to resume from"):
        run(str(recipe), output=str(tmp_path / "empty"), resume=True, echo=quiet)


def test_resume_refuses_a_changed_recipe_or_changed_data(reference, tmp_path):
    recipe, ref = reference
    run_dir = copy_run(ref, tmp_path / "run", keep=6)
    with pytest.raises(FastftError, match=r"`train\.learning_rate` \(was 0\.001, now 0\.002\)"):
        run(str(recipe), overrides=OVERRIDES + ("train.learning_rate=2e-3",), output=str(run_dir), resume=True,
            echo=quiet)
    # the same recipe, but its data file now holds other records
    changed = tiny_recipe(tmp_path / "changed", steps=STEPS, rows=qa_rows(17)[1:])
    stored = run_dir / "recipe.toml"
    stored.write_text(stored.read_text().replace(str(recipe.parent), str(changed.parent)))
    with pytest.raises(FastftError, match="The training data changed since .*checkpoint-6 was written"):
        run(str(changed), overrides=OVERRIDES, output=str(run_dir), resume=True, echo=quiet)


def test_resume_accepts_changed_logging_saving_and_reporting(reference, tmp_path):
    """The keys that change only what is logged, saved or reported may differ on --resume; the run ends on
    the uninterrupted adapter exactly."""
    from safetensors.torch import load_file

    recipe, ref = reference
    run_dir = copy_run(ref, tmp_path / "run", keep=6)
    changed = ("lora.dropout=0.1", "train.save_steps=1", "train.save_total_limit=3", "train.logging_steps=2",
               "train.report_to=tensorboard", "train.eval_steps=5", 'train.sample_prompt="Combien font 1 et 2 ?"')
    run(str(recipe), overrides=changed, output=str(run_dir), resume=True, echo=quiet)
    assert summary(run_dir)["steps"] == STEPS and summary(run_dir)["resumed_from"].endswith("checkpoint-6")
    assert (run_dir / "checkpoints" / "checkpoint-7" / COMPLETE_MARK).exists()  # the new save_steps applied
    history = json.loads((run_dir / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h][-3:] == [5, 6, 8]  # and the new logging_steps
    resumed, expected = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (run_dir, ref))
    assert resumed.keys() == expected.keys() and all(resumed[k].equal(expected[k]) for k in expected)


def test_pickle_weights_from_elsewhere_need_allow_pickle(reference, tmp_path):
    """A checkpoint whose adapter is a pickle (.bin), or a base model with only pickle weights, is refused."""
    import torch
    from safetensors.torch import load_file

    recipe, ref = reference
    run_dir = copy_run(ref, tmp_path / "run", keep=STEPS)
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{STEPS}"
    weights = checkpoint / "adapter_model.safetensors"
    torch.save(load_file(weights), checkpoint / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(FastftError, match=r"Checkpoint \S*checkpoint-8 holds model weights as pickle "
                                          r"\(adapter_model\.bin\).* --allow-pickle"):
        run(str(recipe), overrides=OVERRIDES, output=str(run_dir), resume=True, echo=quiet)
    run(str(recipe), overrides=OVERRIDES, output=str(run_dir), resume=True, allow_pickle=True, echo=quiet)
    assert summary(run_dir)["resumed_from"] == str(checkpoint)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()  # what fastft writes is safetensors

    from fastft.models import resolve_model

    model = tmp_path / "pickled-model"
    shutil.copytree(resolve_model("fastft:tiny"), model)
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    with pytest.raises(FastftError, match=r"`model\.name` \S*pickled-model holds model weights as pickle "
                                          r"\(pytorch_model\.bin\)"):
        run(str(recipe), overrides=(f"model.name={model}",), output=str(tmp_path / "new"), echo=quiet)


# --------------------------------------------------------------------------- exact resume in every epoch

# 4 examples of varied lengths, batch 2: 2 optimizer steps per epoch, 3 epochs. A checkpoint every
# step; the resumes start from step 3 (halfway through epoch 2) and step 5 (halfway through epoch 3),
# where the Trainer skips the epoch's first batches (at an epoch's start it restores the random state first).
EPOCH_STEPS, EPOCHS = 2, 3
SAMPLINGS = {
    "random": ("data.group_by_length=false",),
    "group_by_length": ("data.group_by_length=true",),
    "packing": ("data.packing=true",),
}
EPOCH_OVERRIDES = ("lora.dropout=0.1", "train.batch_size=2", "train.save_steps=1", "train.save_total_limit=6", "train.seed=2")


def varied_rows() -> list:
    return [{"question": f"Question {i} ?", "answer": " ".join(["mot"] * (1 + 3 * i))} for i in range(4)]


@pytest.fixture(scope="module")
def epoch_references(tmp_path_factory):
    """One uninterrupted 3-epoch run per sampling: {sampling: (recipe, overrides, run folder)}."""
    tmp = tmp_path_factory.mktemp("epochs")
    recipe = tiny_recipe(tmp, steps=EPOCH_STEPS * EPOCHS, rows=varied_rows())
    refs = {}
    for sampling, extra in SAMPLINGS.items():
        overrides = EPOCH_OVERRIDES + extra
        refs[sampling] = recipe, overrides, run(str(recipe), overrides=overrides, output=str(tmp / sampling),
                                               echo=quiet)
    return refs


def adapter_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("step", [3, 5], ids=["epoch2", "epoch3"])
def test_resume_in_a_later_epoch_gives_the_uninterrupted_adapter_exactly(epoch_references, sampling, step, tmp_path):
    recipe, overrides, ref = epoch_references[sampling]
    run_dir = copy_run(ref, tmp_path / "run", keep=step)
    run(str(recipe), overrides=overrides, output=str(run_dir), resume=True, echo=quiet)
    assert summary(run_dir)["resumed_from"].endswith(f"checkpoint-{step}")
    resumed, expected = adapter_weights(run_dir), adapter_weights(ref)
    assert resumed.keys() == expected.keys() and expected
    worst = max((resumed[k] - expected[k]).abs().max().item() for k in expected)
    assert worst == 0, f"resumed at step {step} ({sampling}): adapter differs by up to {worst}"
    end = f"checkpoint-{EPOCH_STEPS * EPOCHS}"
    assert losses(run_dir / "checkpoints" / end) == losses(ref / "checkpoints" / end)


def test_length_grouped_order_is_transformers_order():
    """The numpy length grouping draws exactly transformers' `get_length_grouped_indices` order: sizes below and
    above 4 and 50 mega-batches, ties (lengths 1-2) and spread lengths, with the longest example anywhere."""
    import numpy as np
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from fastft.batching import length_grouped

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 12, 50, 199, 1000, 4321, 30000):
        for group_size in (1, 2, 3, 8, 32):
            for longest in (3, 2000):
                lengths = rng.integers(1, longest, n).tolist()
                seed = n * 100 + group_size
                expected = get_length_grouped_indices(lengths, group_size, generator=torch.Generator().manual_seed(seed))
                got = length_grouped(np.array(lengths), group_size, torch.Generator().manual_seed(seed))
                assert got == expected, (n, group_size, longest)


@pytest.mark.parametrize("group_size", [0, 2], ids=["random", "group_by_length"])
def test_each_epochs_order_depends_on_seed_and_epoch_alone(group_size):
    """Whatever ran before (earlier epochs, other draws from the global random state), epoch e has one order;
    under 2 processes, each process's batches are its turn of that same order, also when a resumed
    epoch skips its first batches."""
    import torch
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader

    from fastft.batching import EpochOrder

    lengths = [3, 9, 4, 7, 1, 8, 2, 6, 5, 10, 12, 11]
    through = EpochOrder(len(lengths), seed=3, lengths=lengths, group_size=group_size)
    orders = []
    for epoch in range(3):
        through.set_epoch(epoch)
        orders.append(list(through))
        torch.rand(100)  # training draws from the global random state between epochs
    fresh = EpochOrder(len(lengths), seed=3, lengths=lengths, group_size=group_size)
    torch.manual_seed(12345)
    fresh.set_epoch(2)
    assert list(fresh) == orders[2]
    assert sorted(orders[2]) == list(range(len(lengths))) and len({tuple(o) for o in orders}) == 3
    if not group_size:  # random order is the one accelerate's seedable sampler drew (seed + epoch)
        assert orders[1] == torch.randperm(len(lengths), generator=torch.Generator().manual_seed(4)).tolist()

    batches = [orders[2][i:i + 2] for i in range(0, len(lengths), 2)]
    for rank in range(2):
        order = EpochOrder(len(lengths), seed=3, lengths=lengths, group_size=group_size)
        loader = prepare_data_loader(DataLoader(list(range(len(lengths))), batch_size=2, sampler=order),
                                     num_processes=2, process_index=rank, put_on_device=False)
        loader = skip_first_batches(loader, 1)  # resumed after this process's first batch of epoch 2
        order.set_epoch(2)  # what the trainer's _run_epoch does
        assert [b.tolist() for b in loader] == batches[2 + rank::2]
