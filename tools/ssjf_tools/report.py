"""Reports of the command-line tools: printed as JSON, and saved when asked."""

from __future__ import annotations

import json


def emit(report: dict, out: str | None = None) -> dict:
    print(json.dumps(report, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    return report
