"""Recipe files -> typed dataclasses.

A recipe is one YAML mapping that says which registered method to train, on which data,
for how long, and how to sample and evaluate afterwards. This module turns it into a
`Recipe` of dataclasses and rejects anything it does not understand *before* any work
starts: unknown keys (with the allowed keys and a "did you mean"), values of the wrong
type, a missing file, YAML that is not a mapping, a method nobody registered.

Validation is driven by the dataclass field type hints (`typing.get_type_hints`), so adding
a field to a section is the only change needed to accept, check and save a new option.
Field metadata `{"min": x}` adds a lower bound; `Literal[...]` lists the allowed choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = [
    "ConfigError", "DataConfig", "TrainConfig", "SampleConfig", "EvalConfig", "Recipe",
    "load_recipe", "recipe_from_dict", "recipe_to_dict", "save_recipe", "check_known_keys",
    "dataclass_from_mapping", "read_yaml", "parse_override", "add_override_arguments", "overrides_from_args", "setting_differences",
]


class ConfigError(ValueError):
    """A recipe (or a section of it) is invalid; the message names the key and the file."""


@dataclass
class DataConfig:
    """Which dataset to load and how to batch it; `batch_size` is per process."""

    name: str = "digits"
    root: Optional[str] = None
    image_size: int = field(default=16, metadata={"min": 1})
    resize: str = "pad"
    channels: Optional[int] = field(default=None, metadata={"min": 1})
    batch_size: int = field(default=128, metadata={"min": 1})
    num_workers: int = field(default=0, metadata={"min": 0})


@dataclass
class TrainConfig:
    """Optimisation schedule; a step is one optimizer update (`grad_accum` micro-batches).

    `optimizer`: AdamW (with `betas`) or SGD with (heavy-ball) `momentum`. The LR warms up
    linearly over `warmup_steps`, then is multiplied by `lr_gamma` at each step in
    `lr_milestones` (MEAL V2's regime: 0.01, then x0.1).
    """

    max_steps: int = field(default=1000, metadata={"min": 0})
    max_minutes: Optional[float] = field(default=None, metadata={"min": 0})
    lr: float = field(default=2.0e-4, metadata={"min": 0})
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = field(default=0.1, metadata={"min": 0})
    momentum: float = field(default=0.9, metadata={"min": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = field(default=0, metadata={"min": 0})
    grad_accum: int = field(default=1, metadata={"min": 1})
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] = "no"
    ema_decay: float = field(default=0.9999, metadata={"min": 0})
    ema_warmup: bool = True
    checkpoint_every: int = field(default=500, metadata={"min": 1})
    keep_checkpoints: int = field(default=2, metadata={"min": 1})
    log_every: int = field(default=50, metadata={"min": 1})
    grad_clip: Optional[float] = field(default=None, metadata={"min": 0})


@dataclass
class SampleConfig:
    """How the trained model is sampled at the end of training. `prompts`: the fixed prompts of the
    sample grids of text-to-image runs on captioned data (one row each, `num_per_class` columns)."""

    num_per_class: int = field(default=10, metadata={"min": 1})
    steps: int = field(default=50, metadata={"min": 1})
    guidance_scale: float = 1.0
    scheduler: str = "ddim"
    prompts: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """How generated samples are scored (FID features, sample count). `feature_layer`: the FID
    feature layer (default: the extractor's own, e.g. Inception's "2048"; "64" for a quick check)."""

    num_samples: int = field(default=1000, metadata={"min": 1})
    feature_extractor: str = "digits-cnn"
    inception_weights: Optional[str] = None
    feature_layer: Optional[str] = None
    batch_size: int = field(default=256, metadata={"min": 1})


@dataclass
class Recipe:
    """A whole recipe. `model` is free-form: the method validates it.

    `output_dir` defaults to `runs/<method>`.
    """

    method: str
    seed: int = 0
    output_dir: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = f"runs/{self.method}"


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 demands a dot: `1.0e-4`) and refuses
    a key given twice in one mapping (plain YAML keeps the last value silently; a repeated
    section would replace the whole first one)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges may be overridden by design
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                if not isinstance(key, typing.Hashable):
                    continue  # SafeLoader reports an unhashable key below
                if key in first_line:
                    raise ConfigError(f"{key_node.start_mark.name}: duplicate key {key!r} at lines "
                                      f"{first_line[key]} and {line}")
                first_line[key] = line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def check_known_keys(mapping: dict, allowed, section: str, source: str) -> None:
    """Raise ConfigError for the first key of `mapping` not in `allowed`.

    Public so that methods validating their free-form `model:` section give the same error.
    """
    allowed = list(allowed)
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            where = f"{section}.{key}" if section else str(key)
            raise ConfigError(
                f"{source}: unknown key '{where}'; allowed keys of "
                f"{f'section {section!r}' if section else 'the recipe'}: "
                f"{', '.join(allowed)}{hint}")


def _type_name(tp) -> str:
    """Readable name of a type hint for error messages: `float or null`, `a mapping`, ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str, source: str):
    """Return `value` checked against type hint `tp` (int widened to float, tuples from lists)."""
    def fail():
        raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r} "
                          f"({type(value).__name__})")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:
            try:
                return _coerce(value, option, key, source)
            except ConfigError as err:
                errors.append(err)
        if len(inner) == 1 and isinstance(value, (list, tuple, dict)):
            raise errors[0]  # the element-level message is the precise one
        fail()
    if origin is Literal:
        if value not in args:
            fail()
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail()
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{source}: '{key}' must have {len(args)} elements "
                                  f"({_type_name(tp)}), got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source)
                         for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return _build(tp, value, key, source)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is int and isinstance(value, bool):
        fail()
    if not isinstance(value, tp):
        fail()
    return value


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict


def _build(cls, raw: dict, section: str, source: str):
    """Instantiate dataclass `cls` from mapping `raw`, checking every key and value."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_known_keys(raw, fields, section, source)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        key = f"{section}.{name}" if section else name
        if value is None and _is_section(hints[name]):
            continue  # an empty section (`data:` with every key commented out) means defaults
        kwargs[name] = _coerce(value, hints[name], key, source)
        bound = fields[name].metadata.get("min")
        if bound is not None and kwargs[name] is not None and kwargs[name] < bound:
            raise ConfigError(f"{source}: '{key}' must be >= {bound}, got {value!r}")
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required key '{missing[0]}'"
                          + (f" in section '{section}'" if section else ""))
    return cls(**kwargs)


def _apply_overrides(raw: dict, overrides: dict, source: str) -> None:
    """Set dotted keys (`{"train.max_steps": 10}`) in the raw mapping before validation."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: override '{dotted}': '{part}' is not a section")
            node = child
        node[leaf] = value


def recipe_from_dict(raw: dict, source: str = "<dict>", overrides: dict | None = None) -> Recipe:
    """Validate a recipe mapping; `source` names it in error messages.

    Checks the method name against the registry and lets the method validate `model:`.
    """
    from genforge.train.registry import RegistryError, get_method

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    _apply_overrides(raw, overrides or {}, source)
    recipe = _build(Recipe, raw, "", source)
    try:
        method_cls = get_method(recipe.method)
    except RegistryError as err:
        raise ConfigError(f"{source}: 'method': {err}") from None
    try:
        method_cls(recipe).validate_model_config(recipe.model)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return recipe


def read_yaml(path) -> object:
    """The parsed YAML file at `path` (duplicate keys are errors), or a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        with path.open() as stream:  # a stream, so that YAML marks carry the file name
            return yaml.load(stream, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def dataclass_from_mapping(cls, raw: dict, source: str, section: str = "", overrides: dict | None = None):
    """Build dataclass `cls` from `raw` with the recipe checks (unknown keys, types, bounds).

    For recipe kinds other than training recipes (e.g. distillation recipes).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    _apply_overrides(raw, overrides or {}, source)
    return _build(cls, raw, section, source)


def load_recipe(path, overrides: dict | None = None) -> Recipe:
    """Read and validate the recipe at `path`; `overrides` maps dotted keys to values."""
    return recipe_from_dict(read_yaml(path), source=str(path), overrides=overrides)


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain nested dict of the recipe (tuples as lists), ready for YAML or JSON."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(recipe))


def save_recipe(recipe: Recipe, path) -> None:
    """Write the resolved recipe as YAML so a run directory records exactly what ran."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


_E_NOTATION = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_override(item: str) -> tuple[str, object]:
    """One ``--set KEY=VALUE`` of any genforge command: (dotted key, VALUE read as YAML).

    A number that YAML 1.1 leaves a string (``1e-2``) is a float. Meant as argparse's
    ``type=``: a malformed item is an ``argparse.ArgumentTypeError`` saying what was expected.
    """
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{key}: the value {value!r} is not valid YAML ({err})") from None
    if isinstance(parsed, str) and _E_NOTATION.fullmatch(parsed.strip()):
        return key, float(parsed)
    return key, parsed


def add_override_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """A command's ``--output-dir D`` and repeatable ``--set KEY=VALUE`` (``example``: a KEY=VALUE for the help)."""
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--set", type=parse_override, action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a recipe key, e.g. --set {example} (repeatable)")


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The dotted-key overrides that :func:`add_override_arguments`' options ask for, ``output_dir`` included."""
    overrides = dict(args.set)
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    return overrides


def setting_differences(recorded: dict, now: dict, keys=None) -> str:
    """``"key: recorded -> now; ..."`` for the keys (default: all of either) whose values differ, '' if none.

    How every refusal to mix runs (a resumed training, a distillation state, reinforced shards)
    names what changed.
    """
    keys = sorted(recorded.keys() | now.keys()) if keys is None else keys
    return "; ".join(f"{key}: {recorded.get(key)!r} -> {now.get(key)!r}"
                     for key in keys if recorded.get(key) != now.get(key))
