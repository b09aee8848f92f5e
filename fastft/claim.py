"""The claim on a run folder: one run at a time, for its whole life.

A run holds an exclusive OS lock (`flock`) on a hidden file beside its folder,
`.<folder>.lock`, from its first second to its exit. Beside, not inside: the folder itself
is not written into until the recipe and data have passed their checks. The kernel drops the
lock when the process dies however it dies (`kill -9` included), so a claim cannot stay stuck;
the file then still names the dead holder, and the next run says it takes the claim over.
The file records who holds it (process id, machine, start time, command) for the message a
second run gets.

Several processes, one run: `fastft run --nproc N` takes the claim and keeps the lock open
through `execv` into torchrun (same process id), handing rank 0 a token in FASTFT_CLAIM so it
adopts the claim instead of competing for it; under a plain torchrun, rank 0 takes the claim
for all ranks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shlex
import socket
import sys
import time
from pathlib import Path

from fastft.distributed import any_process, is_main_process, world_size
from fastft.errors import FastftError

INHERITED = "FASTFT_CLAIM"  # "<lock file>\n<token>", set by `fastft run --nproc N` for the job it execs


def lock_file(run_dir: Path) -> Path:
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f".{run_dir.name}.lock")


class Claim:
    """A held claim; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, path: Path | None, fd: int | None, token: str = ""):
        self.path, self.fd, self.token = path, fd, token  # fd: None when the lock is held elsewhere (the launcher)

    def keep_across_exec(self) -> None:
        """Keep the lock held by the program this process `execv`s into, and tell its rank 0 how to adopt it."""
        if self.fd is not None:
            os.set_inheritable(self.fd, True)
            os.environ[INHERITED] = f"{self.path}\n{self.token}"

    def release(self) -> None:
        # Unlinked while still locked: a run that opened this file meanwhile sees it was replaced and tries
        # again. Only the holder of the lock deletes the file, so while we hold it, the file is ours.
        if self.path is not None and (self.fd is not None or _holder(self.path).get("token") == self.token):
            self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)
        self.path = self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def claim_for_run(run_dir: Path, echo=print) -> Claim:
    """Claim `run_dir` for this run (rank 0 for all ranks). Raises `FastftError` if another run holds it."""
    adopted = _adopt(run_dir)
    if adopted or world_size() == 1:
        return adopted or take(run_dir, echo)
    claim, error = None, None
    if is_main_process():
        try:
            claim = take(run_dir, echo)
        except FastftError as e:
            error = e
    if any_process(error is not None):  # every rank learns that rank 0 could not claim the folder
        if error:
            raise error
        raise FastftError(f"{run_dir} is in use by another run (rank 0 says by which).")
    return claim or Claim(None, None)


def take(run_dir: Path, echo=print) -> Claim:
    """Lock `run_dir`'s claim file; raise `FastftError` naming the holder if another live process has it."""
    path = lock_file(run_dir)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, created = _open(path)
        except OSError as e:
            raise FastftError(f"Could not create {path} ({e.strerror}): fastft claims a run folder with this file "
                              "beside it, so that two runs never write into one folder. Choose an --output whose "
                              "parent folder you can write to.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FastftError(held_message(run_dir, _holder(path, wait=True))) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            echo(f"warning: {path.parent} does not support file locks ({e.strerror}), so another run writing into "
                 f"{run_dir} at the same time would not be noticed")
            return Claim(None, None)
        # The holder we waited behind may have released it by deleting the file: lock the file that is there now.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(fd)
        if current and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
            break
        os.close(fd)
    if not created:  # left by a run that died (one killed before it wrote its record leaves it empty)
        echo(f"taking over {run_dir}: the run that held it ({describe(_holder(path))}) is no longer running")
    token = secrets.token_hex(8)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": shlex.join(["fastft", *sys.argv[1:]]), "token": token}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds without the record, and the run's first write will explain
    return Claim(path, fd, token)


def _open(path: Path) -> tuple[int, bool]:
    """Open the claim file, creating it if there is none; return (fd, whether this call created it)."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        try:
            return os.open(path, os.O_RDWR), False
        except FileNotFoundError:
            pass  # deleted by its holder in between: create it


def _adopt(run_dir: Path) -> Claim | None:
    """Rank 0 of a job started by `fastft run --nproc N`: the launcher's claim, if it is this folder's."""
    if not is_main_process() and INHERITED in os.environ:
        return Claim(None, None)  # the launcher holds the claim for every rank
    path, _, token = os.environ.get(INHERITED, "").partition("\n")
    if path != str(lock_file(run_dir)) or not token or _holder(Path(path)).get("token") != token:
        return None
    return Claim(Path(path), None, token)


def _holder(path: Path, wait: bool = False) -> dict:
    """The record in a claim file ({} if none). `wait`: the holder may be writing it this instant."""
    for _ in range(20 if wait else 1):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(holder["started"])) if holder.get("started") else "?"
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {started}"


def held_message(run_dir: Path, holder: dict) -> str:
    command = f", running `{holder['command']}`" if holder.get("command") else ""
    return (f"{run_dir} is in use by another fastft run ({describe(holder)}{command}). Two runs writing one folder "
            "would overwrite each other's recipe, checkpoints and adapter. Write this run elsewhere with --output DIR, "
            "or wait for that run to end and start this one again (with --resume or --overwrite if its folder is to "
            "be continued or replaced).")
