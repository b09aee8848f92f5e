"""`fastft run` end to end on CPU: the quickstart trains, saves a stock-PEFT adapter, and says so."""

import json

import pytest
import torch
from conftest import RECIPES, run_cli
from transformers import TrainerCallback

from fastft.train import run

PROBE = "### Question:\nQu'est-ce qu'un plasma ?\n\n### Answer:\n"


class CaptureLogits(TrainerCallback):
    """Record the trained model's logits on a probe text when training ends."""

    def __init__(self, tokenizer):
        self.ids = tokenizer(PROBE, return_tensors="pt").input_ids
        self.logits = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=self.ids).logits


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    capture = CaptureLogits(tokenizer)
    run_dir = run(str(RECIPES / "quickstart.toml"), output=str(out), echo=lambda *_: None, callbacks=(capture,))
    return run_dir, capture


def test_quickstart_loss_falls_and_summary_is_complete(quickstart):
    run_dir, _ = quickstart
    summary = json.loads((run_dir / "fastft.json").read_text())
    assert summary["steps"] == 100 and summary["backend"] == "hf"
    assert summary["final_loss"] < 0.6 * summary["first_loss"], summary  # clearly learned, not noise
    assert summary["dataset_fingerprint"].startswith("sha256:")
    assert summary["data"]["train_examples"] == 110 and summary["data"]["eval_examples"] == 13  # 123 pairs
    assert summary["versions"]["transformers"]
    assert (run_dir / "recipe.toml").read_text().startswith("# resolved from")


def test_adapter_reloads_with_stock_peft_and_gives_the_same_logits(quickstart):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fastft.models import resolve_model

    run_dir, capture = quickstart
    adapter = run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "fastft:tiny"  # the recipe's id, not a cache path
    # PEFT's set of target modules, sorted: the same adapter gives the same file in every process (the
    # GPU parity test once saw hf and unsloth write the same modules in different orders).
    assert len(config["target_modules"]) > 2 and config["target_modules"] == sorted(config["target_modules"])
    assert (adapter / "adapter_model.safetensors").exists() and not list(adapter.glob("*.bin"))
    base = AutoModelForCausalLM.from_pretrained(resolve_model("fastft:tiny"), dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=capture.ids).logits
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        reloaded = model(input_ids=capture.ids).logits
    torch.testing.assert_close(reloaded, capture.logits, atol=1e-5, rtol=1e-5)
    assert (reloaded - base_logits).abs().max() > 0.1  # the adapter really changed the model


def test_checkpoints_are_marked_complete(quickstart):
    from fastft.train import latest_checkpoint

    run_dir, _ = quickstart
    assert latest_checkpoint(run_dir).name == "checkpoint-100"


# 16-bit in bf16: the trained embeddings stay fp32 on a bf16 base, and the answer sampled at the end
# of the run once fed fp32 into bf16 layers (seen first on a GPU: the run died after saving its adapter).
@pytest.mark.parametrize("quantization, dtype", [("4bit", "auto"), ("16bit", "bf16")])
def test_fusion_fr_runs_offline_on_cpu(tmp_path, quantization, dtype):
    result = run_cli("run", str(RECIPES / "fusion_fr.toml"), "--set", "model.name=fastft:tiny",
                     "--set", f"model.quantization={quantization}", "--set", f"model.dtype={dtype}",
                     "--set", "train.max_steps=2", "--set", "train.batch_size=2", "--output", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"fastft:tiny ({quantization})" in result.stdout
    summary = json.loads((tmp_path / "run" / "fastft.json").read_text())
    assert summary["steps"] == 2 and summary["final_loss"] > 0 and summary["sample"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_trainable_weights_stay_fp32_on_a_4bit_base(tmp_path, tokenizer):
    """TRL casts a quantised model's trainable weights to bf16; small embedding updates would vanish there."""
    from fastft.backends.hf import HFBackend
    from fastft.data import prepare
    from fastft.models import resolve_model
    from fastft.recipe import load_recipe
    from fastft.train import training_arguments

    recipe = load_recipe(RECIPES / "fusion_fr.toml", ["model.name=fastft:tiny"])
    data = prepare(recipe, tokenizer, echo=lambda *_: None)
    backend = HFBackend()
    model = backend.load_model(recipe, resolve_model("fastft:tiny"))
    assert type(model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    trainer = backend.make_trainer(recipe, model, tokenizer, data.train.to_dataset(), None,
                                   training_arguments(recipe, tmp_path, eval_data=False), [])
    trained = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trained) and set(trained.values()) == {torch.float32}


def test_end_of_run_sample_is_quiet_when_the_model_sets_a_max_length(caplog):
    """Unsloth's loader sets generation_config.max_length to the model's context; the sample still answers
    `max_new_tokens` tokens, without transformers' warning about the two settings at every call."""
    import logging

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from fastft.data import prepare
    from fastft.generate import sample_answer
    from fastft.models import load_tokenizer, resolve_model
    from fastft.recipe import load_recipe

    recipe = load_recipe(RECIPES / "quickstart.toml")
    tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe, tokenizer, echo=lambda *_: None)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(recipe.model.name))
    model.generation_config.max_length = 131072
    recipe.train.sample_prompt = ""  # the first training example's prompt
    hf_logging.enable_propagation()  # transformers' records reach caplog
    try:
        with caplog.at_level(logging.WARNING):
            _, answer = sample_answer(model, tokenizer, recipe, data, max_new_tokens=12)
    finally:
        hf_logging.disable_propagation()
    assert answer and not [r for r in caplog.records if "seem to have been set" in r.getMessage()]
