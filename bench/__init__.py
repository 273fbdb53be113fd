"""Benchmarks of syncengine beside the physical limit and beside a Yjs (pycrdt) peer.

Run them all with ``syncengine bench [--quick] [--json]`` (see BENCHMARKS.md).
"""
