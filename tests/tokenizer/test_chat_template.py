"""The chat template: exact rendering, prompt/full consistency, accepted forms, bad input."""

import pytest

from fastllm.tokenizer import format_chat, format_prompt


def test_single_turn_renders_exactly():
    prompt, full = format_chat(("What is 2+2?", "4"))
    assert prompt == "<|user|>\nWhat is 2+2?\n<|assistant|>\n"
    assert full == prompt + "4"


def test_all_forms_agree_and_prompt_matches_generation_prompt():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    expected = format_chat(("Hi", "Hello!"))
    assert format_chat(messages) == expected
    assert format_chat({"messages": messages}) == expected
    assert format_chat({"prompt": "Hi", "response": "Hello!", "category": "x"}) == expected
    assert format_prompt("Hi") == expected[0]
    assert format_prompt(messages[:1]) == expected[0]


def test_system_and_multi_turn_history():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "A?"},
        {"role": "assistant", "content": "a."},
        {"role": "user", "content": "B?"},
        {"role": "assistant", "content": "b."},
    ]
    prompt, full = format_chat(messages)
    assert prompt == (
        "<|system|>\nBe brief.\n<|user|>\nA?\n<|assistant|>\na.\n<|user|>\nB?\n<|assistant|>\n"
    )
    assert full == prompt + "b."
    assert format_prompt(messages[:4]) == prompt
    # system= adds a system message only when there is none
    assert format_chat(messages[1:], system="Be brief.") == (prompt, full)
    assert format_chat(messages, system="ignored") == (prompt, full)


@pytest.mark.parametrize(
    "bad, err, match",
    [
        ([], ValueError, "conversation: expected at least one message"),
        (
            [{"role": "user", "content": "A?"}],
            ValueError,
            "the last message must have role 'assistant'",
        ),
        (
            [{"role": "assistant", "content": "a"}],
            ValueError,
            r"conversation\[0\]\['role'\]: expected 'user'",
        ),
        (
            [{"role": "user", "content": "A"}, {"role": "user", "content": "B"}],
            ValueError,
            r"conversation\[1\]\['role'\]: expected 'assistant'",
        ),
        (
            [{"role": "user"}],
            ValueError,
            r"conversation\[0\]: expected a dict with 'role' and 'content'",
        ),
        (
            [{"role": "user", "content": 3}],
            TypeError,
            r"conversation\[0\]\['content'\]: expected str",
        ),
        (
            {"question": "A"},
            ValueError,
            "conversation: a dict needs 'messages' or 'prompt' and 'response'",
        ),
        (42, TypeError, "conversation: expected"),
    ],
)
def test_bad_conversations(bad, err, match):
    with pytest.raises(err, match=match):
        format_chat(bad)


def test_format_prompt_needs_a_final_user_turn():
    with pytest.raises(ValueError, match="the last message must have role 'user'"):
        format_prompt([{"role": "user", "content": "A"}, {"role": "assistant", "content": "a"}])
