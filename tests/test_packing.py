"""Padding-free packing is exact: a packed row gives each example the loss it has alone.

`data.packing` concatenates a micro-batch into one row with position ids restarting at each
example (TRL's collator). transformers' mask code reads those position ids as a block-diagonal
causal mask (eager, SDPA) and FlashAttention-2 as sequence boundaries, so no example attends to
another. These tests check that on the tiny model in fp32, through the `hf` backend's own load,
for eager and SDPA attention, with and without the LoRA adapter.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import write_jsonl, write_recipe

# Mixed lengths, so padded rows really are padded and packed rows hold several boundaries.
ROWS = [
    {"question": "Qu'est-ce qu'un tokamak ?", "answer": "Un tore magnétique qui confine un plasma."},
    {"question": "Et ITER ?", "answer": "Oui."},
    {"question": "Pourquoi le deutérium et le tritium ?",
     "answer": "Leur fusion a la plus grande section efficace aux températures atteignables, "
               "et libère 17,6 MeV par réaction, dont 14,1 MeV emportés par le neutron."},
    {"question": "Combien ?", "answer": "Cent cinquante millions de degrés."},
    {"question": "Qui ?", "answer": "Lawson."},
]


def _recipe(tmp_path_factory, attention: str = "sdpa", train_on: str = "completion"):
    from fastft.recipe import load_recipe

    folder = tmp_path_factory.mktemp("packing")
    data = write_jsonl(folder / "data.jsonl", ROWS)
    path = write_recipe(folder / "r.toml", f"""
[model]
name = "fastft:tiny"
quantization = "16bit"
dtype = "fp32"
attention = "{attention}"
[data]
path = "{data.as_posix()}"
template = "Q: {{question}}\\nA: {{answer}}"
train_on = "{train_on}"
packing = true
[lora]
r = 8
[train]
gradient_checkpointing = false
""")
    return load_recipe(path)


@pytest.fixture(scope="module")
def examples(tmp_path_factory, tokenizer):
    """The prepared (input_ids, labels) of ROWS, as the trainer receives them."""
    from fastft.data import prepare

    data = prepare(_recipe(tmp_path_factory), tokenizer, echo=lambda *a: None)
    return [{"input_ids": i, "labels": lab} for i, lab in zip(data.train.input_ids, data.train.labels)]


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request, tmp_path_factory):
    """The tiny model with LoRA, loaded by the hf backend, with a non-zero adapter so LoRA counts."""
    from fastft.backends.hf import HFBackend
    from fastft.models import resolve_model

    recipe = _recipe(tmp_path_factory, attention=request.param)
    model = HFBackend().load_model(recipe, resolve_model(recipe.model.name))
    assert model.config._attn_implementation == request.param
    assert model.dtype == torch.float32
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # zero at initialisation: the adapter would change nothing
            torch.nn.init.normal_(p, std=0.5)
    model.train()  # as in training (dropout is 0)
    return model


def collate(tokenizer, examples, packing):
    from fastft.batching import make_collator

    return make_collator(tokenizer, packing)(examples)


def logits_of(model, batch, lora=True, **extra):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        if lora:
            return model(**inputs, **extra).logits
        with model.disable_adapter():
            return model(**inputs, **extra).logits


def token_losses(logits, labels):
    """Per-token loss of one example: position t predicts label t+1, as the model's loss shifts."""
    keep = labels[1:] != -100
    return F.cross_entropy(logits[:-1].float(), labels[1:], reduction="none")[keep]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "base"])
def test_packed_and_padded_give_the_same_loss_per_example(model, tokenizer, examples, lora):
    padded, packed = collate(tokenizer, examples, False), collate(tokenizer, examples, True)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert padded["attention_mask"].eq(0).any()  # the padded layout really has padding
    lu, lp = logits_of(model, padded, lora), logits_of(model, packed, lora)[0]
    offset = 0
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        alone = token_losses(lu[i, :n], padded["labels"][i, :n])
        in_row = token_losses(lp[offset:offset + n], packed["labels"][0, offset:offset + n])
        assert len(alone) == len(in_row) > 0
        torch.testing.assert_close(in_row, alone, rtol=1e-5, atol=1e-5)  # fp32 rounding, relative to the loss
        assert abs(in_row.mean().item() - alone.mean().item()) < 1e-5
        offset += n
    # The model's own loss (the one training minimises) covers the same tokens in both layouts.
    inputs_u = {k: v for k, v in padded.items()}
    inputs_p = {k: v for k, v in packed.items()}
    with torch.no_grad():
        if lora:
            loss_u, loss_p = model(**inputs_u).loss, model(**inputs_p).loss
        else:
            with model.disable_adapter():
                loss_u, loss_p = model(**inputs_u).loss, model(**inputs_p).loss
    assert abs(loss_u.item() - loss_p.item()) < 1e-5


def test_the_adapter_changes_the_logits(model, tokenizer, examples):
    """Otherwise the `lora` case above would test nothing the `base` case does not."""
    batch = collate(tokenizer, examples, True)
    assert (logits_of(model, batch, True) - logits_of(model, batch, False)).abs().max() > 1e-2


def test_no_attention_crosses_example_boundaries(model, tokenizer, examples):
    before, middle, after = examples[0], examples[1], examples[2]
    changed = {"input_ids": [(t + 7) % 256 for t in examples[3]["input_ids"]], "labels": examples[3]["labels"]}
    assert len(changed["input_ids"]) != len(middle["input_ids"])  # the neighbour after it moves too

    def slices(batch_examples, lora):
        logits = logits_of(model, collate(tokenizer, batch_examples, True), lora)[0]
        cuts = torch.tensor([len(e["input_ids"]) for e in batch_examples]).cumsum(0).tolist()
        return [logits[a:b] for a, b in zip([0] + cuts[:-1], cuts)]

    for lora in (True, False):
        a, b = slices([before, middle, after], lora), slices([before, changed, after], lora)
        # fp32 rounding (matmuls of other shapes) scales with the logits, as in merge's fidelity tolerance.
        scale = max(1.0, a[0].abs().max().item(), a[2].abs().max().item())
        torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(b[2], a[2], rtol=0, atol=1e-5 * scale)
        assert not torch.allclose(b[1][:4], a[1][:4], atol=1e-2)  # the changed example itself did change

    # With a KV cache the mask code ignores the position ids and the neighbours do see each other:
    # what the backend's `use_cache = False` prevents, and proof that this test can fail.
    leaky_a = logits_of(model, collate(tokenizer, [before, middle, after], True), use_cache=True)[0]
    leaky_b = logits_of(model, collate(tokenizer, [before, changed, after], True), use_cache=True)[0]
    n0, n1, n1b = (len(e["input_ids"]) for e in (before, middle, changed))
    assert not torch.allclose(leaky_a[n0 + n1:], leaky_b[n0 + n1b:], atol=1e-3)


def test_packing_keeps_the_loss_mask(tmp_path_factory, tokenizer):
    """Packed labels are the examples' labels end to end, with each example's first label masked.

    The loss shifts labels by one: position t's logits predict label t+1. Padded, an example's
    first label is never predicted (nothing comes before it). Packed, it would be predicted by
    the previous example's last token, a cross-example target that does not exist unpacked;
    masking it (TRL does, where position ids restart) leaves exactly the tokens the padded
    layout trains on. `train_on = "all"` makes every first label a real token, so this shows.
    """
    from fastft.data import prepare

    data = prepare(_recipe(tmp_path_factory, train_on="all"), tokenizer, echo=lambda *a: None)
    examples = [{"input_ids": i, "labels": lab} for i, lab in zip(data.train.input_ids, data.train.labels)]
    assert all(ex["labels"][0] != -100 for ex in examples)
    packed = collate(tokenizer, examples, True)
    expected = [t for ex in examples for t in [-100] + ex["labels"][1:]]
    assert packed["labels"][0].tolist() == expected
    assert packed["input_ids"][0].tolist() == [t for ex in examples for t in ex["input_ids"]]
    assert packed["position_ids"][0].tolist() == [p for ex in examples for p in range(len(ex["input_ids"]))]
    # The same number of tokens carry the loss in both layouts, once shifted.
    padded = collate(tokenizer, examples, False)
    assert (packed["labels"][0, 1:] != -100).sum() == (padded["labels"][:, 1:] != -100).sum()

    # And with the completion mask of the qa template, the prompt stays masked in the packed row.
    completion = prepare(_recipe(tmp_path_factory), tokenizer, echo=lambda *a: None)
    row = collate(tokenizer, [{"input_ids": i, "labels": lab} for i, lab in
                              zip(completion.train.input_ids, completion.train.labels)], True)["labels"][0].tolist()
    assert row == [t for lab in completion.train.labels for t in [-100] + lab[1:]]
    prompts = sum(len(f"Q: {r['question']}\nA: ") for r in ROWS)  # characters; byte-level tokens are as many or more
    assert row.count(-100) >= prompts


def test_trainer_loss_on_a_packed_batch_ignores_the_models_cache_setting(model, tokenizer, examples, tmp_path):
    """The trainer turns the KV cache off itself, so packing stays exact whatever the config says."""
    from trl import SFTConfig

    from fastft.backends.hf import trainer_class
    from fastft.data import Split

    dataset = Split([e["input_ids"] for e in examples], [e["labels"] for e in examples]).to_dataset()
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=None,
                     dataset_kwargs={"skip_prepare_dataset": True})
    trainer = trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    model.config.use_cache = True
    try:
        with torch.no_grad():
            loss_p = trainer.compute_loss(model, collate(tokenizer, examples, True))
            loss_u = trainer.compute_loss(model, collate(tokenizer, examples, False))
    finally:
        model.config.use_cache = False
    assert abs(loss_p.item() - loss_u.item()) < 1e-5


def test_training_losses_match_step_by_step(tmp_path_factory, tokenizer):
    """Packed and padded training in the same example order log the same loss at every step."""
    from fastft.backends.hf import HFBackend
    from fastft.data import prepare
    from fastft.models import resolve_model
    from fastft.train import training_arguments

    losses = {}
    for packing in (False, True):
        recipe = _recipe(tmp_path_factory)
        recipe.data.packing, recipe.data.group_by_length = packing, False  # both in the same random order
        recipe.train.max_steps, recipe.train.batch_size, recipe.train.logging_steps = 3, 4, 1
        recipe.train.report_to, recipe.train.learning_rate = "none", 1e-2
        data = prepare(recipe, tokenizer, echo=lambda *a: None)
        train = data.train.to_dataset()
        train = train.select([i % len(train) for i in range(12)])  # three batches of four
        backend = HFBackend()
        model = backend.load_model(recipe, resolve_model(recipe.model.name))
        args = training_arguments(recipe, tmp_path_factory.mktemp("run"), eval_data=False)
        trainer = backend.make_trainer(recipe, model, tokenizer, train, None, args, callbacks=[])
        trainer.train()
        losses[packing] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[False]) == 3 and len(set(losses[False])) > 1  # it trained: the loss moved
    for padded, packed in zip(losses[False], losses[True]):
        assert abs(packed - padded) <= 1e-4 * abs(padded)
