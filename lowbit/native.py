"""lowbit's own C++ library (``lowbit/kernels/csrc``), compiled on first use and loaded through ctypes.

A leaf module: the kernels (``lowbit.kernels``, ``lowbit.runtime``) and GPTQ's column loop
(``lowbit.algorithms.gptq``) call its functions.

torch's integer matrix product (``torch._int_mm``) is fast only with VNNI or AMX; on CPUs with AVX2 alone it
runs at a few GMAC/s, slower than fp32. The kernels here use AVX2's ``vpmaddubsw`` with bounds that keep
every integer sum exact (see each source's header), so they are fast on any x86-64 CPU of the last decade.

They are built once per source version, compiler and flags with the system's C++ compiler (``$CXX``, else
``g++`` or ``c++``), about two seconds, into ``$LOWBIT_CACHE/kernels`` (written atomically, so concurrent
first uses are safe), and reused by later processes. The library has a plain C ABI (no torch headers) and is
called through ctypes, which releases the GIL; its OpenMP loops run on the OpenMP runtime torch has already
loaded (``libgomp.so.1``), with the thread count torch uses (``torch.get_num_threads()``), so
``torch.set_num_threads`` governs them as it governs torch's own kernels.

When the library cannot be had (no compiler, a CPU without AVX2, FMA and F16C, not Linux/x86-64, or
``LOWBIT_NATIVE=0``), :func:`why_unavailable` says why; the dispatch table then uses the next kernel that fits
and ``use_kernels``' report carries that reason.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from lowbit.atomic import atomic_file
from lowbit.cpu_features import cpu_flags
from lowbit.paths import cache_dir

log = logging.getLogger(__name__)

SOURCES = ("w4a8_avx2.cpp", "weight_only_avx2.cpp", "decode_step.cpp", "prefill.cpp", "gptq.cpp")
HEADERS = ("weight_only_avx2.h", "weight_only_avx512.h", "w4_vnni.h", "decode_common.h")
FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno",
         "-ffp-contract=off")
ENV = "LOWBIT_NATIVE"  # "0" turns the native kernels off (to compare against the torch kernels, or to debug)
ABI = 5  # lowbit_native_abi() of a library this module can call
BUILD_TIMEOUT_S = 300

_VOID, _INT = ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "lowbit_w4a8_avx2": (_INT, [_VOID, _VOID, _VOID, _VOID, _VOID, _VOID, _INT, _INT, _INT, _INT, _INT, _INT]),
    "lowbit_w4a8_linear_s8": (_INT, [_VOID] * 9 + [_INT] * 7),
    "lowbit_quantize_rows_s8": (_INT, [_VOID, _VOID, _VOID, _INT, _INT, _INT, _INT]),
    "lowbit_w4_linear_f32": (_INT, [_VOID] * 6 + [_INT] * 5),
    "lowbit_w4_dequant": (_INT, [_VOID] * 4 + [_INT] * 6),
    "lowbit_s8_dequant": (_INT, [_VOID] * 4 + [_INT] * 3),
    "lowbit_s8_linear_f32": (_INT, [_VOID] * 6 + [_INT] * 4),
    "lowbit_set_parallel_work": (ctypes.c_long, [ctypes.c_long]),
    "lowbit_decode_check": (_INT, [_VOID]),
    "lowbit_decode_scratch": (ctypes.c_long, [_VOID]),
    "lowbit_decode_step": (_INT, [_VOID, _VOID, _INT, _VOID, _VOID, _INT]),
    "lowbit_prefill_ok": (_INT, [_VOID]),
    "lowbit_prefill": (_INT, [_VOID, _VOID, _INT, _INT, _VOID, _INT]),
    "lowbit_gptq_block": (_INT, [_VOID, _VOID, _INT] + [_VOID] * 5 + [_INT] * 4),
    "lowbit_native_abi": (_INT, []),
}


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here (the message says why)."""


def why_unavailable() -> str | None:
    """None when the native library is loaded (building it if needed), else the reason it is not."""
    try:
        library()
    except NativeUnavailable as e:
        return str(e)
    return None


def library() -> ctypes.CDLL:
    """The loaded library (built on first use). Raises NativeUnavailable with the reason."""
    if os.environ.get(ENV, "1").strip() == "0":
        raise NativeUnavailable(f"lowbit's C++ kernels are turned off ({ENV}=0)")
    return _load()


def set_parallel_work(work: int) -> int:
    """Set the work (multiply-adds) below which lowbit's C++ kernels run a call on the calling thread alone
    (default 65,536: about ten microseconds of one core's work, below which waking a second thread costs more
    than it gains); returns the previous value. 0 parallelizes every call."""
    if work < 0:
        raise ValueError(f"parallel work must be >= 0, got {work}")
    return int(library().lowbit_set_parallel_work(int(work)))


def function(name: str):
    """The library's C function ``name`` (building and loading the library on first use). Kernels look their
    functions up once and keep them: a call then costs no environment lookup."""
    return getattr(library(), name)


@functools.lru_cache(maxsize=1)
def _load() -> ctypes.CDLL:
    why = _platform_why_not()
    if why:
        raise NativeUnavailable(why)
    import torch  # noqa: F401  (its libgomp must be loaded first, so the library binds to the same runtime)

    path = _built_library()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"could not load lowbit's C++ kernels from {path}: {e}") from None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is None:
            raise NativeUnavailable(f"{path} has no function {name}; delete it to rebuild")
        fn.restype, fn.argtypes = restype, argtypes
    if lib.lowbit_native_abi() != ABI:
        raise NativeUnavailable(f"{path} speaks ABI {lib.lowbit_native_abi()}, lowbit needs {ABI}; delete it")
    return lib


def _platform_why_not() -> str | None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"lowbit's C++ kernels are built for Linux on x86-64 only (this is {platform.system()} " \
               f"{platform.machine()})"
    flags = cpu_flags() or frozenset()
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    if missing:
        return f"this CPU lacks {' and '.join(missing)}, which lowbit's C++ kernels need"
    if _compiler() is None:
        return "no C++ compiler found ($CXX, g++ or c++) to build lowbit's C++ kernels"
    return None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _source_dir() -> Path:
    return Path(__file__).resolve().parent / "kernels" / "csrc"


def _built_library() -> Path:
    """The cached library for these sources, compiler and flags; compiled (atomically) when missing."""
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    h = hashlib.sha256(repr((version, FLAGS, ABI)).encode())
    for name in SOURCES + HEADERS:
        h.update((_source_dir() / name).read_bytes())
    dest = cache_dir() / "kernels" / f"lowbit_native_{h.hexdigest()[:16]}.so"
    if dest.is_file():
        return dest
    log.info("building lowbit's C++ kernels (once) into %s", dest)
    try:
        with atomic_file(dest) as tmp:
            _compile(cxx, tmp)
    except Exception as e:  # a read-only or full cache: build into a private temporary folder instead
        if isinstance(e, NativeUnavailable):
            raise
        private = Path(tempfile.mkdtemp(prefix="lowbit-kernels-")) / dest.name
        log.warning("could not write %s (%s); building into %s for this process", dest, e, private)
        _compile(cxx, private)
        return private
    return dest


def _compile(cxx: str, out: Path) -> None:
    cmd = [cxx, *FLAGS, *(str(_source_dir() / s) for s in SOURCES), "-o", str(out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeUnavailable(f"building lowbit's C++ kernels failed: {e}") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise NativeUnavailable(f"building lowbit's C++ kernels failed ({' '.join(cmd)}):\n{tail}")
