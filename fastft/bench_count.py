"""What `fastft bench` counts: the tokens of each batch a trainer receives, and the FLOPs behind MFU.

Tokens are counted from the collated tensors themselves (padding and packing both handled), so
a row's tokens/s is what the model really processed; MFU follows `BENCHMARKING.md`.
"""

from __future__ import annotations

# Dense bf16 peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets; the first name found in the GPU's name wins.
PEAK_BF16_TFLOPS = [("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h100", 989.0), ("h200", 989.0), ("a100", 312.0)]


MFU_FORMULA = ("MFU = (4 * N * tokens + 6 * n_layers * hidden * sum(L^2)) / time / peak; N = parameters of the linear "
               "layers incl. the output head (frozen base: forward 2N + input gradients 2N per token), L = each "
               "sequence's real length (causal attention scores and values, forward + input gradients); no "
               "recomputation from checkpointing, no LoRA FLOPs; peak = the GPU's dense bf16 TFLOP/s")



def count_batch(batch) -> dict:
    """What one collated micro-batch holds, counted from its tensors.

    `sequences` and `tokens` exclude padding (attention_mask, or position ids restarting at 0 when
    examples are packed into a row); `loss_tokens` are the targets the loss is taken over (labels
    shifted by one, != -100); `positions` include padding; `sum_sq_lengths` feeds the attention FLOPs.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = ids.new_ones(ids.shape)
    lengths = []
    positions = batch.get("position_ids")
    for r in range(ids.shape[0]):
        if positions is None:
            lengths.append(int(mask[r].sum()))
            continue
        pos = positions[r][mask[r].bool()]
        starts = (pos == 0).nonzero().flatten().tolist()  # packed examples restart at position 0
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        lengths += [b - a for a, b in zip(starts, starts[1:] + [len(pos)]) if b > a]
    labels = batch.get("labels")
    loss_tokens = int((labels[:, 1:] != -100).sum()) if labels is not None else int(mask[:, 1:].sum())
    return {"sequences": len(lengths), "tokens": sum(lengths), "loss_tokens": loss_tokens,
            "positions": int(ids.numel()), "sum_sq_lengths": sum(n * n for n in lengths)}



class CountingCollator:
    """Wraps the trainer's collator and records `count_batch` of every batch it makes, in order.

    Batches are consumed in the order they are made (the data loader runs in this process),
    so the k-th record is the k-th micro-batch trained, even when the loader prefetches.
    """

    def __init__(self, collator):
        self.collator = collator
        self.records: list[dict] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.records.append(count_batch(batch))
        return batch

    def __getattr__(self, name):  # anything else a trainer asks of its collator
        if name == "collator":  # not set yet (copy, pickle): do not recurse
            raise AttributeError(name)
        return getattr(self.collator, name)



def model_shape(config) -> dict:
    """Linear-layer parameters (incl. the output head), layers, hidden size and vocabulary of a model config."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no time
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    return {"linear_parameters": linear_parameters(model), "n_layers": text.num_hidden_layers,
            "hidden_size": text.hidden_size, "vocab_size": text.vocab_size}



def linear_parameters(model) -> int:
    """Weights of every `nn.Linear` in `model` (a tied output head counts: its matmul is done)."""
    import torch

    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))



def model_flops(shape: dict, tokens: int, sum_sq_lengths: int) -> float:
    """Useful training FLOPs of a LoRA step (frozen base) over `tokens` real tokens; see `MFU_FORMULA`."""
    return 4.0 * shape["linear_parameters"] * tokens + 6.0 * shape["n_layers"] * shape["hidden_size"] * sum_sq_lengths



def peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU named `device_name`, or None when unknown (or CPU)."""
    name = (device_name or "").lower()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)
