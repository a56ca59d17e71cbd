"""INI configuration: parsed once per process into a frozen, typed :class:`Config`.

Called by every application rank in ``veloc.init`` and by the active backend at start.
VELOC's own files work unchanged: top-level keys with no section header. Extensions
live in sections (``[checksum]``, ``[flush]``, ...). Every key may be overridden from the
environment: ``VELOC_<KEY>`` for a top-level key, ``VELOC_<SECTION>_<KEY>`` for a key in
a section. Unknown keys, unknown sections and bad values raise :class:`ConfigError`
naming the key and what is accepted (VELOC ignores typos; we do not).

Every top-level key VELOC's own runtime reads is accepted. Those that have a meaning
here are mapped to it (``persistent_interval``, ``ec_interval``, ``max_versions``,
``scratch_versions``, ``chksum``, ``failure_domain``, ``max_parallelism``, ...); the
others (``COMPAT_ONLY``: ``axl_config``, ``axl_type``, ``threaded``, ``meta``, ...) are
parsed, kept, and logged once per process at INFO as having no effect here.

``scratch_versions`` defaults to ``DEFAULT_SCRATCH_VERSIONS`` (2): scratch keeps the
two newest versions of each rank and recycles the files of older ones, so a default
configuration never fills node memory; ``0`` keeps every version (VELOC's default).
"""
import configparser
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional

from veloc.config_keys import Key, boolean, choice, integer, path_template, positive_number, text
from veloc.errors import ConfigError
from veloc.names import check_node_id

TOP = "__top__"
DEFAULT_SCRATCH_VERSIONS = 2
log = logging.getLogger("veloc.config")


# The key parsers live in veloc.config_keys, shared with the modules that declare sections.
_bool, _int, _positive_number, _choice, _text, _path_template = (
    boolean, integer, positive_number, choice, text, path_template)


# VELOC's top-level keys, with VELOC's meanings and defaults.
TOP_KEYS = {
    "scratch": Key(_path_template, required=True),
    "persistent": Key(_path_template),
    "mode": Key(_choice("sync", "async"), "sync"),
    "persistent_interval": Key(_int(), 0),   # seconds; 0 = every version, < 0 = never
    "ec_interval": Key(_int(), 0),           # seconds; 0 = every version, < 0 = never
    "watchdog_interval": Key(_int(0), 0),
    "max_versions": Key(_int(0), 0),         # on persistent; 0 = keep all
    "scratch_versions": Key(_int(0), DEFAULT_SCRATCH_VERSIONS),   # on scratch; 0 = keep all
    "failure_domain": Key(_text),
    "chksum": Key(_bool, True),
    "meta": Key(_path_template),
    "max_parallelism": Key(_int(1), 2),
    "axl_type": Key(_choice("default", "native", "AXL_XFER_SYNC", "AXL_XFER_ASYNC_DW",
                            "AXL_XFER_ASYNC_BBAPI", "AXL_XFER_ASYNC_CPPR", "posix", "pthread")),
    "log_prefix": Key(_path_template),
    # Read by VELOC's runtime, no effect here (see COMPAT_ONLY).
    "axl_config": Key(_path_template),
    "threaded": Key(_bool, False),
    "aggregated": Key(_bool, False),
    "cache": Key(_path_template),
    "daos_pool": Key(_text),
    "daos_cont": Key(_text),
}

# Keys VELOC's runtime reads that have no effect here, and why (logged once at INFO).
COMPAT_ONLY = {
    "axl_config": "the flush module copies files itself, without the AXL library",
    "axl_type": "the flush module copies files itself, without the AXL library",
    "threaded": "the engine runs on a node leader rank (sync) or in veloc-backend (async); "
                "no MPI_THREAD_MULTIPLE is needed",
    "aggregated": "each rank's file is flushed to persistent storage on its own",
    "cache": "routed files are written to scratch",
    "meta": "checksums and sizes live in each copy's manifest next to its files",
    "watchdog_interval": "a dead or hung backend is detected by the client itself",
    "daos_pool": "the persistent level is a POSIX path (persistent = PATH); DAOS is not used",
    "daos_cont": "the persistent level is a POSIX path (persistent = PATH); DAOS is not used",
}
_told = set()


# Sections that are not pipeline modules. A module declares its own section as its
# class attribute ``config_keys`` (see veloc/engine/modules/), and section_keys() adds it.
OTHER_SECTIONS = {
    # async mode: a backend that answers no request for this long is hung (BackendError)
    "backend": {"heartbeat_timeout": Key(_positive_number, 5.0)},
    # the training interval policy (veloc/training/policy.py)
    "policy": {"mode": Key(_choice("fixed", "auto"), "auto"), "overhead": Key(_positive_number, 0.05),
               "interval": Key(_int(1)), "seconds": Key(_positive_number), "mtbf": Key(_positive_number),
               "warmup": Key(_int(1), 5)},
    # two-phase snapshots (veloc/training/snapshot.py)
    "snapshot": {"max_in_flight": Key(_int(1), 1), "device_staging": Key(_choice("auto", "device", "pinned"), "auto"),
                 "device_margin_mib": Key(_int(0), 1024)},
}


def _module_classes():
    """The registered pipeline modules that declare a config section."""
    from veloc.engine.pipeline import MODULE_CLASSES
    return [cls for cls in MODULE_CLASSES if cls.config_keys is not None]


def section_keys():
    """``{section: {key: Key}}``: every registered pipeline module's section
    (``register_module`` adds one) and the other sections."""
    out = {cls.name: cls.config_keys for cls in _module_classes()}
    out.update(OTHER_SECTIONS)
    return out


def _read_ini(path):
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), strict=True,
        default_section="__no_defaults__")
    parser.optionxform = str
    try:
        parser.read_string(f"[{TOP}]\n" + text, source=str(path))
    except configparser.Error as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    return {sec: dict(parser.items(sec)) for sec in parser.sections()}, str(path)


def _read_mapping(mapping):
    raw = {TOP: {}}
    for key, value in mapping.items():
        if isinstance(value, dict):
            raw[str(key)] = {str(k): v for k, v in value.items()}
        elif value is not None:
            raw[TOP][str(key)] = value
    return raw, "<mapping>"


def _apply_env(raw, environ):
    for key in TOP_KEYS:
        env = f"VELOC_{key.upper()}"
        if env in environ:
            raw[TOP][key] = environ[env]
    for section, keys in section_keys().items():
        for key in keys:
            env = f"VELOC_{section.upper()}_{key.upper()}"
            if env in environ:
                raw.setdefault(section, {})[key] = environ[env]


def _parse_keys(raw_keys, schema, where, source):
    out = {}
    for key, value in raw_keys.items():
        if key not in schema:
            raise ConfigError(
                f"unknown config key '{key}' {where} in {source}; accepted keys: {', '.join(sorted(schema))}")
        label = key if where == "at top level" else f"{where[4:-1]}.{key}"
        out[key] = schema[key].parse(label, value)
    for key, spec in schema.items():
        if key not in out:
            if spec.required:
                raise ConfigError(f"config key '{key}' is required {where} in {source} (e.g. {key} = /dev/shm/veloc/{{node}})")
            out[key] = spec.default
    return out


@dataclass(frozen=True)
class Config:
    """Frozen, validated configuration shared by the client, the sync engine and the backend.

    Top-level keys are attributes (``cfg.scratch``, ``cfg.scratch_versions``, ...); a
    section's typed keys are ``cfg.section("flush")``. Build one with :func:`load_config`.
    """
    values: MappingProxyType
    sections: MappingProxyType
    source: str = "<mapping>"
    raw: MappingProxyType = field(default_factory=lambda: MappingProxyType({}), compare=False)

    def __getattr__(self, key):
        values = object.__getattribute__(self, "values")
        if key in values:
            return values[key]
        raise AttributeError(key)

    def section(self, name: str) -> Mapping:
        """Typed keys of extension section ``name`` (defaults filled in)."""
        return self.sections[name]

    def scratch_dir(self, node: str, rank: int = 0) -> Path:
        """Node-local scratch root with ``{node}``/``{rank}`` filled in."""
        return Path(self.scratch.format(node=node, rank=rank))

    def node_scratch(self, node: str) -> Path:
        """The node's own scratch folder for the whole job: the scratch path with ``{node}``
        filled in, cut before the first component that depends on ``{rank}``. The backend's
        files and the partner and erasure trees live under it."""
        parts = []
        for part in Path(self.scratch).parts:
            if "{rank" in part:
                break
            parts.append(part.replace("{node}", node))
        return Path(*parts) if parts else Path(".")

    def persistent_dir(self, node: str, rank: int = 0) -> Optional[Path]:
        """Persistent root, or ``None`` when no persistent level is configured."""
        if self.persistent is None:
            return None
        return Path(self.persistent.format(node=node, rank=rank))

    def replace(self, **top) -> "Config":
        """A copy with some top-level keys replaced (validated again)."""
        merged = {sec: dict(keys) for sec, keys in self.raw.items()}
        merged.setdefault(TOP, {}).update({k: v for k, v in top.items()})
        return _build(merged, self.source)


def _tell_compat_only(keys):
    """Log once per process, at INFO, each VELOC key given that has no effect here."""
    for key in sorted(set(keys) & set(COMPAT_ONLY) - _told):
        _told.add(key)
        log.info("config key %s is accepted for VELOC compatibility and has no effect here (%s)",
                 key, COMPAT_ONLY[key])


def check_policy_keys(policy: Mapping, source: str = "") -> None:
    """Cross-key checks of a ``[policy]`` section (also run on mappings handed to the policy)."""
    where = f" in {source}" if source else ""
    if (policy.get("mode") or "auto") == "fixed" and not policy.get("interval") and not policy.get("seconds"):
        raise ConfigError(f"[policy] mode = fixed needs 'interval' (iterations) or 'seconds'{where}: "
                          "set one of them, or use mode = auto")
    bound = policy.get("overhead")
    if bound is not None and not 0 < float(bound) < 1:
        raise ConfigError(f"config key 'policy.overhead' = {bound}{where}: must be a fraction in (0, 1), "
                          "e.g. 0.05 for 5 %")


def _build(raw, source):
    top = _parse_keys(raw.get(TOP, {}), TOP_KEYS, "at top level", source)
    _tell_compat_only(raw.get(TOP, {}))
    sections = {}
    schemas = section_keys()
    for name, keys in raw.items():
        if name == TOP:
            continue
        if name not in schemas:
            raise ConfigError(f"unknown config section [{name}] in {source}; accepted sections: "
                              f"{', '.join(sorted(schemas))}")
    for name, schema in schemas.items():
        sections[name] = MappingProxyType(_parse_keys(raw.get(name, {}), schema, f"in [{name}]", source))
    check_policy_keys(sections["policy"], source)
    for cls in _module_classes():
        cls.check_config(sections[cls.name], top, source)
    frozen_raw = MappingProxyType({k: MappingProxyType(dict(v)) for k, v in raw.items()})
    return Config(MappingProxyType(top), MappingProxyType(sections), source, frozen_raw)


def load_config(cfg, environ: Optional[Mapping[str, str]] = None) -> "Config":
    """Build a :class:`Config` from an INI path, a mapping, or a ``Config`` (returned as is);
    any process, local.

    Environment overrides (``VELOC_<KEY>``, ``VELOC_<SECTION>_<KEY>``; from ``environ``,
    default ``os.environ``) apply to paths and mappings. Raises ConfigError naming the key,
    the file and what is accepted.
    """
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, (str, os.PathLike)):
        raw, source = _read_ini(cfg)
    elif isinstance(cfg, dict) or hasattr(cfg, "items"):
        raw, source = _read_mapping(dict(cfg))
    else:
        raise ConfigError(f"config must be an INI path, a mapping or a veloc.Config, got {type(cfg).__name__}")
    raw.setdefault(TOP, {})
    _apply_env(raw, os.environ if environ is None else environ)
    return _build(raw, source)


def node_id(environ: Optional[Mapping[str, str]] = None) -> str:
    """This process's node identity: ``VELOC_NODE_ID`` if set, else the host name."""
    environ = os.environ if environ is None else environ
    return check_node_id(environ.get("VELOC_NODE_ID") or socket.gethostname().split(".")[0])
