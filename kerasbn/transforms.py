"""Whole-model transforms: swap the batch-norm class (`convert`), fold batch norm away (`fold`).

Both walk the model's own graph through `keras.models.clone_model` (per layer
with `clone_function`, per call with `call_function`, so a layer can be
replaced or skipped), rebuild nested Sequential and Functional models the same
way, and return a new model with its own weights; the input model is never
changed. The math is `kerasbn.ops.fold_into_kernel` and `fold_affine`,
evaluated on float64 NumPy arrays; this module only does the surgery.

    fast = kerasbn.convert(keras.applications.ResNet50(weights=None), to="kerasbn")
    served = kerasbn.fold(fast)          # no batch-norm layer left
    print(served.fold_report)            # which pairs were folded, which became affine
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import keras
import numpy as np

from kerasbn import ops as bn_ops
from kerasbn.affine import Affine
from kerasbn.layer import BatchNorm

TARGETS = ("kerasbn", "keras")

# Layers whose output channels a following batch norm can be folded into:
# the kernel weight and the kernel axes that index the output channels (see
# `kerasbn.ops.fold_into_kernel`). Exact types: a subclass may change `call`.
_FOLDABLE = {
    keras.layers.Dense: ("kernel", (-1,)),
    keras.layers.Conv1D: ("kernel", (-1,)),
    keras.layers.Conv2D: ("kernel", (-1,)),
    keras.layers.Conv3D: ("kernel", (-1,)),
    keras.layers.Conv1DTranspose: ("kernel", (-2,)),
    keras.layers.Conv2DTranspose: ("kernel", (-2,)),
    keras.layers.Conv3DTranspose: ("kernel", (-2,)),
    keras.layers.DepthwiseConv1D: ("kernel", (-2, -1)),
    keras.layers.DepthwiseConv2D: ("kernel", (-2, -1)),
    keras.layers.SeparableConv1D: ("pointwise_kernel", (-1,)),
    keras.layers.SeparableConv2D: ("pointwise_kernel", (-1,)),
}


@dataclasses.dataclass(frozen=True)
class FoldReport:
    """What `kerasbn.fold` did, by layer path (`outer/inner/layer` for nested models).

    Attributes:
        folded: `(producer, batch_norm)` pairs: the batch norm was merged into
            the kernel and bias of the layer before it.
        affine: Batch norms that became a constant `kerasbn.Affine` layer.
    """

    folded: Tuple[Tuple[str, str], ...] = ()
    affine: Tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch norms into the layer before them, "
                 f"{len(self.affine)} became a constant affine x * a + b"]
        lines += [f"  fold   {bn} -> {producer}" for producer, bn in self.folded]
        lines += [f"  affine {bn}" for bn in self.affine]
        return "\n".join(lines)


def is_batch_norm(layer) -> bool:
    """Whether `layer` is a `kerasbn.BatchNorm` or a `keras.layers.BatchNormalization`."""
    return isinstance(layer, (BatchNorm, keras.layers.BatchNormalization))


def convert(model: keras.Model, to: str = "kerasbn") -> keras.Model:
    """A copy of `model` with every batch norm replaced by the other class.

    `to="kerasbn"` turns each `keras.layers.BatchNormalization` into a
    `kerasbn.BatchNorm`; `to="keras"` the reverse. Every weight (gamma, beta,
    moving mean and variance, renorm statistics), every config value, layer
    names and dtype policies carry over, so outputs agree in inference and in
    training mode. Other layers are cloned with their weights. Sequential and
    Functional models work, nested inside each other too, and so does a batch
    norm (or a model) inside `keras.layers.TimeDistributed` or another
    `keras.layers.Wrapper` rebuilt from its config's `layer`: the wrapper is
    rebuilt around the converted layer. Call it inside `strategy.scope()` to
    put the new model's variables on that strategy.

    Args:
        model: A built Sequential or Functional Keras model.
        to: "kerasbn" or "keras".

    Returns:
        A new model; `model` is not changed. It is a plain `keras.Sequential`
        or Functional model: a subclass (a keras-hub backbone or task model,
        for one) loses its class, its own methods, attributes and config,
        and keeps its layers, weights and outputs (Keras keeps only a
        Functional subclass whose constructor takes `(inputs, outputs,
        name=...)`). The result saves to `.keras` (load it with kerasbn
        imported).

    Raises:
        ValueError: for an unknown `to`, a model that is neither Sequential nor
            Functional, a custom layer or subclassed model holding a batch norm
            (it cannot be rebuilt from outside; so is Bidirectional), or, with `to="keras"`, a
            `kerasbn.BatchNorm` the stock layer cannot express
            (`virtual_batch_size`, several feature axes).
    """
    if to not in TARGETS:
        raise ValueError(f"`to` must be one of {TARGETS}. Received: to={to!r}")
    source = keras.layers.BatchNormalization if to == "kerasbn" else BatchNorm

    def clone(layer, path):
        if isinstance(layer, source) and not (to == "kerasbn" and isinstance(layer, BatchNorm)):
            new = _swap_batch_norm(layer, to, path)
            return new, lambda: _copy_weights_by_name(layer, new, path)
        return None

    return _rebuild(_check_model(model), clone, skipped=frozenset(), path="")


def fold(model: keras.Model) -> keras.Model:
    """An inference copy of `model` with no batch-norm layer left.

    For `kerasbn.BatchNorm` and `keras.layers.BatchNormalization` alike, in
    Sequential, Functional and nested models, using the moving statistics:

    * A batch norm right after a Dense, Conv1D/2D/3D, DepthwiseConv1D/2D,
      SeparableConv1D/2D or Conv1D/2D/3DTranspose layer whose activation is
      linear, whose output feeds nothing but that batch norm, and whose
      output channels are the batch norm's only feature axis, is folded into
      that layer's kernel and bias (a bias is added where there was none):
      `kerasbn.ops.fold_into_kernel`, computed in float64. The same holds
      for a `TimeDistributed` batch norm right after a `TimeDistributed`
      layer of those kinds.
    * Every other batch norm becomes a `kerasbn.Affine` layer: the constant
      per-channel `x * a + b` that `BatchNorm(training=False)` computes,
      inside the same wrapper where the batch norm was inside a
      `TimeDistributed` (or another wrapper `convert` can rebuild).

    A folded batch norm that was a Functional model's output, or cast to
    another dtype (float32 in a mixed-precision model), leaves an `Identity`
    of its name and dtype policy. The result's `fold_report` (a
    `FoldReport`) lists both kinds of batch norm. It saves to `.keras` (with
    kerasbn importable) and exports as a SavedModel, whose
    graph then holds no batch-norm op.

    Args:
        model: A built Sequential or Functional Keras model.

    Returns:
        A new model with attribute `fold_report` (not saved with it);
        `model` is not changed. As with `convert`, it is a plain
        `keras.Sequential` or Functional model: a subclass (a keras-hub
        backbone or task model, for one) loses its class, its own methods,
        attributes and config.

    Raises:
        ValueError: `model` is neither Sequential nor Functional, or a custom
            layer, a subclassed model or a Bidirectional wrapper holds a
            batch norm.
    """
    report = {"folded": [], "affine": []}
    folded = _fold(_check_model(model), report, path="")
    folded.fold_report = FoldReport(tuple(report["folded"]), tuple(report["affine"]))
    return folded


# ------------------------------------------------------------------- fold


def _fold(model, report, path):
    pairs = _foldable_pairs(model)  # id(batch norm) -> (batch norm, producer)
    producers = {id(producer): bn for bn, producer in pairs.values()}

    def clone(layer, layer_path):
        if id(layer) in producers:
            bn = producers[id(layer)]
            new = _with_bias(layer)
            report["folded"].append((layer_path, _join(path, bn.name)))
            return new, lambda: _assign_folded(layer, bn, new)
        if is_batch_norm(layer):
            new = Affine(axis=layer.axis, name=layer.name, dtype=layer.dtype_policy)
            report["affine"].append(layer_path)
            return new, lambda: new.set_weights(_affine_weights(layer))
        return None

    return _rebuild(model, clone, skipped=frozenset(pairs), path=path, nested=lambda m, p: _fold(m, report, p))


def _foldable_pairs(model) -> Dict[int, Tuple[object, object]]:
    """`{id(batch norm): (batch norm, producer)}` for each batch norm `fold` merges into its producer."""
    if isinstance(model, keras.Sequential):
        layers = model.layers
        return {
            id(bn): (bn, producer)
            for producer, bn in zip(layers, layers[1:])
            if _is_time_distributed_batch_norm(bn) and _can_fold_into(producer, bn)
        }
    nodes = [node for depth in model._nodes_by_depth.values() for node in depth]
    calls: Dict[int, int] = {}
    consumers: Dict[int, int] = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for tensor in node.input_tensors:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    for tensor in model.outputs:
        consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    pairs = {}
    for node in nodes:
        bn = node.operation
        # The input is the one positional argument; a Keras mask (from an
        # Embedding, a Masking layer) arrives as a second tensor, in `mask=`,
        # and inference ignores it.
        args = node.arguments.args
        if not _is_time_distributed_batch_norm(bn) or calls[id(bn)] != 1 or len(args) != 1 or not isinstance(args[0], keras.KerasTensor):
            continue
        tensor = args[0]
        producer = tensor._keras_history.operation
        if calls.get(id(producer)) == 1 and consumers[id(tensor)] == 1 and _can_fold_into(producer, bn):
            pairs[id(bn)] = (bn, producer)
    return pairs


def _is_time_distributed_batch_norm(layer) -> bool:
    """A batch norm, or one inside (nested) `TimeDistributed` wrappers."""
    while type(layer) is keras.layers.TimeDistributed:
        layer = layer.layer
    return is_batch_norm(layer)


def _can_fold_into(producer, bn) -> bool:
    """Whether `bn` normalizes exactly the output channels of a linear `producer`."""
    if type(bn) is keras.layers.TimeDistributed:
        # The same pair applied to every time step: the inner layers fold.
        return type(producer) is keras.layers.TimeDistributed and _can_fold_into(producer.layer, bn.layer)
    if type(producer) not in _FOLDABLE:
        return False
    if producer.activation is not keras.activations.linear:
        return False
    if getattr(producer, "quantization_mode", None) or getattr(producer, "lora_enabled", False):
        return False
    rank = len(bn.get_build_config()["input_shape"])
    if isinstance(producer, keras.layers.Dense) or producer.data_format == "channels_last":
        channel_axis = rank - 1
    else:
        channel_axis = 1
    return _feature_axes(bn, rank) == (channel_axis,)


def _with_bias(producer):
    """A copy of the (unbuilt) `producer` with a bias, to receive a folded batch norm."""
    if type(producer) is keras.layers.TimeDistributed:
        return _rewrap(producer, _with_bias(producer.layer))
    return producer.__class__.from_config({**producer.get_config(), "use_bias": True})


def _assign_folded(producer, bn, new) -> None:
    while type(producer) is keras.layers.TimeDistributed:
        producer, bn, new = producer.layer, bn.layer, new.layer
    kernel_name, channel_axes = _FOLDABLE[type(producer)]
    old = {w.name: w for w in producer.weights}
    stats = _statistics(bn)
    bias = _numpy64(old["bias"]) if "bias" in old else None
    kernel, bias = bn_ops.fold_into_kernel(
        _numpy64(old[kernel_name]), bias, *stats, channel_axes=channel_axes
    )
    for weight in new.weights:
        value = {kernel_name: kernel, "bias": bias}.get(weight.name)
        value = _numpy(old[weight.name]) if value is None else value
        weight.assign(np.asarray(value).astype(weight.dtype))


def _affine_weights(bn) -> List[np.ndarray]:
    a, b = bn_ops.fold_affine(*_statistics(bn))
    return [np.asarray(a, np.float32), np.asarray(b, np.float32)]


def _statistics(bn):
    """`(mean, variance, gamma, beta, epsilon)` of a batch norm, float64 (gamma/beta None when unused)."""
    return (
        _numpy64(bn.moving_mean),
        _numpy64(bn.moving_variance),
        _numpy64(bn.gamma) if bn.scale else None,
        _numpy64(bn.beta) if bn.center else None,
        float(bn.epsilon),
    )


# ---------------------------------------------------------------- convert


def _swap_batch_norm(layer, to, path):
    config = layer.get_config()
    if to == "kerasbn":
        return BatchNorm.from_config(config)
    axis = config["axis"]
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(
                f"Layer {path!r} (kerasbn.BatchNorm) normalizes over several axes, axis={axis!r}, which "
                "keras.layers.BatchNormalization cannot express (it takes one int). "
                f"Received: to='keras' for layer {path!r} with axis={axis!r}"
            )
        config["axis"] = axis[0]
    if config.pop("virtual_batch_size") is not None:
        raise ValueError(
            f"Layer {path!r} (kerasbn.BatchNorm) uses ghost batches, which keras.layers.BatchNormalization "
            "(Keras 3) cannot express: `virtual_batch_size` is not one of its arguments. "
            f"Received: to='keras' for layer {path!r} with virtual_batch_size={layer.virtual_batch_size!r}"
        )
    if config.pop("sync_group_size") is not None:
        raise ValueError(
            f"Layer {path!r} (kerasbn.BatchNorm) synchronizes within groups of replicas, which "
            "keras.layers.BatchNormalization cannot express: `sync_group_size` is not one of its arguments. "
            f"Received: to='keras' for layer {path!r} with sync_group_size={layer.sync_group_size!r}"
        )
    # Which kernel runs is not part of the math; the stock layer picks its own.
    config.pop("fused")
    return keras.layers.BatchNormalization.from_config(config)


def _copy_weights_by_name(old, new, path) -> None:
    values = {w.name: w for w in old.weights}
    names = sorted(w.name for w in new.weights)
    if sorted(values) != names:
        raise ValueError(
            f"Layer {path!r}: the weights of {type(old).__name__} ({sorted(values)}) and "
            f"{type(new).__name__} ({names}) do not correspond."
        )
    for weight in new.weights:
        # A NumPy copy: on JAX, assigning the variable would share its array,
        # which training the new model donates (deletes) under the old one.
        weight.assign(_numpy(values[weight.name]))


# ---------------------------------------------------------------- surgery


def _check_model(model):
    if not isinstance(model, keras.Model) or not _is_graph_model(model):
        raise ValueError(
            "`model` must be a built keras.Sequential or Functional model (subclassed models hide "
            "their graph, so their layers cannot be replaced from outside). "
            f"Received: model={getattr(model, 'name', model)!r} of type {type(model).__name__}"
        )
    if not model.built or not model.inputs:
        raise ValueError(
            "`model` must be built (give it a keras.Input or call it once). "
            f"Received: model={model.name!r}, not built"
        )
    return model


def _is_graph_model(layer) -> bool:
    """Sequential or Functional: a model whose layers and graph can be walked from outside."""
    from keras.src.models.functional import Functional

    return isinstance(layer, (keras.Sequential, Functional))


def _rebuild(model, clone: Callable, skipped, path: str, nested: Optional[Callable] = None):
    """Rebuilds a Sequential or Functional `model` layer by layer.

    `clone(layer, path)` returns `(new_layer, assign_weights)` for a layer it
    replaces, or None to copy the layer as it is; layers whose id is in
    `skipped` are left out: their call returns its input, or goes through an
    Identity of the same name and dtype policy where the layer was a
    Functional model's output or cast to another dtype. Nested
    Sequential/Functional models are rebuilt by `nested(model, path)`
    (default: the same `clone`). Weights are assigned once the new model is
    built, so every layer has its variables.
    """
    nested = nested or (lambda inner, inner_path: _rebuild(inner, clone, frozenset(), inner_path))
    assignments = []
    skip_new = {}  # id(Identity marker) -> whether it is called (a model output)
    output_layers = {id(tensor._keras_history.operation) for tensor in model.outputs}

    def clone_layer(layer, layer_path=None):
        layer_path = layer_path or _join(path, layer.name)
        if isinstance(layer, keras.layers.InputLayer) or not isinstance(layer, keras.layers.Layer):
            # A bare `keras.ops` call in the graph (ops.relu, the NotEqual of
            # a mask): an Operation without weights or sublayers, kept as it is.
            return layer
        if id(layer) in skipped:
            # Called only where it matters: a model output keeps its name
            # (`output_names`, the keys of a compiled model's losses), and a
            # batch norm in another dtype than its input (float32 at the end
            # of a mixed-precision model) keeps casting to it.
            marker = _identity_like(layer)
            skip_new[id(marker)] = id(layer) in output_layers
            return marker
        if _is_graph_model(layer):
            return nested(layer, layer_path)
        replaced = clone(layer, layer_path)
        if replaced is not None:
            new, assign = replaced
            assignments.append(assign)
            return new
        if _is_rewrappable(layer) and _holds_batch_norm(layer):
            # The wrapped layer goes through the same rules as a layer of
            # the graph (a batch norm is replaced, a nested model rebuilt).
            inner = layer.layer
            return _rewrap(layer, clone_layer(inner, _join(layer_path, inner.name)))
        _check_no_hidden_batch_norm(layer, layer_path)
        if isinstance(layer, keras.layers.Lambda) and not layer.weights:
            # Stateless, and its config would only re-load this process's own
            # function (refused for a Python lambda, without its globals else).
            return layer
        try:
            new = layer.__class__.from_config(layer.get_config())
        except Exception as error:  # a layer that cannot be rebuilt from its config
            raise ValueError(
                f"Layer {layer_path!r} ({type(layer).__name__}) cannot be rebuilt from its config: "
                f"{type(error).__name__}: {error}"
            ) from error
        assignments.append(lambda: new.set_weights(layer.get_weights()))
        return new

    if isinstance(model, keras.Sequential):
        source_input = model.inputs[0]
        inputs = keras.Input(batch_shape=source_input.shape, dtype=source_input.dtype, name=source_input.name)
        layers = []
        for previous, layer in zip([None] + model.layers, model.layers):
            if id(layer) not in skipped:
                layers.append(clone_layer(layer))
            elif layer.compute_dtype != previous.compute_dtype:
                # Casts to the batch norm's dtype, as the batch norm did.
                layers.append(_identity_like(layer))
        new_model = keras.Sequential([inputs] + layers, name=model.name, trainable=model.trainable)
        if model.compiled:
            # As keras.models.clone_model does (and so the Functional path below).
            new_model.compile_from_config(model.get_compile_config())
    else:

        def call(layer, *args, **kwargs):
            if id(layer) in skip_new:
                keep = skip_new[id(layer)] or args[0].dtype != layer.compute_dtype
                # The batch norm's input alone: Identity takes no `mask=`.
                return layer(args[0]) if keep else args[0]
            return layer(*args, **kwargs)

        # New inputs named like the originals (clone_model would name them after their tensors).
        inputs = keras.tree.map_structure(
            lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x._keras_history.operation.name),
            model.input,
        )
        new_model = keras.models.clone_model(
            model, input_tensors=inputs, clone_function=clone_layer, call_function=call
        )
        # Only to freeze: the setter also sets every layer's own flag (seen
        # on JAX), which would unfreeze the layers frozen one by one.
        if not model.trainable:
            new_model.trainable = False
    for assign in assignments:
        assign()
    return new_model


def _identity_like(layer):
    """A `keras.layers.Identity` with `layer`'s name and dtype policy, that saves.

    Identity has no `get_config` of its own: Keras rebuilds its config from
    the `__init__` arguments, and only if they are plain values, so the
    policy goes in serialized (a DTypePolicy object would make the model
    fail to save).
    """
    return keras.layers.Identity(name=layer.name, dtype=keras.dtype_policies.serialize(layer.dtype_policy))


def _is_rewrappable(layer) -> bool:
    """Whether `layer` is a wrapper that `_rewrap` can rebuild around a new inner layer.

    That is a `keras.layers.Wrapper` (TimeDistributed, or one of its own)
    whose config names its one inner layer in `layer` and that Keras rebuilds
    the Wrapper way, `cls(inner, **config)`; whose weights all belong to that
    inner layer; and that holds no batch norm outside it. Bidirectional
    (its own `from_config`, a second, backward layer) is not one.
    """
    if not isinstance(layer, keras.layers.Wrapper):
        return False
    if getattr(type(layer).from_config, "__func__", None) is not keras.layers.Wrapper.from_config.__func__:
        return False
    if "layer" not in layer.get_config():
        return False
    inner_weights = {id(w) for w in layer.layer.weights}
    if any(id(w) not in inner_weights for w in layer.weights):
        return False
    inner_layers = {id(sub) for sub in layer.layer._flatten_layers(include_self=True, recursive=True)}
    return not any(
        id(sub) not in inner_layers for sub in layer._flatten_layers(include_self=False, recursive=True) if is_batch_norm(sub)
    )


def _rewrap(wrapper, inner):
    """A new `wrapper` (see `_is_rewrappable`) around `inner`, as `Wrapper.from_config` builds it."""
    config = wrapper.get_config()
    del config["layer"]
    return type(wrapper)(inner, **config)


def _holds_batch_norm(layer) -> bool:
    return any(is_batch_norm(sub) for sub in layer._flatten_layers(include_self=False, recursive=True))


def _check_no_hidden_batch_norm(layer, path) -> None:
    inner = [sub for sub in layer._flatten_layers(include_self=False, recursive=True) if is_batch_norm(sub)]
    if inner:
        raise ValueError(
            f"Layer {path!r} ({type(layer).__name__}) holds batch norm {inner[0].name!r} inside its own "
            "code, which cannot be replaced from outside. Build it from kerasbn.BatchNorm directly, or "
            "write it as a Functional or Sequential model. "
            f"Received: layer {path!r} of type {type(layer).__name__}"
        )


def _feature_axes(bn, rank: int) -> Tuple[int, ...]:
    axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    return tuple(sorted(int(a) % rank for a in axes))


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _numpy(x) -> np.ndarray:
    # `.numpy()`, not np.asarray: NumPy 2 warns on a Keras variable's __array__.
    return keras.ops.convert_to_numpy(x)


def _numpy64(x) -> np.ndarray:
    return _numpy(x).astype(np.float64)
