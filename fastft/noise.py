"""Third-party messages that a fastft user cannot act on, dropped by their exact text.

Only the messages listed here are filtered; every other warning and log line still shows, so
warnings meant for the user (a bad setting, a deprecated option, running out of memory) get
through. Add a message here only with the reason it is noise.
"""

from __future__ import annotations

import logging

# (logger name, start of the message, start(s) of its first argument or ""): log records dropped from that logger.
LOG_MESSAGES = [
    # bitsandbytes on a CPU with AVX512-BF16 looks for an optional Hub kernel package ("kernels") at
    # import, even for 16-bit runs, and falls back to its own code: nothing is wrong, nothing to do.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community", ""),
    # Liger 0.8 probes its optional Ascend (NPU) and CuTe DSL backends of each op, and says so on an NVIDIA
    # GPU where they cannot load; its Triton kernels run (seen on an H200). A failing main backend still shows.
    ("liger_kernel.backends.registry", "Backend impl '%s' for op '%s' could not be imported",
     ("liger_kernel.ops.backends._ascend.", "liger_kernel.ops.backends._cutedsl.")),
]


class DropMessage(logging.Filter):
    def __init__(self, prefix: str, arg_prefix: str | tuple[str, ...] = ""):
        super().__init__()
        self.prefix, self.arg_prefix = prefix, arg_prefix

    def filter(self, record: logging.LogRecord) -> bool:
        first = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
        return not (str(record.msg).startswith(self.prefix) and first.startswith(self.arg_prefix))


def install() -> None:
    """Attach the filters (idempotent). Call before the libraries are imported or used."""
    for name, prefix, arg_prefix in LOG_MESSAGES:
        logger = logging.getLogger(name)  # the library later gets this same logger object
        if not any(isinstance(f, DropMessage) and (f.prefix, f.arg_prefix) == (prefix, arg_prefix)
                   for f in logger.filters):
            logger.addFilter(DropMessage(prefix, arg_prefix))
