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

    def __init__(self, n_examples: int, seed: int, lengths=None, group_size: int = 0):
        import numpy as np

        self.n_examples, self.seed, self.group_size = n_examples, seed, group_size
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_examples

    def __iter__(self):
        return iter(self.order(self.epoch))

    def order(self, epoch: int) -> list[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.group_size:
            return length_grouped(self.lengths, self.group_size, generator)
        return torch.randperm(self.n_examples, generator=generator).tolist()


def length_grouped(lengths, group_size: int, generator) -> list[int]:
    """transformers' `get_length_grouped_indices`, the same order from the same generator, in numpy.

    Its Python sort of every mega-batch took over half a second per million examples before the
    first step. The rule: a random permutation cut into mega-batches of `mult * group_size`
    examples (mult = 50, or fewer so that there are 4 mega-batches), each sorted by length,
    longest first, ties in drawn order (Python's sort is stable); then the longest example of
    all swaps places with the very first one. A test compares both on many sizes.
    """
    import numpy as np
    import torch

    lengths, n = np.asarray(lengths, dtype=np.int64), len(lengths)
    if not n:
        return []
    size = (min(n // (group_size * 4), 50) or 1) * group_size
    drawn = torch.randperm(n, generator=generator).numpy()
    # one stable sort by (mega-batch, length descending) sorts every mega-batch at once
    order = drawn[np.lexsort((-lengths[drawn], np.arange(n) // size))]
    firsts = np.arange(0, n, size)
    longest = firsts[int(np.argmax(lengths[order[firsts]]))]  # the first of the longest, as torch.argmax picks
    order[0], order[longest] = order[longest], order[0]
    return order.tolist()


def padding_waste(split: Split, batch_size: int, packing: bool, sampling: str = "random", grad_accum: int = 1,
                  seed: int = 42) -> dict:
    """How many of the tokens the model computes are padding, over one epoch of `split`.

    Micro-batches of `batch_size` examples in the order the Trainer uses in its first epoch
    (`EpochOrder` for `random` and `group_by_length`, which groups over `batch_size * grad_accum`;
    or `sequential`), seeded by `seed`. One process; the last batch is kept. Each micro-batch is
    shaped as `make_collator` shapes it: padded to its longest example, or packed into one row
    of them all (a test checks this against the collator itself); computed from the lengths
    alone, in numpy, as a million examples would take minutes through the collator.
    Returns `real_tokens`, `computed_tokens` (input_ids elements, padding included),
    `padding_tokens` and `padding_fraction` (padding / computed).
    """
    import numpy as np

    if not len(split):
        raise FastftError("padding_waste: the split has no examples.")
    lengths = split.lengths
    if sampling == "sequential":
        order = np.arange(len(split))
    elif sampling in ("random", "group_by_length"):
        group = batch_size * grad_accum if sampling == "group_by_length" else 0
        order = np.asarray(EpochOrder(len(split), seed, lengths, group).order(0))
    else:
        raise FastftError(f"padding_waste: unknown sampling `{sampling}`; use random, sequential or group_by_length.")
    real = int(lengths.sum())
    if packing:
        computed = real
    else:
        starts = np.arange(0, len(order), batch_size)
        rows = np.diff(np.append(starts, len(order)))
        computed = int((np.maximum.reduceat(lengths[order], starts) * rows).sum())
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


def describe_padding(data, recipe: Recipe) -> str:
    """One line: the share of computed tokens that is padding at the recipe's batch size, per batching."""
    t = recipe.train
    if not isinstance(t.batch_size, int):
        return "padding: not computed, `train.batch_size = \"auto\"` is chosen at run time"
    chosen = "packed" if recipe.data.packing else sampling_strategy(recipe.data)
    shares = []
    for name, label, packing in (("random", "of computed tokens in random order", False),
                                 ("group_by_length", "grouped by length", False), ("packed", "packed", True)):
        sampling = "random" if packing else name
        waste = padding_waste(data.train, t.batch_size, packing, sampling, t.grad_accum, t.seed)
        shares.append(f"{100 * waste['padding_fraction']:.1f}% {label}" + (" (this recipe)" if name == chosen else ""))
    return f"padding at batch size {t.batch_size}: " + ", ".join(shares)


def optimizer_steps_per_epoch(n_examples: int, recipe: Recipe) -> int:
    if recipe.train.batch_size == "auto":  # however the planner splits it, global_batch_size examples per step
        return max(1, n_examples // recipe.train.global_batch_size)
    batch = recipe.train.batch_size
    micro_batches = -(-n_examples // (batch * world_size()))
    return max(1, micro_batches // recipe.train.grad_accum)
