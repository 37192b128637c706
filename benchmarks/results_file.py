"""What the benchmarks share: where they write their JSON results, and how a row is named on
the command line."""
from __future__ import annotations

import argparse
import itertools
import json
import os

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def provenance() -> dict[str, str]:
    """Which relayquant code a row ran: the folder `pipeline` was imported from (an editable
    install imports the installed checkout's, not that of the benchmark script, unless
    PYTHONPATH names the script's checkout) and the digest of its sources (the FP cache's)."""
    import pipeline
    from pipeline.user_cache import code_version

    return {"code": os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__))),
            "code_version": code_version()[:16]}


def write_result(path: str, result: dict) -> None:
    """Write `result` to `path` (creating its folder) and print it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=1))


def add_rows_argument(parser: argparse.ArgumentParser,
                      axes: list[tuple[str, list[str]]]) -> list[str]:
    """`--rows ROW [ROW ...]`, each ROW its axes' values joined by ':' (e.g. w3g64:gptq:r8int8);
    `*` for an axis stands for every value of it. The help names each axis' values once (not
    every row: a product of axes is hundreds of choices) and a bad row is refused naming the
    axis and its allowed values. Returns every row, the default, in the axes' order."""
    names = [name for name, _ in axes]
    every = [":".join(parts) for parts in itertools.product(*(values for _, values in axes))]

    def rows(text: str) -> list[str]:
        parts = text.split(":")
        if len(parts) != len(axes):
            raise argparse.ArgumentTypeError(
                f"row {text!r}: a row is {':'.join(names)} ({len(axes)} parts joined by ':')")
        chosen = []
        for (name, values), part in zip(axes, parts):
            if part == "*":
                chosen.append(values)
            elif part in values:
                chosen.append([part])
            else:
                raise argparse.ArgumentTypeError(
                    f"row {text!r}: {name} {part!r} is not one of {', '.join(values)} (or *)")
        return [":".join(p) for p in itertools.product(*chosen)]

    axes_help = "; ".join(f"{name}: {', '.join(values)}" for name, values in axes)
    parser.add_argument("--rows", nargs="+", type=rows, default=[every], metavar="ROW",
                        help=f"rows to run, each {':'.join(names)}, * for every value of an "
                             f"axis (default: every row). {axes_help}")
    return every


def chosen_rows(parsed: list[list[str]]) -> list[str]:
    """The rows `--rows` named, in order, each once."""
    return list(dict.fromkeys(row for group in parsed for row in group))
