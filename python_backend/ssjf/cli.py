"""The `ssjf` console script: one table of commands, each a module with main(argv)."""

from __future__ import annotations

import importlib
import logging
import sys

COMMANDS = {
    "serve": ("ssjf.cli:serve", "run tritonserver in the foreground (ports from HTTP_PORT/GRPC_PORT/METRICS_PORT)"),
    "prepare": ("ssjf.cli:prepare_main", "prepare the default models once (SmolLM2 GGUF -> HF folder, Triton backends)"),
    "settings": ("ssjf.cli:settings", "every server setting: its environment variable, default and meaning"),
}


def commands() -> dict[str, tuple[str, str]]:
    """The serving commands, then every table an installed package registers under the
    `ssjf.commands` entry point (the client's `generate`, the lab's bench, train, eval...).
    The product never imports those packages; it only reads their names here."""
    from importlib.metadata import entry_points

    table = dict(COMMANDS)
    for point in sorted(entry_points(group="ssjf.commands"), key=lambda p: p.name):
        try:
            table.update(point.load())
        except ImportError as exc:  # a package registered but not importable: say so, keep the rest
            logging.getLogger(__name__).warning("commands of %s unavailable: %s", point.name, exc)
    return table


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table = commands()
    if not argv or argv[0] not in table:
        width = max(map(len, table))
        print("usage: ssjf COMMAND [args]  (ssjf COMMAND --help for its options)\n\ncommands:")
        for name, (_, text) in table.items():
            print(f"  {name:{width}}  {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    module, _, function = table[argv[0]][0].partition(":")
    result = getattr(importlib.import_module(module), function)(argv[1:])
    return result if isinstance(result, int) else 0


def prepare() -> None:
    import importlib.util

    from .assets import minilm_path, smollm2_path

    print(f"llm: {smollm2_path()}\nencoder: {minilm_path()}", flush=True)
    if importlib.util.find_spec("pytriton") is not None:  # absent in the official Triton container
        from .server import backend_dir

        print(f"triton backends: {backend_dir()}", flush=True)


def prepare_main(argv) -> int:
    if argv:
        raise SystemExit("ssjf prepare takes no arguments")
    prepare()
    return 0


def settings(argv) -> int:
    """The settings tables from ssjf.config, the one place they are defined."""
    from .config import EngineConfig, ProxyConfig, RefreshConfig, ServerConfig

    if argv:
        raise SystemExit("ssjf settings takes no arguments")
    for cls, prefix, where in ((EngineConfig, "SSJF_", "llm: a config.pbtxt parameter NAME"),
                               (ProxyConfig, "SSJF_PROXY_", "length_predictor: a config.pbtxt parameter NAME"),
                               (RefreshConfig, "SSJF_PROXY_REFRESH_", "both models: a parameter proxy_refresh_NAME")):
        print(f"# {where}, or {prefix}NAME in the environment")
        print_settings(cls, prefix)
        print()
    print("# server (tritonserver and ssjf serve), from the environment; also SSJF_ADMIN_KEY or SSJF_ADMIN_KEY_FILE\n"
          "# (random: the admin APIs locked) and SSJF_CACHE_DIR (~/.cache/ssjf)")
    print_settings(ServerConfig)
    return 0


def print_settings(cls, prefix: str | None = None) -> None:
    """One line per setting: its variable, default and meaning. Without a prefix, only the fields
    that name a variable of their own."""
    from dataclasses import fields

    from .config import default_of

    for f in fields(cls):
        env = f.metadata.get("env") or (prefix + f.name.upper() if prefix is not None else "")
        if env:
            print(f"{env:30} {str(default_of(cls, f.name)):12} {f.metadata.get('help', '')}")


def serve(argv) -> int:
    from .server import ServerConfig
    from .server import serve as run

    if argv:
        raise SystemExit("ssjf serve takes no arguments; configure it with environment variables (see README)")
    prepare()
    return run(ServerConfig.from_env())


if __name__ == "__main__":
    sys.exit(main())
