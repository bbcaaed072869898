"""What several tests need: the smoke config, seeded stand-in checkpoints, random images,
an injected worker fault, and running a function on two gloo workers. Tests import these
(and `tests.helpers.layout_data`, generated datasets in the real layouts) from here only."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from stpp_ray.weights import build_from_architecture, save_weights

SMOKE = str(Path(__file__).resolve().parents[2] / "jobs" / "smoke.yaml")


def smoke_config(root, out, *overrides):
    """The smoke config on the dataset at `root`, writing to `out`, with dotted overrides."""
    from stpp_ray.config import load_config

    return load_config(SMOKE, [f"data.root={root}", f"run.output_dir={out}", *overrides])


@contextmanager
def injected_fault(stage: str, epoch: int):
    """Inside the block, one Train worker of `stage` exits once at `epoch` (`cluster.train.FAULT_ENV`)."""
    from stpp_ray.cluster.train import FAULT_ENV

    os.environ[FAULT_ENV] = f"{stage}:{epoch}"
    try:
        yield
    finally:
        del os.environ[FAULT_ENV]


def write_checkpoints(directory: Path, epochs: Sequence[int], arch: dict,
                      perturb: Callable[[torch.nn.Module], None] | None = None) -> list[str]:
    """One weight file per epoch (`epoch_XXX.pt`), each model initialised with the epoch as seed
    and then changed by `perturb` (under no_grad), e.g. to make predictions vary."""
    paths = []
    for epoch in epochs:
        torch.manual_seed(epoch)
        model = build_from_architecture(arch)
        if perturb is not None:
            with torch.no_grad():
                perturb(model)
        path = Path(directory) / f"epoch_{epoch:03d}.pt"
        save_weights(path, model, arch, epoch=epoch)
        paths.append(str(path))
    return paths


def write_random_images(directory: Path, names: Sequence[str], sizes: Sequence[tuple[int, int]] | tuple[int, int],
                        seed: int) -> list[tuple[str, str]]:
    """Random RGB images (height, width per name, or one size for all); returns (id, path) pairs."""
    rng = np.random.default_rng(seed)
    if isinstance(sizes[0], int):
        sizes = [sizes] * len(names)
    rows = []
    for name, (h, w) in zip(names, sizes, strict=True):
        path = Path(directory) / name
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        rows.append((path.stem, str(path)))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(world, rank, *args)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def run_on_gloo_workers(fn: Callable, world: int, out: Path, *args):
    """`fn(world, rank, *args)` in `world` processes joined by a gloo process group; returns
    rank 0's result (saved through `out`). `fn` must be a module-level function."""
    mp.spawn(_gloo_worker, args=(world, _free_port(), fn, args, str(out)), nprocs=world)
    return torch.load(out, weights_only=True)


def assert_states_close(actual: dict, expected: dict) -> None:
    """Floating-point tensors equal to 1e-4 relative / 1e-5 absolute, the others exactly."""
    for key, value in expected.items():
        if value.dtype.is_floating_point:
            np.testing.assert_allclose(actual[key].numpy(), value.numpy(), rtol=1e-4, atol=1e-5, err_msg=key)
        else:
            assert torch.equal(actual[key], value), key
