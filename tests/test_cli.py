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


def test_soak_measures_the_memory_of_a_process_tree():
    import os
    import subprocess
    import sys

    from ssjf_tools.soak import tree_rss_mb

    alone = tree_rss_mb(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(30)"])
    try:
        import time

        deadline = time.monotonic() + 20
        while tree_rss_mb(os.getpid()) < alone + 150 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tree_rss_mb(os.getpid()) >= alone + 150  # the child's 200 MB counts
    finally:
        child.kill()
        child.wait()
