"""Conversations from data rows: the layouts chat data comes in, as one list of messages.

Every layout becomes ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``::

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
                                                             (ShareGPT: from/value, mapped)
    {"instruction": "Sum", "input": "2 + 2", "output": "4"}  (Alpaca: user = instruction
                                                             + blank line + input; output
                                                             the answer)

(The chat task adds a fourth: ``task.user`` / ``task.assistant`` templates over any columns.)
A SQuAD ``answers`` cell (``{"text": [...], ...}`` as ``read_squad`` gives it) reads as its
first answer (:func:`cell_text`) and is scored against all of them (:func:`answer_texts`).
Errors name the row and the layouts accepted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
LAYOUTS = (
    "a 'messages' column of {role, content} dicts, a ShareGPT 'conversations' column "
    "of {from, value} dicts, or Alpaca 'instruction' (+ 'input') + 'output' columns"
)

Message = dict[str, str]


def cell_text(value: Any) -> Any:
    """A SQuAD answers dict reads as its first answer text; other values as they are."""
    if isinstance(value, Mapping) and isinstance(value.get("text"), list):
        return value["text"][0] if value["text"] else ""
    return value


def answer_texts(value: Any) -> list[str] | None:
    """Every answer of a SQuAD answers cell; None for any other value."""
    if isinstance(value, Mapping) and isinstance(value.get("text"), list) and value["text"]:
        return [str(t) for t in value["text"]]
    return None


def _checked(messages: Any, where: str) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} is not a {{role, content}} dict: {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has role {m['role']!r}; use one of {ROLES}")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    return out


def conversation(
    row: Mapping[str, Any], system: str | None = None, where: str = "row"
) -> list[Message]:
    """The messages of one data row (see the module docstring for the layouts).

    Args:
        row: the data row.
        system: a system message put first (unless the conversation has its own).
        where: how errors name the row.

    Raises:
        ValueError: no known layout, or a malformed message (named).
    """
    if "messages" in row:
        messages = _checked(row["messages"], where)
    elif "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list):
            raise ValueError(f"{where}: 'conversations' must be a list of {{from, value}} dicts")
        try:
            messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"{where}: a ShareGPT turn needs 'from' (one of {sorted(SHAREGPT_ROLES)}) and "
                f"'value' ({exc!r})"
            ) from None
        messages = _checked(messages, where)
    elif "instruction" in row:
        prompt = str(row["instruction"])
        if row.get("input"):
            prompt += "\n\n" + str(row["input"])
        messages = [{"role": "user", "content": prompt}]
        if row.get("output") is not None:
            messages.append({"role": "assistant", "content": str(row["output"])})
    else:
        raise ValueError(f"{where}: no conversation in columns {sorted(row)}; give {LAYOUTS}")
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def split_answer(messages: Sequence[Message]) -> tuple[list[Message], Message | None]:
    """``(the prompt turns, the final assistant message)``; no answer when the last turn is
    not the assistant's (a conversation to continue)."""
    if messages and messages[-1]["role"] == "assistant":
        return list(messages[:-1]), messages[-1]
    return list(messages), None
