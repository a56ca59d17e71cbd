"""Configuration keys: how a key's text is parsed and checked, and the keys every pipeline
module's section accepts. Used by :mod:`veloc.config` (the top-level keys) and by each
module class, which declares its own section (``config_keys = module_keys(...)``).
Every parser takes ``(key, raw)`` and returns the typed value or raises ConfigError
naming the key and what is accepted.
"""
import os
import string
from dataclasses import dataclass

from veloc.errors import ConfigError


@dataclass(frozen=True)
class Key:
    """One accepted key: its parser and its default (``None`` = unset)."""
    parse: object
    default: object = None
    required: bool = False


def boolean(key, raw):
    low = str(raw).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"config key '{key}' = {raw!r}: expected a boolean (true/false/yes/no/1/0)")


def integer(minimum=None):
    def parse(key, raw):
        try:
            value = int(str(raw).strip(), 10)
        except ValueError:
            raise ConfigError(f"config key '{key}' = {raw!r}: expected an integer") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"config key '{key}' = {value}: must be >= {minimum}")
        return value
    return parse


def positive_number(key, raw):
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ConfigError(f"config key '{key}' = {raw!r}: expected a number") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"config key '{key}' = {raw!r}: must be a positive finite number")
    return value


def choice(*accepted):
    def parse(key, raw):
        value = str(raw).strip()
        if value not in accepted:
            raise ConfigError(f"config key '{key}' = {raw!r}: accepted values are {', '.join(accepted)}")
        return value
    return parse


def text(key, raw):
    value = str(raw).strip()
    if not value:
        raise ConfigError(f"config key '{key}' is empty: give a value or remove the key")
    return value


def path_template(key, raw):
    value = text(key, raw)
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    except ValueError as exc:
        raise ConfigError(f"config key '{key}' = {raw!r}: bad '{{...}}' placeholder ({exc})") from None
    unknown = fields - {"node", "rank"}
    if unknown:
        raise ConfigError(
            f"config key '{key}' = {raw!r}: unknown placeholder(s) {sorted(unknown)}; "
            "only {node} and {rank} are accepted")
    return os.path.expanduser(value)


def byte_size(minimum, maximum):
    def parse(key, raw):
        text = str(raw).strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text.rstrip("IB")[-1:], 1)
        number = text.rstrip("IB").rstrip("KMG") if scale > 1 else text
        try:
            value = int(number, 10) * scale
        except ValueError:
            raise ConfigError(f"config key '{key}' = {raw!r}: expected a size in bytes, e.g. 4M or 4194304") from None
        if not minimum <= value <= maximum:
            raise ConfigError(f"config key '{key}' = {raw!r}: must be between {minimum} and {maximum} bytes")
        return value
    return parse


def module_keys(priority, **extra):
    """The keys every module section accepts (``enabled``, ``priority`` defaulting to
    ``priority``, ``every``), plus ``extra``."""
    keys = {"enabled": Key(boolean, None), "priority": Key(integer(), priority), "every": Key(integer(1), 1)}
    keys.update(extra)
    return keys
