"""GPU: `unsloth` and `hf` train the same recipe the same way, and their adapters are interchangeable.

`fastft run recipes/fusion_fr.toml --set model.name=random:llama-3.2-1b` for 30 steps on each
backend, one seed, each in its own process (Unsloth patches transformers at import):
- the two adapters are identical at step 0 (Unsloth's offloaded checkpointing and a trained
  lm_head: the path where Unsloth draws random numbers before PEFT initialises LoRA);
- Unsloth's fused LoRA kernels really ran (its load log counts the patched layers);
- every batch that reached the model in training has the same ids and labels on both;
- the first logged loss agrees within 2%, the loss at step 30 within 5%; packing on `unsloth`
  gives the losses padding gives; the 16-bit, checkpointing-off and short (< 512 tokens) paths
  agree the same way over 10 steps;
- the adapter trained by `unsloth` gives, loaded with stock PEFT on the `hf` stack, the logits it
  gave in its training process (within bf16 tolerance); and the `hf` adapter loaded by Unsloth;
- both save the same adapter config and tokenizer files.

Needs an NVIDIA GPU and `pip install -e ".[unsloth]"` (see ../shared/gpu/README.md). Losses and
errors are printed: run with `python -m pytest tests/test_gpu_backends.py -m gpu -s`.
"""

import importlib.util
import json
import os
import re
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
MODEL_ID = "random:llama-3.2-1b"
# The recipe's learning rates (5e-5, 5e-6) barely move a random model in 30 steps, which would make
# agreement trivial; these make the loss fall, so a real difference between backends would show.
OVERRIDES = [f"model.name={MODEL_ID}", "train.max_steps=30", "train.logging_steps=1", "train.save_steps=0",
             "train.learning_rate=1e-3", "train.embedding_learning_rate=1e-4", "train.report_to=none"]
PROBE = ROOT / "tests" / "gpu_probe.py"
# Other paths through both backends, 10 steps each: (name, extra overrides).
PATHS = [("16bit", ["model.quantization=16bit"]),
         ("checkpointing-off", ["train.gradient_checkpointing=false"]),
         ("short", ["data.max_length=256"])]  # below 512 tokens Unsloth's checkpointing is plain recomputation


def _probe(*args, log, extra=()):
    """Run one gpu_probe.py step in a fresh process; its output goes to `log`."""
    sets = [a for o in [*OVERRIDES, *extra] for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(PROBE), *args, *sets], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1800)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"{' '.join(args[:2])} failed (log: {log}):\n{(result.stdout + result.stderr)[-4000:]}"
    return result.stdout + result.stderr


def _train(root, backend, name, extra=()):
    folder, logits = root / f"{backend}-{name}", root / f"{backend}-{name}-trained.safetensors"
    output = _probe("train", backend, str(RECIPE), str(folder), str(logits), log=root / f"{backend}-{name}-train.log",
                    extra=extra)
    return {"dir": folder, "logits": logits, "log": output,
            "summary": json.loads((folder / "fastft.json").read_text()),
            "batches": json.loads((root / f"{logits.name}.batches.json").read_text())}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-backends")
    # Build the random model once, in a process without Unsloth, so both backends load the same files.
    build = f"from fastft.models import resolve_model; resolve_model({MODEL_ID!r})"
    subprocess.run([sys.executable, "-c", build], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return root


@pytest.fixture(scope="module")
def runs(root):
    """Train on both backends; return each run's folder, log, summary, batch digests and logits file."""
    return {backend: _train(root, backend, "main") for backend in ("hf", "unsloth")}


@pytest.fixture(scope="module")
def loaded(runs, root):
    """Each backend's adapter loaded on the other stack: {trained_by: logits file}."""
    out = {}
    for trained_by, stack in (("unsloth", "hf"), ("hf", "unsloth")):
        logits = root / f"{trained_by}-adapter-on-{stack}.safetensors"
        _probe("load", stack, str(runs[trained_by]["dir"] / "adapter"), str(runs[trained_by]["logits"]), str(logits),
               str(RECIPE), log=root / f"{trained_by}-adapter-on-{stack}.log")
        out[trained_by] = logits
    return out


def test_both_backends_start_from_the_same_adapter(root):
    from safetensors.torch import load_file

    extra = ["train.gradient_checkpointing=offload"]  # with lm_head trained: Unsloth's Linear(1, 1) before PEFT
    start = {}
    for backend in ("hf", "unsloth"):
        path = root / f"{backend}-step0.safetensors"
        _probe("init", backend, str(RECIPE), str(path), log=root / f"{backend}-init.log", extra=extra)
        start[backend] = load_file(path)
    assert start["hf"].keys() == start["unsloth"].keys() and len(start["hf"]) == 2 * 7 * 16  # A, B x 7 x 16 layers
    different = [n for n in start["hf"] if not torch.equal(start["hf"][n], start["unsloth"][n])]
    assert not different, f"{len(different)} LoRA weights differ at step 0, e.g. {different[:3]}"
    assert any(start["hf"][n].abs().sum() > 0 for n in start["hf"] if ".lora_A." in n)


def test_unsloth_fused_kernels_ran(runs):
    # unsloth/models/llama.py patch_peft_model logs how many layers got its fused LoRA kernels.
    found = re.search(r"patched (\d+) layers with (\d+) QKV layers, (\d+) O layers and (\d+) MLP layers",
                      runs["unsloth"]["log"])
    assert found, "Unsloth's 'patched ... layers' line is missing from the unsloth run's log"
    layers, qkv, o, mlp = map(int, found.groups())
    print(f"\nUnsloth patched {layers} layers: {qkv} QKV, {o} O, {mlp} MLP")
    assert layers > 0 and qkv == o == mlp == layers


def test_both_backends_train_on_the_same_batches(runs):
    hf, unsloth = runs["hf"], runs["unsloth"]
    assert (hf["summary"]["backend"], unsloth["summary"]["backend"]) == ("hf", "unsloth")
    assert hf["summary"]["steps"] == unsloth["summary"]["steps"] == 30
    # What reached the model's forward, after all of Unsloth's patches: the same ids and labels, batch by batch.
    assert len(hf["batches"]) == 30 * 1  # fusion_fr: batch_size 8, grad_accum 1
    assert unsloth["batches"] == hf["batches"]


def test_losses_agree(runs):
    _assert_losses_agree(runs["hf"]["summary"], runs["unsloth"]["summary"], "hf", "unsloth")


def _assert_losses_agree(a, b, a_name, b_name):
    print(f"\nfirst loss: {a_name} {a['first_loss']:.4f}, {b_name} {b['first_loss']:.4f}; "
          f"loss at step {a['steps']}: {a_name} {a['final_loss']:.4f}, {b_name} {b['final_loss']:.4f}")
    assert a["final_loss"] < 0.9 * a["first_loss"], "the loss hardly moved: the comparison would prove nothing"
    assert b["first_loss"] == pytest.approx(a["first_loss"], rel=0.02)
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=0.05)


def test_packing_on_unsloth_trains_as_padding_does(runs, root):
    packed = _train(root, "unsloth", "packed", extra=["data.packing=true"])
    _assert_losses_agree(runs["unsloth"]["summary"], packed["summary"], "unsloth padded", "unsloth packed")


@pytest.mark.parametrize("name, extra", PATHS, ids=[p[0] for p in PATHS])
def test_other_paths_agree(root, name, extra):
    extra = [*extra, "train.max_steps=10"]
    hf, unsloth = (_train(root, backend, name, extra=extra) for backend in ("hf", "unsloth"))
    assert unsloth["batches"] == hf["batches"]
    _assert_losses_agree(hf["summary"], unsloth["summary"], f"hf ({name})", f"unsloth ({name})")


def test_both_backends_save_the_same_config_and_tokenizer(runs):
    hf, unsloth = runs["hf"]["dir"] / "adapter", runs["unsloth"]["dir"] / "adapter"
    config = {b: json.loads((d / "adapter_config.json").read_text()) for b, d in (("hf", hf), ("unsloth", unsloth))}
    assert config["hf"]["base_model_name_or_path"] == config["unsloth"]["base_model_name_or_path"] == MODEL_ID
    assert config["unsloth"] == config["hf"]
    names = sorted(p.name for p in hf.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "chat_template")))
    assert names and names == sorted(p.name for p in unsloth.iterdir() if p.name in names)
    for name in names:
        assert (unsloth / name).read_bytes() == (hf / name).read_bytes(), name


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
