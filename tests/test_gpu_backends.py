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

from conftest import PYTHONPATH, RECIPES, ROOT

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


class Probe:
    """One gpu_probe.py step, started at once in a fresh process; `output()` waits for it.

    The module's 11 training and init processes run side by side (a 1B model takes a few GiB of
    the card), so the whole module costs about as much GPU time as its slowest process."""

    def __init__(self, *args, log, extra=()):
        sets = [a for o in [*OVERRIDES, *extra] for a in ("--set", o)]
        env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "2",
               # Unsloth writes generated source under a lock it waits 10 s for: one folder per process.
               "UNSLOTH_COMPILE_LOCATION": str(log.with_suffix(".unsloth-cache")), "UNSLOTH_LOCK_TIMEOUT": "600"}
        self.args, self.log = args, log
        with open(log, "w") as out:
            self.process = subprocess.Popen([sys.executable, str(PROBE), *args, *sets], cwd=ROOT, env=env,
                                            stdout=out, stderr=subprocess.STDOUT)

    def output(self):
        code = self.process.wait(timeout=1800)
        text = self.log.read_text()
        assert code == 0, f"{' '.join(self.args[:2])} failed (log: {self.log}):\n{text[-4000:]}"
        return text


def _start_training(root, backend, name, extra=()):
    folder, logits = root / f"{backend}-{name}", root / f"{backend}-{name}-trained.safetensors"
    probe = Probe("train", backend, str(RECIPE), str(folder), str(logits), log=root / f"{backend}-{name}-train.log",
                  extra=extra)
    probe.folder, probe.logits = folder, logits
    return probe


def _trained(probe):
    output = probe.output()
    return {"dir": probe.folder, "logits": probe.logits, "log": output,
            "summary": json.loads((probe.folder / "fastft.json").read_text()),
            "batches": json.loads(probe.logits.with_name(f"{probe.logits.name}.batches.json").read_text())}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-backends")
    # Build the random model once, in a process without Unsloth, so both backends load the same files.
    build = f"from fastft.models import resolve_model; resolve_model({MODEL_ID!r})"
    subprocess.run([sys.executable, "-c", build], cwd=ROOT, env={**os.environ, "PYTHONPATH": PYTHONPATH}, check=True)
    return root


@pytest.fixture(scope="module")
def started(root):
    """Every process that needs nothing but the model, started together: {(what, backend): Probe}."""
    probes = {}
    for backend in ("hf", "unsloth"):
        # with lm_head trained and offloaded checkpointing: Unsloth's Linear(1, 1) before PEFT
        probes["init", backend] = Probe("init", backend, str(RECIPE), str(root / f"{backend}-step0.safetensors"),
                                        log=root / f"{backend}-init.log", extra=["train.gradient_checkpointing=offload"])
        probes["main", backend] = _start_training(root, backend, "main")
        for name, extra in PATHS:
            probes[name, backend] = _start_training(root, backend, name, extra=[*extra, "train.max_steps=10"])
    probes["packed", "unsloth"] = _start_training(root, "unsloth", "packed", extra=["data.packing=true"])
    yield probes
    for probe in probes.values():  # a test that failed early leaves none running
        if probe.process.poll() is None:
            probe.process.kill()


@pytest.fixture(scope="module")
def runs(started):
    """Train on both backends; return each run's folder, log, summary, batch digests and logits file."""
    return {backend: _trained(started["main", backend]) for backend in ("hf", "unsloth")}


@pytest.fixture(scope="module")
def loaded(runs, root):
    """Each backend's adapter loaded on the other stack: {trained_by: logits file}."""
    probes = {}
    for trained_by, stack in (("unsloth", "hf"), ("hf", "unsloth")):
        logits = root / f"{trained_by}-adapter-on-{stack}.safetensors"
        probes[trained_by] = Probe("load", stack, str(runs[trained_by]["dir"] / "adapter"),
                                   str(runs[trained_by]["logits"]), str(logits), str(RECIPE),
                                   log=root / f"{trained_by}-adapter-on-{stack}.log")
        probes[trained_by].logits = logits
    return {trained_by: (probe.output(), probe.logits)[1] for trained_by, probe in probes.items()}


def test_both_backends_start_from_the_same_adapter(started, root):
    from safetensors.torch import load_file

    start = {}
    for backend in ("hf", "unsloth"):
        started["init", backend].output()
        start[backend] = load_file(root / f"{backend}-step0.safetensors")
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


def test_packing_on_unsloth_trains_as_padding_does(runs, started):
    packed = _trained(started["packed", "unsloth"])
    _assert_losses_agree(runs["unsloth"]["summary"], packed["summary"], "unsloth padded", "unsloth packed")


@pytest.mark.parametrize("name, extra", PATHS, ids=[p[0] for p in PATHS])
def test_other_paths_agree(started, name, extra):
    hf, unsloth = (_trained(started[name, backend]) for backend in ("hf", "unsloth"))
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
