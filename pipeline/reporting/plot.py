"""A bar chart as a PNG, written with zlib alone (the allocation's chart is drawn where the
budget is solved, without importing matplotlib, which only report.html uses): one bar
per decision unit in depth order, its height the unit's bit width, its shade the unit's kind
(its place among the block's fused groups), a grey line at each block boundary."""
from __future__ import annotations

import struct
import zlib

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def bars_png(values: list[int], kinds: list[int], blocks: list[int], top: int = 8,
             height: int = 240, bar: int = 3) -> bytes:
    margin = 10
    width = max(len(values) * bar + 2 * margin, 200)
    scale = (height - 2 * margin) / max(top, 1)
    rows = [[(255, 255, 255)] * width for _ in range(height)]
    for level in range(1, top + 1):  # a faint line per bit
        y = height - margin - int(level * scale)
        for x in range(margin, width - margin):
            rows[y][x] = (235, 235, 235)
    for i, (v, kind) in enumerate(zip(values, kinds, strict=True)):
        x0 = margin + i * bar
        if i and blocks[i] != blocks[i - 1]:
            for y in range(margin, height - margin):
                rows[y][x0] = (190, 190, 190)
        color = PALETTE[kind % len(PALETTE)]
        for y in range(height - margin - int(v * scale), height - margin):
            for x in range(x0 + (1 if bar > 2 else 0), x0 + bar):
                rows[y][x] = color
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
