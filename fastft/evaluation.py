"""`fastft eval`: is the fine-tuned model better than its base, and by how much?

    examples     the recipe's eval data (`data.eval_path`, or exactly the examples training held
                 out with `data.eval_fraction`), or `--data` in the recipe's format; each made by
                 the data pipeline: prompt, reference answer, token ids and loss labels
    per model    base (the adapter switched off, or the base model of a merged one) and fine-tuned:
                 teacher-forced loss on the references (the pipeline's labels: the tokens training
                 took the loss on), then greedy answers in left-padded batches, stopped at the
                 trained stop tokens
    metrics      loss, perplexity, ROUGE-1/2/L F1 (the `rouge-score` library), exact match,
                 answer length, share of answers that ended on a stop token
    output       a table on the terminal; eval.json, predictions.jsonl and eval.md in `--out`
"""

from __future__ import annotations

import json
import math
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from fastft.batching import make_collator
from fastft.data import RecordError, prepare, prepare_file, prompt_and_answer, stop_token_ids
from fastft.errors import FastftError
from fastft.export import Source, base_model, load_model, locate
from fastft.generate import load_for_generation
from fastft.runs import atomic_dir, explain_disk_full, library_versions

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# (key in eval.json, label in the table, digits shown)
METRICS = [
    ("loss", "loss on references", 4),
    ("perplexity", "perplexity", 2),
    ("rouge1", "ROUGE-1 F1", 4),
    ("rouge2", "ROUGE-2 F1", 4),
    ("rougeL", "ROUGE-L F1", 4),
    ("exact_match", "exact match", 4),
    ("answer_tokens", "answer length (tokens)", 1),
    ("stopped", "ended on a stop token", 4),
]


@dataclass
class Example:
    where: str  # file and line of the record
    prompt: str  # the text training put before the answer
    prompt_ids: list[int]
    reference: str  # the answer as the data gives it
    input_ids: list[int]  # the whole example and its loss labels, as the pipeline made them for training
    labels: list[int]


class WordTokenizer:
    """ROUGE's tokens: lowercased Unicode words (letters of any script, accents kept, and digits).

    rouge-score's default tokenizer keeps only [a-z0-9], so "café" would count as "caf" and
    "été" would vanish. Text is NFC-normalised first, so a composed and a decomposed "é" match.
    No stemming (rouge-score's stemmer is English-only).
    """

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[^\W_]+", unicodedata.normalize("NFC", text).lower())


def rouge_scorer():
    """rouge-score's scorer with `WordTokenizer`. Raises `FastftError` when the `eval` extra is missing."""
    try:
        from rouge_score.rouge_scorer import RougeScorer
    except ImportError:
        raise FastftError("`fastft eval` computes ROUGE with the rouge-score library, which is not installed. "
                          "Install it with `pip install 'fastft[eval]'` (or `pip install rouge-score`).") from None
    return RougeScorer(list(ROUGE_TYPES), tokenizer=WordTokenizer())


def same_answer(answer: str, reference: str) -> bool:
    """Exact match: equal after collapsing whitespace (case and punctuation count)."""
    return answer.split() == reference.split()


# --------------------------------------------------------------------------- examples


def load_examples(src: Source, tokenizer, data: str | None, echo=print) -> tuple[list[Example], str]:
    """The examples to evaluate and where they come from. Raises `FastftError` when there are none."""
    recipe = src.recipe
    if data:
        split, origin = prepare_file([data], recipe, tokenizer, echo=echo), f"--data {data}"
    elif recipe.data.eval_path or recipe.data.eval_fraction:
        prepared = prepare(recipe, tokenizer, echo=echo)  # the same split training made, from the same seed
        split = prepared.eval
        origin = (f"data.eval_path {', '.join(recipe.data.eval_path)}" if recipe.data.eval_path else
                  f"the {len(split)} examples held out by data.eval_fraction = {recipe.data.eval_fraction}")
        trained_on = src.info.get("dataset_fingerprint") or src.info.get("run", {}).get("dataset_fingerprint")
        if trained_on and trained_on != prepared.fingerprint:
            echo(f"warning: the data differs from what the run trained on (fingerprint {prepared.fingerprint}, "
                 f"trained {trained_on}); the examples may not be the ones training held out")
    else:
        raise FastftError(f"{src.home / 'recipe.toml'}: the recipe has no eval data, so there is nothing held out to "
                          "evaluate on. Pass --data FILE with examples in the recipe's format, or train with "
                          "`data.eval_path = \"eval.jsonl\"` or `data.eval_fraction = 0.1` to hold some out.")
    examples = []
    for record, ids, labels in zip(split.records, split.input_ids, split.labels):
        try:
            prompt, reference = prompt_and_answer(record, recipe.data, tokenizer)
        except RecordError as e:  # cannot happen for a record the pipeline kept; kept for a clear message
            raise FastftError(str(e)) from None
        # The tokens training put before the (last) answer: with BPE an answer's first token can hold the
        # end of the prompt (`" La"`), so tokenising the prompt text alone could end on a lone " ".
        prompt_ids = ids[: max(i for i, t in enumerate(labels) if t != -100 and (i == 0 or labels[i - 1] == -100))]
        examples.append(Example(record.where, prompt, prompt_ids, reference, ids, labels))
    return examples, origin


# --------------------------------------------------------------------------- running a model


def reference_loss(model, tokenizer, examples: list[Example]) -> tuple[float, int]:
    """Summed cross-entropy over the loss-carrying tokens of `examples`, and how many there were.

    Batched by the training collator (right padding, padding labelled -100), and shifted as the
    training loss is: the logits at position t predict the label at t + 1.
    """
    import torch

    batch = make_collator(tokenizer, packing=False)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    # Row by row: an fp32 copy of a whole batch of logits over a 128k vocabulary would take gigabytes.
    loss = sum(float(torch.nn.functional.cross_entropy(row[:-1].float(), target, ignore_index=-100, reduction="sum"))
               for row, target in zip(logits, labels))
    return loss, int((labels != -100).sum())


def generate_answers(model, tokenizer, examples: list[Example], config, stops: list[int]) -> list[tuple[str, int, bool]]:
    """(answer text, answer tokens, ended on a stop token) for each example, generated in one left-padded batch."""
    import torch

    batch = tokenizer.pad([{"input_ids": e.prompt_ids} for e in examples], padding=True, padding_side="left",
                          return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             generation_config=config)
    answers = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)  # finished rows are padded after the stop
        new = row if end is None else row[:end]
        answers.append((tokenizer.decode(new, skip_special_tokens=True), len(new), end is not None))
    return answers


def run_model(model, tokenizer, examples: list[Example], config, stops: list[int], batch_size: int, seed: int,
              label: str) -> tuple[dict, list[tuple[str, int, bool]]]:
    """Loss totals and answers of one model over all examples, with a progress bar."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)  # the same sampling noise for both models, when sampling
    loss_sum, tokens, answers = 0.0, 0, []
    with tqdm(total=len(examples), desc=label, unit="example", file=sys.stderr) as bar:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            s, n = reference_loss(model, tokenizer, chunk)
            loss_sum, tokens = loss_sum + s, tokens + n
            answers += generate_answers(model, tokenizer, chunk, config, stops)
            bar.update(len(chunk))
    return {"loss_sum": loss_sum, "loss_tokens": tokens}, answers


def metrics(totals: dict, answers: list[tuple[str, int, bool]], examples: list[Example], scorer) -> dict:
    """One model's metrics: token-weighted mean loss over every example, the rest averaged over examples."""
    n = len(examples)
    loss = totals["loss_sum"] / totals["loss_tokens"]
    scores = [scorer.score(e.reference, text) for e, (text, _, _) in zip(examples, answers)]
    out = {"loss": loss, "perplexity": math.exp(loss), "loss_tokens": totals["loss_tokens"]}
    out |= {t: sum(s[t].fmeasure for s in scores) / n for t in ROUGE_TYPES}
    out["exact_match"] = sum(same_answer(text, e.reference) for e, (text, _, _) in zip(examples, answers)) / n
    out["answer_tokens"] = sum(length for _, length, _ in answers) / n
    out["stopped"] = sum(stopped for _, _, stopped in answers) / n
    return out


# --------------------------------------------------------------------------- the command


def evaluate(source: str | Path, data: str | None = None, limit: int | None = None, out: str | Path | None = None,
             overwrite: bool = False, base: str | None = None, max_new_tokens: int = 256, batch_size: int = 8,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, echo=print) -> Path:
    """Compare the fine-tuned model in `source` with its base on held-out examples; write the results to `out`.

    `out` defaults to eval/ in the run (or export, or merged) folder and is written atomically.
    Raises `FastftError` for bad input, no eval data, or an existing `out` without `overwrite`.
    """
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise FastftError("--temperature must be >= 0, --top-p in (0, 1], and --max-new-tokens, --batch-size and "
                          "--limit at least 1.")
    src = locate(source)
    if src.recipe is None:
        raise FastftError(f"{src.path}: no recipe.toml here or in the parent folder, so the training prompt format "
                          "is unknown. Point at the run folder, an export folder or a folder written by `fastft merge`.")
    out = Path(out) if out else src.home / "eval"
    if out.exists() and not overwrite:
        raise FastftError(f"{out} already exists (an earlier evaluation). Choose another folder with --out, or add "
                          "--overwrite to replace it.")
    scorer = rouge_scorer()
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(src.tokenizer_dir)
    examples, origin = load_examples(src, tokenizer, data, echo=echo)
    examples = examples[:limit] if limit else examples
    stops = stop_token_ids(src.recipe, tokenizer)
    sampling = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                              temperature=temperature if sampling else 1.0, top_p=top_p if sampling else 1.0,
                              eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    echo(f"evaluating {src.path} on {len(examples)} examples ({origin})")

    results, name, revision = run_both(src, base, tokenizer, examples, config, stops, batch_size, seed)
    models = {k: metrics(*results[k], examples, scorer) for k in ("base", "fine_tuned")}

    report = {
        "metrics": models,
        "difference": {k: models["fine_tuned"][k] - models["base"][k] for k, _, _ in METRICS},
        "examples": len(examples),
        "data": origin,
        "source": str(src.path.resolve()),
        "source_kind": "adapter" if src.adapter is not None else "merged",
        "base_model": name,
        "base_revision": revision,
        "recipe": str(src.home.resolve() / "recipe.toml"),
        "recipe_model": src.recipe.model.name,
        "trained_quantization": src.recipe.model.quantization,
        "dataset_fingerprint": src.info.get("dataset_fingerprint") or src.info.get("run", {}).get("dataset_fingerprint"),
        "generation": {"max_new_tokens": max_new_tokens, "greedy": not sampling, "temperature": temperature,
                       "top_p": top_p, "seed": seed, "batch_size": batch_size, "padding_side": "left",
                       "stop_token_ids": stops, "stop_tokens": tokenizer.convert_ids_to_tokens(stops)},
        "rouge": {"library": "rouge-score", "types": list(ROUGE_TYPES), "score": "F1, mean over examples",
                  "tokenizer": "lowercased Unicode words (fastft.evaluation.WordTokenizer), no stemming"},
        "versions": library_versions() | {"rouge-score": _version("rouge-score")},
    }
    base_answers, tuned_answers = results["base"][1], results["fine_tuned"][1]
    predictions = [{"where": e.where, "prompt": e.prompt, "reference": e.reference, "base": b[0], "fine_tuned": f[0],
                    "base_stopped": b[2], "fine_tuned_stopped": f[2]}
                   for e, b, f in zip(examples, base_answers, tuned_answers)]
    files = {"eval.json": json.dumps(report, indent=2, ensure_ascii=False),
             "predictions.jsonl": "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions),
             "eval.md": markdown(report, predictions)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with explain_disk_full("the evaluation", out, sum(len(text.encode()) for text in files.values())):
        swap = atomic_dir(out)
        try:
            for name, text in files.items():
                (swap.tmp / name).write_text(text, encoding="utf-8")
            swap.commit()
        except BaseException:
            swap.abort()
            raise
    echo(table(report))
    echo(f"wrote {out}/eval.json, predictions.jsonl and eval.md")
    return out


def run_both(src: Source, base: str | None, tokenizer, examples: list[Example], config, stops: list[int],
             batch_size: int, seed: int) -> tuple[dict, str, str | None]:
    """Run the base and the fine-tuned model over the examples; also return the base's id and revision."""
    results = {}
    model = load_for_generation(src, base)
    if src.adapter is not None:  # one model: the base is the same weights with the adapter switched off
        name, _, revision = base_model(src, base)
        with model.disable_adapter():
            results["base"] = run_model(model, tokenizer, examples, config, stops, batch_size, seed, "base")
        results["fine_tuned"] = run_model(model, tokenizer, examples, config, stops, batch_size, seed, "fine-tuned")
        return results, name, revision
    # a merged model: then the base it was merged from, in the same dtype; one model in memory at a time
    results["fine_tuned"] = run_model(model, tokenizer, examples, config, stops, batch_size, seed, "fine-tuned")
    dtype, device = model.dtype, str(model.device)
    del model
    name, path, revision = merged_base(src, base)
    model = load_model(path, name, revision, dtype, trust=src.recipe.model.trust_remote_code, device=device)
    results["base"] = run_model(model, tokenizer, examples, config, stops, batch_size, seed, "base")
    return results, name, revision


def merged_base(src: Source, base: str | None) -> tuple[str, str, str | None]:
    """(model id, what `from_pretrained` loads, revision) of the base a merged model was made from."""
    from fastft.models import resolve_model

    recorded = src.info.get("base_model") or src.recipe.model.name
    name = base or recorded
    revision = (src.info.get("base_revision") or src.recipe.model.revision or None) if name == recorded else None
    return name, resolve_model(name), revision


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- reports


def _rows(report: dict) -> list[tuple[str, str, str, str]]:
    base, tuned, diff = report["metrics"]["base"], report["metrics"]["fine_tuned"], report["difference"]
    return [(label, f"{base[k]:.{d}f}", f"{tuned[k]:.{d}f}", f"{diff[k]:+.{d}f}") for k, label, d in METRICS]


def table(report: dict) -> str:
    """The terminal table: metric, base, fine-tuned, difference (fine-tuned minus base)."""
    header = ("metric", "base", "fine-tuned", "difference")
    rows = [header] + _rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(report: dict, predictions: list[dict], shown: int = 3) -> str:
    """eval.md: the settings, the table and the first few predictions."""
    g = report["generation"]
    decoding = "greedy" if g["greedy"] else f"sampled (temperature {g['temperature']}, top-p {g['top_p']}, seed {g['seed']})"
    lines = [
        f"# Evaluation of {report['source']}",
        "",
        (f"{report['examples']} examples ({report['data']}); base `{report['base_model']}`, fine-tuned: the "
        f"{report['source_kind']} in `{report['source']}`. Answers {decoding}, at most {g['max_new_tokens']} new "
        f"tokens, stopped at {', '.join(f'`{t}`' for t in g['stop_tokens'])}. Loss: teacher-forced on the reference "
        "answers, over the tokens training took the loss on. ROUGE: F1 from rouge-score on lowercased Unicode words."),
        "",
        "| metric | base | fine-tuned | difference |",
        "|---|---:|---:|---:|",
        *(f"| {' | '.join(r)} |" for r in _rows(report)),
    ]
    for i, p in enumerate(predictions[:shown], start=1):
        lines += ["", f"## Example {i} ({p['where']})", "", "Prompt:", "", _fenced(p["prompt"]), "",
                  "Reference:", "", _fenced(p["reference"]), "", "Base:", "", _fenced(p["base"]), "",
                  "Fine-tuned:", "", _fenced(p["fine_tuned"])]
    return "\n".join(lines) + "\n"


def _fenced(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}\n{text}\n{fence}"
