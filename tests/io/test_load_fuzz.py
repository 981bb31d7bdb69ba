"""Property-based fuzzing of ``lowbit.load``: mutated manifests and safetensors headers, checksums recomputed.

A hostile user can edit ``manifest.json`` and the header of ``model.safetensors`` and then recompute the
SHA-256 the manifest records, so the checksum proves nothing about such a file. Whatever the mutation,
``lowbit.load`` must either return a model whose forward runs, or raise one of lowbit's own errors
(:class:`lowbit.LowbitError`); never another exception, never a hang, and never more memory than
:func:`lowbit.io.load.arch_bytes_bound` allows (the test lowers the process's address-space limit by that
much above what it already uses, so an allocation beyond it fails the test as a foreign error).

``LOWBIT_FUZZ_EXAMPLES`` sets the number of examples per artifact (default 60, about 20 s in all).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from io_models import TextNet, memory_bound, quantized, seeded
from lowbit.errors import LowbitError
from lowbit.io.load import arch_bytes_bound
from lowbit.models import tiny_llama

EXAMPLES = int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "60"))
_FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("LOWBIT_FUZZ_EXAMPLES"),
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# values a hostile edit may put anywhere: sizes far too large, negative, of the wrong type, deeply nested
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, 1, -1, 7, 2**31, 2**40, 200_000, 50_000_000, -(2**63)]),
    st.integers(-10, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.sampled_from(["fp16", "bf16", "fp32", "int", "QuantLinear", "QuantEmbedding", "QuantConv2d", "group",
                     "channel", "U8", "I8", "F16", "BF16", "F32", "I64", "/", "..", "hf-folder", "bundled"]),
)
_JSON = st.recursive(_SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                     max_leaves=12)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """Two artifacts: tiny Llama with a recorded source (load builds the skeleton) and TextNet (model given)."""
    root = tmp_path_factory.mktemp("fuzz")
    llama = tiny_llama()
    lowbit.quantize(llama, "int4-g32-asym", progress=False)
    lowbit.save(llama, root / "llama", source={"type": "bundled", "name": "tiny-llama"})
    lowbit.save(quantized(TextNet, "int4-g64-asym"), root / "textnet")
    return {"llama": root / "llama", "textnet": root / "textnet"}


def _paths(tree, prefix=()):
    """Every (path of keys) into a JSON tree, the root included."""
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, (*prefix, i))


def _mutate(tree, data):
    """One edit of a JSON tree: replace a value, delete a key, or add a key (a deep copy is returned)."""
    tree = copy.deepcopy(tree)
    path = data.draw(st.sampled_from(sorted(_paths(tree), key=repr)))
    op = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if not path:
        return data.draw(_JSON) if op == "replace" else tree
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if op == "replace":
        parent[last] = data.draw(_JSON)
    elif op == "delete" and isinstance(parent, dict):
        del parent[last]
    elif op == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8))] = data.draw(_JSON)
    return tree


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _write(src: Path, dst: Path, manifest: dict, weights: bytes) -> None:
    """The mutated artifact, with the weights' size and SHA-256 recomputed as a hostile user would."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    (dst / "model.safetensors").write_bytes(weights)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if isinstance(files, dict) and isinstance(files.get("model.safetensors"), dict):
        files["model.safetensors"] = {"bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    (dst / "manifest.json").write_text(json.dumps(manifest))


def _check_load(path: Path, which: str) -> None:
    """Load must give a model whose forward runs, or a lowbit error; nothing else."""
    model = seeded(TextNet) if which == "textnet" else None
    bound = arch_bytes_bound((path / "model.safetensors").stat().st_size) + 512 * 2**20  # + the state itself
    try:
        with memory_bound(bound):
            loaded = lowbit.load(path, model=model)
            ids = torch.tensor([[1, 2, 3, 4]])
            with torch.no_grad():
                out = loaded(ids)
    except LowbitError:
        return
    assert out is not None


def _weights_and_manifest(art: Path) -> tuple[bytes, dict]:
    return (art / "model.safetensors").read_bytes(), json.loads((art / "manifest.json").read_text())


@pytest.mark.parametrize("which", ["llama", "textnet"])
@_FUZZ
@given(data=st.data())
def test_mutated_manifest(artifacts, tmp_path, which, data):
    weights, manifest = _weights_and_manifest(artifacts[which])
    for _ in range(data.draw(st.integers(1, 3))):
        manifest = _mutate(manifest, data)
    dst = tmp_path / "m"
    _write(artifacts[which], dst, manifest, weights)
    _check_load(dst, which)


_DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "X9"]


@pytest.mark.parametrize("which", ["llama", "textnet"])
@_FUZZ
@given(data=st.data())
def test_mutated_safetensors_header(artifacts, tmp_path, which, data):
    weights, manifest = _weights_and_manifest(artifacts[which])
    header, body = _split(weights)
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    entry = header[name]
    op = data.draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "drop", "any"]))
    if op == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(_DTYPE_NAMES))
    elif op == "shape":
        entry["shape"] = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 32, 200_000, 2**31, -1]), max_size=4))
    elif op == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = [a + data.draw(st.integers(-64, 64)), b + data.draw(st.integers(-64, 64))]
    elif op == "rename":
        header[data.draw(st.text(min_size=1, max_size=12))] = header.pop(name)
    elif op == "drop":
        del header[name]
    else:
        header = _mutate(header, data)
    dst = tmp_path / "h"
    _write(artifacts[which], dst, manifest, _join(header, body) if isinstance(header, dict) else b"{}")
    _check_load(dst, which)


def test_the_fuzzer_can_fail(artifacts, tmp_path):
    """The property is not vacuous: an unmodified artifact loads and runs, and a foreign error is not swallowed."""
    weights, manifest = _weights_and_manifest(artifacts["llama"])
    _write(artifacts["llama"], tmp_path / "ok", manifest, weights)
    _check_load(tmp_path / "ok", "llama")  # returns normally: the model ran
    with pytest.raises(MemoryError):
        with memory_bound(64 * 2**20):
            bytearray(512 * 2**20)
