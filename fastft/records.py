"""Reading data files into records, one at a time: (file, line, dict), with every problem named.

.jsonl, .json (an array), .csv, .parquet and .txt files, or `hf:owner/name` datasets. Records
are yielded as they are read, so a million of them never sit in memory at once; a problem
with a whole file (not found, not UTF-8, not valid JSON, empty) is raised when the file is
reached, a problem with one record travels in the record (`__error__`) for the formatting
step to report or skip.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
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
    if suffix == ".jsonl":
        for n, line in enumerate(_lines(_pieces(path)), start=1):
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
        for i, x in enumerate(_json_array(path)):
            yield Record(str(path), i + 1, x if isinstance(x, dict) else {"__error__": "expected a JSON object"})
    elif suffix == ".csv":
        reader = csv.DictReader(_text_lines(path))
        for row in reader:
            yield Record(str(path), reader.line_num, row)
    elif suffix == ".txt":
        for n, line in enumerate(_lines(_pieces(path)), start=1):
            if line.strip():
                yield Record(str(path), n, {cfg.text_field: line})
    else:
        _whole_text(path)  # a file that is not UTF-8 is reported as such first, as it always was
        raise FastftError(f"{path}: unsupported data file type `{suffix}`. Use .jsonl, .json, .csv, .parquet or .txt.")


# A file is read this many characters at a time: its whole text is never in memory at once (a 400 MB
# JSON array of a million examples took 1.6 GB as one string).
PIECE_CHARS = 1 << 20


def _pieces(path: Path) -> Iterator[str]:
    """The file's text, `PIECE_CHARS` characters at a time: UTF-8, a BOM dropped, line endings as they are.

    Invalid UTF-8 raises the error that decoding the whole file raises (`_whole_text`), when it is reached.
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        while True:
            try:
                piece = f.read(PIECE_CHARS)
            except UnicodeDecodeError:
                _whole_text(path)
                raise  # (not reached: the whole file does not decode either)
            if not piece:
                return
            yield piece


def _text_lines(path: Path) -> Iterator[str]:
    """The file's lines with their line endings, as `csv` reads them (UTF-8 errors as in `_pieces`)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            yield from f
        except UnicodeDecodeError:
            _whole_text(path)
            raise


def _whole_text(path: Path) -> str:
    """The whole file's text; raises naming the line and byte where it is not valid UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a BOM is tolerated, not required
    except UnicodeDecodeError as e:
        offset = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)  # e.start counts after a BOM
        line = raw[:offset].count(b"\n") + 1
        raise FastftError(
            f"{path}, line {line}: not valid UTF-8 (byte 0x{raw[offset]:02x} at offset {offset}). "
            "Re-save the file as UTF-8 (for example `iconv -f latin1 -t utf-8`)."
        ) from None


def _lines(pieces: Iterable[str]) -> Iterator[str]:
    """`text.splitlines()` of the text made of `pieces`, as they come: the text is split after each piece's
    last newline ("\n"), and the parts split exactly as the whole would ("\r\n" is never cut apart)."""
    held: list[str] = []  # the text since the last newline
    for piece in pieces:
        cut = piece.rfind("\n") + 1
        if not cut:
            held.append(piece)
            continue
        held.append(piece[:cut])
        yield from "".join(held).splitlines()
        held = [piece[cut:]]
    yield from "".join(held).splitlines()


def _json_array(path: Path) -> Iterator:
    """The items of a JSON array file, decoded one at a time from pieces of its text (a million records,
    or the whole text, never sit in memory at once).

    An item counts as decoded once the "," or "]" after it is read; until then (an item cut off,
    a number that may go on, whitespace up to the end of what is read) more text is read and the
    item decoded again. Anything unexpected is handed to `json.loads` for the whole text, which
    raises the exact error (line and column) or returns what it is.
    """
    decoder, space, done = json.JSONDecoder(), re.compile(r"[ \t\n\r]*"), 0
    pieces, text, ended = _pieces(path), "", False

    def more(start: int) -> None:
        """Append a piece, or as much text as is held from `start` on if that is more (so that an item
        longer than a piece is decoded again a few times, not once per piece), unless the file has ended."""
        nonlocal text, ended
        got, wanted = [], max(PIECE_CHARS, len(text) - start)
        while not ended and wanted > 0:
            piece = next(pieces, "")
            ended, wanted = not piece, wanted - len(piece)
            got.append(piece)
        text += "".join(got)

    def after_space(pos: int) -> int:
        """The position of the first non-whitespace at or after `pos`; `len(text)` only at the end of the file."""
        while (end := space.match(text, pos).end()) == len(text) and not ended:
            more(pos)
        return end

    try:
        pos = after_space(0)
        if text[pos:pos + 1] == "[":
            pos = after_space(pos + 1)
            if text[pos:pos + 1] == "]" and after_space(pos + 1) == len(text):
                return
            while True:
                if pos > PIECE_CHARS:  # drop what is decoded
                    text, pos = text[pos:], 0
                try:
                    item, end = decoder.raw_decode(text, pos)
                    sep = after_space(end)
                except json.JSONDecodeError:
                    end = sep = -1
                # Only a "," or "]" after it shows the item whole: "1.5" cut after "1" decodes as 1
                if end < 0 or text[sep:sep + 1] not in (",", "]"):
                    if not ended:  # perhaps cut off: read on and decode it again
                        more(pos)
                        continue
                    break
                yield item
                done += 1
                pos = after_space(sep + 1)
                if text[sep] == "]":
                    if pos == len(text):
                        return
                    break
    finally:
        pieces.close()
    text = ""
    try:
        items = json.loads(_whole_text(path))
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
