"""Audio for speech models from a folder: PCM WAV files, mixed to mono, resampled to the model's rate and turned
into model inputs by the model's own feature extractor; a transcript next to a clip (``clip.txt`` beside
``clip.wav``) is its reference text for word error rate.

Only PCM WAV (8, 16, 24 or 32-bit integer samples) is read, with Python's ``wave`` module: no audio library is
needed. Other formats are refused with the file named and a conversion hint. Resampling is band-limited (FFT):
the spectrum is cut or zero-padded to the new rate, which is exact for the band both rates hold.
"""

from __future__ import annotations

import logging
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import InputError

log = logging.getLogger(__name__)

AUDIO_SUFFIX = ".wav"
OTHER_AUDIO_SUFFIXES = (".flac", ".mp3", ".ogg", ".m4a", ".opus", ".aac", ".wma", ".aiff", ".aif")


@dataclass(frozen=True)
class Clip:
    """One audio file: ``samples`` float32 mono in [-1, 1] at ``rate`` Hz, its reference ``transcript`` or None."""

    path: Path
    samples: np.ndarray
    rate: int
    transcript: str | None


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """``(samples, rate)``: a PCM WAV file as float32 mono samples in [-1, 1] (channels averaged)."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise InputError(f"{path}: not a PCM WAV file lowbit can read ({e}); convert it, e.g. "
                         f"ffmpeg -i {path.name} -ac 1 -ar 16000 -c:a pcm_s16le out.wav") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if n == 0 or not raw:
        raise InputError(f"{path}: the WAV file holds no samples")
    if width == 1:  # unsigned 8-bit
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:  # 24-bit little-endian: widen to 32 bits
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = (b[:, 0].astype(np.int32) | (b[:, 1].astype(np.int32) << 8) | (b[:, 2].astype(np.int8).astype(np.int32)
                                                                             << 16)).astype(np.float32) / 8388608.0
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise InputError(f"{path}: {8 * width}-bit samples are not supported (8, 16, 24 or 32-bit PCM are)")
    x = x[: (x.size // channels) * channels].reshape(-1, channels).mean(1)
    return np.ascontiguousarray(x, dtype=np.float32), rate


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``x`` at ``rate`` Hz resampled to ``target`` Hz (band-limited, by FFT)."""
    if rate == target:
        return x
    n_out = max(1, int(round(x.size * target / rate)))
    spec = torch.fft.rfft(torch.from_numpy(np.asarray(x, np.float64)))
    keep = n_out // 2 + 1
    out = torch.zeros(keep, dtype=spec.dtype)
    m = min(keep, spec.numel())
    out[:m] = spec[:m]
    y = torch.fft.irfft(out, n=n_out) * (n_out / x.size)
    return y.float().numpy()


def audio_folder(folder: str | Path, limit: int | None = None) -> list[Clip]:
    """The ``.wav`` clips of ``folder`` (sorted by name, at most ``limit``), each with the transcript of a
    same-named ``.txt`` beside it if there is one. Raises InputError for a missing folder, no WAV file, or
    audio in another format only."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder (speech models read a folder of .wav files)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == AUDIO_SUFFIX and p.is_file())
    if not files:
        other = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in OTHER_AUDIO_SUFFIXES)
        hint = (f"; it has {len(other)} file(s) in other formats ({', '.join(other[:3])}): convert them to PCM WAV, "
                f"e.g. ffmpeg -i in.flac -ac 1 -ar 16000 out.wav") if other else ""
        raise InputError(f"{folder}: no .wav file{hint}")
    clips = []
    for p in files[:limit]:
        x, rate = read_wav(p)
        txt = p.with_suffix(".txt")
        transcript = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
        clips.append(Clip(p, x, rate, transcript or None))
    return clips


def speech_inputs(feature_extractor: Any, clips: list[Clip], batch_size: int = 8) -> list[dict]:
    """Encoder inputs for ``clips`` in batches: each clip resampled to the feature extractor's rate and
    turned into features by it (``{"input_features": ...}`` for Whisper)."""
    if feature_extractor is None:
        raise InputError("this speech model's folder has no feature extractor (preprocessor_config.json), which "
                         "turns audio into its inputs")
    target = int(feature_extractor.sampling_rate)
    out = []
    for i in range(0, len(clips), batch_size):
        waves = [resample(c.samples, c.rate, target) for c in clips[i:i + batch_size]]
        feats = feature_extractor(waves, sampling_rate=target, return_tensors="pt")
        out.append({k: v for k, v in feats.items() if k in ("input_features", "input_values")})
    return out


__all__ = ["Clip", "audio_folder", "read_wav", "resample", "speech_inputs"]
