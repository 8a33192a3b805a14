"""Errors a user can cause: the CLI prints their message as one line, never a traceback."""

from __future__ import annotations


class StreamPruneError(Exception):
    """A user-facing failure (bad input, bad workspace, unreachable storage)."""


class SampleError(StreamPruneError):
    """A problem with one sample or shard; carries where it happened for errors.jsonl."""

    def __init__(self, message: str, shard: str, key: str | None = None, reason: str = "error"):
        where = f"shard {shard}" + (f", key {key}" if key is not None else "")
        super().__init__(f"{where}: {message}")
        self.shard = shard
        self.key = key
        self.reason = reason
        self.detail = message

    def record(self, stage: str) -> dict:
        """The errors.jsonl entry for this failure."""
        return {"stage": stage, "shard": self.shard, "key": self.key, "reason": self.reason, "message": self.detail}
