"""Export: trained run -> self-describing ONNX bundle (`polarity export`).

Modules:
- `export.bundle`      torch-free, onnx-free: manifest schema, `load_manifest`, `verify_bundle` (the service's side);
- `export.onnx_export` `export_bundle` and the serving wrapper (torch);
- `export.tapf_onnx`   the `tapf.fused::TAPFGate` node, its translation and its model-local function;
- `export.parity`      torch vs ONNX Runtime parity check.

This package's `__init__` imports nothing heavy: the service imports `export.bundle` without torch.
"""
