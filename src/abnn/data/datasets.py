"""CIFAR-10 and Tiny-ImageNet-32 from the ``.npz`` files of ``shared/data`` (see its README).

Images stay uint8 (N, C, H, W) in memory (CIFAR-10 train: 60 MB); batches become float [0, 1]
on the fly.  Where the CIFAR-10 npz files are absent (and for the paper's full CIFAR-10), torchvision's
python version of CIFAR-10 is read from disk (``cifar-10-batches-py``) or downloaded.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import AbnnError, DataNotFoundError
from .roots import ENV_VAR, read_npz, require_files, resolve_data_root
from .ucf101 import UCF101Clips, load_shared_clips, sample_indices

@dataclass
class ImageData:
    """A split held in memory: ``x`` uint8 (N, C, H, W) images or (N, C, T, H, W) clips, ``y`` int64 (N,)."""

    x: Tensor
    y: Tensor
    num_classes: int
    name: str
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.x) == 0:
            raise AbnnError(f"dataset {self.name} is empty")
        if self.x.dtype != torch.uint8 or self.x.dim() not in (4, 5):
            raise AbnnError(f"dataset {self.name}: expected uint8 images (N, C, H, W) or clips (N, C, T, H, W), "
                            f"got {self.x.dtype} {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise AbnnError(f"dataset {self.name}: {len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, n: int | None) -> "ImageData":
        """The first ``n`` samples (files are stored in a seeded random order: prefixes are balanced)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise AbnnError(f"asked for {n} samples of {self.name}; need at least 1")
        return ImageData(self.x[:n], self.y[:n], self.num_classes, self.name, self.class_names)

    def float_batch(self, idx: Tensor | slice) -> tuple[Tensor, Tensor]:
        return self.x[idx].float().div_(255), self.y[idx]


def _nhwc_to_tensor(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def load_cifar10(split: str = "train", data_root: str | os.PathLike | None = None, *,
                 include_jpeg: bool = False, full: bool = False,
                 download_dir: str | os.PathLike | None = None) -> ImageData:
    """CIFAR-10 from ``cifar10.npz`` (+ ``cifar10_train_extra.npz`` for train: 20,000 lossless
    images; + the 30,000 JPEG-q75 images of ``cifar10_train_rest_jpeg.npz`` only with
    ``include_jpeg``).  ``split="test"`` is the full 10,000-image test set.

    Without the npz files, reads torchvision's python version (``cifar-10-batches-py``, see
    :func:`find_cifar10_python`) or downloads it into ``download_dir`` (default
    ``~/.cache/abnn/cifar10``); if that fails too, one error names the options.  ``full=True``
    always uses the complete 50k/10k CIFAR-10 of that folder (the paper preset), offline when
    the folder is on disk.
    """
    if split not in ("train", "test"):
        raise AbnnError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    root = resolve_data_root(data_root)
    if full:
        return _full_cifar10(split, root, download_dir)
    files = ["cifar10.npz"] + (["cifar10_train_extra.npz"] if split == "train" else [])
    if include_jpeg and split == "train":
        files.append("cifar10_train_rest_jpeg.npz")
    if root is not None and all((root / f).is_file() for f in files):
        part = ("x_test", "y_test") if split == "test" else ("x_train", "y_train")
        class_names, x, y = read_npz(root / "cifar10.npz", "class_names", *part)
        names = tuple(str(s) for s in class_names)
        if split == "test":
            return ImageData(_nhwc_to_tensor(x), torch.from_numpy(y), 10, "cifar10-test", names)
        xs, ys = [x], [y]
        x_extra, y_extra = read_npz(root / "cifar10_train_extra.npz", "x", "y")
        xs.append(x_extra); ys.append(y_extra)
        if include_jpeg:
            xs_j, ys_j = _decode_jpeg_npz(root / "cifar10_train_rest_jpeg.npz")
            xs.append(xs_j); ys.append(ys_j)
        return ImageData(_nhwc_to_tensor(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), 10,
                         "cifar10-train" + ("+jpeg" if include_jpeg else ""), names)
    folder = find_cifar10_python(root, download_dir)
    if folder is not None:
        return read_cifar10_python(folder, split)
    try:
        return read_cifar10_python(_download_cifar10(download_dir), split)
    except DataNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001
        where = f"data root {root}" if root is not None else f"no data root (--data-root or {ENV_VAR})"
        raise DataNotFoundError(
            f"CIFAR-10 not available: {', '.join(files)} not found ({where}), no {CIFAR10_PY_DIR} folder, and the "
            f"torchvision download failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Fix: point --data-root/{ENV_VAR} at a folder with the npz files, or run once with network access"
        ) from None


def _decode_jpeg_npz(path: Path, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` (default all) images of ``cifar10_train_rest_jpeg.npz``, decoded."""
    from PIL import Image

    b, o, y = read_npz(path, "jpeg_bytes", "jpeg_offsets", "y")
    y = y[:n]
    x = np.stack([np.asarray(Image.open(io.BytesIO(b[o[i]:o[i + 1]].tobytes())).convert("RGB")) for i in range(len(y))])
    return x, y


def load_cifar10_heldout(n: int, data_root: str | os.PathLike | None = None) -> ImageData | None:
    """The first ``n`` of the 30,000 JPEG-q75 CIFAR-10 training images: training images that a
    run trains on only with ``include_jpeg``, so held out from every other run (for a per-epoch
    robust accuracy, never for reported accuracies: JPEG shifts the distribution).  ``None``
    when the file is absent."""
    root = resolve_data_root(data_root)
    path = root / "cifar10_train_rest_jpeg.npz" if root is not None else None
    if path is None or not path.is_file():
        return None
    x, y = _decode_jpeg_npz(path, n)
    return ImageData(_nhwc_to_tensor(x), torch.from_numpy(y), 10, "cifar10-train-heldout-jpeg")


#: torchvision's CIFAR-10 "python version" folder (the extracted cifar-10-python.tar.gz)
CIFAR10_PY_DIR = "cifar-10-batches-py"
_CIFAR10_PY_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def _default_cifar10_download_dir() -> Path:
    return Path.home() / ".cache" / "abnn" / "cifar10"


def cifar10_python_candidates(data_root: str | os.PathLike | None = None,
                              download_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the full CIFAR-10 (torchvision's python version) is looked for, in order:
    ``<data_root>/cifar-10-batches-py``, then ``<download_dir>/cifar-10-batches-py`` (where
    torchvision's download puts it; default ``~/.cache/abnn/cifar10``)."""
    root = resolve_data_root(data_root)
    dl = Path(download_dir).expanduser() if download_dir is not None else _default_cifar10_download_dir()
    return ([root / CIFAR10_PY_DIR] if root is not None else []) + [dl / CIFAR10_PY_DIR]


def find_cifar10_python(data_root: str | os.PathLike | None = None,
                        download_dir: str | os.PathLike | None = None) -> Path | None:
    """The first complete ``cifar-10-batches-py`` folder of :func:`cifar10_python_candidates`
    (all of data_batch_1..5, test_batch, batches.meta), else ``None``.  Reads nothing else."""
    need = (*_CIFAR10_PY_FILES["train"], *_CIFAR10_PY_FILES["test"], "batches.meta")
    return next((d for d in cifar10_python_candidates(data_root, download_dir)
                 if all((d / f).is_file() for f in need)), None)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's batch files and nothing else: dicts, lists, str/bytes and ints (pickle
    opcodes, no imports) plus the reconstruction of numpy arrays (``_reconstruct``, ``ndarray``,
    ``dtype``; ``_codecs.encode`` is how protocol 2 writes Python 3 bytes); any other global (a
    pickle that would run code) is refused."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch file")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own, whichever module it lives in
        return {"ndarray": np.ndarray, "dtype": np.dtype, "encode": codecs.encode}[name]


def _unpickle_cifar(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _CifarUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - refused globals, truncation, OS errors: one line
        msg = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        raise AbnnError(f"cannot read CIFAR-10 batch file {path}: {msg} (not torchvision's python version of "
                        "CIFAR-10? extract cifar-10-python.tar.gz again)") from None
    if not isinstance(obj, dict):
        raise AbnnError(f"{path} holds {type(obj).__name__}, not a CIFAR-10 batch dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_cifar10_python(folder: str | os.PathLike, split: str) -> ImageData:
    """CIFAR-10 ``split`` (train: data_batch_1..5; test: test_batch) from torchvision's python
    version folder (``cifar-10-batches-py``), read without network and with a restricted unpickler."""
    folder = Path(folder)
    missing = [f for f in (*_CIFAR10_PY_FILES[split], "batches.meta") if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(f"{folder}: missing {', '.join(missing)} (expected torchvision's CIFAR-10 python "
                                "version: data_batch_1..5, test_batch, batches.meta)")
    xs, ys = [], []
    for f in _CIFAR10_PY_FILES[split]:
        entry = _unpickle_cifar(folder / f)
        try:
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry["labels"], dtype=np.int64))
        except (KeyError, ValueError, TypeError) as exc:
            raise AbnnError(f"{folder / f}: not a CIFAR-10 batch (needs 'data' N x 3072 uint8 and 'labels'): "
                            f"{type(exc).__name__}: {exc}") from None
    names = tuple(str(n) for n in _unpickle_cifar(folder / "batches.meta").get("label_names", ()))
    return ImageData(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), 10,
                     f"cifar10-{split}", names)


def _download_cifar10(download_dir: str | os.PathLike | None) -> Path:
    """torchvision's CIFAR-10 download (checked by its md5) into ``download_dir``; its folder."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    d = Path(download_dir).expanduser() if download_dir is not None else _default_cifar10_download_dir()
    download_and_extract_archive(CIFAR10.url, str(d), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    return d / CIFAR10_PY_DIR


def _full_cifar10(split: str, root: Path | None, download_dir: str | os.PathLike | None) -> ImageData:
    """The complete 50k/10k CIFAR-10 (the paper preset): a ``cifar-10-batches-py`` folder found
    on disk (:func:`find_cifar10_python`), else torchvision's download."""
    folder = find_cifar10_python(root, download_dir)
    if folder is not None:
        return read_cifar10_python(folder, split)
    try:
        return read_cifar10_python(_download_cifar10(download_dir), split)
    except Exception as exc:  # noqa: BLE001
        looked = " or ".join(str(c) for c in cifar10_python_candidates(root, download_dir))
        raise DataNotFoundError(
            f"the full CIFAR-10 (50k training images) is neither on disk ({looked}) nor downloadable "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Fix: extract "
            f"cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that {looked.split(' or ')[0]} "
            "holds data_batch_1..5, test_batch and batches.meta, or run once with network access"
        ) from None


def load_tinyimagenet32(split: str = "train", data_root: str | os.PathLike | None = None) -> ImageData:
    """Tiny-ImageNet-200 downsampled to 32x32 (``tinyimagenet32_{train,val}.npz``): the
    substitute's pretraining data, a dataset other than the CIFAR-10 target."""
    if split not in ("train", "val"):
        raise AbnnError(f"tinyimagenet32 split must be 'train' or 'val', got {split!r}")
    fname = f"tinyimagenet32_{split}.npz"
    root = require_files(resolve_data_root(data_root), [fname], "tinyimagenet32")
    x, y, class_names = read_npz(root / fname, "x", "y", "class_names")
    return ImageData(_nhwc_to_tensor(x), torch.from_numpy(y), 200, f"tinyimagenet32-{split}",
                     tuple(str(s) for s in class_names))


def load_clips13(split: str = "train", data_root: str | os.PathLike | None = None, *, frames: int = 8) -> ImageData:
    """The 13 real action clips of ``video_clips_112.npz`` as a tiny in-memory clip dataset for
    smoke runs of the video pipeline: ``frames`` frames sampled uniformly from each clip's 32,
    labels indexed over the sorted distinct label names (9 classes).  Train and test are the
    SAME 13 clips: accuracies on it mean nothing; it only exercises decoding, models, attacks."""
    if split not in ("train", "test"):
        raise AbnnError(f"clips13 split must be 'train' or 'test', got {split!r}")
    clips, labels = load_shared_clips(data_root)
    names = sorted(set(labels))
    idx = torch.tensor(sample_indices(clips.shape[2], frames))
    y = torch.tensor([names.index(l) for l in labels], dtype=torch.int64)
    return ImageData(clips[:, :, idx].contiguous(), y, len(names), f"clips13-{split}", tuple(names))


def load_ucf101(split: str = "train", data_root: str | os.PathLike | None = None, *, frames: int = 40,
                ucf_split: int = 1):
    """UCF-101 split ``ucf_split`` (official layout, see :mod:`abnn.data.ucf101`), 40 frames at
    112x112 per video, decoded once and cached on disk.  Not held in memory."""
    if split not in ("train", "test"):
        raise AbnnError(f"ucf101 split must be 'train' or 'test', got {split!r}")
    return UCF101Clips(split=ucf_split, train=split == "train", n_frames=frames, data_root=data_root)


DATASETS = {
    "cifar10": {"train": "train", "test": "test", "loader": load_cifar10, "num_classes": 10},
    "tinyimagenet32": {"train": "train", "test": "val", "loader": load_tinyimagenet32, "num_classes": 200},
    "clips13": {"train": "train", "test": "test", "loader": load_clips13, "num_classes": 9},
    "ucf101": {"train": "train", "test": "test", "loader": load_ucf101, "num_classes": 101},
}

#: one sample's shape per dataset (ABNN sizes its adaptive layers from it)
INPUT_SHAPES = {"cifar10": (3, 32, 32), "tinyimagenet32": (3, 32, 32), "clips13": (3, 8, 112, 112),
                "ucf101": (3, 40, 112, 112)}


def input_shape(name: str, *, frames: int | None = None) -> tuple[int, ...]:
    """One sample's shape of dataset ``name``; for clip datasets ``frames`` (if given) replaces
    the dataset's own frame count (40 for UCF-101, as in the paper)."""
    shape = INPUT_SHAPES[name]
    return shape if frames is None or len(shape) == 3 else (shape[0], frames, *shape[2:])


def load_dataset(name: str, split: str, data_root: str | os.PathLike | None = None, *, frames: int | None = None,
                 **kwargs) -> ImageData:
    """Load ``name`` (``cifar10``, ``tinyimagenet32``, ``clips13``, ``ucf101``), ``split`` in
    {``train``, ``test``} (``test`` is the validation set for tinyimagenet32).  ``frames``:
    frames per clip for the clip datasets (``None``: the dataset's own); images ignore it."""
    if name not in DATASETS:
        raise AbnnError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    if frames is not None and len(INPUT_SHAPES[name]) == 4:
        kwargs["frames"] = frames
    return spec["loader"](spec[split], data_root, **kwargs)
