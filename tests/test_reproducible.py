"""Byte-for-byte reproducible artifacts: the same model, plan and data give the same files, run after run,
whatever torch's thread count, and saving one quantized model twice gives the same files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.io import MANIFEST, WEIGHTS
from lowbit.models import tiny
from lowbit.plan import QuantPlan

METHODS = ("rtn", "gptq", "awq+gptq")


def _ids() -> torch.Tensor:
    return torch.randint(3, 256, (16, 32), generator=torch.Generator().manual_seed(0))


def _digests(folder: Path) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in (WEIGHTS, MANIFEST)}


def _quantize_and_save(method: str, path: Path) -> dict[str, str]:
    plan = QuantPlan.uniform("int4-g32-asym", method)
    model = lowbit.quantize(tiny.tiny_llama(), plan, _ids(), progress=False)
    return _digests(lowbit.save(model, path, plan=plan))


@pytest.mark.parametrize("method", METHODS)
def test_quantizing_twice_gives_the_same_bytes(tmp_path, method):
    assert _quantize_and_save(method, tmp_path / "a") == _quantize_and_save(method, tmp_path / "b")


def test_saving_one_model_twice_gives_the_same_bytes(tmp_path):
    plan = QuantPlan.uniform("int4-g32-asym", "gptq")
    model = lowbit.quantize(tiny.tiny_llama(), plan, _ids(), progress=False)
    a, b = (_digests(lowbit.save(model, tmp_path / n, plan=plan)) for n in "ab")
    assert a == b


# Run in a fresh interpreter with N intra-op threads: the three artifacts' digests, and the digest of GPTQ's
# inverse Cholesky factor of a 256-column Hessian (MKL's threaded Cholesky inverse rounds differently with
# 1 and 2 threads from 64 columns on; the tiny model's layers, 64 and 128 wide, rarely show it in the codes)
_CHILD = textwrap.dedent("""
    import hashlib, json, sys, tempfile
    from pathlib import Path
    import torch
    torch.set_num_threads(int(sys.argv[1]))
    sys.path.insert(0, sys.argv[2])
    from test_reproducible import METHODS, _quantize_and_save
    from lowbit.algorithms.gptq import _inverse_cholesky

    x = torch.randn(1024, 256, generator=torch.Generator().manual_seed(0))
    U = _inverse_cholesky(x.T @ x / 1024, 0.01)
    out = {"threads": torch.get_num_threads(), "U": hashlib.sha256(U.numpy().tobytes()).hexdigest()}
    with tempfile.TemporaryDirectory() as tmp:
        out.update({m: _quantize_and_save(m, Path(tmp) / m.replace("+", "-")) for m in METHODS})
    print(json.dumps(out))
""")


def _in_fresh_process(threads: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(threads), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_thread_count_does_not_change_the_bytes():
    one, two = _in_fresh_process(1), _in_fresh_process(2)
    assert (one.pop("threads"), two.pop("threads")) == (1, 2)
    assert one == two
