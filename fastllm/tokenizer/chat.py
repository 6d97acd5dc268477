"""The chat template for instruction (SFT) and preference data.

One conversation is rendered as

    <|system|>\\n{system}\\n            (only when there is a system message)
    <|user|>\\n{question}\\n
    <|assistant|>\\n{answer}\\n         (earlier turns of a multi-turn conversation)
    <|user|>\\n{question}\\n
    <|assistant|>\\n{response}         <- the trained response; the tokenizer's eos id follows it

`format_chat` returns (prompt_text, full_text) with full_text == prompt_text + response, so
the prompt is exactly the text a model sees at generation time (`format_prompt`). The markers
are single tokens in tokenizers trained by `Tokenizer.train` (they are user-defined pieces);
other tokenizers split them into ordinary pieces, which works the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
CHAT_SPECIAL_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
_HEADER = {"system": SYSTEM_TOKEN, "user": USER_TOKEN, "assistant": ASSISTANT_TOKEN}


def _messages(conversation: Any, name: str) -> list[dict]:
    """Accept (prompt, response), a list of {"role", "content"}, or a record dict with
    "messages" or "prompt"/"response" keys; return a list of message dicts."""
    if isinstance(conversation, Mapping):
        if "messages" in conversation:
            return _messages(conversation["messages"], name)
        if "prompt" in conversation and "response" in conversation:
            for key in ("prompt", "response"):
                if not isinstance(conversation[key], str):
                    raise TypeError(f"{name}[{key!r}]: expected str, got {type(conversation[key]).__name__}")
            return _messages((conversation["prompt"], conversation["response"]), name)
        raise ValueError(
            f"{name}: a dict needs 'messages' or 'prompt' and 'response' keys, "
            f"got keys {sorted(conversation)}"
        )
    if (
        isinstance(conversation, tuple)
        and len(conversation) == 2
        and all(isinstance(x, str) for x in conversation)
    ):
        return [
            {"role": "user", "content": conversation[0]},
            {"role": "assistant", "content": conversation[1]},
        ]
    if isinstance(conversation, Sequence) and not isinstance(conversation, str):
        out = []
        for i, m in enumerate(conversation):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(
                    f"{name}[{i}]: expected a dict with 'role' and 'content', got {m!r:.80}"
                )
            if not isinstance(m["content"], str):
                raise TypeError(
                    f"{name}[{i}]['content']: expected str, got {type(m['content']).__name__}"
                )
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise TypeError(
        f"{name}: expected (prompt, response), a list of messages or a record dict, "
        f"got {type(conversation).__name__}"
    )


def _check_roles(messages: list[dict], name: str, last: str | None) -> None:
    if not messages:
        raise ValueError(f"{name}: expected at least one message, got none")
    start = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[start:], start):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(
                f"{name}[{i}]['role']: expected {want!r} (optional system message, "
                f"then user and assistant alternating), got {m['role']!r}"
            )
    if last is not None and messages[-1]["role"] != last:
        raise ValueError(
            f"{name}: the last message must have role {last!r}, got {messages[-1]['role']!r}"
        )


def _render(messages: list[dict]) -> str:
    return "".join(f"{_HEADER[m['role']]}\n{m['content']}\n" for m in messages)


def format_chat(conversation: Any, system: str | None = None) -> tuple[str, str]:
    """Render a conversation that ends with the assistant's response.

    conversation: (prompt, response), a list of {"role": "system"|"user"|"assistant",
        "content": str} ending with an assistant message, or a record with "messages" or
        "prompt"/"response" (as `fastllm.data.load_instructions()` returns).
    system: optional system message put first (when the conversation has none).
    Returns (prompt_text, full_text), full_text = prompt_text + final response. Only the final
    response is meant to be trained on (`fastllm.data.build_sft_example`).
    """
    messages = _messages(conversation, "conversation")
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + messages
    _check_roles(messages, "conversation", last="assistant")
    prompt_text = _render(messages[:-1]) + ASSISTANT_TOKEN + "\n"
    return prompt_text, prompt_text + messages[-1]["content"]


def format_prompt(conversation: Any, system: str | None = None) -> str:
    """The generation prompt: a user question (str) or a list of messages ending with a
    user message, rendered up to and including the assistant header."""
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    messages = _messages(conversation, "conversation")
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + messages
    _check_roles(messages, "conversation", last="user")
    return _render(messages) + ASSISTANT_TOKEN + "\n"
