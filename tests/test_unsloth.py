"""The `unsloth` backend on CPU: its refusal where it cannot run, import order, option mapping,
and the same token ids and labels as `hf` (built through each backend's path, without Unsloth)."""

import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

from conftest import PYTHONPATH, RECIPES, ROOT, qa_rows, run_cli, tiny_recipe
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
                         env={**os.environ, "PYTHONPATH": PYTHONPATH})
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
                         env={**os.environ, "PYTHONPATH": PYTHONPATH})
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

    with pytest.raises(FastftError, match="`model.dtype` = \"fp32\": .*bf16.*--backend hf"):
        backend.load_arguments(load_recipe(recipe_path, ["model.dtype=fp32"]), path, config)
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
    assert args["use_gradient_checkpointing"] is True  # `on`: plain recomputation, as on `hf`
    offload = backend.peft_arguments(load_recipe(recipe_path, ["train.gradient_checkpointing=offload"]), model)
    assert offload["use_gradient_checkpointing"] == "unsloth"

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
    assert len(adapted(names)) == 4 * 7  # 4 layers x (q, k, v, o, gate, up, down); not lm_head


# --------------------------------------------------------------------------- same data


# --------------------------------------------------------------------------- same LoRA start


def _lora_start(recipe_path, overrides=(), draw_before_peft=False, monkeypatch=None):
    """{name: tensor} of the LoRA weights the `hf` backend starts from."""
    import peft
    import torch

    from fastft.backends.hf import HFBackend
    from fastft.models import resolve_model

    recipe = load_recipe(recipe_path, list(overrides))
    if draw_before_peft:  # as Unsloth's get_peft_model does: seed, then build a throwaway nn.Linear(1, 1)
        real = peft.get_peft_model

        def after_other_draws(*args, **kwargs):
            torch.nn.Linear(1, 1)
            torch.rand(1000)
            return real(*args, **kwargs)

        monkeypatch.setattr(peft, "get_peft_model", after_other_draws)
    model = HFBackend().load_model(recipe, resolve_model(recipe.model.name))
    if draw_before_peft:
        monkeypatch.setattr(peft, "get_peft_model", real)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_start_depends_on_the_seed_and_module_names_alone(tmp_path, monkeypatch):
    import math

    import torch

    recipe_path = tiny_recipe(tmp_path)  # seed 7, r = 4, all-linear
    start = _lora_start(recipe_path)
    # Random numbers drawn between seeding and PEFT's initialisation change nothing.
    disturbed = _lora_start(recipe_path, draw_before_peft=True, monkeypatch=monkeypatch)
    assert start.keys() == disturbed.keys() and len(start) == 2 * 4 * 7  # A and B, 4 layers x 7 projections
    assert all(torch.equal(start[n], disturbed[n]) for n in start)

    # Written out: one CPU generator seeded with train.seed; the adapters in sorted module-name order;
    # A kaiming-uniform with a = sqrt(5) (PEFT's init): bound = sqrt(3) * sqrt(2 / (1 + 5)) / sqrt(fan_in)
    # = 1 / sqrt(fan_in); B zero, so the adapted model starts as the base model.
    generator = torch.Generator().manual_seed(7)
    for name in sorted(n for n in start if ".lora_A." in n):
        a = start[name]
        fan_in = a.shape[1]
        bound = math.sqrt(3.0) * math.sqrt(2.0 / 6) / math.sqrt(fan_in)
        expected = torch.empty(a.shape).uniform_(-bound, bound, generator=generator)
        torch.testing.assert_close(a, expected, rtol=1e-6, atol=0)
        assert not start[name.replace(".lora_A.", ".lora_B.")].any()

    other_seed = _lora_start(recipe_path, ["train.seed=8"])
    assert not any(torch.equal(start[n], other_seed[n]) for n in start if ".lora_A." in n)


@pytest.fixture
def stand_in_unsloth(monkeypatch):
    """A stand-in for the `unsloth` package (it cannot be imported without a GPU), holding what make_trainer imports.

    Its trainer is TRL's SFTTrainer plus, at construction, the two things Unsloth 2026.10.9's
    generated SFTTrainer __init__ does that fastft must counter, as written in its source:
    unsloth/models/rl_replacements.py sft_trainer_fix_untrained_tokens reads
    UNSLOTH_IGNORED_TOKENIZER_NAMES and skips fix_untrained_tokens for a model listed there
    (unsloth_zoo/tokenizer_utils.py compares lower-cased names), and unsloth/models/rl.py sets
    padding_side = "right" on the processing class. What happened is recorded in the returned dict.
    """
    from trl import SFTConfig, SFTTrainer

    seen = {}

    class UnslothTrainer(SFTTrainer):
        def __init__(self, model=None, args=None, processing_class=None, **kwargs):
            ignored = os.environ.get("UNSLOTH_IGNORED_TOKENIZER_NAMES", "").split("\n")
            model_name = model.config._name_or_path
            seen["untrained_token_fix_skipped"] = model_name.lower() in {n.lower() for n in ignored}
            processing_class.padding_side = "right"
            super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)

    unsloth = types.ModuleType("unsloth")
    unsloth.UnslothTrainer, unsloth.UnslothTrainingArguments = UnslothTrainer, SFTConfig
    utils = types.ModuleType("unsloth.utils")
    utils.enable_padding_free_metadata = lambda model, trainer: None  # adds packed_seq_lengths; ids/labels untouched
    monkeypatch.setitem(sys.modules, "unsloth", unsloth)
    monkeypatch.setitem(sys.modules, "unsloth.utils", utils)
    monkeypatch.delenv("UNSLOTH_IGNORED_TOKENIZER_NAMES", raising=False)
    return seen


def _trainers(tmp_path, recipe, tokenizers):
    """{backend: trainer} built by each backend's make_trainer on the same PEFT model and data (no Unsloth loader)."""
    from fastft.backends.hf import HFBackend
    from fastft.data import prepare
    from fastft.models import resolve_model
    from fastft.train import training_arguments

    data = prepare(recipe, tokenizers["hf"], echo=lambda *a: None)
    args = training_arguments(recipe, tmp_path / "run", eval_data=False)
    out = {}
    for name, engine in (("hf", HFBackend()), ("unsloth", backend.make())):
        model = HFBackend().load_model(recipe, resolve_model(recipe.model.name))
        out[name] = engine.make_trainer(recipe, model, tokenizers[name], data.train.to_dataset(), None, args,
                                        callbacks=[])
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_both_backends_hand_their_trainer_the_expected_batches(tmp_path, stand_in_unsloth, packing):
    """Token ids and labels as written out here from the examples, padding and packing rules included."""
    from fastft.models import load_tokenizer

    rows = qa_rows(8)
    recipe = load_recipe(tiny_recipe(tmp_path, rows=rows), [f"data.packing={str(packing).lower()}"])
    tokenizer = load_tokenizer(recipe.model)
    trainers = _trainers(tmp_path, recipe, {"hf": tokenizer, "unsloth": load_tokenizer(recipe.model)})

    # The tiny tokenizer maps each byte to one token and adds no BOS, so an example's ids are its
    # prompt's bytes then its answer's; only the answer and the EOS carry the loss.
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    examples = []
    for row in rows:
        prompt, answer = encode(f"Q: {row['question']}\nA: "), encode(row["answer"]) + [tokenizer.eos_token_id]
        examples.append((prompt + answer, [-100] * len(prompt) + answer))
    assert tokenizer.decode(examples[0][1][-13:]) == "Cela fait 1.<|im_end|>"

    size, pad = recipe.train.batch_size, tokenizer.pad_token_id
    for name, trainer in trainers.items():
        dataset = trainer.train_dataset
        assert dataset["input_ids"] == [ids for ids, _ in examples], name
        for start in range(0, len(rows), size):
            chunk = examples[start:start + size]
            batch = trainer.data_collator([dataset[i] for i in range(start, start + len(chunk))])
            if packing:  # one row, no padding; positions restart at 0, and no example's first token is predicted
                expected = {"input_ids": [[t for ids, _ in chunk for t in ids]],
                            "labels": [[-100] + labels[1:] for _, labels in chunk],
                            "position_ids": [[p for ids, _ in chunk for p in range(len(ids))]]}
                expected["labels"] = [[t for labels in expected["labels"] for t in labels]]
            else:  # right-padded to the longest: pad id, label -100, attention 0
                width = max(len(ids) for ids, _ in chunk)
                expected = {"input_ids": [ids + [pad] * (width - len(ids)) for ids, _ in chunk],
                            "labels": [labels + [-100] * (width - len(labels)) for _, labels in chunk],
                            "attention_mask": [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]}
            assert {k: v.tolist() for k, v in batch.items()} == expected, (name, start)


def test_unsloth_trainer_keeps_embeddings_and_the_saved_tokenizer_as_hf(tmp_path, stand_in_unsloth):
    """Point 2 and 6 of issue 13: no untrained-token rewriting, and the same tokenizer files as `hf`."""
    from fastft.models import load_tokenizer

    recipe = load_recipe(tiny_recipe(tmp_path))
    tokenizers = {name: load_tokenizer(recipe.model) for name in ("hf", "unsloth")}
    for tok in tokenizers.values():
        tok.padding_side = "left"  # as some models' tokenizers ship
    trainers = _trainers(tmp_path, recipe, tokenizers)
    # The model's name was in UNSLOTH_IGNORED_TOKENIZER_NAMES when Unsloth's trainer read it.
    assert stand_in_unsloth["untrained_token_fix_skipped"] is True
    assert trainers["unsloth"].model.config._name_or_path in os.environ["UNSLOTH_IGNORED_TOKENIZER_NAMES"].split("\n")
    files = {}
    for name, tok in tokenizers.items():
        tok.save_pretrained(tmp_path / name)
        files[name] = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}
    assert tokenizers["unsloth"].padding_side == "left"
    assert files["unsloth"] == files["hf"]


def test_training_arguments_pin_what_unsloth_would_change(tmp_path):
    from trl import SFTConfig

    from fastft.train import training_arguments

    config = SFTConfig(**training_arguments(load_recipe(tiny_recipe(tmp_path)), tmp_path / "run", eval_data=False))
    # Trainer defaults: True and None; Unsloth's trainer: False and 250 (unsloth/models/rl.py).
    assert (config.logging_nan_inf_filter, config.torch_empty_cache_steps) == (False, 250)


@pytest.mark.parametrize("user_value, disabled", [(None, True), ("0", False)])
def test_trainer_telemetry_is_off_unless_the_user_turns_it_on(user_value, disabled):
    """TRL's trainers call huggingface_hub's send_telemetry on every start; in fastft it sends nothing."""
    code = """
import fastft.train  # first, as `fastft run` does
from huggingface_hub import constants
from huggingface_hub.utils import _telemetry, send_telemetry
disabled = constants.HF_HUB_DISABLE_TELEMETRY
if disabled:  # what trl's _BaseTrainer._send_telemetry calls; with telemetry on it would start a sending thread
    send_telemetry("trl/SFTTrainer", library_name="trl")
    disabled = _telemetry._TELEMETRY_THREAD is None
print(disabled)
"""
    offline = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CI", "HF_HUB_DISABLE_TELEMETRY")  # each also stops it
    env = {k: v for k, v in os.environ.items() if k not in offline}
    if user_value is not None:
        env["HF_HUB_DISABLE_TELEMETRY"] = user_value
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**env, "PYTHONPATH": PYTHONPATH})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(disabled)


def test_zeroed_pad_row_is_found_and_refused_when_the_data_uses_it(tiny):
    import copy

    import torch

    from fastft.models import load_tokenizer

    model, _, _, recipe_path = tiny
    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model)
    model = copy.deepcopy(model)
    embed, pad = model.get_input_embeddings(), tokenizer.pad_token_id
    assert embed.padding_idx == pad == 256  # the tiny config names its pad, as Llama-3 checkpoints may
    with torch.no_grad():
        embed.weight[pad] = 0  # what Unsloth's loader does (tokenizer_utils.py zero_pad_embedding_rows)
    assert backend.zeroed_pad_rows(model, tokenizer) == [256]
    assert backend.zeroed_pad_rows(model, types.SimpleNamespace(pad_token_id=None)) == []

    used = {"input_ids": [[48, 25, 220], [34, 256, 13]]}
    with pytest.raises(FastftError, match=r"pad token \(id 256\).*example 2 of the data uses.*--backend hf"):
        backend.refuse_zeroed_rows_in_data(recipe, [256], {"input_ids": [[48]]}, used)
    backend.refuse_zeroed_rows_in_data(recipe, [256], {"input_ids": [[48, 25], [34, 13]]}, None)

    tied = copy.deepcopy(model)
    tied.get_output_embeddings().weight = tied.get_input_embeddings().weight
    assert backend.zeroed_pad_rows(tied, tokenizer) == []  # Unsloth leaves a tied embedding alone


@pytest.mark.parametrize("override", ["model.liger_kernels=true", "model.upcast_fp32=true", "train.fused_loss=false"])
def test_fast_path_switches_unsloth_cannot_honour_are_refused(override):
    recipe = load_recipe(RECIPES / "fusion_fr.toml", ["model.name=fastft:tiny", override])
    with pytest.raises(FastftError, match=f"`{override.split('=')[0]}` = {override.split('=')[1]}: .*--backend hf"):
        backend.load_arguments(recipe, "unused", config=None)


# --------------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("name", ["hf", "unsloth"])
def test_embedding_learning_rate_reaches_the_optimizers_parameter_groups(name, tmp_path, monkeypatch):
    """Each backend's make_trainer builds an optimizer whose trained embeddings (modules_to_save) have
    `train.embedding_learning_rate` and no weight decay, and whose LoRA weights have the recipe's."""
    import types

    from trl import SFTConfig, SFTTrainer

    from fastft.backends.hf import HFBackend
    from fastft.data import prepare
    from fastft.models import load_tokenizer, resolve_model
    from fastft.train import training_arguments

    recipe = load_recipe(tiny_recipe(tmp_path), ["lora.modules_to_save=['embed_tokens', 'lm_head']",
                                                 "train.embedding_learning_rate=2e-5", "train.weight_decay=0.01"])
    tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe, tokenizer, echo=lambda *a: None)
    model = HFBackend().load_model(recipe, resolve_model(recipe.model.name))
    if name == "unsloth":
        # Importing Unsloth needs a CUDA GPU. Its trainer and arguments are subclasses of TRL's; these stand in
        # for them so that the unsloth backend's own make_trainer (and the grouping it installs) runs here.
        fake = types.ModuleType("unsloth")
        fake.UnslothTrainer = type("UnslothTrainer", (SFTTrainer,), {})
        fake.UnslothTrainingArguments = type("UnslothTrainingArguments", (SFTConfig,), {})
        monkeypatch.setitem(sys.modules, "unsloth", fake)
        engine = backend.make()
    else:
        engine = HFBackend()
    trainer = engine.make_trainer(recipe, model, tokenizer, data.train.to_dataset(), None,
                                  training_arguments(recipe, tmp_path / "run", eval_data=False), callbacks=[])
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
    groups = {(g["lr"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    assert set(groups) == {(2e-5, 0.0), (1e-3, 0.01)}
    embeddings, rest = groups[(2e-5, 0.0)], groups[(1e-3, 0.01)]
    assert embeddings == sorted(n for n in names.values() if "modules_to_save" in n)
    assert any("embed_tokens" in n for n in embeddings) and any("lm_head" in n for n in embeddings)
    assert rest and all("lora_" in n for n in rest) and len(embeddings) + len(rest) == len(names)
