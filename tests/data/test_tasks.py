"""Task data loaders: CSV / JSONL with a column mapping, the shipped sets, and the checks that
name the record and the field before training."""

from __future__ import annotations

import json

import pytest

from fastllm.data import TaskDataset, collate_task, load_corpus, load_task_data
from fastllm.labels import IGNORE_INDEX
from fastllm.tokenizer import Tokenizer


def _csv(tmp_path, text: str, name="d.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_csv_with_column_mapping_and_label_names(tmp_path):
    path = _csv(tmp_path, 'sentence,y\n"hello, world",pos\nbad day,neg\n"multi\nline",pos\n')
    data = load_task_data(path, "classification", columns={"text": "sentence", "label": "y"})
    assert data.label_names == ["neg", "pos"]  # sorted names found in the data
    assert [r["label"] for r in data.records] == [1, 0, 1]
    assert data.records[0]["text"] == "hello, world" and data.records[2]["text"] == "multi\nline"
    given = load_task_data(path, "classification", columns={"text": "sentence", "label": "y"},
                           labels=["pos", "neg"])
    assert [r["label"] for r in given.records] == [0, 1, 0]


def test_jsonl_regression_and_tokens(tmp_path):
    reg = load_task_data(_jsonl(tmp_path, [{"text": "a", "label": 1.5}, {"text": "b", "label": "-2"}]), "regression")
    assert [r["label"] for r in reg.records] == [1.5, -2.0] and reg.label_names is None
    rows = [{"words": ["Ann", "lives", "in", "Oslo"], "ner": ["B-PER", "O", "O", "B-LOC"]},
            {"words": "Bob sleeps", "ner": "B-PER O"}]
    tok = load_task_data(_jsonl(tmp_path, rows, "t.jsonl"), "token_classification",
                         columns={"tokens": "words", "tags": "ner"})
    assert tok.label_names == ["B-LOC", "B-PER", "O"]
    assert tok.records[1] == {"tokens": ["Bob", "sleeps"], "tags": [1, 2]}


def test_shipped_sets():
    topics = load_task_data("topics", "classification")
    assert topics.label_names == ["ai", "coding", "psychology", "trivia"] and len(topics.records) == 361
    sentiment = load_task_data("sentiment", "regression")
    assert len(sentiment.records) == 1000 and all(-4 <= r["label"] <= 4 for r in sentiment.records)
    entities = load_task_data("entities", "token_classification")
    assert set(entities.label_names) == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"}
    with pytest.raises(ValueError, match="'topics' is for task 'classification'"):
        load_task_data("topics", "regression")


@pytest.mark.parametrize("task, rows, kwargs, message", [
    ("classification", [{"text": "a", "label": 0}, {"text": "b", "label": 3}], {"num_labels": 3},
     r"record 1 \(line 2\): field 'label': class id 3 out of range \[0, 3\)"),
    ("classification", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}], {"labels": ["neg", "pos"]},
     r"record 1 \(line 2\): field 'label': unknown label 'meh'"),
    ("regression", [{"text": "a", "label": 1.0}, {"text": "b", "label": 2.0}, {"text": "c", "label": "nan"}], {},
     r"record 2 \(line 3\): field 'label': regression target is 'nan'"),
    ("regression", [{"text": "a", "label": "high"}], {}, r"record 0 \(line 1\): field 'label': expected a number"),
    ("token_classification", [{"tokens": ["a", "b"], "tags": ["O", "O", "O"]}], {},
     r"record 0 \(line 1\): field 'tags': 3 tags for 2 tokens"),
    ("token_classification", [{"tokens": ["a", "b"], "tags": ["O", "O"]}, {"tokens": ["a", "b"], "tags": ["O"]}],
     {}, r"record 1 \(line 2\): field 'tags': 1 tags for 2 tokens"),
    ("token_classification", [{"tokens": ["a"], "tags": ["B-XYZ"]}], {"labels": ["O", "B-PER"]},
     r"record 0 \(line 1\): field 'tags\[0\]': unknown label 'B-XYZ'"),
    ("classification", [{"text": "a"}], {}, r"record 0 \(line 1\): missing field 'label'"),
])
def test_bad_records_name_record_and_field(tmp_path, task, rows, kwargs, message):
    path = _jsonl(tmp_path, rows)
    with pytest.raises(ValueError, match=message) as err:
        load_task_data(path, task, **kwargs)
    assert "d.jsonl" in str(err.value)


def test_csv_errors_name_the_line(tmp_path):
    path = _csv(tmp_path, 'text,label\n"two\nlines",1\nx,nan\n')
    with pytest.raises(ValueError, match=r"'.*d.csv' record 1 \(line 4\): field 'label': regression target"):
        load_task_data(path, "regression")
    with pytest.raises(ValueError, match=r"missing field 'label'.*columns.label="):
        load_task_data(_csv(tmp_path, "text,score\na,1\n", "e.csv"), "regression")


def test_tagged_words_align_to_first_subtoken(tmp_path):
    tok = Tokenizer.train([load_corpus("shakespeare")[0][:20_000]], vocab_size=400)
    words, tags = ["quickly", "fox", "xylophone"], [4, 5, 6]
    ds = TaskDataset([{"tokens": words, "tags": tags}], tok, "token_classification", max_length=64)
    item = ds[0]
    pieces = tok.encode(words)
    assert item["input_ids"].tolist() == [tok.bos_id] + [i for p in pieces for i in p] + [tok.eos_id]
    expected = [IGNORE_INDEX]
    for p, t in zip(pieces, tags):
        expected += [t] + [IGNORE_INDEX] * (len(p) - 1)
    assert item["labels"].tolist() == expected + [IGNORE_INDEX]
    assert any(len(p) > 1 for p in pieces)  # the test covers continuations
    with pytest.raises(ValueError, match=r"record 0: .* exceed max_length=4"):
        TaskDataset([{"tokens": words, "tags": tags}], tok, "token_classification", max_length=4)
    batch = collate_task([item, TaskDataset([{"tokens": ["fox"], "tags": [1]}], tok, "token_classification",
                                            64)[0]], tok.pad_id)
    n = item["input_ids"].numel()
    assert batch["attention_mask"][1].sum() < n and (batch["labels"][1][batch["attention_mask"][1] == 0]
                                                      == IGNORE_INDEX).all()
