"""Counting the collective ops a traced `tf.function` launches (a test helper; TensorFlow imported by the caller).

`kerasbn.count_cross_replica_calls` counts calls at the API; one API call can
launch several ops (TensorFlow's all-gather gathers the shapes, then the
data). This counts what the graph runs: every op whose type is a collective
(`CollectiveReduceV2`, `CollectiveGatherV2`, ... and NCCL's), in the traced
graph and in the bodies of the functions it calls (forward and backward
functions, control flow). Under `MirroredStrategy` every replica launches its
own, so divide by the replica count for a per-replica figure.
"""

from __future__ import annotations

from collections import Counter


def is_collective(op_type: str) -> bool:
    return op_type.startswith("Collective") or op_type.startswith("Nccl")


def count_collective_ops(concrete_function) -> Counter:
    """`Counter` of collective op types in `concrete_function`'s graph and its function library."""
    graph_def = concrete_function.graph.as_graph_def()
    counts = Counter(node.op for node in graph_def.node if is_collective(node.op))
    for function in graph_def.library.function:
        counts.update(node.op for node in function.node_def if is_collective(node.op))
    return counts
