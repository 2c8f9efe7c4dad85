"""``dpo config show`` and ``dpo config from-trl``: the resolved config (or the defaults) with each
field's description, and a TRL file translated into our config (the parser is :mod:`flows.cli`)."""

from __future__ import annotations

import sys

import yaml

from data_contracts.config import ConfigError, RunConfig, load_config
from data_contracts.config.describe import commented_yaml
from data_contracts.config.trl import detect_form, from_trl, read_mapping


def require_trl_file(path: str) -> None:
    """``--trl-config FILE``: FILE must be in TRL's flat form (then every later load reads it so)."""
    if detect_form(read_mapping(path), path) != "trl":
        raise ConfigError(f"config error: --trl-config {path}: not a TRL file (it has our own sections, or "
                          "no TRL name at the top level); give it as --config")


def cmd_config_show(args) -> int:
    if args.defaults and args.config:
        raise ConfigError("dpo config show: give --defaults or a config file, not both")
    cfg = load_config(None if args.defaults else args.config, args.set)
    source = "the built-in defaults" if args.defaults or not args.config else args.config
    sets = "".join(f" --set {s}" for s in args.set)
    print(f"# dpo config: {source}{sets}; every field under its description. Save it and pass it with "
          "--config (or as the first argument of dpo run).")
    print(commented_yaml(cfg), end="")
    return 0


def cmd_config_from_trl(args) -> int:
    config = from_trl(args.file, echo=True)  # the notes (what is ignored and why) go to stderr
    print(f"# translated from the TRL file {args.file} (dpo config from-trl); fields not here keep the "
          "defaults of dpo config show --defaults", flush=True)
    print(yaml.safe_dump(_ordered(config), sort_keys=False, allow_unicode=True), end="")
    sys.stdout.flush()
    return 0


def _ordered(config: dict) -> dict:
    """Sections and fields in the order of our config classes (as ``dpo config show`` lists them)."""
    out = {}
    for name, info in RunConfig.model_fields.items():
        if name not in config:
            continue
        value, cls = config[name], info.annotation
        if isinstance(value, dict) and isinstance(cls, type) and hasattr(cls, "model_fields"):
            value = {k: value[k] for k in sorted(value, key=list(cls.model_fields).index)}
        out[name] = value
    return out
