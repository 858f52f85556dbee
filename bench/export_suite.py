"""Part 4 (NOT DONE, placeholder): exported SavedModel inference, folded against unfolded.

STUB. This suite only reports itself skipped ("export not yet implemented")
until the export issue lands; it is registered with `counts_as_done=False`
and the report says so.

What it is to measure, once the export issue is done: inference throughput
and latency at batch 1 and 256 of the exported LeNet-BN SavedModel, with
the batch norms folded into the preceding kernels (`export_model(model,
fold_bn=True)` in `training/export.py`, in progress when this stub was
written) against left as layers (`fold_bn=False`): export a freshly built
`training.models.build_lenet()` both ways into a temporary folder, load each
with `tf.saved_model.load`, and time the `serving_float` signature
interleaved (`bench.timing.time_interleaved`). Records: suite "export",
implementation "folded" / "unfolded", layout "NHWC", mode "inference", jit
False, shape (batch, 28, 28, 1), plus `examples_per_s`; the goal (folded at
least 1.3x the throughput of unfolded at batch 256) is already read from
such records by `bench.report.goal_export`, and `report.render` tables them.
"""

from __future__ import annotations

from bench.suites import BenchConfig, SuiteResult, register_suite

STUB_REASON = "export not yet implemented"


@register_suite(
    "export",
    "STUB (not done): SavedModel inference throughput/latency, folded vs unfolded, batch 1 and 256",
    counts_as_done=False,
)
def run_export(config: BenchConfig, previous) -> SuiteResult:
    del config, previous
    return SuiteResult(
        status="skipped",
        reason=STUB_REASON,
        notes=["STUB: placeholder for the export issue; nothing is measured yet."],
    )
