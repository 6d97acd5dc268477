"""The data shipped inside the package (fastllm/data/files/, sources and licences in
files/CREDITS.md): two public-domain text corpora for pre-training, an instruction set for
SFT and a synthetic preference set for reward modelling.

    load_corpus("shakespeare")  -> list[str], 12 plays (about 1.5 MB of text)
    load_corpus("botchan")      -> list[str], 12 documents (the novel, chapter by chapter)
    load_instructions()         -> list[dict] {"category", "messages", "prompt", "response"}
    load_preferences()          -> list[dict] {"category", "prompt", "chosen", "rejected",
                                              "rejected_kind"}
"""

from __future__ import annotations

import gzip
import json
import os
import random
from importlib import resources

CORPORA = ("shakespeare", "botchan")
UNITS = ("document", "paragraph")


def data_path(name: str) -> str:
    """Filesystem path of a shipped data file (e.g. "CREDITS.md")."""
    path = resources.files("fastllm.data").joinpath("files", name)
    if not path.is_file():
        raise FileNotFoundError(f"name: no shipped data file {name!r}")
    return os.fspath(path)


def _read_jsonl(name: str) -> list[dict]:
    path = data_path(name)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_corpus(name: str = "shakespeare", unit: str = "document", with_titles: bool = False):
    """A shipped pre-training corpus.

    name: "shakespeare" (12 plays) or "botchan" (the novel by Natsume Soseki, per chapter).
    unit: "document" (one str per play / chapter) or "paragraph" (split at blank lines, for
        many short documents; empty paragraphs dropped).
    with_titles: return [{"title", "text"}] records instead of strings (unit="document" only).
    """
    if name not in CORPORA:
        raise ValueError(f"name: expected one of {CORPORA}, got {name!r}")
    if unit not in UNITS:
        raise ValueError(f"unit: expected one of {UNITS}, got {unit!r}")
    records = _read_jsonl(f"{name}.jsonl.gz")
    if with_titles:
        if unit != "document":
            raise ValueError("with_titles: only available with unit='document'")
        return records
    docs = [r["text"] for r in records]
    if unit == "paragraph":
        docs = [p.strip("\n") for d in docs for p in d.split("\n\n") if p.strip()]
    return docs


def load_instructions() -> list[dict]:
    """ChatterBot English conversations (2,025): {"category", "messages": [{"role",
    "content"}, ...], "prompt", "response"}, where prompt/response are the final user and
    assistant turns. Pass a record straight to `format_chat` / `build_sft_example`."""
    return _read_jsonl("instructions.jsonl")


def load_preferences() -> list[dict]:
    """Synthetic preference pairs (1,957): {"category", "prompt", "chosen", "rejected",
    "rejected_kind"}; chosen is the real answer, rejected an off-topic, word-shuffled or
    truncated one (files/CREDITS.md says how they were made)."""
    return _read_jsonl("preferences.jsonl")


def train_test_split(records: list, test_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Deterministic split: shuffle a copy with `seed`, the last test_fraction is the test set."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    if len(records) < 2:
        raise ValueError(f"records: need at least 2 records to split, got {len(records)}")
    items = list(records)
    random.Random(seed).shuffle(items)
    n_test = min(len(items) - 1, max(1, round(len(items) * test_fraction)))
    return items[:-n_test], items[-n_test:]
