"""Where a training step spends its time: an op profile of a network with keras BN, kerasbn and no BN.

    python -m bench.profile --network resnet50        # a few minutes on a 2-core CPU
    python -m bench.profile --network lenet --quick   # under a minute, for a look (do not quote it)

Writes `bench/results/<network>_profile.md` and `.json`. The variants and the
training step are the `models` suite's (for LeNet: `build_lenet` with norm
keras, kerasbn and none), on one device: the whole steps timed interleaved,
then a few steps of each traced by `tf.profiler.experimental`, every op the
executor ran attributed to its layer's kind (from its name scope) and to
forward or backward; ops running at once share their time, so the kinds add
up to the traced wall time. bench/results/lenet_profile.md was written by this
module's LeNet-only ancestor: `git show 8ad8450:bench/profile_lenet.py`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Dict, List, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from bench.models_suite import BOUND, CONVERTED, NETWORKS, STOCK  # noqa: E402
from bench.suites import DEFAULT_OUT  # noqa: E402

GAPS = "(no op running)"
# Layer class -> kind; other layers are their class name, lower case.
KINDS = {
    "Conv2D": "conv", "DepthwiseConv2D": "conv", "Dense": "dense", "BatchNormalization": "bn", "BatchNorm": "bn",
    "Activation": "activation", "ReLU": "activation", "Add": "merge", "Multiply": "merge", "MaxPooling2D": "pool",
    "AveragePooling2D": "pool", "GlobalAveragePooling2D": "pool", "ZeroPadding2D": "padding",
}  # fmt: skip


def build(network: str, image_size: int, batch: int):
    """`{variant: model}`, compiled, and the synthetic dataset the suite uses."""
    import tensorflow as tf

    from bench.models_suite import build_variants
    from bench.workers import compile_models, synthetic_dataset

    if network == "lenet":
        from training.models import build_lenet

        models = {STOCK: build_lenet("keras"), CONVERTED: build_lenet("kerasbn"), BOUND: build_lenet("none")}
        return compile_models(models, from_logits=True), synthetic_dataset(batch)
    image_shape = (image_size, image_size, 3)
    strategy = tf.distribute.get_strategy()
    return build_variants(network, image_shape, strategy), synthetic_dataset(batch, image_shape, batches=4)


def classify(op: str, kinds: Dict[str, str]) -> Tuple[str, str]:
    """`(kind, direction)` of an op event name `scope/.../name:Type`: its layer's kind (or loss/optimizer/other)."""
    if op == GAPS:
        return "gaps", "-"
    segments = op.rsplit(":", 1)[0].split("/")
    while len(segments) > 1 and segments[0] in ("StatefulPartitionedCall", "PartitionedCall"):
        segments = segments[1:]  # the scope of a called function (Keras's step inside its iterator loop)
    direction = "backward" if segments[0] == "gradient_tape" else "forward"
    for segment in segments[:4]:
        # A layer's ops sit in its name scope, which TensorFlow may suffix ("conv1_bn_1").
        kind = kinds.get(segment) or kinds.get(re.sub(r"_\d+$", "", segment))
        if kind:
            return kind, direction
    head = segments[1] if segments[0] == "gradient_tape" and len(segments) > 1 else segments[0]
    if head.startswith("compile_loss"):
        return "loss", direction
    if head.lower().startswith("sgd"):
        return "optimizer", "update"
    return "other", direction


def _read_xspace(logdir: str):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise RuntimeError(f"The profiler wrote no .xplane.pb under {logdir!r}")
    return xplane_pb2.XSpace.FromString(pathlib.Path(paths[-1]).read_bytes())


def trace_events(space) -> Tuple[List[Tuple[int, int, str]], List[Tuple[int, int]]]:
    """Op intervals `(start_ps, end_ps, "name:Type")` on the executor threads, and the steps' windows.

    TensorFlow names an op's event `<op name>:<op type>` on the `tf_Compute`
    threads; `KernelAndDeviceFunc::Run` events on the Python thread span the
    calls of traced functions (nested ones too: overlapping spans are merged).
    """
    ops, spans = [], []
    for plane in space.planes:
        if not plane.name.startswith("/host:"):
            continue
        metadata = plane.event_metadata
        for line in plane.lines:
            base = line.timestamp_ns * 1000
            for event in line.events:
                name = metadata[event.metadata_id].name
                start = base + event.offset_ps
                if name == "KernelAndDeviceFunc::Run":
                    spans.append((start, start + event.duration_ps))
                elif line.name.startswith("tf_Compute") and ":" in name and "::" not in name:
                    ops.append((start, start + event.duration_ps, name))
    windows: List[Tuple[int, int]] = []
    for start, end in sorted(spans):
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], max(end, windows[-1][1]))
        else:
            windows.append((start, end))
    return ops, windows


def attribute(ops, windows) -> Tuple[Dict[str, float], float, float]:
    """Splits the wall time of `windows` among the ops running in it: `(seconds per op name, wall seconds,
    seconds summed over op durations)`. Each interval between op boundaries is divided equally among the ops
    active in it; time with no op running goes to `GAPS`."""
    shares: Dict[str, float] = collections.defaultdict(float)
    ops = [(s, e, n) for s, e, n in ops if e > s]
    wall = summed = 0.0
    for window_start, window_end in windows:
        wall += (window_end - window_start) * 1e-12
        inside = [(max(s, window_start), min(e, window_end), n) for s, e, n in ops
                  if s < window_end and e > window_start]  # fmt: skip
        summed += sum(e - s for s, e, _ in inside) * 1e-12
        points = sorted({window_start, window_end, *(s for s, _, _ in inside), *(e for _, e, _ in inside)})
        starts, ends = collections.defaultdict(list), collections.defaultdict(list)
        for index, (s, e, _) in enumerate(inside):
            starts[s].append(index)
            ends[e].append(index)
        active = set()
        for left, right in zip(points[:-1], points[1:]):
            active.difference_update(ends.get(left, ()))
            active.update(starts.get(left, ()))
            width = (right - left) * 1e-12
            if not active:
                shares[GAPS] += width
            for index in active:
                shares[inside[index][2]] += width / len(active)
    return dict(shares), wall, summed


def profile_step(model, call, steps: int) -> dict:
    """Traces `steps` calls of the warmed-up `call`; returns seconds per step by kind and by BN op type."""
    import tensorflow as tf

    kinds = {layer.name: KINDS.get(type(layer).__name__, type(layer).__name__.lower()) for layer in model.layers}
    with tempfile.TemporaryDirectory(prefix="kerasbn-profile-") as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            for _ in range(steps):
                call()
        finally:
            tf.profiler.experimental.stop()
        ops, windows = trace_events(_read_xspace(logdir))
    shares, wall, summed = attribute(ops, windows or [(min(s for s, _, _ in ops), max(e for _, e, _ in ops))])
    by_kind: Dict[str, float] = collections.defaultdict(float)
    bn_ops: Dict[str, float] = collections.defaultdict(float)
    bn_op_count = sum(classify(op, kinds)[0] == "bn" for _, _, op in ops) / steps
    for op, seconds in shares.items():
        kind, direction = classify(op, kinds)
        by_kind[kind] += seconds / steps
        if kind == "bn":
            bn_ops[f"{op.rsplit(':', 1)[-1]} ({direction})"] += seconds / steps
    return {"step_s": wall / steps, "op_seconds_summed_per_step": summed / steps, "by_kind": dict(by_kind),
            "bn_by_op_type": dict(sorted(bn_ops.items(), key=lambda item: -item[1])), "bn_ops_per_step": bn_op_count}


def run(network: str, quick: bool, image_size: int, batch: int) -> dict:
    import keras
    import tensorflow as tf

    from bench.models_suite import train_call
    from bench.timing import Candidate, summarize, time_interleaved

    started = time.perf_counter()
    models, dataset = build(network, image_size, batch)
    calls = {variant: train_call(model, tf.distribute.get_strategy(), dataset) for variant, model in models.items()}
    candidates = [Candidate(variant, call) for variant, call in calls.items()]
    timings = time_interleaved(candidates, repeats=3 if quick else 10, min_repetition_s=0.3, warmup_calls=2)
    steps = {variant: summarize(timing.seconds) for variant, timing in timings.items()}
    profiles = {}
    for variant, call in calls.items():
        print(f"[profile] tracing {network} {variant}", file=sys.stderr, flush=True)
        profiles[variant] = profile_step(models[variant], call, steps=2 if quick else 5)
    from bench.machine import cpu_model, usable_cores

    header = {
        "network": network, "input": "28x28x1" if network == "lenet" else f"{image_size}x{image_size}x3",
        "batch": batch, "quick": quick,
        "machine": f"{cpu_model()}, {usable_cores()} cores", "tensorflow": tf.__version__, "keras": keras.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python -m bench.profile", *sys.argv[1:]]),
        "load_average": [round(v, 2) for v in os.getloadavg()], "elapsed_s": time.perf_counter() - started,
    }  # fmt: skip
    return {"header": header, "steps": steps, "profiles": profiles}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def render(result: dict) -> str:
    """The Markdown of `<network>_profile.md`."""
    from bench.report import records_table

    header, steps, profiles = result["header"], result["steps"], result["profiles"]
    variants = list(profiles)
    stock, bound = steps[STOCK]["median_s"], steps[BOUND]["median_s"]
    lines = [
        f"# {header['network']} training step: where the time goes",
        "",
        f"- {header['machine']}; TensorFlow {header['tensorflow']}, Keras {header['keras']}; {header['date']}; "
        f"`{header['command']}`, {header['elapsed_s']:.0f} s; load {header['load_average']}"
        + (" (**quick run: do not quote**)" if header["quick"] else ""),
        f"- Input {header['input']}, batch {header['batch']}, float32, SGD, the models suite's training step, "
        "one device.",
        "",
        "## Whole step (interleaved)",
        "",
    ]
    lines += records_table([dict(stats, variant=variant) for variant, stats in steps.items()], [
        ("variant", "variant"), ("ms/step median", lambda r: _ms(r["median_s"])),
        ("min-max", lambda r: f"{_ms(r['min_s'])}-{_ms(r['max_s'])}"),
        ("vs stock", lambda r: f"{r['median_s'] / stock:.2f}x"),
        ("BN share", lambda r: f"{(r['median_s'] - bound) / (stock - bound) if stock != bound else float('nan'):.2f}"),
    ])  # fmt: skip
    lines += ["", "## Op profile per step (TF profiler; ops overlapping in time share it)", ""]
    stock_kinds = profiles[STOCK]["by_kind"]
    kinds = sorted({k for p in profiles.values() for k in p["by_kind"]}, key=lambda k: -stock_kinds.get(k, 0.0))

    def kind_cell(variant: str, kind: str) -> str:
        seconds = profiles[variant]["by_kind"].get(kind, 0.0)
        return f"{_ms(seconds)} ({seconds / profiles[variant]['step_s']:.0%})"

    rows = [{"kind": kind, **{v: kind_cell(v, kind) for v in variants}} for kind in kinds]
    rows.append({"kind": "**traced step**", **{v: f"**{_ms(profiles[v]['step_s'])}**" for v in variants}})
    rows.append({"kind": "ops per step in BN scopes", **{v: f"{profiles[v]['bn_ops_per_step']:.0f}" for v in variants}})
    lines += records_table(rows, [("kind", "kind")] + [(f"{v} ms (share)", v) for v in variants])
    lines += ["", "Traced steps are slower than the timed ones (the profiler's own cost). `gaps`: time in the step "
              "with no op running on the executor's threads (launch, scheduling)."]  # fmt: skip
    for variant in variants:
        top = list(profiles[variant]["bn_by_op_type"].items())[:8]
        lines += ["", f"{variant}: BN time by op type (ms per step): " + ", ".join(f"{o} {_ms(t)}" for o, t in top)
                  ] if top else []  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=["lenet", *NETWORKS], default="resnet50")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and traced steps")
    parser.add_argument("--image-size", type=int, default=112, help="keras.applications networks only")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 for LeNet, 32 for the others")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: bench/results)")
    parser.add_argument("--no-remapper", action="store_true", help="turn grappler's remapper off (it fuses "
                        "FusedBatchNormV3 + Relu into _FusedBatchNormEx); writes <network>_no_remapper_profile.*")
    args = parser.parse_args(argv)
    if args.no_remapper:
        import tensorflow as tf

        tf.config.optimizer.set_experimental_options({"remapping": False})
    batch = args.batch or (256 if args.network == "lenet" else 32)
    result = run(args.network, args.quick, args.image_size, batch)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem, text = args.network + ("_no_remapper" if args.no_remapper else ""), render(result)
    (out / f"{stem}_profile.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / f"{stem}_profile.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
