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
Moves and cool-downs are kept by key, with a weak reference to the ``TaskState``
(see :func:`amm_core._room.live_task`): they do not keep a released key alive while
the AMM is stopped and no cycle comes to end them.

**What is heavy.** The manager's measure (``manager.workers_memory``, default
"optimistic"), with the moves in flight counted as done (below). It lags: managed
memory is capped at the process memory of the last heartbeat, so a worker that just
received many bytes may look lighter than it is until its next heartbeat, and the
policy may then move a little more than needed (a later cycle moves it back only if
the worker ends above the band). Correcting for that lag (adding ``ws.nbytes`` beyond
the cap) was tried and made things worse: the AMM chooses which copy a drop removes
with its own, uncorrected measure, so every policy's drops (ReduceReplicas',
PressureReduceReplicas') then removed the *recipient's* copy of moves that the
corrected weights had sized, undoing them. Weighing with the AMM's measure keeps
Rebalance consistent with the AMM's choice of copy to drop.

A worker sends when it is above the cluster mean by more than half the dead band,
and receives when it is below the mean; the band is ``threshold`` times the worker's
memory_limit (times the mean for workers without a limit). A move of
``s`` bytes from a sender at ``S`` to a recipient at ``R`` needs ``S - s >= mean -
band/2``, ``R + s <= mean + band/2`` and ``R + s <= S - s``. So a recipient never
becomes a sender while the mean holds still (hysteresis), and every move lowers the
variance of the workers' memory: no sequence of moves can come back to where it
started, and the policy does not ping-pong with itself. When the drop happens, the
sender's copy is the one on the heavier worker, which is also the one ReduceReplicas
would choose: the two do not undo each other (unless the AMM's measure has moved
since, e.g. this cycle's other drops made the sender lighter; such a move is
"undone", see below).

**Guards.**

- Recipients must have room (:func:`amm_core._room.workers_with_room`): a copy never
  takes a worker past its pause threshold.
- Keys needed by a task queued or running on the sender (``ts.waiters`` with
  ``processing_on`` the sender) stay where they are, and so do keys with an
  "imminent" dependent on the sender: not assigned yet, but every missing input is
  being computed there. :class:`amm_core.reduce.PressureReduceReplicas` keeps the copy
  there for the same reason (see ``_copies_to_keep`` in reduce.py; the rule is
  re-implemented in :func:`_needed_on`, keep the two in step). Moving such a key
  would let the reducer drop the *recipient's* copy, the sender's drop would then be
  refused (last copy), and the key would be moved again after ``move_timeout``.
- Whatever the reason, a move whose recipient lost its copy after it had arrived ends
  at once ("undone"), and a key whose move was undone or abandoned is not moved again
  for ``cooldown`` cycles: two policies that disagree about a key cost one copy per
  cool-down at most, not one per cycle.
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

**Cost.** A cycle stops scanning as soon as no key can fit anywhere: keys larger than
the largest room and dead-band slack among the recipients are skipped without
looking at each recipient, a sender is left once nothing more can leave it, and at
most ``max_keys_per_cycle`` keys are examined per cycle (the newest of each sender
first, heaviest sender first).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dask.typing import Key
from dask.utils import parse_bytes
from distributed.active_memory_manager import Suggestion, SuggestionGenerator
from distributed.core import Status

from amm_core._room import CountingPolicy, live_task, room, workers_with_room
from amm_core.replicate import wanted_replicas

if TYPE_CHECKING:
    from distributed.scheduler import TaskState, WorkerState

# Main logger. Terse at DEBUG level.
logger = logging.getLogger(__name__)
# Per-key logging. Verbose at DEBUG level.
task_logger = logging.getLogger(__name__ + ".tasks")

def _needed_on(ts: TaskState, ws: WorkerState, max_scan: int) -> bool:
    """Whether a dependent of ``ts`` runs, or is about to run, on ``ws``.

    Processing there, or "imminent" there: not assigned yet, and every input it
    still waits on is being computed on ``ws``. The imminent rule is the one of
    :meth:`amm_core.reduce.PressureReduceReplicas._copies_to_keep` (same scan of at
    most ``max_scan`` unassigned dependents, queued ones excluded); it is repeated
    here so that the two policies agree on which copies stay.
    """
    scanned = 0
    for waiter in ts.waiters or ():
        where = waiter.processing_on
        if where is not None:
            if where is ws:
                return True
            continue
        if scanned >= max_scan:
            continue
        scanned += 1
        if waiter.state != "queued" and waiter.waiting_on:
            inputs_on = {dts.processing_on for dts in waiter.waiting_on}
            if None not in inputs_on and ws in inputs_on:
                return True
    return False


@dataclass
class Move:
    """A key being moved: copied to ``recipient``, to be dropped from ``sender``."""

    #: The key's TaskState when the move started, weakly
    task: weakref.ref[TaskState]
    sender: WorkerState
    recipient: WorkerState
    #: AMM cycles since the copy was requested
    age: int = 0
    #: Whether the recipient's copy was seen in memory
    arrived: bool = False


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
    cooldown:
        AMM cycles during which a key whose move was abandoned or undone is not
        moved again.
    max_keys_per_cycle:
        Keys examined per AMM cycle at most, over all senders.
    max_scan:
        Unassigned dependents examined per key by the imminent rule (as
        PressureReduceReplicas' ``max_scan``).

    Counters: ``replicas_copied``, ``replicas_dropped``, ``moves_completed``,
    ``moves_abandoned``, ``moves_undone`` (the recipient's copy was dropped by
    someone else after it arrived), ``bytes_moved``, ``no_room`` (a cycle had
    senders and recipients but no recipient with room for a key that fit the band),
    ``scan_capped`` (a cycle stopped at ``max_keys_per_cycle``).
    """

    #: Width of the dead band around the mean, as a fraction of memory_limit
    threshold: float
    #: Upper bound of bytes copied per AMM cycle
    max_bytes_per_cycle: int
    #: AMM cycles after which an unfinished move is given up
    move_timeout: int
    #: AMM cycles a key is left alone after its move was abandoned or undone
    cooldown: int
    #: Keys examined per AMM cycle at most
    max_keys_per_cycle: int
    #: Unassigned dependents examined per key by the imminent rule
    max_scan: int
    #: Moves in flight, by key
    moves: dict[Key, Move]
    #: Keys cooling down after an abandoned or undone move: their TaskState (weakly)
    #: and the cycle they may move again
    cooling: dict[Key, tuple[weakref.ref[TaskState], int]]
    #: AMM cycles run so far
    cycle: int
    #: Cluster mean and dead-band state seen in the last cycle, for report()
    last_cycle: dict[str, Any]

    def __init__(
        self,
        threshold: float = 0.05,
        max_bytes_per_cycle: int | str = "100MiB",
        move_timeout: int = 10,
        cooldown: int = 30,
        max_keys_per_cycle: int = 10_000,
        max_scan: int = 64,
    ):
        super().__init__()
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1); got {threshold!r}")
        self.threshold = threshold
        self.max_bytes_per_cycle = parse_bytes(max_bytes_per_cycle)
        if self.max_bytes_per_cycle <= 0:
            raise ValueError("max_bytes_per_cycle must be positive")
        self.move_timeout = move_timeout
        if cooldown < 0:
            raise ValueError(f"cooldown must be >= 0; got {cooldown!r}")
        self.cooldown = int(cooldown)
        if max_keys_per_cycle <= 0:
            raise ValueError("max_keys_per_cycle must be positive")
        self.max_keys_per_cycle = int(max_keys_per_cycle)
        if max_scan < 0:
            raise ValueError(f"max_scan must be >= 0; got {max_scan!r}")
        self.max_scan = int(max_scan)
        self.moves = {}
        self.cooling = {}
        self.cycle = 0
        self.last_cycle = {}

    def __repr__(self) -> str:
        return (
            f"Rebalance(threshold={self.threshold}, "
            f"max_bytes_per_cycle={self.max_bytes_per_cycle}, "
            f"cooldown={self.cooldown})"
        )

    def run(self) -> SuggestionGenerator:
        self.cycle += 1
        self._expire_cooling()
        yield from self._finish_moves()
        yield from self._start_moves()

    def _finish_moves(self) -> SuggestionGenerator:
        """Drop the sender's copy of every move whose copy has arrived."""
        scheduler = self.manager.scheduler
        for key, move in list(self.moves.items()):
            move.age += 1
            ts = live_task(scheduler, key, move.task)
            if ts is None or ts.state != "memory":
                self._end(key, "abandoned", "key left memory")
                continue
            who_has = ts.who_has or set()
            if move.sender not in who_has:
                # Someone else (a reducer, the worker itself) dropped it already.
                done = move.recipient in who_has
                self._end(key, "completed" if done else "abandoned", "sender dropped")
            elif move.recipient in who_has:
                move.arrived = True
                ws = yield Suggestion("drop", ts, {move.sender})
                if ws is not None:
                    self.count("replicas_dropped")
                    self.count("bytes_moved", ts.nbytes)
                    self._end(key, "completed", "dropped from sender")
                elif move.sender in self.manager.pending.get(ts, ((), ()))[1]:
                    self.count("bytes_moved", ts.nbytes)
                    self._end(key, "completed", "another policy drops it")
                elif move.age > self.move_timeout:
                    self._end(key, "abandoned", "sender can't drop its copy")
            elif move.arrived:
                # Another policy (a reducer keeping the sender's copy) disagrees:
                # waiting for move_timeout would only delay a repeat of the move.
                self._end(key, "undone", "recipient's copy dropped after it arrived")
            elif (
                move.age > self.move_timeout
                or move.recipient.status != Status.running
                or scheduler.workers.get(move.recipient.address) is not move.recipient
            ):
                self._end(key, "abandoned", "copy did not arrive")

    def _expire_cooling(self) -> None:
        scheduler = self.manager.scheduler
        for key, (ref, until) in list(self.cooling.items()):
            if until <= self.cycle or live_task(scheduler, key, ref) is None:
                del self.cooling[key]

    def _end(self, key: Key, outcome: str, why: str) -> None:
        move = self.moves.pop(key)
        self.count(f"moves_{outcome}")
        if outcome != "completed" and self.cooldown and move.task() is not None:
            self.cooling[key] = (move.task, self.cycle + self.cooldown)
        task_logger.debug(
            "Rebalance: move of %s from %s to %s %s: %s",
            key,
            move.sender.address,
            move.recipient.address,
            outcome,
            why,
        )

    def _start_moves(self) -> SuggestionGenerator:
        manager = self.manager
        workers_memory = manager.workers_memory
        # Memory as it will be once the moves in flight are done.
        eff = {
            ws: nbytes
            for ws, nbytes in workers_memory.items()
            if ws.status in (Status.running, Status.paused)
        }
        for move in self.moves.values():
            # Alive: _finish_moves() ended the moves of keys that left memory
            ts = move.task()
            if ts is None:
                continue
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
            "keys_examined": 0,
        }
        if not senders or not recipients:
            return

        def limits() -> tuple[float, float, float]:
            """(largest dead-band slack, largest key that fits both band and room,
            lightest recipient) over the recipients: no key above the first two can
            go anywhere, whatever its sender."""
            slack = {ws: mean + half_band(ws) - eff[ws] for ws in recipients}
            return (
                max(slack.values()),
                max(min(s, room(ws, workers_memory, manager.measure)) for ws, s in slack.items()),
                min(eff[ws] for ws in recipients),
            )

        max_slack, max_fit, lightest = limits()
        budget = self.max_bytes_per_cycle
        nmoves = 0
        examined = 0
        no_room = False
        for sender in senders:
            if budget <= 0 or max_slack <= 0 or examined >= self.max_keys_per_cycle:
                break
            # Newest keys first, up to the bytes held in memory: see module docstring.
            # (Not ws.memory.managed: it is capped by the process memory of the last
            # heartbeat, which lags behind keys that just landed.)
            in_memory = sender.nbytes - sender.metrics["spilled_bytes"]["memory"]
            seen = 0
            for ts in reversed(sender.has_what):
                nbytes = ts.nbytes
                seen += nbytes
                # Largest key that may leave this sender and land somewhere.
                limit = min(
                    budget,
                    max_slack,
                    eff[sender] - (mean - half_band(sender)),
                    (eff[sender] - lightest) / 2,
                )
                if seen > in_memory or eff[sender] <= mean or limit <= 0:
                    break
                if examined >= self.max_keys_per_cycle:
                    self.count("scan_capped")
                    break
                examined += 1
                if (
                    nbytes > limit
                    or nbytes <= 0
                    or ts.key in self.moves
                    or ts.key in self.cooling
                    or ts.actor
                ):
                    continue
                if nbytes > max_fit:
                    no_room = True
                    continue
                if (
                    len(ts.who_has or ()) > wanted_replicas(manager, ts)
                    or _needed_on(ts, sender, self.max_scan)
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
                candidates = workers_with_room(nbytes, workers_memory, fitting, measure=manager.measure)
                if not candidates:
                    no_room = True
                    continue

                recipient = yield Suggestion("replicate", ts, candidates)
                if recipient is None:
                    continue
                self.moves[ts.key] = Move(weakref.ref(ts), sender, recipient)
                eff[sender] -= nbytes
                eff[recipient] += nbytes
                budget -= nbytes
                nmoves += 1
                max_slack, max_fit, lightest = limits()
                self.count("replicas_copied")
                task_logger.debug(
                    "Rebalance: moving %s (%d bytes) from %s to %s",
                    ts.key,
                    nbytes,
                    sender.address,
                    recipient.address,
                )

        self.last_cycle["keys_examined"] = examined
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
        out["keys_cooling"] = len(self.cooling)
        out["bytes_in_flight"] = sum(
            ts.nbytes
            for ts in (move.task() for move in self.moves.values())
            if ts is not None
        )
        out["last_cycle"] = dict(self.last_cycle)
        return out
