"""Serving rewrites of trained models: folded weights (`folded`), per-arch rewrites of `score` (`onetrans`;
`unified` for HyFormer's and MixFormer's cross-attention and fused read-out), and the export wrapper that
applies them (`model.ServingModel`)."""
