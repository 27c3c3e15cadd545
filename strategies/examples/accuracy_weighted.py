"""Example user strategy: FedAvg that trusts holders on which the global model already does well.

Load it with `--strategy strategies/examples/accuracy_weighted.py:AccuracyWeightedFedAvg` (or the module form
`strategies.examples.accuracy_weighted:AccuracyWeightedFedAvg`) and set its temperature with
`--strategy-arg temperature=0.05`.

Each training reply carries, besides its backbone, a MetricRecord with "num_examples" and "val_accuracy":
the accuracy of the received global model on the holder's own held-out split, measured before local
training. Holder i's backbone gets the weight

    w_i  proportional to  num_examples_i * exp(val_accuracy_i / temperature)

so a large temperature gives plain FedAvg and a small one follows the holders with the best validation
accuracy. The training metrics are still averaged by "num_examples", so they stay comparable with FedAvg's.

This is a demonstration of the strategy interface, not a recommendation: the accuracies are reported by the
holders themselves, so a dishonest holder can claim a high one and steer the aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from simulation.protocol import VAL_ACCURACY

_WEIGHT_KEY = "aggregation-weight"


class AccuracyWeightedFedAvg(FedAvg):
    """FedAvg whose backbone average weights holder i by num_examples_i * exp(val_accuracy_i / temperature).

    Parameters
    ----------
    temperature : float (default: 0.1)
        Softmax temperature over the holders' "val_accuracy" (a fraction in [0, 1]); must be > 0.
    **kwargs
        FedAvg's parameters (sampling, weighted_by_key, ...).
    """

    def __init__(self, *, temperature: float = 0.1, **kwargs) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(**kwargs)
        self.temperature = temperature

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid_replies:
            return None, None
        contents = [reply.content for reply in valid_replies]
        weights = self.holder_weights(contents)
        reweighted = [
            RecordDict({"arrays": _only_array_record(content), "weight": MetricRecord({_WEIGHT_KEY: weight})})
            for content, weight in zip(contents, weights, strict=True)
        ]
        arrays = aggregate_arrayrecords(reweighted, _WEIGHT_KEY)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics

    def holder_weights(self, contents: list[RecordDict]) -> list[float]:
        """Unnormalised aggregation weights, one per reply (the largest accuracy is subtracted before exp)."""
        examples, accuracies = [], []
        for content in contents:
            metrics = next(iter(content.metric_records.values()))
            if VAL_ACCURACY not in metrics:
                raise AggregationError(f"AccuracyWeightedFedAvg needs {VAL_ACCURACY!r} in every training reply")
            examples.append(float(metrics[self.weighted_by_key]))
            accuracies.append(float(metrics[VAL_ACCURACY]))
        best = max(accuracies)
        return [n * math.exp((accuracy - best) / self.temperature) for n, accuracy in zip(examples, accuracies)]


def _only_array_record(content: RecordDict) -> ArrayRecord:
    return next(iter(content.array_records.values()))
