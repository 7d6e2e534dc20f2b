"""MNIST-1D, generated offline by the mnist1d package: shapes, determinism, the `mnist1d[:N]` spec,
training from the CLI, and a BP MLP well above chance."""

import json
import random
import sys

import numpy as np
import pytest

from conftest import assert_one_error_line, cli_in_process
from edgefa.shared.datasets import load_dataset, load_mnist1d
from edgefa.errors import DataError

pytest.importorskip("mnist1d", reason="the mnist1d package (host extra) is not installed")


@pytest.fixture(scope="module")
def mnist1d_default():
    """The default data set (5000 samples, seed 42), generated once for this module (a few seconds)."""
    return load_mnist1d()


def test_default_dataset_shapes_dtypes_and_classes(mnist1d_default):
    ds = mnist1d_default
    assert (ds.name, ds.n_classes, ds.image_shape) == ("mnist1d", 10, None)
    assert ds.X.shape == (5000, 40) and ds.X.dtype == np.float32
    assert ds.y.shape == (5000,) and ds.y.dtype == np.int64
    assert np.isfinite(ds.X).all()
    # the package's 4000 train + 1000 test, concatenated: exactly 500 per class
    np.testing.assert_array_equal(np.bincount(ds.y, minlength=10), np.full(10, 500))
    # the package centres and scales the whole set
    assert abs(float(ds.X.mean())) < 1e-3 and abs(float(ds.X.std()) - 1.0) < 1e-3


def test_generation_is_deterministic_and_the_seed_matters():
    a, b = load_mnist1d(500), load_mnist1d(500)
    assert a.X.tobytes() == b.X.tobytes() and a.y.tobytes() == b.y.tobytes()
    c = load_mnist1d(500, seed=7)
    assert not np.array_equal(a.X, c.X)
    assert set(np.unique(c.y)) == set(range(10))


def test_generation_leaves_the_global_random_generators_alone():
    # the package reseeds numpy's and Python's global generators; the loader puts them back
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(3).tolist(), random.random())
    np.random.seed(123)
    random.seed(123)
    load_mnist1d(100)
    assert (np.random.rand(3).tolist(), random.random()) == expected


def test_the_spec_takes_a_sample_count():
    ds = load_dataset("mnist1d:500")
    assert ds.X.shape == (500, 40) and ds.name == "mnist1d"
    assert set(np.unique(ds.y)) == set(range(10))
    # not a multiple of 10: the package makes whole classes, the loader keeps exactly N rows
    assert len(load_dataset("mnist1d:105")) == 105


@pytest.mark.parametrize("spec, fragment", [
    ("mnist1d:abc", "'mnist1d:abc' must be an integer >= 100"),
    ("mnist1d:", "'mnist1d:' must be an integer >= 100"),
    ("mnist1d:-500", "'mnist1d:-500' must be an integer >= 100"),
    ("mnist1d:5", "'mnist1d:5' asks for 5 samples, at least 100"),
])
def test_bad_specs_are_one_line_data_errors(spec, fragment):
    with pytest.raises(DataError) as info:
        load_dataset(spec)
    message = str(info.value)
    assert "\n" not in message and message.startswith("mnist1d: ") and fragment in message, message


def test_bad_arguments_to_the_loader():
    with pytest.raises(DataError, match="integer >= 100"):
        load_mnist1d(99)
    with pytest.raises(DataError, match="seed"):
        load_mnist1d(100, seed=-1)


class _HideMnist1d:
    """A meta-path finder that makes `import mnist1d` fail as it does where the package is absent."""

    def find_spec(self, name, path=None, target=None):
        if name == "mnist1d" or name.startswith("mnist1d."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.mark.parametrize("how", ["absent", "blocked"])
def test_a_missing_package_is_one_line(monkeypatch, how):
    for name in [n for n in sys.modules if n == "mnist1d" or n.startswith("mnist1d.")]:
        monkeypatch.delitem(sys.modules, name)                 # put back after the test
    if how == "absent":
        monkeypatch.setattr(sys, "meta_path", [_HideMnist1d(), *sys.meta_path])
    else:
        monkeypatch.setitem(sys.modules, "mnist1d", None)      # `import mnist1d` now fails
    with pytest.raises(DataError) as info:
        load_dataset("mnist1d:100")
    assert str(info.value) == "mnist1d: the mnist1d package is not installed (pip install -e '.[host]')"


def test_training_on_mnist1d_from_the_cli_and_a_bad_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")           # small matrices: one torch thread (see below)
    ok = cli_in_process("train", "--dataset", "mnist1d", "--epochs", "2", "--hidden", "64", "--device", "cpu",
                        "--out", tmp_path / "run")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "mnist1d" in ok.stdout and (tmp_path / "run" / "checkpoint.pt").is_file()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["n_train"] + metrics["n_test"]) == ("mnist1d", 5000)
    assert_one_error_line(cli_in_process("train", "--dataset", "mnist1d:abc", "--out", tmp_path / "r2"),
                          "'mnist1d:abc' must be an integer >= 100")


def test_a_bp_mlp_learns_mnist1d_well_above_chance(mnist1d_default):
    """Chance is 10 %; the published BP MLP reaches ~68 % at convergence. 12 epochs of 100-100 BP
    on the default 5000 samples (3750 train / 1250 test) gave 0.567 when this test was written."""
    import torch

    from edgefa.training.trainer import TrainConfig, train

    # One thread: these matrices are small, and two threads on a busy 2-core machine were 5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(TrainConfig(method="bp", dataset="mnist1d", hidden=[100, 100], epochs=12, lr=0.01,
                                momentum=0.9, device="cpu"), data=mnist1d_default)
    finally:
        torch.set_num_threads(threads)
    assert run.metrics["dataset"] == "mnist1d"
    assert run.metrics["final_test_accuracy"] > 0.4, run.metrics["epochs"][-1]
