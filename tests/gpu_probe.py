"""Helper for tests/test_gpu_backends.py: one step per fresh process (Unsloth must come first in its own).

    python tests/gpu_probe.py train BACKEND RECIPE OUTPUT LOGITS [--set KEY=VALUE ...]
        `fastft run` exactly as the CLI runs it; the trained model's logits on a fixed batch
        (the first 4 training examples, cut to a common length) are saved to LOGITS, and a digest
        of the input ids and labels of every batch that reached the model's forward in training
        (after all backend code ran) to LOGITS.batches.json.
    python tests/gpu_probe.py init BACKEND RECIPE LORA [--set KEY=VALUE ...]
        Load the model with LoRA attached as `fastft run` does, and save the LoRA weights at
        step 0 to LORA.
    python tests/gpu_probe.py load STACK ADAPTER BATCH LOGITS RECIPE [--set KEY=VALUE ...]
        Load ADAPTER on the `hf` stack (transformers + stock PEFT) or the `unsloth` stack
        (Unsloth's own adapter loader) and save its logits on BATCH's ids to LOGITS; the `hf`
        stack also saves the base model's logits (adapter disabled).
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path


def fixed_batch(data, rows: int = 4, length: int = 32):
    import torch

    ids = data.train.input_ids[:rows]
    n = min(length, *(len(x) for x in ids))  # no padding: every stack sees the same plain causal batch
    return torch.tensor([x[:n] for x in ids])


def logits_of(model, ids):
    import torch

    model.eval()  # no dropout
    with torch.no_grad():
        return model(input_ids=ids.to(model.device), use_cache=False).logits.float().cpu()


class RecordBatches:
    """Trainer callback: a digest of the ids and labels of every training forward, as the model receives them."""

    def __init__(self):
        self.digests = []

    def __getattr__(self, name):  # every other Trainer event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import hashlib

        def record(module, positional, named):
            if module.training and "input_ids" in named:
                digest = hashlib.sha256()
                for key in ("input_ids", "labels"):
                    if named.get(key) is not None:
                        digest.update(key.encode() + named[key].detach().cpu().long().numpy().tobytes())
                self.digests.append(digest.hexdigest())

        model.register_forward_pre_hook(record, with_kwargs=True)


def train(args) -> None:
    import fastft.train as run  # imports no transformers, so Unsloth can still come first

    answer = run.sample_answers
    batches = RecordBatches()

    def capture(model, tokenizer, recipe, data, **kwargs):
        from safetensors.torch import save_file

        ids = fixed_batch(data)
        save_file({"ids": ids, "logits": logits_of(model, ids)}, args.logits)
        return answer(model, tokenizer, recipe, data, **kwargs)

    run.sample_answers = capture  # called by run() at the end of training, on the trained model
    run.run(args.recipe, backend=args.backend, overrides=tuple(args.set), output=args.output, callbacks=(batches,))
    Path(args.logits + ".batches.json").write_text(json.dumps(batches.digests))


def init(args) -> None:
    """The LoRA weights at step 0, loaded through the backend as `fastft run` loads them."""
    from fastft.backends import get_backend

    engine = get_backend(args.backend)  # Unsloth, if chosen, is imported here, first
    from safetensors.torch import save_file

    from fastft.models import resolve_model
    from fastft.recipe import load_recipe

    recipe = load_recipe(args.recipe, tuple(args.set))
    model = engine.load_model(recipe, resolve_model(recipe.model.name))
    save_file({n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n},
              args.lora)


def load(args) -> None:
    from fastft.models import resolve_model
    from fastft.recipe import load_recipe

    recipe = load_recipe(args.recipe, tuple(args.set))
    base_path = resolve_model(recipe.model.name)
    out = {}
    if args.stack == "unsloth":
        from fastft.backends.unsloth import UnslothBackend, load_arguments

        UnslothBackend().check()  # imports Unsloth before transformers
        from transformers import AutoConfig
        from unsloth import FastLanguageModel

        # The adapter names its base by recipe id (`random:...`); Unsloth's loader needs the folder.
        adapter = Path(tempfile.mkdtemp()) / "adapter"
        shutil.copytree(args.adapter, adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_path
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        kwargs = load_arguments(recipe, base_path, AutoConfig.from_pretrained(base_path))
        model, _ = FastLanguageModel.from_pretrained(**{**kwargs, "model_name": str(adapter)})
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from fastft.backends.hf import compute_dtype

        import torch

        dtype = compute_dtype(recipe)
        kwargs = dict(dtype=dtype, device_map={"": 0} if torch.cuda.is_available() else None)
        if recipe.model.quantization != "16bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, **kwargs), args.adapter)
        with model.disable_adapter():
            out["base_logits"] = logits_of(model, _ids(args.batch))
    out["logits"] = logits_of(model, _ids(args.batch))
    from safetensors.torch import save_file

    save_file(out, args.logits)


def _ids(path):
    from safetensors.torch import load_file

    return load_file(path)["ids"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    steps = parser.add_subparsers(dest="step", required=True)
    t = steps.add_parser("train")
    t.add_argument("backend")
    t.add_argument("recipe")
    t.add_argument("output")
    t.add_argument("logits")
    t.add_argument("--set", action="append", default=[])
    ld = steps.add_parser("load")
    ld.add_argument("stack", choices=["hf", "unsloth"])
    ld.add_argument("adapter")
    ld.add_argument("batch")
    ld.add_argument("logits")
    ld.add_argument("recipe")
    ld.add_argument("--set", action="append", default=[])
    i = steps.add_parser("init")
    i.add_argument("backend")
    i.add_argument("recipe")
    i.add_argument("lora")
    i.add_argument("--set", action="append", default=[])
    parsed = parser.parse_args()
    {"train": train, "load": load, "init": init}[parsed.step](parsed)
