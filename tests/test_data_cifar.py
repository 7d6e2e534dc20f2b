"""CIFAR-10 binary batches, on small files the tests write in that exact layout: per record a
label byte, then 1024 red, 1024 green and 1024 blue bytes (32 x 32, row-major)."""

import numpy as np
import pytest

from conftest import assert_one_error_line, cli_in_process
from edgefa.shared.datasets import load_dataset
from edgefa.shared.datasets import CIFAR10_RECORD, load_cifar10_batches, load_cifar10_dir
from edgefa.errors import DataError


def write_batch(path, images: np.ndarray, labels: np.ndarray) -> None:
    """images [n, 32, 32, 3] uint8 (height, width, channel, as a picture is held) -> the binary layout."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32)      # channel by channel
    path.write_bytes(np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).tobytes())


@pytest.fixture
def cifar_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    batches = {}
    for name, n in (("data_batch_1.bin", 7), ("data_batch_2.bin", 5), ("test_batch.bin", 4)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_batch(folder / name, images, labels)
        batches[name] = (images, labels)
    return folder, batches


def test_train_and_test_splits_read_back_pixel_for_pixel(cifar_dir):
    folder, batches = cifar_dir
    train = load_cifar10_dir(folder)
    assert (len(train), train.X.shape[1], train.n_classes, train.name) == (12, 3072, 10, "cifar10")
    images, labels = batches["data_batch_1.bin"]
    np.testing.assert_array_equal(train.y[:7], labels)
    # the red plane of image 3, pixel (row 5, column 9), then the blue plane's same pixel
    assert train.X[3, 5 * 32 + 9] == images[3, 5, 9, 0]
    assert train.X[3, 2 * 1024 + 5 * 32 + 9] == images[3, 5, 9, 2]
    np.testing.assert_array_equal(train.X[7:].reshape(5, 3, 32, 32).transpose(0, 2, 3, 1),
                                  batches["data_batch_2.bin"][0])
    test = load_cifar10_dir(folder, "test")
    np.testing.assert_array_equal(test.y, batches["test_batch.bin"][1])
    assert len(load_dataset(f"cifar10:{folder}")) == 12


def test_bad_cifar_files_name_the_problem(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    cut = tmp_path / "cut.bin"
    cut.write_bytes((folder / "test_batch.bin").read_bytes()[:-1])
    with pytest.raises(DataError, match=rf"cut.bin: {4 * CIFAR10_RECORD - 1} bytes is not a whole number"):
        load_cifar10_batches([cut])
    bad_label = tmp_path / "bad_label.bin"
    raw = bytearray((folder / "test_batch.bin").read_bytes())
    raw[2 * CIFAR10_RECORD] = 12
    bad_label.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="bad_label.bin: record 2 has label 12"):
        load_cifar10_batches([bad_label])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CIFAR-10 train batch"):
        load_cifar10_dir(tmp_path / "empty")
    with pytest.raises(DataError, match="split"):
        load_cifar10_dir(folder, "validation")


def test_training_on_a_cifar_folder_from_the_cli_and_a_bad_one(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    ok = cli_in_process("train", "--dataset", f"cifar10:{folder}", "--hidden", "16", "--epochs", "1",
                        "--batch-size", "4", "--device", "cpu", "--out", tmp_path / "run")
    assert ok.returncode == 0, ok.stderr
    assert "cifar10" in ok.stdout and (tmp_path / "run" / "checkpoint.pt").is_file()
    (folder / "data_batch_1.bin").write_bytes(b"\x00" * 100)
    assert_one_error_line(cli_in_process("train", "--dataset", f"cifar10:{folder}", "--out", tmp_path / "r2"),
                          "data_batch_1.bin: 100 bytes is not a whole number")
