"""Bad input a hostile user tries next: output paths, recipes, calibration sizes, data that does not fit.

Same contract as ``tests/test_bad_input.py`` (whose helpers this file uses): exit code 2 with a message naming
what and where, or :class:`lowbit.InputError` from Python, and nothing written (``outdir`` checks that the
folder around ``--out`` stays empty).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import lowbit
from lowbit import InputError, QuantPlan
from lowbit.export import export_gguf
from lowbit import atomic
from lowbit.io import MANIFEST, WEIGHTS, save
from lowbit.models import tiny_cnn, tiny_llama
from test_bad_input import assert_clean_error, is_float, outdir, run  # noqa: F401  (outdir: a fixture)

EROFS = os.strerror(errno.EROFS)  # "Read-only file system"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An int8 tiny-llama artifact (for export and bench); tests never change it."""
    lm = lowbit.load_model("tiny-llama")
    lowbit.quantize(lm.model, "int8", progress=False)
    return save(lm.model, tmp_path_factory.mktemp("good") / "llama-w8", source=lm.source, plan="int8")


@pytest.fixture(scope="module")
def gguf_ready() -> torch.nn.Module:
    """A tiny Llama GGUF export accepts (float: its tensors are written as F32)."""
    return tiny_llama()


def small_model() -> torch.nn.Module:
    return lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)), "int8", progress=False)


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- 1. output paths that are not UTF-8 ------------------------------------------------------------------------


def non_utf8(folder: Path, name: bytes = b"out-\xff") -> str:
    return os.fsdecode(os.fsencode(folder) + b"/" + name)  # a str holding a surrogate escape


def test_quantize_out_not_utf8(capsys, outdir):
    out = non_utf8(outdir.parent)
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--scheme", "int4-g32-asym", "--out", out)
    assert_clean_error(rc, err, "quantize", repr(os.fsencode(out)), "not valid UTF-8", "ff")


def test_export_out_not_utf8(capsys, artifact, outdir):
    out = non_utf8(outdir.parent, b"w8-\xfe.gguf")
    rc, _, err = run(capsys, "export", artifact, "--format", "gguf", "--out", out)
    assert_clean_error(rc, err, "export", repr(os.fsencode(out)), "not valid UTF-8")


def test_save_not_utf8(outdir):
    with pytest.raises(InputError, match="not valid UTF-8"):
        save(small_model(), non_utf8(outdir.parent))


def test_gguf_export_not_utf8(gguf_ready, outdir):
    with pytest.raises(InputError, match="not valid UTF-8"):
        export_gguf(gguf_ready, None, non_utf8(outdir.parent, b"x\xff.gguf"))


# ---- 2. read-only output locations -----------------------------------------------------------------------------


@pytest.fixture
def readonly(tmp_path: Path):
    """A folder with a read-only tmpfs mounted on it (root ignores chmod); skipped where mounting is denied."""
    d = tmp_path / "ro"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


@pytest.fixture
def erofs_under(monkeypatch):
    """``erofs_under(folder)``: from now on, creating a folder inside ``folder`` fails with EROFS (what the
    destination check's probe meets on a read-only mount)."""
    real = os.mkdir

    def install(folder: Path):
        def mkdir(path, *a, **kw):
            if Path(os.fsdecode(path)).is_relative_to(folder):
                raise OSError(errno.EROFS, EROFS, os.fsdecode(path))
            return real(path, *a, **kw)

        monkeypatch.setattr(os, "mkdir", mkdir)
    return install


def test_quantize_into_a_readonly_mount(capsys, readonly):
    out = readonly / "sub" / "art"
    rc, out_text, err = run(capsys, "quantize", "tiny-llama", "--scheme", "int8", "--out", out)
    assert_clean_error(rc, err, "quantize", str(out), str(readonly), EROFS)
    assert "loaded" not in err and "quantized" not in out_text  # refused before loading the model
    assert siblings(readonly) == []


def test_export_into_a_readonly_mount(capsys, artifact, readonly):
    out = readonly / "w8.gguf"
    rc, _, err = run(capsys, "export", artifact, "--format", "gguf", "--out", out)
    assert_clean_error(rc, err, "export", str(out), EROFS)


def test_readonly_probe_simulated(capsys, outdir, erofs_under):
    erofs_under(outdir.parent)
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--scheme", "int8", "--out", outdir)
    assert_clean_error(rc, err, "quantize", str(outdir), EROFS)
    with pytest.raises(InputError, match=EROFS):
        save(small_model(), outdir)
    with pytest.raises(InputError, match=EROFS):
        export_gguf(small_model(), None, outdir.parent / "x.gguf")


@pytest.mark.parametrize("failure", [OSError(errno.EROFS, EROFS),
                                     safetensors.SafetensorError("Error while serializing: I/O error: No space "
                                                                 "left on device (os error 28)")],
                         ids=["oserror", "safetensors-error"])
def test_save_write_failure_is_an_input_error(outdir, monkeypatch, failure):
    # the probe passes (a real folder), then the write itself fails: still InputError, still nothing left
    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    nested = outdir / "a" / "b"
    with pytest.raises(InputError, match=r"could not write .*(Read-only file system|No space left)"):
        save(small_model(), nested)
    assert not outdir.exists()  # the parents it created are gone too


def test_gguf_write_failure_is_an_input_error(gguf_ready, outdir, monkeypatch):
    import gguf

    def fail(self, *a, **kw):
        raise OSError(errno.EROFS, EROFS)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(InputError, match=rf"could not write {outdir}\.gguf: {EROFS}"):
        export_gguf(gguf_ready, None, f"{outdir}.gguf")


# ---- 3. recipes ----------------------------------------------------------------------------------------------


def deep(n: int) -> str:
    return "rules: " + "[" * n + "]" * n + "\n"


RECIPES = {
    "not-utf8": (b"rules:\n  - {pattern: '*', weight: int8}  # caf\xe9\n", ["is not UTF-8", "0xe9", "offset"]),
    "deep-list": (deep(100_000).encode(), ["nested too deeply"]),
    "deep-json": (('{"rules": ' + "{\"a\": " * 50_000 + "1" + "}" * 50_001).encode(), ["nested too deeply"]),
    "huge": (b"# padding\n" * 200_000, ["larger than 1048576 bytes"]),
    "scalar": (b"just some words\n", ["expected a mapping", "got str"]),
}


@pytest.mark.parametrize("case", RECIPES)
def test_bad_recipe_file(capsys, tmp_path, outdir, case):
    data, fragments = RECIPES[case]
    recipe = tmp_path / f"{case}.yaml"
    recipe.write_bytes(data)
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--recipe", recipe, "--out", outdir)
    assert_clean_error(rc, err, "quantize", str(recipe), *fragments)
    with pytest.raises(InputError) as e:
        QuantPlan.load(recipe)
    assert all(f in str(e.value) for f in fragments)


def test_recipe_is_a_folder(capsys, tmp_path, outdir):
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--recipe", tmp_path, "--out", outdir)
    assert_clean_error(rc, err, "quantize", str(tmp_path), "is a folder")


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_recipe_is_not_a_regular_file(capsys, tmp_path, outdir, special):
    if special == "fifo":  # opening a fifo with no writer would block forever
        special = tmp_path / "recipe.fifo"
        os.mkfifo(special)
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--recipe", special, "--out", outdir)
    assert_clean_error(rc, err, "quantize", str(special), "not a regular file")


# ---- 4. calibration set size, length and seed ----------------------------------------------------------------


def test_calib_samples_too_many_for_text(capsys, outdir):
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--scheme", "int8", "--method", "gptq",
                     "--calib-samples", "100000000", "--out", outdir)
    assert_clean_error(rc, err, "quantize", "--calib-samples", "--calib-len", "100000000 windows x 512 tokens",
                       "4 x the 'news' corpus")


def test_calib_samples_too_many_for_images(capsys, outdir):
    rc, _, err = run(capsys, "quantize", "tiny-cnn", "--scheme", "int8", "--bias-correction",
                     "--calib-samples", "100000000", "--out", outdir)
    assert_clean_error(rc, err, "quantize", "100000000 calibration views (--calib-samples)", "at most 1024")


def test_calib_len_longer_than_the_corpus(capsys, outdir):
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--scheme", "int8", "--method", "gptq",
                     "--calib-len", str(10**9), "--out", outdir)
    assert_clean_error(rc, err, "quantize", "--calib-len", "fewer than seq_len=1000000000")


@pytest.mark.parametrize("argv", [["--calib-len", "0"], ["--seed", "-1"], ["--seed", str(2**64)]])
def test_calibration_flags_out_of_range(capsys, outdir, argv):
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--scheme", "int8", "--method", "gptq", *argv,
                     "--out", outdir)
    assert rc == 2 and argv[0] in err and "Traceback" not in err


def test_calibration_set_bounds_from_the_api():
    from lowbit.data import calibration_set
    from lowbit.models.tiny import ByteTokenizer

    with pytest.raises(InputError, match="windows would only repeat"):
        calibration_set("causal-lm", ByteTokenizer(), 10**8, 512)
    with pytest.raises(InputError, match="at most 1024"):
        calibration_set("image-classifier", None, 10**8)
    with pytest.raises(InputError, match="seed"):
        calibration_set("image-classifier", None, 2, seed=-1)


# ---- 5. models and data that do not fit, from the API --------------------------------------------------------


STATIC_ACT = QuantPlan.uniform("int8", act={"spec": "int8-tensor", "dynamic": False, "observer": "minmax"})


def meta_llama() -> torch.nn.Module:
    with torch.device("meta"):
        return tiny_llama()


def test_check_materialized_names_the_parameter():
    from lowbit.checks import check_materialized

    with pytest.raises(InputError, match=r"parameter 'model\.embed_tokens\.weight' .*meta device"):
        check_materialized(meta_llama())
    check_materialized(tiny_llama())  # a real model passes


def test_quantize_a_meta_model():
    with pytest.raises(InputError, match=r"parameter 'model\.embed_tokens\.weight' .*is on the meta device"):
        lowbit.quantize(meta_llama(), "int8", progress=False)


@pytest.mark.parametrize("model, data, fragments", [
    (tiny_llama, torch.randn(4, 7), ["LlamaForCausalLM", "tensor (4, 7) float32", "token ids"]),
    (tiny_llama, torch.randint(0, 1000, (4, 7)), ["tensor (4, 7) int64", "input embedding has 256 rows"]),
    (tiny_llama, torch.randint(0, 256, (4, 7, 2)), ["tensor (4, 7, 2) int64"]),
    (tiny_cnn, torch.randn(4, 7), ["TinyCNN", "tensor (4, 7) float32"]),
    (tiny_cnn, torch.randn(2, 3, 32, 32, dtype=torch.float64), ["tensor (2, 3, 32, 32) float64"]),
    (tiny_cnn, torch.randn(2, 4, 32, 32), ["tensor (2, 4, 32, 32) float32", "3 channels"]),
], ids=["llama-floats", "llama-ids-beyond-vocab", "llama-3d-ids", "cnn-2d", "cnn-float64", "cnn-4-channels"])
def test_calibration_data_that_does_not_fit(model, data, fragments):
    m = model()
    with pytest.raises(InputError, match="does not fit the model") as e:
        lowbit.quantize(m, STATIC_ACT, data, progress=False)
    assert all(f in str(e.value) for f in fragments), str(e.value)
    assert is_float(m)


# ---- 6. bench workers ----------------------------------------------------------------------------------------


def test_bench_worker_bad_input_becomes_an_input_error(tmp_path):
    from lowbit.bench import _in_fresh_process

    folder = tmp_path / "not-an-artifact"
    folder.mkdir()
    with pytest.raises(InputError, match=r"bench worker decode on .*not-an-artifact.*not a lowbit artifact"):
        _in_fresh_process({"task": "decode", "folder": str(folder), "dtype": "float32", "prompt_tokens": 8,
                           "new_tokens": 2})


def test_bench_worker_crash_exits_2(capsys, artifact, monkeypatch):
    import lowbit.bench

    def crashed(cmd, **kw):
        return subprocess.CompletedProcess(cmd, -9, "", "Traceback ...\nMemoryError: killed")

    monkeypatch.setattr(lowbit.bench.subprocess, "run", crashed)
    rc, _, err = run(capsys, "bench", artifact, "--sections", "decode")
    assert rc == 2 and "Traceback (most recent" not in err
    assert "lowbit bench: error: bench worker decode" in err and "exit -9" in err and "MemoryError" in err


def test_bench_json_is_checked_before_running(capsys):
    rc, _, err = run(capsys, "bench", "--sections", "matmul", "--json", "/dev/null")
    assert_clean_error(rc, err, "bench", "/dev/null", "not a regular file")


# ---- 7. file modes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_and_exported_files_follow_the_umask(tmp_path, gguf_ready, umask):
    old = os.umask(umask)
    try:
        path = save(small_model(), tmp_path / "art")
        gguf_path = export_gguf(gguf_ready, None, tmp_path / "m.gguf")
    finally:
        os.umask(old)
    for f in (path / WEIGHTS, path / MANIFEST, gguf_path):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask


# ---- 8. leftovers of killed saves ---------------------------------------------------------------------------


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_writers_are_removed(tmp_path, caplog):
    dest = save(small_model(), tmp_path / "art")
    dead, live = dead_pid(), os.getppid()
    for name in (f".art.lowbit-tmp-{dead}-0badc0de", f".art.lowbit-old-{dead}-0badc0de",
                 f".art.lowbit-tmp-{live}-00c0ffee"):
        (tmp_path / name).mkdir()
        (tmp_path / name / WEIGHTS).write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="lowbit.atomic"):
        save(small_model(), dest, overwrite=True)
    assert siblings(tmp_path) == [f".art.lowbit-tmp-{live}-00c0ffee", "art"]  # a running writer's is kept
    assert f"removed {tmp_path}/.art.lowbit-tmp-{dead}-0badc0de" in caplog.text
    assert f"process {dead} no longer runs" in caplog.text


def test_set_aside_previous_artifact_is_kept_when_it_is_the_only_copy(tmp_path, caplog):
    old = tmp_path / f".art.lowbit-old-{dead_pid()}-0badc0de"  # killed between its two renames
    save(small_model(), old)
    with caplog.at_level(logging.WARNING, logger="lowbit.atomic"):
        save(small_model(), tmp_path / "art")
    assert siblings(tmp_path) == [old.name, "art"] and "keeps it" in caplog.text


def test_temporary_names_carry_the_writer_pid(tmp_path, monkeypatch):
    seen = []
    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", lambda t, f, metadata=None: (seen.append(f), real(t, f))[1])
    save(small_model(), tmp_path / "art")
    assert f".art{atomic.TMP_TAG}{os.getpid()}-" in str(seen[0])


# ---- 9. what comes next: other output paths a user may try ----------------------------------------------------


@pytest.fixture
def hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "llama-hf"
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("where, fragment", [(".", "is the input"), ("w8", "lies inside the input")])
def test_out_is_or_is_inside_the_input_model(capsys, hf_folder, where, fragment):
    before = siblings(hf_folder)
    out = hf_folder / where
    rc, _, err = run(capsys, "quantize", hf_folder, "--scheme", "int8", "--out", out, "--overwrite")
    assert_clean_error(rc, err, "quantize", str(hf_folder), fragment)
    assert siblings(hf_folder) == before


def test_model_folder_at_a_non_utf8_path(capsys, tmp_path, outdir):
    """A Hugging Face folder whose path is not UTF-8: safetensors cannot open it, so it is refused up front."""
    folder = non_utf8(tmp_path, b"llama-\xfe")
    tiny_llama().save_pretrained(folder)
    rc, _, err = run(capsys, "quantize", folder, "--scheme", "int8", "--out", outdir)
    assert_clean_error(rc, err, "quantize", "model path", "llama-\\xfe", "not valid UTF-8")
    with pytest.raises(InputError, match=r"not valid UTF-8"):
        lowbit.load_model(folder)


def test_export_out_inside_the_artifact(capsys, artifact):
    before = siblings(artifact)
    rc, _, err = run(capsys, "export", artifact, "--format", "gguf", "--out", artifact / "m.gguf")
    assert_clean_error(rc, err, "export", "lies inside the input", str(artifact))
    assert siblings(artifact) == before


def test_out_is_empty(capsys):
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--scheme", "int8", "--out", "")
    assert_clean_error(rc, err, "quantize", "output path is empty")
    with pytest.raises(InputError, match="empty"):
        save(small_model(), "")
    with pytest.raises(InputError, match="must be a str or os.PathLike, got int"):
        save(small_model(), 3)


@pytest.mark.parametrize("special", ["/dev/null", "fifo"])
def test_out_is_a_device_or_fifo(capsys, tmp_path, artifact, special):
    if special == "fifo":
        special = tmp_path / "pipe"
        os.mkfifo(special)
    kind = os.stat(special).st_mode
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--scheme", "int8", "--out", special, "--overwrite")
    assert_clean_error(rc, err, "quantize", str(special), "not a folder")
    rc, _, err = run(capsys, "export", artifact, "--format", "gguf", "--out", special, "--overwrite")
    assert_clean_error(rc, err, "export", str(special), "not a regular file")
    assert os.stat(special).st_mode == kind  # still the device / fifo it was


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_out_is_an_existing_folder(capsys, tmp_path, artifact, overwrite):
    folder = tmp_path / "exports"
    folder.mkdir()
    rc, _, err = run(capsys, "export", artifact, "--format", "gguf", "--out", folder, *overwrite)
    assert_clean_error(rc, err, "export", str(folder), "is a folder", "give a file path inside it")


def test_export_out_is_a_symlink(capsys, tmp_path, artifact):
    target = tmp_path / "real.gguf"
    target.write_bytes(b"precious")
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    rc, _, err = run(capsys, "export", artifact, "--format", "gguf", "--out", link, "--overwrite")
    assert_clean_error(rc, err, "export", str(link), "symbolic link")
    assert target.read_bytes() == b"precious"


def test_out_name_too_long(capsys, outdir):
    out = outdir.parent / ("x" * 250)
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--scheme", "int8", "--out", out)
    assert_clean_error(rc, err, "quantize", "250 bytes", "shorter name")


def test_out_is_the_current_folder(capsys, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--scheme", "int8", "--out", ".")
    assert_clean_error(rc, err, "quantize", str(here), "current folder")
