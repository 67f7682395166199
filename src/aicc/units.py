"""Sizes as people read them."""

from __future__ import annotations


def human_size(num_bytes: int) -> str:
    """`512 B`, `1.5 KiB`, `241.4 MiB`, `4.4 GiB` (GiB is the largest unit used)."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
