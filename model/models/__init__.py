"""CTR models composed from `model.modules`: DIN, Transformer, OneTrans (default) and a dual-stream baseline."""
