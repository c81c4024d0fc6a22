"""Serving rewrites of trained models: folded weights (`folded`), per-arch rewrites of `score` (`onetrans`),
and the export wrapper that applies them (`model.ServingModel`)."""
