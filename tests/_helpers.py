"""Helpers shared by the tests (imported as `_helpers`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it: bind to port 0), for servers a
    test starts, e.g. torchrun's rendezvous; never a fixed number that another run may hold."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m torch.distributed.run --nproc_per_node nproc ... args` (a script, or
    `-m module ...`) on a free port, one thread per process; asserts it succeeded."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


class ItemsDataset(torch.utils.data.Dataset):
    """A map-style Dataset of (x[i], i) items that is not a TensorDataset (item-by-item paths)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i


def fwd_bwd(fn, x, s, z, g, *args):
    """Forward and backward of fn on fresh leaf copies of x, s, z (the inputs are left alone);
    returns (y, grad_x, grad_scale, grad_zero_point)."""
    x = x.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    z = z.detach().clone().requires_grad_()
    y = fn(x, s, z, *args)
    y.backward(g)
    return y.detach(), x.grad, s.grad, z.grad


def gram64(x: torch.Tensor) -> torch.Tensor:
    """fp64 reference Gram of the column-centred x (flattened per sample)."""
    xd = x.reshape(x.shape[0], -1).double()
    xc = xd - xd.mean(0, keepdim=True)
    return xc @ xc.T


def rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute error relative to the largest entry of the reference."""
    return float((g.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
