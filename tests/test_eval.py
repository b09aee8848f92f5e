"""`fastft eval` on one tiny run of recipes/tweetsumm.toml, trained once for the module.

The run trains 2 steps of 10 conversations, so that the Trainer's final evaluation takes the 10
eval conversations in one batch: its eval loss is then the token-weighted mean that `fastft eval`
reports, computed by other code (the Trainer's), and the two must agree.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import RECIPES, qa_rows, run_cli, tiny_recipe
from fastft import evaluation as ev
from fastft.errors import FastftError

TRAIN = ("model.name=\"fastft:tiny\"", "model.quantization=\"16bit\"", "model.dtype=\"fp32\"", "train.report_to=\"none\"",
         "train.max_steps=2", "train.batch_size=10", "train.grad_accum=1", "train.learning_rate=1e-2")
EVAL_DATA = RECIPES / "data" / "tweetsumm_eval.jsonl"
FAST = dict(max_new_tokens=8, batch_size=10, echo=lambda *a: None)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from fastft.train import run

    folder = tmp_path_factory.mktemp("eval")
    return run(str(RECIPES / "tweetsumm.toml"), output=str(folder / "run"), overrides=TRAIN, echo=lambda *a: None)


@pytest.fixture(scope="module")
def cli_eval(run_dir):
    """`fastft eval RUN` as a user types it, writing the default run/eval/."""
    done = run_cli("eval", str(run_dir), "--max-new-tokens", "8", "--batch-size", "10")
    assert done.returncode == 0, done.stderr
    return done


def _read(folder: Path):
    report = json.loads((folder / "eval.json").read_text())
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return report, predictions


@pytest.mark.slow
def test_eval_writes_the_comparison_and_fine_tuning_lowered_the_loss(run_dir, cli_eval):
    report, predictions = _read(run_dir / "eval")
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    assert tuned["loss"] < base["loss"]
    assert report["difference"]["loss"] == pytest.approx(tuned["loss"] - base["loss"])
    assert tuned["perplexity"] == pytest.approx(2.718281828459045 ** tuned["loss"])
    # The same examples and loss-carrying tokens as training's own evaluation, computed by the Trainer.
    summary = json.loads((run_dir / "fastft.json").read_text())
    assert tuned["loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert report["examples"] == 10 and report["base_model"] == "fastft:tiny" and report["source_kind"] == "adapter"
    assert report["generation"]["greedy"] and report["generation"]["max_new_tokens"] == 8
    assert report["generation"]["stop_tokens"] == ["<|im_end|>"]
    assert report["dataset_fingerprint"] == summary["dataset_fingerprint"]

    references = [json.loads(line)["messages"][-1]["content"] for line in EVAL_DATA.read_text().splitlines()]
    assert [p["reference"] for p in predictions] == references
    assert all(p["prompt"].endswith("<|im_start|>assistant\n") and "Summarise it" in p["prompt"] for p in predictions)
    assert all(p["base"] != p["fine_tuned"] for p in predictions)  # two models answered
    for line in ("loss on references", "ROUGE-L F1", "exact match", "fine-tuned", "difference"):
        assert line in cli_eval.stdout
    md = (run_dir / "eval" / "eval.md").read_text()
    assert "| metric | base | fine-tuned | difference |" in md and references[0] in md
    assert "fine-tuned:" in cli_eval.stderr  # the progress bar


@pytest.mark.slow
def test_rouge_is_rouge_score_on_the_saved_strings(run_dir, cli_eval):
    from rouge_score.rouge_scorer import RougeScorer

    report, predictions = _read(run_dir / "eval")
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=ev.WordTokenizer())
    for model in ("base", "fine_tuned"):
        scores = [scorer.score(p["reference"], p[model]) for p in predictions]
        for kind in ("rouge1", "rouge2", "rougeL"):
            expected = sum(s[kind].fmeasure for s in scores) / len(scores)
            assert report["metrics"][model][kind] == pytest.approx(expected, abs=1e-12)
        exact = sum(p[model].split() == p["reference"].split() for p in predictions) / len(predictions)
        assert report["metrics"][model]["exact_match"] == exact


@pytest.mark.slow
def test_batched_answers_are_generates_answers(run_dir, cli_eval):
    """Left-padded batches answer as `fastft generate` does, one prompt at a time, from the user's text."""
    from fastft.generate import generate

    _, predictions = _read(run_dir / "eval")
    users = [json.loads(line)["messages"][0]["content"] for line in EVAL_DATA.read_text().splitlines()][:3]
    answers = generate(run_dir, users, max_new_tokens=8)
    assert [a.text for a in answers] == [p["prompt"] for p in predictions[:3]]
    assert [a.answer for a in answers] == [p["fine_tuned"] for p in predictions[:3]]


@pytest.mark.slow
def test_an_existing_eval_folder_is_refused(run_dir, cli_eval):
    before = (run_dir / "eval" / "eval.json").read_bytes()
    done = run_cli("eval", str(run_dir))
    assert done.returncode == 2 and "--overwrite" in done.stderr and "Traceback" not in done.stderr
    assert (run_dir / "eval" / "eval.json").read_bytes() == before


@pytest.mark.slow
def test_export_and_merged_folders_give_the_same_fine_tuned_metrics(run_dir, tmp_path):
    from fastft.export import export
    from fastft.merge import merge

    exported = export(run_dir, tmp_path / "exported", echo=lambda *a: None)
    merged = merge(exported, tmp_path / "merged", dtype="fp32", echo=lambda *a: None)
    stale = tmp_path / "merged-eval"
    stale.mkdir()
    (stale / "old.txt").write_text("an earlier evaluation")
    ev.evaluate(exported, limit=4, **FAST)
    ev.evaluate(merged, limit=4, out=stale, overwrite=True, **FAST)
    (a, pa), (b, pb) = _read(exported / "eval"), _read(stale)
    assert not (stale / "old.txt").exists()
    assert (a["source_kind"], b["source_kind"]) == ("adapter", "merged")
    assert [p["fine_tuned"] for p in pa] == [p["fine_tuned"] for p in pb]
    assert [p["base"] for p in pa] == [p["base"] for p in pb]
    for model in ("base", "fine_tuned"):
        for key, value in a["metrics"][model].items():
            # fp32 merge: base+adapter and W + BA differ only in summation order
            assert b["metrics"][model][key] == pytest.approx(value, rel=1e-5), (model, key)


@pytest.mark.slow
def test_no_eval_data_says_how_to_get_some(run_dir, tmp_path):
    folder = shutil.copytree(run_dir / "adapter", tmp_path / "adapter")
    recipe = (run_dir / "recipe.toml").read_text()
    (tmp_path / "recipe.toml").write_text("\n".join(line for line in recipe.splitlines()
                                                    if not line.startswith("eval_path")))
    with pytest.raises(FastftError) as e:
        ev.evaluate(folder, **FAST)
    assert e.value.exit_code == 2
    for hint in ("data.eval_path", "data.eval_fraction", "--data"):
        assert hint in str(e.value)


@pytest.mark.slow
def test_a_bad_data_record_is_named(run_dir, tmp_path):
    good = EVAL_DATA.read_text().splitlines()[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + json.dumps({"conversation": []}) + "\n")
    with pytest.raises(FastftError) as e:
        ev.evaluate(run_dir, data=str(bad), out=tmp_path / "out", **FAST)
    assert e.value.exit_code == 2
    assert "bad.jsonl, line 2" in str(e.value) and "`messages`" in str(e.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- without a trained model


def test_rouge_tokenizer_keeps_accented_words():
    assert ev.WordTokenizer().tokenize("L'été, le Café est CHAUD_2 !") == ["l", "été", "le", "café", "est", "chaud", "2"]
    scorer = ev.rouge_scorer()
    # Composed and decomposed é are the same word; rouge-score's default tokenizer would drop both.
    score = scorer.score("le café est chaud", "le cafe\u0301 est froid")
    assert score["rouge1"].fmeasure == pytest.approx(0.75) and score["rouge2"].fmeasure == pytest.approx(2 / 3)


def test_metrics_average_over_examples():
    examples = [ev.Example("f, line 1", "", [], "le café est chaud", [], []),
                ev.Example("f, line 2", "", [], "Oui.", [], [])]
    m = ev.metrics({"loss_sum": 6.0, "loss_tokens": 3}, [("le café est froid", 5, True), (" Oui.\n", 2, False)],
                   examples, ev.rouge_scorer())
    assert m["loss"] == 2.0 and m["perplexity"] == pytest.approx(7.389056, rel=1e-6)
    assert m["rouge1"] == pytest.approx((0.75 + 1) / 2) and m["exact_match"] == 0.5
    assert m["answer_tokens"] == 3.5 and m["stopped"] == 0.5


def test_held_out_examples_keep_their_records(tmp_path, tokenizer):
    """With data.eval_fraction (and a skipped bad record), each example's prompt and reference belong to its tokens."""
    from fastft.data import prepare
    from fastft.export import Source
    from fastft.recipe import load_recipe

    rows = qa_rows(16)
    rows[5] = {"question": "no answer here"}
    path = tiny_recipe(tmp_path, rows=rows, extra="")
    text = path.read_text().replace("max_length = 256", "max_length = 256\neval_fraction = 0.25\non_error = \"skip\"")
    path.write_text(text)
    recipe = load_recipe(path)
    examples, origin = ev.load_examples(Source(tmp_path, tmp_path, None, None, recipe), tokenizer, None, echo=lambda *a: None)
    held = prepare(recipe, tokenizer, echo=lambda *a: None).eval
    assert len(examples) == 4 and "eval_fraction" in origin
    assert [e.input_ids for e in examples] == held.input_ids
    for e in examples:
        line = int(e.where.rsplit(" ", 1)[1])
        assert e.reference == rows[line - 1]["answer"] and e.prompt == f"Q: {rows[line - 1]['question']}\nA: "
        assert tokenizer.decode(e.input_ids).startswith(e.prompt + e.reference)
        assert e.input_ids[:len(e.prompt_ids)] == e.prompt_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is false)")
def test_qlora_adapter_is_evaluated_on_its_4bit_base_on_a_gpu(tmp_path):
    """The recipe as written (4-bit base, compute dtype auto) on the GPU: base and fine-tuned on the 4-bit base."""
    from fastft.train import run

    overrides = tuple(o for o in TRAIN if not o.startswith(("model.quantization", "model.dtype")))
    run_dir = run(str(RECIPES / "tweetsumm.toml"), output=str(tmp_path / "run"), overrides=overrides,
                  echo=lambda *a: None)
    ev.evaluate(run_dir, **FAST)
    report, predictions = _read(run_dir / "eval")
    summary = json.loads((run_dir / "fastft.json").read_text())
    tuned, base = report["metrics"]["fine_tuned"], report["metrics"]["base"]
    assert report["trained_quantization"] == "4bit" and len(predictions) == 10
    assert tuned["loss"] < base["loss"]
    assert tuned["loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-2)  # bf16/fp16 compute
