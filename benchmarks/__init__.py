"""Benchmarks: timings and sizes that tests do not assert (run them as scripts, e.g. ``python -m benchmarks.augconv``)."""
