"""Data at scale: tokenised once into Arrow, cached by what decides it, same ids and labels as before."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PYTHONPATH, RECIPES, qa_rows, tiny_recipe, write_jsonl

from fastft import tokenized
from fastft.data import prepare
from fastft.recipe import load_recipe

ALPACA = Path("/work/shared/data/alpaca_5000.json")


def quiet(*_):
    pass


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A data cache of the test's own (the tokenizer fixture is already loaded, so no model is rebuilt)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FASTFT_CACHE", str(folder))
    return folder / "data"


def published(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if ".tmp-" not in p.name) if cache.exists() else []


def test_tokenised_data_is_arrow_memory_mapped_from_the_cache(tmp_path, cache, tokenizer):
    from datasets.table import MemoryMappedTable

    data = prepare(load_recipe(tiny_recipe(tmp_path)), tokenizer, echo=quiet)
    ds = data.train.to_dataset()
    (folder,) = published(cache)
    assert isinstance(ds.data, MemoryMappedTable)  # the columns stay in the file, not in Python lists
    assert {Path(f["filename"]).parent for f in ds.cache_files} == {folder}
    assert ds.features["input_ids"].feature.dtype == ds.features["labels"].feature.dtype == "int16"
    assert ds.column_names == ["input_ids", "labels", "length"] and data.train.lengths.tolist() == ds["length"][:]
    assert len(data.train) == 16 and not list(cache.glob("*.tmp-*"))


def test_second_call_loads_the_cache_and_says_so(tmp_path, cache, tokenizer):
    recipe = load_recipe(tiny_recipe(tmp_path))
    said = []
    first = prepare(recipe, tokenizer, echo=said.append)
    (folder,) = published(cache)
    built = (folder / tokenized.META).stat().st_mtime_ns
    second = prepare(recipe, tokenizer, echo=said.append)
    assert "data: tokenised 16 examples" in said[0] and "loaded from the cache" in said[1] and str(folder) in said[1]
    assert (folder / tokenized.META).stat().st_mtime_ns == built and published(cache) == [folder]
    assert second.train.input_ids == first.train.input_ids and second.train.labels == first.train.labels
    assert second.stats == first.stats and second.previews == first.previews
    assert second.fingerprint == first.fingerprint


def test_each_part_of_the_key_rebuilds(tmp_path, cache, tokenizer):
    path = tiny_recipe(tmp_path)
    base = prepare(load_recipe(path), tokenizer, echo=quiet)
    assert len(published(cache)) == 1
    # batching settings and the number of processes do not change the examples: same cache
    prepare(load_recipe(path, ["data.packing=true", "data.num_proc=1"]), tokenizer, echo=quiet)
    assert len(published(cache)) == 1
    # a [data] key
    shorter = prepare(load_recipe(path, ["data.max_length=36"]), tokenizer, echo=quiet)
    assert len(published(cache)) == 2 and max(shorter.train.lengths) == 36
    # the tokenizer's chat template (part of the tokenizer)
    tokenizer_changed = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer_changed.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    prepare(load_recipe(path), tokenizer_changed, echo=quiet)
    assert len(published(cache)) == 3
    # the data file's content, same path
    write_jsonl(tmp_path / "data.jsonl", qa_rows(17))
    grown = prepare(load_recipe(path), tokenizer, echo=quiet)
    assert len(published(cache)) == 4 and len(grown.train) == 17 and grown.fingerprint != base.fingerprint


def test_half_built_cache_is_never_used(tmp_path, cache, tokenizer):
    path = tiny_recipe(tmp_path)
    recipe = load_recipe(path)
    good = prepare(recipe, tokenizer, echo=quiet)
    (folder,) = published(cache)
    key = folder.name
    # what a build killed half-way leaves: its temporary folder, named after a process that is gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    leftover = cache / f"{key}.tmp-{socket.gethostname()}-{dead.stdout.strip()}"
    leftover.mkdir()
    (leftover / "train_00000_of_00002.arrow").write_bytes(b"half")
    # and a published folder that lost its last file (or was written by something else)
    shard = next(folder.glob("train*.arrow"))
    shard.unlink()
    said = []
    again = prepare(recipe, tokenizer, echo=said.append)
    assert "tokenised 16 examples" in said[0]  # rebuilt, not loaded
    assert again.train.input_ids == good.train.input_ids and again.train.labels == good.train.labels
    assert not leftover.exists() and published(cache) == [folder] and shard.exists()
    # a folder without its metadata (written last) is not a cache either
    (folder / tokenized.META).unlink()
    said.clear()
    prepare(recipe, tokenizer, echo=said.append)
    assert "tokenised 16 examples" in said[0]


def test_failed_build_leaves_nothing(tmp_path, cache, tokenizer):
    from fastft.errors import FastftError

    recipe = load_recipe(tiny_recipe(tmp_path, rows=qa_rows(3) + [{"question": "Q"}]))
    with pytest.raises(FastftError, match="line 4: the record has no field `answer`"):
        prepare(recipe, tokenizer, echo=quiet)
    assert cache.exists() and not list(cache.iterdir())


@pytest.mark.slow
def test_two_processes_building_at_once_publish_one_complete_cache(tmp_path, cache):
    """Both succeed and agree; one folder is published, no temporary folder is left."""
    recipe = tiny_recipe(tmp_path, rows=qa_rows(1000))
    script = ("import sys, json; from fastft.data import prepare; from fastft.models import load_tokenizer; "
              "from fastft.recipe import load_recipe; r = load_recipe(sys.argv[1]); "
              "d = prepare(r, load_tokenizer(r.model), echo=lambda *a: None); "
              "print(json.dumps([d.fingerprint, d.stats['train_tokens'], sum(map(sum, d.train.labels))]))")
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "FASTFT_CACHE": str(cache.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(recipe)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert results[0][0] == results[1][0]
    assert len(published(cache)) == 1 and not list(cache.glob("*.tmp-*"))


def test_several_processes_give_identical_data(tmp_path, cache, tokenizer):
    rows = [{"question": f"Question {i} " * (i % 7), "answer": "réponse " * (i % 5 + 1)} for i in range(600)]
    path = tiny_recipe(tmp_path, rows=rows)
    one = prepare(load_recipe(path, ["data.num_proc=1", "data.max_length=60"]), tokenizer, echo=quiet)
    shutil_rmtree(cache)
    two = prepare(load_recipe(path, ["data.num_proc=3", "data.max_length=60"]), tokenizer, echo=quiet)
    assert len(two.train.to_dataset().cache_files) == 3  # three shards, from three processes
    assert two.train.input_ids == one.train.input_ids and two.train.labels == one.train.labels
    assert two.stats == one.stats and two.stats["truncated_examples"] > 0


def shutil_rmtree(path):
    import shutil

    shutil.rmtree(path)


# --------------------------------------------------------------------------- parity with the earlier pipeline


def reference(recipe, tokenizer) -> tuple[list, list]:
    """The pipeline as it was before the cache (one example at a time, Python lists), with one rule changed on
    purpose: a token carries the loss if its characters overlap a loss-carrying segment (before: if its first
    character was inside one)."""
    import math
    import random

    from fastft.data import RecordError, read_records, render

    cfg = recipe.data
    out = {}
    for split, paths in (("train", cfg.path), ("eval", cfg.eval_path)):
        rows = []
        for record in read_records(paths, cfg):
            try:
                segments = render(record, cfg, tokenizer)
            except RecordError:
                continue
            text, spans, pos = "".join(t for t, _ in segments), [], 0
            for t, loss in segments:
                if loss or cfg.train_on == "all":
                    spans.append((pos, pos + len(t)))
                pos += len(t)
            enc = tokenizer(text, add_special_tokens=cfg.format != "chat", return_offsets_mapping=True)
            ids = enc["input_ids"]
            labels = [tok if end > start and any(end > a and start < b for a, b in spans) else -100
                      for tok, (start, end) in zip(ids, enc["offset_mapping"])]
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            if any(x != -100 for x in labels):
                rows.append((ids, labels))
        out[split] = rows
    train, evals = out["train"], out["eval"]
    if cfg.eval_fraction:
        order = list(range(len(train)))
        random.Random(recipe.train.seed).shuffle(order)
        held = set(order[: max(1, math.ceil(len(order) * cfg.eval_fraction))])
        evals = [x for i, x in enumerate(train) if i in held]
        train = [x for i, x in enumerate(train) if i not in held]
    return train, evals


def as_pairs(split) -> list:
    return list(zip(split.input_ids, split.labels))


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.toml")))
def test_same_ids_and_labels_as_before_for_every_shipped_recipe(name, cache, tokenizer):
    recipe = load_recipe(RECIPES / f"{name}.toml", ["model.name=fastft:tiny"])
    data = prepare(recipe, tokenizer, echo=quiet)
    train, evals = reference(recipe, tokenizer)
    assert len(train) == len(data.train) > 0
    assert as_pairs(data.train) == [(list(i), list(lab)) for i, lab in train]
    assert as_pairs(data.eval) == [(list(i), list(lab)) for i, lab in evals]


@pytest.mark.skipif(not ALPACA.is_file(), reason="the shared Alpaca sample is not on this machine")
def test_same_ids_and_labels_as_before_on_alpaca(tmp_path, cache, tokenizer):
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[:300]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "r.toml").write_text('[data]\npath = "alpaca.json"\nformat = "alpaca"\nmax_length = 256\n')
    recipe = load_recipe(tmp_path / "r.toml", ["model.name=fastft:tiny"])
    data = prepare(recipe, tokenizer, echo=quiet)
    train, _ = reference(recipe, tokenizer)
    # max_length 256 truncates most examples, and leaves some with no answer at all (dropped)
    assert data.stats["truncated_examples"] > 0 and data.stats["no_loss_examples"] > 0
    assert len(train) == len(data.train) == 300 - data.stats["no_loss_examples"]
    assert as_pairs(data.train) == [(list(i), list(lab)) for i, lab in train]


def test_a_token_that_overlaps_the_answer_carries_the_loss(tmp_path, cache):
    """With BPE merges, the prompt's last space and the answer's first letters become one token: it trains."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {"ĠL": len(vocab), "ĠLa": len(vocab) + 1}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "L"), ("ĠL", "a")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_special_tokens({"eos_token": "<|end|>"})
    path = tiny_recipe(tmp_path, rows=[{"question": "Où ?", "answer": "La fusion."}])
    data = prepare(load_recipe(path), tok, echo=quiet)
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    merged = tok.convert_tokens_to_ids("ĠLa")
    assert merged in ids  # "A: La" -> ..., "A", ":", " La", ...
    first = labels.index(merged)
    assert all(x == -100 for x in labels[:first]) and labels[first:] == ids[first:]
    assert tok.decode([t for t in labels if t != -100]) == " La fusion.<|end|>"
    assert data.previews[0] == [("Q: Où ?\nA:", False), (" La fusion.<|end|>", True)]


# --------------------------------------------------------------------------- reading, streamed


@pytest.mark.parametrize("text", [
    '[{"a": 1}, {"a": 2}]', ' \n[ ]\n', '[{"a": 1} , 3,\n"x", [1]]', '[{"a": 1},]', '[{"a": 1} {"a": 2}]',
    '[{"a": 1}', '{"a": 1}', '[{"a": 1}] x', '', '[{"a": NaN}]', '[1, 2]\n\n', '[{"a": "\u2028"}]',
    '[12345, -Infinity, 1.5e10 ,{"é": "ü"}]  \n ', '[[], {}, 100]', '[{"a": 1}] ]', '\ufeff[{"a": 1}, 7]',
])
@pytest.mark.parametrize("piece", [1, 2, 3, 5, 1 << 22])
def test_json_array_is_read_item_by_item_as_json_loads_reads_it(tmp_path, monkeypatch, text, piece):
    """Items read from pieces of the file (cut anywhere: in a number, a string, the whitespace) are what
    `json.loads` makes of the whole text, and its errors are the whole text's."""
    from fastft import records
    from fastft.errors import FastftError

    monkeypatch.setattr(records, "PIECE_CHARS", piece)
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    try:
        expected = json.loads(text.removeprefix("\ufeff"))
        error = None
    except json.JSONDecodeError as e:
        expected, error = None, f"line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
    if error:
        with pytest.raises(FastftError, match=error.replace("(", r"\(").replace(")", r"\)")):
            list(records._json_array(path))
    elif not isinstance(expected, list):
        with pytest.raises(FastftError, match="must be an array of objects"):
            list(records._json_array(path))
    else:
        assert list(records._json_array(path)) == expected


def test_lines_are_split_as_splitlines_splits_them():
    from fastft.records import _lines

    text = "a\r\nb\n\nc\rd\u2028e\x85f\r\n\r\ng\n" * 50 + "last"
    for chunk in (1, 2, 3, 7, 1000):
        assert list(_lines(text[i:i + chunk] for i in range(0, len(text), chunk))) == text.splitlines()


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_a_big_file_is_never_held_whole(tmp_path, monkeypatch, suffix):
    """Reading 8 MB of records keeps a few pieces of text in memory, not the file (Python's own allocations)."""
    import csv
    import tracemalloc

    from fastft import records
    from fastft.recipe import DataConfig

    monkeypatch.setattr(records, "PIECE_CHARS", 1 << 16)
    rows = [{"question": f"question {i} " + "é" * 60, "answer": f"answer {i} " + "x" * 100} for i in range(40_000)]
    path = tmp_path / f"d{suffix}"
    with open(path, "w", encoding="utf-8", newline="") as f:
        if suffix == ".json":
            json.dump(rows, f, ensure_ascii=False)
        elif suffix == ".jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            writer = csv.DictWriter(f, ["question", "answer"])
            writer.writeheader()
            writer.writerows(rows)
    assert path.stat().st_size > 8e6
    tracemalloc.start()
    try:
        count = sum(1 for r in records.iter_records([str(path)], DataConfig()) if r.data["answer"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == len(rows)
    assert peak < 2e6, f"{peak / 1e6:.1f} MB held while reading an {path.stat().st_size / 1e6:.0f} MB file"


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".txt"])
@pytest.mark.parametrize("bom", [False, True])
def test_invalid_utf8_far_into_a_file_is_reported_as_for_the_whole_file(tmp_path, monkeypatch, suffix, bom):
    """A bad byte after many pieces of good text: the same one-paragraph error, naming its line and offset."""
    from fastft import records
    from fastft.errors import FastftError
    from fastft.recipe import DataConfig

    monkeypatch.setattr(records, "PIECE_CHARS", 64)
    lines = [json.dumps({"text": f"ligne {i} é"}, ensure_ascii=False).encode() for i in range(50)]
    body = (b"[" + b",\n".join(lines) + b"]") if suffix == ".json" else b"\n".join(lines)
    body = body.replace(b"ligne 37", b"ligne \xe97")  # latin-1 e-acute on line 38
    path = tmp_path / f"d{suffix}"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + (b"text\n" if suffix == ".csv" else b"") + body)
    offset = path.read_bytes().index(b"\xe97")
    line = 38 + (suffix == ".csv")
    with pytest.raises(FastftError) as e:
        list(records.iter_records([str(path)], DataConfig()))
    assert str(e.value) == (f"{path}, line {line}: not valid UTF-8 (byte 0xe9 at offset {offset}). Re-save the file as "
                            "UTF-8 (for example `iconv -f latin1 -t utf-8`).")
