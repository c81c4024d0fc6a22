"""Event data: the generic log, public-dataset loaders and the synthetic world (torch-free)."""
