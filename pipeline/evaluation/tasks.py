"""`relayquant eval --tasks`: lm-evaluation-harness tasks on a model folder (a relayquant
output, with its LoRC adapter merged when it has one, or any transformers model), through
lm-eval's Python API in this process. An optional extra (`pip install -e '.[tasks]'`); the
tasks' data must be on this machine (the Hugging Face datasets cache, or task YAMLs with local
data files under `--include-path`): nothing is downloaded at run time."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from pipeline.config import ConfigError
from pipeline.formats.peft_adapter import adapter_folder, read_adapter

log = logging.getLogger(__name__)
INSTALL = "pip install -e '.[tasks]' (lm-eval 0.4.13)"


def _lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--tasks: needs lm-eval, which is not installed ({e.name} missing); "
                          f"install the optional extra: {INSTALL}") from e
    return lm_eval


def load_model(folder: str, lorc: bool = True) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, adapter folder merged or None): the weights dequantized in float32,
    the LoRC adapter's B·A added to the linears it targets."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if getattr(AutoConfig.from_pretrained(folder), "quantization_config", None):
        from transformers import CompressedTensorsConfig

        # compressed-tensors 0.17.1 keeps packed linears without a `.weight`: unpack them
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    adapter = adapter_folder(folder) if lorc else None
    if adapter is not None:
        weights = read_adapter(adapter)
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear):
                    parent, _, leaf = name.rpartition(".")
                    state = {f"{leaf}.weight": module.weight.data}
                    weights.merge_(parent, state)
                    module.weight.data = state[f"{leaf}.weight"]
    return model, AutoTokenizer.from_pretrained(folder), adapter


def run_tasks(folder: str, tasks: list[str], limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 1,
              include_path: str | None = None, lorc: bool = True) -> dict[str, Any]:
    """The tasks' metrics on the model in `folder` ({task: {metric: value}})."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise ConfigError(f"--include-path: {include_path} is not a folder of task YAMLs")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks: {', '.join(unknown)} not known to lm-eval"
                          + (f" or {include_path}" if include_path else "")
                          + "; `python -m lm_eval ls tasks` lists them")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task data must already be here
    model, tokenizer, adapter = load_model(folder, lorc)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit,
                                      num_fewshot=num_fewshot, task_manager=manager,
                                      log_samples=False)
    except (ConnectionError, OSError) as e:
        raise ConfigError(f"--tasks: a task's data is not on this machine ({e}); put it in the "
                          "Hugging Face datasets cache or give local task YAMLs with "
                          "--include-path") from e
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, int | float)}
               for task, metrics in (out or {}).get("results", {}).items()}
    return {"model": folder, "lorc": adapter, "tasks": results, "limit": limit,
            "num_fewshot": num_fewshot}
