"""Bridges to other frameworks, for outside checks and benchmarks."""
