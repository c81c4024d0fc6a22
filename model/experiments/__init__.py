"""`polarity experiment`: the paper's experiments as tables and plots (Tables 2, 4, 7; figs. 1, 4, 8, 9).

- `plan`        which runs an experiment needs (arch × sequence variant × setting × seed) and their configs;
- `runner`      trains (or resumes) them, times each run's exported bundle through the `ServingCost` it is given
                (the export package's; this package does not export), and writes `OUT/<name>.json`;
- `report`      the markdown tables and PNG plots, each row with its serving ms per request and training
                samples/s, a cost/quality frontier table and plot per experiment (`OUT/<name>_frontier.png`);
- `diagnostics` attention share on positive vs negative tokens, and what a log's skips say model-free.

Every run is an ordinary `train()` run directory under `OUT/runs/<name>-<arch>-<variant>-seed<k>/`;
raw results go to `OUT/<name>.json`, the table to `OUT/<name>.md`, plots to `OUT/<name>.png`, and
the attention share on positive vs negative tokens (paper §4.5.1, fig. 9) to `OUT/<name>_attention.*`.
A run whose `metrics.json` exists with the same config is not trained again, so an interrupted
experiment resumes where it stopped.
"""
