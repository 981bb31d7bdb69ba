"""A user's own text: read with clear errors, used for calibration (--calib-data) and evaluation (--data)."""

from __future__ import annotations

import json
import re

import pytest

from lowbit.cli import main
from lowbit.data import calibration_set
from lowbit.data.user_text import read_text
from lowbit.errors import InputError
from lowbit.models import ByteTokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 200


def test_plain_text_is_used_as_it_is(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n", encoding="utf-8")
    assert read_text(tmp_path / "a.txt") == "first line\nsecond line\n"


def test_json_lines_take_the_named_field(tmp_path):
    lines = [json.dumps({"text": "one"}), "", json.dumps({"text": "two", "id": 2})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert read_text(tmp_path / "a.jsonl") == "one\n\ntwo"
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    assert read_text(tmp_path / "b.jsonl", field="body") == "x"


@pytest.mark.parametrize("name, content, why", [
    ("missing.txt", None, "no such file"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), r"not UTF-8 text \(byte 3"),
    ("empty.txt", b"  \n\t", "holds no text"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"line 2: not JSON"),
    ("list.jsonl", b'["text"]\n', r"line 1: a JSON list, not an object"),
    ("nofield.jsonl", b'{"body": "x"}\n', r"line 1: no string field 'text' \(keys: body\)"),
])
def test_bad_files_are_refused_naming_what_and_where(tmp_path, name, content, why):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=why):
        read_text(path)


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="not a regular file"):
        read_text(tmp_path)


def test_calibration_windows_come_from_the_users_text():
    data = calibration_set("causal-lm", ByteTokenizer(), 8, 32, seed=1, text=TEXT, source="mine.txt")
    assert data.shape == (8, 32)
    assert all(ByteTokenizer().decode(row.tolist()) in TEXT for row in data)
    with pytest.raises(InputError, match="'mine.txt' has 11 tokens, fewer than seq_len=32"):
        calibration_set("causal-lm", ByteTokenizer(), 8, 32, text="short text.", source="mine.txt")


def _cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_calibrates_and_evaluates_on_the_users_text(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text(TEXT, encoding="utf-8")
    rc, out, _ = _cli(capsys, "quantize", "tiny-llama", "--scheme", "int4-g32-asym", "--method", "gptq",
                      "--calib-data", tmp_path / "mine.txt", "--calib-samples", "4", "--calib-len", "64",
                      "--out", tmp_path / "q")
    assert rc == 0 and f"calibration set: (4, 64) from {tmp_path / 'mine.txt'}" in out
    rc, out, _ = _cli(capsys, "eval", tmp_path / "q", "--data", tmp_path / "mine.txt", "--tokens", "2048")
    assert rc == 0 and f"protocol: {tmp_path / 'mine.txt'}, first 2,048 tokens" in out
    assert re.search(r"perplexity [0-9.]+ over \d+ tokens", out)
    same = _cli(capsys, "eval", tmp_path / "q", "--text", tmp_path / "mine.txt", "--tokens", "2048")[1]
    assert re.search(r"perplexity [0-9.]+", same).group() == re.search(r"perplexity [0-9.]+", out).group()


def test_cli_refuses_bad_user_text_before_loading_anything(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    rc, _, err = _cli(capsys, "quantize", "tiny-llama", "--scheme", "int4-g32-asym", "--method", "gptq",
                      "--calib-data", tmp_path / "bad.jsonl", "--out", tmp_path / "q")
    assert rc == 2 and "line 1: no string field 'text'" in err and "--calib-field" in err
    assert not (tmp_path / "q").exists()
    (tmp_path / "short.txt").write_text("too short.", encoding="utf-8")
    rc, _, err = _cli(capsys, "quantize", "tiny-llama", "--scheme", "int4-g32-asym", "--method", "gptq",
                      "--calib-data", tmp_path / "short.txt", "--out", tmp_path / "q")
    assert rc == 2 and "fewer than seq_len=512" in err
    assert not (tmp_path / "q").exists()


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _chats(path, n=40, field="messages"):
    lines = [json.dumps({field: [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                                 {"role": "assistant", "content": f"It is {2 * i}. " * 3}]}) for i in range(n)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def test_conversations_are_laid_out_by_the_chat_template(tmp_path):
    from lowbit.data.user_text import Conversations
    from lowbit.models.tiny import tiny_hf_tokenizer

    chats = read_text(_chats(tmp_path / "c.jsonl", 2), field="messages")
    assert isinstance(chats, Conversations) and len(chats.chats) == 2
    tokenizer = tiny_hf_tokenizer()
    with pytest.raises(InputError, match="no chat template"):
        chats.render(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    assert chats.render(tokenizer) == ("<user>Question 0: what is 0 plus 0?\n<assistant>" + "It is 0. " * 3 + "\n\n\n"
                                       "<user>Question 1: what is 1 plus 1?\n<assistant>" + "It is 2. " * 3 + "\n")


@pytest.mark.parametrize("lines, why", [
    (['{"messages": []}'], "empty conversation"),
    (['{"messages": [{"role": "user"}]}'], r"message 0 of 'messages' is not a"),
    (['{"messages": [{"role": "user", "content": "a"}]}', '{"messages": "text"}'], "line 2: mixes text and conversations"),
])
def test_bad_conversations_are_refused_naming_the_line(tmp_path, lines, why):
    (tmp_path / "c.jsonl").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(InputError, match=why):
        read_text(tmp_path / "c.jsonl", field="messages")


def test_cli_calibrates_on_conversations(tmp_path, capsys):
    from lowbit.models.tiny import tiny_hf, tiny_hf_tokenizer

    folder = tmp_path / "llama"
    tiny_hf("llama").save_pretrained(folder, safe_serialization=True)
    tokenizer = tiny_hf_tokenizer()
    tokenizer.save_pretrained(folder)
    chats = _chats(tmp_path / "chats.jsonl")
    rc, _, err = _cli(capsys, "quantize", folder, "--scheme", "int4-g32-asym", "--method", "gptq", "--calib-data",
                      chats, "--calib-field", "messages", "--calib-len", "64", "--out", tmp_path / "none")
    assert rc == 2 and "no chat template" in err and not (tmp_path / "none").exists()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    rc, out, err = _cli(capsys, "quantize", folder, "--scheme", "int4-g32-asym", "--method", "gptq", "--calib-data",
                        chats, "--calib-field", "messages", "--calib-len", "64", "--out", tmp_path / "q")
    assert rc == 0, err
    assert re.search(r"calibration set: \(\d+, 64\) from .*chats.jsonl", out)
