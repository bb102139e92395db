"""Benchmarks: training speed, memory and framework overhead (``python -m benchmarks``), data loading
(``python -m benchmarks.data``) and samplers (``python -m benchmarks.samplers``)."""
