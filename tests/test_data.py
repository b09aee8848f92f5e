"""The shared data pipeline: sources, formats, loss masking, truncation, eval split."""

import csv
import json

import pytest
from conftest import write_jsonl, write_recipe

from fastft.data import prepare, render_prompt
from fastft.errors import FastftError
from fastft.recipe import load_recipe


def make(tmp_path, data_section: str, files: dict | None = None):
    for name, content in (files or {}).items():
        path = tmp_path / name
        if isinstance(content, list):
            write_jsonl(path, content)
        else:
            path.write_text(content, encoding="utf-8")
    return load_recipe(write_recipe(tmp_path / "r.toml", "[data]\n" + data_section))


def decoded_loss(tokenizer, ids, labels):
    """The text of the tokens that carry the loss."""
    return tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])


def test_qa_masks_exactly_the_answer_and_eos(tmp_path, tokenizer):
    r = make(tmp_path, 'path = "d.jsonl"\ntemplate = "Q: {question}\\nA: {answer}"\n',
             {"d.jsonl": [{"question": "2+2?", "answer": "4"}]})
    data = prepare(r, tokenizer)
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    # Byte-level tokenizer: one token per byte, so positions can be counted by hand.
    assert tokenizer.decode(ids) == "Q: 2+2?\nA: 4<|im_end|>"
    prompt_len = len("Q: 2+2?\nA: ")
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] == [tokenizer.convert_tokens_to_ids("4"), tokenizer.eos_token_id]
    assert data.previews[0] == [("Q: 2+2?\nA: ", False), ("4<|im_end|>", True)]


def test_train_on_all_and_response_field(tmp_path, tokenizer):
    rows = [{"q": "x", "a": "yes", "note": "!"}]
    r = make(tmp_path, 'path = "d.jsonl"\ntemplate = "{q}|{a}|{note}"\nresponse_field = "a"\nadd_eos = false\n',
             {"d.jsonl": rows})
    ids, labels = (lambda d: (d.train.input_ids[0], d.train.labels[0]))(prepare(r, tokenizer))
    assert decoded_loss(tokenizer, ids, labels) == "yes|!"  # from the response placeholder to the end
    r.data.train_on = "all"
    ids, labels = (lambda d: (d.train.input_ids[0], d.train.labels[0]))(prepare(r, tokenizer))
    assert labels == ids


def test_alpaca_with_and_without_input(tmp_path, tokenizer):
    rows = [{"instruction": "Add", "input": "1 and 2", "output": "3"}, {"instruction": "Say hi", "output": "hi"}]
    data = prepare(make(tmp_path, 'path = "d.jsonl"\nformat = "alpaca"\n', {"d.jsonl": rows}), tokenizer)
    first, second = (tokenizer.decode(x) for x in data.train.input_ids)
    assert "### Input:\n1 and 2\n\n### Response:\n3" in first
    assert "### Input" not in second and second.endswith("### Response:\nhi<|im_end|>")
    assert decoded_loss(tokenizer, data.train.input_ids[1], data.train.labels[1]) == "hi<|im_end|>"


def test_chat_masks_every_assistant_turn(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "B"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "D"}]}]
    r = make(tmp_path, 'path = "d.jsonl"\nformat = "chat"\nsystem_prompt = "Be brief."\n', {"d.jsonl": rows})
    data = prepare(r, tokenizer)
    pieces = data.previews[0]
    assert [text for text, loss in pieces if loss] == ["B<|im_end|>\n", "D<|im_end|>\n"]
    assert pieces[0][0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na")
    # The prompt used at generation time is exactly the training prefix.
    assert render_prompt("a", r.data, tokenizer) == pieces[0][0]


def test_text_format_trains_on_everything(tmp_path, tokenizer):
    data = prepare(make(tmp_path, 'path = "d.txt"\nformat = "text"\n', {"d.txt": "one\n\ntwo\n"}), tokenizer)
    assert [tokenizer.decode(x) for x in data.train.input_ids] == ["one<|im_end|>", "two<|im_end|>"]
    assert data.train.labels == data.train.input_ids


def test_every_source_type_gives_the_same_examples(tmp_path, tokenizer):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    results = []
    for ext in ("jsonl", "json", "csv", "parquet"):
        r = make(tmp_path, f'path = "d.{ext}"\ntemplate = "{{question}} {{answer}}"\n')
        results.append(prepare(r, tokenizer).train.input_ids)
    assert all(x == results[0] for x in results) and len(results[0]) == 3


def test_several_files_are_combined_in_order(tmp_path, tokenizer):
    r = make(tmp_path, 'path = ["a.txt", "b.txt"]\nformat = "text"\nadd_eos = false\n',
             {"a.txt": "first\n", "b.txt": "second\nthird\n"})
    assert [tokenizer.decode(x) for x in prepare(r, tokenizer).train.input_ids] == ["first", "second", "third"]


def test_field_map_renames_columns(tmp_path, tokenizer):
    r = make(tmp_path, 'path = "d.jsonl"\ntemplate = "{question}={answer}"\nfield_map = {question = "prompt", answer = "reply"}\n',
             {"d.jsonl": [{"prompt": "p", "reply": "r"}]})
    assert tokenizer.decode(prepare(r, tokenizer).train.input_ids[0]) == "p=r<|im_end|>"


def test_truncation_is_counted(tmp_path, tokenizer):
    rows = [{"question": "q", "answer": "x" * 40}, {"question": "q", "answer": "short"}]
    r = make(tmp_path, 'path = "d.jsonl"\ntemplate = "{question}:{answer}"\nmax_length = 16\n', {"d.jsonl": rows})
    data = prepare(r, tokenizer)
    # 2 + 40 + 1 (EOS) = 43 tokens cut to 16; the short one (2 + 5 + 1 = 8) is untouched.
    assert data.stats["truncated_examples"] == 1 and data.stats["truncated_tokens"] == 43 - 16
    assert [len(x) for x in data.train.input_ids] == [16, 8]


def test_all_masked_dataset_is_an_error(tmp_path, tokenizer):
    rows = [{"question": "a long question " * 4, "answer": "yes"}]
    r = make(tmp_path, 'path = "d.jsonl"\ntemplate = "{question}{answer}"\nmax_length = 8\n', {"d.jsonl": rows})
    with pytest.raises(FastftError, match="no token of any train example carries the loss.*Raise `data.max_length`"):
        prepare(r, tokenizer)


def test_eval_fraction_is_seeded_and_disjoint(tmp_path, tokenizer):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]
    r = make(tmp_path, 'path = "d.jsonl"\neval_fraction = 0.2\n', {"d.jsonl": rows})
    a, b = prepare(r, tokenizer), prepare(r, tokenizer)
    assert len(a.eval) == 4 and len(a.train) == 16 and a.eval.input_ids == b.eval.input_ids
    assert not {tuple(x) for x in a.eval.input_ids} & {tuple(x) for x in a.train.input_ids}
    r.train.seed = 1
    assert prepare(r, tokenizer).eval.input_ids != a.eval.input_ids
    assert a.fingerprint == b.fingerprint


def test_eval_file(tmp_path, tokenizer):
    r = make(tmp_path, 'path = "t.jsonl"\neval_path = "e.jsonl"\n',
             {"t.jsonl": [{"question": "q", "answer": "a"}], "e.jsonl": [{"question": "eq", "answer": "ea"}] * 2})
    data = prepare(r, tokenizer)
    assert len(data.train) == 1 and len(data.eval) == 2
