"""The `relayquant` command. Exit codes: 0 success, 2 bad input, 1 any other failure.

Human-readable progress goes to stderr; with --json, stdout carries one JSON object only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from pipeline.config import ClusterConfig, ConfigError, EvalConfig

log = logging.getLogger("relayquant")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own exit code is 2 as well
        self.exit(2, f"relayquant: error: {message}\n")


# `relayquant eval` flags that only one of its two evaluations reads, with their defaults: a
# flag given to the other one would be ignored silently (--abits 4 with --tasks: weight-only)
PERPLEXITY_FLAGS: dict[str, Any] = {"corpus": "sotu:test", "seq_len": 512, "max_windows": None,
                                    "workers": 1, "abits": 16, "address": None}
TASK_FLAGS: dict[str, Any] = {"limit": None, "num_fewshot": None, "batch_size": 1,
                              "include_path": None}


def refuse_other_flags(args: argparse.Namespace, flags: dict[str, Any], why: str) -> None:
    for name, default in flags.items():
        if getattr(args, name) != default:
            raise ConfigError(f"--{name.replace('_', '-')}: {why}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relayquant", description="Distributed post-training quantization.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    q = sub.add_parser("quantize", help="quantize a model with a YAML recipe")
    add_quantize_arguments(q)
    e = sub.add_parser("eval", help="perplexity of a model folder, streamed through stages")
    e.add_argument("--model", required=True, help="model folder, fsspec URL or asset:NAME")
    e.add_argument("--corpus", default=PERPLEXITY_FLAGS["corpus"])
    e.add_argument("--seq-len", type=int, default=PERPLEXITY_FLAGS["seq_len"])
    e.add_argument("--max-windows", type=int, default=PERPLEXITY_FLAGS["max_windows"])
    e.add_argument("--workers", type=int, default=PERPLEXITY_FLAGS["workers"])
    e.add_argument("--abits", type=int, default=PERPLEXITY_FLAGS["abits"],
                   help="fake-quantize the quantized linears' inputs per token to this many bits "
                        "(a W4A4 run's model: 4); 16 = off")
    e.add_argument("--no-lorc", action="store_true",
                   help="leave out the model's LoRC adapter (MODEL/lorc/), which is otherwise "
                        "merged into the weights when present")
    e.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    e.add_argument("--tasks", default=None, metavar="TASK[,TASK...]",
                   help="lm-eval tasks instead of perplexity (optional extra: pip install -e "
                        "'.[tasks]'; the tasks' data must be on this machine)")
    e.add_argument("--limit", type=int, default=None, help="--tasks: examples per task")
    e.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples")
    e.add_argument("--batch-size", type=int, default=TASK_FLAGS["batch_size"],
                   help="--tasks: batch size")
    e.add_argument("--include-path", default=None,
                   help="--tasks: a folder of task YAMLs (e.g. with local data files)")
    e.add_argument("--json", action="store_true")
    s = sub.add_parser("status", help="what a run has done so far")
    s.add_argument("output")
    s.add_argument("--config", default=None,
                   help="also say whether this recipe would resume the run (same fingerprint)")
    s.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    s.add_argument("--json", action="store_true")
    p = sub.add_parser("plan", help="memory per worker and predicted time, before a run")
    p.add_argument("--config", required=True, help="recipe YAML (or a bundled recipe name)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--cluster", default=None,
                   help="YAML: device (h100-80g, a100-80g, a100-40g), nodes, devices_per_node")
    p.add_argument("--json", action="store_true")
    r = sub.add_parser("recipes", help="the bundled recipes, one line each, with P1 figures")
    r.add_argument("--json", action="store_true")
    a = sub.add_parser("assets", help="prepare or locate the P1 model and corpora")
    a.add_argument("action", choices=["prepare", "path"])
    a.add_argument("name", nargs="?", help="asset name (smollm2-135m, sotu, mail); prepare "
                   "without one: the P1 model and corpus")
    return parser


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML (or a bundled recipe name)")
    parser.add_argument("--output", default=None, help="overrides the recipe's output")
    parser.add_argument("--workers", type=int, default=None, help="overrides cluster.workers")
    parser.add_argument("--address", default=None, help="overrides cluster.address")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override any recipe key (repeatable)")
    parser.add_argument("--restart", action="store_true",
                        help="discard what the output folder holds and start over")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--progress", choices=["auto", "live", "plain", "quiet"], default="auto",
                        help="live: one status line redrawn in place (the default on a "
                             "terminal); plain: a line per event (the default otherwise)")
    parser.add_argument("--quiet", action="store_true",
                        help="warnings, errors and the final summary only (--progress quiet)")
    parser.add_argument("--log-json", default=None, metavar="FILE",
                        help="append every progress event to FILE, one JSON object per line")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[Any]:
    """Keep stdout for the final JSON: anything else printed during the run goes to stderr."""
    real = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        sys.stdout = real


def run_guarded(action: Callable[[], dict[str, Any]], as_json: bool,
                summary: Callable[[dict[str, Any]], str]) -> int:
    try:
        with _stdout_to_stderr() as stdout:
            result = action()
    except ConfigError as e:
        # one raised in a Ray worker carries its own message as the cause, not the traceback
        cause = getattr(e, "cause", None)
        print(f"relayquant: error: {cause if isinstance(cause, ConfigError) else e}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("relayquant: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # report, then fail with 1; the traceback is in the debug log
        log.debug("failure", exc_info=True)
        print(f"relayquant: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result), file=stdout, flush=True)
    else:
        print(summary(result), file=sys.stderr)
    return 0


def quantize_command(args: argparse.Namespace) -> int:
    from jobs.quantize import run_quantize, summarize

    return run_guarded(lambda: run_quantize(args), args.json, summarize)


def tasks_command(args: argparse.Namespace) -> int:
    def action() -> dict[str, Any]:
        from pipeline import storage
        from pipeline.assets import resolve_model_path
        from pipeline.evaluation.tasks import run_tasks

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise ConfigError("--tasks: give at least one lm-eval task name")
        refuse_other_flags(args, PERPLEXITY_FLAGS, "applies to the perplexity evaluation, "
                           "not to --tasks (lm-eval runs in this process, weight-only); drop it")
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit: {args.limit}; must be >= 1")
        if args.num_fewshot is not None and args.num_fewshot < 0:
            raise ConfigError(f"--num-fewshot: {args.num_fewshot}; must be >= 0")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size: {args.batch_size}; must be >= 1")
        model = resolve_model_path(args.model)
        storage.require_exists(model, "model.path")  # before lm-eval's slow start
        storage.read_model_config(model)
        return run_tasks(model, tasks, args.limit, args.num_fewshot,
                         args.batch_size, args.include_path, lorc=not args.no_lorc)

    def summary(r: dict[str, Any]) -> str:
        return "; ".join(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                 if "stderr" not in k)
                         for task, metrics in r["tasks"].items())

    return run_guarded(action, args.json, summary)


def eval_command(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return tasks_command(args)

    def action() -> dict[str, Any]:
        from cluster.coordinator import evaluate

        if not args.model.strip():
            raise ConfigError("model.path: required; give a model folder or an fsspec URL")
        refuse_other_flags(args, TASK_FLAGS, "applies to --tasks only; add --tasks TASK, or "
                           "drop it")
        eval_config = EvalConfig(corpus=args.corpus, seq_len=args.seq_len,
                                 max_windows=args.max_windows)
        if args.abits != 16 and not 4 <= args.abits <= 8:
            raise ConfigError(f"--abits: {args.abits} is not allowed; choose 16 (off) or an "
                              "integer from 4 to 8")
        return evaluate(args.model, eval_config,
                        ClusterConfig(workers=args.workers, address=args.address), args.abits,
                        lorc=not args.no_lorc)

    return run_guarded(action, args.json, lambda r: (
        f"perplexity {r['perplexity']:.4f} on {r['corpus']} ({r['windows']} windows of "
        f"{r['seq_len']} tokens) in {r['seconds']:.1f}s"
        + (f", with the LoRC adapter {r['lorc']}" if r.get("lorc") else "")))


def status_command(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import status

    def action() -> dict[str, Any]:
        from jobs.recipes import load_recipe, parse_overrides
        from pipeline import storage

        if args.set and not args.config:
            raise ConfigError("--set: needs --config (the recipe it changes)")
        config = load_recipe(args.config, parse_overrides(args.set)) if args.config else None
        try:
            storage.filesystem(args.output)
        except (ValueError, ImportError) as e:
            raise ConfigError(f"output: cannot open {args.output!r} ({e}); give a local folder "
                              "or an fsspec URL whose filesystem is installed") from e
        result = status(args.output)
        if config is not None and result["relayquant"]:
            from pipeline.assets import resolve_model_path
            from pipeline.calibration import run_calibration
            from pipeline.output_dir import fingerprint_differences
            from pipeline.plan import open_model

            model_path = resolve_model_path(config.model.path)
            diff = fingerprint_differences(args.output, config, open_model(model_path),
                                           run_calibration(model_path, config))
            result.update(fingerprint_matches=not diff, fingerprint_differences=diff)
        return result

    def summary(r: dict[str, Any]) -> str:
        if not r["relayquant"]:
            return f"{r['output']}: not a relayquant output"
        state = "complete" if r["complete"] else "incomplete"
        text = (f"{r['output']}: {r['done']}/{r['total']} blocks done, {state}; remaining: "
                f"{r['remaining_blocks'] or 'none'}")
        if r.get("estimated_remaining_seconds"):
            text += f"; about {r['estimated_remaining_seconds']:.0f}s of work left"
        if "fingerprint_matches" in r:
            text += ("; the recipe matches (a re-run resumes)" if r["fingerprint_matches"] else
                     f"; the recipe differs: {'; '.join(r['fingerprint_differences'][:3])}")
        return text

    return run_guarded(action, args.json, summary)


def assets_command(args: argparse.Namespace) -> int:
    from jobs import assets

    if args.action == "path":
        try:
            print(assets.asset_path(args.name or ""))
        except ConfigError as e:
            print(f"relayquant: error: {e}", file=sys.stderr)
            return 2
        return 0
    names = [args.name] if args.name is not None else None
    return run_guarded(lambda: assets.prepare_all(names), False,
                       lambda r: "assets ready:\n" + "\n".join(f"  {k}: {v}"
                                                             for k, v in r.items()))


def recipes_command(args: argparse.Namespace) -> int:
    from jobs.catalog import catalog, summarize

    return run_guarded(catalog, args.json, summarize)


def plan_command(args: argparse.Namespace) -> int:
    from jobs.plan import run_plan, summarize

    return run_guarded(lambda: run_plan(args), args.json, summarize)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="relayquant: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    commands = {"quantize": quantize_command, "eval": eval_command, "status": status_command,
                "plan": plan_command, "assets": assets_command, "recipes": recipes_command}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
