"""`kerasbn.BatchNorm` under `tf.distribute`, on logical CPU replicas.

Multi-replica runs need the CPU split into logical devices before TensorFlow
initialises, so every scenario runs in a fresh process (`tests/_dist_worker.py`):
one `MirroredStrategy` process per replica count (2 and 3) covers the custom
training loops, saving, `model.fit`, `recompute_statistics` and global batches
small enough that a replica holds one example or none; a two-process
`MultiWorkerMirroredStrategy` cluster on 127.0.0.1 covers multi-worker runs.
The worker saves arrays to an `.npz` file; the assertions live here, against
a single-device layer run in the worker and float64 NumPy closed forms
computed here.

This file needs nothing from conftest.py (processes: `tests/_procs.py`) and does not
import TensorFlow itself (the workers use the TensorFlow backend whatever `KERAS_BACKEND` says).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _procs import WORKER_ENV, load_module, logs, run_python, run_workers

TESTS_DIR = Path(__file__).resolve().parent
WORKER = TESTS_DIR / "_dist_worker.py"
SEED = 1234
WORKER_TIMEOUT_S = 300  # a MirroredStrategy process takes ~15 s on an idle 2-core machine

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="tf.distribute tests need TensorFlow installed"
)


worker = load_module(WORKER, "kerasbn_dist_worker")  # it imports only NumPy at module level
MOMENTUM, EPSILON, LEARNING_RATE = worker.MOMENTUM, worker.EPSILON, worker.LEARNING_RATE

# Float32 distributed results against the float32 single-device layer, and
# against float64 closed forms (STYLE.md: closed forms at 1e-5).
LAYER_TOL = dict(rtol=1e-5, atol=1e-6)
CLOSED_FORM_TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ running workers


# tf.distribute is TensorFlow's, even in a JAX test run.
DIST_ENV = {**WORKER_ENV, "KERAS_BACKEND": "tensorflow"}


def _load(path: Path) -> dict:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}replicas")
def mirrored(request, tmp_path_factory):
    """Results of one MirroredStrategy worker process with `request.param` logical CPU replicas."""
    replicas = request.param
    workdir = tmp_path_factory.mktemp(f"mirrored{replicas}")
    out = workdir / "results.npz"
    args = [WORKER, "mirrored", "--replicas", replicas, "--seed", SEED, "--out", out, "--workdir", workdir]
    proc = run_python(args, env=DIST_ENV, timeout=WORKER_TIMEOUT_S)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"], summary
    results = _load(out)
    assert int(results["num_replicas"]) == replicas
    return replicas, results


# ------------------------------------------------------------- float64 references


def np_moments(x):
    """Float64 mean and biased variance per channel (last axis) over all other axes."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    return x.mean(axis=axes), x.var(axis=axes)


def np_train_forward_backward(x, upstream, gamma, beta):
    """Training-mode output and the gradients of `sum(upstream * output)`, in float64.

    With s = 1/sqrt(var + eps), xhat = (x - mean) s, g = upstream * gamma and
    means over the reduced axes:
    dx = s (g - mean(g) - xhat mean(g xhat)), dgamma = sum(upstream xhat), dbeta = sum(upstream).
    """
    x = np.asarray(x, np.float64)
    upstream = np.asarray(upstream, np.float64)
    axes = tuple(range(x.ndim - 1))
    mean, variance = np_moments(x)
    inv_std = 1.0 / np.sqrt(variance + EPSILON)
    x_hat = (x - mean) * inv_std
    outputs = gamma * x_hat + beta
    g = upstream * gamma
    dx = inv_std * (g - g.mean(axis=axes) - x_hat * (g * x_hat).mean(axis=axes))
    return outputs, dx, (upstream * x_hat).sum(axis=axes), upstream.sum(axis=axes)


def _initial():
    gamma, beta, moving_mean, moving_variance = (w.astype(np.float64) for w in worker.initial_weights(SEED))
    return gamma, beta, moving_mean, moving_variance


def _copies(results, key, name, count):
    return [results[f"{key}.copy{c}.{name}"] for c in range(count)]


def _assert_copies_agree(results, key, count, expected_mean, expected_variance, tol, what):
    """Every replica's copy of the moving statistics is identical, and equals the expectation."""
    for name, expected in (("moving_mean", expected_mean), ("moving_variance", expected_variance)):
        copies = _copies(results, key, name, count)
        assert len(copies) == count
        for copy, value in enumerate(copies):
            np.testing.assert_array_equal(value, copies[0], err_msg=f"{what}: {name} of replica {copy} != replica 0")
            np.testing.assert_allclose(value, expected, **tol, err_msg=f"{what}: {name} of replica {copy}")


# ------------------------------------------------------------------------- checks
# Shared by the MirroredStrategy tests and the multi-worker test: `results`
# holds per global replica id r the keys `{scenario}.s{step}.r{r}.*`, and the
# moving statistics of each replica copy as `{scenario}.s{step}.copy{c}.*`.


def check_synchronized(results, replicas):
    """synchronized=True equals a single-device layer fed the whole global batch."""
    splits = worker.SPLITS[replicas]
    assert any(sum(sizes) % replicas for sizes in splits), "no global batch the replica count does not divide"
    gamma, beta, moving_mean, moving_variance = _initial()
    for step, sizes in enumerate(splits):
        key, ref = f"sync.s{step}", f"sync.ref.s{step}"
        where = f"synchronized=True, {replicas} replicas, step {step}, slices {sizes}"
        slices = [results[f"{key}.r{r}.inputs"] for r in range(replicas)]
        assert [len(s) for s in slices] == sizes, f"{where}: replicas got slices of {[len(s) for s in slices]}"
        global_x = np.concatenate(slices)
        global_upstream = np.concatenate([results[f"{key}.r{r}.upstream"] for r in range(replicas)])
        if len(set(sizes)) > 1:
            # The data make the count weighting matter: averaging the
            # replicas' means without their counts would be visibly wrong.
            naive_mean = np.mean([np_moments(s)[0] for s in slices], axis=0)
            assert np.max(np.abs(naive_mean - np_moments(global_x)[0])) > 0.05, where

        outputs = np.concatenate([results[f"{key}.r{r}.outputs"] for r in range(replicas)])
        input_grad = np.concatenate([results[f"{key}.r{r}.input_grad"] for r in range(replicas)])
        np.testing.assert_allclose(outputs, results[f"{ref}.outputs"], **LAYER_TOL, err_msg=f"{where}: outputs")
        np.testing.assert_allclose(
            input_grad, results[f"{ref}.input_grad"], **LAYER_TOL, err_msg=f"{where}: input gradient"
        )
        for r in range(replicas):
            for name in ("gamma_grad", "beta_grad"):
                np.testing.assert_allclose(
                    results[f"{key}.r{r}.{name}"], results[f"{ref}.{name}"], **LAYER_TOL,
                    err_msg=f"{where}: all-reduced {name} on replica {r}",
                )

        # The float64 closed form of the global-batch layer, step by step.
        np.testing.assert_allclose(results[f"{key}.gamma_before"], gamma, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(results[f"{key}.beta_before"], beta, rtol=1e-5, atol=1e-6)
        np_outputs, np_dx, np_dgamma, np_dbeta = np_train_forward_backward(global_x, global_upstream, gamma, beta)
        np.testing.assert_allclose(outputs, np_outputs, **CLOSED_FORM_TOL, err_msg=f"{where}: outputs vs float64")
        np.testing.assert_allclose(input_grad, np_dx, **CLOSED_FORM_TOL, err_msg=f"{where}: dx vs float64")
        np.testing.assert_allclose(results[f"{key}.r0.gamma_grad"], np_dgamma, **CLOSED_FORM_TOL)
        np.testing.assert_allclose(results[f"{key}.r0.beta_grad"], np_dbeta, **CLOSED_FORM_TOL)
        batch_mean, batch_variance = np_moments(global_x)
        moving_mean = MOMENTUM * moving_mean + (1 - MOMENTUM) * batch_mean
        moving_variance = MOMENTUM * moving_variance + (1 - MOMENTUM) * batch_variance
        np.testing.assert_allclose(results[f"{ref}.moving_mean"], moving_mean, **CLOSED_FORM_TOL)
        np.testing.assert_allclose(results[f"{ref}.moving_variance"], moving_variance, **CLOSED_FORM_TOL)
        _assert_copies_agree(
            results, key, replicas, results[f"{ref}.moving_mean"], results[f"{ref}.moving_variance"],
            LAYER_TOL, where,
        )
        gamma = gamma - LEARNING_RATE * results[f"{key}.r0.gamma_grad"]
        beta = beta - LEARNING_RATE * results[f"{key}.r0.beta_grad"]
    return moving_mean, moving_variance, gamma, beta


def check_unsynchronized(results, replicas, workers=1):
    """synchronized=False: local normalization; each replica's own moving statistics until the handover.

    Each replica's copy is the moving average of its own batch statistics
    (no cross-replica call in the step); `sync_moving_statistics` then sets
    every copy to their mean. A read outside replicas before the handover is
    the mean of the copies in one process (MirroredStrategy), and this
    worker's own copy under MultiWorkerMirroredStrategy (never a collective).
    """
    gamma, beta, moving_mean, moving_variance = _initial()
    copies = [(moving_mean, moving_variance)] * replicas
    for step, sizes in enumerate(worker.SPLITS[replicas]):
        key = f"unsync.s{step}"
        where = f"synchronized=False, {replicas} replicas, step {step}, slices {sizes}"
        for r in range(replicas):
            x = results[f"{key}.r{r}.inputs"]
            assert len(x) == sizes[r], where
            outputs = results[f"{key}.r{r}.outputs"]
            np.testing.assert_allclose(
                outputs, results[f"unsync.ref.s{step}.r{r}.outputs"], **LAYER_TOL,
                err_msg=f"{where}: replica {r} vs a single-device layer on its slice",
            )
            np_outputs = np_train_forward_backward(x, np.zeros_like(x), gamma, beta)[0]
            np.testing.assert_allclose(outputs, np_outputs, **CLOSED_FORM_TOL, err_msg=f"{where}: replica {r}")
            local_mean, local_variance = np_moments(x)
            old_mean, old_variance = copies[r]
            copies[r] = (
                MOMENTUM * old_mean + (1 - MOMENTUM) * local_mean,
                MOMENTUM * old_variance + (1 - MOMENTUM) * local_variance,
            )
            for index, name in enumerate(("moving_mean", "moving_variance")):
                np.testing.assert_allclose(
                    results[f"{key}.copy{r}.{name}"], copies[r][index], **CLOSED_FORM_TOL,
                    err_msg=f"{where}: replica {r}'s own {name}",
                )
    moving_mean = np.mean([c[0] for c in copies], axis=0)
    moving_variance = np.mean([c[1] for c in copies], axis=0)
    assert np.max(np.abs(copies[0][0] - copies[-1][0])) > 0.05, "the copies did not drift: a weak test"
    expected = {"moving_mean": moving_mean, "moving_variance": moving_variance}
    assert int(results["unsync.handover_layers"]) == 1
    _assert_copies_agree(results, "unsync.handover", replicas, moving_mean, moving_variance, CLOSED_FORM_TOL,
                         "after sync_moving_statistics")
    for index, name in enumerate(("moving_mean", "moving_variance")):
        if workers == 1:
            np.testing.assert_allclose(results[f"unsync.read_before_handover.{name}"], expected[name],
                                       **CLOSED_FORM_TOL, err_msg=f"a read of {name} outside replicas")
        else:
            for w in range(workers):
                np.testing.assert_allclose(results[f"unsync.read_before_handover.{name}.worker{w}"],
                                           copies[w][index], **CLOSED_FORM_TOL,
                                           err_msg=f"worker {w}'s read of {name}: its own copy")
    return moving_mean, moving_variance


# -------------------------------------------------------------- MirroredStrategy


def test_synchronized_matches_single_device_layer_on_global_batch(mirrored):
    """Outputs, gradients and moving statistics over 3 steps, unequal slices included."""
    replicas, results = mirrored
    check_synchronized(results, replicas)


def test_unsynchronized_moving_statistics_agree_where_stock_layer_drifts(mirrored):
    replicas, results = mirrored
    check_unsynchronized(results, replicas)

    # Stock keras.layers.BatchNormalization, fed the same slices: each replica
    # keeps only its own updates, so the copies drift apart (the defect
    # kerasbn fixes), and a saved model holds replica 0's.
    keras_version = str(results["keras_version"])
    last = len(worker.SPLITS[replicas]) - 1
    stock_means = np.stack(_copies(results, f"stock.s{last}", "moving_mean", replicas))
    spread = float(np.max(stock_means.max(axis=0) - stock_means.min(axis=0)))
    assert spread > 0.1, (
        f"stock keras.layers.BatchNormalization (Keras {keras_version}) kept its {replicas} replicas' moving "
        f"means together (spread {spread:.2e}): the replica drift kerasbn.BatchNorm exists to fix seems to be "
        "fixed upstream. Revisit this test and docs/guides/differences.md's claim."
    )
    _, _, moving_mean, moving_variance = _initial()
    stock = [(moving_mean.copy(), moving_variance.copy()) for _ in range(replicas)]
    for step in range(last + 1):
        for r in range(replicas):
            local_mean, local_variance = np_moments(results[f"unsync.s{step}.r{r}.inputs"])
            mean, variance = stock[r]
            stock[r] = (
                MOMENTUM * mean + (1 - MOMENTUM) * local_mean,
                MOMENTUM * variance + (1 - MOMENTUM) * local_variance,
            )
            np.testing.assert_allclose(results[f"stock.s{step}.copy{r}.moving_mean"], stock[r][0], **CLOSED_FORM_TOL)
            np.testing.assert_allclose(
                results[f"stock.s{step}.copy{r}.moving_variance"], stock[r][1], **CLOSED_FORM_TOL
            )


def test_saved_model_holds_agreed_moving_statistics(mirrored):
    """get_weights() and a reloaded .keras file hold the mean of the replicas' copies, not replica 0's.

    Saved before the handover, while the copies differ, and after it, when
    every copy holds that mean.
    """
    replicas, results = mirrored
    sync_mean, sync_variance, sync_gamma, sync_beta = check_synchronized(results, replicas)
    unsync_mean, unsync_variance = check_unsynchronized(results, replicas)
    last = len(worker.SPLITS[replicas]) - 1
    for source in ("get_weights", "reloaded"):
        for name, mean in (("moving_mean", unsync_mean), ("moving_variance", unsync_variance)):
            saved = results[f"saved.drifted.{source}.{name}"]
            np.testing.assert_allclose(saved, mean, **CLOSED_FORM_TOL, err_msg=f"drifted {source} {name}")
            replica0 = results[f"unsync.s{last}.copy0.{name}"]
            assert np.max(np.abs(saved - replica0)) > 1e-2, (f"drifted {source} {name}: the saved value is "
                                                             f"replica 0's copy {replica0}, not the mean {mean}")
    gamma, beta, _, _ = _initial()
    expected = {
        "sync": dict(moving_mean=sync_mean, moving_variance=sync_variance, gamma=sync_gamma, beta=sync_beta),
        "unsync": dict(moving_mean=unsync_mean, moving_variance=unsync_variance, gamma=gamma, beta=beta),
    }
    for scenario, weights in expected.items():
        for source in ("get_weights", "reloaded"):
            for name, value in weights.items():
                saved = results[f"saved.{scenario}.{source}.{name}"]
                np.testing.assert_allclose(saved, value, **CLOSED_FORM_TOL, err_msg=f"{scenario} {source} {name}")
            copies_key = f"{scenario}.s{last}" if scenario == "sync" else "unsync.handover"
            for name in ("moving_mean", "moving_variance"):
                for copy, value in enumerate(_copies(results, copies_key, name, replicas)):
                    # Both are the mean over the replicas' copies, summed in another
                    # order (3 replicas: one float32 ulp apart).
                    np.testing.assert_allclose(
                        results[f"saved.{scenario}.{source}.{name}"], value, rtol=3e-7, atol=0,
                        err_msg=f"{scenario} {source} {name} != replica {copy}'s",
                    )


@pytest.mark.parametrize("synchronized", [True, False], ids=["sync", "unsync"])
def test_fit_keeps_replicas_moving_statistics_equal(mirrored, synchronized):
    replicas, results = mirrored
    prefix = f"fit.sync{int(synchronized)}"
    loss = results[f"{prefix}.loss"]
    assert loss.shape == (2,) and np.all(np.isfinite(loss)), loss
    for name in ("moving_mean", "moving_variance"):
        copies = results[f"{prefix}.copies.{name}"]
        assert copies.shape == (replicas, 4)
        assert np.all(np.isfinite(copies))
        for copy in range(1, replicas):
            np.testing.assert_array_equal(copies[copy], copies[0], err_msg=f"fit: {name} of replica {copy}")
        moved = np.max(np.abs(copies[0] - results[f"{prefix}.initial.{name}"]))
        assert moved > 1e-2, f"fit did not update {name}: {copies[0]}"


@pytest.mark.parametrize("synchronized", [True, False], ids=["sync", "unsync"])
def test_recompute_statistics_on_mirrored_model(mirrored, synchronized):
    """Every replica ends with the plain average of the per-batch statistics.

    The worker calls `recompute_statistics` inside `strategy.scope()` for the
    synchronized model and outside it for the other.
    """
    replicas, results = mirrored
    prefix = f"recompute.sync{int(synchronized)}"
    features = results[f"{prefix}.features"]  # the BatchNorm's input, per batch
    assert int(results[f"{prefix}.batches_used"]) == len(features) == 3
    batch_moments = [np_moments(batch) for batch in features]
    expected = {
        "moving_mean": np.mean([m for m, _ in batch_moments], axis=0),
        "moving_variance": np.mean([v for _, v in batch_moments], axis=0),
    }
    for name, value in expected.items():
        copies = results[f"{prefix}.copies.{name}"]
        assert copies.shape == (replicas, 4)
        for copy in range(replicas):
            np.testing.assert_allclose(copies[copy], value, **CLOSED_FORM_TOL, err_msg=f"{name} of replica {copy}")
        # recompute_statistics really replaced what fit left behind.
        assert np.max(np.abs(value - results[f"fit.sync{int(synchronized)}.copies.{name}"][0])) > 1e-2


@pytest.mark.parametrize("kind", sorted(worker.EDGE_FEATURE_SHAPES))
@pytest.mark.parametrize("synchronized", [False, True], ids=["unsync", "sync"])
def test_slices_of_one_example_and_of_none(mirrored, kind, synchronized):
    """Uneven small global batches: a replica with one example trains on, one with none adds no NaN.

    synchronized=False: each replica updates its own copy with its local
    statistics, and an empty slice leaves its copy as it was.
    synchronized=True: the statistics of the global batch, as on one device.
    """
    replicas, results = mirrored
    prefix = f"edges.{kind}.sync{int(synchronized)}"
    gamma, beta, moving_mean, moving_variance = results[f"{prefix}.initial"].astype(np.float64)
    copies = [(moving_mean, moving_variance)] * replicas  # each replica's own moving statistics
    for step, sizes in enumerate(worker.EDGE_SPLITS[replicas]):
        key = f"{prefix}.s{step}"
        where = f"{prefix}, {replicas} replicas, step {step}, slices {sizes}"
        slices = [results[f"{key}.r{r}.inputs"] for r in range(replicas)]
        assert [len(s) for s in slices] == sizes, where
        if synchronized:
            global_x = np.concatenate(slices)
            mean, variance = np_moments(global_x)
            for r, x in enumerate(slices):
                expected = gamma * (x - mean) / np.sqrt(variance + EPSILON) + beta
                np.testing.assert_allclose(results[f"{key}.r{r}.outputs"], expected, **CLOSED_FORM_TOL, err_msg=where)
            moving_mean = MOMENTUM * moving_mean + (1 - MOMENTUM) * mean
            moving_variance = MOMENTUM * moving_variance + (1 - MOMENTUM) * variance
        else:
            for r, x in enumerate(slices):
                if not len(x):
                    continue  # an empty slice leaves this replica's copy as it was
                outputs = results[f"{key}.r{r}.outputs"]
                np_outputs = np_train_forward_backward(x, np.zeros_like(x), gamma, beta)[0]
                np.testing.assert_allclose(outputs, np_outputs, **CLOSED_FORM_TOL, err_msg=f"{where}: replica {r}")
                np.testing.assert_allclose(
                    outputs, results[f"{key}.r{r}.stock_outputs"], **CLOSED_FORM_TOL,
                    err_msg=f"{where}: replica {r} vs keras.layers.BatchNormalization",
                )
                mean, variance = np_moments(x)
                old_mean, old_variance = copies[r]
                copies[r] = (
                    MOMENTUM * old_mean + (1 - MOMENTUM) * mean,
                    MOMENTUM * old_variance + (1 - MOMENTUM) * variance,
                )
        for name in ("moving_mean", "moving_variance"):
            for copy in _copies(results, key, name, replicas):
                assert np.all(np.isfinite(copy)), f"{where}: {name} {copy}"
        if synchronized:
            _assert_copies_agree(results, key, replicas, moving_mean, moving_variance, CLOSED_FORM_TOL, where)
        else:
            for r in range(replicas):
                for index, name in enumerate(("moving_mean", "moving_variance")):
                    np.testing.assert_allclose(results[f"{key}.copy{r}.{name}"], copies[r][index],
                                               **CLOSED_FORM_TOL, err_msg=f"{where}: replica {r}'s own {name}")


def test_fused_true_raises_for_synchronized_nchw(mirrored):
    _, results = mirrored
    assert (
        "`fused=True` cannot take the fused kernel here: synchronized NCHW (the inference-mode gradient kernel "
        "takes NHWC only). Use fused=None to let the layer choose. Received: fused=True, inputs.shape=(2, 4, 2, 2)"
    ) in str(results["edges.fused_true_error"])


# ------------------------------------------------------------- the contract's costs


def _per_layer(results, kind, step):
    """Cross-replica calls per batch-norm layer (3 layers minus 1, halved) and the 1-layer total, by kind."""
    names = ("all_reduce", "all_gather", "reduce_to", "batch_reduce_to")
    one = {n: int(results[f"counts.{kind}.1.{step}.{n}"]) for n in names}
    three = {n: int(results[f"counts.{kind}.3.{step}.{n}"]) for n in names}
    per_layer = {n: (three[n] - one[n]) / 2 for n in names}
    return per_layer, one


def test_cross_replica_calls_per_step(mirrored):
    """synchronized=True: 2 per layer, both all-reduces (stock: 5); synchronized=False: 0; inference: 0 at all."""
    _, results = mirrored
    sync, _ = _per_layer(results, "kerasbn_sync", "train")
    assert sync == {"all_reduce": 2, "all_gather": 0, "reduce_to": 0, "batch_reduce_to": 0}, sync
    unsync, unsync_total = _per_layer(results, "kerasbn_unsync", "train")
    assert sum(unsync.values()) == 0, unsync
    # What is left in the step is the optimizer's one batched gradient all-reduce.
    assert unsync_total == {"all_reduce": 1, "all_gather": 0, "reduce_to": 0, "batch_reduce_to": 0}, unsync_total
    stock, _ = _per_layer(results, "stock_sync", "train")
    assert sum(stock.values()) == 5, f"stock synchronized BN per layer: {stock} (docs/guides/distribution.md quotes 5)"
    for kind in ("kerasbn_sync", "kerasbn_unsync"):
        for layers in (1, 3):
            for name in ("all_reduce", "all_gather", "reduce_to", "batch_reduce_to"):
                assert int(results[f"counts.{kind}.{layers}.infer.{name}"]) == 0, (kind, layers, name)


def test_inference_inside_replicas_where_no_collective_can_go(mirrored):
    """An RNN cell's while loop, a nested tf.function around inference_function, and predict."""
    _, results = mirrored
    reference = results["anywhere.reference"]
    np.testing.assert_allclose(results["anywhere.rnn"], reference, **LAYER_TOL, err_msg="RNN cell in strategy.run")
    np.testing.assert_allclose(results["anywhere.predict"], reference, **LAYER_TOL, err_msg="predict")
    np.testing.assert_allclose(
        results["anywhere.inference_function"], results["anywhere.inference_reference"], **LAYER_TOL,
        err_msg="strategy.run(tf.function(inference_function))",
    )


def _np_masked_reference(x, mask, upstream, gamma, beta):
    """Float64 masked global-batch normalization of (batch, time, C) and the gradient of sum(upstream * y)."""
    x = np.asarray(x, np.float64)
    keep = np.broadcast_to(mask[..., None], x.shape)
    count = keep.sum(axis=(0, 1))
    mean = np.where(keep, x, 0.0).sum(axis=(0, 1)) / count
    variance = (np.where(keep, x - mean, 0.0) ** 2).sum(axis=(0, 1)) / count
    inv_std = 1.0 / np.sqrt(variance + EPSILON)
    outputs = gamma * (x - mean) * inv_std + beta
    # Every position's output depends on the statistics; only kept positions shape them.
    grad_mean = -gamma * inv_std * upstream.sum(axis=(0, 1))
    grad_variance = -0.5 * gamma * inv_std**3 * (upstream * (x - mean)).sum(axis=(0, 1))
    dx = gamma * inv_std * upstream + keep * (grad_mean + 2.0 * grad_variance * (x - mean)) / count
    return outputs, dx, mean, variance


def test_synchronized_masked_mixed_precision_against_float64(mirrored):
    """mixed_float16, a mask over far-off padding, uneven slices with an empty one: the global batch's numbers."""
    replicas, results = mirrored
    gamma, beta, moving_mean, moving_variance = _initial()
    for step, sizes in enumerate(worker.MASKED_SPLITS[replicas]):
        key = f"masked.s{step}"
        x, mask, upstream = results[f"{key}.inputs"], results[f"{key}.mask"], results[f"{key}.upstream"]
        outputs, dx, mean, variance = _np_masked_reference(x, mask, upstream, gamma, beta)
        where = f"{replicas} replicas, slices {sizes}"
        # float16 outputs and input gradients: half a float16 ulp is 5e-4 relative.
        np.testing.assert_allclose(results[f"{key}.outputs"], outputs, rtol=2e-3, atol=2e-3, err_msg=where)
        np.testing.assert_allclose(results[f"{key}.input_grad"], dx, rtol=5e-3, atol=2e-3, err_msg=where)
        moving_mean = MOMENTUM * moving_mean + (1 - MOMENTUM) * mean
        moving_variance = MOMENTUM * moving_variance + (1 - MOMENTUM) * variance
        np.testing.assert_allclose(results[f"{key}.moving_mean"], moving_mean, rtol=1e-5, atol=1e-4, err_msg=where)
        np.testing.assert_allclose(results[f"{key}.moving_variance"], moving_variance, rtol=1e-5, atol=1e-4,
                                   err_msg=where)


# ----------------------------------------------------- MultiWorkerMirroredStrategy


CHIEF_ALONE_IDLE_S = 40  # how long the second worker stays alive, idle, while the chief works alone


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout to bound the workers")
def test_multi_worker_mirrored_strategy(tmp_path):
    """Two workers on 127.0.0.1: the single-process results, the handover, and the chief alone.

    The chief alone (the other worker alive but idle) reads `get_weights()`
    and saves a .keras file at once, and `sync_moving_statistics` raises
    within its 5 s timeout instead of hanging.
    """
    workers = 2
    worker_args = [[WORKER, "multi-worker", "--seed", SEED, "--out", tmp_path / f"worker{i}.npz",
                    "--chief-alone", CHIEF_ALONE_IDLE_S] for i in range(workers)]
    results = run_workers(worker_args, tmp_path, env=DIST_ENV, timeout=180)
    if any(code for code, _ in results):
        output = "\n".join(f"--- worker {i} (exit {code}) ---\n{logs(log, 6000)}" for i, (code, log) in enumerate(results))
        pytest.fail(f"MultiWorkerMirroredStrategy workers failed (124/137: timed out)\n{output}")

    per_worker = [_load(tmp_path / f"worker{i}.npz") for i in range(workers)]
    merged = {}
    for index, results in enumerate(per_worker):
        assert int(results["num_replicas"]) == workers
        assert int(results["task_index"]) == index
        for key, value in results.items():
            if "read_before_handover" in key:  # this worker's own read
                merged[f"{key}.worker{index}"] = value
            elif ".copy0." in key:  # each worker holds one replica's copy of each variable
                merged[key.replace(".copy0.", f".copy{index}.")] = value
            elif key in merged and key not in ("task_index",):
                # Shared keys (the single-device references) agree across workers.
                np.testing.assert_allclose(value, merged[key], rtol=1e-6, atol=0, err_msg=key)
            else:
                merged[key] = value
    check_synchronized(merged, workers)
    mean, variance = check_unsynchronized(merged, workers, workers=workers)

    # The chief alone, with the other worker alive and idle: reads and saves
    # return at once and hold the handed-over mean; the handover raises.
    chief = per_worker[0]
    print(f"chief alone: read {float(chief['alone.read_seconds']):.3f} s, save {float(chief['alone.save_seconds']):.3f} s, "
          f"handover raised after {float(chief['alone.sync_seconds']):.1f} s")
    assert float(chief["alone.read_seconds"]) < 5, chief["alone.read_seconds"]
    assert float(chief["alone.save_seconds"]) < 10, chief["alone.save_seconds"]
    gamma, beta, _, _ = _initial()
    np.testing.assert_allclose(chief["alone.weights"], np.concatenate([gamma, beta, mean, variance]),
                               **CLOSED_FORM_TOL)
    assert (tmp_path / "chief-alone.keras").stat().st_size > 0
    error = str(chief["alone.sync_error"])
    assert "every worker must call it" in error and "timeout_seconds=5" in error, error
    assert float(chief["alone.sync_seconds"]) < CHIEF_ALONE_IDLE_S / 2, chief["alone.sync_seconds"]
