"""What a planned run will run on: the device presets (published, derated rates) and the
cluster a `relayquant plan --cluster FILE.yaml` describes."""
from __future__ import annotations

import dataclasses

from pipeline.planning.cost_model import Device

# published dense rates (fp16/bf16 tensor cores under autocast; fp32 for the Hessians),
# derated: a block's forward reaches about 40 % of peak, forward + backward about 30 %.
# Collectives: between nodes one 400 (H100) or 200 (A100) Gb/s NIC per GPU; within a node
# NVLink, derated from nccl-tests' all-reduce bus bandwidth on 8 SXM GPUs (H100 460-480 GB/s,
# A100 230-250 GB/s)
PRESETS: dict[str, Device] = {
    "h100-80g": Device("h100-80g", 400e12, 300e12, 50e12, 1.5e12, 2e9, 50e9, 80 * 2**30,
                       False, host=False, node_link_bytes=400e9),
    "a100-80g": Device("a100-80g", 125e12, 95e12, 15e12, 1.0e12, 2e9, 25e9, 80 * 2**30, False,
                       host=False, node_link_bytes=200e9),
    "a100-40g": Device("a100-40g", 125e12, 95e12, 15e12, 0.8e12, 2e9, 25e9, 40 * 2**30, False,
                       host=False, node_link_bytes=200e9),
}


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Where a planned run will go: `nodes` x `devices_per_node` workers of one device kind
    (a preset name, or `this machine` measured now)."""

    device: str = "this machine"
    nodes: int = 1
    devices_per_node: int = 1
    network_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        if self.device != "this machine" and self.device not in PRESETS:
            raise ValueError(f"device: {self.device!r}; choose one of this machine, "
                             f"{', '.join(PRESETS)}")
        for name in ("nodes", "devices_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)}; must be an integer >= 1")
            if self.device == "this machine" and getattr(self, name) != 1:
                raise ValueError(f"{name}: {getattr(self, name)} needs a device preset (this "
                                 "machine is one node, its workers cluster.workers); name the "
                                 f"device: {', '.join(PRESETS)}")
        if self.network_bytes_per_s is not None and not self.network_bytes_per_s > 0:
            raise ValueError(f"network_bytes_per_s: {self.network_bytes_per_s}; must be > 0 "
                             "(bytes per second of one link between workers) or absent")

    def preset(self) -> Device:
        """The preset device of this cluster (a preset's name only); a one-node cluster's
        collectives stay on the node's links (NVLink), others cross the NICs."""
        device = PRESETS[self.device]
        if self.nodes == 1 and device.node_link_bytes:
            device = dataclasses.replace(device, network_bytes=device.node_link_bytes)
        return device
