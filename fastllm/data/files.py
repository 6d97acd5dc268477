"""Reading the user's data files with errors that name the file, the line and the field.

    read_text_file("corpus.txt")        -> str (UTF-8; a binary file is a ValueError saying so)
    read_records_file("chat.jsonl")     -> list of records; .jsonl: one JSON object per line,
                                           otherwise one JSON list of objects
    check_chat_record(record, "chat.jsonl line 3")  -> the same checks SFT examples need
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping


def read_text_file(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file; a file that is not text says so and what to pass instead."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"data: {str(path)!r} is not UTF-8 text (byte {exc.start}, line {line}: "
                         f"{raw[exc.start:exc.start + 4]!r}); pass a text file, or token ids as a .bin file "
                         "(with bin_dtype)") from None


def _decode_error(path, exc: json.JSONDecodeError, line: int | None = None) -> ValueError:
    where = f"line {line}" if line is not None else f"line {exc.lineno} column {exc.colno}"
    return ValueError(f"data: {str(path)!r} {where}: not valid JSON ({exc.msg})")


def read_records_file(path: str | os.PathLike, check=None) -> list:
    """Records from a .jsonl file (one JSON object per line; blank lines skipped) or a .json
    file (a list of objects). Each is checked with `check(record, where)` (default
    check_chat_record; check_preference_record for preference pairs), naming its line."""
    check = check_chat_record if check is None else check
    text = read_text_file(path)
    records, where = [], []
    if str(path).endswith(".jsonl"):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                err = _decode_error(path, exc, number)
                raise ValueError(f"{err}; a .jsonl file holds one JSON object per line, e.g. "
                                 '{"prompt": "...", "response": "..."}') from None
            where.append(f"{str(path)!r} line {number}")
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{_decode_error(path, exc)}; expected a JSON list of records (or a .jsonl file with "
                             "one record per line)") from None
        if not isinstance(data, list):
            raise ValueError(f"data: {str(path)!r}: expected a JSON list of records, got a "
                             f"{type(data).__name__}")
        records = data
        where = [f"{str(path)!r} record {i}" for i in range(len(data))]
    for record, at in zip(records, where):
        check(record, at)
    return records


def check_preference_record(record, where: str) -> None:
    """A preference pair: {"prompt": str, "chosen": str, "rejected": str}; otherwise a
    ValueError naming `where` and the field."""
    fields = ("prompt", "chosen", "rejected")
    if not isinstance(record, Mapping):
        raise ValueError(f"data: {where}: expected a JSON object with {', '.join(map(repr, fields))}, got "
                         f"{type(record).__name__} {record!r:.60}")
    missing = [k for k in fields if k not in record]
    if missing:
        raise ValueError(f"data: {where}: missing field{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))} "
                         f"(a preference pair needs 'prompt', 'chosen' and 'rejected'; has {sorted(record)})")
    for key in fields:
        if not isinstance(record[key], str):
            raise ValueError(f"data: {where}: field {key!r}: expected a string, got "
                             f"{type(record[key]).__name__} {record[key]!r:.60}")


def check_chat_record(record, where: str) -> None:
    """A record for SFT: {"prompt": str, "response": str} or {"messages": [{"role": str,
    "content": str}, ...]}; otherwise a ValueError naming `where` and the field."""
    if not isinstance(record, Mapping):
        raise ValueError(f"data: {where}: expected a JSON object with 'prompt' and 'response' or 'messages', got "
                         f"{type(record).__name__} {record!r:.60}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"data: {where}: field 'messages': expected a non-empty list of "
                             f"{{'role', 'content'}} objects, got {messages!r:.60}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"data: {where}: field 'messages[{i}]': expected an object with 'role' and "
                                 f"'content', got {m!r:.60}")
            for key in ("role", "content"):
                if key not in m:
                    raise ValueError(f"data: {where}: field 'messages[{i}]': missing key {key!r} "
                                     f"(has {sorted(m)})")
                if not isinstance(m[key], str):
                    raise ValueError(f"data: {where}: field 'messages[{i}].{key}': expected a string, got "
                                     f"{type(m[key]).__name__} {m[key]!r:.60}")
        return
    missing = [k for k in ("prompt", "response") if k not in record]
    if missing:
        raise ValueError(f"data: {where}: missing field{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))} "
                         f"(a record needs 'prompt' and 'response', or 'messages'; has {sorted(record)})")
    for key in ("prompt", "response"):
        if not isinstance(record[key], str):
            raise ValueError(f"data: {where}: field {key!r}: expected a string, got "
                             f"{type(record[key]).__name__} {record[key]!r:.60}")
