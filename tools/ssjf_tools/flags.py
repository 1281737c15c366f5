"""Command-line flags that come from the server's settings (ssjf.config), so no tool restates a default."""

from __future__ import annotations

import argparse
import dataclasses

GUARD = ("starvation_s", "max_bypass_ratio", "max_passes")  # the starvation guard's EngineConfig fields
PREEMPT = ("preempt_margin", "preempt_max_fraction", "max_preemptions")  # ssrpt's preemption bounds


def config_args(ap: argparse.ArgumentParser, names, sweep: bool = False, **defaults) -> None:
    """Flags for EngineConfig fields (--max-passes for max_passes): type, default and help come from
    the config, so a tool never restates the server's defaults. `defaults` sets a tool's own
    (stated in its help); sweep: a comma list of values, each run in turn."""
    from ssjf.config import EngineConfig, default_of, help_of

    kinds = {"int": int, "float": float, "str": str}
    for name in names:
        kind = next(str(f.type) for f in dataclasses.fields(EngineConfig) if f.name == name)
        default = defaults.get(name, default_of(EngineConfig, name))
        note = "" if name not in defaults else f" (here {default}; the server's default is {default_of(EngineConfig, name)})"
        if sweep:
            ap.add_argument(f"--{name.replace('_', '-')}", default=f"{default:g}" if isinstance(default, float) else str(default),
                            help=f"{help_of(EngineConfig, name)}{note} (comma list: a sweep)")
        elif kind == "bool":
            ap.add_argument(f"--{name.replace('_', '-')}", type=lambda v: v.lower() in ("1", "true", "yes", "on"),
                            default=default, help=help_of(EngineConfig, name) + note)
        else:
            ap.add_argument(f"--{name.replace('_', '-')}", type=kinds[kind], default=default,
                            help=help_of(EngineConfig, name) + note)
