"""What the quality benchmarks share: each row measured in a fresh process, and the code version rows carry.

A row runs as ``python SCRIPT --row ... --row-out FILE`` in a new interpreter, as a ``lowbit quantize``
command would: in one long process the C allocator keeps memory that earlier rows freed, in pieces later rows
cannot always reuse, which would inflate their peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def row_in_new_process(script: str, row: list[str], a: argparse.Namespace, extra: list[str] = ()) -> dict:
    """The JSON a fresh ``script --row ROW...`` wrote (its progress goes to our stderr); SystemExit if it fails.

    The protocol options (``--tokens``, ``--calib-samples``, ``--calib-len``, ``--threads``) are passed on, and
    the script's own ``extra`` arguments.
    """
    fd, out = tempfile.mkstemp(prefix="lowbit-row-", suffix=".json")
    os.close(fd)
    try:
        cmd = [sys.executable, str(Path(script).resolve()), "--row", *row, "--row-out", out,
               "--tokens", str(a.tokens), "--calib-samples", str(a.calib_samples), "--calib-len",
               str(a.calib_len), "--threads", str(a.threads), *extra]
        done = subprocess.run(cmd, stdout=sys.stderr)
        if done.returncode != 0:
            raise SystemExit(f"row {' '.join(row)} failed (exit {done.returncode}); its error is above")
        return json.loads(Path(out).read_text(encoding="utf-8"))
    finally:
        Path(out).unlink(missing_ok=True)


def code_version(script: str) -> str:
    """What the numbers depend on: git's hashes of ``lowbit/`` and of ``script`` as committed (so commits that
    touch neither, such as documentation, keep the same version), with ``+changes`` when the working tree
    differs from them; ``unknown`` outside git."""
    here = Path(script).resolve().parent.parent
    rel = str(Path(script).resolve().relative_to(here))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True).stdout.strip()

    try:
        version = git("rev-parse", "--short=12", "HEAD:lowbit") + "-" + git("rev-parse", "--short=12", f"HEAD:{rel}")
        dirty = git("status", "--porcelain", "--", "lowbit", rel)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return "unknown"
    return version + ("+changes" if dirty else "")


def run_key(script: str, a: argparse.Namespace) -> dict:
    """What must match for rows of two sittings to belong to one run: code, protocol settings, torch."""
    return {"code": code_version(script), "tokens": a.tokens, "calib": f"{a.calib_samples}x{a.calib_len}",
            "threads": a.threads, "torch": torch.__version__}


def previous_rows(path: str, run: dict, key: tuple[str, ...]) -> dict[tuple, dict]:
    """Rows of ``path`` by their ``key`` fields; every row must carry ``run`` (else SystemExit)."""
    if not Path(path).exists():
        return {}
    if run["code"] == "unknown" or run["code"].endswith("+changes"):
        raise SystemExit(f"--resume needs committed code (this is {run['code']}): rows of two sittings could "
                         "otherwise come from different code")
    rows = {}
    for i, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        row = json.loads(text)
        if row.get("run") != run:
            raise SystemExit(f"{path}, line {i}: measured by {row.get('run')}, not by this run {run}; "
                             "use another --json file")
        rows[tuple(row[k] for k in key)] = row
    return rows


def emit(path: str | None, row: dict, line: str) -> dict:
    """Print ``line`` (the row as a table line) and append ``row`` as one JSON line to ``path`` (if given)."""
    print(line, flush=True)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return row


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
