"""The error every check of a MemoryPolicy spec raises."""

from __future__ import annotations

from dask_memory_operator.untrusted import describe

#: Characters of the why of an InvalidPolicy (it quotes the tenant's values): the
#: condition, the Event and the log line stay small
MAX_REASON = 1024


class InvalidPolicy(ValueError):
    """The spec cannot be applied; ``field`` says where, the message says why."""

    def __init__(self, field: str, message: str):
        field = describe(field, 256)
        super().__init__(f"{field}: {describe(message, MAX_REASON)}")
        self.field = field
