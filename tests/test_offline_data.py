"""The paper's full CIFAR-10 offline (issue 14): torchvision's python-version folder
(``cifar-10-batches-py``) is read from the data root without network, through a restricted
unpickler; without it and offline, one line names the folder."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from abnn.data import load_cifar10
from abnn.errors import AbnnError, DataNotFoundError
from standins import write_cifar10_python


def test_full_cifar10_is_read_from_the_python_folder(tmp_path, data_root, monkeypatch):
    import abnn.data.datasets as ds

    monkeypatch.setattr(ds, "_download_cifar10", lambda *a: pytest.fail("no download when the folder is on disk"))
    write_cifar10_python(tmp_path / "cifar-10-batches-py", data_root, per_batch=4, n_test=6)
    z = np.load(data_root / "cifar10.npz")
    train = load_cifar10("train", tmp_path, full=True)
    test = load_cifar10("test", tmp_path, full=True)
    assert len(train) == 20 and len(test) == 6 and train.class_names[0] == "airplane"
    assert np.array_equal(train.x.numpy(), z["x_train"][:20].transpose(0, 3, 1, 2))  # R, G, B planes -> NCHW
    assert np.array_equal(train.y.numpy(), z["y_train"][:20])
    assert np.array_equal(test.x.numpy(), z["x_test"][:6].transpose(0, 3, 1, 2))
    # without the npz files, the plain (not full) loader reads the same folder
    assert np.array_equal(load_cifar10("test", tmp_path).y.numpy(), z["y_test"][:6])


def test_pickle_that_would_run_code_is_refused(tmp_path, data_root):
    folder = write_cifar10_python(tmp_path / "cifar-10-batches-py", data_root, per_batch=2, n_test=2)

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": Evil(), "labels": [0]}, fh, protocol=2)
    with pytest.raises(AbnnError, match=r"test_batch: global (posix|os)\.system is not allowed"):
        load_cifar10("test", tmp_path, full=True)
    assert not (tmp_path / "pwned").exists()


def test_full_cifar10_absent_and_offline_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    import abnn.data.datasets as ds

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(ds, "_download_cifar10", offline)
    with pytest.raises(DataNotFoundError) as info:
        load_cifar10("train", tmp_path, full=True, download_dir=tmp_path / "dl")
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and str(tmp_path / "cifar-10-batches-py") in msg and "OSError" in msg
