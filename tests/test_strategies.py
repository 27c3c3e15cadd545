"""Strategy plumbing: loading, arguments, sampling constraints, the example strategy and the DP wrappers.

Fast: no simulation engine. Strategies are driven through their public methods with a stand-in grid
(only `get_node_ids` is used by configure_*) and reply Messages built the way a ClientApp builds them.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
from flwr.supercore.task_identity import TaskIdentity

from simulation.errors import UsageError
from strategies.examples import AccuracyWeightedFedAvg
from strategies.registry import (
    BUILTIN_STRATEGIES,
    build_strategy,
    coerce_arg,
    describe_strategy,
    load_strategy_class,
    parse_strategy_args,
    sampled_train_holders,
    with_differential_privacy,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_FILE = REPO / "strategies" / "examples" / "accuracy_weighted.py"
SHAPES = {"features.0.weight": (4, 3, 3, 3), "features.0.bias": (4,), "classifier.weight": (2, 16)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take run and node ids from the running task; outside a Flower runtime we set them."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class StubGrid:
    def __init__(self, num_nodes: int):
        self.node_ids = list(range(101, 101 + num_nodes))

    def get_node_ids(self):
        return self.node_ids


def global_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: rng.normal(size=shape).astype(np.float32) for key, shape in SHAPES.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


def train_round(strategy: Strategy, num_nodes: int, current: dict[str, np.ndarray]) -> list[Message]:
    return list(strategy.configure_train(1, to_record(current), ConfigRecord({"lr": 0.05}), StubGrid(num_nodes)))


def reply(instruction: Message, arrays: dict[str, np.ndarray], *, examples=10, accuracy=0.5, loss=1.0) -> Message:
    metrics = MetricRecord(
        {"num_examples": examples, "train_loss": loss, "train_accuracy": 0.5, "val_accuracy": accuracy}
    )
    return Message(RecordDict({"arrays": to_record(arrays), "metrics": metrics}), reply_to=instruction)


def nudged(arrays: dict[str, np.ndarray], rng, *, scale: float) -> dict[str, np.ndarray]:
    return {key: value + scale * rng.normal(size=value.shape).astype(np.float32) for key, value in arrays.items()}


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[key], np.float64).ravel() for key in SHAPES])


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def assert_one_line_usage_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------------------
# Built-in strategies


@pytest.mark.parametrize("name", sorted(BUILTIN_STRATEGIES))
def test_every_builtin_builds_for_the_federation(name):
    strategy = build_strategy(name.upper(), {}, num_holders=7, learning_rate=0.05)
    assert isinstance(strategy, BUILTIN_STRATEGIES[name])
    assert strategy.min_available_nodes == 7
    assert strategy.fraction_train == 1.0
    assert sampled_train_holders(strategy, 7) == 7


@pytest.mark.parametrize("name", sorted(BUILTIN_STRATEGIES))
def test_every_builtin_aggregates_replies_to_the_same_keys_and_shapes(name):
    strategy = build_strategy(name, {}, num_holders=5, learning_rate=0.05)
    current = global_arrays()
    instructions = train_round(strategy, 5, current)
    assert len(instructions) == 5
    rng = np.random.default_rng(1)
    replies = [
        reply(message, nudged(current, rng, scale=0.01), examples=10 + index, loss=1.0 + index / 10)
        for index, message in enumerate(instructions)
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    aggregated = numpy_arrays(arrays)
    assert list(aggregated) == list(SHAPES)
    assert all(aggregated[key].shape == shape for key, shape in SHAPES.items())
    assert np.isfinite(flat(aggregated)).all()
    moved = np.abs(flat(aggregated) - flat(current)).max()
    assert 1e-5 < moved < 0.5  # the replies moved the model, and not wildly
    assert "train_loss" in metrics


def test_builtin_lookup_is_case_insensitive_and_unknown_names_are_listed():
    assert load_strategy_class(" FedAdam ") is BUILTIN_STRATEGIES["fedadam"]
    with pytest.raises(UsageError) as excinfo:
        load_strategy_class("fedsgd")
    assert_one_line_usage_error(excinfo, "'fedsgd'", "fedavg", "bulyan", "file.py:ClassName")


# ------------------------------------------------------------------------------------------------
# User strategies


def test_example_strategy_loads_from_a_file_path_and_a_module(monkeypatch):
    from_file = load_strategy_class(f"{EXAMPLE_FILE}:AccuracyWeightedFedAvg")
    assert from_file.__name__ == "AccuracyWeightedFedAvg" and issubclass(from_file, FedAvg)
    monkeypatch.chdir(REPO)
    relative = load_strategy_class("strategies/examples/accuracy_weighted.py:AccuracyWeightedFedAvg")
    assert relative.__name__ == "AccuracyWeightedFedAvg"
    assert load_strategy_class("strategies.examples.accuracy_weighted:AccuracyWeightedFedAvg") is AccuracyWeightedFedAvg


def test_user_strategy_file_builds_with_coerced_args(tmp_path):
    path = tmp_path / "my_strategy.py"
    path.write_text(
        "from flwr.serverapp.strategy import FedAvg\n"
        "class Damped(FedAvg):\n"
        "    def __init__(self, damping: float = 0.5, rounds: int | None = None, verbose: bool = False, **kwargs):\n"
        "        super().__init__(**kwargs)\n"
        "        self.damping, self.rounds, self.verbose = damping, rounds, verbose\n"
    )
    args = parse_strategy_args(["damping=1", "rounds=3", "verbose=true"])
    strategy = build_strategy(f"{path}:Damped", args, num_holders=4, fraction_train=0.5)
    assert type(strategy.damping) is float and strategy.damping == 1.0
    assert strategy.rounds == 3 and strategy.verbose is True
    assert strategy.fraction_train == 0.5 and strategy.min_available_nodes == 4
    description = describe_strategy(strategy)
    assert description["name"] == "Damped" and description["source"] == str(path)
    assert description["args"]["damping"] == 1.0 and description["args"]["min_train_nodes"] == 1
    assert description["differential_privacy"] is None


@pytest.mark.parametrize("name", ["fedadam", "fedavgm", "fedyogi", "dp-fedavg"])
def test_a_strategy_resumed_from_its_checkpoint_state_aggregates_as_if_never_stopped(name):
    """Checkpoints keep a strategy's state as tensors and plain values (no pickle): restored onto a strategy built
    anew, the next aggregation must equal the one of the strategy that never stopped."""
    from server.checkpoint import restore_strategy_state, strategy_state

    def build():
        if name == "dp-fedavg":
            return with_differential_privacy(build_strategy("fedavg", {}, num_holders=3), mode="server",
                                             noise_multiplier=0.0, clipping_norm=1.0, num_sampled_holders=3)
        return build_strategy(name, {}, num_holders=3, learning_rate=0.05)

    def one_round(strategy, server_round, current, seed):
        instructions = list(strategy.configure_train(server_round, to_record(current), ConfigRecord({"lr": 0.05}),
                                                     StubGrid(3)))
        rng = np.random.default_rng(seed)
        replies = [reply(message, nudged(current, rng, scale=0.05), examples=5 + i) for i, message in enumerate(instructions)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        return numpy_arrays(arrays)

    running = build()
    after_one = one_round(running, 1, global_arrays(), seed=3)
    tensors, values = strategy_state(running)
    assert all(isinstance(tensor, torch.Tensor) for tensor in tensors.values())
    json.dumps(values)  # plain values only
    restored = build()
    restore_strategy_state(restored, tensors, values)
    expected = one_round(running, 2, after_one, seed=4)
    got = one_round(restored, 2, after_one, seed=4)
    assert all(np.array_equal(expected[key], got[key]) for key in expected)
    fresh = one_round(build(), 2, after_one, seed=4)
    if name != "dp-fedavg":  # server-side optimisers carry momentum: a strategy without its state differs
        assert not all(np.allclose(expected[key], fresh[key]) for key in expected)


def test_missing_strategy_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError) as excinfo:
        load_strategy_class(f"{tmp_path / 'absent.py'}:Anything")
    assert_one_line_usage_error(excinfo, "absent.py", "does not exist")


def test_syntax_error_in_strategy_file_is_a_one_line_usage_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("class Broken(:\n    pass\n")
    with pytest.raises(UsageError) as excinfo:
        load_strategy_class(f"{path}:Broken")
    assert_one_line_usage_error(excinfo, "broken.py", "SyntaxError")


def test_failing_import_in_strategy_file_names_the_exception(tmp_path):
    path = tmp_path / "needs_missing.py"
    path.write_text("import a_package_that_is_not_installed\n")
    with pytest.raises(UsageError) as excinfo:
        load_strategy_class(f"{path}:Anything")
    assert_one_line_usage_error(excinfo, "ModuleNotFoundError", "a_package_that_is_not_installed")


def test_missing_module_is_a_usage_error():
    with pytest.raises(UsageError) as excinfo:
        load_strategy_class("no_such_package.strategies:Mine")
    assert_one_line_usage_error(excinfo, "no_such_package", "ModuleNotFoundError")


def test_missing_class_lists_the_strategies_that_are_there():
    with pytest.raises(UsageError) as excinfo:
        load_strategy_class(f"{EXAMPLE_FILE}:AccuracyWeighted")
    assert_one_line_usage_error(excinfo, "no class 'AccuracyWeighted'", "AccuracyWeightedFedAvg")


@pytest.mark.parametrize("spec", ["json:JSONDecoder", "strategies.examples.accuracy_weighted:VAL_ACCURACY"])
def test_object_that_is_not_a_strategy_is_rejected(spec):
    with pytest.raises(UsageError) as excinfo:
        load_strategy_class(spec)
    assert_one_line_usage_error(excinfo, "not a strategy", "Strategy")


def test_abstract_strategy_is_rejected():
    with pytest.raises(UsageError) as excinfo:
        load_strategy_class("flwr.serverapp.strategy:Strategy")
    assert_one_line_usage_error(excinfo, "abstract", "aggregate_train")


# ------------------------------------------------------------------------------------------------
# Arguments


def test_strategy_args_are_parsed_as_toml_scalars():
    args = parse_strategy_args(
        [
            "proximal-mu=0.1",
            "num_malicious_nodes=2",
            "flag=true",
            "name=plain text",
            'quoted="a b"',
            "tiny=1e-3",
            "dot=.5",
        ]
    )
    assert args == {
        "proximal_mu": 0.1,
        "num_malicious_nodes": 2,
        "flag": True,
        "name": "plain text",
        "quoted": "a b",
        "tiny": 1e-3,
        "dot": ".5",
    }
    assert type(args["num_malicious_nodes"]) is int and type(args["flag"]) is bool


@pytest.mark.parametrize("pairs", [["proximal_mu"], ["=3"], ["eta=1", "eta=2"], ["eta=1", "eta-x=1", "eta=3"]])
def test_malformed_or_repeated_strategy_args_are_rejected(pairs):
    with pytest.raises(UsageError) as excinfo:
        parse_strategy_args(pairs)
    assert "\n" not in str(excinfo.value)


def test_args_are_coerced_to_the_constructor_annotations():
    adam = build_strategy("fedadam", {"eta": 1, "tau": "0.01", "beta-1": 0}, num_holders=3)
    assert (type(adam.eta), adam.eta, adam.tau, adam.beta_1) == (float, 1.0, 0.01, 0.0)
    multikrum = build_strategy("multikrum", {"num_nodes_to_select": 2.0}, num_holders=5)  # a float that is an int
    assert type(multikrum.num_nodes_to_select) is int and multikrum.num_nodes_to_select == 2
    assert coerce_arg("None", float | None, name="x", owner="S") is None
    assert coerce_arg("off", bool, name="x", owner="S") is False
    assert coerce_arg(3, int | float, name="x", owner="S") == 3


@pytest.mark.parametrize(
    ("spec", "args", "fragments"),
    [
        ("fedadam", {"eta": "fast"}, ["eta='fast'", "float"]),
        ("krum", {"num_malicious_nodes": 1.5}, ["num_malicious_nodes", "int"]),
        ("fedadam", {"eta": float("nan")}, ["eta", "float"]),
        ("fedavg", {"train_metrics_aggr_fn": "mean"}, ["Python object", "subclass"]),
    ],
)
def test_uncoercible_args_are_usage_errors(spec, args, fragments):
    with pytest.raises(UsageError) as excinfo:
        build_strategy(spec, args, num_holders=5)
    assert_one_line_usage_error(excinfo, *fragments)


def test_unknown_arg_lists_the_accepted_ones():
    with pytest.raises(UsageError) as excinfo:
        build_strategy("fedprox", {"mu": 0.1}, num_holders=3)
    assert_one_line_usage_error(excinfo, "FedProx has no argument 'mu'", "proximal_mu")
    assert "train_metrics_aggr_fn" not in str(excinfo.value) and "weighted_by_key" not in str(excinfo.value)


@pytest.mark.parametrize("name", ["fraction_train", "min-train-nodes", "min_available_nodes", "arrayrecord_key",
                                  "weighted_by_key", "train_loss_key"])
def test_sampling_and_record_keys_cannot_be_strategy_args(name):
    with pytest.raises(UsageError) as excinfo:
        build_strategy("fedavg", {name: 1}, num_holders=3)
    assert_one_line_usage_error(excinfo, name.replace("-", "_"))


def test_constructor_rejection_becomes_a_usage_error():
    with pytest.raises(UsageError) as excinfo:
        build_strategy("fedtrimmedavg", {"beta": 0.6}, num_holders=5)
    assert_one_line_usage_error(excinfo, "FedTrimmedAvg", "beta")


# ------------------------------------------------------------------------------------------------
# Sampling and what each strategy needs


def test_sampling_settings_reach_the_strategy():
    strategy = build_strategy(
        "fedavg", {}, num_holders=10, fraction_train=0.3, fraction_evaluate=0.0, min_train_holders=2
    )
    assert (strategy.fraction_train, strategy.fraction_evaluate) == (0.3, 0.0)
    assert (strategy.min_train_nodes, strategy.min_evaluate_nodes, strategy.min_available_nodes) == (2, 0, 10)
    assert sampled_train_holders(strategy, 10) == 3
    assert len(train_round(strategy, 10, global_arrays())) == 3


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"fraction_train": 0.0}, "fraction_train"),
        ({"fraction_train": 1.5}, "fraction_train"),
        ({"fraction_evaluate": -0.1}, "fraction_evaluate"),
        ({"min_train_holders": 5}, "exceeds the 4 holders"),
        ({"min_evaluate_holders": 0, "min_train_holders": 0}, "min_train_holders"),
    ],
)
def test_bad_sampling_settings_are_usage_errors(kwargs, fragment):
    with pytest.raises(UsageError) as excinfo:
        build_strategy("fedavg", {}, num_holders=4, **kwargs)
    assert_one_line_usage_error(excinfo, fragment)


def test_krum_needs_2f_plus_3_replies():
    with pytest.raises(UsageError) as excinfo:
        build_strategy("krum", {"num_malicious_nodes": 1}, num_holders=4)
    assert_one_line_usage_error(excinfo, "Krum", "2f+3 = 5", "4 training replies")
    krum = build_strategy("krum", {"num_malicious_nodes": 1}, num_holders=8, fraction_train=0.25)
    assert krum.min_train_nodes == 5  # raised from the unset minimum to what Krum needs
    assert sampled_train_holders(krum, 8) == 5


def test_bulyan_needs_4f_plus_3_replies():
    with pytest.raises(UsageError) as excinfo:
        build_strategy("bulyan", {"num_malicious_nodes": 1}, num_holders=6)
    assert_one_line_usage_error(excinfo, "Bulyan", "4f+3 = 7")
    assert build_strategy("bulyan", {"num_malicious_nodes": 1}, num_holders=7).num_malicious_nodes == 1


def test_explicit_minimum_below_what_krum_needs_is_rejected():
    with pytest.raises(UsageError) as excinfo:
        build_strategy("krum", {}, num_holders=10, fraction_train=0.1, min_train_holders=2)
    assert_one_line_usage_error(excinfo, "2 training replies", "2f+3 = 3")


def test_multikrum_selection_must_fit_the_honest_replies():
    with pytest.raises(UsageError) as excinfo:
        build_strategy("multikrum", {"num_nodes_to_select": 5, "num_malicious_nodes": 1}, num_holders=5)
    assert_one_line_usage_error(excinfo, "num_nodes_to_select = 5", "1..4")


def test_defaults_that_keep_a_strategy_from_collapsing_to_fedavg_or_krum():
    assert build_strategy("fedavgm", {}, num_holders=3).server_momentum == 0.9
    assert build_strategy("fedavgm", {"server_momentum": 0.0}, num_holders=3).server_momentum == 0.0
    assert build_strategy("multikrum", {"num_malicious_nodes": 1}, num_holders=6).num_nodes_to_select == 5
    assert build_strategy("multikrum", {"num_nodes_to_select": 2}, num_holders=6).num_nodes_to_select == 2


def test_qfedavg_takes_the_holders_learning_rate_or_asks_for_it():
    with pytest.raises(UsageError) as excinfo:
        build_strategy("qfedavg", {}, num_holders=3)
    assert_one_line_usage_error(excinfo, "client_learning_rate", "--strategy-arg client_learning_rate=")
    assert build_strategy("qfedavg", {}, num_holders=3, learning_rate=0.05).client_learning_rate == 0.05
    explicit = build_strategy("qfedavg", {"client_learning_rate": 0.2}, num_holders=3, learning_rate=0.05)
    assert explicit.client_learning_rate == 0.2


def test_fedprox_sends_its_proximal_mu_to_the_holders():
    default = build_strategy("fedprox", {}, num_holders=3)
    assert isinstance(default, FedProx) and default.proximal_mu == 0.01
    strategy = build_strategy("fedprox", parse_strategy_args(["proximal-mu=0.25"]), num_holders=3)
    for message in train_round(strategy, 3, global_arrays()):
        config = message.content["config"]
        assert config["proximal-mu"] == 0.25
        assert config["server-round"] == 1 and config["lr"] == 0.05


# ------------------------------------------------------------------------------------------------
# The example user strategy


def test_accuracy_weighting_changes_the_aggregate_the_predicted_way():
    current = {key: np.zeros(shape, np.float32) for key, shape in SHAPES.items()}
    updates = [{key: np.full(shape, value, np.float32) for key, shape in SHAPES.items()} for value in (1.0, 3.0)]
    accuracies, examples, temperature = (0.9, 0.3), (10, 30), 0.2

    def aggregate(strategy):
        instructions = train_round(strategy, 2, current)
        replies = [
            reply(message, update, examples=n, accuracy=accuracy)
            for message, update, n, accuracy in zip(instructions, updates, examples, accuracies)
        ]
        return strategy.aggregate_train(1, replies)

    fedavg_arrays, fedavg_metrics = aggregate(build_strategy("fedavg", {}, num_holders=2))
    weighted_arrays, weighted_metrics = aggregate(
        build_strategy(f"{EXAMPLE_FILE}:AccuracyWeightedFedAvg", {"temperature": temperature}, num_holders=2)
    )
    weights = np.array(examples) * np.exp(np.array(accuracies) / temperature)
    expected = float(weights @ np.array([1.0, 3.0]) / weights.sum())
    assert np.allclose(flat(numpy_arrays(fedavg_arrays)), 2.5)  # (10 * 1 + 30 * 3) / 40
    assert np.allclose(flat(numpy_arrays(weighted_arrays)), expected, atol=1e-6)
    assert expected < 2.0  # the accurate holder (update 1.0) now dominates
    assert weighted_metrics["val_accuracy"] == pytest.approx(fedavg_metrics["val_accuracy"])  # metrics by num_examples


def test_accuracy_weighting_needs_the_accuracy_metric():
    strategy = build_strategy(f"{EXAMPLE_FILE}:AccuracyWeightedFedAvg", {}, num_holders=1)
    (instruction,) = train_round(strategy, 1, global_arrays())
    content = RecordDict({"arrays": to_record(global_arrays()), "metrics": MetricRecord({"num_examples": 5})})
    with pytest.raises(AggregationError):
        strategy.aggregate_train(1, [Message(content, reply_to=instruction)])


def test_accuracy_weighting_rejects_a_non_positive_temperature():
    with pytest.raises(UsageError) as excinfo:
        build_strategy(f"{EXAMPLE_FILE}:AccuracyWeightedFedAvg", {"temperature": 0}, num_holders=2)
    assert_one_line_usage_error(excinfo, "temperature")


# ------------------------------------------------------------------------------------------------
# Differential privacy


def dp_fedavg(mode: str, *, noise_multiplier: float, clipping_norm: float, num_holders: int) -> Strategy:
    return with_differential_privacy(
        build_strategy("fedavg", {}, num_holders=num_holders),
        mode=mode,
        noise_multiplier=noise_multiplier,
        clipping_norm=clipping_norm,
        num_sampled_holders=num_holders,
    )


def large_updates(instructions, current, scale=50.0):
    rng = np.random.default_rng(7)
    return [reply(message, nudged(current, rng, scale=scale)) for message in instructions]


@pytest.mark.parametrize("name", ["fedavg", "strategies.examples.accuracy_weighted:AccuracyWeightedFedAvg"])
def test_server_side_dp_clips_every_update_before_aggregation(name):
    # Both aggregate by a weighted mean, so the clipped updates' mean has norm <= clipping_norm.
    clipping_norm, current = 1.5, global_arrays()
    plain = build_strategy(name, {}, num_holders=4)
    plain_arrays, _ = plain.aggregate_train(1, large_updates(train_round(plain, 4, current), current))
    assert np.linalg.norm(flat(numpy_arrays(plain_arrays)) - flat(current)) > 10 * clipping_norm

    private = with_differential_privacy(
        build_strategy(name, {}, num_holders=4),
        mode="server",
        noise_multiplier=0.0,
        clipping_norm=clipping_norm,
        num_sampled_holders=4,
    )
    replies = large_updates(train_round(private, 4, current), current)
    arrays, _ = private.aggregate_train(1, replies)
    update_norm = np.linalg.norm(flat(numpy_arrays(arrays)) - flat(current))
    assert 0 < update_norm <= clipping_norm * (1 + 1e-5)
    for clipped in replies:  # the wrapper rewrites each reply with its clipped version
        holder = numpy_arrays(next(iter(clipped.content.array_records.values())))
        assert np.linalg.norm(flat(holder) - flat(current)) == pytest.approx(clipping_norm, rel=1e-5)


def test_server_side_dp_noise_has_the_documented_scale():
    size = 200_000
    current = {"w": np.zeros(size, np.float32)}
    update = np.full(size, 0.1 / math.sqrt(size), np.float32)  # norm 0.1, below the clipping norm
    private = dp_fedavg("server", noise_multiplier=2.0, clipping_norm=0.5, num_holders=2)
    instructions = list(private.configure_train(1, to_record(current), ConfigRecord(), StubGrid(2)))
    metrics = MetricRecord({"num_examples": 1, "train_loss": 1.0})
    replies = [
        Message(RecordDict({"arrays": to_record({"w": update}), "metrics": metrics}), reply_to=m) for m in instructions
    ]
    arrays, _ = private.aggregate_train(1, replies)
    noise = arrays["w"].numpy() - update
    assert noise.std() == pytest.approx(2.0 * 0.5 / 2, rel=0.02)
    assert abs(noise.mean()) < 0.01
    assert describe_strategy(private)["differential_privacy"]["noise_stddev"] == pytest.approx(0.5)


def test_client_side_dp_sends_the_norm_and_fixedclipping_mod_clips():
    clipping_norm, current = 2.0, global_arrays()
    private = dp_fedavg("client", noise_multiplier=0.0, clipping_norm=clipping_norm, num_holders=3)
    instructions = train_round(private, 3, current)
    assert all(message.content["config"]["clipping_norm"] == clipping_norm for message in instructions)
    context = Context(run_id=1, node_id=101, node_config={}, state=RecordDict(), run_config={})
    (unclipped,) = large_updates(instructions[:1], current)
    clipped = fixedclipping_mod(instructions[0], context, lambda message, _: unclipped)
    assert not clipped.has_error()
    sent = numpy_arrays(clipped.content["arrays"])
    assert np.linalg.norm(flat(sent) - flat(current)) == pytest.approx(clipping_norm, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"mode": "local"}, "mode"),
        ({"noise_multiplier": -0.1}, "noise multiplier"),
        ({"noise_multiplier": math.inf}, "noise multiplier"),
        ({"clipping_norm": 0.0}, "clipping norm"),
        ({"num_sampled_holders": 0}, "num_sampled_holders"),
    ],
)
def test_bad_dp_settings_are_usage_errors(kwargs, fragment):
    settings = {"mode": "server", "noise_multiplier": 1.0, "clipping_norm": 1.0, "num_sampled_holders": 3, **kwargs}
    with pytest.raises(UsageError) as excinfo:
        with_differential_privacy(build_strategy("fedavg", {}, num_holders=3), **settings)
    assert_one_line_usage_error(excinfo, fragment)


def test_dp_wraps_once_and_is_described():
    fedprox = build_strategy("fedprox", {"proximal_mu": 0.1}, num_holders=3)
    private = with_differential_privacy(
        fedprox, mode="client", noise_multiplier=1.0, clipping_norm=4.0, num_sampled_holders=3
    )
    with pytest.raises(UsageError):
        with_differential_privacy(
            private, mode="server", noise_multiplier=1.0, clipping_norm=1.0, num_sampled_holders=3
        )
    description = json.loads(json.dumps(describe_strategy(private)))
    assert description["name"] == "FedProx" and description["builtin"] == "fedprox"
    assert description["args"]["proximal_mu"] == 0.1
    assert description["differential_privacy"] == {
        "mode": "client",
        "mechanism": "DifferentialPrivacyClientSideFixedClipping",
        "noise_multiplier": 1.0,
        "clipping_norm": 4.0,
        "num_sampled_holders": 3,
        "noise_stddev": pytest.approx(4.0 / 3),
    }
    assert sampled_train_holders(private, 3) == 3
