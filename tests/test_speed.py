"""The hf backend's fast-path switches, length-grouped batching and the padding-waste count.

Each switch is checked where it lands (weight dtypes, the checkpoint function's arguments,
the trainer's sampler and batches), not only that loading ran. What needs a GPU (Liger
kernels, TRL's fused loss, FlashAttention) is checked here only for its CPU behaviour.
"""

import pytest
import torch
from conftest import write_jsonl, write_recipe

from fastft.errors import FastftError


def make_recipe(folder, rows, **sections):
    """A recipe on fastft:tiny whose sections are `sections` (dicts) over a small base."""
    from fastft.recipe import load_recipe, to_toml, recipe_from_dict

    data = write_jsonl(folder / "data.jsonl", rows)
    raw = {"model": {"name": "fastft:tiny", "quantization": "16bit"},
           "data": {"path": [data.as_posix()], "template": "Q: {question}\nA: {answer}"},
           "lora": {"r": 4}, "train": {"batch_size": 4, "report_to": "none", "seed": 3}}
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return load_recipe(write_recipe(folder / "r.toml", to_toml(recipe_from_dict(raw))))


def mixed_rows(n=192):
    """Two answers in three of a few characters, one of about 300: the worst case for padding."""
    return [{"question": f"q{i}", "answer": ("court." if i % 3 else "long " * 60 + "x" * i)} for i in range(n)]


# --------------------------------------------------------------------------- recipe options


def test_fast_path_defaults_and_stock_on_cpu(tmp_path):
    from fastft.backends.hf import fast_path

    recipe = make_recipe(tmp_path, mixed_rows(4), model={"quantization": "4bit"})
    assert fast_path(recipe) == dict(attention="sdpa", liger_kernels=False, fused_loss=False, upcast_fp32=False,
                                     checkpointing="non-reentrant")
    # The baseline is the seeds' path whatever the recipe asks for.
    eager = make_recipe(tmp_path, mixed_rows(4), model={"quantization": "4bit", "attention": "eager"})
    assert fast_path(eager, stock=True) == dict(attention="sdpa", liger_kernels=False, fused_loss=False,
                                                upcast_fp32=True, checkpointing="reentrant")
    off = make_recipe(tmp_path, mixed_rows(4), train={"gradient_checkpointing": False})
    assert fast_path(off)["checkpointing"] == fast_path(off, stock=True)["checkpointing"] == "off"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_insisting_on_gpu_kernels_without_a_gpu_is_a_clear_error(tmp_path):
    from fastft.backends.hf import fast_path

    with pytest.raises(FastftError, match=r"model\.liger_kernels = true.*no GPU"):
        fast_path(make_recipe(tmp_path, mixed_rows(4), model={"liger_kernels": True}))
    with pytest.raises(FastftError, match=r"train\.fused_loss = true"):
        fast_path(make_recipe(tmp_path, mixed_rows(4), train={"fused_loss": True}))


def test_recipe_refuses_upcasting_a_16bit_base_and_bad_switch_values(tmp_path):
    with pytest.raises(FastftError, match=r"model\.upcast_fp32.*4-bit"):
        make_recipe(tmp_path, mixed_rows(4), model={"upcast_fp32": True})
    with pytest.raises(FastftError, match=r"model\.liger_kernels.*not allowed"):
        make_recipe(tmp_path, mixed_rows(4), model={"liger_kernels": "yes"})
    assert make_recipe(tmp_path, mixed_rows(4), train={"gradient_checkpointing": "reentrant"}).train \
        .gradient_checkpointing == "reentrant"


# --------------------------------------------------------------------------- switches reach the model


@pytest.mark.parametrize("stock, model_opts, train_opts, upcast, reentrant", [
    (False, {}, {}, False, False),
    (False, {"upcast_fp32": True}, {"gradient_checkpointing": "reentrant"}, True, True),
    (True, {}, {}, True, True),  # the baseline ignores the recipe's fast defaults
], ids=["fast-defaults", "seed-switches", "hf-stock"])
def test_switches_reach_the_4bit_model(tmp_path, stock, model_opts, train_opts, upcast, reentrant):
    from fastft.backends.hf import HFBackend
    from fastft.models import resolve_model

    recipe = make_recipe(tmp_path, mixed_rows(4), model={"quantization": "4bit", "dtype": "bf16", **model_opts},
                         train={"gradient_checkpointing": True, **train_opts})
    model = HFBackend(stock=stock).load_model(recipe, resolve_model("fastft:tiny"))
    base = model.get_base_model()
    assert type(base.model.layers[0].self_attn.q_proj.base_layer.weight).__name__ == "Params4bit"
    # What 4-bit leaves unquantised: fp32 only when upcast (the seeds' memory cost).
    kept = torch.float32 if upcast else torch.bfloat16
    for weight in (base.model.norm.weight, base.model.layers[0].input_layernorm.weight,
                   base.model.embed_tokens.weight, base.lm_head.weight):
        assert weight.dtype == kept
    layer = base.model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords == {"use_reentrant": reentrant}
    assert base.config.use_cache is False
    # Gradients reach every adapter through the checkpointed layers (reentrant needs grad-requiring inputs).
    model.train()
    ids = torch.randint(0, 200, (2, 12))
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert out.hidden_states[1].dtype == kept  # upcast weights make the activations between layers fp32 too
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# --------------------------------------------------------------------------- length-grouped batching


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tokenizer):
    """A prepared mixed-length dataset, its recipe folder and a tiny model to build trainers on."""
    from fastft.backends.hf import HFBackend
    from fastft.data import prepare
    from fastft.models import resolve_model

    folder = tmp_path_factory.mktemp("mixed")
    recipe = make_recipe(folder, mixed_rows())
    data = prepare(recipe, tokenizer, echo=lambda *a: None)
    model = HFBackend().load_model(recipe, resolve_model("fastft:tiny"))
    return folder, data, model


def trainer_batches(mixed, tokenizer, **data_opts):
    """The batches of one epoch of the real Trainer dataloader for the recipe with `data_opts`."""
    from fastft.backends.hf import HFBackend
    from fastft.train import training_arguments

    folder, data, model = mixed
    recipe = make_recipe(folder, mixed_rows(), data=data_opts)
    args = training_arguments(recipe, folder / "run", eval_data=False)
    trainer = HFBackend().make_trainer(recipe, model, tokenizer, data.train.to_dataset(), None, args, callbacks=[])
    return args, list(trainer.get_train_dataloader())


def waste(batches):
    computed = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return (computed - real) / computed, real


def test_group_by_length_cuts_the_trainers_padding(mixed, tokenizer):
    total = sum(len(x) for x in mixed[1].train.input_ids)
    args, grouped = trainer_batches(mixed, tokenizer)  # the default
    assert args["train_sampling_strategy"] == "group_by_length"
    _, shuffled = trainer_batches(mixed, tokenizer, group_by_length=False)
    (grouped_waste, grouped_real), (random_waste, random_real) = waste(grouped), waste(shuffled)
    assert grouped_real == random_real == total  # every example once, in both orders
    assert random_waste > 0.3 and grouped_waste < random_waste / 3
    # Packing needs no grouping and pads nothing.
    args, packed = trainer_batches(mixed, tokenizer, packing=True)
    assert args["train_sampling_strategy"] == "random"
    assert waste(packed) == (0.0, total) and all(b["input_ids"].shape[0] == 1 for b in packed)


# --------------------------------------------------------------------------- padding waste


def split_of(lengths):
    from fastft.data import Split

    return Split([[65] * n for n in lengths], [[-100] + [65] * (n - 1) for n in lengths])


def test_padding_waste_hand_counted():
    from fastft.batching import padding_waste

    # Batches of 2 in order: (3, 5) -> 2 x 5 = 10, (2, 8) -> 16, (4) -> 4: 30 computed, 22 real.
    w = padding_waste(split_of([3, 5, 2, 8, 4]), 2, packing=False, sampling="sequential")
    assert w == dict(real_tokens=22, computed_tokens=30, padding_tokens=8, padding_fraction=8 / 30)
    packed = padding_waste(split_of([3, 5, 2, 8, 4]), 2, packing=True, sampling="sequential")
    assert packed == dict(real_tokens=22, computed_tokens=22, padding_tokens=0, padding_fraction=0.0)
    # Grouped over batch x grad_accum = 4 examples (all of them here), sorted: (9, 9), (2, 2); in order (2, 9) twice.
    lengths = [2, 9, 2, 9]
    grouped = padding_waste(split_of(lengths), 2, packing=False, sampling="group_by_length", grad_accum=2)
    assert grouped["padding_tokens"] == 0
    assert padding_waste(split_of(lengths), 2, packing=False, sampling="sequential")["padding_tokens"] == 14


@pytest.mark.parametrize("sampling", ["sequential", "random", "group_by_length"])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_padding_waste_counts_what_the_collator_builds(tokenizer, sampling, packing):
    """The count from lengths alone equals the real collator's batches, fed in the same order (uneven last batch)."""
    import numpy as np

    from fastft.batching import EpochOrder, make_collator, padding_waste

    lengths = np.random.default_rng(1).integers(1, 300, 203)
    split = split_of(lengths.tolist())
    group = 5 * 2 if sampling == "group_by_length" else 0
    order = list(range(len(lengths))) if sampling == "sequential" else EpochOrder(len(lengths), 7, lengths, group).order(0)
    collate, computed = make_collator(tokenizer, packing), 0
    for start in range(0, len(order), 5):
        batch = [{"input_ids": np.zeros(lengths[i], dtype=np.int64)} for i in order[start:start + 5]]
        computed += collate(batch)["input_ids"].numel()
    got = padding_waste(split, 5, packing, sampling, grad_accum=2, seed=7)
    assert got["computed_tokens"] == computed and got["real_tokens"] == int(lengths.sum())
    assert (got["padding_tokens"] == 0) == packing


def test_samplers_read_lengths_from_the_length_column(mixed, tokenizer, monkeypatch):
    """The Trainer drops the `length` column (the model does not take it) before it asks for a sampler; the
    length-grouped samplers, for training and evaluation, read it from the data they were given instead of
    reading every example's tokens, with the orders transformers' own samplers draw from those lengths."""
    import datasets
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from fastft.backends.hf import HFBackend
    from fastft.batching import EpochOrder
    from fastft.train import training_arguments

    folder, data, model = mixed
    recipe = make_recipe(folder, mixed_rows())
    args = training_arguments(recipe, folder / "run", eval_data=True)
    trainer = HFBackend().make_trainer(recipe, model, tokenizer, data.train.to_dataset(), data.train.to_dataset(), args,
                                       callbacks=[])
    lengths = [len(x) for x in data.train.input_ids]
    given = [trainer._remove_unused_columns(d) for d in (trainer.train_dataset, trainer.eval_dataset)]
    assert all("length" not in d.column_names for d in given)

    def no_row_by_row(*args, **kwargs):
        raise AssertionError("the sampler read the examples row by row")

    monkeypatch.setattr(datasets.Dataset, "__iter__", no_row_by_row)
    train_order, eval_order = trainer._get_train_sampler(given[0]), trainer._get_eval_sampler(given[1])
    monkeypatch.undo()
    assert list(train_order) == EpochOrder(len(lengths), 3, lengths, group_size=4).order(0)
    assert list(eval_order) == list(LengthGroupedSampler(4, lengths=lengths, generator=torch.Generator().manual_seed(3)))


def test_padding_waste_matches_the_trainers_batches(mixed, tokenizer):
    """Same sampler, its own seed: not the same batches, but close statistics on 192 examples."""
    from fastft.batching import padding_waste

    split = mixed[1].train
    _, shuffled = trainer_batches(mixed, tokenizer, group_by_length=False)
    estimate = padding_waste(split, 4, packing=False, sampling="random")
    assert abs(estimate["padding_fraction"] - waste(shuffled)[0]) < 0.15
    assert padding_waste(split, 4, packing=True)["padding_tokens"] == 0


def test_validate_reports_padding(tmp_path):
    from click.testing import CliRunner

    from fastft.cli import cli

    make_recipe(tmp_path, mixed_rows())
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "r.toml"), "--examples", "0"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("padding at batch size 4:"))
    assert "grouped by length (this recipe), 0.0% packed" in line
    random_share = float(line.split(": ")[1].split("%")[0])
    assert random_share > 30


# --------------------------------------------------------------------------- GPU

# Liger patches transformers for the whole process, so each setting loads in a fresh one.
GPU_LOSSES = r"""
import json, sys, tempfile
from pathlib import Path
import torch
from fastft.backends.hf import HFBackend, _has_liger_modules, fast_path
from fastft.batching import make_collator
from fastft.data import prepare
from fastft.models import load_tokenizer, resolve_model
from fastft.recipe import load_recipe
from fastft.train import training_arguments

recipe = load_recipe(sys.argv[1], sys.argv[2:])
tokenizer = load_tokenizer(recipe.model)
data = prepare(recipe, tokenizer, echo=lambda *a: None)
backend = HFBackend()
model = backend.load_model(recipe, resolve_model(recipe.model.name))
args = training_arguments(recipe, Path(tempfile.mkdtemp()), eval_data=False)
trainer = backend.make_trainer(recipe, model, tokenizer, data.train.to_dataset(), None, args, callbacks=[])
examples = [{"input_ids": i, "labels": l} for i, l in zip(data.train.input_ids[:6], data.train.labels[:6])]
model.train()
losses = {}
with torch.no_grad():
    for packing in (False, True):
        batch = {k: v.to(model.device) for k, v in make_collator(tokenizer, packing)(examples).items()}
        losses["packed" if packing else "padded"] = trainer.compute_loss(model, batch).item()
print(json.dumps(dict(losses, fast=fast_path(recipe), liger_modules=_has_liger_modules(model))))
"""


def _losses_in_a_fresh_process(recipe, *overrides):
    import json
    import os
    import subprocess
    import sys

    from conftest import PYTHONPATH

    out = subprocess.run([sys.executable, "-c", GPU_LOSSES, str(recipe), *overrides], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": PYTHONPATH}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_gpu_loss_script_runs_on_the_cpu(tmp_path):
    # The GPU test below runs this script only on a GPU: here it cannot rot between GPU runs.
    make_recipe(tmp_path, mixed_rows(12), model={"dtype": "fp32"})
    plain = _losses_in_a_fresh_process(tmp_path / "r.toml", "model.liger_kernels=false", "train.fused_loss=false")
    assert plain["fast"]["attention"] == "sdpa" and not plain["liger_modules"]
    assert plain["packed"] == pytest.approx(plain["padded"], rel=1e-5) and plain["padded"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_gpu_fast_path_gives_the_losses_of_the_pytorch_code(tmp_path):
    import importlib.util

    make_recipe(tmp_path, mixed_rows(12), model={"dtype": "fp32"})
    fast = _losses_in_a_fresh_process(tmp_path / "r.toml")
    plain = _losses_in_a_fresh_process(tmp_path / "r.toml", "model.liger_kernels=false", "train.fused_loss=false", "model.attention=\"sdpa\"")
    liger = importlib.util.find_spec("liger_kernel") is not None
    assert fast["fast"]["liger_kernels"] == fast["liger_modules"] == liger
    assert fast["fast"]["fused_loss"] and not plain["fast"]["fused_loss"] and not plain["liger_modules"]
    for run in (fast, plain):
        assert abs(run["packed"] - run["padded"]) <= 1e-3 * run["padded"]  # packing exact on this attention too
    assert abs(fast["padded"] - plain["padded"]) <= 1e-3 * plain["padded"]
