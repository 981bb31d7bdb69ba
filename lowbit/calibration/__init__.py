"""Running a model on calibration data: capture the inputs (or their statistics) of chosen modules."""

from lowbit.calibration.capture import InputStats, Request, batches, collect_input_stats, run_model

__all__ = ["InputStats", "Request", "batches", "collect_input_stats", "run_model"]
