"""`fastft generate`: answers from a trained model, prompted and stopped exactly as in training."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from fastft.data import build_prompt, render_prompt, stop_token_ids
from fastft.errors import FastftError
from fastft.export import Source, base_model, load_adapter, load_model, locate
from fastft.recipe import Recipe


@dataclass
class Answer:
    prompt: str  # what the user asked
    text: str  # the formatted prompt the model saw (exactly as in training)
    answer: str  # the generated text, special tokens removed
    prompt_ids: list[int]
    answer_ids: list[int]
    stopped: bool  # ended on a stop token rather than at max_new_tokens


def load_for_generation(src: Source, base: str | None = None):
    """The model to answer with: a merged model in its saved dtype, or base+adapter with the base stored
    as in training (4-bit when the recipe trained on 4-bit). On the GPU when there is one."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    trust = bool(src.recipe and src.recipe.model.trust_remote_code)
    if src.adapter is None:
        return load_model(src.model, str(src.model), None, "auto", trust=trust, device=device)
    from fastft.backends.hf import compute_dtype

    name, path, revision = base_model(src, base)
    dtype = compute_dtype(src.recipe)
    four_bit = src.recipe.model.quantization != "16bit"
    return load_adapter(load_model(path, name, revision, dtype, four_bit=four_bit, trust=trust, device=device),
                        src.adapter)


def generate(source: str | Path, prompts: list[str], base: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[Answer]:
    """Answer each prompt with the model in `source`, formatted and stopped exactly as in training.

    Greedy unless `temperature` > 0. Raises `FastftError` when `source` has no recipe (the
    prompt format would be a guess) or bad sampling settings.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise FastftError("--temperature must be >= 0, --top-p in (0, 1] and --max-new-tokens >= 1.")
    src = locate(source)
    if src.recipe is None:
        raise FastftError(f"{src.path}: no recipe.toml here or in the parent folder, so the training prompt format is "
                          "unknown. Point at the run folder, an export folder or a folder written by `fastft merge`.")
    tokenizer = AutoTokenizer.from_pretrained(src.tokenizer_dir)
    model = load_for_generation(src, base)
    stops = stop_token_ids(src.recipe, tokenizer)
    sampling = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                              temperature=temperature if sampling else 1.0, top_p=top_p if sampling else 1.0,
                              eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    answers = []
    for prompt in prompts:
        text, ids = build_prompt(prompt, src.recipe, tokenizer)
        torch.manual_seed(seed)
        inputs = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
        new = out[0, len(ids):].tolist()
        stopped = bool(new) and new[-1] in stops
        # The prompt characters that training put into the first answer token (a space) are not the answer.
        rest = render_prompt(prompt, src.recipe.data, tokenizer)[len(text):]
        answer = tokenizer.decode(new, skip_special_tokens=True).removeprefix(rest)
        answers.append(Answer(prompt, text, answer, ids, new, stopped))
    return answers


def sample_answer(model, tokenizer, recipe: Recipe, data, max_new_tokens: int = 48):
    """Answer one prompt with the trained adapter, formatted and stopped exactly as `fastft generate` does."""
    import torch

    prompt = recipe.train.sample_prompt
    if prompt:
        text, ids = build_prompt(prompt, recipe, tokenizer)
    else:  # the first training example's own tokens before its first loss-carrying one
        if recipe.data.format == "text" or not len(data.train):
            return None
        first = data.train.dataset[0]  # that row alone: `Split.labels` would read every example
        ids = first["input_ids"][: next(i for i, t in enumerate(first["labels"]) if t != -100)]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not ids:
            return None
    ids = torch.tensor([ids], device=model.device)
    model.eval()
    # Straight after training, trained weights are fp32 (PEFT keeps them so) on a 16-bit base: a trained
    # embedding would feed fp32 into bf16 layers. Generate as training computed, under autocast.
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    half = next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), None)
    mixed = torch.autocast(model.device.type, dtype=half) if half and torch.float32 in dtypes else nullcontext()
    with torch.no_grad(), mixed:
        # max_length=None: Unsloth's loader sets the model's to its context (131072), and transformers
        # then warns at every call that max_new_tokens wins (seen twice at the end of each unsloth run).
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             max_length=None, do_sample=False, eos_token_id=stop_token_ids(recipe, tokenizer),
                             pad_token_id=tokenizer.pad_token_id)
    return prompt or text, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
