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
    assert tf.distribute.ReplicaContext.all_reduce is tf.distribute.ReplicaContext.__mro__[1].all_reduce
    assert "all_reduce" not in tf.distribute.ReplicaContext.__dict__  # the inherited method is back


def test_sync_moving_statistics_without_a_strategy_does_nothing_and_checks_its_timeout():
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm()])
    assert kerasbn.sync_moving_statistics(model) == 0
    with pytest.raises(ValueError, match=r"`timeout_seconds` must be a non-negative number or None. "
                                         r"Received: timeout_seconds=-1"):
        kerasbn.sync_moving_statistics(model, timeout_seconds=-1)


def test_blocks_that_overlap_in_two_threads_restore_the_methods_whatever_the_order():
    """Two counting blocks open in two threads and closed in the order they opened (not nested)."""
    import threading

    original = tf.distribute.ReplicaContext.all_reduce
    first_open, second_open, first_closed = threading.Event(), threading.Event(), threading.Event()
    still_wrapped = []

    def first():
        with kerasbn.count_cross_replica_calls():
            first_open.set()
            second_open.wait(10)
        first_closed.set()

    def second():
        first_open.wait(10)
        with kerasbn.count_cross_replica_calls():
            second_open.set()
            first_closed.wait(10)
            # The first block closed: the second still counts.
            still_wrapped.append(tf.distribute.ReplicaContext.all_reduce is not original)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert still_wrapped == [True]
    assert tf.distribute.ReplicaContext.all_reduce is original
    assert "all_reduce" not in tf.distribute.ReplicaContext.__dict__


def test_a_model_built_outside_the_strategy_scope_is_an_error_not_a_race(run_python):
    """Replicas would write one plain variable in turn: the layer and the handover both say so."""
    result = run_python(
        """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, kerasbn
        strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
        model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm(name="bn")])  # no scope
        step = tf.function(lambda x: strategy.run(lambda x: model(x, training=True), args=(x,)))
        try:
            step(tf.ones([4, 3]))
        except ValueError as error:
            print("LAYER:", " ".join(str(error).split()))
        for label, call in (("EXPLICIT", lambda: kerasbn.sync_moving_statistics(model, strategy=strategy)),
                            ("SCOPE", None)):
            try:
                if call is None:
                    with strategy.scope():
                        kerasbn.sync_moving_statistics(model)
                else:
                    call()
            except ValueError as error:
                print(label + ":", " ".join(str(error).split()))
        with strategy.scope():
            inside = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm()])
        tf.function(lambda x: strategy.run(lambda x: inside(x, training=True), args=(x,)))(tf.ones([4, 3]))
        print("INSIDE:", kerasbn.sync_moving_statistics(inside))
        """,
        timeout=300,
    )
    lines = {line.split(":", 1)[0]: line for line in result.stdout.splitlines() if ":" in line}
    assert "Layer 'bn' runs in a replica" in lines["LAYER"] and "outside `strategy.scope()`" in lines["LAYER"]
    assert "with 2 replicas" in lines["EXPLICIT"] and "built outside `strategy.scope()`" in lines["EXPLICIT"]
    assert "Received: model=" in lines["SCOPE"]
    assert lines["INSIDE"] == "INSIDE: 1"
