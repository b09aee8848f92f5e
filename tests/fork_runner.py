"""Run `fastft` commands as forked children of one process that has already imported everything.

Each `fastft run` in a fresh interpreter spends most of its time importing torch, transformers,
PEFT and TRL (20 s on a busy CI machine); forked from here it starts in milliseconds, so the
fault tests can kill and restart many real `fastft` processes. Nothing has run a torch
computation here yet, so forking is safe (no thread pools to inherit).

Protocol, one JSON object per line: the test writes {"argv": [...], "log": PATH, "fsize": BYTES or null};
this process answers {"pid": N} once the child runs, then {"pid": N, "status": S} when it ends
(S: the exit code, or minus the signal that killed it). The child's stdout and stderr go to
PATH; `fsize` caps the size of any file the child writes (RLIMIT_FSIZE), with SIGXFSZ ignored
so that an oversized write fails with EFBIG instead of killing the process.
"""

import json
import os
import resource
import signal
import sys

import peft  # noqa: F401
import trl  # noqa: F401

import fastft.backends.hf
import fastft.cli
import fastft.train


def child(argv: list, log: str, fsize: int | None) -> int:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)  # the test watches the output for markers
    if fsize is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    sys.argv = ["fastft", *argv]
    try:
        fastft.cli.main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(request["argv"], request["log"], request.get("fsize"))
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"pid": pid, "status": code}), flush=True)


if __name__ == "__main__":
    main()
