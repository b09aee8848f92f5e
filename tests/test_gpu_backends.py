"""GPU: `unsloth` and `hf` train the same recipe the same way, and their adapters are interchangeable.

`fastft run recipes/fusion_fr.toml --set model.name=random:llama-3.2-1b` for 30 steps on each
backend, one seed, each in its own process (Unsloth patches transformers at import):
- both hand the trainer the same token ids and labels (dataset fingerprint);
- the first logged loss agrees within 2%, the loss at step 30 within 5%;
- the adapter trained by `unsloth` gives, loaded with stock PEFT on the `hf` stack, the logits it
  gave in its training process (within bf16 tolerance); and the `hf` adapter loaded by Unsloth.

Needs an NVIDIA GPU and `pip install -e ".[unsloth]"` (see ../shared/gpu/README.md). Losses and
errors are printed: run with `python -m pytest tests/test_gpu_backends.py -m gpu -s`.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import RECIPES, ROOT

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is false)"),
    pytest.mark.skipif(importlib.util.find_spec("unsloth") is None,
                       reason='needs Unsloth: pip install -e ".[unsloth]" on an NVIDIA machine'),
]

RECIPE = RECIPES / "fusion_fr.toml"
# The recipe's learning rates (5e-5, 5e-6) barely move a random model in 30 steps, which would make
# agreement trivial; these make the loss fall, so a real difference between backends would show.
OVERRIDES = ["model.name=random:llama-3.2-1b", "train.max_steps=30", "train.logging_steps=1", "train.save_steps=0",
             "train.learning_rate=1e-3", "train.embedding_learning_rate=1e-4", "train.report_to=none"]
PROBE = ROOT / "tests" / "gpu_probe.py"


def _probe(*args, log):
    """Run one gpu_probe.py step in a fresh process; its output goes to `log`."""
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(PROBE), *args, *sets], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1800)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"{' '.join(args[:2])} failed (log: {log}):\n{(result.stdout + result.stderr)[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train on both backends; return each run's folder and its in-process logits file."""
    root = tmp_path_factory.mktemp("gpu-backends")
    # Build the random model once, in a process without Unsloth, so both backends load the same files.
    build = "from fastft.models import resolve_model; resolve_model('random:llama-3.2-1b')"
    subprocess.run([sys.executable, "-c", build], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    out = {}
    for backend in ("hf", "unsloth"):
        folder, logits = root / backend, root / f"{backend}-trained.safetensors"
        _probe("train", backend, str(RECIPE), str(folder), str(logits), log=root / f"{backend}-train.log")
        out[backend] = {"dir": folder, "logits": logits, "summary": json.loads((folder / "fastft.json").read_text())}
    return out


@pytest.fixture(scope="module")
def loaded(runs, tmp_path_factory):
    """Each backend's adapter loaded on the other stack: {trained_by: logits file}."""
    root = tmp_path_factory.mktemp("gpu-adapters")
    out = {}
    for trained_by, stack in (("unsloth", "hf"), ("hf", "unsloth")):
        logits = root / f"{trained_by}-adapter-on-{stack}.safetensors"
        _probe("load", stack, str(runs[trained_by]["dir"] / "adapter"), str(runs[trained_by]["logits"]), str(logits),
               str(RECIPE), log=root / f"{trained_by}-adapter-on-{stack}.log")
        out[trained_by] = logits
    return out


def test_both_backends_train_on_the_same_tokens(runs):
    hf, unsloth = runs["hf"]["summary"], runs["unsloth"]["summary"]
    assert (hf["backend"], unsloth["backend"]) == ("hf", "unsloth")
    # Unsloth's import-time patches to transformers did not change a single id or label.
    assert unsloth["dataset_fingerprint"] == hf["dataset_fingerprint"]
    assert hf["steps"] == unsloth["steps"] == 30


def test_losses_agree(runs):
    hf, unsloth = runs["hf"]["summary"], runs["unsloth"]["summary"]
    print(f"\nfirst loss: hf {hf['first_loss']:.4f}, unsloth {unsloth['first_loss']:.4f}; "
          f"loss at step 30: hf {hf['final_loss']:.4f}, unsloth {unsloth['final_loss']:.4f}")
    assert hf["final_loss"] < 0.9 * hf["first_loss"], "the loss hardly moved: the comparison would prove nothing"
    assert unsloth["first_loss"] == pytest.approx(hf["first_loss"], rel=0.02)
    assert unsloth["final_loss"] == pytest.approx(hf["final_loss"], rel=0.05)


def _relative_error(a, b):
    return ((a - b).abs().mean() / b.abs().mean()).item()


@pytest.mark.parametrize("trained_by, stack", [("unsloth", "hf"), ("hf", "unsloth")])
def test_adapter_gives_the_same_logits_on_the_other_stack(runs, loaded, trained_by, stack):
    from safetensors.torch import load_file

    trained = load_file(runs[trained_by]["logits"])["logits"]
    elsewhere = load_file(loaded[trained_by])["logits"]
    # The base model's logits (hf stack, adapter disabled) measure how much the adapter changes.
    base = load_file(loaded["unsloth"])["base_logits"]
    error, effect = _relative_error(elsewhere, trained), _relative_error(trained, base)
    print(f"\n{trained_by} adapter on the {stack} stack: mean |logit difference| {error:.4f} of the mean |logit|; "
          f"the adapter itself moves the logits by {effect:.4f}")
    assert error < 0.03  # bf16 activations, NF4 weights, different kernels
    assert effect > 3 * error, "the adapter barely changes the logits, so agreement would prove nothing"
