"""A Hugging Face ``datasets`` folder (save_to_disk) as the user's calibration or evaluation text."""

from __future__ import annotations

import json
import re

import datasets
import pytest

from lowbit.cli import main
from lowbit.data.user_text import Conversations, read_text
from lowbit.errors import InputError

TEXTS = [f"Record {i}: the quick brown fox jumps over the lazy dog. " * 8 for i in range(30)]


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def _saved(path, **columns):
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return path


def test_a_saved_dataset_reads_like_the_same_records_in_json_lines(tmp_path):
    folder = _saved(tmp_path / "ds", text=TEXTS, n=list(range(len(TEXTS))))
    (tmp_path / "same.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS), encoding="utf-8")
    assert read_text(folder) == read_text(tmp_path / "same.jsonl") == "\n\n".join(TEXTS)
    body = _saved(tmp_path / "body", body=TEXTS[:2])
    assert read_text(body, field="body") == TEXTS[0] + "\n\n" + TEXTS[1]


def test_several_shards_are_read_in_order(tmp_path):
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(folder), num_shards=3)
    assert len(list(folder.glob("data-*.arrow"))) == 3
    assert read_text(folder) == "\n\n".join(TEXTS)


def test_a_dataset_dict_uses_the_split_asked_for_or_the_preferred_one(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["train text"]}),
                          "validation": datasets.Dataset.from_dict({"text": ["validation text"]}),
                          "test": datasets.Dataset.from_dict({"text": ["test text"]})}).save_to_disk(str(folder))
    assert read_text(folder, prefer_splits=("train",)) == "train text"
    assert read_text(folder, prefer_splits=("test", "validation")) == "test text"
    assert read_text(folder, split="validation", prefer_splits=("train",)) == "validation text"
    with pytest.raises(InputError, match=r"no split 'dev' \(splits: train, validation, test\)"):
        read_text(folder, split="dev")
    with pytest.raises(InputError, match="choose one with --calib-split / --data-split"):
        read_text(folder)
    one = tmp_path / "one"
    datasets.DatasetDict({"only": datasets.Dataset.from_dict({"text": ["only text"]})}).save_to_disk(str(one))
    assert read_text(one, prefer_splits=("train",)) == "only text"


def test_a_column_of_conversations_is_laid_out_by_the_chat_template(tmp_path):
    from lowbit.models.tiny import tiny_hf_tokenizer

    chats = [[{"role": "user", "content": f"what is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}"}]
             for i in range(3)]
    got = read_text(_saved(tmp_path / "c", messages=chats), field="messages")
    assert isinstance(got, Conversations) and [list(c) for c in got.chats] == chats
    tokenizer = tiny_hf_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    assert got.render(tokenizer).split("\n\n")[1] == "<user>what is 1 plus 1?<assistant>2"


def test_bad_saved_datasets_are_refused_naming_what_and_where(tmp_path):
    with pytest.raises(InputError, match=r"no column 'text' \(columns: body, n\).*--calib-field"):
        read_text(_saved(tmp_path / "a", body=["x"], n=[1]))
    with pytest.raises(InputError, match=r"row 1: column 'text' holds null"):
        read_text(_saved(tmp_path / "b", text=["fine", None]))
    with pytest.raises(InputError, match=r"row 0: column 'text' holds 3, not text"):
        read_text(_saved(tmp_path / "b2", text=[3]))
    with pytest.raises(InputError, match="holds no text in column 'text'"):
        read_text(_saved(tmp_path / "c", text=["  ", "\n"]))
    with pytest.raises(InputError, match="a split .* is only meaningful for a datasets folder"):
        (tmp_path / "t.txt").write_text("text", encoding="utf-8")
        read_text(tmp_path / "t.txt", split="train")
    with pytest.raises(InputError, match=r"a single dataset \(no dataset_dict.json\), so it has no split"):
        read_text(_saved(tmp_path / "d", text=["x"]), split="train")


def test_damaged_saved_datasets_are_refused(tmp_path):
    missing = _saved(tmp_path / "missing", text=["x"])
    next(missing.glob("*.arrow")).unlink()
    with pytest.raises(InputError, match=r"data-00000-of-00001.arrow listed in state.json are missing"):
        read_text(missing)
    corrupt = _saved(tmp_path / "corrupt", text=["x"])
    next(corrupt.glob("*.arrow")).write_bytes(b"not arrow at all")
    with pytest.raises(InputError, match="data-00000-of-00001.arrow: not a readable Arrow shard"):
        read_text(corrupt)
    broken = _saved(tmp_path / "broken", text=["x"])
    (broken / "state.json").write_text("{", encoding="utf-8")
    with pytest.raises(InputError, match=r"state.json: not a datasets state file"):
        read_text(broken)
    with pytest.raises(InputError, match="not a regular file, nor a folder saved by datasets' save_to_disk"):
        read_text(tmp_path)


def _cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_calibrates_and_evaluates_on_a_saved_dataset(tmp_path, capsys):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS}),
                          "test": datasets.Dataset.from_dict({"text": TEXTS[::-1]})}).save_to_disk(str(folder))
    rc, out, err = _cli(capsys, "quantize", "tiny-llama", "--scheme", "int4-g32-asym", "--method", "gptq",
                        "--calib-data", folder, "--calib-samples", "4", "--calib-len", "64", "--out", tmp_path / "q")
    assert rc == 0, err
    assert f"calibration set: (4, 64) from {folder}" in out
    rc, out, err = _cli(capsys, "eval", tmp_path / "q", "--data", folder, "--tokens", "1024")
    assert rc == 0, err
    assert re.search(r"perplexity [0-9.]+ over \d+ tokens", out)
    test_ppl = re.search(r"perplexity [0-9.]+", out).group()
    rc, out, err = _cli(capsys, "eval", tmp_path / "q", "--data", folder, "--data-split", "train", "--tokens", "1024")
    assert rc == 0, err
    assert re.search(r"perplexity [0-9.]+", out).group() != test_ppl  # another split, another text
    rc, _, err = _cli(capsys, "eval", tmp_path / "q", "--data", folder, "--data-split", "dev")
    assert rc == 2 and "no split 'dev' (splits: train, test)" in err
