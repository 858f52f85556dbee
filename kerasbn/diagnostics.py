"""Diagnostics: counting what a step asks of the other replicas or devices.

Both check the distribution contract (`kerasbn/distributed.py`) from outside;
they are diagnostics for tests and benchmarks, not something a training step
needs. `count_cross_replica_calls` (TensorFlow) wraps `tf.distribute`'s
collective methods while a block runs and counts the calls;
`count_hlo_collectives` (JAX) counts the collectives XLA compiled into a
jitted function.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from typing import Callable, Dict, Iterator, List, Tuple

from kerasbn.backend import require_tensorflow, tensorflow


_REPLICA_CALLS = ("all_reduce", "all_gather")  # ReplicaContext: one replica asking the others
_STRATEGY_CALLS = ("reduce_to", "batch_reduce_to")  # StrategyExtended: aggregated writes, cross-replica reads


# The wrappers are installed once, by the first open block, and removed by the last to close, under
# one lock: blocks may nest or overlap in different threads and still leave TensorFlow's methods as
# they found them. Every open block counts every call made while it is open.
_PATCH_LOCK = threading.Lock()
_OPEN_COUNTERS: List["_CallCounter"] = []
_ORIGINALS: List[Tuple[type, str, object]] = []
_DEPTH = threading.local()  # how deep in counted calls this thread is (a call inside another is part of it)


class _CallCounter:
    """The bookkeeping of one `count_cross_replica_calls` block: outermost calls, per replica thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.replica_calls_in_flight = 0
        self.per_thread: Dict[int, Dict[str, int]] = {}
        self.strategy_calls = {name: 0 for name in _STRATEGY_CALLS}

    def enter(self, name: str, replica_level: bool) -> None:
        """An outermost call begins."""
        with self.lock:
            if replica_level:
                calls = self.per_thread.setdefault(threading.get_ident(), {})
                calls[name] = calls.get(name, 0) + 1
                self.replica_calls_in_flight += 1
            elif not self.replica_calls_in_flight:
                # Not the merge step of a replica's all-reduce (MirroredStrategy
                # runs that on another thread while the replicas wait).
                self.strategy_calls[name] += 1

    def leave(self, replica_level: bool) -> None:
        """An outermost call returned."""
        if replica_level:
            with self.lock:
                self.replica_calls_in_flight -= 1

    def totals(self) -> Dict[str, int]:
        totals = {name: max((calls.get(name, 0) for calls in self.per_thread.values()), default=0)
                  for name in _REPLICA_CALLS}
        totals.update(self.strategy_calls)
        return totals


def _counted(name: str, method, replica_level: bool):
    """`method`, telling every open counter when an outermost call of it begins and ends."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        depth = getattr(_DEPTH, "value", 0)
        counters = list(_OPEN_COUNTERS) if depth == 0 else []
        for counter in counters:
            counter.enter(name, replica_level)
        _DEPTH.value = depth + 1
        try:
            return method(*args, **kwargs)
        finally:
            _DEPTH.value = depth
            for counter in counters:
                counter.leave(replica_level)

    return wrapper


def _open(counter: "_CallCounter") -> None:
    tf = tensorflow()
    with _PATCH_LOCK:
        if not _OPEN_COUNTERS:
            patched = [(tf.distribute.ReplicaContext, name, True) for name in _REPLICA_CALLS]
            patched += [(tf.distribute.StrategyExtended, name, False) for name in _STRATEGY_CALLS]
            for owner, name, replica_level in patched:
                method = getattr(owner, name)
                _ORIGINALS.append((owner, name, owner.__dict__.get(name)))
                setattr(owner, name, _counted(name, method, replica_level))
        _OPEN_COUNTERS.append(counter)


def _close(counter: "_CallCounter") -> None:
    with _PATCH_LOCK:
        _OPEN_COUNTERS.remove(counter)
        if not _OPEN_COUNTERS:
            for owner, name, original in reversed(_ORIGINALS):
                if original is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
            _ORIGINALS.clear()


@contextlib.contextmanager
def count_cross_replica_calls() -> Iterator[Dict[str, int]]:
    """Counts the cross-replica calls one replica makes while the block runs (or traces).

    Counts, per replica, the outermost calls of `ReplicaContext.all_reduce`
    and `all_gather` (a replica asking the others; the most any one replica
    made), and the strategy's `reduce_to` / `batch_reduce_to` made outside
    those (an aggregated variable write, a cross-replica read or reduction).
    A call made inside another counted one is part of it. Count a
    `tf.function` step by tracing it inside the block (e.g.
    `step.get_concrete_function(...)`): tracing runs the Python once per
    replica, and backward calls are made while the gradient is traced.

    A diagnostic: while any block is open, TensorFlow's collective methods
    are wrapped process-wide (the first block to open wraps them, the last to
    close restores them), and every open block counts every call made in the
    process, whichever thread makes it.

    Yields:
        A dict `{"all_reduce": n, "all_gather": n, "reduce_to": n, "batch_reduce_to": n}`, filled when the block exits.

    Raises:
        ValueError: on a Keras backend other than TensorFlow.
    """
    require_tensorflow("`count_cross_replica_calls` (tf.distribute)")
    counter = _CallCounter()
    counts: Dict[str, int] = {}
    _open(counter)
    try:
        yield counts
    finally:
        _close(counter)
        counts.update(counter.totals())


HLO_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def count_hlo_collectives(fn: Callable, *args, **kwargs) -> Dict[str, int]:
    """Counts the collectives in the compiled (optimized) HLO of `jax.jit(fn)(*args, **kwargs)`.

    What XLA runs, after its passes: the collectives the SPMD partitioner
    inserted for sharded arrays, those written with `jax.lax` inside
    `jax.shard_map`, each counted once however many arrays it carries (XLA's
    combiners merge independent all-reduces of a step into one tuple-shaped
    op). Asynchronous pairs count once (their `-start`).

    Args:
        fn: A function of JAX arrays (a jitted one is jitted again as is).
        *args: Its arguments, placed (sharded) as the real call's are.
        **kwargs: Its keyword arguments.

    Returns:
        `{op: count}` for each of `HLO_COLLECTIVES`, plus "total".
    """
    import jax

    text = jax.jit(fn).lower(*args, **kwargs).compile().as_text()
    counts = {op: len(re.findall(rf"\s{op}(?:-start)?\(", text)) for op in HLO_COLLECTIVES}
    counts["total"] = sum(counts.values())
    return counts
