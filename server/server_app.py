"""The ServerApp: forms the first layer, runs any Message-API strategy on the shared backbone, checkpoints and
reports every round.

The round loop is Flower's `Strategy.start` loop, unrolled so that the server can audit each message, count
failures, checkpoint after every round and resume, and sample holders reproducibly.
"""

from __future__ import annotations

import json
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from clients.client_app import EXPERIMENT, FIRST_LAYER, INITIAL_LOCAL, first_layer_record
from server.audit import AuditGrid
from server.first_layer import form_first_layer
from simulation.config import ExperimentConfig
from simulation.errors import UsageError
from simulation.federation import derive_seed, federation_for
from simulation.files import atomic_torch_save, atomic_write_json
from simulation.models import SplitModel, order_sensitive_keys
from strategies.registry import build_strategy, describe_strategy, sampled_train_holders, with_differential_privacy

FIRST_LAYER_FILE = "first_layer.pt"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CONNECT_TIMEOUT_S = 600


@dataclass
class ServerSettings:
    config: ExperimentConfig
    run_dir: Path
    variant: str = "mple"
    progress: Callable[[str], None] = field(default=print)
    stop_after_round: int | None = None  # for tests of resume: exit as if killed after this round
    result: dict | None = None
    error: BaseException | None = None


def shared_backbone_names(model: SplitModel, config: ExperimentConfig) -> list[str]:
    """The backbone entries that travel: floating-point, not listed as local, and (with per-holder channel orders)
    not indexed by the first layer's channels."""
    local_prefixes = tuple(config.local_layers)
    sensitive = set(order_sensitive_keys(model)) if config.shuffle == "holder" else set()
    names = []
    for name, value in model.backbone.state_dict().items():
        if not value.is_floating_point() or name in sensitive:
            continue
        if any(name == prefix or name.startswith(prefix.rstrip(".") + ".") for prefix in local_prefixes):
            continue
        names.append(name)
    if not names:
        raise UsageError("no backbone layer is left to share; remove some --local-layers")
    return names


def unknown_local_layers(model: SplitModel, config: ExperimentConfig) -> list[str]:
    names = list(model.backbone.state_dict())
    return [
        prefix for prefix in config.local_layers
        if not any(name == prefix or name.startswith(prefix.rstrip(".") + ".") for name in names)
    ]


def make_strategy(config: ExperimentConfig):
    """The run's strategy with the run's sampling, wrapped for differential privacy when asked."""
    strategy = build_strategy(
        config.strategy,
        dict(config.strategy_args),
        num_holders=config.holders,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_holders=config.min_holders,
        min_evaluate_holders=config.min_holders,
        learning_rate=config.lr,
    )
    if config.dp:
        strategy = with_differential_privacy(
            strategy, mode=config.dp, noise_multiplier=config.dp_noise, clipping_norm=config.dp_clip,
            num_sampled_holders=sampled_train_holders(strategy, config.holders),
        )
    return strategy


class Federation:
    """One variant's run: the loop over rounds with its state, checkpoints and metrics."""

    def __init__(self, grid: Grid, settings: ServerSettings):
        self.settings = settings
        self.config = config = settings.config
        self.out = settings.run_dir / settings.variant
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = settings.progress
        self.model, self.phase0 = self._first_layer()
        missing = unknown_local_layers(self.model, config)
        if missing:
            raise UsageError(f"--local-layers names {missing}, which the {config.model} backbone does not have")
        self.shared = shared_backbone_names(self.model, config)
        state = self.model.backbone.state_dict()
        self.initial_local = ArrayRecord({n: v for n, v in state.items() if n not in self.shared})
        self.grid = AuditGrid(grid, self.shared)
        self.strategy = make_strategy(config)
        self.experiment = json.dumps(
            {"config": config.to_dict(), "variant": settings.variant, "run-dir": str(settings.run_dir.resolve())}
        )
        self.rows: list[dict] = []
        self.round = 0
        self.arrays = ArrayRecord({n: state[n] for n in self.shared})
        self.aligned = config.shuffle != "federation"
        self.rng = random.Random(derive_seed(config.seed, "sampling"))

    # ------------------------------------------------------------ phase 0
    def _first_layer(self) -> tuple[SplitModel, dict]:
        path = self.settings.run_dir / FIRST_LAYER_FILE
        config = self.config
        if path.exists():
            model, summary = form_first_layer(replace(config, first_layer=f"file:{path}"), federation_for(config))
            summary = json.loads((self.settings.run_dir / "first_layer.json").read_text())
            return model, summary
        model, summary = form_first_layer(config, federation_for(config), self.progress)
        atomic_torch_save({"first": model.first.state_dict(), "backbone": model.backbone.state_dict()}, path)
        atomic_write_json(self.settings.run_dir / "first_layer.json", summary)
        return model, summary

    # ------------------------------------------------------------ messages
    def _config(self, **extra) -> ConfigRecord:
        return ConfigRecord({EXPERIMENT: self.experiment, "lr": self.config.lr, **extra})

    def _with_holder_records(self, messages) -> list[Message]:
        messages = list(messages)
        for message in messages:
            message.content[FIRST_LAYER] = first_layer_record(self.model.first)
            message.content[INITIAL_LOCAL] = self.initial_local
        return messages

    def _query(self, node_ids, **config) -> list[Message]:
        content = RecordDict({"config": self._config(**{"server-round": self.round}, **config)})
        messages = [
            Message(content=content, dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids
        ]
        if config.get("action") == "align":
            messages = self._with_holder_records(messages)
            content["arrays"] = self.arrays
        return self.grid.send_and_receive(messages)

    def identify_holders(self) -> None:
        nodes = list(self.grid.get_node_ids())
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while len(nodes) < self.config.holders:
            if time.monotonic() > deadline:
                raise UsageError(
                    f"only {len(nodes)} of {self.config.holders} holders connected within {CONNECT_TIMEOUT_S} s; "
                    "start one SuperNode per holder or lower --holders"
                )
            time.sleep(1)
            nodes = list(self.grid.get_node_ids())
        replies = self._query(nodes, action="identify")
        failed = [reply for reply in replies if reply.has_error()]
        if failed:
            raise RuntimeError(f"{len(failed)} holder(s) could not identify themselves: {failed[0].error.reason}")

    def align_channel_order(self) -> None:
        """With one federation-wide channel order, the initial backbone must be brought into that order once; a
        holder does it (the server never learns the order from this alone: see docs/privacy.md)."""
        first = self.grid.get_node_ids()[0]
        (reply,) = self._query([first], action="align", **{"plain-order": True})
        if reply.has_error():
            raise RuntimeError(f"holder could not align the initial backbone: {reply.error.reason}")
        self.arrays = reply.content["arrays"]
        self.aligned = True

    # ------------------------------------------------------------ rounds
    def run(self) -> dict:
        config = self.config
        self._restore()
        self.identify_holders()
        if not self.aligned:
            self.align_channel_order()
        random.setstate(self.rng.getstate())
        while self.round < config.rounds:
            self.round += 1
            started = time.time()
            row = self._train_round()
            row.update(self._evaluate_round())
            row["seconds"] = round(time.time() - started, 3)
            self.rows.append(row)
            self.rng.setstate(random.getstate())
            self._checkpoint()
            self.progress(_progress_line(row, config.rounds))
            if self.settings.stop_after_round == self.round:
                raise SystemExit(f"stopped after round {self.round} (as asked)")
        final = self._final_evaluation()
        metrics = {"variant": self.settings.variant, "phase0": self.phase0,
                   "strategy": describe_strategy(self.strategy), "rounds": self.rows, "final": final}
        atomic_write_json(self.out / METRICS_FILE, metrics)
        return metrics

    def _train_round(self) -> dict:
        train_config = self._config()
        messages = self._with_holder_records(
            self.strategy.configure_train(self.round, self.arrays, train_config, self.grid)
        )
        replies = self.grid.send_and_receive(messages)
        ok = [reply for reply in replies if not reply.has_error()]
        needed = self.config.min_holders or 1
        counted = len(ok) >= needed
        if counted:
            arrays, _ = self.strategy.aggregate_train(self.round, ok)
            if arrays is not None:
                self.arrays = ArrayRecord(_valid_backbone(arrays.to_torch_state_dict(), self.shared))
        per_holder = self._per_holder(ok, ("train_loss", "train-accuracy", "val-accuracy", "num-examples"))
        return {
            "round": self.round,
            "train_loss": _weighted(ok, "train_loss"),
            "train_accuracy": _weighted(ok, "train-accuracy"),
            "holders_trained": len(ok),
            "train_failures": len(replies) - len(ok) + (len(messages) - len(replies)),
            "counted": counted,
            "failure_reasons": sorted({reply.error.reason.splitlines()[-1][:200] for reply in replies
                                       if reply.has_error()}),
            "per_holder": per_holder,
        }

    def _evaluate_round(self, **config) -> dict:
        messages = self._with_holder_records(
            self.strategy.configure_evaluate(self.round, self.arrays, self._config(**config), self.grid)
        )
        replies = self.grid.send_and_receive(messages)
        ok = [reply for reply in replies if not reply.has_error()]
        # Holders with no test images (--test-fraction 0, or two images each) reply with 0 examples, and Flower's
        # aggregation would divide by their total.
        if _weighted(ok, "eval-loss") is not None and config.get("split") != "global":
            self.strategy.aggregate_evaluate(self.round, ok)
        evaluation = {
            "loss": _weighted(ok, "eval-loss"),
            "accuracy": _weighted(ok, "eval-accuracy"),
            "holders_evaluated": len(ok),
            "evaluate_failures": len(messages) - len(ok),
        }
        per_holder = self._per_holder(ok, ("eval-loss", "eval-accuracy"))
        evaluation["per_holder_eval"] = per_holder
        return evaluation

    def _final_evaluation(self) -> dict:
        """Every evaluated holder scores the final model on the dataset's official test split, morphed with its
        own key (the federated rounds use the holders' own test splits)."""
        result = self._evaluate_round(split="global")
        last = self.rows[-1] if self.rows else {}
        return {
            "accuracy": result["accuracy"],
            "loss": result["loss"],
            "holders": result["holders_evaluated"],
            "per_holder": result["per_holder_eval"],
            "federated_accuracy": last.get("accuracy"),
            "federated_loss": last.get("loss"),
            "first_round_train_loss": self.rows[0]["train_loss"] if self.rows else None,
            "rounds": len(self.rows),
        }

    def _per_holder(self, replies, names) -> dict[str, dict]:
        table = {}
        for reply in replies:
            holder = self.grid.holder_id(reply)
            metrics = reply.content["metrics"]
            table[str(holder)] = {name: metrics[name] for name in names if name in metrics}
        return dict(sorted(table.items(), key=lambda item: int(item[0])))

    # ------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> None:
        state = {
            "round": self.round,
            "arrays": self.arrays.to_torch_state_dict(),
            "rows": self.rows,
            "sampling": self.rng.getstate(),
            "strategy": pickle.dumps(self.strategy),
            "aligned": self.aligned,
        }
        atomic_torch_save(state, self.out / CHECKPOINT_FILE)
        atomic_write_json(self.out / "progress.json", {"rounds": self.rows})

    def _restore(self) -> None:
        path = self.out / CHECKPOINT_FILE
        if not path.exists():
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.round = state["round"]
        self.arrays = ArrayRecord(state["arrays"])
        self.rows = state["rows"]
        self.rng.setstate(state["sampling"])
        self.strategy = pickle.loads(state["strategy"])
        self.aligned = state["aligned"]
        self.progress(f"resuming {self.settings.variant} after round {self.round}/{self.config.rounds}")


def _valid_backbone(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """float32 in the shared order. Server-side optimisers (FedAdam, FedYogi, FedAdagrad) and DP noise treat
    BatchNorm running variances as parameters and can push them below zero, which BatchNorm turns into NaN:
    a variance is never negative, so clamp it."""
    valid = {}
    for name in names:
        value = state[name].float()
        if name.endswith("running_var"):
            value = value.clamp_min(0.0)
        valid[name] = value
    return valid


def _weighted(replies: list[Message], name: str) -> float | None:
    total = sum(float(reply.content["metrics"]["num-examples"]) for reply in replies)
    if not replies or total == 0:
        return None
    return sum(
        float(reply.content["metrics"][name]) * float(reply.content["metrics"]["num-examples"]) for reply in replies
    ) / total


def _progress_line(row: dict, rounds: int) -> str:
    def show(value, pattern):
        return "-" if value is None else pattern.format(value)

    failures = row["train_failures"] + row["evaluate_failures"]
    return (
        f"round {row['round']:>3}/{rounds}  train loss {show(row['train_loss'], '{:.4f}')}  "
        f"eval loss {show(row['loss'], '{:.4f}')}  accuracy {show(row['accuracy'], '{:.3f}')}  "
        f"holders {row['holders_trained']} trained / {row['holders_evaluated']} evaluated"
        f"{f'  failures {failures}' if failures else ''}{'' if row['counted'] else '  (round not counted)'}"
        f"  {row['seconds']:.1f}s"
    )


def build_server_app(settings: ServerSettings) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            settings.result = Federation(grid, settings).run()
        except BaseException as error:
            settings.error = error
            raise

    return app


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _settings_from_run_config(context: Context) -> ServerSettings:
    """`flwr run .`: the run config in pyproject.toml (or --run-config) names a preset (relative paths resolve
    against the project), a run folder ("" = a new one under runs/), the variant, and overrides of any setting;
    "" means "not given"."""
    from simulation.config import build_config
    from simulation.run import VARIANTS, prepare_run_dir

    run_config = {key: value for key, value in context.run_config.items() if value != ""}
    preset = run_config.pop("preset", None)
    if preset is not None and not Path(preset).expanduser().is_absolute() and not Path(preset).exists():
        preset = PROJECT_ROOT / preset
    out = run_config.pop("out", None)
    variant = run_config.pop("variant", "mple")
    if variant not in VARIANTS:
        raise UsageError(f"run config variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    overrides = {key.replace("-", "_"): value for key, value in run_config.items()}
    config = build_config(overrides, preset)
    run_dir = prepare_run_dir(config, Path(out) if out else None, exist_ok=out is not None)
    return ServerSettings(config=config, run_dir=run_dir, variant=variant)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    Federation(grid, _settings_from_run_config(context)).run()
