"""Helpers the parser tests share: every way to cut a text into stream steps, and joining streamed deltas."""

from __future__ import annotations

from typing import Iterator


def prefix_streams(text: str) -> Iterator[list[str]]:
    """The growing texts a stream of `text` may show: one character per step, then each two-step cut."""
    yield [text[:k] for k in range(1, len(text) + 1)]
    for k in range(1, len(text)):
        yield [text[:k], text]


def join_deltas(deltas: list[dict]) -> dict:
    """Join chat `delta` dicts as a client does: text fields concatenated, tool calls per index (id, type
    and name from their first delta, the argument fragments concatenated)."""
    joined: dict = {"reasoning_content": "", "content": "", "tool_calls": {}}
    for delta in deltas:
        for key in ("reasoning_content", "content"):
            joined[key] += delta.get(key) or ""
        for call in delta.get("tool_calls") or []:
            slot = joined["tool_calls"].setdefault(call["index"], {"arguments": ""})
            for key in ("id", "type"):
                if call.get(key) is not None:
                    assert key not in slot, f"{key} sent twice for call {call['index']}"
                    slot[key] = call[key]
            function = call.get("function") or {}
            if function.get("name") is not None:
                assert "name" not in slot, f"name sent twice for call {call['index']}"
                slot["name"] = function["name"]
            slot["arguments"] += function.get("arguments") or ""
    joined["tool_calls"] = [joined["tool_calls"][i] for i in sorted(joined["tool_calls"])]
    return joined
