"""The task side: model families, their data and their metrics.

A task is a model family adapter (which tensors are the shared backbone, which stay the
task's own, how a batch becomes predictions and a loss), a dataset, and its metrics.
Experiments, ``m3sb pareto`` and the demo evaluate through this package alone.
"""
