"""The stage actor: owns a contiguous range of blocks; each method calls one pipeline function."""
from __future__ import annotations

import logging
import os
from typing import Any

import ray
import torch

from pipeline import block_pass, budget, checkpoint, sensitivity
from pipeline.config import ExportFormat, Objective, QuantizationConfig
from pipeline.export import FOLDERS
from pipeline.model_parts import DTYPES, ModelParts
from pipeline.plan import open_model


class RayStore:
    """Chunks in the Ray object store (it spills to disk when full)."""

    def put(self, chunk: torch.Tensor) -> ray.ObjectRef:
        return ray.put(chunk)

    def get(self, handle: ray.ObjectRef) -> torch.Tensor:
        return ray.get(handle)


@ray.remote
class StageActor:
    def __init__(self, stage: int, blocks: tuple[int, int], compute_dtype: str, threads: int,
                 device: str):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        self.stage, self.blocks = stage, blocks
        self.compute_dtype, self.device = compute_dtype, device
        self.store = RayStore()
        self.models: dict[str, ModelParts] = {}

    def _parts(self, path: str) -> ModelParts:
        if path not in self.models:
            self.models[path] = open_model(path, self.compute_dtype, self.device)
        return self.models[path]

    def embed(self, path: str, ids_chunks: list[torch.Tensor]) -> list[Any]:
        return block_pass.embed_stream(self._parts(path), ids_chunks, self.store)

    def forward_block(self, path: str, index: int, stream: list[Any], abits: int = 16
                      ) -> list[Any]:
        return block_pass.forward_block(self._parts(path), index, stream, self.store, abits)

    def forward_saved_block(self, output: str, index: int, file: str, config: dict[str, Any],
                            stream: list[Any], abits: int = 16) -> list[Any]:
        return block_pass.forward_saved_block(output, index, file, config, stream, self.store,
                                              DTYPES[self.compute_dtype], self.device, abits)

    def save_streams(self, output: str, boundary: int, fp: list[Any], q: list[Any]) -> None:
        block_pass.save_boundary(output, boundary, fp, q, self.store)

    def load_streams(self, boundary: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        return block_pass.load_boundary(boundary, self.store)

    def score(self, path: str, stream: list[Any], ids_chunks: list[torch.Tensor]
              ) -> tuple[float, int]:
        return block_pass.score_stream(self._parts(path), stream, ids_chunks, self.store)

    def quantize_block(self, path: str, index: int, fp_in: list[Any], q_in: list[Any],
                       quantization: QuantizationConfig, layouts: list[ExportFormat],
                       output: str) -> tuple[list[Any], list[Any], dict[str, Any]]:
        result = block_pass.quantize_block(self._parts(path), index, fp_in, q_in, quantization,
                                           layouts, self.store)
        exports = {FOLDERS[layout]: tensors for layout, tensors in result.exports.items()}
        marker = checkpoint.write_block(output, index, exports, result.schemes,
                                        {**result.metrics, "worker": self.stage})
        return result.fp_out, result.q_out, marker

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
        return block_pass.peak_rss_bytes()
