"""The `unsloth` backend on CPU: its refusal where it cannot run, import order, option mapping,
and the same token ids and labels as `hf` (built through each backend's path, without Unsloth)."""

import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import RECIPES, ROOT, run_cli, tiny_recipe
from fastft.backends import unsloth as backend
from fastft.errors import FastftError
from fastft.recipe import SECTIONS, load_recipe

_real_find_spec = importlib.util.find_spec


def _pretend(monkeypatch, installed: bool):
    """Make `find_spec("unsloth")` say Unsloth is (or is not) installed; other modules are looked up for real."""
    spec = importlib.machinery.ModuleSpec("unsloth", None) if installed else None
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == "unsloth" else _real_find_spec(name, *a))


def _runnable_here() -> bool:
    import torch

    return _real_find_spec("unsloth") is not None and torch.cuda.is_available()


# --------------------------------------------------------------------------- refusing to run


def test_check_names_the_missing_package_and_the_way_out(monkeypatch):
    _pretend(monkeypatch, installed=False)
    with pytest.raises(FastftError) as e:
        backend.make().check()
    message = str(e.value)
    assert "`unsloth` package is not installed" in message
    assert 'pip install -e ".[unsloth]"' in message and "--backend hf" in message
    assert "\n" not in message  # one paragraph


def test_check_refuses_without_a_gpu(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU; the no-GPU refusal is checked on CPU machines")
    _pretend(monkeypatch, installed=True)  # the missing GPU is real
    with pytest.raises(FastftError) as e:
        backend.make().check()
    assert "no NVIDIA CUDA GPU" in str(e.value) and "not installed" not in str(e.value)
    assert "unsloth" not in sys.modules  # refused before trying the import


@pytest.mark.skipif(_runnable_here(), reason="Unsloth and a CUDA GPU are both here, so --backend unsloth runs")
def test_cli_exits_2_and_leaves_the_output_folder_alone(tmp_path):
    recipe = tiny_recipe(tmp_path)
    fresh = tmp_path / "fresh"
    result = run_cli("run", str(recipe), "--backend", "unsloth", "--output", str(fresh))
    assert result.returncode == 2, result.stderr
    assert "--backend unsloth needs an NVIDIA GPU" in result.stderr and "--backend hf" in result.stderr
    assert "Traceback" not in result.stderr
    assert not fresh.exists()

    # An earlier run is not touched either, even with --overwrite: the backend is checked first.
    earlier = tmp_path / "earlier"
    (earlier / "adapter").mkdir(parents=True)
    (earlier / "fastft.json").write_text("{}")
    before = sorted(p.relative_to(earlier) for p in earlier.rglob("*"))
    result = run_cli("run", str(recipe), "--backend", "unsloth", "--output", str(earlier), "--overwrite")
    assert result.returncode == 2, result.stderr
    assert sorted(p.relative_to(earlier) for p in earlier.rglob("*")) == before


# --------------------------------------------------------------------------- import order


def test_fastft_imports_neither_hugging_face_libraries_nor_unsloth():
    """Unsloth must be imported before transformers/PEFT/TRL, so fastft's entry modules import none of them."""
    code = """
import json, sys
import fastft.cli, fastft.train, fastft.recipe, fastft.data, fastft.models, fastft.backends, fastft.backends.unsloth
heavy = ("transformers", "peft", "trl", "unsloth")
after_import = [m for m in heavy if m in sys.modules]
from fastft.backends import get_backend
get_backend("hf")
print(json.dumps({"after_import": after_import, "after_hf": [m for m in heavy if m in sys.modules]}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["after_import"] == []
    assert "unsloth" not in loaded["after_hf"]


def test_run_checks_the_backend_before_importing_hugging_face_libraries(tmp_path):
    """`fastft run` reaches the backend's check() (where Unsloth is imported) with transformers/PEFT/TRL unloaded."""
    code = f"""
import sys, types
import fastft.backends
from fastft.errors import FastftError

class Probe:
    name = "probe"
    def check(self):
        raise FastftError("loaded: " + ",".join(m for m in ("transformers", "peft", "trl") if m in sys.modules))

sys.modules["probe_backend"] = types.SimpleNamespace(make=lambda **options: Probe())
fastft.backends.BACKENDS["probe"] = "probe_backend"
from fastft.train import run
try:
    run({str(tiny_recipe(tmp_path))!r}, backend="probe", output={str(tmp_path / "out")!r})
except FastftError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "loaded:"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- options


def test_every_recipe_option_has_a_place():
    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(backend.OPTIONS) == keys


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, its config and a recipe for it (CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastft.models import resolve_model

    path = resolve_model("fastft:tiny")
    recipe_path = tiny_recipe(tmp_path_factory.mktemp("options"))
    return AutoModelForCausalLM.from_pretrained(path), AutoConfig.from_pretrained(path), path, recipe_path


def test_load_arguments(tiny):
    from fastft.backends.hf import compute_dtype

    _, config, path, recipe_path = tiny
    recipe = load_recipe(recipe_path)
    args = backend.load_arguments(recipe, path, config)
    assert args["model_name"] == path and args["use_exact_model_name"] is True
    assert args["max_seq_length"] == recipe.data.max_length == 256
    assert (args["load_in_4bit"], args["load_in_16bit"]) == (False, True)  # the tiny recipe is 16-bit
    assert args["dtype"] == compute_dtype(recipe)
    four = backend.load_arguments(load_recipe(recipe_path, ["model.quantization=4bit"]), path, config)
    assert (four["load_in_4bit"], four["load_in_16bit"]) == (True, False)

    with pytest.raises(FastftError, match="`model.attention` = \"sdpa\""):
        backend.load_arguments(load_recipe(recipe_path, ["model.attention=sdpa"]), path, config)
    with pytest.raises(FastftError, match="`data.max_length` = 8192 is longer than the 4096 positions"):
        backend.load_arguments(load_recipe(recipe_path, ["data.max_length=8192"]), path, config)


def test_peft_arguments(tiny):
    model, _, _, recipe_path = tiny
    recipe = load_recipe(recipe_path, ["lora.modules_to_save=['embed_tokens', 'lm_head']",
                                       "train.gradient_checkpointing=true"])
    args = backend.peft_arguments(recipe, model)
    assert args["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (args["r"], args["lora_alpha"], args["random_state"]) == (4, 8.0, 7)
    assert args["modules_to_save"] == ["embed_tokens", "lm_head"] and args["ensure_weight_tying"] is False
    assert args["use_gradient_checkpointing"] == "unsloth"
    assert [backend.checkpointing(v) for v in (False, True, "offload", "auto")] == [False, "unsloth", "unsloth", "unsloth"]

    explicit = backend.peft_arguments(load_recipe(recipe_path, ["lora.target_modules=['q_proj', 'v_proj']"]), model)
    assert explicit["target_modules"] == ["q_proj", "v_proj"] and explicit["modules_to_save"] is None
    with pytest.raises(FastftError, match="`lora.target_modules` includes lm_head"):
        backend.peft_arguments(load_recipe(recipe_path, ["lora.target_modules=['q_proj', 'lm_head']"]), model)


def test_all_linear_names_adapt_the_same_layers_as_hf(tiny):
    """The explicit names the unsloth backend passes select exactly the layers PEFT's "all-linear" does in `hf`."""
    import copy

    from peft import LoraConfig, get_peft_model

    model, _, _, _ = tiny

    def adapted(targets):
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM"))
        return sorted(peft_model.targeted_module_names)

    names = backend.all_linear_modules(model)
    assert adapted(names) == adapted("all-linear")
    assert len(adapted(names)) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down); not lm_head


# --------------------------------------------------------------------------- same data


@pytest.mark.parametrize("packing", [False, True])
def test_hf_and_unsloth_hand_the_trainer_the_same_ids_and_labels(tmp_path, packing):
    from fastft.backends.hf import HFBackend
    from fastft.data import prepare
    from fastft.models import load_tokenizer, resolve_model
    from fastft.train import training_arguments

    recipe = load_recipe(tiny_recipe(tmp_path), [f"data.packing={str(packing).lower()}"])
    tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe, tokenizer, echo=lambda *a: None)
    dataset = data.train.to_dataset()  # what train.run hands to every backend's make_trainer

    # hf: its real trainer, built as `fastft run --backend hf` builds it.
    hf = HFBackend()
    trainer = hf.make_trainer(recipe, hf.load_model(recipe, resolve_model(recipe.model.name)), tokenizer, dataset,
                              None, training_arguments(recipe, tmp_path / "run", eval_data=False), callbacks=[])
    assert trainer.train_dataset["input_ids"] == data.train.input_ids
    assert trainer.train_dataset["labels"] == data.train.labels
    # unsloth: the collator its make_trainer hands to UnslothTrainer (no Unsloth import needed).
    unsloth_collator = backend.data_collator(recipe, tokenizer)

    size = recipe.train.batch_size
    for start in range(0, len(dataset), size):
        features = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
        ours, theirs = trainer.data_collator(features), unsloth_collator(features)
        assert ours.keys() == theirs.keys() == ({"input_ids", "labels", "position_ids"} if packing
                                                 else {"input_ids", "labels", "attention_mask"})
        for key in ours:
            assert ours[key].tolist() == theirs[key].tolist(), key

    # The labels are the answers and the EOS, not everything or nothing.
    first = unsloth_collator([dataset[0]])
    learned = [t for t in first["labels"][0].tolist() if t != -100]
    assert tokenizer.decode(learned) == "Cela fait 1." + tokenizer.eos_token


@pytest.mark.parametrize("override", ["model.liger_kernels=true", "model.upcast_fp32=true", "train.fused_loss=false"])
def test_fast_path_switches_unsloth_cannot_honour_are_refused(override):
    recipe = load_recipe(RECIPES / "fusion_fr.toml", ["model.name=fastft:tiny", override])
    with pytest.raises(FastftError, match=f"`{override.split('=')[0]}` = {override.split('=')[1]}: .*--backend hf"):
        backend.load_arguments(recipe, "unused", config=None)
