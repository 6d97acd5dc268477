"""Bad data files, as a user passes them to sft/pretrain: the error names the file, the line
(or record) and the field, and says what was expected."""

import json

import pytest

from fastllm.data import SFTDataset
from fastllm.train.build import read_records, read_texts


def _write(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


GOOD = json.dumps({"prompt": "hi", "response": "hello"})


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", f"{GOOD}\n\n{GOOD}\n{{\"prompt\": \"a\" \"response\": \"b\"}}\n",
     r"bad\.jsonl' line 4: not valid JSON \(Expecting ',' delimiter\); a \.jsonl file holds one JSON object"),
    ("plain.json", "Hello there.\nGeneral Kenobi.\n",
     r"plain\.json' line 1 column 1: not valid JSON .*expected a JSON list of records"),
    ("plain.jsonl", "Hello there.\n", r"plain\.jsonl' line 1: not valid JSON"),
    ("types.jsonl", f"{GOOD}\n" + json.dumps({"prompt": 3, "response": "x"}),
     r"types\.jsonl' line 2: field 'prompt': expected a string, got int 3"),
    ("missing.jsonl", json.dumps({"prompt": "x", "answer": "y"}),
     r"missing\.jsonl' line 1: missing field 'response' \(a record needs 'prompt' and 'response', or 'messages'"),
    ("msgs.jsonl", json.dumps({"messages": [{"role": "user", "content": ["x"]}]}),
     r"msgs\.jsonl' line 1: field 'messages\[0\]\.content': expected a string, got list"),
    ("list.json", json.dumps([{"prompt": "a", "response": "b"}, "just text"]),
     r"list\.json' record 1: expected a JSON object .*got str"),
    ("dict.json", json.dumps({"prompt": "a", "response": "b"}),
     r"dict\.json': expected a JSON list of records, got a dict"),
    ("binary.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00", r"binary\.jsonl' is not UTF-8 text \(byte 0, line 1"),
])
def test_sft_record_files(tmp_path, name, content, message):
    with pytest.raises(ValueError, match=message):
        read_records(_write(tmp_path, name, content))


def test_text_files(tmp_path):
    good = _write(tmp_path, "a.txt", "some text\n")
    binary = _write(tmp_path, "b.txt", b"line one\nline two\n\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=r"data: '.*b\.txt' is not UTF-8 text \(byte 18, line 3: .*pass a text file"):
        read_texts([good, binary])
    with pytest.raises(FileNotFoundError, match=r"data: '.*nope\.txt' is neither a shipped corpus"):
        read_texts([good, str(tmp_path / "nope.txt")])
    assert read_texts([good]) == ["some text\n"]


def test_records_from_python_name_the_field(botchan_tokenizer):
    tok = botchan_tokenizer
    with pytest.raises(TypeError, match=r"records\[1\]: conversation\['response'\]: expected str, got int"):
        SFTDataset([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 7}], tok, 64)


def test_cli_sft_bad_file_names_line(tmp_path):
    from tests.train.conftest import run_cli

    data = _write(tmp_path, "chat.jsonl", f"{GOOD}\n{{oops\n")
    res = run_cli(["sft", f"data={data}", f"output_dir={tmp_path / 'out'}", "max_steps=1", "progress=false"],
                  timeout=120)
    assert res.returncode != 0
    assert "chat.jsonl' line 2: not valid JSON" in res.stderr and "Traceback" not in res.stderr


def test_preference_records_name_file_line_and_field(tmp_path):
    from fastllm.train import build

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl' line 2: missing field 'rejected'"):
        build.read_records(str(path), kind="preference")
    path.write_text('{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    with pytest.raises(ValueError, match=r"line 1: field 'chosen': expected a string, got int 3"):
        build.read_records(str(path), kind="preference")
    assert len(build.read_records("preferences", kind="preference")) == 1957
