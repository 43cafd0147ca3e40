"""Decoding media and computing features: Pillow for images, the standard library's `wave` and scipy's
polyphase resampler for audio, and a log-mel spectrogram from `torch.stft` with a Slaney mel filterbank
(the same definition as librosa's defaults; tests compare against librosa).
"""

from __future__ import annotations

import io
import math
import wave

import numpy as np
import torch

from ..errors import DataError

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms windows
HOP = 160  # 10 ms hop
N_MELS = 40


# --- images ------------------------------------------------------------------------------------------
def decode_image(data: bytes, size: int) -> torch.Tensor:
    """PNG/JPEG/... bytes -> [3, size, size] float in [0, 1] (RGB, resized)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"not a readable image ({e})") from None
    return image_to_tensor(img, size)


def image_to_tensor(img, size: int) -> torch.Tensor:
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


# --- audio -------------------------------------------------------------------------------------------
def decode_wav(data: bytes) -> np.ndarray:
    """PCM WAV bytes (8/16/32-bit, any rate, mono or stereo) -> mono float32 at SAMPLE_RATE."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise DataError(f"not a PCM WAV file ({e})") from None
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dtype is None:
        raise DataError(f"unsupported WAV sample width {8 * width} bits (use 8, 16 or 32)")
    x = np.frombuffer(frames, dtype=dtype).astype(np.float32)
    x = (x - 128) / 128 if width == 1 else x / float(2 ** (8 * width - 1))
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return resample(x, rate, SAMPLE_RATE)


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return x.astype(np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)


def encode_wav(x: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """float waveform in [-1, 1] -> 16-bit mono WAV bytes."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes())
    return buf.getvalue()


def hz_to_mel(f):
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's default, htk=False)."""
    f = np.asanyarray(f, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    mel = f / f_sp
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel)


def mel_to_hz(m):
    m = np.asanyarray(m, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters, area-normalised ('slaney')."""
    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


_FILTERS: dict[tuple, torch.Tensor] = {}


def mel_power(x: torch.Tensor, sr: int = SAMPLE_RATE, n_fft: int = N_FFT, hop: int = HOP,
              n_mels: int = N_MELS) -> torch.Tensor:
    """[..., samples] -> mel power spectrogram [..., n_mels, frames] (centred, zero-padded frames)."""
    key = (sr, n_fft, n_mels)
    if key not in _FILTERS:
        _FILTERS[key] = mel_filterbank(sr, n_fft, n_mels)
    spec = torch.stft(x.float(), n_fft, hop, window=torch.hann_window(n_fft), center=True, pad_mode="constant",
                      return_complex=True).abs().pow(2)
    return _FILTERS[key] @ spec


def log_mel(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Waveform at SAMPLE_RATE -> [N_MELS, frames] log-mel features, roughly zero-mean unit-scale."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return (torch.log10(mel_power(x) + 1e-6) + 4.0) / 4.0


def frames_for(samples: int) -> int:
    return samples // HOP + 1
