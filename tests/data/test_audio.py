"""Audio folders for speech models (PCM WAV, resampled, the model's own feature extractor), word error rate,
and a speech model calibrated and evaluated through the CLI alone."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from lowbit.data.audio import audio_folder, read_wav, resample
from lowbit.errors import InputError
from lowbit.evaluation.wer import edit_distance, normalise, word_error_rate


def _write_wav(path: Path, x: np.ndarray, rate: int, width: int = 2, channels: int = 1) -> None:
    """``x`` (n,) or (n, channels) in [-1, 1] as PCM of ``width`` bytes."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    x = np.repeat(x, channels, 1) if x.shape[1] == 1 else x
    if width == 1:
        raw = np.clip(np.round(x * 127 + 128), 0, 255).astype(np.uint8).tobytes()
    elif width == 3:
        v = np.clip(np.round(x * 8388607), -8388608, 8388607).astype("<i4").reshape(-1)
        raw = np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], 1).astype(np.uint8).tobytes()
    else:
        scale, dtype = {2: (32767, "<i2"), 4: (2147483647, "<i4")}[width]
        raw = np.round(x * scale).astype(dtype).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_widths_read_back(width, tmp_path):
    x = 0.5 * np.sin(np.linspace(0, 20, 400))
    _write_wav(tmp_path / "a.wav", x, 8000, width)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and y.dtype == np.float32 and y.shape == (400,)
    assert np.abs(y - x).max() < {1: 1e-2, 2: 1e-4, 3: 1e-6, 4: 1e-6}[width]


def test_stereo_is_mixed_to_mono(tmp_path):
    left, right = np.full(100, 0.5), np.full(100, -0.25)
    _write_wav(tmp_path / "s.wav", np.stack([left, right], 1), 16000, channels=2)
    y, _ = read_wav(tmp_path / "s.wav")
    assert np.allclose(y, 0.125, atol=1e-4)


def test_resampling_keeps_the_tone():
    rate, target, f = 8000, 16000, 440.0
    x = np.sin(2 * np.pi * f * np.arange(8000) / rate).astype(np.float32)
    y = resample(x, rate, target)
    assert y.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * target / y.size - f) < 2
    assert resample(x, rate, rate) is x
    back = resample(y, target, rate)
    assert np.abs(back - x).max() < 1e-4


def test_folders_and_files_that_are_not_audio_are_refused(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        audio_folder(tmp_path / "missing")
    (tmp_path / "a.flac").write_bytes(b"fLaC")
    with pytest.raises(InputError, match=r"no \.wav file.*a\.flac.*ffmpeg"):
        audio_folder(tmp_path)
    (tmp_path / "b.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(InputError, match=r"b\.wav: not a PCM WAV file"):
        audio_folder(tmp_path)


def test_transcripts_beside_clips(tmp_path):
    _write_wav(tmp_path / "b.wav", np.zeros(10), 16000)
    _write_wav(tmp_path / "a.wav", np.zeros(10), 16000)
    (tmp_path / "a.txt").write_text("Hello there.\n", encoding="utf-8")
    clips = audio_folder(tmp_path)
    assert [c.path.name for c in clips] == ["a.wav", "b.wav"]
    assert [c.transcript for c in clips] == ["Hello there.", None]
    assert len(audio_folder(tmp_path, limit=1)) == 1


def test_word_error_rate():
    assert normalise("Hello, World!  It's  me.") == ["hello", "world", "it's", "me"]
    assert edit_distance("a b c d".split(), "a x c".split()) == 2  # one substitution, one deletion
    r = word_error_rate(["the cat sat", "on the mat"], ["the cat sat down", "on mat"])
    assert (r.errors, r.words, r.pairs) == (2, 6, 2) and r.wer == pytest.approx(2 / 6)
    assert word_error_rate(["Yes."], ["yes"]).wer == 0.0


def _speech_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Whisper folder (model, byte tokenizer, a feature extractor making its 32 frames) and a folder of
    8 kHz clips, half with transcripts."""
    from transformers import WhisperFeatureExtractor

    from lowbit.models.tiny import tiny_hf, tiny_hf_tokenizer

    folder = tmp_path / "whisper"
    tiny_hf("whisper").save_pretrained(folder, safe_serialization=True)
    tiny_hf_tokenizer().save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=16, chunk_length=1, hop_length=500).save_pretrained(folder)
    clips = tmp_path / "clips"
    clips.mkdir()
    g = np.random.default_rng(0)
    for i in range(6):
        t = np.arange(8000) / 8000
        x = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t * (1 + t)) + 0.02 * g.standard_normal(t.size)
        _write_wav(clips / f"clip{i}.wav", x, 8000)
        if i % 2 == 0:
            (clips / f"clip{i}.txt").write_text("a short test sentence", encoding="utf-8")
    return folder, clips


def _cli(capsys, *argv):
    from lowbit.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_speech_model_through_the_cli(tmp_path, capsys):
    folder, clips = _speech_folder(tmp_path)
    rc, _, err = _cli(capsys, "quantize", folder, "--scheme", "int4-g32-asym", "--method", "gptq",
                      "--out", tmp_path / "none")
    assert rc == 2 and "pass --calib-data FOLDER of .wav files" in err and not (tmp_path / "none").exists()
    rc, out, err = _cli(capsys, "quantize", folder, "--scheme", "int4-g32-asym", "--method", "gptq",
                        "--calib-data", clips, "--calib-samples", "4", "--calib-len", "8", "--out", tmp_path / "q")
    assert rc == 0, err
    assert "4 sources x input_features (16, 32), decoded by the float model" in out
    rc, out, err = _cli(capsys, "eval", tmp_path / "q", "--data", clips, "--new-tokens", "8")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if "token KL" in ln)
    assert "greedy transcripts of 6 clips" in line
    assert float(line.split("token KL(float||model) ")[1].split()[0]) > 0
    wer = [ln for ln in out.splitlines() if "WER" in ln]
    assert len(wer) == 2 and all("3 clips" in ln for ln in wer)
    rc, _, err = _cli(capsys, "eval", tmp_path / "q")
    assert rc == 2 and "pass --data FOLDER of .wav files" in err


def test_audio_for_a_text_model_is_refused(tmp_path, capsys):
    from lowbit.models.tiny import tiny_hf, tiny_hf_tokenizer

    _, clips = _speech_folder(tmp_path)
    tiny_hf("llama").save_pretrained(tmp_path / "llama", safe_serialization=True)
    tiny_hf_tokenizer().save_pretrained(tmp_path / "llama")
    rc, _, err = _cli(capsys, "quantize", tmp_path / "llama", "--scheme", "int4-g32-asym", "--method", "gptq",
                      "--calib-data", clips, "--out", tmp_path / "q")
    assert rc == 2 and "is a folder of audio; a causal-lm model does not take audio" in err
