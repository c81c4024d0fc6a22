"""The scoring service: Redis history store, online sequence assembly, HTTP API. Torch-free."""
