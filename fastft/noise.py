"""Third-party messages that a fastft user cannot act on, dropped by their exact text.

Only the messages listed here are filtered; every other warning and log line still shows, so
warnings meant for the user (a bad setting, a deprecated option, running out of memory) get
through. Add a message here only with the reason it is noise.
"""

from __future__ import annotations

import logging

# (logger name, start of the message): log records dropped from that logger.
LOG_MESSAGES = [
    # bitsandbytes on a CPU with AVX512-BF16 looks for an optional Hub kernel package ("kernels") at
    # import, even for 16-bit runs, and falls back to its own code: nothing is wrong, nothing to do.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
]


class DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Attach the filters (idempotent). Call before the libraries are imported or used."""
    for name, prefix in LOG_MESSAGES:
        logger = logging.getLogger(name)  # the library later gets this same logger object
        if not any(isinstance(f, DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(DropMessage(prefix))
