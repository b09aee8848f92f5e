"""Export, merge and generate on one tiny QLoRA run (4-bit base on the CPU), trained once per module.

The run learns to answer every question with "Oui." and then its stop token, so the tests can
check that generation reproduces the trained behaviour and stops where training taught it to.
"""

import json
import re
import shutil

import pytest
import torch

from conftest import cli, run_cli, tiny_recipe
from fastft import merge as mg
from fastft import export as ex
from fastft import generate as gen
from fastft.errors import FastftError
from fastft.models import CHAT_TEMPLATE, load_tokenizer, resolve_model
from fastft.recipe import recipe_from_dict

ROWS = [{"question": f"Combien font {i} et {i + 1} ?", "answer": "Oui."} for i in range(16)]
QUESTION = ROWS[3]["question"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from fastft.train import run

    folder = tmp_path_factory.mktemp("export")
    recipe = tiny_recipe(folder, steps=24, rows=ROWS + [{"question": "Sans réponse ?"}])  # line 17 is skipped
    # A high learning rate on a 4-bit base: the adapter must move the logits for the checks to mean anything.
    # 24 steps on the pretrained fastft:tiny (12 were enough for random weights) make "Oui." and the EOS the greedy answer.
    return run(str(recipe), output=str(folder / "run"), echo=lambda *a: None,
               overrides=("model.quantization=4bit", "train.learning_rate=2e-2", "data.on_error=skip"))


@pytest.fixture(scope="module")
def exported(run_dir):
    return ex.export(run_dir, run_dir.parent / "exported", echo=lambda *a: None)


@pytest.fixture(scope="module")
def merged(exported):
    # Tiny shards so that the sharded layout (index + several files) is what gets reloaded.
    return mg.merge(exported, exported.parent / "merged", dtype="fp32", max_shard_size="200KB", echo=lambda *a: None)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_export_folder_loads_with_stock_peft(run_dir, exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "fastft:tiny"
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer("Q: " + QUESTION + "\nA: ")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(resolve_model(config["base_model_name_or_path"]))
    plain = _logits(base, ids)
    model = PeftModel.from_pretrained(base, exported)
    assert (_logits(model, ids) - plain).abs().max() > 0.1  # the adapter was loaded and does something

    manifest = json.loads((exported / "fastft.json").read_text())
    summary = json.loads((run_dir / "fastft.json").read_text())
    assert manifest["base_model"] == "fastft:tiny" and manifest["trained_quantization"] == "4bit"
    assert manifest["backend"] == "hf" and manifest["lora"]["r"] == 4
    assert manifest["dataset_fingerprint"] == summary["dataset_fingerprint"]
    assert manifest["final_loss"] == summary["final_loss"] and manifest["steps"] == 24
    assert manifest["export_versions"]["peft"] and manifest["train_versions"]["transformers"]
    assert manifest["stop_tokens"] == ["<|im_end|>"]
    assert (exported / "prompt_template.txt").read_text() == "Q: {prompt}\nA: "
    assert manifest["sha256"]["adapter_model.safetensors"] == ex._sha256(run_dir / "adapter" / "adapter_model.safetensors")
    card = (exported / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "fastft merge" in card and "<|im_end|>" in card
    assert "[train]" in (exported / "recipe.toml").read_text()


def test_merged_logits_equal_base_plus_adapter_in_fp32(exported, merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (merged / "model.safetensors.index.json").is_file() and len(list(merged.glob("*.safetensors"))) > 1
    ids = list(range(3, 60))
    base = AutoModelForCausalLM.from_pretrained(resolve_model("fastft:tiny"), dtype=torch.float32)
    plain = _logits(base, ids)
    reference = _logits(PeftModel.from_pretrained(base, exported), ids)
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids)
    assert (reference - plain).abs().max() > 0.1
    assert (merged_logits - reference).abs().max() < 1e-4

    fidelity = json.loads((merged / "fastft.json").read_text())["fidelity"]
    assert fidelity["max_abs_logit_diff"] < 1e-4 and fidelity["greedy_agreement"] == 1.0
    assert fidelity["adapter_effect"] > 0.1
    # Trained on a 4-bit base: the gap to the merged 16-bit model is reported, and is not zero.
    assert fidelity["trained_4bit_vs_merged"]["max_abs_logit_diff"] > fidelity["max_abs_logit_diff"]


def test_chat_template_and_stop_token_survive_export_and_merge(exported, merged):
    from transformers import AutoTokenizer

    for folder in (exported, merged):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template == CHAT_TEMPLATE
        assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    generation = json.loads((merged / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    assert (merged / "recipe.toml").is_file() and (merged / "prompt_template.txt").read_text() == "Q: {prompt}\nA: "


def test_generate_formats_exactly_as_training_and_stops_at_eos(run_dir, merged):
    from fastft.data import Record, render, tokenize

    source = ex.locate(run_dir)
    tokenizer = load_tokenizer(source.recipe.model)
    segments = render(Record("data.jsonl", 4, ROWS[3]), source.recipe.data, tokenizer)
    prompt_text = "".join(text for text, loss in segments[: next(i for i, (_, loss) in enumerate(segments) if loss)])
    train_ids = tokenize([segments], tokenizer, "completion", chat=False)[0][0]
    eos = tokenizer.eos_token_id

    answers = {}
    for folder in (run_dir, run_dir / "adapter", merged):  # as trained (4-bit base + adapter), and merged
        (a,) = gen.generate(folder, [QUESTION], max_new_tokens=40)
        assert a.text == prompt_text  # byte for byte what the data pipeline put before the answer
        assert a.prompt_ids == train_ids[: len(a.prompt_ids)] and len(a.prompt_ids) < len(train_ids)
        assert a.stopped and a.answer_ids[-1] == eos and eos not in a.answer_ids[:-1]
        answers[folder] = a.answer
    assert set(answers.values()) == {"Oui."}  # what the run learned, with the stop token removed


@pytest.mark.parametrize("fmt", ["qa", "alpaca", "chat"])
def test_prompt_matches_data_pipeline_for_each_format(fmt):
    from tokenizers import processors

    from fastft.data import Record, build_prompt, render, stop_token_ids, tokenize
    from fastft.models import build_tokenizer

    # A tokenizer that writes a BOS as its special token, so adding special tokens where training
    # did not (or the reverse) changes the ids.
    tokenizer = build_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                        special_tokens=[("<|im_start|>", bos)])

    data = {"path": "unused.jsonl", "format": fmt, "system_prompt": "Sois bref."}
    record = {"qa": {"question": "Où ?", "answer": "Ici."},
              "alpaca": {"instruction": "Où ?", "output": "Ici."},
              "chat": {"messages": [{"role": "user", "content": "Où ?"}, {"role": "assistant", "content": "Ici."}]}}[fmt]
    if fmt != "chat":
        del data["system_prompt"]
    recipe = recipe_from_dict({"data": data})
    segments = render(Record("x.jsonl", 1, record), recipe.data, tokenizer)
    expected = "".join(text for text, loss in segments[: next(i for i, (_, loss) in enumerate(segments) if loss)])
    text, ids = build_prompt("Où ?", recipe, tokenizer)
    assert text == expected
    assert ids == tokenize([segments], tokenizer, "completion", chat=fmt == "chat")[0][0][: len(ids)]
    assert ids[0] == bos and ids[1] != bos  # one BOS: the tokenizer's, or the chat template's own
    assert stop_token_ids(recipe, tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_cli_merge_generate_and_refusal(run_dir, tmp_path):
    out = tmp_path / "merged"
    done = run_cli("merge", str(run_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "fidelity" in done.stdout and "4-bit base+adapter" in done.stdout
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{ROWS[0]['question']}\n\n{ROWS[5]['question']}\n", encoding="utf-8")
    done = run_cli("generate", str(out), "--prompt", QUESTION, "--file", str(prompts))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Oui.\nOui.\nOui.\n"  # only the answers, one per prompt

    again = run_cli("merge", str(run_dir), "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_interrupted_merge_leaves_no_output(run_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):  # Ctrl-C after the weights and tokenizer are written, before the end
        raise KeyboardInterrupt

    monkeypatch.setattr(mg, "prompt_template", interrupted)
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        mg.merge(run_dir, out, check=False, echo=lambda *a: None)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_fidelity_check_fails_loudly_above_tolerance():
    torch.manual_seed(0)
    reference = [torch.randn(5, 11), torch.randn(3, 11)]
    close = [r + 1e-6 for r in reference]
    far = [reference[0], reference[1] + torch.tensor([0.0] * 10 + [0.5])]
    report = mg.compare(reference, close) | {"dtype": "fp32", "tolerance": mg.TOLERANCE["fp32"]}
    mg.check_fidelity(report)
    assert report["positions"] == 8 and report["greedy_agreement"] == 1.0
    report = mg.compare(reference, far) | {"dtype": "fp32", "tolerance": mg.TOLERANCE["fp32"]}
    assert report["max_abs_logit_diff"] == pytest.approx(0.5)
    with pytest.raises(FastftError, match="fidelity check failed"):
        mg.check_fidelity(report)


def test_bad_sources_and_outputs_are_clear_errors(run_dir, tmp_path, monkeypatch):
    with pytest.raises(FastftError, match="neither a run folder"):
        ex.locate(tmp_path)
    with pytest.raises(FastftError, match="overlaps the source"):
        mg.merge(run_dir, run_dir / "merged", echo=lambda *a: None)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (run_dir / "adapter").iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FastftError, match="no recipe.toml"):
        gen.generate(bare, ["?"])
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FastftError, match="LLAMA_CPP_DIR"):
        mg.merge(run_dir, tmp_path / "gguf", gguf=True, echo=lambda *a: None)
    assert not (tmp_path / "gguf").exists()


def quiet(*_):
    pass


def test_skipped_records_are_listed_in_fastft_json(run_dir):
    data = json.loads((run_dir / "fastft.json").read_text())["data"]
    assert data["skipped_records"] == [f"{run_dir.parent / 'data.jsonl'}, line 17"]
    assert data["train_examples"] == len(ROWS)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A copy of the tiny base with other MLP weights, and a generation config with two more EOS ids."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("other-base") / "tiny-copy"
    shutil.copytree(resolve_model("fastft:tiny"), folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v * 1.5 if ".mlp." in k else v for k, v in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["eos_token_id"] = [5, generation["eos_token_id"], 6]
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_merge_base_overwrite_and_the_bases_other_eos_ids(exported, merged, other_base, tmp_path, monkeypatch,
                                                          capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier merge")
    args = ("merge", exported, "--out", out, "--dtype", "fp32", "--base", other_base)
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and "already exists and is not empty" in err and (out / "earlier.txt").exists()
    code, stdout, err = cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0, err
    assert not (out / "earlier.txt").exists() and "fidelity" in stdout  # replaced, and checked

    # The weights came from --base: the merge equals that base + the adapter, not the recorded base's merge.
    ids = list(range(3, 60))
    reference = _logits(PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(other_base, dtype=torch.float32), exported), ids)
    ours = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids)
    assert (ours - reference).abs().max() < 1e-4
    assert (ours - _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids)).abs().max() > 0.1
    assert json.loads((out / "fastft.json").read_text())["base_model"] == str(other_base)
    # The trained stop token first, then the base's other EOS ids, each once.
    im_end = load_tokenizer(ex.locate(exported).recipe.model).convert_tokens_to_ids("<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [im_end, 5, 6]


def test_merge_refuses_a_pre_quantised_base(exported, other_base, tmp_path):
    quantised = tmp_path / "quantised"
    shutil.copytree(other_base, quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    with pytest.raises(FastftError, match=r"is stored pre-quantised \(bitsandbytes\).*16-bit original"):
        mg.merge(exported, tmp_path / "out", base=str(quantised), echo=quiet)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_16_bit_merges_pass_their_tolerance(exported, tmp_path, dtype):
    out = mg.merge(exported, tmp_path / dtype, dtype=dtype, echo=quiet)
    fidelity = json.loads((out / "fastft.json").read_text())["fidelity"]
    assert fidelity["dtype"] == dtype and fidelity["tolerance"] == mg.TOLERANCE[dtype]
    # Rounding to 16 bits changes the logits (so the check measures something) but by less than allowed.
    assert 0 < fidelity["max_abs_logit_diff"] <= mg.TOLERANCE[dtype] * max(1.0, fidelity["max_abs_logit"])
    weights = json.loads((out / "config.json").read_text())
    assert weights["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[dtype]


def test_readme_quotes_the_tolerances_and_the_measured_fidelity():
    """The README's tolerance table: the tolerances in the code, and the figures of the committed measurement
    (benchmarks/merge_fidelity.py -> benchmarks/results/merge-fidelity.json)."""
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    measured = json.loads((ROOT / "benchmarks" / "results" / "merge-fidelity.json").read_text())["fidelity"]
    for dtype in ("fp32", "fp16", "bf16"):
        row = next(line.strip() for line in readme.splitlines() if line.strip().startswith(f"| `{dtype}` |"))
        _, allowed, figures = (cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip("|")))
        assert allowed == f"{mg.TOLERANCE[dtype]:.0e}".replace("e-0", "e-") + " x max(1, largest \\|logit\\|)"
        r = measured[dtype]
        limit = r["tolerance"] * max(1.0, r["max_abs_logit"])
        quoted = f"{r['max_abs_logit_diff']:.2g} / {limit:.2g}"
        assert figures.startswith(quoted), (row, quoted)
        assert f"greedy tokens agree at {r['greedy_agreement']:.0%}" in figures


def test_generate_from_an_export_folder_with_sampling_settings(exported, monkeypatch, capsys):
    # From the export folder: the trained answer, greedily.
    (greedy,) = gen.generate(exported, [QUESTION], max_new_tokens=40)
    assert greedy.answer == "Oui." and greedy.stopped
    # --seed: the same seed draws the same answer (seeded per prompt); --temperature 5 makes draws differ.
    hot = {seed: gen.generate(exported, [QUESTION, QUESTION], max_new_tokens=12, temperature=5.0, seed=seed)
           for seed in (1, 2)}
    assert hot[1][0].answer_ids == hot[1][1].answer_ids and hot[2][0].answer_ids == hot[2][1].answer_ids
    assert hot[1][0].answer_ids != hot[2][0].answer_ids != greedy.answer_ids
    # --top-p: a nucleus this small keeps only the most likely token, which is greedy decoding again.
    code, out, err = cli(monkeypatch, capsys, "generate", exported, "--prompt", QUESTION, "--temperature", "5",
                         "--top-p", "1e-6", "--seed", "3", "--max-new-tokens", "40")
    assert code == 0, err
    assert out == "Oui.\n"
    with pytest.raises(FastftError, match="--top-p in"):
        gen.generate(exported, [QUESTION], temperature=1.0, top_p=0)
