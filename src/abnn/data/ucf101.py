"""UCF-101 for video ABNN, and the 13 real action clips of ``shared/data`` (its README s. 3).

UCF-101: Soomro, Zamir and Shah, "UCF101: A Dataset of 101 Human Actions Classes From Videos in
The Wild", CRCV-TR-12-01, 2012.  Read in its official layout::

    <root>/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi   ... 101 class folders (UCF101.rar)
    <root>/ucfTrainTestlist/classInd.txt                 "1 ApplyEyeMakeup" ...
    <root>/ucfTrainTestlist/trainlist0{1,2,3}.txt        "ApplyEyeMakeup/v_..._c01.avi 1"
    <root>/ucfTrainTestlist/testlist0{1,2,3}.txt         "ApplyEyeMakeup/v_..._c01.avi"

(``<root>/UCF-101/<class folders>`` next to ``<root>/ucfTrainTestlist`` is accepted too.)
Each video becomes ``n_frames`` (40) frames sampled uniformly over its whole length, each
resized (short side to ``size`` = 112, bilinear) and centre-cropped to ``size x size``: a uint8
clip ``(3, T, size, size)``; batches are float [0, 1] ``(B, 3, T, size, size)``, the input of
the video models (which normalise inside).  Decoded clips are cached on disk (one ``.npy`` per
video), so an epoch does not decode every video again.  A video that cannot be decoded is
skipped with a warning and recorded in ``dataset.skipped``; it never stops an epoch.

Labels are 0-based (classInd's 1-based index minus one).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import AbnnError, DataNotFoundError
from ..files import atomic_write
from .roots import read_npz, resolve_data_root

__all__ = [
    "UCF101_ENV_VAR", "SHARED_VIDEO_LABELS", "VideoDecodeError", "resolve_ucf101_root", "ucf101_classes",
    "parse_split", "sample_indices", "decode_clip", "UCF101Clips", "collate_clips",
    "load_shared_clips", "decode_shared_videos",
]

UCF101_ENV_VAR = "ABNN_UCF101_ROOT"
LISTS_DIR = "ucfTrainTestlist"
_CACHE_VERSION = 1  # bump when the decoding/sampling changes: old cache entries are then ignored

#: Labels of the 13 clips of ``<data_root>/video/`` (shared data README, s. 3).
SHARED_VIDEO_LABELS: dict[str, str] = {
    "v_Basketball_g01_c01.avi": "Basketball",
    "v_SoccerJuggling_g23_c01.avi": "SoccerJuggling",
    "mmaction2_test.avi": "ApplyEyeMakeup",
    "RATRACE_wave_f_nm_np1_fr_goo_37.avi": "wave",
    "SchoolRulesHowTheyHelpUs_wave_f_nm_np1_ba_med_0.avi": "wave",
    "TrumanShow_wave_f_nm_np1_fr_med_26.avi": "wave",
    "hmdb51_Turnk_r_Pippi_Michel_cartwheel_f_cm_np2_le_med_6.avi": "cartwheel",
    "abseiling_k400.mp4": "abseiling",
    "mmaction2_demo.mp4": "arm wrestling",
    "mmaction2_test.mp4": "cleaning pool",
    "R6llTwEh07w.mp4": "using segway",
    "SOX5yA1l24A.mp4": "using segway",
    "WUzgd7C1pWA.mp4": "using segway",
}


class VideoDecodeError(AbnnError):
    """A video file cannot be decoded (corrupt, truncated, not a video, no video stream)."""


# -- layout and splits -----------------------------------------------------------------------------

def _layout_help(data_root: Path | None) -> str:
    where = f"{data_root}/UCF-101" if data_root is not None else "<data_root>/UCF-101"
    return (
        "Expected the official UCF-101 layout: <root>/<Class>/v_<Class>_gXX_cYY.avi (101 class folders, "
        "from UCF101.rar) and <root>/ucfTrainTestlist/{classInd.txt, trainlist01..03.txt, testlist01..03.txt} "
        "(from UCF101TrainTestSplits-RecognitionTask.zip); <root>/UCF-101/<Class>/ beside "
        f"<root>/ucfTrainTestlist is accepted too. Pass root=DIR, set {UCF101_ENV_VAR}=DIR, or put it at {where}"
    )


def resolve_ucf101_root(root: str | os.PathLike | None = None,
                        data_root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(videos_dir, lists_dir)`` of UCF-101: from ``root`` if given, else ``$ABNN_UCF101_ROOT``,
    else ``<data_root>/UCF-101`` (or ``ucf101``, ``UCF101``).  Raises one
    :class:`~abnn.errors.DataNotFoundError` describing the expected layout when none fits."""
    droot = resolve_data_root(data_root)
    if root not in (None, ""):
        candidates = [Path(root).expanduser()]
    else:
        candidates = []
        if os.environ.get(UCF101_ENV_VAR):
            candidates.append(Path(os.environ[UCF101_ENV_VAR]).expanduser())
        if droot is not None:
            candidates += [droot / n for n in ("UCF-101", "ucf101", "UCF101")]
    for cand in candidates:
        lists = next((d for d in (cand / LISTS_DIR, cand.parent / LISTS_DIR) if (d / "classInd.txt").is_file()), None)
        videos = cand / "UCF-101" if (cand / "UCF-101").is_dir() else cand
        if lists is not None and videos.is_dir():
            return videos, lists
    looked = ", ".join(str(c) for c in candidates) or "nowhere (no root given, no data root)"
    raise DataNotFoundError(f"UCF-101 not found (looked in: {looked}). " + _layout_help(droot))


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataNotFoundError(f"UCF-101 split file {path} not found. " + _layout_help(None))
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [line.strip() for line in fh if line.strip()]


def ucf101_classes(root: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Class names in ``classInd.txt`` order (index = 0-based label)."""
    _, lists = resolve_ucf101_root(root)
    pairs = []
    for line in _read_lines(lists / "classInd.txt"):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise AbnnError(f"{lists / 'classInd.txt'}: malformed line {line!r} (expected 'INDEX NAME')")
        pairs.append((int(parts[0]), parts[1]))
    pairs.sort()
    if [i for i, _ in pairs] != list(range(1, len(pairs) + 1)):
        raise AbnnError(f"{lists / 'classInd.txt'}: class indices are not 1..{len(pairs)}")
    return tuple(name for _, name in pairs)


def parse_split(root: str | os.PathLike | None, split: int = 1, train: bool = True) -> list[tuple[str, int]]:
    """``[(relative_path, label)]`` of official split ``split`` (1, 2 or 3), train or test list.

    ``trainlist0N.txt`` lines are ``"Class/v_Class_gXX_cYY.avi LABEL"`` (LABEL 1-based, checked
    against the folder); ``testlist0N.txt`` lines carry only the path, the label comes from
    ``classInd.txt`` via the folder name (matched case-insensitively: the official lists write
    ``HandStandPushups`` for the class ``HandstandPushups``).  Returned labels are 0-based.
    """
    if split not in (1, 2, 3):
        raise AbnnError(f"UCF-101 split must be 1, 2 or 3, got {split!r}")
    _, lists = resolve_ucf101_root(root)
    classes = ucf101_classes(root)
    by_name = {c.lower(): i for i, c in enumerate(classes)}
    fname = lists / f"{'train' if train else 'test'}list0{split}.txt"
    out: list[tuple[str, int]] = []
    for line in _read_lines(fname):
        parts = line.split()
        rel = parts[0].replace("\\", "/")
        folder = rel.split("/", 1)[0].lower()
        if folder not in by_name:
            raise AbnnError(f"{fname}: {rel!r} is in no class of classInd.txt")
        label = by_name[folder]
        if len(parts) > 1:
            if not parts[1].isdigit() or int(parts[1]) - 1 != label:
                raise AbnnError(f"{fname}: label {parts[1]!r} of {rel!r} disagrees with classInd.txt ({label + 1})")
        out.append((rel, label))
    return out


# -- decoding ----------------------------------------------------------------------------------

def sample_indices(num_frames: int, n: int = 40) -> list[int]:
    """``n`` frame indices spread uniformly over a video of ``num_frames`` frames (the centre of
    each of ``n`` equal segments); shorter videos repeat frames."""
    if num_frames < 1 or n < 1:
        raise ValueError(f"need num_frames >= 1 and n >= 1, got {num_frames}, {n}")
    idx = ((np.arange(n) + 0.5) * (num_frames / n)).astype(np.int64)
    return np.minimum(idx, num_frames - 1).tolist()


def _import_av():
    try:
        import av
    except ImportError:
        raise AbnnError("decoding videos needs PyAV: pip install av (or pip install 'abnn[video]')") from None
    return av


def _decode_frames(path: Path, size: int) -> np.ndarray:
    """All frames of ``path``, short side resized to ``size`` (bilinear), as (N, h, w, 3) uint8."""
    av = _import_av()
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            shape: tuple[int, int] | None = None
            for frame in container.decode(stream):
                if shape is None:
                    w, h = frame.width, frame.height
                    if w < 1 or h < 1:
                        raise VideoDecodeError(f"{path}: frame size {w}x{h}")
                    scale = size / min(w, h)
                    shape = (max(size, round(w * scale)), max(size, round(h * scale)))
                # threads=1: swscale's default thread pool costs ~20x on small frames
                frames.append(frame.to_ndarray(format="rgb24", width=shape[0], height=shape[1],
                                               interpolation="BILINEAR", threads=1))
    except VideoDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - av.error.*, UnicodeDecodeError, OSError: one message
        msg = str(exc).splitlines()[0] if str(exc) else ""
        got = f" after {len(frames)} frames (truncated?)" if frames else ""
        raise VideoDecodeError(f"{path}: cannot decode{got}: {type(exc).__name__}: {msg}") from None
    if not frames:
        raise VideoDecodeError(f"{path}: no decodable frames")
    return np.stack(frames)


def decode_clip(path: str | os.PathLike, n_frames: int = 40, size: int = 112) -> Tensor:
    """Decode ``path`` with PyAV into a uint8 clip ``(3, n_frames, size, size)``: ``n_frames``
    frames uniformly over the video (:func:`sample_indices`), short side resized to ``size``,
    centre crop.  Raises :class:`VideoDecodeError` for an undecodable or truncated file."""
    frames = _decode_frames(Path(path), size)
    _, h, w, _ = frames.shape
    top, left = (h - size) // 2, (w - size) // 2
    sel = frames[sample_indices(len(frames), n_frames), top:top + size, left:left + size]
    return torch.from_numpy(np.ascontiguousarray(sel.transpose(3, 0, 1, 2)))


# -- the dataset -------------------------------------------------------------------------------

def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "abnn" / "ucf101_clips"


class UCF101Clips(Dataset):
    """UCF-101 clips of one official split, decoded once and cached on disk.

    Args:
        root: UCF-101 root (see the module docstring); default ``$ABNN_UCF101_ROOT`` or
            ``<data_root>/UCF-101``.
        split: official split 1, 2 or 3.
        train: the train list (else the test list).
        n_frames, size: frames per clip and spatial size (40 and 112 in the paper).
        cache_dir: where decoded clips go (default ``~/.cache/abnn/ucf101_clips``); one ``.npy``
            per video under ``<cache_dir>/t{n_frames}_s{size}_v{version}/<relative path>``, and a
            ``.failed`` marker with the reason for a video that could not be decoded.
        cache: ``False`` decodes every time (nothing written).
        data_root: data root used to find ``<data_root>/UCF-101``.

    ``dataset[i]`` is ``(uint8 clip (3, T, size, size), label)``, or ``None`` for a skipped
    video (``collate_clips`` drops those in a ``DataLoader``); :meth:`batches` yields float
    [0, 1] batches and skips them itself.  ``skipped`` lists ``(relative_path, reason)``.
    With ``DataLoader`` worker processes, failures are recorded in the workers; the main
    process learns them from the cache markers (call :meth:`prepare` once before training).
    """

    def __init__(self, root: str | os.PathLike | None = None, split: int = 1, train: bool = True, *,
                 n_frames: int = 40, size: int = 112, cache_dir: str | os.PathLike | None = None,
                 cache: bool = True, data_root: str | os.PathLike | None = None) -> None:
        self.videos_dir, self.lists_dir = resolve_ucf101_root(root, data_root)
        self.root = self.videos_dir
        self.split = split
        self.train = train
        self.n_frames = n_frames
        self.size = size
        self.classes = ucf101_classes(root if root not in (None, "") else self.videos_dir)
        self.samples = parse_split(root if root not in (None, "") else self.videos_dir, split, train)
        self.num_classes = len(self.classes)
        self.cache = cache
        base = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
        self.cache_dir = base / f"t{n_frames}_s{size}_v{_CACHE_VERSION}"
        self.skipped: list[tuple[str, str]] = []
        self._bad: set[int] = set()
        self._folders = {p.name.lower(): p.name for p in self.videos_dir.iterdir() if p.is_dir()}

    @property
    def name(self) -> str:
        return f"ucf101-split{self.split}-{'train' if self.train else 'test'}"

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, n: int | None) -> "UCF101Clips":
        """``n`` videos spread evenly over the list (the lists are grouped by class, so a prefix
        would hold only a few classes); ``None`` or ``n >= len`` gives the dataset itself."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise AbnnError(f"asked for {n} videos of {self.name}; need at least 1")
        import copy

        sub = copy.copy(self)
        pick = torch.linspace(0, len(self) - 1, n).round().long().unique().tolist()
        sub.samples = [self.samples[i] for i in pick]
        sub.skipped, sub._bad = [], set()
        return sub

    def labels(self) -> Tensor:
        """All labels (int64), in sample order."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def video_path(self, i: int) -> Path:
        """The file of sample ``i`` (class folder matched case-insensitively)."""
        rel = self.samples[i][0]
        folder, _, rest = rel.partition("/")
        return self.videos_dir / self._folders.get(folder.lower(), folder) / rest

    def cache_path(self, i: int) -> Path:
        return self.cache_dir / (os.path.splitext(self.samples[i][0])[0] + ".npy")

    def _skip(self, i: int, reason: str) -> None:
        if i in self._bad:
            return
        self._bad.add(i)
        rel = self.samples[i][0]
        self.skipped.append((rel, reason))
        warnings.warn(f"UCF-101: skipping {rel}: {reason}", RuntimeWarning, stacklevel=3)

    def clip(self, i: int) -> Tensor | None:
        """The uint8 clip of sample ``i`` from the cache, decoding (and caching) it on first use;
        ``None`` (with a warning, recorded in ``skipped``) if it cannot be decoded."""
        if i in self._bad:
            return None
        cpath = self.cache_path(i)
        marker = cpath.with_suffix(".failed")
        shape = (3, self.n_frames, self.size, self.size)
        if self.cache:
            if cpath.is_file():
                try:
                    arr = np.load(cpath)
                    if arr.shape == shape and arr.dtype == np.uint8:
                        return torch.from_numpy(arr)
                except Exception:  # noqa: BLE001 - a damaged cache entry is decoded again
                    pass
            if marker.is_file():
                self._skip(i, marker.read_text(errors="replace").strip() or "failed to decode earlier")
                return None
        path = self.video_path(i)
        try:
            if not path.is_file():
                raise VideoDecodeError(f"{path}: file not found")
            clip = decode_clip(path, self.n_frames, self.size)
        except Exception as exc:  # noqa: BLE001 - never crash mid-epoch
            reason = str(exc) or type(exc).__name__
            if self.cache:
                _atomic_write_text(marker, reason)
            self._skip(i, reason)
            return None
        if self.cache:
            _atomic_save_npy(cpath, clip.numpy())
        return clip

    def __getitem__(self, i: int) -> tuple[Tensor, int] | None:
        clip = self.clip(i)
        return None if clip is None else (clip, self.samples[i][1])

    def prepare(self, workers: int = 1) -> int:
        """Decode and cache every video now (threads: PyAV decodes outside the GIL); returns how
        many clips are usable.  Failures end up in ``skipped``."""
        idx = range(len(self))
        if workers <= 1:
            ok = sum(self.clip(i) is not None for i in idx)
        else:
            with ThreadPoolExecutor(workers) as ex:
                ok = sum(c is not None for c in ex.map(self.clip, idx))
        return ok

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                drop_last: bool = False, workers: int = 0,
                device: torch.device | str = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
        """Float [0, 1] clips ``(B, 3, T, size, size)`` and int64 labels; skipped videos are left
        out (a batch may then be smaller; an empty batch is not yielded).  ``shuffle`` uses a
        permutation seeded by ``(seed, epoch)``; ``workers`` threads load/decode ahead."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        else:
            order = list(range(n))
        starts = range(0, n, batch_size)
        ex = ThreadPoolExecutor(workers) if workers > 0 else None
        try:
            for s in starts:
                chunk = order[s:s + batch_size]
                if drop_last and len(chunk) < batch_size:
                    break
                clips = list(ex.map(self.clip, chunk)) if ex is not None else [self.clip(i) for i in chunk]
                keep = [(c, self.samples[i][1]) for c, i in zip(clips, chunk) if c is not None]
                if not keep:
                    continue
                x = torch.stack([c for c, _ in keep]).to(device, non_blocking=True).float().div_(255)
                y = torch.tensor([label for _, label in keep], dtype=torch.int64, device=device)
                yield x, y
        finally:
            if ex is not None:
                ex.shutdown(wait=True)


def collate_clips(batch: Sequence[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor] | None:
    """``DataLoader`` collate for :class:`UCF101Clips`: drops skipped (``None``) samples, stacks
    uint8 clips into float [0, 1] ``(B, 3, T, H, W)``; ``None`` if the whole batch was skipped."""
    keep = [b for b in batch if b is not None]
    if not keep:
        return None
    x = torch.stack([c for c, _ in keep]).float().div_(255)
    return x, torch.tensor([label for _, label in keep], dtype=torch.int64)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr))


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


# -- the shared real clips ---------------------------------------------------------------------

def load_shared_clips(data_root: str | os.PathLike | None = None) -> tuple[Tensor, list[str]]:
    """The 13 pre-decoded real clips of ``<data_root>/video_clips_112.npz``: uint8
    ``(13, 3, 32, 112, 112)`` (32 consecutive frames from the middle of each clip) and their
    label names (UCF-101, HMDB51 and Kinetics-400 classes: for smoke tests, not accuracy)."""
    root = resolve_data_root(data_root)
    path = root / "video_clips_112.npz" if root is not None else None
    if path is None or not path.is_file():
        raise DataNotFoundError(
            f"video_clips_112.npz not found in {root if root is not None else 'no data root'}: pass "
            "--data-root DIR or set ABNN_DATA_ROOT=DIR to the shared data folder"
        )
    clips, label = read_npz(path, "clips", "label")
    labels = [str(s) for s in label]
    return torch.from_numpy(np.ascontiguousarray(clips.transpose(0, 4, 1, 2, 3))), labels


def decode_shared_videos(data_root: str | os.PathLike | None = None, *, n_frames: int = 40, size: int = 112,
                         files: Sequence[str] | None = None) -> tuple[Tensor, list[str], list[str]]:
    """Decode the raw clips of ``<data_root>/video/`` as the UCF-101 pipeline does
    (:func:`decode_clip`): uint8 ``(N, 3, n_frames, size, size)``, labels, file names."""
    root = resolve_data_root(data_root)
    vdir = root / "video" if root is not None else None
    if vdir is None or not vdir.is_dir():
        raise DataNotFoundError(
            f"video/ not found in {root if root is not None else 'no data root'}: pass --data-root DIR "
            "or set ABNN_DATA_ROOT=DIR to the shared data folder"
        )
    names = list(files) if files is not None else sorted(SHARED_VIDEO_LABELS)
    missing = [n for n in names if not (vdir / n).is_file()]
    if missing:
        raise DataNotFoundError(f"{vdir}: missing {', '.join(missing)}")
    clips = torch.stack([decode_clip(vdir / n, n_frames, size) for n in names])
    return clips, [SHARED_VIDEO_LABELS.get(n, Path(n).stem) for n in names], names
