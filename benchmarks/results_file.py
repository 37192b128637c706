"""Where benchmarks write their JSON results."""
from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def provenance() -> dict[str, str]:
    """Which relayquant code a row ran: the folder `pipeline` was imported from (an editable
    install imports the installed checkout's, not that of the benchmark script, unless
    PYTHONPATH names the script's checkout) and the digest of its sources (the FP cache's)."""
    import pipeline
    from pipeline.evaluation.perplexity_cache import code_version

    return {"code": os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__))),
            "code_version": code_version()[:16]}


def write_result(path: str, result: dict) -> None:
    """Write `result` to `path` (creating its folder) and print it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=1))
