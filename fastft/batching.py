"""From prepared examples to batches: the collator, the sampling order, padding and steps per epoch.

Every backend batches with `make_collator` and the order `sampling_strategy` names, so the
batches a model sees depend on the recipe alone. `describe_data` and `describe_padding` are what
`fastft validate` and `fastft run` print about the prepared data.
"""

from __future__ import annotations

from fastft.data import Split
from fastft.distributed import world_size
from fastft.errors import FastftError
from fastft.recipe import DataConfig, Recipe


def make_collator(tokenizer, packing: bool):
    """Batches of the prepared examples: padded to the longest, or padding-free packed.

    With packing, a micro-batch becomes one row with position ids restarting at each
    example; attention implementations then keep every example to itself. The first label
    of each example is set to -100: the loss shifts labels by one, so it would otherwise
    train the previous example's last token to predict it (padded rows never predict an
    example's first token either).
    """
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=packing)


def sampling_strategy(cfg: DataConfig) -> str:
    """The trainer's `train_sampling_strategy` for the recipe: grouped by length where padding can be saved."""
    return "group_by_length" if cfg.group_by_length and not cfg.packing else "random"


class EpochOrder:
    """The order of the training examples in each epoch: a function of (seed, epoch) alone.

    The Trainer's own samplers draw each epoch's order from the global random state when the
    epoch starts (the length-grouped one) or from a generator advanced by earlier epochs, so a
    run resumed after the first epoch saw another order than the uninterrupted run. Here the
    generator is seeded afresh from `seed + epoch` (accelerate's seedable-sampler convention, so
    random order is the one accelerate drew) whenever an epoch starts; `set_epoch` is called
    by the Trainer and the dataloader. Every process computes the same permutation, and
    accelerate deals its batches out to the processes in turn. `group_size` set: transformers'
    length-grouped order (random mega-batches, each sorted by length) over groups of
    `group_size` examples; unset: a random permutation. Packing uses the random one.
    """

    def __init__(self, n_examples: int, seed: int, lengths: list[int] | None = None, group_size: int = 0):
        self.n_examples, self.seed, self.lengths, self.group_size = n_examples, seed, lengths, group_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_examples

    def __iter__(self):
        return iter(self.order(self.epoch))

    def order(self, epoch: int) -> list[int]:
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.group_size:
            return list(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))
        return torch.randperm(self.n_examples, generator=generator).tolist()


def padding_waste(split: Split, tokenizer, batch_size: int, packing: bool, sampling: str = "random",
                  grad_accum: int = 1, seed: int = 42) -> dict:
    """How many of the tokens the model computes are padding, over one epoch of `split`.

    Micro-batches of `batch_size` examples are built by the real collator (`make_collator`) in
    the order the Trainer uses in its first epoch (`EpochOrder` for `random` and
    `group_by_length`, which groups over `batch_size * grad_accum`; or `sequential`), seeded
    by `seed`. One process; the last batch is kept. The collator is fed zeros of each example's length: the shapes it returns depend
    on lengths only, and converting the real token lists would cost seconds per 5,000 examples.
    Returns `real_tokens`, `computed_tokens` (input_ids elements, padding included),
    `padding_tokens` and `padding_fraction` (padding / computed).
    """
    import numpy as np

    if not len(split):
        raise FastftError("padding_waste: the split has no examples.")
    lengths = split.lengths.tolist()
    if sampling == "sequential":
        order = list(range(len(split)))
    elif sampling in ("random", "group_by_length"):
        group = batch_size * grad_accum if sampling == "group_by_length" else 0
        order = EpochOrder(len(split), seed, lengths, group).order(0)
    else:
        raise FastftError(f"padding_waste: unknown sampling `{sampling}`; use random, sequential or group_by_length.")
    collate = make_collator(tokenizer, packing)
    real = computed = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        real += sum(batch)
        computed += collate([{"input_ids": np.zeros(n, dtype=np.int64)} for n in batch])["input_ids"].numel()
    return dict(real_tokens=real, computed_tokens=computed, padding_tokens=computed - real,
                padding_fraction=(computed - real) / computed)


def describe_data(data, recipe: Recipe) -> str:
    s = data.stats
    steps = optimizer_steps_per_epoch(len(data.train), recipe)
    text = (f"data: {s['train_examples']} train / {s['eval_examples']} eval examples, {s['train_tokens']:,} tokens "
            f"({s['loss_tokens']:,} carry loss); length min/mean/p95/max {s['length_min']}/{s['length_mean']}/"
            f"{s['length_p95']}/{s['length_max']}; {steps} optimizer steps per epoch")
    if s["truncated_examples"]:
        text += (f"\nwarning: {s['truncated_examples']} examples longer than data.max_length = {recipe.data.max_length} "
                 f"were truncated ({s['truncated_tokens']:,} tokens dropped)")
    if s["no_loss_examples"]:
        text += f"\nwarning: {s['no_loss_examples']} examples had no loss-carrying token left and were dropped"
    return text


def describe_padding(data, recipe: Recipe, tokenizer) -> str:
    """One line: the share of computed tokens that is padding at the recipe's batch size, per batching."""
    t = recipe.train
    if not isinstance(t.batch_size, int):
        return "padding: not computed, `train.batch_size = \"auto\"` is chosen at run time"
    chosen = "packed" if recipe.data.packing else sampling_strategy(recipe.data)
    shares = []
    for name, label, packing in (("random", "of computed tokens in random order", False),
                                 ("group_by_length", "grouped by length", False), ("packed", "packed", True)):
        sampling = "random" if packing else name
        waste = padding_waste(data.train, tokenizer, t.batch_size, packing, sampling, t.grad_accum, t.seed)
        shares.append(f"{100 * waste['padding_fraction']:.1f}% {label}" + (" (this recipe)" if name == chosen else ""))
    return f"padding at batch size {t.batch_size}: " + ", ".join(shares)


def optimizer_steps_per_epoch(n_examples: int, recipe: Recipe) -> int:
    if recipe.train.batch_size == "auto":  # however the planner splits it, global_batch_size examples per step
        return max(1, n_examples // recipe.train.global_batch_size)
    batch = recipe.train.batch_size
    micro_batches = -(-n_examples // (batch * world_size()))
    return max(1, micro_batches // recipe.train.grad_accum)
