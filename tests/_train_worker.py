"""Runs the training driver in this process and saves the weights it trained, for tests/test_train.py.

    PYTHONPATH=. python tests/_train_worker.py WEIGHTS.npz --strategy multi-worker --out RUN ...

Everything after WEIGHTS.npz goes to `training.train.main` unchanged, so this
is the same run as `python -m training.train ...`. Under
MultiWorkerMirroredStrategy only the chief writes artifacts, so a test cannot
read a non-chief worker's weights from the run folder. This wrapper keeps a
reference to the model the driver builds (`training.models.build_lenet` still
builds it; the wrapper only remembers its result) and, when `main` returns 0,
writes each of the model's variables, keyed by its path inside the model
(e.g. `bn1/moving_mean`), to WEIGHTS.npz: the weights this worker ends
with, after the driver's recomputation of the BN statistics.

Exit status: that of `main`.
"""

from __future__ import annotations

import sys

import numpy as np


def main(argv) -> int:
    if len(argv) < 1 or not argv[0].endswith(".npz"):
        print("usage: _train_worker.py WEIGHTS.npz [training.train flags...]", file=sys.stderr)
        return 2
    weights_path, train_argv = argv[0], argv[1:]

    from training import models, train

    built = []
    build_lenet = models.build_lenet

    def build_and_remember(*args, **kwargs):
        model = build_lenet(*args, **kwargs)
        built.append(model)
        return model

    models.build_lenet = build_and_remember
    status = train.main(train_argv)
    if status == 0:
        if len(built) != 1:
            print(f"error: expected the driver to build one model, it built {len(built)}", file=sys.stderr)
            return 3
        # Reading a distributed variable outside `strategy.run` gives this worker's copy.
        model = built[0]
        arrays = {
            variable.path.removeprefix(model.name + "/"): np.asarray(variable.numpy()) for variable in model.variables
        }
        np.savez(weights_path, **arrays)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
