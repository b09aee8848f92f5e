"""The one data pipeline every backend uses: read, format, tokenise, mask, truncate, cache.

records (file, line, dict)  ->  segments [(text, carries_loss)]  ->  input_ids + labels (Arrow, cached)

Formatting produces text segments flagged with whether they carry the loss; the
tokenizer's character offsets then decide each token's label (`fastft.tokenized`, which
also keeps the result in the data cache, so an unchanged input is tokenised once). Two
backends given one recipe therefore see the same token ids and labels, because neither
formats anything itself. Every problem with the data is found here, before a model is
loaded, and reported with the file and line (`fastft.records` reads the files).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from fastft import tokenized
from fastft.tokenized import loss_spans, tokenize  # noqa: F401 (tokenize is re-exported)
from fastft.errors import FastftError
from fastft.recipe import DataConfig, Recipe, template_fields
from fastft.records import Record, RecordError, iter_records, load_hub, read_records  # noqa: F401 (re-exported)

ALPACA_PROMPT = (  # alpaca-lora's: Stanford Alpaca's with a newline after "### Response:"
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
CHAT_ROLES = {"system", "user", "assistant", "tool"}


class Split:
    """One split of the prepared data: a `datasets.Dataset` with `input_ids`, `labels` (-100 where no loss)
    and `length`, memory-mapped from the data cache, plus the lengths as a numpy array.

    `Split(input_ids, labels)` makes one from lists (tests). The `input_ids` and `labels` properties
    read the whole split into Python lists, and `records` reads the data files again: for tests,
    `fastft eval` and small data only.
    """

    def __init__(self, input_ids: list | None = None, labels: list | None = None, records: list | None = None, *,
                 dataset=None, lengths=None, source: tuple | None = None, record_numbers=None):
        import numpy as np

        if dataset is None:
            from datasets import Dataset

            input_ids, labels = input_ids or [], labels or []
            dataset = Dataset.from_dict({"input_ids": input_ids, "labels": labels,
                                         "length": [len(x) for x in input_ids]})
        self.dataset = dataset
        self.lengths = np.asarray(lengths if lengths is not None else [len(x) for x in self.input_ids], dtype=np.int64)
        # where the examples came from: the records themselves, or (paths, DataConfig) and each one's record number
        self._records, self.source, self.record_numbers = records, source, record_numbers

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def input_ids(self) -> list[list[int]]:
        return self.dataset.select_columns(["input_ids"])[:]["input_ids"] if len(self) else []

    @property
    def labels(self) -> list[list[int]]:
        return self.dataset.select_columns(["labels"])[:]["labels"] if len(self) else []

    @property
    def records(self) -> list[Record]:
        """The record each example was made from (read again from the data files), in the split's order."""
        if self._records is not None or self.source is None:
            return self._records or []
        wanted = {int(n): i for i, n in enumerate(self.record_numbers)}
        found: list = [None] * len(wanted)
        for n, record in enumerate(iter_records(*self.source)):
            if n in wanted:
                found[wanted[n]] = record
        return found

    def to_dataset(self):
        return self.dataset


@dataclass
class Prepared:
    train: Split
    eval: Split
    stats: dict
    previews: list[list[tuple[str, bool]]]  # first examples as (text, carries_loss) pieces, after truncation
    fingerprint: str


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

    With BPE the first answer token can start inside the prompt (`" La"` after `"Answer:"`): the prompt is tokenised
    with a probe answer (a word) as training does and cut before the first loss-carrying token. No recipe: `text`.
    """
    if recipe is None:
        return text, tokenizer(text)["input_ids"]
    cfg, prompt = recipe.data, render_prompt(text, recipe.data, tokenizer)
    if cfg.format == "text":  # a continuation: nothing marks where an answer starts
        return prompt, tokenizer(prompt)["input_ids"]
    ((ids, labels, offsets),) = tokenize([[(prompt, False), ("Answer", True)]], tokenizer, "completion", cfg.format == "chat")
    first = next(i for i, label in enumerate(labels) if label != -100)
    return prompt[: offsets[first][0]], list(ids[:first])


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


def prepare(recipe: Recipe, tokenizer, echo=print) -> Prepared:
    """Read, format, tokenise and split the recipe's data; raise `FastftError` on any problem.

    The tokenised data is built once per input into the data cache (`fastft.tokenized`) and
    loaded from there afterwards; under torchrun one process per machine builds it.
    """
    cached, key = _load_or_build(recipe, tokenizer, echo)
    return _split(recipe, cached, key, echo)


def prepare_file(paths: list[str], recipe: Recipe, tokenizer, echo=print) -> Split:
    """Read, format and tokenise data files in the recipe's format as `prepare` does its eval data
    (`fastft eval --data`). Raises `FastftError` naming the file, line and field of a bad record."""
    import dataclasses

    import numpy as np

    cfg = dataclasses.replace(recipe.data, path=[], eval_path=list(paths), eval_fraction=0.0)
    cached, _ = _load_or_build(dataclasses.replace(recipe, data=cfg), tokenizer, echo)
    if cached["skipped"]:
        echo(describe_skipped([(Record(f, n, {}), why) for f, n, why in cached["skipped"]], cached["records"]))
    ds = cached["eval"]
    return _take(ds, np.flatnonzero(ds.data.column("loss_tokens").to_numpy()), (cfg.eval_path, cfg))


def _load_or_build(recipe: Recipe, tokenizer, echo) -> tuple[dict, str]:
    from fastft.distributed import local_main_first

    cfg = recipe.data
    section = recipe.to_dict()["data"]
    section["hub_fingerprints"] = [tokenized.hub_fingerprint(load_hub(p, cfg))
                                   for p in cfg.path + cfg.eval_path if p.startswith("hf:")]
    key = tokenized.cache_key(cfg.path + cfg.eval_path, section, tokenizer)
    with local_main_first():  # the others wait, then load what it published
        cached = tokenized.load(key)
        if cached is None:
            cached = _build(recipe, tokenizer, key, echo)
        else:
            echo(f"data: loaded from the cache in {cached['folder']} (unchanged since an earlier run tokenised it)")
    return cached, key


def _build(recipe: Recipe, tokenizer, key: str, echo) -> dict:
    """Format and tokenise the data into a temporary cache folder, check it, publish it; return it loaded."""
    import shutil
    import time

    started, cfg = time.time(), recipe.data
    tmp = tokenized.new_build_folder(key)
    try:
        skipped: list[tuple[Record, str]] = []  # with data.on_error = "skip": each bad record and why
        train = _render_split(cfg.path, recipe, tokenizer, tmp / "train-text.arrow", "train", skipped)
        evals = _render_split(cfg.eval_path, recipe, tokenizer, tmp / "eval-text.arrow", "eval", skipped)
        first = train if train["records"] else evals  # (only evals for `prepare_file`)
        if cfg.format == "qa" and first["records"]:
            _check_template_fields(first["seen"], first["first_file"], cfg, recipe.source)
        meta = {"skipped": [[r.file, r.line, why] for r, why in skipped], "previews": [],
                "records": train["records"] + evals["records"], "train_files": [], "eval_files": []}
        rows = 0
        for split, done in (("train", train), ("eval", evals)):
            _raise_record_errors(done, split, cfg, skipped)
            if not done["records"]:
                continue
            ds = tokenized.tokenize_file(
                tmp / f"{split}-text.arrow", split, tokenizer, add_special_tokens=cfg.format != "chat",
                max_length=cfg.max_length, num_proc=tokenized.processes(cfg.num_proc, done["rows"]),
                desc=f"Tokenising {split} data")
            loss = ds.data.column("loss_tokens").to_numpy()
            if not loss.any():
                truncated = int((ds.data.column("truncated").to_numpy() > 0).sum())
                raise FastftError(
                    f"{done['first_file']}: no token of any {split} example carries the loss "
                    f"({len(loss)} examples; {truncated} were longer than `data.max_length` = {cfg.max_length}). "
                    "Raise `data.max_length`, check `data.response_field`, or set `data.train_on = \"all\"`."
                )
            if split == "train":
                meta["previews"] = tokenized.previews(tmp / "train-text.arrow", loss, tokenizer, cfg.format != "chat",
                                                      cfg.max_length)
            meta[f"{split}_files"] = [Path(f["filename"]).name for f in ds.cache_files]
            rows += len(ds)
            del ds
        for f in tmp.glob("*-text.arrow"):
            f.unlink()
        tokenized.publish(tmp, key, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or killed build leaves nothing to trust
        raise
    cached = tokenized.load(key)
    echo(f"data: tokenised {rows:,} examples in {time.time() - started:.1f} s; cached in {cached['folder']}")
    return cached


def _render_split(paths: list[str], recipe: Recipe, tokenizer, out: Path, split: str, skipped: list) -> dict:
    """Format every record of `paths` into `out` (text and loss spans) as it is read.

    With `data.on_error = "fail"` the first bad record is kept, not raised: reading goes on, so
    that an error about a whole file or the template is reported first, as it always was.
    """
    from tqdm.auto import tqdm

    cfg, writer = recipe.data, tokenized.TextWriter(out)
    done = {"records": 0, "rows": 0, "seen": set(), "first_file": "", "first_error": None,
            "first_skipped": len(skipped)}
    try:
        bar = tqdm(iter_records(paths, cfg), desc=f"Formatting {split} data", unit=" examples", mininterval=1.0,
                   delay=0 if tokenized.show_progress(0) else 3)  # a bar only if it takes a while
        for r in bar:
            done["records"] += 1
            done["first_file"] = done["first_file"] or r.file
            if cfg.format == "qa":
                done["seen"].update(r.data)
            if done["first_error"]:
                continue
            try:
                segments = render(r, cfg, tokenizer)
            except RecordError as e:
                if cfg.on_error == "fail":
                    done["first_error"] = e
                else:
                    skipped.append((r, str(e)))
                continue
            writer.add("".join(t for t, _ in segments), loss_spans(segments, cfg.train_on), done["records"] - 1)
    finally:
        writer.close()
    done["rows"] = writer.rows
    return done


def _raise_record_errors(done: dict, split: str, cfg: DataConfig, skipped: list) -> None:
    if done["first_error"]:
        raise FastftError(f"{done['first_error']} Or set `data.on_error = \"skip\"` to skip bad records.")
    if done["records"] and not done["rows"]:
        raise FastftError(f"{done['first_file']}: all {done['records']} {split} records are bad, so nothing is left "
                          f"to train on. The first: {skipped[done['first_skipped']][1]}")


def _split(recipe: Recipe, cached: dict, key: str, echo) -> Prepared:
    """The train and eval splits of the cached data, their statistics and fingerprint (cheap: no token is read)."""
    import numpy as np

    cfg = recipe.data

    def numbers(ds, name):
        return ds.data.column(name).to_numpy() if ds is not None else np.zeros(0, dtype=np.int32)

    train_ds, eval_ds, eval_source = cached["train"], cached["eval"], (cfg.eval_path, cfg)
    kept = np.flatnonzero(numbers(train_ds, "loss_tokens"))
    train_rows, eval_rows = kept, np.flatnonzero(numbers(eval_ds, "loss_tokens"))
    seed = ""
    if cfg.eval_fraction:
        order = list(range(len(kept)))
        random.Random(recipe.train.seed).shuffle(order)
        held = np.zeros(len(kept), dtype=bool)
        held[order[: max(1, math.ceil(len(order) * cfg.eval_fraction))]] = True
        train_rows, eval_rows, eval_ds, seed = kept[~held], kept[held], train_ds, f":seed={recipe.train.seed}"
        eval_source = (cfg.path, cfg)
    train, evals = _take(train_ds, train_rows, (cfg.path, cfg)), _take(eval_ds, eval_rows, eval_source)
    lengths, truncated = train.lengths, numbers(train_ds, "truncated")
    skipped = [(Record(file, line, {}), why) for file, line, why in cached["skipped"]]
    stats = dict(
        truncated_examples=int((truncated > 0).sum()), truncated_tokens=int(truncated.sum()),
        no_loss_examples=len(truncated) - len(kept), skipped_records=[r.where for r, _ in skipped],
        train_examples=len(train), eval_examples=len(evals), train_tokens=int(lengths.sum()),
        loss_tokens=int(numbers(train_ds, "loss_tokens")[train_rows].sum()),
        length_min=int(lengths.min()), length_mean=round(float(lengths.mean()), 1), length_max=int(lengths.max()),
        length_p95=int(np.sort(lengths)[int(0.95 * (len(lengths) - 1))]),
    )
    if skipped:
        echo(describe_skipped(skipped, cached["records"]))
    previews = [[tuple(piece) for piece in p] for p in cached["previews"]]  # JSON made the pieces lists
    fingerprint = "sha256:" + hashlib.sha256(f"{key}{seed}".encode()).hexdigest()[:16]
    return Prepared(train, evals, stats, previews, fingerprint)


def _take(ds, rows, source: tuple) -> Split:
    """The examples at `rows` of a cached token table, as a Split (no token is read)."""
    if ds is None or not len(rows):
        return Split()
    lengths, numbers = (ds.data.column(name).to_numpy()[rows] for name in ("length", "record"))
    ds = ds.select_columns(["input_ids", "labels", "length"])
    return Split(dataset=ds if len(rows) == len(ds) else ds.select(rows), lengths=lengths, source=source,
                 record_numbers=numbers)


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


def _check_template_fields(seen: set, first_file: str, cfg: DataConfig, source: str) -> None:
    """A placeholder that no record has (`seen`: every record's fields) is a template mistake, not a data one."""
    import difflib

    seen = seen | {new for new, old in cfg.field_map.items() if old in seen}
    fields = sorted(seen - {"__error__"})
    for name in template_fields(cfg.template):
        if name not in seen:
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.5)
            raise FastftError(
                f"{source}: `data.template` uses `{{{name}}}`, but no record in {first_file} has a field `{name}`"
                + (f" (did you mean `{{{close[0]}}}`?)" if close else "")
                + f"; the records have {', '.join(f'`{k}`' for k in fields) or 'no fields'}. Fix the template, "
                f"or map a column with `data.field_map = {{{name} = \"column\"}}`."
            )
