"""The one place that turns a strategy name into a `tf.distribute.Strategy`.

    strategy = get_strategy("auto")
    with strategy.scope():
        model = build_lenet()

Names: auto (MirroredStrategy over all GPUs when there are several, or over
the logical CPU devices made by `configure_cpu_replicas`; one device
otherwise), mirrored, multi-worker (MultiWorkerMirroredStrategy configured by
the TF_CONFIG environment variable), one-device, default.
"""

from __future__ import annotations

import json
import os
from typing import List

import tensorflow as tf

STRATEGY_NAMES = ("auto", "mirrored", "multi-worker", "one-device", "default")


def configure_cpu_replicas(count: int) -> None:
    """Splits the CPU into `count` logical devices, so MirroredStrategy can run `count` replicas.

    Must run before TensorFlow initialises its devices (before any op runs);
    afterwards TensorFlow refuses, and this raises a RuntimeError saying so.
    """
    if count <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        raise RuntimeError(
            f"`cpu_replicas={count}` must be set before TensorFlow initialises its devices "
            f"(call configure_cpu_replicas first thing in a fresh process): {error}"
        ) from error


def _devices() -> List[str]:
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return [d.name for d in gpus]
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def get_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Returns the strategy called `name` (see the module docstring)."""
    if name not in STRATEGY_NAMES:
        raise ValueError(f"`strategy` must be one of {STRATEGY_NAMES}. Received: strategy={name!r}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multi-worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "`strategy='multi-worker'` needs the TF_CONFIG environment variable "
                "(cluster and task of this worker). Received: TF_CONFIG unset"
            )
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    devices = _devices()
    if name == "one-device" or (name == "auto" and len(devices) == 1):
        return tf.distribute.OneDeviceStrategy(devices[0])
    # MirroredStrategy's default all-reduce (NCCL) needs GPUs; on logical
    # CPU devices it must copy through the host.
    cross_device_ops = None if tf.config.list_logical_devices("GPU") else tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the process that writes artifacts: always, except non-chief multi-workers."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = tf_config.get("task", {})
    task_type, index = task.get("type"), task.get("index", 0)
    has_chief = "chief" in tf_config.get("cluster", {})
    return task_type == "chief" or (not has_chief and task_type == "worker" and index == 0)


def num_workers_from_tf_config() -> int:
    """Workers (chief included) in the cluster TF_CONFIG describes; 0 without TF_CONFIG."""
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def describe(strategy: tf.distribute.Strategy) -> str:
    """E.g. 'MirroredStrategy on 2 replica(s) (CPU:0, CPU:1)'."""
    devices = getattr(strategy.extended, "worker_devices", ()) or ()
    short = ", ".join(d.split("/")[-1].replace("device:", "") for d in devices)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Its class is CollectiveAllReduceStrategy; worker_devices are this worker's.
        return (
            f"MultiWorkerMirroredStrategy on {strategy.num_replicas_in_sync} replica(s) over "
            f"{num_workers_from_tf_config()} worker(s) ({short} on each)"
        )
    return f"{type(strategy).__name__} on {strategy.num_replicas_in_sync} replica(s) ({short})"
