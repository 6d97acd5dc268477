"""The shipped data: contents, sizes, credits, the preference set's construction, and that
the package data settings ship every file."""

import os
import re
from fnmatch import fnmatch

import pytest
import tomllib

from fastllm.data import (
    data_path,
    load_corpus,
    load_instructions,
    load_preferences,
    train_test_split,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = os.path.dirname(data_path("CREDITS.md"))


def test_shakespeare():
    records = load_corpus("shakespeare", with_titles=True)
    assert len(records) == 12
    titles = [r["title"] for r in records]
    assert "Hamlet, Prince of Denmark" in titles and "Macbeth" in titles
    hamlet = records[titles.index("Hamlet, Prince of Denmark")]["text"]
    assert "To be, or not to be" in hamlet
    docs = load_corpus("shakespeare")
    assert docs == [r["text"] for r in records]
    assert 1_000_000 < sum(len(d) for d in docs) < 3_000_000
    paragraphs = load_corpus("shakespeare", unit="paragraph")
    assert len(paragraphs) > 10_000 and all(p.strip() and "\n\n" not in p for p in paragraphs)


def test_botchan():
    docs = load_corpus("botchan")
    assert len(docs) == 12  # front matter + 11 chapters
    assert docs[1].startswith("CHAPTER I\n\nBecause of an hereditary recklessness")
    # the Gutenberg header and licence trailer are gone
    assert not any("PROJECT GUTENBERG" in d or "Gutenberg License" in d for d in docs)
    paragraphs = load_corpus("botchan", unit="paragraph")
    assert len(paragraphs) > 500
    # hard-wrapped lines were rejoined: one line per paragraph, many longer than a 72-column line
    assert all("\n" not in p for p in paragraphs)
    assert sum(len(p) > 72 for p in paragraphs) > 300


def test_bad_corpus_arguments():
    with pytest.raises(ValueError, match="name: expected one of"):
        load_corpus("wikipedia")
    with pytest.raises(ValueError, match="unit: expected one of"):
        load_corpus("botchan", unit="sentence")
    with pytest.raises(ValueError, match="with_titles"):
        load_corpus("botchan", unit="paragraph", with_titles=True)
    with pytest.raises(FileNotFoundError, match="name: no shipped data file"):
        data_path("nothing.txt")


def test_instructions():
    records = load_instructions()
    assert len(records) == 2025
    assert len({r["category"] for r in records}) == 21
    for r in records:
        msgs = r["messages"]
        assert len(msgs) >= 2 and len(msgs) % 2 == 0
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert r["prompt"] == msgs[-2]["content"] and r["response"] == msgs[-1]["content"]
        assert all(m["content"].strip() for m in msgs)


def test_preferences_are_built_as_documented():
    instructions = load_instructions()
    answers = {}
    for r in instructions:
        if len(r["messages"]) == 2:
            answers.setdefault(r["prompt"], set()).add(r["response"])
    category_of = {r["response"]: r["category"] for r in instructions if len(r["messages"]) == 2}
    prefs = load_preferences()
    assert len(prefs) == sum(len(r["messages"]) == 2 for r in instructions)
    kinds = {"off_topic": 0, "shuffled": 0, "truncated": 0}
    for p in prefs:
        assert p["chosen"] in answers[p["prompt"]]
        assert p["rejected"] != p["chosen"]
        words = p["chosen"].split()
        kinds[p["rejected_kind"]] += 1
        if p["rejected_kind"] == "shuffled":
            assert len(words) >= 4 and sorted(p["rejected"].split()) == sorted(words)
        elif p["rejected_kind"] == "truncated":
            assert len(words) >= 6 and p["rejected"].endswith(" ...")
            kept = p["rejected"][:-4].split()
            assert kept == words[: len(kept)] and len(kept) < len(words)
        else:
            assert p["rejected_kind"] == "off_topic"
            assert category_of[p["rejected"]] != p["category"]
    assert all(n > 400 for n in kinds.values()), kinds


def test_credits_and_licences_are_shipped():
    credits = open(data_path("CREDITS.md"), encoding="utf-8").read()
    assert "CC-BY 2.5" in credits or "Creative Commons Attribution 2.5" in credits
    assert "Open Knowledge Foundation" in credits and "Gunther Cox" in credits
    assert "synthetic" in credits
    assert (
        "BSD" in open(data_path("LICENSE.chatterbot-corpus.txt"), encoding="utf-8").read()
        or "Redistribution and use"
        in open(data_path("LICENSE.chatterbot-corpus.txt"), encoding="utf-8").read()
    )
    assert (
        "Creative Commons Attribution"
        in open(data_path("LICENSE.shakespeare.txt"), encoding="utf-8").read()
    )


def test_package_data_ships_every_file_and_stays_small():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["fastllm"]
    names = sorted(os.listdir(FILES))
    assert names
    total = 0
    for name in names:
        rel = f"data/files/{name}"
        assert any(fnmatch(rel, g) for g in globs), f"{rel} is not matched by package-data {globs}"
        total += os.path.getsize(os.path.join(FILES, name))
    assert total < 4 * 2**20, f"shipped data is {total / 2**20:.1f} MiB"
    assert not [n for n in names if re.search(r"\.(py|pyc)$", n)]


def test_train_test_split_is_deterministic():
    records = list(range(100))
    train, test = train_test_split(records, 0.1, seed=3)
    assert len(test) == 10 and sorted(train + test) == records
    assert train_test_split(records, 0.1, seed=3) == (train, test)
    assert train_test_split(records, 0.1, seed=4) != (train, test)
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(records, 1.0)
    with pytest.raises(ValueError, match="records: need at least 2"):
        train_test_split([1], 0.5)
