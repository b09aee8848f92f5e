"""Faults of the machine: a folder two runs want, a full disk, `kill -9` at any moment.

The `fastft` processes here are real command lines, forked from one process that has imported
everything once (tests/fork_runner.py), so that killing and restarting many of them stays cheap.
A full disk is made without root: the child runs under `resource.setrlimit(RLIMIT_FSIZE, ...)`
with SIGXFSZ ignored, so a write past the limit fails with EFBIG, as a full disk fails with ENOSPC
(fastft treats both the same way).
"""

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PYTHONPATH, ROOT, qa_rows, tiny_recipe

from fastft.claim import lock_file
from fastft.runs import COMPLETE_MARK, latest_checkpoint

STEPS = 4  # all in the first epoch (64 examples, batch 4: 16 steps per epoch); checkpoints at 2 and 4
SETS = ["--set", "lora.dropout=0.1", "--set", "train.save_steps=2"]  # dropout: the restored RNG state matters


class Runner:
    """tests/fork_runner.py, driven from the test: start a `fastft` command, wait for it."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": PYTHONPATH}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fork_runner.py")], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def start(self, args, log: Path, fsize: int | None = None) -> int:
        log.write_text("")  # there from the start, for the test to watch
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in args], "log": str(log), "fsize": fsize}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"]

    def wait(self) -> int:
        """The exit code of the command started last (minus the signal that killed it)."""
        return json.loads(self.proc.stdout.readline())["status"]

    def run(self, args, log: Path, fsize: int | None = None) -> tuple[int, str]:
        self.start(args, log, fsize)
        return self.wait(), read(log)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


@pytest.fixture(scope="module")
def reference(runner, tmp_path_factory):
    """The recipe and the adapter of one uninterrupted run."""
    tmp = tmp_path_factory.mktemp("faults")
    recipe = tiny_recipe(tmp, steps=STEPS, rows=qa_rows(64))
    status, log = runner.run(["run", recipe, *SETS, "--output", tmp / "reference"], tmp / "reference.log")
    assert status == 0, log
    return recipe, adapter(tmp / "reference")


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def read(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")


def paragraph(log: str) -> str:
    return " ".join(log.split())


def printed_command(log: str) -> str:
    """The command an error printed on a line of its own, after its paragraph."""
    return next(line.strip() for line in log.splitlines() if line.startswith("    fastft "))


# --------------------------------------------------------------------------- two runs, one folder


def hold(run_dir: Path) -> subprocess.Popen:
    """Another process holding `run_dir`'s claim (as a running `fastft run` does) until it is killed."""
    code = ("import sys, time; from pathlib import Path; from fastft.claim import take; "
            "take(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env={**os.environ, "PYTHONPATH": PYTHONPATH},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_run_on_a_held_folder_exits_2_naming_the_holder(runner, reference, tmp_path):
    import socket

    recipe, _ = reference
    out = tmp_path / "out"
    holder = hold(out)
    try:
        for flags in ([], ["--resume"], ["--overwrite"]):
            status, log = runner.run(["run", recipe, "--output", out, *flags], tmp_path / "second.log")
            text = paragraph(log)
            assert status == 2 and "Traceback" not in log, log
            assert (f"{out} is in use by another fastft run (process {holder.pid} on {socket.gethostname()}, "
                    "started ") in text
            assert "--output DIR" in text and "wait for that run to end" in text
            assert "model:" not in log and not out.exists()  # refused at once: nothing loaded, nothing written
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing (SIGKILL): its claim is stale and the next run takes it over.
    status, log = runner.run(["run", recipe, *SETS, "--output", out], tmp_path / "third.log")
    assert status == 0, log
    assert (f"taking over {out}: the run that held it (process {holder.pid} on {socket.gethostname()}, started "
            in paragraph(log)) and "is no longer running" in paragraph(log)
    assert not lock_file(out).exists()  # released at the end


def test_the_claim_is_released_when_the_run_fails(reference, tmp_path):
    from fastft.claim import take
    from fastft.errors import FastftError
    from fastft.train import run

    recipe, _ = reference
    bad = tiny_recipe(tmp_path / "bad", rows=qa_rows(2) + [{"question": "Q"}])
    with pytest.raises(FastftError, match="no field `answer`"):
        run(str(bad), output=str(tmp_path / "out"), echo=lambda *_: None)
    assert not lock_file(tmp_path / "out").exists()
    # The same process, another claim: refused like another process's.
    refused = pytest.raises(FastftError, match=rf"in use by another fastft run \(process {os.getpid()} ")
    with take(tmp_path / "out"), refused:
        run(str(recipe), output=str(tmp_path / "out"), echo=lambda *_: None)
    assert not lock_file(tmp_path / "out").exists()


def test_old_checkpoints_go_only_once_a_newer_one_is_complete(tmp_path):
    """The Trainer deleted old checkpoints before marking the new one: a kill in between left none complete."""
    from fastft.runs import rotate_checkpoints

    for step, complete in ((2, True), (4, True), (6, False)):  # checkpoint-6 is being written
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        if complete:
            (folder / COMPLETE_MARK).write_text("{}")
    rotate_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_during_a_checkpoint_is_one_paragraph_and_the_printed_resume_finishes_the_run(
        runner, reference, tmp_path):
    """Killed after checkpoint-2, resumed under a 60 KB file-size limit: checkpoint-4's optimizer.pt (89 KB) fails."""
    recipe, expected = reference
    out = tmp_path / "out"
    args = ["run", recipe, *SETS, "--output", out]
    pid = runner.start(args, tmp_path / "first.log")
    wait_for(lambda: (out / "checkpoints" / "checkpoint-2" / COMPLETE_MARK).exists(), pid)
    os.kill(pid, signal.SIGKILL)
    assert runner.wait() == -signal.SIGKILL

    status, log = runner.run([*args, "--resume"], tmp_path / "full.log", fsize=60_000)
    text = paragraph(log)
    assert status == 2 and "Traceback" not in log, log
    assert (f"Could not write a checkpoint to {out / 'checkpoints'}: a file grew past this process's file-size "
            "limit (`ulimit -f`, 60.0 KB). It needs about ") in text
    assert "The half-written checkpoint-4 was removed." in text, text
    assert f"The last complete checkpoint is {out / 'checkpoints' / 'checkpoint-2'}. Free some space" in text
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    command = shlex.split(printed_command(log))
    assert command == ["fastft", "run", str(recipe), "--backend", "hf", *SETS, "--output", str(out), "--resume"]

    status, log = runner.run(command[1:], tmp_path / "resumed.log")
    assert status == 0, log
    assert max_abs_diff(adapter(out), expected) == 0


def test_a_full_disk_while_saving_the_adapter_or_an_export_leaves_nothing_half_written(runner, reference, tmp_path):
    """A 30 KB file-size limit: the adapter's weights (36 KB) cannot be written, nor copied by an export."""
    recipe, _ = reference
    out = tmp_path / "out"
    args = ["run", recipe, "--set", "train.save_steps=0", "--set", "train.max_steps=1", "--output", out]
    status, log = runner.run(args, tmp_path / "run.log", fsize=30_000)
    text = paragraph(log)
    assert status == 2 and "Traceback" not in log, log
    assert f"Could not write the adapter to {out / 'adapter'}: a file grew past" in text
    assert "No checkpoint is complete yet. Free some space (or raise the limit), then start again with:" in text
    assert not (out / "adapter").exists() and not list(out.glob(".adapter*")) and not (out / "fastft.json").exists()
    command = shlex.split(printed_command(log))
    assert command == ["fastft", "run", str(recipe), "--backend", "hf", *args[2:-2], "--output", str(out)]

    status, log = runner.run(command[1:], tmp_path / "rerun.log")  # the printed command, with space again
    assert status == 0, log
    status, log = runner.run(["export", out, "--out", tmp_path / "export"], tmp_path / "export.log", fsize=30_000)
    assert status == 2 and "Traceback" not in log, log
    assert f"Could not write the export to {tmp_path / 'export'}: a file grew past" in paragraph(log)
    assert [p.name for p in tmp_path.iterdir() if "export" in p.name] == ["export.log"]
    # `fastft eval` on 64 examples: its predictions.jsonl (about 40 KB) passes a 20 KB limit that its
    # log and eval.json stay under, after both models have answered.
    data = Path(recipe).parent / "data.jsonl"
    status, log = runner.run(["eval", out, "--data", data, "--limit", "64", "--max-new-tokens", "48",
                              "--out", tmp_path / "eval"], tmp_path / "eval.log", fsize=20_000)
    assert status == 2 and "Traceback" not in log, log
    assert f"Could not write the evaluation to {tmp_path / 'eval'}: a file grew past" in paragraph(log)
    assert [p.name for p in tmp_path.iterdir() if "eval" in p.name] == ["eval.log"]


# --------------------------------------------------------------------------- kill -9 at any moment


def wait_for(condition, pid: int, timeout: float = 300) -> bool:
    """Poll `condition` every millisecond while process `pid` lives; False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.001)
    raise TimeoutError("the run neither reached the moment nor ended")


def text_in(log: Path, marker: str):
    return lambda: marker in read(log)


def unmarked_checkpoint(run_dir: Path, name: str = "checkpoint-*"):
    return lambda: any(not (p / COMPLETE_MARK).exists() for p in (run_dir / "checkpoints").glob(name))


DATA_LINE, MODEL_LINE = "data: 64 train", "model: fastft:tiny"  # printed once the data, the model is ready

# (the phase aimed at, the moment that starts it, the longest random wait after that moment before the kill, s)
KILLS = [
    ("data preparation", lambda out, log: lock_file(out).exists, 0.05),  # the claim is the run's first act
    ("model load", lambda out, log: text_in(log, DATA_LINE), 0.05),
    ("training step", lambda out, log: text_in(log, "{'loss'"), 0.3),
    ("training step", lambda out, log: (out / "checkpoints" / "checkpoint-2" / COMPLETE_MARK).exists, 0.3),
    ("checkpoint save", lambda out, log: unmarked_checkpoint(out, "checkpoint-2"), 0.01),
    ("checkpoint save", lambda out, log: unmarked_checkpoint(out, "checkpoint-4"), 0.01),
    ("adapter save", lambda out, log: lambda: any(out.glob(".adapter.tmp-*")), 0.003),
    ("summary", lambda out, log: lambda: (out / "adapter").exists(), 0.0),  # a window of a millisecond or less
]


def landed(out: Path, log: str, status: int) -> str:
    """Where the kill landed, from what the killed run printed and left on disk."""
    if status != -signal.SIGKILL:
        return "after the run ended"
    if DATA_LINE not in log:
        return "data preparation"
    if MODEL_LINE not in log:
        return "model load"
    if any(out.glob(".adapter.tmp-*")):
        return "adapter save"
    if (out / "adapter").exists():
        return "summary" if not (out / "fastft.json").exists() else "sample answer (after the summary)"
    if unmarked_checkpoint(out)():
        return "checkpoint save"
    return "training step"


@pytest.mark.slow
def test_kill_9_at_any_moment_loses_nothing(runner, reference, tmp_path):
    """SIGKILL at seeded random moments of every phase, then the documented resume: the same adapter, exactly.

    The documented resume: `--resume` when a complete checkpoint exists, otherwise the same command
    again (a fresh start; half-written checkpoints do not count as an earlier run).
    """
    recipe, expected = reference
    rng = random.Random(19)
    table = []
    for i, (aim, moment, longest) in enumerate(KILLS):
        out, log = tmp_path / f"run{i}", tmp_path / f"run{i}.log"
        args = ["run", recipe, *SETS, "--output", out]
        pid = runner.start(args, log)
        if wait_for(moment(out, log), pid):
            time.sleep(rng.uniform(0, longest))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the run ended (and was reaped) in between: `landed` says "after the run ended"
        status = runner.wait()
        where = landed(out, read(log), status)
        stale_claim = lock_file(out).exists()
        resume = ["--resume"] if latest_checkpoint(out) else []
        code, text = runner.run([*args, *resume], tmp_path / f"run{i}-resumed.log")
        assert code == 0, text
        assert ("taking over" in text) == stale_claim
        diff = max_abs_diff(adapter(out), expected)
        table.append((aim, where, "resume" if resume else "fresh start", diff))
        assert diff == 0, table
        assert not lock_file(out).exists() and not list(out.glob(".*"))  # nothing stale or hidden left behind
        assert all((p / COMPLETE_MARK).exists() for p in (out / "checkpoints").glob("checkpoint-*"))
    print("\nkill -9 moments (aimed at, landed in, how it went on, max abs diff of the adapter):")
    for row in table:
        print("  " + " | ".join(map(str, row)))
    phases = {where for _, where, _, _ in table}
    assert len(phases) >= 4, table  # the kills really were spread over the run
