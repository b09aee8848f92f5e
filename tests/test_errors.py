"""Bad input: exit code 2 and one paragraph naming the file and the line or key, before any model loads.

Most cases run the real command line in this process (`fastft.cli.main`, exit code and
stderr captured); two run it in a subprocess, where the exit code and the absence of a
traceback are what a user's shell sees.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import TINY_QA, cli, qa_rows, run_cli, tiny_recipe, write_jsonl, write_recipe

from fastft.errors import FastftError


def make(tmp_path: Path, rows: list | None = None, lines: list | None = None, replace: dict | None = None) -> Path:
    """The tiny qa recipe in `tmp_path`, its data given as records or raw lines, some recipe text replaced."""
    data = tmp_path / "data.jsonl"
    if lines is not None:
        data.write_bytes(b"\n".join(lines) + b"\n")
    else:
        write_jsonl(data, qa_rows() if rows is None else rows)
    text = TINY_QA.format(data=data.as_posix(), steps=4)
    for old, new in (replace or {}).items():
        assert old in text
        text = text.replace(old, new)
    return write_recipe(tmp_path / "tiny.toml", text)


def case(**kwargs):
    return lambda tmp_path: make(tmp_path, **kwargs)


GOOD = [json.dumps(r).encode() for r in qa_rows(4)]
CHAT = [{"messages": [{"role": "user", "content": "Bonjour"}, {"role": "bot", "content": "Salut"}]}]
MALFORMED_LINE = TINY_QA.splitlines().index("seed = 7") + 1

# name -> (how to make the recipe and data, what the message must contain (regular expressions))
BAD_INPUTS = {
    "malformed_toml": (
        case(replace={"seed = 7": "seed = = 7"}),
        [rf"tiny\.toml: malformed TOML: Invalid value \(at line {MALFORMED_LINE}, column 8\)"],
    ),
    "unknown_key": (
        case(replace={"learning_rate = 1e-3": "learning_rat = 1e-3"}),
        [r"tiny\.toml: unknown key `train\.learning_rat` \(did you mean `learning_rate`\?\)"],
    ),
    "wrong_type": (
        case(replace={"batch_size = 4": 'batch_size = "four"'}),
        [r'tiny\.toml: `train\.batch_size` = "four" is not allowed: expected an integer or "auto"'],
    ),
    "out_of_range": (
        case(replace={"alpha = 8": "alpha = 8\ndropout = 1.5"}),
        [r"tiny\.toml: `lora\.dropout` = 1\.5 is out of range: it must be between 0\.0 and 0\.9"],
    ),
    "missing_data_file": (
        case(replace={"data.jsonl": "nope.jsonl"}),
        [r"nope\.jsonl: data file not found. `data\.path` is resolved relative to the recipe file"],
    ),
    "data_path_is_a_folder": (  # the folder that holds data.jsonl
        case(replace={'/data.jsonl"': '"'}),
        [r"error: /\S*pa\d+ is a folder; `data\.path` takes files\. List them: `path = \[\"a\.jsonl\", "],
    ),
    "empty_dataset": (
        case(lines=[b"", b"  "]),
        [r"data\.jsonl: the dataset is empty"],
    ),
    "line_not_json": (
        case(lines=GOOD[:2] + [b'{"question": "Q", "answer": '] + GOOD[2:]),
        [r"data\.jsonl, line 3: not valid JSON \(Expecting value at column 29\)", r'data\.on_error = "skip"'],
    ),
    "record_missing_field": (
        case(rows=qa_rows(1) + [{"question": "Q"}] + qa_rows(2)),
        [r"data\.jsonl, line 2: the record has no field `answer` \(it has `question`\)", r"data\.field_map"],
    ),
    "field_of_wrong_type": (
        case(rows=qa_rows(1) + [{"question": "Q", "answer": ["un", "deux"]}]),
        [r'data\.jsonl, line 2: field `answer` is a list \(\["un", "deux"\]\), expected text'],
    ),
    "not_utf8": (
        case(lines=GOOD[:1] + ['{"question": "café", "answer": "oui"}'.encode("latin-1")]),
        [r"data\.jsonl, line 2: not valid UTF-8 \(byte 0xe9", r"Re-save the file as UTF-8"],
    ),
    "template_field_no_record_has": (
        case(replace={"{answer}": "{answr}"}),
        [r"tiny\.toml: `data\.template` uses `\{answr\}`, but no record in \S*data\.jsonl has a field `answr` "
         r"\(did you mean `\{answer\}`\?\)"],
    ),
    "every_example_too_long": (
        case(replace={"max_length = 256": "max_length = 16"}),
        [r"data\.jsonl: no token of any train example carries the loss \(16 examples; 16 were longer than "
         r"`data\.max_length` = 16\)"],
    ),
    "chat_unknown_role": (
        case(rows=CHAT, replace={'format = "qa"': 'format = "chat"'}),
        [r"data\.jsonl, line 1: message 2 has unknown role 'bot'; roles are assistant, system, tool, user"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_clear_paragraph(name, tmp_path, monkeypatch, capsys):
    build, patterns = BAD_INPUTS[name]
    recipe = build(tmp_path)
    code, out, err = cli(monkeypatch, capsys, "validate", recipe)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err
    for pattern in patterns:
        assert re.search(pattern, err), f"{pattern!r} not in: {err}"
    assert "recipe OK" not in out


def test_bad_recipe_in_a_subprocess_exits_2_without_traceback(tmp_path):
    recipe = make(tmp_path, replace={"seed = 7": "seed = = 7"})
    done = run_cli("validate", str(recipe))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and f"(at line {MALFORMED_LINE}, column 8)" in done.stderr


def test_bad_data_stops_run_before_the_model_loads(tmp_path):
    """`fastft run` on bad data: exit 2, and neither a model load nor the output folder happens.

    The model folder has a tokenizer but no weights, so loading the model would fail differently.
    """
    from fastft.models import resolve_model

    model = tmp_path / "no-weights"
    shutil.copytree(resolve_model("fastft:tiny"), model, ignore=shutil.ignore_patterns("*.safetensors"))
    recipe = make(tmp_path, rows=qa_rows(2) + [{"question": "Q"}],
                  replace={'name = "fastft:tiny"': f'name = "{model.as_posix()}"'})
    out = tmp_path / "out"
    done = run_cli("run", str(recipe), "--output", str(out))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "data.jsonl, line 3: the record has no field `answer`" in " ".join(done.stderr.split())
    assert "model:" not in done.stdout and "Loading weights" not in done.stderr
    assert not out.exists()


def test_bom_and_crlf_simply_work(tmp_path, tokenizer):
    """A UTF-8 BOM and Windows line endings, in the data and the recipe, give the same examples as clean files."""
    from fastft.data import prepare
    from fastft.recipe import load_recipe

    clean = tiny_recipe(tmp_path / "clean")
    windows = tiny_recipe(tmp_path / "windows")
    for path in (windows, windows.parent / "data.jsonl"):
        text = path.read_text(encoding="utf-8").replace("\n", "\r\n")
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert (windows.parent / "data.jsonl").read_bytes().count(b"\r\n") == 16
    a, b = load_recipe(clean), load_recipe(windows)
    assert a.to_dict()["train"] == b.to_dict()["train"] and a.data.template == b.data.template
    pa, pb = prepare(a, tokenizer, echo=lambda *_: None), prepare(b, tokenizer, echo=lambda *_: None)
    assert pa.train.input_ids == pb.train.input_ids and pa.train.labels == pb.train.labels
    assert len(pb.train) == 16 and not pb.stats["skipped_records"]


def test_on_error_skip_reports_how_many_and_which_lines(tmp_path, monkeypatch, capsys):
    lines = [json.dumps(r).encode() for r in qa_rows(6)]
    lines[2] = b'{"question": "Q", "answer": '  # line 3: not JSON
    lines[4] = json.dumps({"question": "Q"}).encode()  # line 5: no answer
    recipe = make(tmp_path, lines=lines, replace={"max_length = 256": 'max_length = 256\non_error = "skip"'})
    code, out, err = cli(monkeypatch, capsys, "validate", recipe)
    assert code == 0, err
    out = " ".join(out.split())
    assert "warning: skipped 2 of 6 records with errors" in out
    assert f"{tmp_path / 'data.jsonl'} lines 3, 5." in out
    assert "The first: " in out and "line 3: not valid JSON" in out
    assert "data: 4 train / 0 eval examples" in out


def test_on_error_skip_with_every_record_bad_is_an_error(tmp_path, tokenizer):
    from fastft.data import prepare
    from fastft.recipe import load_recipe

    recipe = make(tmp_path, rows=[{"question": "Q", "answer": ["un"]}] * 3)
    r = load_recipe(recipe, ['data.on_error="skip"'])
    with pytest.raises(FastftError, match=r"data\.jsonl: all 3 train records are bad.*The first: .*line 1: field"):
        prepare(r, tokenizer, echo=lambda *_: None)


def test_out_of_memory_names_the_keys_to_change(tmp_path, monkeypatch, capsys):
    """A real `torch.OutOfMemoryError` during training (raised by a test callback: no GPU here)."""
    import torch

    from fastft.backends import hf

    class RunOutOfMemory:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def on_step_begin(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    make_trainer = hf.HFBackend.make_trainer

    def with_failing_step(self, *args, **kwargs):
        trainer = make_trainer(self, *args, **kwargs)
        trainer.add_callback(RunOutOfMemory())
        return trainer

    monkeypatch.setattr(hf.HFBackend, "make_trainer", with_failing_step)
    recipe = tiny_recipe(tmp_path)
    code, out, err = cli(monkeypatch, capsys, "run", recipe, "--output", tmp_path / "out")
    assert code == 2 and "Traceback" not in err
    assert re.search(r"Out of (GPU )?memory \(CUDA out of memory. Tried to allocate 2.00 GiB.\)", err)
    for key in ("`train.batch_size` = 4", "`train.grad_accum` = 1", "`data.max_length` = 256",
                "`train.gradient_checkpointing` = true (now false)", '`model.quantization` = "4bit" (now "16bit")'):
        assert key in err
    assert str(recipe) in err and "--overwrite" in err


def test_trust_remote_code_reaches_from_pretrained_unchanged(tmp_path, monkeypatch, capsys):
    """Off unless the recipe sets it; when set, a warning names the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastft.backends.hf import HFBackend
    from fastft.models import load_tokenizer, resolve_model
    from fastft.recipe import load_recipe

    seen = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "absent"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    recipe = tiny_recipe(tmp_path)
    for overrides, expected in (((), False), (("model.trust_remote_code=true",), True)):
        seen.clear()
        r = load_recipe(recipe, overrides)
        load_tokenizer(r.model)
        HFBackend().load_model(r, resolve_model(r.model.name))
        assert seen == [expected, expected]
        warning = "`model.trust_remote_code = true` runs code shipped with fastft:tiny"
        assert (warning in capsys.readouterr().err) == expected
