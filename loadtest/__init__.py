"""Replay evaluation, open-loop load testing and serving benchmarks for the Polarity service."""
