"""Reading data files into records, one at a time: (file, line, dict), with every problem named.

.jsonl, .json (an array), .csv, .parquet and .txt files, or `hf:owner/name` datasets. Records
are yielded as they are read, so a million of them never sit in memory at once; a problem
with a whole file (not found, not UTF-8, not valid JSON, empty) is raised when the file is
reached, a problem with one record travels in the record (`__error__`) for the formatting
step to report or skip.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastft.errors import FastftError
from fastft.recipe import DataConfig


@dataclass
class Record:
    file: str
    line: int  # 1-based line (jsonl, txt, csv) or item number (json array, parquet, hf)
    data: dict

    @property
    def where(self) -> str:
        return f"{self.file}, line {self.line}"


class RecordError(FastftError):
    """A problem with one record; skippable with `data.on_error = "skip"`."""


# --------------------------------------------------------------------------- reading


def read_records(paths: list[str], cfg: DataConfig) -> list[Record]:
    """Every record of every file in `paths`, in order, as a list (small data; `prepare` streams them)."""
    return list(iter_records(paths, cfg))


def iter_records(paths: list[str], cfg: DataConfig) -> Iterator[Record]:
    """Yield every record of every file in `paths`, in order, holding one file's text at most.

    Raises on unreadable files, as soon as the file is reached.
    """
    for path in paths:
        count = 0
        records = _read_hub(path, cfg) if path.startswith("hf:") else _read_file(Path(path), cfg)
        for count, record in enumerate(records, 1):
            yield record
        if not count:
            raise FastftError(f"{path}: the dataset is empty. Point `data.path` at a file with at least one record.")


def _read_file(path: Path, cfg: DataConfig) -> Iterator[Record]:
    if path.is_dir():
        raise FastftError(f"{path} is a folder; `data.path` takes files. List them: `path = [\"a.jsonl\", \"b.jsonl\"]`.")
    if not path.is_file():
        raise FastftError(f"{path}: data file not found. `data.path` is resolved relative to the recipe file; check it.")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield Record(str(path), n, row)
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a BOM is tolerated, not required
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise FastftError(
            f"{path}, line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}). "
            "Re-save the file as UTF-8 (for example `iconv -f latin1 -t utf-8`)."
        ) from None
    del raw
    if suffix == ".jsonl":
        for n, line in enumerate(_lines(text), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                error = f"not valid JSON ({e.msg} at column {e.colno}); each line of a .jsonl file must be one JSON object"
                yield Record(str(path), n, {"__error__": error})
                continue
            if not isinstance(obj, dict):
                obj = {"__error__": f"expected a JSON object, got {type(obj).__name__}"}
            yield Record(str(path), n, obj)
    elif suffix == ".json":
        for i, x in enumerate(_json_array(text, path)):
            yield Record(str(path), i + 1, x if isinstance(x, dict) else {"__error__": "expected a JSON object"})
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            yield Record(str(path), reader.line_num, row)
    elif suffix == ".txt":
        for n, line in enumerate(_lines(text), start=1):
            if line.strip():
                yield Record(str(path), n, {cfg.text_field: line})
    else:
        raise FastftError(f"{path}: unsupported data file type `{suffix}`. Use .jsonl, .json, .csv, .parquet or .txt.")


def _lines(text: str, chunk: int = 1 << 22) -> Iterator[str]:
    """`text.splitlines()`, a piece at a time: cut after a newline, the pieces split exactly as the whole would."""
    start = 0
    while start < len(text):
        cut = text.find("\n", start + chunk)
        cut = len(text) if cut < 0 else cut + 1
        yield from text[start:cut].splitlines()
        start = cut


def _json_array(text: str, path: Path) -> Iterator:
    """The items of a JSON array, decoded one at a time (a million records never sit in memory at once).

    Anything unexpected is handed to `json.loads` for the whole text, which raises the exact error
    (line and column) or returns what it is.
    """
    decoder, space, done = json.JSONDecoder(), re.compile(r"[ \t\n\r]*"), 0
    pos = space.match(text).end()
    if text[pos:pos + 1] == "[":
        pos = space.match(text, pos + 1).end()
        if text[pos:pos + 1] == "]" and space.match(text, pos + 1).end() == len(text):
            return
        while True:
            try:
                item, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                break
            yield item
            done += 1
            pos = space.match(text, pos).end()
            sep = text[pos:pos + 1]
            pos = space.match(text, pos + 1).end()
            if sep == "]" and pos == len(text):
                return
            if sep != ",":
                break
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise FastftError(f"{path}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}).") from None
    if not isinstance(items, list):
        raise FastftError(f"{path}: a .json dataset must be an array of objects; use .jsonl for one object per line.")
    yield from items[done:]


def load_hub(path: str, cfg: DataConfig):
    from datasets import load_dataset

    try:
        return load_dataset(path.removeprefix("hf:"), cfg.config or None, split=cfg.split)
    except Exception as e:  # the hub raises many types; all mean "cannot get it"
        raise FastftError(f"data.path = \"{path}\": could not load the dataset ({e}). Check the id, "
                          "`data.split` and `data.config`, and the network.") from None


def _read_hub(path: str, cfg: DataConfig) -> Iterator[Record]:
    for i, row in enumerate(load_hub(path, cfg)):
        yield Record(path, i + 1, row)
