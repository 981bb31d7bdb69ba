"""Stacks of repeated blocks: every outermost one is found, and they are calibrated (and checkpointed) in the
order the model runs them, whatever order it registers them in."""

from __future__ import annotations

import logging

import torch
from torch import nn

import lowbit
from lowbit.calibration.blocks import find_blocks, find_stacks
from lowbit.models.tiny import tiny_hf
from lowbit.plan import QuantPlan


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.inner = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])  # a list inside a block: no stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x)) + 0.1 * self.inner[1](self.inner[0](x))


class LateFirst(nn.Module):
    """Registers ``late`` before ``early`` but runs ``early`` first."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.ModuleList([Block(), Block()])
        self.early = nn.ModuleList([Block(), Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.early:
            x = b(x)
        for b in self.late:
            x = b(x)
        return x


def test_every_outermost_stack_is_found():
    assert [(s[0][0], len(s)) for s in find_stacks(LateFirst())] == [("late.0", 2), ("early.0", 3)]
    assert find_blocks(LateFirst())[0][0] == "early.0"  # the one holding the most parameters
    t5 = tiny_hf("t5")
    assert [(s[0][0], len(s)) for s in find_stacks(t5)] == [("encoder.block.0", 2), ("decoder.block.0", 2)]


def test_stacks_run_and_resume_in_execution_order(tmp_path, caplog):
    torch.manual_seed(0)
    model, again = LateFirst().eval(), LateFirst().eval()
    again.load_state_dict(model.state_dict())
    data = [torch.randn(4, 8, 16) for _ in range(2)]
    plan = QuantPlan.uniform("int4-ch-asym", method="gptq", skip=())
    lowbit.quantize(model, plan, data, progress=False, checkpoint=tmp_path / "ck")
    assert [s["stack"] for s in model.lowbit_calibration["schedule"]] == ["early", "late"]
    with caplog.at_level(logging.INFO, logger="lowbit.calibration.checkpoint"):
        lowbit.quantize(again, plan, data, progress=False, checkpoint=tmp_path / "ck")
    assert any("resuming from 5 finished block(s)" in r.getMessage() for r in caplog.records)  # all of them
    x = torch.randn(2, 8, 16)
    assert torch.equal(model(x), again(x))
