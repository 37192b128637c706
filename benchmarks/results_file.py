"""Where benchmarks write their JSON results."""
from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def write_result(path: str, result: dict) -> None:
    """Write `result` to `path` (creating its folder) and print it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=1))
