"""The error every check of a MemoryPolicy spec raises."""

from __future__ import annotations


class InvalidPolicy(ValueError):
    """The spec cannot be applied; ``field`` says where, the message says why."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
