"""Which accelerator a pytest-xdist worker uses: worker i -> the i-th visible device."""

from __future__ import annotations

import os
import re


def visible_devices(env: dict | None = None, device_count: int | None = None) -> list[str]:
    """Device ids as the child would name them in CUDA_VISIBLE_DEVICES."""
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    if device_count is None:
        try:
            import torch

            device_count = torch.cuda.device_count()
        except Exception:
            device_count = 0
    return [str(i) for i in range(device_count)]


def worker_index(worker_id: str | None) -> int | None:
    """gw3 -> 3; the controller or a run without xdist -> None."""
    match = re.fullmatch(r"gw(\d+)", worker_id or "")
    return int(match.group(1)) if match else None


def device_for_worker(worker_id: str | None, visible: list[str]) -> str | None:
    """The CUDA_VISIBLE_DEVICES value for this worker's children (None: leave it as it is).

    Workers beyond the number of devices wrap around, so `-n 8` on 4 GPUs puts two workers per GPU.
    """
    if not visible:
        return None
    index = worker_index(worker_id)
    if index is None:
        return ",".join(visible)
    return visible[index % len(visible)]
