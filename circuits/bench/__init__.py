"""Benchmarks: figures measured side by side with a peer transport, in one run."""
