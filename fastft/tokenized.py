"""Tokenised data on disk: built once per input, in Arrow, and reused by every later run.

    rendered text + loss spans (one Arrow file)  --datasets.map, num_proc-->  token table (Arrow shards)

`fastft.data` decides what each example's text is and which characters carry the loss;
this module turns those texts into token ids and labels and keeps them in a cache folder:

    $FASTFT_CACHE/data/<key>/   meta.json + train-*.arrow (+ eval-*.arrow)

The key hashes everything that decides the result (the data files' bytes, the recipe's
`[data]` section, the tokenizer and `FORMAT_VERSION`), so a changed input gets a new folder
and an unchanged one is loaded, memory-mapped, in about a second. A folder is built under a
temporary name and published by one rename: a killed build leaves only a temporary folder
that is never read, and two processes building at once each publish a complete copy (the
first rename wins, the other is discarded).

Token table columns: `input_ids`, `labels` (-100 where no loss) as int16 (int32 for
vocabularies over 32,767 tokens), `length` (tokens kept), `loss_tokens` (tokens carrying the
loss), `truncated` (tokens cut by `data.max_length`) and `record` (which record of the data
files the example was made from, counting from 0). Examples with no loss-carrying token
stay in the table (they are counted) and are left out when the splits are selected.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from fastft.errors import FastftError

# Bump when fastft's formatting or labelling rules change what an unchanged input tokenises to,
# so that caches built by an older fastft are not reused.
# 2: a token carries the loss if its characters overlap a loss-carrying segment (was: if its first one is inside).
FORMAT_VERSION = 2
META = "meta.json"  # written last into the temporary folder; a folder without it is not a cache
# [data] keys that change how batches are drawn, not what the examples are: not part of the key.
NOT_IN_KEY = {"num_proc", "packing", "group_by_length"}


# --------------------------------------------------------------------------- key


def cache_key(paths: list[str], data_section: dict, tokenizer) -> str:
    """A hex digest of everything that decides the tokenised data."""
    import xxhash

    h = hashlib.sha256()
    section = {k: v for k, v in data_section.items() if k not in NOT_IN_KEY}
    h.update(json.dumps({"format_version": FORMAT_VERSION, "data": section}, sort_keys=True).encode())
    for path in paths:
        h.update(b"\0file\0" + path.encode())
        if path.startswith("hf:"):
            continue  # the reader adds the hub dataset's own fingerprint (see `hub_fingerprint`)
        p = Path(path)
        if not p.is_file():
            continue  # reading it raises the proper error; nothing is cached for a failed build
        content = xxhash.xxh3_128()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                content.update(chunk)
        h.update(content.digest())
    h.update(tokenizer_digest(tokenizer).encode())
    return h.hexdigest()[:32]


def tokenizer_digest(tokenizer) -> str:
    """Vocabulary, merges, normalisation, special tokens, post-processor and chat template, hashed."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([tokenizer.chat_template, str(tokenizer.special_tokens_map), tokenizer.eos_token,
                         tokenizer.pad_token, tokenizer.bos_token], sort_keys=True, default=str).encode())
    return h.hexdigest()


def hub_fingerprint(dataset) -> str:
    """What stands for a hub dataset's content in the key: `datasets`' own fingerprint of its files."""
    return getattr(dataset, "_fingerprint", "")


# --------------------------------------------------------------------------- cache folders


def cache_root() -> Path:
    from fastft.models import cache_dir

    return cache_dir() / "data"


def load(key: str) -> dict | None:
    """The published cache folder's metadata for `key` with its splits loaded, or None if there is none."""
    folder = cache_root() / key
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None  # absent, or not a complete cache: built again
    if meta.get("format_version") != FORMAT_VERSION or meta.get("key") != key:
        return None
    files = [folder / name for split in ("train", "eval") for name in meta[f"{split}_files"]]
    if not all(f.is_file() for f in files):
        return None
    meta["folder"] = str(folder)
    for split in ("train", "eval"):
        meta[split] = _open([folder / name for name in meta[f"{split}_files"]])
    return meta


def _open(files: list[Path]):
    from datasets import Dataset, concatenate_datasets

    if not files:
        return None
    parts = [Dataset.from_file(str(f)) for f in files]  # memory-mapped, not read
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def new_build_folder(key: str) -> Path:
    """A fresh temporary folder to build `key` in (temporary folders of dead builds are removed)."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastftError(f"Cannot create the data cache folder {root} ({e.strerror}). Set FASTFT_CACHE to a "
                          "writable folder.") from None
    host = socket.gethostname()
    for old in root.glob(f"{key}.tmp-{host}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = root / f"{key}.tmp-{host}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(tmp: Path, key: str, meta: dict) -> None:
    """Write `meta` into `tmp` and rename it to the cache folder of `key` (atomic on one file system)."""
    meta = {**meta, "format_version": FORMAT_VERSION, "key": key}
    (tmp / META).write_text(json.dumps(meta, ensure_ascii=False))
    final = cache_root() / key
    try:
        tmp.rename(final)
        return
    except OSError:
        pass
    if load(key) is not None:  # another process published the same key first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(final, ignore_errors=True)  # a folder that is not a complete cache (not written by fastft)
    tmp.rename(final)


# --------------------------------------------------------------------------- building


class TextWriter:
    """Streams rendered examples (text, flat [start, end, ...] loss spans) into one Arrow file, batch by batch."""

    def __init__(self, path: Path, batch: int = 4096):
        import pyarrow as pa

        self.path, self.batch, self.rows = path, batch, 0
        self.schema = pa.schema([("text", pa.large_string()), ("spans", pa.list_(pa.int32())), ("record", pa.int64())])
        self._texts, self._spans, self._records = [], [], []
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)

    def add(self, text: str, spans: list[int], record: int) -> None:
        """One example: its text, its loss spans, and the number of the record it came from (0-based)."""
        self._texts.append(text)
        self._spans.append(spans)
        self._records.append(record)
        if len(self._texts) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._texts:
            self._writer.write_batch(pa.record_batch([pa.array(self._texts, pa.large_string()),
                                                      pa.array(self._spans, pa.list_(pa.int32())),
                                                      pa.array(self._records, pa.int64())], schema=self.schema))
            self.rows += len(self._texts)
            self._texts, self._spans, self._records = [], [], []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()


def tokenize(segments_list: list[list[tuple[str, bool]]], tokenizer, train_on: str, chat: bool) -> list:
    """(input_ids, labels, offsets) of each example, untruncated, by the rule `prepare` uses (see `label`)."""
    texts, spans = [], []
    for segs in segments_list:
        texts.append("".join(t for t, _ in segs))
        spans.append(loss_spans(segs, train_on))
    if not texts:
        return []
    enc = label(texts, spans, tokenizer, not chat, max_length=1 << 62)
    ends = enc["length"].cumsum().tolist()
    return [(enc["input_ids"][a:b].tolist(), enc["labels"][a:b].tolist(), [tuple(o) for o in enc["offsets"][a:b].tolist()])
            for a, b in zip([0] + ends[:-1], ends)]


def loss_spans(segments: list[tuple[str, bool]], train_on: str) -> list[int]:
    """The character spans that carry the loss, flat: [start, end, start, end, ...]."""
    spans, pos = [], 0
    for text, loss in segments:
        if loss or train_on == "all":
            spans += (pos, pos + len(text))
        pos += len(text)
    return spans


def tokenize_file(text_file: Path, out_name: str, tokenizer, *, add_special_tokens: bool, max_length: int,
                  num_proc: int, desc: str):
    """Tokenise the rendered examples of `text_file` into `<out_name>*.arrow` beside it; returns the Dataset.

    `datasets.map` runs `encode_batch` on batches of 1,000 examples in `num_proc` processes,
    each writing its own Arrow shard; a progress bar shows examples/s.
    """
    from datasets import Dataset

    texts = Dataset.from_file(str(text_file))
    with progress_bars(show_progress(len(texts))):
        return texts.map(
            encode_batch, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
            remove_columns=texts.column_names, desc=desc, new_fingerprint=f"{out_name}-{text_file.stat().st_mtime_ns}",
            cache_file_name=str(text_file.parent / f"{out_name}.arrow"),
            fn_kwargs=dict(tokenizer=tokenizer, add_special_tokens=add_special_tokens, max_length=max_length,
                           dtype="int16" if len(tokenizer) <= 32767 else "int32"),
        )


def show_progress(rows: int) -> bool:
    """Progress bars for data that takes a while, or on a terminal (not in logs of small runs, nor in tests)."""
    return rows >= 10_000 or sys.stderr.isatty()


@contextlib.contextmanager
def progress_bars(show: bool):
    """`datasets`' progress bars off inside the block unless `show` (and unless they are off already)."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hide = not show and not are_progress_bars_disabled()
    if hide:
        disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            enable_progress_bars()


def encode_batch(batch: dict, tokenizer, add_special_tokens: bool, max_length: int, dtype: str):
    """One batch of rendered examples as a token table (see the module's doc for the columns)."""
    import numpy as np
    import pyarrow as pa

    enc = label(batch["text"], batch["spans"], tokenizer, add_special_tokens, max_length)
    bounds = np.zeros(len(enc["length"]) + 1, dtype=np.int32)
    np.cumsum(enc["length"], out=bounds[1:])
    offsets = pa.array(bounds)
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(enc["input_ids"].astype(dtype))),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(enc["labels"].astype(dtype))),
        "length": pa.array(enc["length"].astype(np.int32)),
        "loss_tokens": pa.array(enc["loss_tokens"].astype(np.int32)),
        "truncated": pa.array(enc["truncated"].astype(np.int32)),
        "record": pa.array(batch["record"], pa.int64()),
    })


def label(texts: list[str], spans: list[list[int]], tokenizer, add_special_tokens: bool, max_length: int) -> dict:
    """Token ids, labels and offsets of a batch of texts, flattened into numpy arrays, truncated to `max_length`.

    The labelling rule: a token carries the loss if its characters overlap a loss-carrying span
    (token end > span start and token start < span end; a token with no characters overlaps
    nothing). A BPE token that merges the prompt's last space with the answer's first letters
    therefore trains. Vectorised over the whole batch: each example's character positions are
    shifted to be disjoint from the others', and one `searchsorted` finds each token's span.
    """
    import numpy as np

    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                    return_attention_mask=False, return_token_type_ids=False)  # lists nobody reads
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    n = len(texts)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=n)
    total = int(lengths.sum())
    flat_ids = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)
    flat_offs = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(offs)), dtype=np.int64,
                            count=2 * total).reshape(-1, 2)
    # example k's characters live in [base[k], base[k] + len(text k)); bases leave a gap between examples
    text_lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    base = np.zeros(n, dtype=np.int64)
    np.cumsum(text_lengths[:-1] + 1, out=base[1:])
    example = np.repeat(np.arange(n), lengths)
    start, end = flat_offs[:, 0] + base[example], flat_offs[:, 1] + base[example]
    span_counts = np.fromiter(map(len, spans), dtype=np.int64, count=n) // 2
    flat_spans = np.fromiter(itertools.chain.from_iterable(spans), dtype=np.int64,
                             count=2 * int(span_counts.sum())).reshape(-1, 2)
    flat_spans += np.repeat(base, span_counts)[:, None]
    first_after = np.searchsorted(flat_spans[:, 1], start, side="right")  # the first span ending after the start
    in_range = first_after < len(flat_spans)
    loss = np.zeros(total, dtype=bool)
    loss[in_range] = flat_spans[first_after[in_range], 0] < end[in_range]
    loss &= end > start
    # truncation: keep the first max_length tokens of each example
    first_token = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=first_token[1:])
    keep = (np.arange(total) - first_token[example]) < max_length
    kept_lengths = np.minimum(lengths, max_length)
    labels = np.where(loss, flat_ids, -100)[keep]
    return {"input_ids": flat_ids[keep], "labels": labels, "offsets": flat_offs[keep], "length": kept_lengths,
            "loss_tokens": np.bincount(example[keep & loss], minlength=n), "truncated": lengths - kept_lengths}


def processes(requested: int, rows: int) -> int:
    """`data.num_proc`, or for 0: one process per CPU core (at most 8), with at least 2,000 examples each."""
    if requested:
        return max(1, min(requested, rows))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8, rows // 2000))


def previews(text_file: Path, loss, tokenizer, add_special_tokens: bool, max_length: int) -> list:
    """The first two examples with loss (`loss`: tokens per example) as (text, carries_loss) pieces, truncated."""
    from datasets import Dataset

    texts, out = Dataset.from_file(str(text_file)), []
    for i in loss.nonzero()[0][:2].tolist():
        row = texts[i]
        enc = label([row["text"]], [row["spans"]], tokenizer, add_special_tokens, max_length)
        out.append(_pieces(row["text"], enc["labels"].tolist(), enc["offsets"].tolist()))
    return out


def _pieces(text: str, labels: list[int], offsets) -> list[tuple[str, bool]]:
    """The example's text cut where the loss starts and stops (for previews)."""
    pieces: list[tuple[str, bool]] = []
    shown = 0  # byte-level tokens of one character share its offsets: show it once
    for lab, (start, end) in zip(labels, offsets):
        start = max(start, shown)
        if end <= start:
            continue
        shown, loss = end, lab != -100
        if pieces and pieces[-1][1] == loss:
            pieces[-1] = (pieces[-1][0] + text[start:end], loss)
        else:
            pieces.append((text[start:end], loss))
    return pieces
