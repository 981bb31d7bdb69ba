"""Shared fixtures for the core tests: a seeded generator and the SQNR measure. Kept deliberately small."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

# The unit tests run thousands of tiny tensor ops. When the CPU is shared (CI runners, parallel jobs),
# handing each op to a second OpenMP thread costs milliseconds of scheduler latency per op: measured on a
# busy 2-core box, the format tests took 25 s with two threads and 2 s with one. One intra-op thread keeps
# the suite fast and its timings stable; an explicit OMP_NUM_THREADS wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - approx)^2)``."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh CPU generator with a fixed seed (tests never touch the global RNG)."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def sqnr():
    return _sqnr_db


@pytest.fixture
def fail_in_block_1(monkeypatch):
    """Make GPTQ raise ``InputError("boom")`` on its 9th call: in the tiny models (7 linears a block), block 1's
    second layer, when block 0 is already quantized, swapped in and its float weights offloaded."""
    from lowbit.errors import InputError

    gptq_module = importlib.import_module("lowbit.algorithms.gptq")  # the package re-exports the function by that name
    calls, real = {"n": 0}, gptq_module.gptq

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
            raise InputError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq_module, "gptq", failing)
