"""kerasbn's benchmark: the layer against keras, the raw kernel and the memory floor.

    python -m bench                  # everything, about 20 minutes on a 2-core machine
    python -m bench --quick          # a few-minute smoke version (the tests run it)
    python -m bench --suite layer --repeats 9 --out /tmp/bench
    python -m bench --suite distributed   # synchronized BN, 2 replicas and 2 workers: ~6 minutes

Results go to bench/results/<date>-<host>.md and .json, copied to latest.md
and latest.json. The suites (see `bench.suites` for how to add one):

* floor:    memory bandwidth from a large copy; every layer measurement is
            also reported against it.
* layer:    the BN layer alone, train step and inference, six
            implementations side by side (`bench.implementations`).
* training: LeNet-BN training throughput, --norm kerasbn/keras/none, 1 and
            2 replicas (needs `training.models.build_lenet`).
* export:   the exported LeNet-BN SavedModel's inference, BN folded vs
            unfolded, batch 1 and 256 (`bench.export_suite`).
* models:   ResNet50, MobileNetV2, EfficientNetB0 training steps (stock,
            kerasbn.convert, no BN; 1 and 2 replicas) and inference (stock,
            kerasbn.fold, no BN) (`bench.models_suite`).
* distributed: ResNet50 with synchronized BN (stock, kerasbn) and kerasbn
            unsynchronized, MirroredStrategy and 2 MultiWorkerMirroredStrategy
            workers: steps timed, cross-replica calls counted; kerasbn's step
            with an unknown batch size (`bench.distributed_suite`).

This module stays free of TensorFlow imports: `python -m bench` sets the
environment first, and the training worker configures devices before
TensorFlow starts.
"""

from bench.suites import SUITES, BenchConfig, Suite, SuiteResult, register_suite

SUITE_MODULES = (
    "bench.floor", "bench.layer_suite", "bench.training_suite", "bench.export_suite", "bench.models_suite",
    "bench.distributed_suite",
)  # fmt: skip


def load_suites() -> dict:
    """Imports the suite modules (registering them in order) and returns `SUITES`."""
    import importlib

    for module in SUITE_MODULES:
        importlib.import_module(module)
    return SUITES


__all__ = ["SUITES", "BenchConfig", "Suite", "SuiteResult", "load_suites", "register_suite"]
