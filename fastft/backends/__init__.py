"""Backends: how a recipe's model is loaded, given LoRA adapters and trained.

A backend is anything with the three methods of `Backend`; there is no base class.
Everything else (recipe, data, checkpoints, saving, export) is shared code that
backends call, so swapping the backend changes speed and memory, not the training.

Backends are imported by name, lazily: Unsloth patches transformers/peft/trl when
imported, so it must come first in its process and must not be imported otherwise.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from fastft.errors import FastftError

BACKENDS = {"hf": "fastft.backends.hf", "unsloth": "fastft.backends.unsloth"}


class Backend(Protocol):
    name: str

    def check(self) -> None:
        """Raise `FastftError` if this backend cannot run here (missing package, no GPU)."""

    def load_model(self, recipe, model_path: str) -> Any:
        """The base model from `model_path`, quantised per the recipe, with LoRA attached."""

    def make_trainer(self, recipe, model, tokenizer, train_dataset, eval_dataset, args: dict, callbacks: list) -> Any:
        """A `transformers.Trainer` (TRL's SFTTrainer or a subclass) ready to `train()`.

        `args` are the shared training arguments (`train.training_arguments`), to which the
        backend adds only what is its own.
        """


def get_backend(name: str, **options) -> Backend:
    """Import and check the named backend. Raises `FastftError` if unknown or unavailable here."""
    if name not in BACKENDS:
        raise FastftError(f"--backend {name}: unknown backend. Choose one of {', '.join(BACKENDS)}.")
    backend = importlib.import_module(BACKENDS[name]).make(**options)
    backend.check()
    return backend
