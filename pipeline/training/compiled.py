"""A block's training call compiled by torch.compile (`quantization.omniquant.compile`), and
its fallback to eager where compilation fails."""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from pipeline.config import OmniQuantConfig

log = logging.getLogger(__name__)


# torch.compile's backend for `compiled_block_call` (the tests use "aot_eager": the same
# graph capture and autograd split without inductor's C++ code generation)
COMPILE_BACKEND = "inductor"


_COMPILE_FAILED: list[str] = []


def block_call_compiled() -> bool:
    """False once compiling the block's call failed in this process (it runs eagerly)."""
    return not _COMPILE_FAILED


# AOTAutograd compiles a graph's backward lazily, at the first backward call, outside the
# call that falls back to eager: a backward that fails to compile would then fail the block's
# training. Lowered with the forward (where this torch has the option), such a failure is
# raised, and caught, inside the compiled call.
@functools.cache
def _aot_config() -> Any:
    """torch's AOTAutograd config module where it has the option, else None (looked up once,
    when the first call compiles: torch imports it lazily)."""
    try:
        from torch._functorch import config
    except ImportError:
        return None
    return config if hasattr(config, "force_non_lazy_backward_lowering") else None


def _backward_compiled_with_forward() -> contextlib.AbstractContextManager[Any]:
    config = _aot_config()
    if config is None:
        return contextlib.nullcontext()
    return config.patch(force_non_lazy_backward_lowering=True)  # type: ignore[no-any-return]


@functools.cache
def _compiled(backend: str | Callable[..., Any]) -> Callable[..., Any]:
    """`torch.func.functional_call` compiled; where compilation fails (no C++ compiler, an
    unsupported device or operation), forward or backward, the call runs eagerly from then
    on, with one warning."""
    compiled: list[Callable[..., Any]] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not _COMPILE_FAILED:
            try:
                if not compiled:
                    compiled.append(torch.compile(torch.func.functional_call, backend=backend,
                                                  dynamic=False))
                with _backward_compiled_with_forward():
                    return compiled[0](*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 (torch._dynamo and inductor raise many kinds)
                _COMPILE_FAILED.append(repr(e))
                log.warning("quantization.omniquant.compile: compiling the block's training "
                            "call failed (%s); it runs eagerly (slower, the same steps)", e)
        return torch.func.functional_call(*args, **kwargs)

    return call


def compiled_block_call(cfg: OmniQuantConfig, abits: int) -> Callable[..., Any] | None:
    """With `quantization.omniquant.compile` (weight-only widths), a block's functional call
    compiled once per process, the block being one of its inputs: blocks of one class and
    shape reuse the compiled code; a new window count or class compiles again. None: eager."""
    if not cfg.compile or abits < 16:
        return None
    return _compiled(COMPILE_BACKEND)
