"""Golden compressed-tensors bytes: the cases, and the generator that records what the real
compressed-tensors release writes for them.

    python tests/ct_golden.py OUT.json

runs in an environment with the compressed-tensors release to follow (and torch) but without
relayquant, e.g. `python3 -m venv /tmp/ct20 && /tmp/ct20/bin/pip install torch==2.13.0
compressed-tensors==0.20.1`. It packs each case through the release's own
`PackedQuantizationCompressor.compress` and records dtype, shape and sha256 of every tensor it
writes; tests/fixtures/ct_golden.json is its output, and tests/test_ct_golden.py compares
relayquant's writer against it (and re-runs this script when RELAYQUANT_CT_PYTHON names such an
interpreter). Only torch is imported at module level, so the test imports the cases from here.
"""
from __future__ import annotations

import hashlib
import json
import sys

import torch

# (out_features, in_features, group_size): per channel with in_features not a multiple of 32
# (a partial last word), and grouped; out_features not multiples of 32 so the zero points'
# packing along the output ends in a partial word too.
SHAPES = [(40, 80, None), (24, 96, 32), (12, 64, 16)]
BITS = range(2, 9)


def cases() -> list[dict]:
    return [{"bits": b, "symmetric": sym, "out": o, "in": i, "group_size": g}
            for b in BITS for sym in (True, False) for (o, i, g) in SHAPES]


# one mixed-precision model's config groups, in relayquant's order (bits, group size, symmetric):
# (targets, bits, group_size, symmetric); IGNORE are the linears kept in full precision
CONFIG_GROUPS = [(["m.layers.1.o"], 3, 32, True), (["m.layers.0.k", "m.layers.0.q"], 4, None, False),
                 (["m.layers.0.down"], 8, 64, True)]
IGNORE = ["lm_head", "m.layers.1.up"]


def _lcg(seed: int, n: int, modulus: int) -> list[int]:
    """Deterministic integers in [0, modulus), the same under any torch version."""
    x, out = seed, []
    for _ in range(n):
        x = (1103515245 * x + 12345) % 2**31
        out.append((x >> 8) % modulus)
    return out


def case_arrays(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed codes int8 [out, in], signed zero points int8 [out, groups], scales float32
    [out, groups]) on compressed-tensors' grid [-2^(b-1), 2^(b-1) - 1]; zero points are 0 when
    symmetric. Scales are powers of two so (code - zero) * scale is exact in float32."""
    bits, out, inp = case["bits"], case["out"], case["in"]
    groups = 1 if case["group_size"] is None else inp // case["group_size"]
    half = 2 ** (bits - 1)
    seed = 1000 * bits + out + 7 * inp + (0 if case["symmetric"] else 1)
    codes = torch.tensor(_lcg(seed, out * inp, 2**bits), dtype=torch.int64) - half
    zero = torch.tensor(_lcg(seed + 1, out * groups, 2**bits), dtype=torch.int64) - half
    if case["symmetric"]:
        zero = torch.zeros_like(zero)
    exponents = torch.tensor(_lcg(seed + 2, out * groups, 6), dtype=torch.float32)
    scale = torch.pow(2.0, -(exponents + 3)).reshape(out, groups)
    return (codes.reshape(out, inp).to(torch.int8), zero.reshape(out, groups).to(torch.int8),
            scale)


def digest(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                   "sha256": hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()}
            for name, t in sorted(tensors.items())}


def _release_compress(case: dict) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    codes, zero, scale = case_arrays(case)
    groups = scale.shape[1]
    weights = QuantizationArgs(
        num_bits=case["bits"], type="int", symmetric=case["symmetric"],
        strategy="channel" if case["group_size"] is None else "group",
        group_size=case["group_size"])
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    x = (codes.float() - zero.float().repeat_interleave(case["in"] // groups, dim=1))
    weight = x * scale.repeat_interleave(case["in"] // groups, dim=1)
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero}
    return dict(PackedQuantizationCompressor.compress(state, scheme))


def _release_config() -> dict:
    """config.json's quantization_config as the release's `ModelCompressor.update_config`
    writes it for CONFIG_GROUPS."""
    import compressed_tensors
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    groups = {f"group_{i}": QuantizationScheme(
        targets=targets, format="pack-quantized", weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=symmetric, dynamic=False, observer="minmax",
            strategy="channel" if group is None else "group", group_size=group))
        for i, (targets, bits, group, symmetric) in enumerate(CONFIG_GROUPS)}
    config = QuantizationConfig(config_groups=groups, format="pack-quantized", ignore=IGNORE,
                                quantization_status=QuantizationStatus.COMPRESSED)
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {},
            **config.model_dump(mode="json", exclude={"quant_method"})}


def main(path: str) -> None:
    import compressed_tensors

    records = [{**case, "tensors": digest(_release_compress(case))} for case in cases()]
    with open(path, "w") as f:
        json.dump({"compressed_tensors": compressed_tensors.__version__,
                   "torch": torch.__version__.split("+")[0], "cases": records,
                   "quantization_config": _release_config()}, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
