"""Export: trained run -> self-describing ONNX bundle (`polarity export`).

Modules:
- `export.bundle`      torch-free, onnx-free: manifest schema, `load_manifest`, `verify_bundle` (the service's side);
- `export.custom_kernel` torch-free: finds and registers the fused TAPF kernel library (the service's side);
- `export.reference`   load a trained run, check it can be exported, random inputs, the torch reference outputs;
- `export.serving`     the serving rewrites: folded gates and attention, OneTrans's NS stack, `ServingModel`;
- `export.graph`       the serving wrapper as an ONNX graph (dynamo export, TAPF nodes, folded weights);
- `export.pipeline`    `export_bundle`: run directory -> bundle directory (`polarity export`, `export.commands`);
- `export.tapf_onnx`   the `tapf.fused::TAPFGate` node, its translation and its model-local function, and the
                       `TAPFGateDotPool` / `TAPFGateMLPPool` nodes (the gate fused with the attention pooling it);
- `export.gate_pooling` the torch custom ops those two nodes are exported from (`--fuse-pooling`);
- `export.parity`      torch vs ONNX Runtime parity check;
- `export.commands`    the `polarity export` subcommand.

Benchmarks of the export path live in `loadtest.bench.inference`.

This package's `__init__` imports nothing heavy: the service imports `export.bundle` without torch.
"""
