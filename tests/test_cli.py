import importlib

from ssjf.cli import COMMANDS, main


def test_every_command_resolves_to_a_function():
    for name, (target, _) in COMMANDS.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_usage_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "eval-proxy" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2
