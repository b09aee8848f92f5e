"""The first answer token, with a real BPE vocabulary (Qwen's, built offline by the `bpe_tokenizer` fixture).

With BPE the space before an answer merges with the answer's first word (`" La"`). Training must
put loss on that token, as TRL's completion-only masks do, and every prompt fastft builds for
generation (`generate`, the end-of-run sample, the export's prompt_template.txt) must be exactly
the tokens training put before the first loss-carrying token. The byte-level `fastft:tiny`
tokenizer cannot show any of this: its tokens never span the prompt/answer boundary.
"""

import json
from types import SimpleNamespace

import pytest
from conftest import ROOT, write_jsonl, write_recipe

from fastft.data import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, build_prompt, prepare, prompt_template, render_prompt
from fastft.recipe import load_recipe

FUSION = [json.loads(line) for line in (ROOT / "recipes" / "data" / "fusion_fr.jsonl").read_text().splitlines()]
# Answers that start otherwise than with a word: a digit, punctuation, a space.
ODD = [{"question": "Combien ?", "answer": "42 noyaux."}, {"question": "Et alors ?", "answer": "« Oui », dit-il."},
       {"question": "Pourquoi ?", "answer": "(voir plus haut)"}, {"question": "Vraiment ?", "answer": " Oui."}]
QA_TEMPLATES = {  # where the answer starts: after a space, after a newline, right after the colon
    "qa-space": "Question: {question}\nAnswer: {answer}",
    "qa-newline": "### Question:\n{question}\n\n### Answer:\n{answer}",
    "qa-none": "Question: {question}\nAnswer:{answer}",
}
FORMATS = [*QA_TEMPLATES, "alpaca", "chat"]


def recipe_for(fmt: str, tmp_path, rows: list):
    """A recipe of format `fmt` over `rows` ({question, answer}), and the same examples as TRL's prompt/completion."""
    if fmt in QA_TEMPLATES:
        template = QA_TEMPLATES[fmt]
        data = rows
        section = f"format = \"qa\"\ntemplate = {json.dumps(template)}\n"
        cut = template.index("{answer}")
        pairs = [(template[:cut].format(**r), r["answer"]) for r in rows]
    elif fmt == "alpaca":
        data = [{"instruction": r["question"], "input": "un contexte" if i % 3 == 0 else "", "output": r["answer"]}
                for i, r in enumerate(rows)]
        section = "format = \"alpaca\"\n"
        pairs = [((ALPACA_PROMPT_WITH_INPUT if d["input"] else ALPACA_PROMPT).format(**d), d["output"]) for d in data]
    else:
        data = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
                for r in rows]
        section = "format = \"chat\"\n"
        pairs = [(d["messages"][:1], d["messages"][1:]) for d in data]
    write_jsonl(tmp_path / "d.jsonl", data)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", f"[data]\npath = \"d.jsonl\"\nmax_length = 4096\n{section}"))
    return recipe, [{"prompt": p, "completion": c} for p, c in pairs]


def trl_examples(tokenizer, examples: list, tmp_path) -> list:
    """TRL 1.15's own tokenisation and completion-only labels of prompt/completion examples."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_length=None, report_to="none", bf16=False, use_cpu=True)
    # _prepare_dataset reads only these three attributes of the trainer; building one would need a model.
    trainer = SimpleNamespace(completion_only_loss=True, chat_template=None, _tokenizer=tokenizer)
    dataset = SFTTrainer._prepare_dataset(trainer, Dataset.from_list(examples), tokenizer, args, packing=False,
                                          formatting_func=None, dataset_name="train")
    return [(row["input_ids"], row["labels"]) for row in dataset]


def before_first_loss(ids: list, labels: list) -> list:
    return ids[: next(i for i, t in enumerate(labels) if t != -100)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_ids_and_labels_equal_trls_completion_only_masks(fmt, bpe_tokenizer, tmp_path):
    recipe, examples = recipe_for(fmt, tmp_path, FUSION + ODD)
    ours = prepare(recipe, bpe_tokenizer, echo=lambda *_: None).train
    theirs = trl_examples(bpe_tokenizer, examples, tmp_path)
    assert len(ours) == len(theirs) == len(FUSION + ODD)
    for n, (ids, labels) in enumerate(theirs):
        assert ours.input_ids[n] == ids, n
        assert ours.labels[n] == labels, (n, bpe_tokenizer.convert_ids_to_tokens(before_first_loss(ids, labels)[-3:]))
    if fmt == "qa-space":  # the case that needs the overlap rule: the answer's first token holds the space
        first = [bpe_tokenizer.convert_ids_to_tokens(lab[len(before_first_loss(ids, lab))])
                 for ids, lab in zip(ours.input_ids, ours.labels)]
        assert first[0] == "ĠLa" and sum(t.startswith("Ġ") for t in first) >= len(FUSION)


@pytest.mark.parametrize("fmt", FORMATS)
def test_generation_prompts_are_the_training_prefix(fmt, bpe_tokenizer, tmp_path):
    """build_prompt (generate, the end-of-run sample prompt, merge's fidelity prompts) and prompt_template.txt
    give exactly the ids training put before the answer of an example with the same question."""
    recipe, _ = recipe_for(fmt, tmp_path, FUSION)
    data = prepare(recipe, bpe_tokenizer, echo=lambda *_: None).train
    template = prompt_template(recipe, bpe_tokenizer)
    chat, merged = fmt == "chat", 0
    for n, row in enumerate(FUSION):
        if fmt == "alpaca" and n % 3 == 0:
            continue  # with an input field: generate has no input
        expected = before_first_loss(data.input_ids[n], data.labels[n])
        text, ids = build_prompt(row["question"], recipe, bpe_tokenizer)
        if fmt == "qa-none" and ids[:-1] == expected:
            # No separator: some answers' first letters merge with the colon (":C" of "Ces"), so that
            # answer's prefix stops one token earlier; the prompt is the prefix of all the others.
            merged += 1
            continue
        assert ids == expected, (n, bpe_tokenizer.convert_ids_to_tokens(ids[-3:]))
        assert bpe_tokenizer(text, add_special_tokens=not chat)["input_ids"] == expected
        filled = template.replace("{prompt}", row["question"])
        assert bpe_tokenizer(filled, add_special_tokens=not chat)["input_ids"] == expected
    print(f"{fmt}: {merged} of {len(FUSION)} answers merge into the prompt's last token")
    assert merged <= (len(FUSION) // 4 if fmt == "qa-none" else 0)
    if fmt == "qa-space":  # the template's trailing space starts the answer: the prompt ends before it
        assert template == "Question: {prompt}\nAnswer:"
        full = render_prompt("x", recipe.data, bpe_tokenizer)
        assert full == "Question: x\nAnswer: " and build_prompt("x", recipe, bpe_tokenizer)[0] == full[:-1]


def test_end_of_run_sample_prompts_with_the_training_prefix(bpe_tokenizer, tmp_path):
    """The sample after training feeds the model the first example's tokens before its first loss-carrying one."""
    import torch

    from fastft.generate import sample_answer

    recipe, _ = recipe_for("qa-space", tmp_path, FUSION[:3])
    data = prepare(recipe, bpe_tokenizer, echo=lambda *_: None)
    seen = []

    class Recorder(torch.nn.Module):  # stands in for the model: only the prompt it is given is checked
        device = torch.device("cpu")

        def generate(self, input_ids, **kwargs):
            seen.append(input_ids[0].tolist())
            return torch.cat([input_ids, torch.tensor([[bpe_tokenizer.eos_token_id]])], dim=1)

    prompt, _ = sample_answer(Recorder(), bpe_tokenizer, recipe, data)
    assert seen[0] == before_first_loss(data.train.input_ids[0], data.train.labels[0])
    assert prompt.endswith("Answer:")
    recipe.train.sample_prompt = FUSION[1]["question"]
    sample_answer(Recorder(), bpe_tokenizer, recipe, data)
    assert seen[1] == before_first_loss(data.train.input_ids[1], data.train.labels[1])


def test_eval_prompts_are_the_training_prefix(bpe_tokenizer, tmp_path):
    """`fastft eval` prompts each held-out example with exactly the tokens training put before its answer."""
    from fastft import evaluation
    from fastft.export import Source

    recipe, _ = recipe_for("qa-space", tmp_path, FUSION[:6])
    recipe.data.eval_path = recipe.data.path
    examples, _ = evaluation.load_examples(Source(tmp_path, tmp_path, None, None, recipe), bpe_tokenizer, None,
                                           echo=lambda *_: None)
    assert len(examples) == 6
    for e in examples:
        assert e.prompt_ids == before_first_loss(e.input_ids, e.labels)
        assert bpe_tokenizer.convert_ids_to_tokens(e.prompt_ids[-1]) == ":"  # not a lone " "
