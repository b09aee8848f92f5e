"""The first run a new user makes, `fastft run recipes/quickstart.toml`, shows that fine-tuning worked.

One real run of the command (a fresh process, as a user starts it): the fine-tuned answer reads
like the training answers, the base and fine-tuned answers and the eval losses before/after are
printed, loss.png is written, the last lines say where things are and what to run next, and no
third-party line that the user cannot act on is printed.
"""

import json
import logging
import re
from itertools import groupby

import pytest
from conftest import RECIPES, run_cli

# Third-party messages fastft filters out (fastft/noise.py), as they would appear in the output.
NOISE = ["Failed to load CPU gemm_4bit_forward", "kernels-community"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("first-run") / "quickstart"
    done = run_cli("run", str(RECIPES / "quickstart.toml"), "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done, json.loads((out / "fastft.json").read_text(encoding="utf-8"))


def words(text: str) -> list:
    return re.findall(r"\w+", text.lower())


def training_answer_words(tokenizer) -> set:
    """Every word of the answers the quickstart trained on (its train split, held-out examples excluded)."""
    from fastft.data import prepare
    from fastft.recipe import load_recipe

    data = prepare(load_recipe(str(RECIPES / "quickstart.toml")), tokenizer, echo=lambda *_: None)
    answers = [tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=True)
               for labels in data.train.labels]
    assert len(answers) == 110  # 123 pairs, 13 held out
    return set(words(" ".join(answers)))


def test_fine_tuned_answer_reads_like_the_training_answers(first_run, tokenizer):
    _, done, summary = first_run
    answer = summary["sample"]["fine_tuned"]
    w = words(answer)
    assert len(set(w)) >= 6, answer
    assert max(len(list(run)) for _, run in groupby(w)) <= 3, answer  # no word more than 3 times in a row
    known = training_answer_words(tokenizer)
    share = sum(x in known for x in w) / len(w)
    assert share >= 0.6, (share, answer)
    assert summary["sample"]["base"] != answer  # the fine-tune changed what the model says


def test_base_and_fine_tuned_answers_and_eval_losses_are_printed(first_run):
    _, done, summary = first_run
    lines = done.stdout.splitlines()
    at = lines.index("sample: \"Qu'est-ce qu'un tokamak ?\"")
    assert lines[at + 1] == f"  base:       {summary['sample']['base']!r}"
    assert lines[at + 2] == f"  fine-tuned: {summary['sample']['fine_tuned']!r}"
    shown = re.search(r"^eval loss on 13 held-out examples: ([\d.]+) before, ([\d.]+) after$", done.stdout, re.M)
    assert shown, done.stdout
    before, after = float(shown[1]), float(shown[2])
    assert before == pytest.approx(summary["eval_loss_before"], abs=1e-4)
    assert after == pytest.approx(summary["final_eval_loss"], abs=1e-4)
    assert after < 0.9 * before  # the held-out answers became clearly more likely


def test_loss_plot_and_the_final_lines_say_where_things_are(first_run):
    run_dir, done, _ = first_run
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tail = "\n".join(done.stdout.splitlines()[-7:])
    for where in (f"adapter: {run_dir / 'adapter'}", f"summary: {run_dir / 'fastft.json'}",
                  f"loss plot: {run_dir / 'loss.png'}",
                  f"fastft generate {run_dir} --prompt \"Qu'est-ce qu'un tokamak ?\"",
                  f"fastft merge {run_dir} --out {run_dir}-merged"):
        assert where in tail, (where, tail)


def test_no_third_party_noise(first_run):
    _, done, _ = first_run
    for line in NOISE:
        assert line not in done.stdout + done.stderr


def test_noise_filter_drops_only_the_listed_message(caplog):
    """The filter is by message: another warning from the same library logger still shows."""
    from fastft.noise import install

    install()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]


def test_noise_filter_drops_liger_s_optional_backends_only(caplog):
    """Liger's note that its Ascend or CuTe DSL variant of an op cannot load goes; its main backend's stays."""
    from fastft.noise import install

    install()
    logger = logging.getLogger("liger_kernel.backends.registry")
    message = "Backend impl '%s' for op '%s' could not be imported: %s: %s"
    with caplog.at_level(logging.WARNING):
        logger.warning(message, "liger_kernel.ops.backends._ascend.rope", "rope", "ImportError", "no tanh")
        logger.warning(message, "liger_kernel.ops.backends._cutedsl.rope", "rope", "ImportError", "no CuTe DSL")
        logger.warning(message, "liger_kernel.ops.rope", "rope", "ImportError", "broken")
    assert [r.getMessage() for r in caplog.records] == [
        "Backend impl 'liger_kernel.ops.rope' for op 'rope' could not be imported: ImportError: broken"]


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, monkeypatch):
    import sys

    from fastft.run_report import report_end_of_run, write_loss_plot

    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert write_loss_plot(history, tmp_path / "loss.png", "t") and (tmp_path / "loss.png").exists()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # importing it now raises ImportError
    assert not write_loss_plot(history, tmp_path / "again.png", "t") and not (tmp_path / "again.png").exists()
    summary = {"first_loss": 2.0, "final_loss": 1.5, "data": {}, "train_tokens_per_second": 1.0, "processes": 1,
               "train_tokens": 10, "train_runtime_s": 1.0, "wall_time_s": 2.0, "sample": None}
    lines = []
    report_end_of_run(tmp_path, summary, history, lines.append, plot_written=False)
    assert "loss plot: not written, matplotlib is not installed (pip install matplotlib)" in lines


def test_tiny_model_ships_pretrained_with_the_built_in_tokenizer(tokenizer):
    """fastft:tiny loads from the package, small, with the code-built tokenizer, and already knows French."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastft.models import ARCHITECTURES, TINY_DIR, build_tokenizer, resolve_model

    assert resolve_model("fastft:tiny") == str(TINY_DIR)
    assert sum(f.stat().st_size for f in TINY_DIR.iterdir()) < 4e6  # a few MB in the repository, no more
    config = json.loads((TINY_DIR / "config.json").read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size")
    assert {k: config[k] for k in keys} == {k: ARCHITECTURES["tiny"][k] for k in keys}
    assert config["vocab_size"] == len(build_tokenizer())
    text = "Le plasma est confiné par des bobines. <|im_end|>"
    assert tokenizer(text)["input_ids"] == build_tokenizer()(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(resolve_model("fastft:tiny"), dtype=torch.float32).eval()
    # A sentence written for this test: in neither the pretraining text nor the Q&A data.
    unseen = tokenizer("Dans cette machine, les chercheurs chauffent le gaz avec des ondes et mesurent "
                       "sa température grâce à des lasers.", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=unseen, labels=unseen).loss.item()
    assert loss < 3.5, loss  # measured 2.98; random weights give about ln(259) = 5.6 nats per byte


@pytest.mark.parametrize("text", ["Qu'est-ce qu'un tokamak ?", "plain", "a b", 'say "hi", it\'s $HOME', "it's `x`!"])
def test_next_commands_quote_arguments_for_the_shell(text):
    import shlex

    from fastft.run_report import shell_quote

    assert shlex.split(shell_quote(text)) == [text]
