"""Benchmark suite and speed measurements (top layer: may import everything)."""

__all__: list[str] = []
