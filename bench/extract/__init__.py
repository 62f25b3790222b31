"""Extraction benchmarks: the pure core against a bare pydicom baseline measured in the same run."""
