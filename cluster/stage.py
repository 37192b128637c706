"""The stage actor: owns a contiguous range of blocks; each method calls one pipeline function."""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import ray
import torch

from pipeline import (
    block_pass,
    checkpoint,
    data_free,
    events,
)
from pipeline.config import ExportFormat, Objective, QuantizationConfig
from pipeline.cvxq import budget, sensitivity
from pipeline.evaluation import depth_errors
from pipeline.model_parts import DTYPES, ModelParts
from pipeline.parallel.collective import Collective, Solo, TorchCollective
from pipeline.parallel.shares import WindowShare
from pipeline.parallel.worker import DataParallelWorker
from pipeline.plan import open_model
from pipeline.reporting import process_memory


class RayStore:
    """Chunks in the Ray object store (it spills to disk when full)."""

    def put(self, chunk: torch.Tensor) -> ray.ObjectRef:
        return ray.put(chunk)

    def get(self, handle: ray.ObjectRef) -> torch.Tensor:
        return ray.get(handle)


@ray.remote
class StageActor:
    def __init__(self, stage: int, blocks: tuple[int, int], compute_dtype: str, threads: int,
                 device: str, board: Any = None):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        if board is not None:  # the driver's progress view: events go there, not to our log
            events.subscribe(lambda e: board.post.remote({**e, "worker": stage}))
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        self.threads = torch.get_num_threads()  # outside pipelined passes
        self.stage, self.blocks = stage, blocks
        self.compute_dtype, self.device = compute_dtype, device
        self.store = RayStore()
        self.models: dict[tuple[str, str | None], ModelParts] = {}
        self.worker: DataParallelWorker | None = None
        self.resident: dict[tuple[str, str | None], block_pass.ResidentBlocks] = {}
        self.busy_seconds = 0.0  # computing chunks of the current pipelined pass

    def _parts(self, path: str, lorc: str | None = None) -> ModelParts:
        """The model at `path` (with the LoRA adapter folder `lorc` merged, when given)."""
        key = (path, lorc)
        if key not in self.models:
            self.models[key] = open_model(path, self.compute_dtype, self.device, lorc)
        return self.models[key]

    def embed(self, path: str, ids_chunks: list[torch.Tensor]) -> list[Any]:
        return block_pass.embed_stream(self._parts(path), ids_chunks, self.store)

    def forward_block(self, path: str, index: int, stream: list[Any], abits: int = 16
                      ) -> list[Any]:
        return block_pass.forward_block(self._parts(path), index, stream, self.store, abits)

    def forward_saved_block(self, output: str, index: int, files: dict[str, Any],
                            config: dict[str, Any], stream: list[Any], abits: int = 16
                            ) -> list[Any]:
        return block_pass.forward_saved_block(output, index, files, config, stream, self.store,
                                              DTYPES[self.compute_dtype], self.device, abits)

    # --- pipelined forward-only passes: one chunk at a time, the stage's blocks kept loaded ----

    def _resident(self, path: str, lorc: str | None = None) -> block_pass.ResidentBlocks:
        key = (path, lorc)
        if key not in self.resident:
            self.resident[key] = block_pass.ResidentBlocks(self._parts(path, lorc))
        return self.resident[key]

    def embed_chunk(self, path: str, ids: torch.Tensor, lorc: str | None = None
                    ) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self._resident(path, lorc).embed(ids)
        finally:
            self.busy_seconds += time.perf_counter() - start

    def forward_chunk(self, path: str, start: int, end: int, h: torch.Tensor,
                      abits: int = 16, lorc: str | None = None) -> torch.Tensor:
        began = time.perf_counter()
        try:
            return self._resident(path, lorc).forward(start, end, h, abits)
        finally:
            self.busy_seconds += time.perf_counter() - began

    def score_chunk(self, path: str, h: torch.Tensor, ids: torch.Tensor,
                    lorc: str | None = None) -> tuple[float, int]:
        start = time.perf_counter()
        try:
            return self._resident(path, lorc).score(h, ids)
        finally:
            self.busy_seconds += time.perf_counter() - start

    def depth_errors(self, model_path: str, output: str, ids: torch.Tensor, abits: int = 16,
                     lorc: str | None = None) -> list[float]:
        """Each block's error at the model's output depth (pipeline/evaluation/depth_errors.py)."""
        def progress(done: int, total: int) -> None:
            events.emit("depth_errors", f"output-depth errors: block {done}/{total}",
                        done=done, total=total)

        return depth_errors.output_depth_errors(self._parts(model_path),
                                                self._parts(output, lorc), ids, abits, progress)

    def begin_pipelined(self, threads: int | None) -> None:
        """Starts a pipelined pass, in which every stage computes at once: `threads` torch
        threads for it (the stage's share of its node's cores), None: as configured."""
        if threads is not None:
            torch.set_num_threads(threads)

    def release_blocks(self) -> dict[str, Any]:
        """Ends a pipelined pass: drops the loaded blocks and goes back to the configured
        threads; returns the seconds this stage spent computing chunks during it and the
        threads it computed them on."""
        self.resident.clear()
        busy, self.busy_seconds = self.busy_seconds, 0.0
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        return {"busy_seconds": busy, "threads": threads}

    def save_streams(self, output: str, boundary: int, fp: list[Any] | None,
                     q: list[Any]) -> None:
        checkpoint.save_boundary(output, boundary, fp, q, self.store)

    def load_streams(self, boundary: dict[str, Any]) -> tuple[list[Any] | None, list[Any]]:
        return checkpoint.load_boundary(boundary, self.store)

    def score(self, path: str, stream: list[Any], ids_chunks: list[torch.Tensor]
              ) -> tuple[float, int]:
        return block_pass.score_stream(self._parts(path), stream, ids_chunks, self.store)

    def quantize_block(self, path: str, index: int, fp_in: list[Any] | None, q_in: list[Any],
                       quantization: QuantizationConfig, layouts: list[ExportFormat],
                       output: str) -> tuple[list[Any] | None, list[Any], dict[str, Any]]:
        result = block_pass.quantize_block(self._parts(path), index, fp_in, q_in, quantization,
                                           layouts, self.store)
        marker = checkpoint.write_block(output, index, result.folder_exports(), result.schemes,
                                        {**result.metrics, "worker": self.stage})
        return result.fp_out, result.q_out, marker

    def quantize_weights(self, path: str, index: int, quantization: QuantizationConfig,
                         layouts: list[ExportFormat], output: str) -> dict[str, Any]:
        result = data_free.quantize_block_weights(self._parts(path), index, quantization,
                                                   layouts)
        return checkpoint.write_block(output, index, result.folder_exports(), result.schemes,
                                      {**result.metrics, "worker": self.stage})

    def pca(self, path: str, stream: list[Any], dims: int) -> torch.Tensor:
        parts = self._parts(path)
        cov = sensitivity.hidden_covariance(parts, stream, self.store)
        return sensitivity.pca_directions(cov, dims)

    def objective_grads(self, path: str, stream: list[Any], ids_chunks: list[torch.Tensor],
                        objective: Objective, directions: torch.Tensor | None,
                        seed: int) -> list[Any]:
        return sensitivity.objective_grads(self._parts(path), stream, ids_chunks, self.store,
                                           objective, directions, seed)

    def backward(self, path: str, blocks: tuple[int, int], x_stream: list[Any],
                 g_stream: list[Any], need_input_grad: bool
                 ) -> tuple[list[Any], dict[str, dict[str, float]]]:
        return sensitivity.stage_backward(self._parts(path), blocks, x_stream, g_stream,
                                          self.store, need_input_grad)

    def weight_errors(self, path: str, blocks: tuple[int, int],
                      quantization: QuantizationConfig) -> dict[str, dict[str, float]]:
        return budget.weight_errors(self._parts(path), blocks, quantization)

    def peak_rss_bytes(self) -> int:
        return process_memory.peak_rss_bytes()

    def place(self) -> dict[str, Any]:
        """Where this stage runs (for the report: which node holds which blocks)."""
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "hostname": socket.gethostname(), "pid": os.getpid(),
                "threads": torch.get_num_threads()}

    # --- the data-parallel schedule: this actor is one worker of all blocks ----------------------

    def rendezvous_address(self) -> str:
        """A free TCP port on this actor's node, for the workers' process group."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, address: str | None, rank: int, world: int,
             activation_memory_bytes: int | None = None, shared_memory: bool = True) -> None:
        group: Collective = Solo() if world == 1 else TorchCollective(
            str(address), rank, world, "nccl" if self.device.startswith("cuda") else "gloo",
            shared_memory=shared_memory)
        self.worker = DataParallelWorker(group, self.compute_dtype, self.device,
                                         activation_memory_bytes)
        self.worker.models = self.models

    def _dp(self) -> DataParallelWorker:
        assert self.worker is not None, "join() first"
        return self.worker

    def dp_start(self, path: str, windows: torch.Tensor, share: WindowShare,
                 chunk_size: int, with_fp: bool = True) -> int:
        return self._dp().start(path, windows, share, chunk_size, with_fp)

    def dp_quantize_block(self, path: str, index: int, quantization: QuantizationConfig,
                          layouts: list[ExportFormat], output: str) -> dict[str, Any]:
        return self._dp().quantize_block(path, index, quantization, layouts, output)

    def dp_carry_block(self, path: str, index: int, output: str, files: dict[str, Any],
                       config: dict[str, Any], abits: int) -> None:
        self._dp().carry_block(path, index, output, files, config, abits)

    def dp_release_streams(self) -> None:
        self._dp().release_streams()

    def dp_perplexity(self, path: str, windows: torch.Tensor, chunk_size: int,
                      abits: int = 16, lorc: str | None = None) -> tuple[float, int]:
        return self._dp().perplexity(path, windows, chunk_size, abits, lorc)
