"""Example user strategies; each module is also loadable by file path (`path/to/file.py:ClassName`)."""

from strategies.examples.accuracy_weighted import AccuracyWeightedFedAvg

__all__ = ["AccuracyWeightedFedAvg"]
