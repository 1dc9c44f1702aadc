"""Rebalance as an Active Memory Manager policy: move data from the heaviest workers
to the lightest ones, a little at every AMM cycle, while computations run.

Upstream ``Scheduler.rebalance`` (``Client.rebalance``) is a one-shot that the user has
to call, and its docstring warns that it is not robust when the cluster is not idle.
The 2021 AMM announcement promised it as a policy that runs every two seconds without
user intervention. This is that policy.

The AMM has no "move": a move is a replicate to the recipient in one cycle and a drop
from the sender in a later cycle, once the copy exists. The policy keeps its moves in
flight in :attr:`Rebalance.moves` and counts them as already done when it weighs the
workers, so that a sender whose copy has not been dropped yet is not chosen again.

**What is heavy.** The manager's measure (``manager.workers_memory``, default
"optimistic"). A worker sends when it is above the cluster mean by more than half the
dead band, and receives when it is below the mean; the band is ``threshold`` times
the worker's memory_limit (times the mean for workers without a limit). A move of
``s`` bytes from a sender at ``S`` to a recipient at ``R`` needs ``S - s >= mean -
band/2``, ``R + s <= mean + band/2`` and ``R + s <= S - s``. So a recipient never
becomes a sender while the mean holds still (hysteresis), and every move lowers the
variance of the workers' memory: no sequence of moves can come back to where it
started, and the policy does not ping-pong with itself. When the drop happens, the
sender's copy is the one on the heavier worker, which is also the one ReduceReplicas
would choose: the two do not undo each other.

**Guards.**

- Recipients must have room (:func:`amm_core._room.workers_with_room`): a copy never
  takes a worker past its pause threshold.
- Keys needed by a task queued or running on the sender (``ts.waiters`` with
  ``processing_on`` the sender) stay where they are.
- Keys with more copies than wanted (see :func:`amm_core.replicate.wanted_replicas`)
  are left to the reducer, which drops the excess from the heaviest worker anyway.
- Spilled keys: the scheduler does not know which keys a worker spilled, only how
  many bytes of its managed data are spilled (``ws.metrics["spilled_bytes"]``, from
  the last heartbeat), hence how many are in memory. The worker spills the least
  recently used keys first, so the policy considers the sender's keys newest first
  (``ws.has_what`` is insertion-ordered) and stops once it has seen as many bytes as
  the worker holds in memory. This is an approximation: a recently inserted key
  that was not used since may be spilled, and then moving it costs a read from disk
  on the sender. With nothing spilled, every key is a candidate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dask.utils import parse_bytes
from distributed.active_memory_manager import Suggestion, SuggestionGenerator
from distributed.core import Status

from amm_core._room import CountingPolicy, workers_with_room
from amm_core.replicate import wanted_replicas

if TYPE_CHECKING:
    from distributed.scheduler import TaskState, WorkerState

# Main logger. Terse at DEBUG level.
logger = logging.getLogger(__name__)
# Per-key logging. Verbose at DEBUG level.
task_logger = logging.getLogger(__name__ + ".tasks")


@dataclass
class Move:
    """A key being moved: copied to ``recipient``, to be dropped from ``sender``."""

    sender: WorkerState
    recipient: WorkerState
    #: AMM cycles since the copy was requested
    age: int = 0


class Rebalance(CountingPolicy):
    """Move data from workers above the cluster mean to workers below it, up to
    ``max_bytes_per_cycle`` per AMM cycle.

    Parameters
    ----------
    threshold:
        Width of the dead band around the mean, as a fraction of each worker's
        memory_limit (of the mean for workers without a limit): a worker sends when
        it is more than half of it above the mean. Default 0.05.
    max_bytes_per_cycle:
        Bytes (int or a string such as "100MiB") copied per AMM cycle at most.
    move_timeout:
        AMM cycles after which a move whose copy never arrived, or whose sender
        could not drop its copy, is given up.

    Counters: ``replicas_copied``, ``replicas_dropped``, ``moves_completed``,
    ``moves_abandoned``, ``bytes_moved``, ``no_room`` (a cycle had senders and
    recipients but no recipient with room for a key).
    """

    #: Width of the dead band around the mean, as a fraction of memory_limit
    threshold: float
    #: Upper bound of bytes copied per AMM cycle
    max_bytes_per_cycle: int
    #: AMM cycles after which an unfinished move is given up
    move_timeout: int
    #: Moves in flight, by key
    moves: dict[TaskState, Move]
    #: Cluster mean and dead-band state seen in the last cycle, for report()
    last_cycle: dict[str, Any]

    def __init__(
        self,
        threshold: float = 0.05,
        max_bytes_per_cycle: int | str = "100MiB",
        move_timeout: int = 10,
    ):
        super().__init__()
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1); got {threshold!r}")
        self.threshold = threshold
        self.max_bytes_per_cycle = parse_bytes(max_bytes_per_cycle)
        if self.max_bytes_per_cycle <= 0:
            raise ValueError("max_bytes_per_cycle must be positive")
        self.move_timeout = move_timeout
        self.moves = {}
        self.last_cycle = {}

    def __repr__(self) -> str:
        return (
            f"Rebalance(threshold={self.threshold}, "
            f"max_bytes_per_cycle={self.max_bytes_per_cycle})"
        )

    def run(self) -> SuggestionGenerator:
        yield from self._finish_moves()
        yield from self._start_moves()

    def _finish_moves(self) -> SuggestionGenerator:
        """Drop the sender's copy of every move whose copy has arrived."""
        scheduler = self.manager.scheduler
        for ts, move in list(self.moves.items()):
            move.age += 1
            who_has = ts.who_has or set()
            if scheduler.tasks.get(ts.key) is not ts or ts.state != "memory":
                self._end(ts, "abandoned", "key left memory")
            elif move.sender not in who_has:
                # Someone else (a reducer, the worker itself) dropped it already.
                done = move.recipient in who_has
                self._end(ts, "completed" if done else "abandoned", "sender dropped")
            elif move.recipient in who_has:
                ws = yield Suggestion("drop", ts, {move.sender})
                if ws is not None:
                    self.count("replicas_dropped")
                    self.count("bytes_moved", ts.nbytes)
                    self._end(ts, "completed", "dropped from sender")
                elif move.sender in self.manager.pending.get(ts, ((), ()))[1]:
                    self.count("bytes_moved", ts.nbytes)
                    self._end(ts, "completed", "another policy drops it")
                elif move.age > self.move_timeout:
                    self._end(ts, "abandoned", "sender can't drop its copy")
            elif (
                move.age > self.move_timeout
                or move.recipient.status != Status.running
                or scheduler.workers.get(move.recipient.address) is not move.recipient
            ):
                self._end(ts, "abandoned", "copy did not arrive")

    def _end(self, ts: TaskState, outcome: str, why: str) -> None:
        move = self.moves.pop(ts)
        self.count(f"moves_{outcome}")
        task_logger.debug(
            "Rebalance: move of %s from %s to %s %s: %s",
            ts.key,
            move.sender.address,
            move.recipient.address,
            outcome,
            why,
        )

    def _start_moves(self) -> SuggestionGenerator:
        workers_memory = self.manager.workers_memory
        # Memory as it will be once the moves in flight are done.
        eff = {
            ws: nbytes
            for ws, nbytes in workers_memory.items()
            if ws.status in (Status.running, Status.paused)
        }
        for ts, move in self.moves.items():
            who_has = ts.who_has or set()
            if move.sender in eff and move.sender in who_has:
                eff[move.sender] -= ts.nbytes
            if move.recipient in eff and move.recipient not in who_has:
                eff[move.recipient] += ts.nbytes
        if len(eff) < 2:
            return

        mean = sum(eff.values()) / len(eff)

        def half_band(ws: WorkerState) -> float:
            return self.threshold * (ws.memory_limit or mean) / 2

        senders = sorted(
            (ws for ws in eff if eff[ws] > mean + half_band(ws)),
            key=eff.__getitem__,
            reverse=True,
        )
        recipients = {
            ws for ws in eff if ws.status == Status.running and eff[ws] < mean
        }
        self.last_cycle = {
            "mean": int(mean),
            "spread": int(max(eff.values()) - min(eff.values())),
            "senders": len(senders),
            "recipients": len(recipients),
            "moves_in_flight": len(self.moves),
        }
        if not senders or not recipients:
            return

        budget = self.max_bytes_per_cycle
        nmoves = 0
        no_room = False
        for sender in senders:
            # Newest keys first, up to the bytes held in memory: see module docstring.
            # (Not ws.memory.managed: it is capped by the process memory of the last
            # heartbeat, which lags behind keys that just landed.)
            in_memory = sender.nbytes - sender.metrics["spilled_bytes"]["memory"]
            seen = 0
            for ts in reversed(sender.has_what):
                nbytes = ts.nbytes
                seen += nbytes
                if seen > in_memory or eff[sender] <= mean or budget <= 0:
                    break
                if (
                    nbytes > budget
                    or nbytes <= 0
                    or ts in self.moves
                    or ts.actor
                    or eff[sender] - nbytes < mean - half_band(sender)
                    or len(ts.who_has or ()) > wanted_replicas(self.manager, ts)
                    or any(w.processing_on is sender for w in ts.waiters or ())
                ):
                    continue

                fitting = {
                    ws
                    for ws in recipients
                    if ws not in (ts.who_has or ())
                    and eff[ws] + nbytes <= mean + half_band(ws)
                    and eff[ws] + nbytes <= eff[sender] - nbytes
                }
                if not fitting:
                    continue
                candidates = workers_with_room(nbytes, workers_memory, fitting)
                if not candidates:
                    no_room = True
                    continue

                recipient = yield Suggestion("replicate", ts, candidates)
                if recipient is None:
                    continue
                self.moves[ts] = Move(sender, recipient)
                eff[sender] -= nbytes
                eff[recipient] += nbytes
                budget -= nbytes
                nmoves += 1
                self.count("replicas_copied")
                task_logger.debug(
                    "Rebalance: moving %s (%d bytes) from %s to %s",
                    ts.key,
                    nbytes,
                    sender.address,
                    recipient.address,
                )
            if budget <= 0:
                break

        if no_room:
            self.count("no_room")
        if nmoves:
            logger.debug(
                "Rebalance: moving %d keys (%d bytes); mean %d bytes",
                nmoves,
                self.max_bytes_per_cycle - budget,
                mean,
            )

    def report(self) -> dict[str, Any]:
        out = super().report()
        out["threshold"] = self.threshold
        out["max_bytes_per_cycle"] = self.max_bytes_per_cycle
        out["moves_in_flight"] = len(self.moves)
        out["bytes_in_flight"] = sum(ts.nbytes for ts in self.moves)
        out["last_cycle"] = dict(self.last_cycle)
        return out
