"""Choose, configure and wrap the server's aggregation strategy.

A strategy is any subclass of Flower's Message-API `flwr.serverapp.strategy.Strategy`. The ServerApp calls
its public methods (`configure_train`, `aggregate_train`, `configure_evaluate`, `aggregate_evaluate`) with
an ArrayRecord that holds only the shared backbone; holder-local layers never reach it, so every strategy
works with every holder-local setting.

- `load_strategy_class(spec)`: a built-in name (`fedavg`, `fedprox`, ...), `path/to/file.py:ClassName` or
  `package.module:ClassName`.
- `parse_strategy_args(["KEY=VALUE", ...])`: command-line strategy arguments; values are TOML scalars.
- `build_strategy(spec, args, num_holders=...)`: instantiate with the holder-sampling settings and the
  arguments coerced to the constructor's annotated types; checks what robust aggregators need.
- `sampled_train_holders(strategy, num_holders)`: training replies per round (what the DP wrappers need).
- `with_differential_privacy(strategy, mode=...)`: Flower's central-DP fixed-clipping wrappers.
- `describe_strategy(strategy)`: a JSON-able record of the strategy for the run folder.

A class loaded from a file lives in a module named after the file's resolved path, registered in
`sys.modules`; pickled strategies of that class load again once `load_strategy_class` has run for that spec.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from simulation.errors import UsageError
from simulation.protocol import ARRAYS, CONFIG, NUM_EXAMPLES, TRAIN_LOSS

BUILTIN_STRATEGIES: Mapping[str, type[Strategy]] = types.MappingProxyType(
    {
        "fedavg": FedAvg,
        "fedprox": FedProx,
        "fedadam": FedAdam,
        "fedyogi": FedYogi,
        "fedadagrad": FedAdagrad,
        "fedavgm": FedAvgM,
        "fedmedian": FedMedian,
        "fedtrimmedavg": FedTrimmedAvg,
        "krum": Krum,
        "multikrum": MultiKrum,
        "bulyan": Bulyan,
        "qfedavg": QFedAvg,
    }
)

MPLE_DEFAULT_ARGS: Mapping[type[Strategy], Mapping[str, Any]] = types.MappingProxyType(
    {
        FedProx: types.MappingProxyType({"proximal_mu": 0.01}),
        FedAvgM: types.MappingProxyType({"server_momentum": 0.9}),
    }
)
"""Defaults that replace Flower's where Flower's make the strategy pointless: FedProx with mu = 0 and FedAvgM
with momentum 0 (and server lr 1) are FedAvg. MultiKrum's default selection is set from the sample size."""

SAMPLING_PARAMETERS = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
)
"""Set from the run's holder-sampling settings, never as strategy arguments."""

RECORD_KEYS: Mapping[str, str] = types.MappingProxyType(
    {"arrayrecord_key": ARRAYS, "configrecord_key": CONFIG, "weighted_by_key": NUM_EXAMPLES, "train_loss_key": TRAIN_LOSS}
)
"""Record and metric names the apps use (simulation.protocol), given to every strategy that takes them: the
holders' metrics are snake_case, where Flower's strategies default to weighting by "num-examples"."""

FIXED_PARAMETERS = tuple(RECORD_KEYS)

LEARNING_RATE_PARAMETERS = ("client_learning_rate",)
"""Constructor parameters that mean the holders' learning rate (QFedAvg); filled from the run's lr."""

DP_MODES = ("server", "client")


# --------------------------------------------------------------------------------------------------
# Loading


def load_strategy_class(spec: str) -> type[Strategy]:
    """The Strategy subclass named by `spec`: a built-in name (case-insensitive), `path/to/file.py:Class`
    or `package.module:Class`."""
    spec = spec.strip() if isinstance(spec, str) else ""
    if not spec:
        raise UsageError(f"no strategy given; {_spec_help()}")
    if ":" not in spec:
        try:
            return BUILTIN_STRATEGIES[spec.lower()]
        except KeyError:
            raise UsageError(f"unknown strategy {spec!r}; {_spec_help()}") from None
    location, class_name = (part.strip() for part in spec.rsplit(":", 1))
    if not class_name.isidentifier():
        raise UsageError(f"strategy {spec!r}: {class_name!r} is not a class name; {_spec_help()}")
    if location.endswith(".py") or "/" in location or "\\" in location:
        module = _import_file(Path(location).expanduser())
    else:
        module = _import_module(location)
    candidate = getattr(module, class_name, None)
    if candidate is None:
        found = _strategy_classes_in(module)
        listing = f"strategy classes there: {', '.join(found)}" if found else "it defines no Strategy subclass"
        raise UsageError(f"{location} has no class {class_name!r}; {listing}")
    if not (inspect.isclass(candidate) and issubclass(candidate, Strategy)):
        raise UsageError(
            f"{location}:{class_name} is not a strategy: it must subclass flwr.serverapp.strategy.Strategy "
            "(e.g. FedAvg)"
        )
    if inspect.isabstract(candidate):
        missing = ", ".join(sorted(candidate.__abstractmethods__))
        raise UsageError(f"{location}:{class_name} is abstract; implement {missing}")
    return candidate


def _spec_help() -> str:
    names = ", ".join(BUILTIN_STRATEGIES)
    return f"choose one of {names} or give path/to/file.py:ClassName or package.module:ClassName"


def _import_file(path: Path) -> types.ModuleType:
    if not path.is_file():
        raise UsageError(f"strategy file {path} does not exist; give path/to/file.py:ClassName")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"_mple_strategy_{resolved.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"strategy file {path} cannot be loaded as a Python module; give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - any failure of user code becomes a one-line usage error
        del sys.modules[name]
        raise UsageError(f"cannot import strategy file {path}: {_one_line(error)}") from None
    return module


def _import_module(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001
        raise UsageError(f"cannot import strategy module {name!r}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _strategy_classes_in(module: types.ModuleType) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if inspect.isclass(value) and issubclass(value, Strategy) and not inspect.isabstract(value)
    )


# --------------------------------------------------------------------------------------------------
# Arguments


def parse_strategy_args(pairs: Iterable[str]) -> dict[str, Any]:
    """`["KEY=VALUE", ...]` -> {key: value}. Keys may use dashes or underscores (stored with underscores);
    a value is read as a TOML scalar (int, float, bool, quoted string) where it is one, else kept as text."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, separator, text = str(pair).partition("=")
        key = normalize_arg_name(key)
        if not separator or not key:
            raise UsageError(f"strategy arg {pair!r} must look like KEY=VALUE, e.g. proximal_mu=0.01")
        if key in args:
            raise UsageError(f"strategy arg {key!r} is given twice; keep one")
        args[key] = _parse_scalar(text.strip())
    return args


def normalize_arg_name(name: str) -> str:
    return str(name).strip().replace("-", "_")


def _parse_scalar(text: str) -> Any:
    if "\n" in text:
        return text
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text
    return value if isinstance(value, (bool, int, float, str)) else text


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword-settable constructor parameters with resolved annotations, following `**kwargs` up the MRO
    (a subclass that forwards `**kwargs` to FedAvg accepts FedAvg's parameters too)."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass is object:
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        hints = _type_hints(init)
        forwards_kwargs = False
        for parameter in list(inspect.signature(init).parameters.values())[1:]:
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                forwards_kwargs = True
            elif parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                annotation = hints.get(parameter.name, parameter.annotation)
                found.setdefault(parameter.name, parameter.replace(annotation=annotation))
        if not forwards_kwargs:
            break
    return found


def _type_hints(function: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - unresolvable annotations in user code: leave values uncoerced
        return {}


def coerce_arg(value: Any, annotation: Any, *, name: str, owner: str) -> Any:
    """`value` converted to the parameter's annotated type (int, float, bool, str, unions and Optional of
    them); unannotated parameters take the value as it is."""
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return value
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if type(None) in options and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    for target in options:
        if target is type(None):
            continue
        converted = _convert(value, target)
        if converted is not _NOT_CONVERTIBLE:
            return converted
    if not any(target in (bool, int, float, str) for target in options):
        raise UsageError(
            f"{owner} argument {name!r} takes a Python object ({_type_name(annotation)}) and cannot be set "
            "as a strategy arg; subclass the strategy and set it in your constructor instead"
        )
    raise UsageError(f"{owner} argument {name}={value!r} must be {_type_name(annotation)}")


_NOT_CONVERTIBLE = object()
_TRUE_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _convert(value: Any, target: Any) -> Any:
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS:
            return _TRUE_WORDS[value.strip().lower()]
        return _NOT_CONVERTIBLE
    if target is int:
        if isinstance(value, bool):
            return _NOT_CONVERTIBLE
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                return _NOT_CONVERTIBLE
        return _NOT_CONVERTIBLE
    if target is float:
        if isinstance(value, bool):
            return _NOT_CONVERTIBLE
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                return _NOT_CONVERTIBLE
        if isinstance(number, (int, float)) and math.isfinite(number):
            return float(number)
        return _NOT_CONVERTIBLE
    if target is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return _NOT_CONVERTIBLE
    origin = typing.get_origin(target) or target
    if inspect.isclass(origin) and isinstance(value, origin) and not isinstance(value, str):
        return value
    return _NOT_CONVERTIBLE


def _takes_scalar(annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return True
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return any(option in (bool, int, float, str) for option in options)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _type_name(annotation: Any) -> str:
    if inspect.isclass(annotation) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("collections.abc.", "")


# --------------------------------------------------------------------------------------------------
# Building


def sample_size(num_holders: int, fraction: float, minimum: int) -> int:
    """How many holders Flower's FedAvg family samples: max(int(num_holders * fraction), minimum)."""
    return max(int(num_holders * fraction), minimum)


def sampled_train_holders(strategy: Strategy, num_holders: int) -> int:
    """Training replies per round for `strategy` (the DP wrappers' `num_sampled_holders`): FedAvg's
    max(int(num_holders * fraction_train), min_train_nodes), looking through a DP wrapper."""
    inner = getattr(strategy, "strategy", strategy)
    fraction = getattr(inner, "fraction_train", 1.0)
    minimum = getattr(inner, "min_train_nodes", 0)
    return min(num_holders, sample_size(num_holders, fraction, minimum))


def build_strategy(
    spec: str,
    strategy_args: Mapping[str, Any] | None = None,
    *,
    num_holders: int,
    fraction_train: float = 1.0,
    fraction_evaluate: float = 1.0,
    min_train_holders: int | None = None,
    min_evaluate_holders: int | None = None,
    learning_rate: float | None = None,
) -> Strategy:
    """Instantiate the strategy named by `spec` for a federation of `num_holders`.

    The sampling settings go to the constructor parameters that take them (`fraction_train`,
    `fraction_evaluate`, `min_train_nodes`, `min_evaluate_nodes`, `min_available_nodes` = num_holders).
    An unset `min_train_holders` is the least number of replies the strategy can work with (1; Krum
    2f+3; Bulyan 4f+3). `learning_rate` (the holders' lr) fills `client_learning_rate` (QFedAvg) unless
    given as a strategy arg. `strategy_args` are coerced to the annotated parameter types.
    """
    cls = load_strategy_class(spec)
    owner = cls.__name__
    parameters = constructor_parameters(cls)
    args = _checked_args(cls, parameters, strategy_args or {})
    for name, value in MPLE_DEFAULT_ARGS.get(cls, {}).items():
        if name in parameters:
            args.setdefault(name, value)
    if learning_rate is not None:
        for name in LEARNING_RATE_PARAMETERS:
            if name in parameters:
                args.setdefault(name, coerce_arg(learning_rate, parameters[name].annotation, name=name, owner=owner))
    missing = [
        name
        for name, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty and name not in args and name not in SAMPLING_PARAMETERS
    ]
    if missing:
        example = " ".join(f"--strategy-arg {name}=VALUE" for name in missing)
        raise UsageError(f"{owner} needs {', '.join(missing)}: pass {example}")

    sampling, replies = _sampling_args(
        cls,
        parameters,
        args,
        num_holders=num_holders,
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_holders=min_train_holders,
        min_evaluate_holders=min_evaluate_holders,
    )
    _settle_selection_size(cls, parameters, args, replies)
    try:
        return cls(**sampling, **{name: key for name, key in RECORD_KEYS.items() if name in parameters}, **args)
    except (TypeError, ValueError) as error:
        raise UsageError(f"{owner} rejected its arguments {args}: {_one_line(error)}") from None


def _checked_args(cls: type, parameters: Mapping[str, inspect.Parameter], raw: Mapping[str, Any]) -> dict[str, Any]:
    owner = cls.__name__
    settable = [
        name
        for name, parameter in parameters.items()
        if name not in SAMPLING_PARAMETERS + FIXED_PARAMETERS and _takes_scalar(parameter.annotation)
    ]
    args: dict[str, Any] = {}
    for raw_name, value in raw.items():
        name = normalize_arg_name(raw_name)
        if name in args:
            raise UsageError(f"strategy arg {name!r} is given twice (as dashes and underscores); keep one")
        if name in SAMPLING_PARAMETERS:
            raise UsageError(
                f"strategy arg {name!r} is set by the run's holder sampling (--fraction-train, "
                "--fraction-evaluate); use those instead"
            )
        if name in FIXED_PARAMETERS:
            raise UsageError(f"strategy arg {name!r} is fixed by the MpLe apps and cannot be changed")
        if name not in parameters:
            accepted = ", ".join(settable) if settable else "none"
            raise UsageError(f"{owner} has no argument {name!r}; it accepts: {accepted}")
        args[name] = coerce_arg(value, parameters[name].annotation, name=name, owner=owner)
    return args


def _sampling_args(
    cls: type,
    parameters: Mapping[str, inspect.Parameter],
    args: Mapping[str, Any],
    *,
    num_holders: int,
    fraction_train: float,
    fraction_evaluate: float,
    min_train_holders: int | None,
    min_evaluate_holders: int | None,
) -> tuple[dict[str, Any], int]:
    """(the sampling constructor arguments, training replies per round)."""
    owner = cls.__name__
    _require_count("number of holders", num_holders, minimum=1)
    _require_fraction("fraction_train", fraction_train, allow_zero=False)
    _require_fraction("fraction_evaluate", fraction_evaluate, allow_zero=True)
    needed, reason = _minimum_train_replies(cls, parameters, args)
    if min_train_holders is None:
        min_train_holders = min(num_holders, needed)
    if min_evaluate_holders is None:
        min_evaluate_holders = 1 if fraction_evaluate > 0 else 0
    _require_count("min_train_holders", min_train_holders, minimum=1)
    _require_count("min_evaluate_holders", min_evaluate_holders, minimum=0)
    for name, value in (("min_train_holders", min_train_holders), ("min_evaluate_holders", min_evaluate_holders)):
        if value > num_holders:
            raise UsageError(f"{name} = {value} exceeds the {num_holders} holders; lower it or add holders")
    replies = sample_size(num_holders, fraction_train, min_train_holders)
    if replies < needed:
        raise UsageError(
            f"{owner} gets {replies} training replies per round but {reason}; "
            f"sample at least {needed} holders per round (raise --holders or --fraction-train)"
            + (" or lower num_malicious_nodes" if "num_malicious_nodes" in args else "")
        )
    values = {
        "fraction_train": float(fraction_train),
        "fraction_evaluate": float(fraction_evaluate),
        "min_train_nodes": min_train_holders,
        "min_evaluate_nodes": min_evaluate_holders,
        "min_available_nodes": num_holders,
    }
    return {name: value for name, value in values.items() if name in parameters}, replies


def _argument(parameters: Mapping[str, inspect.Parameter], args: Mapping[str, Any], name: str) -> Any:
    if name in args:
        return args[name]
    parameter = parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _minimum_train_replies(cls: type, parameters, args) -> tuple[int, str]:
    """(least number of training replies the aggregation rule is defined for, why)."""
    malicious = _argument(parameters, args, "num_malicious_nodes") or 0
    if "num_malicious_nodes" in args:
        _require_count("num_malicious_nodes", malicious, minimum=0)
    f_is = f"(f = num_malicious_nodes = {malicious})"
    if issubclass(cls, Bulyan):
        return 4 * malicious + 3, f"Bulyan needs n >= 4f+3 = {4 * malicious + 3} {f_is}"
    if issubclass(cls, MultiKrum):
        return 2 * malicious + 3, f"{cls.__name__} needs n >= 2f+3 = {2 * malicious + 3} {f_is}"
    return 1, "it needs at least one"


def _settle_selection_size(cls: type, parameters, args: dict[str, Any], replies: int) -> None:
    """MultiKrum averages the num_nodes_to_select best-scored replies: n - f unless given (Flower's default 1
    would make it Krum); it must lie in 1..n-f."""
    if not issubclass(cls, MultiKrum) or issubclass(cls, Krum) or "num_nodes_to_select" not in parameters:
        return
    malicious = _argument(parameters, args, "num_malicious_nodes") or 0
    selected = args.setdefault("num_nodes_to_select", replies - malicious)
    if not 1 <= selected <= replies - malicious:
        raise UsageError(
            f"MultiKrum num_nodes_to_select = {selected} must lie in 1..n-f = 1..{replies - malicious} "
            f"(n = {replies} training replies, f = {malicious})"
        )


def _require_count(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _require_fraction(name: str, value: Any, *, allow_zero: bool) -> None:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 1
    valid = valid and (value >= 0 if allow_zero else value > 0)
    if not valid:
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise UsageError(f"{name} must lie in {interval}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Differential privacy


def with_differential_privacy(
    strategy: Strategy,
    *,
    mode: str,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled_holders: int,
) -> Strategy:
    """Wrap `strategy` in Flower's central-DP fixed-clipping wrapper.

    `server`: the strategy clips each reply's update (reply - current global) to L2 norm `clipping_norm`
    before aggregating. `client`: the ClientApp clips (it must run `fixedclipping_mod` on train messages;
    the wrapper puts "clipping_norm" in the train config). Either way Gaussian noise with standard deviation
    noise_multiplier * clipping_norm / num_sampled_holders is added to the aggregate.
    """
    if mode not in DP_MODES:
        raise UsageError(f"differential-privacy mode must be one of {', '.join(DP_MODES)}, got {mode!r}")
    if isinstance(strategy, (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyClientSideFixedClipping)):
        raise UsageError("the strategy already has differential privacy; wrap it once")
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) or not (
        math.isfinite(noise_multiplier) and noise_multiplier >= 0
    ):
        raise UsageError(f"DP noise multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if isinstance(clipping_norm, bool) or not isinstance(clipping_norm, (int, float)) or not (
        math.isfinite(clipping_norm) and clipping_norm > 0
    ):
        raise UsageError(f"DP clipping norm must be a finite number > 0, got {clipping_norm!r}")
    _require_count("num_sampled_holders", num_sampled_holders, minimum=1)
    wrapper = (
        DifferentialPrivacyServerSideFixedClipping if mode == "server" else DifferentialPrivacyClientSideFixedClipping
    )
    return wrapper(strategy, float(noise_multiplier), float(clipping_norm), num_sampled_holders)


def dp_noise_stddev(noise_multiplier: float, clipping_norm: float, num_sampled_holders: int) -> float:
    """Standard deviation of the Gaussian noise Flower adds to each aggregated entry."""
    return noise_multiplier * clipping_norm / num_sampled_holders


# --------------------------------------------------------------------------------------------------
# Description


def describe_strategy(strategy: Strategy) -> dict[str, Any]:
    """JSON-able description for the run folder: class, module, source file, the constructor arguments as
    the strategy holds them (attributes named like the parameters), and the DP settings (or None)."""
    privacy = None
    inner = strategy
    if isinstance(strategy, (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyClientSideFixedClipping)):
        mode = "server" if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping) else "client"
        privacy = {
            "mode": mode,
            "mechanism": type(strategy).__name__,
            "noise_multiplier": strategy.noise_multiplier,
            "clipping_norm": strategy.clipping_norm,
            "num_sampled_holders": strategy.num_sampled_clients,
            "noise_stddev": dp_noise_stddev(
                strategy.noise_multiplier, strategy.clipping_norm, strategy.num_sampled_clients
            ),
        }
        inner = strategy.strategy
    cls = type(inner)
    arguments = {
        name: _jsonable(getattr(inner, name))
        for name in constructor_parameters(cls)
        if hasattr(inner, name)
    }
    try:
        source = inspect.getsourcefile(cls)
    except TypeError:
        source = None
    return {
        "name": cls.__name__,
        "module": cls.__module__,
        "source": source,
        "builtin": next((name for name, builtin in BUILTIN_STRATEGIES.items() if builtin is cls), None),
        "args": arguments,
        "differential_privacy": privacy,
    }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return repr(value)
