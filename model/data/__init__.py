"""Event data: the generic log, public-dataset loaders and the synthetic world (torch-free).

This `__init__` imports nothing (the log reader pulls pyarrow): configs read the choices below
without loading any reader.
"""

SOURCES = ("auto", "generic", "kuairec", "kuairand")  # `load_events(path, source=...)`
SPLITS = ("temporal", "user")  # `split_events(table, how=...)`
