"""One data-parallel worker over a whole run, without Ray: it keeps its share of the
calibration windows (both streams) for the whole run and works on every block together with
the other workers through a `Collective`. A Ray actor wraps it (cluster/stage.py).

Streams never leave the worker; only the block's weights (read lazily from storage by every
worker), the gradients and statistics (through the collective) and the block's checkpoint
(written once, by worker 0) are shared.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from pipeline import block_pass, checkpoint
from pipeline.config import ExportFormat, QuantizationConfig
from pipeline.model_parts import DTYPES, ModelParts
from pipeline.parallel.collective import Collective
from pipeline.parallel.shares import WindowShare
from pipeline.plan import open_model
from pipeline.streams import BudgetStore, split_windows


def default_activation_bytes(workers: int) -> int:
    """A quarter of this node's memory, shared among the workers."""
    import psutil

    return int(psutil.virtual_memory().total // 4 // max(workers, 1))


class DataParallelWorker:
    def __init__(self, group: Collective, compute_dtype: str, device: str,
                 activation_memory_bytes: int | None = None, scratch: str | None = None):
        self.group = group
        self.compute_dtype, self.device = compute_dtype, device
        limit = (default_activation_bytes(group.world) if activation_memory_bytes is None
                 else activation_memory_bytes)
        self.store = BudgetStore(limit, scratch)
        self.models: dict[tuple[str, str | None], ModelParts] = {}
        self.share: WindowShare | None = None
        self.fp: list[Any] | None = []
        self.q: list[Any] = []

    def parts(self, path: str, lorc: str | None = None) -> ModelParts:
        key = (path, lorc)
        if key not in self.models:
            self.models[key] = open_model(path, self.compute_dtype, self.device, lorc)
        return self.models[key]

    def start(self, path: str, windows: torch.Tensor, share: WindowShare,
              chunk_size: int, with_fp: bool = True) -> int:
        """Embed this worker's windows (rows of `windows` are its share, in order): both
        streams start equal (`with_fp` false: the run carries no FP stream). Returns how many
        windows it holds."""
        self.share = share
        chunks = split_windows(windows, chunk_size) if windows.shape[0] else []
        self.q = block_pass.embed_stream(self.parts(path), chunks, self.store)
        self.fp = list(self.q) if with_fp else None
        return int(windows.shape[0])

    def quantize_block(self, path: str, index: int, quantization: QuantizationConfig,
                       layouts: list[ExportFormat], output: str) -> dict[str, Any]:
        """Quantize block `index` with every other worker; worker 0 writes its checkpoint.
        Returns the marker (worker 0; None elsewhere) and this worker's timing."""
        start = time.perf_counter()
        waited = self.group.wait_seconds
        result = block_pass.quantize_block(self.parts(path), index, self.fp, self.q,
                                           quantization, layouts, self.store, self.group,
                                           self.share)
        self.fp, self.q = result.fp_out, result.q_out
        timing = self._timing(start, waited)
        marker = None
        if self.group.rank == 0:
            metrics = {**result.metrics, "worker": 0, "schedule": "data_parallel",
                       "workers": timing}
            marker = checkpoint.write_block(output, index, result.folder_exports(),
                                            result.schemes, metrics)
        return {"marker": marker, "timing": timing[self.group.rank]}

    def _timing(self, start: float, waited: float) -> list[dict[str, float]]:
        """Every worker's seconds on this block and its part spent in collectives, gathered
        through one more sum (each worker fills its own row)."""
        rows = torch.zeros(self.group.world, 5, dtype=torch.float64)
        collective = self.group.wait_seconds - waited
        spill = self.store.stats
        rows[self.group.rank] = torch.tensor([time.perf_counter() - start, collective,
                                              spill.peak_held, spill.spilled, spill.read],
                                             dtype=torch.float64)
        self.group.sum_([rows])
        return [{"worker": w, "seconds": r[0], "collective_seconds": r[1],
                 "compute_seconds": r[0] - r[1], "stream_memory_peak_bytes": int(r[2]),
                 "spilled_bytes": int(r[3]), "spill_read_bytes": int(r[4])}
                for w, r in enumerate(rows.tolist())]

    def carry_block(self, path: str, index: int, output: str, files: dict[str, Any],
                    saved_config: dict[str, Any], abits: int) -> None:
        """A block finished in an earlier run: the FP stream through the original block, the
        quantized stream through the saved shard."""
        if self.fp is not None:
            self.fp = block_pass.forward_block(self.parts(path), index, self.fp, self.store)
        self.q = block_pass.forward_saved_block(output, index, files, saved_config, self.q,
                                                self.store, DTYPES[self.compute_dtype],
                                                self.device, abits)

    def release_streams(self) -> None:
        self.fp, self.q = [], []

    def perplexity(self, path: str, windows: torch.Tensor, chunk_size: int,
                   abits: int = 16, lorc: str | None = None) -> tuple[float, int]:
        """Summed NLL and token count of this worker's evaluation windows through every
        block (the coordinator adds the workers' sums in worker order); `lorc`: a LoRA
        adapter folder merged into the weights."""
        if not windows.shape[0]:
            return 0.0, 0
        parts = self.parts(path, lorc)
        ids_chunks = split_windows(windows, chunk_size)
        stream = block_pass.embed_stream(parts, ids_chunks, self.store)
        for i in range(parts.num_blocks):
            stream = block_pass.forward_block(parts, i, stream, self.store, abits)
        return block_pass.score_stream(parts, stream, ids_chunks, self.store)
