"""The learnable parameters of one block under learned reconstruction (LWC's clipping factors
and learned rounding, LET's equivalent transform, SDE's singular-value expansion) and the map
from them to the block's fake-quantized tensors; after training, `fold_` turns them into plain
weights and integer codes."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.config import ClipParam, GPTQConfig, OmniQuantConfig, Rounding
from pipeline.export import QuantizedLinear
from pipeline.formats import AffineFormat, QuantParams
from pipeline.methods.gptq import SharedFactors, gptq_quantize
from pipeline.methods.hooks import quantized_names
from pipeline.methods.let import ActStats, EquivalentTransform
from pipeline.methods.lwc import ClippingFactors
from pipeline.methods.sde import SingularExpansion
from pipeline.model_parts import ModelParts


class BlockQuantizer(nn.Module):
    """The learnable parameters of one block and the map to its fake-quantized tensors."""

    def __init__(self, parts: ModelParts, block: nn.Module,
                 formats: dict[str, AffineFormat | None], stats: dict[str, ActStats],
                 cfg: OmniQuantConfig, abits: int):
        super().__init__()
        self.names = quantized_names(formats)
        self.base = {n: p.detach() for n, p in block.named_parameters()}
        init = cfg.lwc_init if cfg.lwc else math.inf
        learned = cfg.rounding is Rounding.LEARNED
        direct = cfg.clip_param is ClipParam.DIRECT
        self.clips = nn.ModuleDict({
            n.replace(".", "__"): ClippingFactors(self.base[f"{n}.weight"].shape, f, init,
                                                  self.base[f"{n}.weight"].device, learned,
                                                  direct, cfg.compile_quantizer)
            for n, f in formats.items() if f is not None})
        for clip in self.clips.values():
            clip.up.requires_grad_(cfg.lwc)
            clip.low.requires_grad_(cfg.lwc)
        self.let = (EquivalentTransform(block, parts.adapter, parts.hf_config, stats, cfg.alpha,
                                        shift=abits < 16) if cfg.let else None)
        sde = cfg.sde
        self.sde = (nn.ModuleDict({
            n.replace(".", "__"): SingularExpansion(self.base[f"{n}.weight"], sde.band,
                                                    sde.block, sde.relative)
            for n in self.names}) if sde is not None else None)
        self.sde_penalty = sde.penalty if sde is not None else 0.0

    def clip(self, name: str) -> ClippingFactors:
        return self.clips[name.replace(".", "__")]  # type: ignore[return-value]

    def groups(self, cfg: OmniQuantConfig) -> list[dict[str, Any]]:
        out = []
        if self.let is not None:
            out.append({"params": self.let.scale_parameters(), "lr": cfg.let_lr})
        if cfg.lwc:
            out.append({"params": [p for c in self.clips.values() for p in (c.up, c.low)],
                        "lr": cfg.lwc_lr})
        offsets = [c.offset for c in self.clips.values() if c.offset is not None]
        if offsets:
            out.append({"params": offsets, "lr": cfg.round_lr})
        if self.sde is not None and cfg.sde is not None:
            out.append({"params": [p for e in self.sde.values()
                                   for p in e.learnable()],  # type: ignore[operator]
                        "lr": cfg.sde.lr})
        return out

    def penalty(self, only: set[str] | None = None) -> torch.Tensor | None:
        """SDE's penalty: its weight times the sum over the linears (those named `only`) of
        ||ΔW||^2 / ||W||^2 (None without one)."""
        if self.sde is None or not self.sde_penalty:
            return None
        terms = [self.sde[n.replace(".", "__")].relative_change()  # type: ignore[operator]
                 for n in self.names if only is None or n in only]
        return self.sde_penalty * sum(terms) if terms else None

    def exclusive(self) -> dict[str, list[nn.Parameter]]:
        """{tensor key: the learnable parameters that only that tensor depends on}: each
        linear's clipping factors, rounding offsets and SDE factors (LET's scales are shared
        by several tensors)."""
        out: dict[str, list[nn.Parameter]] = {}
        for n in self.names:
            params = [p for p in self.clip(n).parameters() if p.requires_grad]
            if self.sde is not None:
                params += list(self.sde[n.replace(".", "__")].learnable())  # type: ignore
            out[f"{n}.weight"] = params
        return out

    @torch.no_grad()
    def start_rounding_at_gptq_(self, hessians: dict[str, torch.Tensor], gptq: GPTQConfig,
                                dtypes: dict[str, torch.dtype]) -> int:
        """Learned offsets that reproduce GPTQ's codes on the initial (untrained) grid; returns
        how many codes lie beyond the offsets' [-0.5, 0.5] reach."""
        t = self.transformed()
        unreached = 0
        factors = SharedFactors(gptq)
        for n in self.names:
            clip = self.clip(n)
            weight = t[f"{n}.weight"].float()
            scale, zero = clip.qparams(weight)
            qparams = QuantParams(scale.to(dtypes[f"{n}.weight"]).float(), zero.float())
            result = gptq_quantize(weight, None, clip.fmt, damp=gptq.damp,
                                   block_size=gptq.block_size, act_order=gptq.act_order,
                                   scale_dtype=dtypes[f"{n}.weight"], qparams=qparams,
                                   factor=factors.of(hessians[n]))
            unreached += clip.start_rounding_at_(weight, result.codes)
        return unreached

    def after_step(self) -> None:
        for name in self.names:
            self.clip(name).clamp_()

    def transformed(self, only: set[str] | None = None) -> dict[str, torch.Tensor]:
        """The block's tensors after SDE's expansion and LET (not quantized); with `only`, the
        other linears' weights are left without SDE (for a worker that reads them)."""
        t = dict(self.base)
        if self.sde is not None:
            for n in self.names:
                if only is not None and n not in only:
                    continue
                key = f"{n}.weight"
                t[key] = self.sde[n.replace(".", "__")].expand(t[key])  # type: ignore[operator]
        return self.let.transform(t) if self.let is not None else t

    def tensors(self, only: set[str] | None = None) -> dict[str, torch.Tensor]:
        """The block's tensors after LET and differentiable fake-quant (with `only`, of those
        linears only: a worker of a split quantizer reads the others' from their owners)."""
        t = self.transformed(only)
        for n in self.names:
            if only is None or n in only:
                t[f"{n}.weight"] = self.clip(n).fake_quantize(t[f"{n}.weight"])
        return t

    @torch.no_grad()
    def fold_(self, block: nn.Module, dtypes: dict[str, torch.dtype],
              hessians: Callable[[], dict[str, torch.Tensor]] | None = None,
              gptq: GPTQConfig | None = None) -> dict[str, QuantizedLinear]:
        """Write the transformed, quantized tensors into `block`; return the linears' codes.
        With `hessians`, the rounding onto the learned grid is GPTQ's."""
        t = self.transformed()
        for name, value in t.items():
            block.get_parameter(name).copy_(value)
        h = hessians() if hessians is not None else None
        factors = SharedFactors(gptq) if gptq is not None else None
        out = {}
        for n in self.names:
            weight = block.get_parameter(f"{n}.weight")
            clip = self.clip(n)
            fake, codes, qparams = clip.export(weight, dtypes[f"{n}.weight"])
            if h is not None and gptq is not None and factors is not None:
                result = gptq_quantize(weight, None, clip.fmt, damp=gptq.damp,
                                       block_size=gptq.block_size, act_order=gptq.act_order,
                                       scale_dtype=dtypes[f"{n}.weight"], qparams=qparams,
                                       factor=factors.of(h[n]))
                fake, codes = result.weight, result.codes
            weight.copy_(fake)
            out[n] = QuantizedLinear(codes.cpu(), QuantParams(qparams.scale.cpu(),
                                                             qparams.zero_point.cpu()), clip.fmt)
        return out


def sde_metrics(model: BlockQuantizer) -> dict[str, Any]:
    """How far SDE moved the block's weights: the largest ||ΔW||_F / ||W||_F over its
    linears."""
    if model.sde is None:
        return {}
    with torch.no_grad():
        change = max(float(e.relative_change().sqrt())  # type: ignore[operator]
                     for e in model.sde.values())
    return {"sde_relative_change": change}
