"""Labelled data for task fine-tuning: text classification, regression and token
classification (named entities), from CSV or JSONL files or the shipped sets.

    data = load_task_data("topics.csv", "classification", columns={"text": "sentence", "label": "y"})
    data.records     -> [{"text": str, "label": int}, ...]    (label: class id)
    data.label_names -> ["ai", "coding", ...]                   (id -> name; None for regression)
    load_task_data("sentiment", "regression")                   -> labels are floats
    load_task_data("entities", "token_classification")          -> [{"tokens": [...], "tags": [ids]}]

`columns` maps our field names (text, label, tokens, tags) to the file's; CSV rows are read with
the csv module (a token/tag cell is split on whitespace), JSONL rows are JSON objects (tokens
and tags lists, or whitespace-separated strings). Every record is checked before training:
a class id out of range, an unknown label name, a NaN or non-numeric regression target, tags
longer or shorter than the tokens, a missing field each raise a ValueError naming the file,
the record index (and line) and the field.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass

import torch

from fastllm.labels import IGNORE_INDEX

from .corpus import data_path
from .files import read_text_file

TASKS = ("classification", "regression", "token_classification")
# The shipped sets (fastllm/data/files, sources in CREDITS.md): name -> (file, task)
SHIPPED = {"topics": ("topics.csv", "classification"), "sentiment": ("sentiment.csv", "regression"),
           "entities": ("entities.jsonl", "token_classification")}
FIELDS = {"classification": ("text", "label"), "regression": ("text", "label"),
          "token_classification": ("tokens", "tags")}


@dataclass
class TaskData:
    """Checked records plus the label names (classification, tags) in id order."""

    records: list[dict]
    label_names: list[str] | None
    task: str
    source: str
    wheres: list[str]  # where each record came from ("'x.csv' record 3 (line 5)"), for later errors


def read_rows(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """(where, row) pairs from a .csv (header row, one record per row) or a .jsonl / .json
    file; `where` is e.g. "'x.csv' record 3 (line 5)"."""
    text = read_text_file(path)
    name = str(path)
    rows = []
    if name.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None:
            raise ValueError(f"data: {name!r}: empty CSV file (expected a header row naming the columns)")
        start = 2
        for i, row in enumerate(reader):
            if None in row:  # more cells than header columns
                raise ValueError(f"data: {name!r} record {i} (line {start}): {len(row) - 1 + len(row[None])} cells "
                                 f"but the header has {len(reader.fieldnames)} columns {reader.fieldnames}")
            rows.append((f"{name!r} record {i} (line {start})", row))
            start = reader.line_num + 1
    elif name.endswith(".jsonl"):
        index = 0
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"data: {name!r} record {index} (line {number}): not valid JSON ({exc.msg})") from None
            rows.append((f"{name!r} record {index} (line {number})", row))
            index += 1
    elif name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data: {name!r} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"data: {name!r}: expected a JSON list of records, got a {type(data).__name__}")
        rows = [(f"{name!r} record {i}", row) for i, row in enumerate(data)]
    else:
        raise ValueError(f"data: {name!r}: expected a .csv, .jsonl or .json file")
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"data: {where}: expected an object of fields, got {type(row).__name__} {row!r:.60}")
    return rows


def _field(row: dict, where: str, ours: str, columns: dict) -> object:
    theirs = columns.get(ours, ours)
    if theirs not in row:
        hint = "" if theirs != ours else f"; map it with columns.{ours}=<column>"
        raise ValueError(f"data: {where}: missing field {theirs!r} (has {sorted(row)}){hint}")
    return row[theirs]


def _words(value, where: str, name: str) -> list:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return value
    raise ValueError(f"data: {where}: field {name!r}: expected a list or a whitespace-separated string, got "
                     f"{type(value).__name__} {value!r:.60}")


def _class_id(value, where: str, name: str, label_names: list[str] | None, num_labels: int | None) -> int:
    """A class id from an int id, or from a label name (a CSV cell holding digits is an id
    when no names are known)."""
    if isinstance(value, str) and label_names is not None:
        if value not in label_names:
            raise ValueError(f"data: {where}: field {name!r}: unknown label {value!r}; expected one of {label_names}")
        return label_names.index(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"data: {where}: field {name!r}: expected a class id (integer) or a label name, got "
                         f"{type(value).__name__} {value!r:.60}")
    n = len(label_names) if label_names is not None else num_labels
    if n is not None and not 0 <= value < n:
        raise ValueError(f"data: {where}: field {name!r}: class id {value} out of range [0, {n})")
    if value < 0:
        raise ValueError(f"data: {where}: field {name!r}: class id {value} is negative")
    return value


def _target(value, where: str, name: str) -> float:
    try:
        number = float(value)
        if isinstance(value, bool):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"data: {where}: field {name!r}: expected a number (regression target), got "
                         f"{type(value).__name__} {value!r:.60}") from None
    if not math.isfinite(number):
        raise ValueError(f"data: {where}: field {name!r}: regression target is {value!r}; expected a finite number")
    return number


def _collect_names(rows, task: str, columns: dict) -> list[str] | None:
    """Label names in sorted order when the labels are strings and no names were given."""
    key = columns.get("label", "label") if task == "classification" else columns.get("tags", "tags")
    names = set()
    for where, row in rows:
        value = _field(row, where, "label" if task == "classification" else "tags", columns)
        values = _words(value, where, key) if task == "token_classification" else [value]
        for v in values:
            if isinstance(v, str) and not (task == "classification" and v.strip().lstrip("-").isdigit()):
                names.add(v)
    return sorted(names) if names else None


def load_task_data(source: str | os.PathLike, task: str, *, columns: dict | None = None,
                   labels: list[str] | None = None, num_labels: int | None = None) -> TaskData:
    """Read and check the records of `task` from a shipped set name (topics, sentiment,
    entities) or a .csv / .jsonl / .json file.

    columns: our field -> the file's column (text, label for sequence tasks; tokens, tags for
        token classification). labels: class / tag names in id order (kept in config.json);
        without them, string labels found in the data give the names in sorted order, and
        integer labels are ids (num_labels, when given, bounds them).
    Returns TaskData(records [{"text", "label"} or {"tokens", "tags"}], label_names, ...)."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {' | '.join(TASKS)}, got {task!r}")
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS[task]))
    if unknown:
        raise ValueError(f"columns: {unknown} are not fields of task {task!r}; expected keys among "
                         f"{list(FIELDS[task])}")
    if isinstance(source, str) and source in SHIPPED:
        file, shipped_task = SHIPPED[source]
        if shipped_task != task:
            raise ValueError(f"data: the shipped set {source!r} is for task {shipped_task!r}, not {task!r}")
        path = data_path(file)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data: {path!r} is neither a shipped set ({', '.join(SHIPPED)}) nor an "
                                    "existing .csv/.jsonl/.json file")
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"data: empty dataset ({path!r} holds no records)")
    label_names = list(labels) if labels else None
    if label_names is not None and len(set(label_names)) != len(label_names):
        raise ValueError(f"labels: names must be distinct, got {label_names}")
    if label_names is not None and num_labels is not None and num_labels != len(label_names):
        raise ValueError(f"num_labels: {num_labels} differs from the {len(label_names)} names in labels")
    if task != "regression" and label_names is None:
        label_names = _collect_names(rows, task, columns)
    records, wheres = [], []
    for where, row in rows:
        wheres.append(where)
        if task == "token_classification":
            tokens = _words(_field(row, where, "tokens", columns), where, columns.get("tokens", "tokens"))
            tags = _words(_field(row, where, "tags", columns), where, columns.get("tags", "tags"))
            tag_key = columns.get("tags", "tags")
            if len(tags) != len(tokens):
                raise ValueError(f"data: {where}: field {tag_key!r}: {len(tags)} tags for {len(tokens)} tokens; "
                                 "expected one tag per token")
            if not tokens:
                raise ValueError(f"data: {where}: field {columns.get('tokens', 'tokens')!r}: no tokens")
            for j, t in enumerate(tokens):
                if not isinstance(t, str) or not t.strip():
                    raise ValueError(f"data: {where}: field {columns.get('tokens', 'tokens')!r}[{j}]: expected a "
                                     f"non-empty string, got {t!r:.60}")
            ids = [_class_id(t, where, f"{tag_key}[{j}]", label_names, num_labels) for j, t in enumerate(tags)]
            records.append({"tokens": [str(t) for t in tokens], "tags": ids})
        else:
            text = _field(row, where, "text", columns)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"data: {where}: field {columns.get('text', 'text')!r}: expected a non-empty "
                                 f"string, got {text!r:.60}")
            value = _field(row, where, "label", columns)
            key = columns.get("label", "label")
            label = (_target(value, where, key) if task == "regression"
                     else _class_id(value, where, key, label_names, num_labels))
            records.append({"text": text, "label": label})
    return TaskData(records=records, label_names=label_names, task=task, source=str(source), wheres=wheres)




# --------------------------------------------------------------------------- tokenised examples

def _specials(tokenizer) -> tuple[list[int], list[int]]:
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else [],
            [tokenizer.eos_id] if tokenizer.eos_id is not None else [])


def encode_sequence(text: str, label, tokenizer, max_length: int) -> dict:
    """[bos] + text tokens + [eos] (those the tokenizer has), the text cut to fit max_length;
    label a class id or a float target."""
    head, tail = _specials(tokenizer)
    body = tokenizer.encode(text)[: max_length - len(head) - len(tail)]
    ids = head + body + tail
    dtype = torch.float32 if isinstance(label, float) else torch.long
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(label, dtype=dtype)}


def encode_tagged(tokens: list[str], tags: list[int], tokenizer, max_length: int, where: str = "record") -> dict:
    """Words encoded one by one: the first sub-token of a word carries its tag, continuations,
    bos and eos carry IGNORE_INDEX. A sentence longer than max_length tokens is an error (a
    cut would drop tags)."""
    head, tail = _specials(tokenizer)
    ids, labels = list(head), [IGNORE_INDEX] * len(head)
    for word, tag in zip(tokenizer.encode(list(tokens)), tags, strict=True):
        if not word:
            continue
        ids += word
        labels += [tag] + [IGNORE_INDEX] * (len(word) - 1)
    ids += tail
    labels += [IGNORE_INDEX] * len(tail)
    if len(ids) > max_length:
        raise ValueError(f"data: {where}: {len(ids)} tokens (with special tokens) exceed max_length={max_length}; "
                         "raise max_length or split the sentence")
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


class TaskDataset:
    """Tokenised task examples: {"input_ids" (T,), "labels" () class id / float target, or (T,)
    tags}; `collate` right-pads them into a batch with an attention_mask."""

    def __init__(self, records: list[dict], tokenizer, task: str, max_length: int, pad_id: int | None = None,
                 wheres: list[str] | None = None):
        if task not in TASKS:
            raise ValueError(f"task: expected one of {' | '.join(TASKS)}, got {task!r}")
        self.task = task
        self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer.pad_id is not None else 0)
        wheres = wheres or [f"record {i}" for i in range(len(records))]
        if task == "token_classification":
            self.items = [encode_tagged(r["tokens"], r["tags"], tokenizer, max_length, w)
                          for r, w in zip(records, wheres)]
        else:
            self.items = [encode_sequence(r["text"], float(r["label"]) if task == "regression" else r["label"],
                                          tokenizer, max_length) for r in records]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def collate(self, items: list[dict]) -> dict:
        return collate_task(items, self.pad_id)


def collate_task(items: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids (B, T), attention_mask (B, T); labels (B,) for sequence tasks or
    (B, T) tags padded with IGNORE_INDEX."""
    T = max(it["input_ids"].numel() for it in items)
    B = len(items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, it in enumerate(items):
        n = it["input_ids"].numel()
        input_ids[b, :n] = it["input_ids"]
        mask[b, :n] = 1
    if items[0]["labels"].dim() == 0:
        labels = torch.stack([it["labels"] for it in items])
    else:
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, it in enumerate(items):
            labels[b, : it["labels"].numel()] = it["labels"]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


__all__ = ["SHIPPED", "TASKS", "TaskData", "TaskDataset", "collate_task", "encode_sequence", "encode_tagged",
           "load_task_data", "read_rows"]
