"""Frozen-dataclass configs from YAML with strict keys, `--set a.b=c` overrides, and a saved resolved copy.

Each stage declares one frozen dataclass; its field names are exactly the YAML keys. Unknown keys,
wrong types and bad overrides raise Orca2Error naming the file, line and key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from orca2.errors import Orca2Error

T = TypeVar("T")


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: typing.Callable[[], Any] | None = None,
    secret: bool = False,
    short: str | None = None,
    argument: bool = False,
    split: str | None = None,
    flatten: bool = False,
) -> Any:
    """A config field declared once: its YAML key, its CLI flag (orca2.flags), its help text and its default.

    `factory` builds a mutable or nested default; `short` adds an alias (-o); `argument` takes the value(s) as the
    command's positional arguments; `split` also accepts one comma-separated value (--bench gsm8k,bbh); `flatten`
    gives a nested section's fields flags of their own (--temperature for sampling.temperature). A secret (an API
    key) is left out of the repr, has no flag, and config_to_dict — the one door to files, manifests, hashes and
    summaries — writes it as "***"."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default: use factory=")
    metadata = {
        "help": help,
        "secret": secret,
        "short": short,
        "argument": argument,
        "split": split,
        "flatten": flatten,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, repr=not secret, metadata=metadata)
    return dataclasses.field(default=default, repr=not secret, metadata=metadata)


def _load_yaml_with_lines(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """The data, and the line of every mapping key by its dotted path (yaml loads here, not with the CLI)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise Orca2Error(f"{source}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    if node is not None:
        walk(node, "")
    return yaml.load(text, Loader=yaml.SafeLoader), lines


def read_yaml(path: str | Path) -> tuple[Any, dict[str, int]]:
    """Parse a YAML file; return (data, {dotted key: line number})."""
    path = Path(path)
    if not path.exists():
        raise Orca2Error(f"{path}: no such file")
    return _load_yaml_with_lines(path.read_text(encoding="utf-8"), str(path))


class _Loc(typing.NamedTuple):
    source: str
    lines: dict[str, int]

    def at(self, dotted: str) -> str:
        line = self.lines.get(dotted)
        return f"{self.source}:{line}: key '{dotted}'" if line else f"{self.source}: key '{dotted}'"


def _coerce(value: Any, tp: Any, loc: _Loc, dotted: str) -> Any:
    """Check `value` against a field type, converting where YAML is looser than Python (int → float, list → tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, loc, dotted)
            except Orca2Error as exc:
                errors.append(str(exc))
        raise Orca2Error(errors[0] if errors else f"{loc.at(dotted)}: must be null")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise Orca2Error(f"{loc.at(dotted)}: must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise Orca2Error(f"{loc.at(dotted)}: must be a mapping")
        return _build(tp, value, loc, dotted + ".")
    if origin in (tuple, list):
        if isinstance(value, dict):
            raise Orca2Error(f"{loc.at(dotted)}: must be a list")
        items = value if isinstance(value, (list, tuple)) else [value]
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, loc, dotted) for v in items)
    if origin is dict:
        if not isinstance(value, dict):
            raise Orca2Error(f"{loc.at(dotted)}: must be a mapping")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, loc, dotted): _coerce(v, val_tp, loc, f"{dotted}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            raise Orca2Error(f"{loc.at(dotted)}: must be {tp.__name__}, got {value!r}")
        return value
    return value


def _build(cls: type[T], data: dict[str, Any], loc: _Loc, prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise Orca2Error(f"{loc.at(dotted)}: unknown key (valid: {', '.join(sorted(fields))})")
        factory = fields[key].default_factory
        if isinstance(value, dict) and factory is not dataclasses.MISSING and dataclasses.is_dataclass(hints[key]):
            default = factory()  # a section given in part keeps the field's own defaults for the rest
            value = {**{f.name: getattr(default, f.name) for f in dataclasses.fields(default)}, **value}
        kwargs[key] = _coerce(value, hints[key], loc, dotted)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise Orca2Error(f"{loc.source}: missing required key '{prefix}{missing[0]}'")
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'a.b=value' into ('a.b', value parsed as a YAML scalar)."""
    if "=" not in text:
        raise Orca2Error(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=2e-5")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise Orca2Error(f"--set {text!r}: empty key")
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(raw):
        value = float(raw)
    return key.strip(), value


def _looks_like_float(raw: str) -> bool:
    # YAML 1.1 reads '2e-5' as a string; users mean a number.
    try:
        float(raw)
    except ValueError:
        return False
    return any(c.isdigit() for c in raw)


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    flags: dict[str, Any] | None = None,
) -> T:
    """Build `cls` from the YAML at `path`, then command-line `flags` (None = not given), then `--set` overrides."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "<command line>"
    if path is not None:
        loaded, lines = read_yaml(path)
        source = str(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise Orca2Error(f"{path}:1: the config must be a mapping of keys to values")
        _deep_update(data, loaded)
    for key, value in (flags or {}).items():  # dotted keys reach into nested sections: "client.concurrency"
        if value is not None and value != ():
            _set_dotted(data, key, value)
            lines.pop(key, None)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
        lines.pop(key, None)
    try:
        return _build(cls, data, _Loc(source, lines), "")
    except (TypeError, ValueError) as exc:  # a config's own __post_init__ checks
        if isinstance(exc, Orca2Error):
            raise
        raise Orca2Error(f"{source}: {exc}") from None


def _deep_update(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value


SECRET = "***"
SECRET_KEYS = frozenset({"api_key"})  # a raw mapping (a section kept as a dict until it is built) hides these keys too


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (tuples as lists), ready for YAML or JSON: the one door through which
    configs reach files, manifests, config hashes and summaries. Secret fields (option(..., secret=True)) are
    written as "***" whatever their value, so no key is ever written and a changed key changes no hash."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {
                f.name: SECRET
                if f.metadata.get("secret") and getattr(value, f.name) is not None
                else plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
            }
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: SECRET if k in SECRET_KEYS and v is not None else plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Save the resolved config beside a stage's output, so the run can be repeated exactly (secrets as "***")."""
    import yaml

    from orca2.io import atomic_text

    with atomic_text(path) as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, allow_unicode=True)


def build_section(cls: type[T], data: dict[str, Any], source: str, lines: dict[str, int], prefix: str) -> T:
    """Build one section of a larger YAML (keys under `prefix`), with errors naming file, line and dotted key."""
    try:
        return _build(cls, data, _Loc(source, lines), prefix)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, Orca2Error):
            raise
        raise Orca2Error(f"{source}: section '{prefix.rstrip('.')}': {exc}") from None
