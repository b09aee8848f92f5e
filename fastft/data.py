"""The one data pipeline every backend uses: read, format, tokenise, mask, truncate.

records (file, line, dict)  ->  segments [(text, carries_loss)]  ->  input_ids + labels

Formatting produces text segments flagged with whether they carry the loss; the
tokenizer's character offsets then decide each token's label. Two backends given one
recipe therefore see the same token ids and labels, because neither formats anything
itself. Every problem with the data is found here, before a model is loaded, and
reported with the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from fastft.errors import FastftError
from fastft.recipe import DataConfig, Recipe, template_fields

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
CHAT_ROLES = {"system", "user", "assistant", "tool"}


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


@dataclass
class Split:
    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)  # the record each example was made from, when known

    def __len__(self) -> int:
        return len(self.input_ids)

    def pick(self, indices: list[int]) -> Split:
        """The examples at `indices`, in that order."""
        return Split([self.input_ids[i] for i in indices], [self.labels[i] for i in indices],
                     [self.records[i] for i in indices] if self.records else [])

    def to_dataset(self):
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels})


@dataclass
class Prepared:
    train: Split
    eval: Split
    stats: dict
    previews: list[list[tuple[str, bool]]]  # first examples as (text, carries_loss) pieces, after truncation
    fingerprint: str


# --------------------------------------------------------------------------- reading


def read_records(paths: list[str], cfg: DataConfig) -> list[Record]:
    """Read every record of every file in `paths`, in order. Raises on unreadable files."""
    records: list[Record] = []
    for path in paths:
        before = len(records)
        if path.startswith("hf:"):
            records += _read_hub(path, cfg)
        else:
            records += _read_file(Path(path), cfg)
        if len(records) == before:
            raise FastftError(f"{path}: the dataset is empty. Point `data.path` at a file with at least one record.")
    return records


def _read_file(path: Path, cfg: DataConfig) -> list[Record]:
    if path.is_dir():
        raise FastftError(f"{path} is a folder; `data.path` takes files. List them: `path = [\"a.jsonl\", \"b.jsonl\"]`.")
    if not path.is_file():
        raise FastftError(f"{path}: data file not found. `data.path` is resolved relative to the recipe file; check it.")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [Record(str(path), i + 1, row) for i, row in enumerate(rows)]
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a BOM is tolerated, not required
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise FastftError(
            f"{path}, line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}). "
            "Re-save the file as UTF-8 (for example `iconv -f latin1 -t utf-8`)."
        ) from None
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                error = f"not valid JSON ({e.msg} at column {e.colno}); each line of a .jsonl file must be one JSON object"
                records.append(Record(str(path), n, {"__error__": error}))
                continue
            if not isinstance(obj, dict):
                obj = {"__error__": f"expected a JSON object, got {type(obj).__name__}"}
            records.append(Record(str(path), n, obj))
        return records
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise FastftError(f"{path}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}).") from None
        if not isinstance(items, list):
            raise FastftError(f"{path}: a .json dataset must be an array of objects; use .jsonl for one object per line.")
        return [Record(str(path), i + 1, x if isinstance(x, dict) else {"__error__": "expected a JSON object"})
                for i, x in enumerate(items)]
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [Record(str(path), reader.line_num, row) for row in reader]
    if suffix == ".txt":
        return [Record(str(path), n, {cfg.text_field: line})
                for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    raise FastftError(f"{path}: unsupported data file type `{suffix}`. Use .jsonl, .json, .csv, .parquet or .txt.")


def _read_hub(path: str, cfg: DataConfig) -> list[Record]:
    from datasets import load_dataset

    name = path.removeprefix("hf:")
    try:
        ds = load_dataset(name, cfg.config or None, split=cfg.split)
    except Exception as e:  # the hub raises many types; all mean "cannot get it"
        raise FastftError(f"data.path = \"{path}\": could not load the dataset ({e}). Check the id, "
                          "`data.split` and `data.config`, and the network.") from None
    return [Record(path, i + 1, row) for i, row in enumerate(ds)]


# --------------------------------------------------------------------------- formatting


def render(record: Record, cfg: DataConfig, tokenizer) -> list[tuple[str, bool]]:
    """Turn one record into text segments, each flagged with whether it carries the loss.

    Raises `RecordError` naming the file, line and field for a malformed record.
    """
    data = _fields(record, cfg)
    if cfg.format == "chat":
        return _render_chat(record, data, cfg, tokenizer)
    if cfg.format == "qa":
        names = template_fields(cfg.template)
        response = cfg.response_field or names[-1]
        values = {name: _text(record, data, name) for name in names}
        cut = cfg.template.index("{" + response)
        segments = [(cfg.template[:cut].format(**values), False), (cfg.template[cut:].format(**values), True)]
    elif cfg.format == "alpaca":
        instruction, output = _text(record, data, "instruction"), _text(record, data, "output")
        extra = _text(record, data, "input", required=False)
        prompt = (ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT).format(instruction=instruction, input=extra)
        segments = [(prompt, False), (output, True)]
    else:  # text: nothing is a prompt
        segments = [(_text(record, data, cfg.text_field), True)]
    if cfg.add_eos:
        segments.append((tokenizer.eos_token, True))
    return segments


def _fields(record: Record, cfg: DataConfig) -> dict:
    """The record's fields, with `data.field_map` applied. Raises `RecordError` for an unreadable record."""
    if "__error__" in record.data:
        raise RecordError(f"{record.where}: {record.data['__error__']}.")
    return {new: record.data[old] for new, old in cfg.field_map.items() if old in record.data} | record.data


def _text(record: Record, data: dict, name: str, required: bool = True) -> str:
    if name not in data or data[name] is None:
        if not required:
            return ""
        present = ", ".join(f"`{k}`" for k in data) or "none"
        raise RecordError(f"{record.where}: the record has no field `{name}` (it has {present}). "
                          f"Fix the record, or map a column to it with `data.field_map = {{{name} = \"column\"}}`.")
    value = data[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise RecordError(f"{record.where}: field `{name}` is a {type(value).__name__} ({_short(value)}), expected "
                          "text. Make it a string in the data.")
    return value


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _render_chat(record: Record, data: dict, cfg: DataConfig, tokenizer) -> list[tuple[str, bool]]:
    messages = data.get(cfg.messages_field)
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{record.where}: field `{cfg.messages_field}` must be a non-empty list of "
                          "{\"role\": ..., \"content\": ...} messages.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise RecordError(f"{record.where}: message {i + 1} must be an object with a text `content`.")
        if m.get("role") not in CHAT_ROLES:
            raise RecordError(f"{record.where}: message {i + 1} has unknown role {m.get('role')!r}; "
                              f"roles are {', '.join(sorted(CHAT_ROLES))}.")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(f"{record.where}: the conversation has no assistant message, so nothing would be learned.")
    if not tokenizer.chat_template:
        raise FastftError("`data.format = \"chat\"` needs a chat template, and this tokenizer has none. "
                          "Set `model.chat_template`, or use `qa`/`text` formatting.")

    def as_text(msgs, prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    # Each assistant turn is the text its message adds to the conversation so far; templates
    # render prefixes consistently, which is checked rather than assumed.
    full = as_text(messages)
    segments, done = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(as_text(messages[:k], prompt=True)), len(as_text(messages[: k + 1]))
        if not full.startswith(as_text(messages[: k + 1])) or start < done:
            raise FastftError("The chat template does not render conversations as prefixes of each other, so "
                              "assistant turns cannot be located for loss masking. Set `model.chat_template`.")
        segments += [(full[done:start], False), (full[start:end], True)]
        done = end
    segments.append((full[done:], False))
    return [s for s in segments if s[0]]


def render_prompt(text: str, cfg: DataConfig, tokenizer) -> str:
    """The text a model sees before its answer for a user prompt `text`, formatted exactly as in training."""
    if cfg.format == "chat":
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        messages.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if cfg.format == "qa":
        names = template_fields(cfg.template)
        response = cfg.response_field or names[-1]
        prompt_part = cfg.template[: cfg.template.index("{" + response)]
        return prompt_part.format(**{name: text for name in template_fields(prompt_part)})
    if cfg.format == "alpaca":
        return ALPACA_PROMPT.format(instruction=text)
    return text


def build_prompt(text: str, recipe: Recipe | None, tokenizer) -> tuple[str, list[int]]:
    """The prompt text and token ids for user text `text`, exactly as training put them before an answer.

    Chat templates write their own special tokens; other formats get the tokenizer's, as in
    `fastft.data.tokenize`. Without a recipe, `text` is used as is.
    """
    if recipe is None:
        return text, tokenizer(text)["input_ids"]
    prompt = render_prompt(text, recipe.data, tokenizer)
    return prompt, tokenizer(prompt, add_special_tokens=recipe.data.format != "chat")["input_ids"]


def stop_token_ids(recipe: Recipe | None, tokenizer) -> list[int]:
    """The token ids that end an answer: the one training put after every answer first, then the EOS.

    For chat data it is the first special token the chat template writes after an assistant
    message (e.g. <|im_end|>, <|eot_id|>), found by rendering a probe conversation through the
    data pipeline; for the other formats it is the tokenizer's EOS (`data.add_eos`).
    """
    ids = []
    if recipe is not None and recipe.data.format == "chat":
        probe = "fastft stop-token probe"
        messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": probe}]
        segments = render(Record("<probe>", 1, {recipe.data.messages_field: messages}), recipe.data, tokenizer)
        answer = next(text for text, loss in segments if loss)
        tail = tokenizer(answer[answer.index(probe) + len(probe):], add_special_tokens=False)["input_ids"]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        ids += [i for i in tail if i in special][:1]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def prompt_template(recipe: Recipe, tokenizer) -> str:
    """The training prompt with `{prompt}` where the user's text goes (the answer follows it)."""
    return build_prompt("{prompt}", recipe, tokenizer)[0]


def prompt_and_answer(record: Record, cfg: DataConfig, tokenizer) -> tuple[str, str]:
    """The text training put before the record's last answer, and that answer as the data gives it.

    The prompt is cut from `render`'s own output, so it is exactly what the model saw in training
    (system prompt, earlier turns and all). Raises `RecordError` as `render` does, and
    `FastftError` for `text` data, which has no prompts.
    """
    if cfg.format == "text":
        raise FastftError("`data.format = \"text\"` has no prompts and answers to compare. Evaluate qa, alpaca or "
                          "chat data.")
    segments = render(record, cfg, tokenizer)
    data = _fields(record, cfg)
    if cfg.format == "chat":
        last = max(i for i, (_, loss) in enumerate(segments) if loss)
        answer = [m["content"] for m in data[cfg.messages_field] if m.get("role") == "assistant"][-1]
        return "".join(text for text, _ in segments[:last]), answer
    response = "output" if cfg.format == "alpaca" else cfg.response_field or template_fields(cfg.template)[-1]
    return segments[0][0], _text(record, data, response)


# --------------------------------------------------------------------------- tokenising


def tokenize(segments_list: list[list[tuple[str, bool]]], tokenizer, train_on: str, chat: bool):
    """Token ids and labels (-100 where no loss) for each example, from character offsets."""
    if not segments_list:
        return []
    texts = ["".join(t for t, _ in segs) for segs in segments_list]
    # Chat templates write their own BOS; other formats get the tokenizer's special tokens.
    enc = tokenizer(texts, add_special_tokens=not chat, return_offsets_mapping=True)
    out = []
    for segs, ids, offsets in zip(segments_list, enc["input_ids"], enc["offset_mapping"]):
        spans, pos = [], 0
        for text, loss in segs:
            if loss or train_on == "all":
                spans.append((pos, pos + len(text)))
            pos += len(text)
        labels = [
            tok if end > start and any(a <= start < b for a, b in spans) else -100
            for tok, (start, end) in zip(ids, offsets)
        ]
        out.append((list(ids), labels, offsets))
    return out


def prepare(recipe: Recipe, tokenizer, echo=print) -> Prepared:
    """Read, format, tokenise and split the recipe's data; raise `FastftError` on any problem."""
    cfg = recipe.data
    train_records = read_records(cfg.path, cfg)
    eval_records = read_records(cfg.eval_path, cfg) if cfg.eval_path else []
    if cfg.format == "qa":
        _check_template_fields(train_records, cfg, recipe.source)
    stats: dict = {}
    skipped: list[tuple[Record, str]] = []  # with data.on_error = "skip": each bad record and why
    train, train_previews = _tokenize_records(train_records, recipe, tokenizer, stats, "train", skipped)
    evals, _ = _tokenize_records(eval_records, recipe, tokenizer, {}, "eval", skipped)
    stats["skipped_records"] = [r.where for r, _ in skipped]
    if cfg.eval_fraction:
        order = list(range(len(train)))
        random.Random(recipe.train.seed).shuffle(order)
        n_eval = max(1, math.ceil(len(order) * cfg.eval_fraction))
        evals, train = train.pick(sorted(order[:n_eval])), train.pick(sorted(order[n_eval:]))
    lengths = [len(x) for x in train.input_ids]
    loss_tokens = sum(sum(1 for t in lab if t != -100) for lab in train.labels)
    stats.update(
        train_examples=len(train), eval_examples=len(evals), train_tokens=sum(lengths), loss_tokens=loss_tokens,
        length_min=min(lengths), length_mean=round(statistics.fmean(lengths), 1), length_max=max(lengths),
        length_p95=sorted(lengths)[int(0.95 * (len(lengths) - 1))],
    )
    digest = hashlib.sha256()
    for ids, labels in zip(train.input_ids + evals.input_ids, train.labels + evals.labels):
        digest.update(json.dumps([ids, labels]).encode())
    if skipped:
        echo(describe_skipped(skipped, len(train_records) + len(eval_records)))
    return Prepared(train, evals, stats, train_previews, "sha256:" + digest.hexdigest()[:16])


def prepare_file(paths: list[str], recipe: Recipe, tokenizer, echo=print) -> Split:
    """Read, format and tokenise data files in the recipe's format as `prepare` does its eval data
    (`fastft eval --data`). Raises `FastftError` naming the file, line and field of a bad record."""
    cfg = recipe.data
    records = read_records(paths, cfg)
    if cfg.format == "qa":
        _check_template_fields(records, cfg, recipe.source)
    skipped: list[tuple[Record, str]] = []
    split, _ = _tokenize_records(records, recipe, tokenizer, {}, "eval", skipped)
    if skipped:
        echo(describe_skipped(skipped, len(records)))
    return split


def describe_skipped(skipped: list[tuple[Record, str]], total: int) -> str:
    """One warning naming how many records were skipped, their lines per file, and the first reason."""
    by_file: dict[str, list[int]] = {}
    for r, _ in skipped:
        by_file.setdefault(r.file, []).append(r.line)
    places = "; ".join(
        f"{file} line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines[:20]))}"
        + (f" and {len(lines) - 20} more" if len(lines) > 20 else "")
        for file, lines in by_file.items()
    )
    return (f"warning: skipped {len(skipped)} of {total} records with errors (data.on_error = \"skip\"): {places}. "
            f"The first: {skipped[0][1]}")


def _check_template_fields(records: list[Record], cfg: DataConfig, source: str) -> None:
    """A placeholder that no record has is a template mistake, not a data one: say so once."""
    import difflib

    seen = set()
    for r in records:
        seen |= set(r.data)
    seen |= {new for new, old in cfg.field_map.items() if old in seen}
    fields = sorted(seen - {"__error__"})
    for name in template_fields(cfg.template):
        if name not in seen:
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.5)
            raise FastftError(
                f"{source}: `data.template` uses `{{{name}}}`, but no record in {records[0].file} has a field `{name}`"
                + (f" (did you mean `{{{close[0]}}}`?)" if close else "")
                + f"; the records have {', '.join(f'`{k}`' for k in fields) or 'no fields'}. Fix the template, "
                f"or map a column with `data.field_map = {{{name} = \"column\"}}`."
            )


def _tokenize_records(records, recipe: Recipe, tokenizer, stats: dict, split: str, skipped: list):
    cfg = recipe.data
    segments, kept, first_skipped = [], [], len(skipped)
    for r in records:
        try:
            segments.append(render(r, cfg, tokenizer))
            kept.append(r)
        except RecordError as e:
            if cfg.on_error == "fail":
                raise FastftError(f"{e} Or set `data.on_error = \"skip\"` to skip bad records.") from None
            skipped.append((r, str(e)))
    if records and not segments:
        raise FastftError(f"{records[0].file}: all {len(records)} {split} records are bad, so nothing is left to train "
                          f"on. The first: {skipped[first_skipped][1]}")
    result, previews = Split(), []
    truncated = dropped_tokens = no_loss = 0
    tokenized = tokenize(segments, tokenizer, cfg.train_on, cfg.format == "chat")
    for record, segs, (ids, labels, offsets) in zip(kept, segments, tokenized):
        if len(ids) > cfg.max_length:
            truncated += 1
            dropped_tokens += len(ids) - cfg.max_length
            ids, labels, offsets = ids[: cfg.max_length], labels[: cfg.max_length], offsets[: cfg.max_length]
        if all(t == -100 for t in labels):
            no_loss += 1  # e.g. the answer was cut off entirely: nothing to learn
            continue
        result.input_ids.append(ids)
        result.labels.append(labels)
        result.records.append(record)
        if len(previews) < 2:
            previews.append(_pieces("".join(t for t, _ in segs), labels, offsets))
    if records and not result.input_ids:
        raise FastftError(
            f"{records[0].file}: no token of any {split} example carries the loss "
            f"({no_loss} examples; {truncated} were longer than `data.max_length` = {cfg.max_length}). "
            "Raise `data.max_length`, check `data.response_field`, or set `data.train_on = \"all\"`."
        )
    if split == "train":
        stats.update(truncated_examples=truncated, truncated_tokens=dropped_tokens, no_loss_examples=no_loss)
    return result, previews


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
