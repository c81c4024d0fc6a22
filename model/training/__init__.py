"""Training and evaluation (`polarity train`, `polarity evaluate`).

- `config`     `TrainConfig`, validated before any data is read;
- `data`       load, split and encode a log into sample sources (in memory or streamed);
- `batches`    numpy batches -> tensors, background prefetch;
- `loop`       `train`: the optimisation loop (single process or torchrun/DDP);
- `evaluate`   predictions and metrics of a model on a part, `evaluate_run`;
- `checkpoint` the self-describing run directory (`checkpoint.pt`, `vocab/`, `metrics.json`);
- `metrics`    AUC, GAUC, logloss (numpy).
"""
