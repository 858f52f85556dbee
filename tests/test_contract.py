"""`kerasbn.count_cross_replica_calls`, the counter the distribution contract's tests and the benchmark use.

One logical device is enough to see what is counted (MirroredStrategy on CPU:0
in this process); tests/test_distributed.py counts real steps on 2 and 3 replicas.
"""

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

if keras.backend.backend() != "tensorflow":
    pytest.skip("tf.distribute needs the TensorFlow backend", allow_module_level=True)

import kerasbn  # noqa: E402


def test_counts_outermost_calls_once_per_replica_and_restores_the_methods():
    strategy = tf.distribute.MirroredStrategy(["CPU:0"])

    def replica_step(x):
        x = x + 0.0  # placed on the replica's device (the all-reduce's destination)
        context = tf.distribute.get_replica_context()
        total = context.all_reduce("SUM", x)  # its own merge_call and batch_reduce_to are part of it
        gathered = context.all_gather(x, axis=0)
        # An aggregated write's shape: a merge function reducing across replicas.
        context.merge_call(lambda strategy, value: strategy.extended.reduce_to("SUM", value, "CPU:0"), args=(x,))
        return total + tf.reduce_sum(gathered)

    @tf.function
    def step(x):
        with strategy.scope():
            return strategy.extended.reduce_to("SUM", strategy.run(replica_step, args=(x,)), "CPU:0")

    with kerasbn.count_cross_replica_calls() as counts:
        step(tf.ones([2]))
    assert counts == {"all_reduce": 1, "all_gather": 1, "reduce_to": 2, "batch_reduce_to": 0}
    with kerasbn.count_cross_replica_calls() as counts:
        step(tf.ones([2]))  # traced already: no Python runs, nothing is counted
    assert sum(counts.values()) == 0
    assert "wrapper" not in tf.distribute.ReplicaContext.all_reduce.__qualname__
    assert "all_reduce" not in tf.distribute.ReplicaContext.__dict__  # the inherited method is back


def test_sync_moving_statistics_without_a_strategy_does_nothing_and_checks_its_timeout():
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm()])
    assert kerasbn.sync_moving_statistics(model) == 0
    with pytest.raises(ValueError, match=r"`timeout_seconds` must be a non-negative number or None. "
                                         r"Received: timeout_seconds=-1"):
        kerasbn.sync_moving_statistics(model, timeout_seconds=-1)
