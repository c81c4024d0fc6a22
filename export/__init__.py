"""Export: trained run -> self-describing ONNX bundle (`polarity export`).

Modules:
- `export.bundle`      torch-free, onnx-free: manifest schema, `load_manifest`, `verify_bundle` (the service's side);
- `export.onnx_export` `export_bundle` and the serving wrapper (torch);
- `export.tapf_onnx`   the `tapf.fused::TAPFGate` node, its translation and its model-local function, and the
                       `TAPFGateDotPool` / `TAPFGateMLPPool` nodes (the gate fused with the attention pooling it);
- `export.gate_pooling` the torch custom ops those two nodes are exported from (`--fuse-pooling`);
- `export.benchmarks`  the `gate` and `serving` sections of BENCHMARKS.md, FLOP counts, the GEMM peak;
- `export.parity`      torch vs ONNX Runtime parity check.

This package's `__init__` imports nothing heavy: the service imports `export.bundle` without torch.
"""
