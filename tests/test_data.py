"""Tests for edgefa.shared's data: loaders, validation of bad files, split, standardizer and sensor shift."""

import gzip
import struct

import numpy as np
import pytest

from edgefa.shared.datasets import (Dataset, Standardizer, load_dataset, load_digits, load_idx, load_mnist_dir, load_npz,
                                    save_npz, stratified_split)
from edgefa.shared.shift import SensorShift, SignalShift, device_data, device_shift, stretch_signals
from edgefa.errors import DataError


def make_dataset(counts=(30, 17, 8, 45), image_shape=(4, 5), seed=0) -> Dataset:
    """Unequal classes; column 0 holds each sample's original index so splits can be traced back."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    y = rng.permutation(y)
    d = image_shape[0] * image_shape[1]
    X = rng.uniform(0, 16, size=(y.size, d)).astype(np.float32)
    X[:, 0] = np.arange(y.size)
    return Dataset(X, y, len(counts), "synthetic", image_shape)


# --- digits -------------------------------------------------------------------------------------


def test_digits_loads_raw_images():
    pytest.importorskip("sklearn")
    ds = load_digits()
    assert ds.X.shape == (1797, 64) and len(ds) == 1797
    assert ds.X.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.n_classes == 10 and set(np.unique(ds.y)) == set(range(10))
    assert ds.name == "digits" and ds.image_shape == (8, 8)
    assert ds.X.min() == 0.0 and ds.X.max() == 16.0  # raw, not standardized


def test_dataset_subset_and_validation():
    ds = make_dataset()
    sub = ds.subset(np.array([3, 1]))
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.X[:, 0], [3, 1])
    np.testing.assert_array_equal(sub.y, ds.y[[3, 1]])
    assert (sub.n_classes, sub.name, sub.image_shape) == (ds.n_classes, ds.name, ds.image_shape)
    with pytest.raises(DataError):
        Dataset(np.zeros((3, 4)), np.zeros(2), 2, "bad")
    with pytest.raises(DataError):
        Dataset(np.zeros((3, 4)), np.zeros(3), 2, "bad", image_shape=(3, 3))


# --- stratified split -----------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete():
    ds = make_dataset()
    tr1, te1 = stratified_split(ds, 0.25, seed=7)
    tr2, te2 = stratified_split(ds, 0.25, seed=7)
    np.testing.assert_array_equal(te1.X[:, 0], te2.X[:, 0])
    np.testing.assert_array_equal(tr1.X[:, 0], tr2.X[:, 0])

    train_idx, test_idx = tr1.X[:, 0].astype(int), te1.X[:, 0].astype(int)
    assert not set(train_idx) & set(test_idx)
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(len(ds)))
    # Rows keep their labels and stay in original order.
    np.testing.assert_array_equal(te1.y, ds.y[test_idx])
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(test_idx) > 0)

    _, te3 = stratified_split(ds, 0.25, seed=8)
    assert not np.array_equal(te1.X[:, 0], te3.X[:, 0])


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_split_keeps_class_proportions(fraction):
    ds = make_dataset()
    _, test = stratified_split(ds, fraction, seed=0)
    for c in range(ds.n_classes):
        n_c = int(np.sum(ds.y == c))
        assert abs(int(np.sum(test.y == c)) - fraction * n_c) <= 1


def test_split_rejects_bad_fraction():
    ds = make_dataset()
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(DataError):
            stratified_split(ds, bad, seed=0)


# --- standardizer ---------------------------------------------------------------------------------


def test_standardizer_uses_global_scalars():
    rng = np.random.default_rng(0)
    # Columns with very different scales: per-column statistics would differ from the global ones.
    X = rng.normal(size=(200, 3)) * np.array([1.0, 10.0, 0.0]) + np.array([0.0, 5.0, 3.0])
    st = Standardizer.fit(X)
    assert isinstance(st.mean, float) and isinstance(st.std, float)
    assert st.mean == pytest.approx(X.mean()) and st.std == pytest.approx(X.std())
    Z = st.apply(X)
    assert Z.dtype == np.float32 and Z.shape == X.shape
    assert Z.mean() == pytest.approx(0.0, abs=1e-5) and Z.std() == pytest.approx(1.0, abs=1e-5)
    # The constant column is NOT blown up to inf/NaN: it is one finite value.
    assert np.all(np.isfinite(Z)) and np.ptp(Z[:, 2]) == 0


def test_standardizer_constant_input_and_round_trip():
    st = Standardizer.fit(np.full((5, 4), 2.0))
    assert st.std == 1.0 and st.mean == 2.0
    np.testing.assert_array_equal(st.apply(np.full((1, 4), 2.0)), 0.0)

    st = Standardizer.fit(np.arange(12.0).reshape(3, 4))
    again = Standardizer.from_dict(st.to_dict())
    assert again == st
    with pytest.raises(DataError):
        Standardizer.from_dict({"mean": 0.0})
    with pytest.raises(DataError):
        Standardizer.from_dict({"mean": 0.0, "std": 0.0})


# --- npz ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_shape", [(4, 5), None])
def test_npz_round_trip(tmp_path, image_shape):
    ds = make_dataset(image_shape=(4, 5))
    ds = Dataset(ds.X, ds.y, 6, ds.name, image_shape)  # n_classes beyond max(y)+1 must survive
    path = tmp_path / "data.npz"
    save_npz(path, ds)
    back = load_npz(path)
    np.testing.assert_array_equal(back.X, ds.X)
    np.testing.assert_array_equal(back.y, ds.y)
    assert back.X.dtype == np.float32 and back.y.dtype == np.int64
    assert back.n_classes == 6 and back.image_shape == image_shape and back.name == "data"


def test_npz_without_n_classes_flattens_and_counts(tmp_path):
    path = tmp_path / "plain.npz"
    X = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.savez(path, X=X, y=np.array([0, 4]))
    ds = load_npz(path)
    assert ds.X.shape == (2, 9) and ds.image_shape == (3, 3) and ds.n_classes == 5
    np.testing.assert_array_equal(ds.X[1], np.arange(9, 18))


def _write_object_array(path):
    np.savez(path, X=np.array([[1.0], "a"], dtype=object), y=np.array([0, 1]), allow_pickle=True)


def _write_garbage(path):
    path.write_bytes(b"this is not a zip file at all \x00\x01\x02" * 10)


def _write_npy(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros((3, 2)))


BAD_NPZ = {
    "nan": (lambda p: np.savez(p, X=np.array([[np.nan, 1.0], [np.inf, 0.0]]), y=[0, 1]), "2 non-finite"),
    "missing_y": (lambda p: np.savez(p, X=np.zeros((2, 2))), "missing array 'y'"),
    "missing_x": (lambda p: np.savez(p, y=np.zeros(2, dtype=int)), "missing array 'X'"),
    "length": (lambda p: np.savez(p, X=np.zeros((100, 2)), y=np.zeros(99, dtype=int)), "100 rows but y has 99"),
    "negative": (lambda p: np.savez(p, X=np.zeros((2, 2)), y=np.array([0, -1])), "integers >= 0"),
    "float_labels": (lambda p: np.savez(p, X=np.zeros((2, 2)), y=np.array([0.0, 1.5])), "integers >= 0"),
    "garbage": (_write_garbage, "not a readable .npz"),
    "object": (_write_object_array, "pickle"),
    "npy": (_write_npy, "not a readable .npz"),
    "x_1d": (lambda p: np.savez(p, X=np.zeros(3), y=np.zeros(3, dtype=int)), "X must have shape"),
    "n_classes_small": (
        lambda p: np.savez(p, X=np.zeros((2, 2)), y=np.array([0, 3]), n_classes=np.int64(2)),
        "n_classes is 2",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_npz_failures_raise_one_line_data_error(tmp_path, case):
    write, fragment = BAD_NPZ[case]
    path = tmp_path / f"bad_{case}.npz"
    write(path)
    with pytest.raises(DataError) as info:
        load_npz(path)
    message = str(info.value)
    assert message.startswith(f"bad_{case}.npz: ")
    assert fragment in message
    assert "\n" not in message


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="nowhere.npz"):
        load_npz(tmp_path / "nowhere.npz")


def test_npz_integral_float_labels_are_accepted(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, X=np.zeros((3, 2)), y=np.array([0.0, 2.0, 1.0]))
    np.testing.assert_array_equal(load_npz(path).y, [0, 2, 1])


# --- IDX ------------------------------------------------------------------------------------------


def idx_bytes(magic: int, dims, payload: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload


def write_idx_pair(directory, prefix, images, labels, gz=False):
    """Write MNIST-named IDX files for uint8 images (N, H, W) and labels (N,)."""
    n, h, w = images.shape
    img = idx_bytes(0x00000803, (n, h, w), images.astype(np.uint8).tobytes())
    lab = idx_bytes(0x00000801, (n,), labels.astype(np.uint8).tobytes())
    suffix = ".gz" if gz else ""
    img_path = directory / f"{prefix}-images-idx3-ubyte{suffix}"
    lab_path = directory / f"{prefix}-labels-idx1-ubyte{suffix}"
    img_path.write_bytes(gzip.compress(img) if gz else img)
    lab_path.write_bytes(gzip.compress(lab) if gz else lab)
    return img_path, lab_path


@pytest.fixture
def small_images():
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, size=(5, 3, 4), dtype=np.uint8), np.array([0, 1, 2, 1, 7], dtype=np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, small_images, gz):
    images, labels = small_images
    img_path, lab_path = write_idx_pair(tmp_path, "train", images, labels, gz=gz)
    ds = load_idx(img_path, lab_path)
    assert ds.X.shape == (5, 12) and ds.X.dtype == np.float32 and ds.image_shape == (3, 4)
    np.testing.assert_array_equal(ds.X.reshape(5, 3, 4), images)
    np.testing.assert_array_equal(ds.y, labels)
    assert ds.n_classes == 8 and ds.name == "idx"


def test_idx_bad_magic(tmp_path, small_images):
    images, labels = small_images
    img_path, lab_path = write_idx_pair(tmp_path, "train", images, labels)
    # Images and labels swapped: each has the other's magic number.
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: bad IDX magic 0x00000801"):
        load_idx(lab_path, img_path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_payload(tmp_path, small_images, gz):
    images, labels = small_images
    img_path, lab_path = write_idx_pair(tmp_path, "train", images, labels)
    raw = img_path.read_bytes()[:-3]
    img_path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: IDX images payload is 57 bytes"):
        load_idx(img_path, lab_path)


def test_idx_count_mismatch_and_missing(tmp_path, small_images):
    images, labels = small_images
    img_path, _ = write_idx_pair(tmp_path, "train", images, labels)
    _, lab_path = write_idx_pair(tmp_path, "t10k", images[:4], labels[:4])
    with pytest.raises(DataError, match="5 images but t10k-labels-idx1-ubyte has 4 labels"):
        load_idx(img_path, lab_path)
    with pytest.raises(DataError, match="no such file"):
        load_idx(tmp_path / "absent", lab_path)


def test_mnist_dir_finds_split_files(tmp_path, small_images):
    images, labels = small_images
    write_idx_pair(tmp_path, "train", images, labels, gz=True)
    write_idx_pair(tmp_path, "t10k", images[:2], labels[:2])
    assert len(load_mnist_dir(tmp_path)) == 5
    assert len(load_mnist_dir(tmp_path, "t10k")) == 2
    with pytest.raises(DataError, match="split"):
        load_mnist_dir(tmp_path, "test")
    with pytest.raises(DataError, match="not a directory"):
        load_mnist_dir(tmp_path / "no_such_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte"):
        load_mnist_dir(tmp_path / "empty")


# --- load_dataset ---------------------------------------------------------------------------------


def test_load_dataset_dispatch(tmp_path, small_images):
    ds = make_dataset()
    save_npz(tmp_path / "d.npz", ds)
    for spec in (f"npz:{tmp_path / 'd.npz'}", str(tmp_path / "d.npz")):
        np.testing.assert_array_equal(load_dataset(spec).X, ds.X)

    images, labels = small_images
    write_idx_pair(tmp_path, "train", images, labels)
    mnist = load_dataset(f"mnist:{tmp_path}")
    np.testing.assert_array_equal(mnist.y, labels)

    with pytest.raises(DataError) as info:
        load_dataset("cifar10")
    for form in ("digits", "npz:PATH", "mnist:DIR"):
        assert form in str(info.value)


def test_load_dataset_digits():
    pytest.importorskip("sklearn")
    assert load_dataset("digits").name == "digits"


# --- sensor shift ---------------------------------------------------------------------------------


def image_dataset(images: np.ndarray) -> Dataset:
    n, h, w = images.shape
    return Dataset(images.reshape(n, h * w), np.zeros(n, dtype=np.int64), 1, "img", (h, w))


@pytest.fixture
def random_images():
    return np.random.default_rng(1).uniform(1, 16, size=(3, 6, 6)).astype(np.float32)


def test_shift_right_moves_columns_and_zeros_the_first(random_images):
    out = SensorShift(dx=1).apply(image_dataset(random_images), seed=0)
    imgs = out.X.reshape(random_images.shape)
    np.testing.assert_array_equal(imgs[:, :, 1:], random_images[:, :, :-1])
    np.testing.assert_array_equal(imgs[:, :, 0], 0.0)
    assert out.image_shape == (6, 6) and out.X.dtype == np.float32


def test_shift_left_and_down(random_images):
    left = SensorShift(dx=-2).apply(image_dataset(random_images), 0).X.reshape(random_images.shape)
    np.testing.assert_array_equal(left[:, :, :-2], random_images[:, :, 2:])
    np.testing.assert_array_equal(left[:, :, -2:], 0.0)
    down = SensorShift(dx=0, dy=1).apply(image_dataset(random_images), 0).X.reshape(random_images.shape)
    np.testing.assert_array_equal(down[:, 1:, :], random_images[:, :-1, :])
    np.testing.assert_array_equal(down[:, 0, :], 0.0)


def test_rotation_by_zero_is_identity(random_images):
    from edgefa.shared.shift import rotate_images

    np.testing.assert_allclose(rotate_images(random_images, 0.0), random_images, atol=1e-6)
    out = SensorShift(dx=0, rotation_deg=0.0).apply(image_dataset(random_images), 0)
    np.testing.assert_array_equal(out.X, image_dataset(random_images).X)


@pytest.mark.parametrize("size", [5, 6])
def test_rotation_by_90_matches_rot90(size):
    images = np.random.default_rng(2).uniform(1, 16, size=(2, size, size)).astype(np.float32)
    ds = image_dataset(images)
    ccw = SensorShift(dx=0, rotation_deg=90.0).apply(ds, 0).X.reshape(images.shape)
    # Exact: a right angle must copy pixels, not blur them with cos(90 deg) = 6e-17 round-off.
    np.testing.assert_array_equal(ccw, np.rot90(images, k=1, axes=(1, 2)))
    cw = SensorShift(dx=0, rotation_deg=-90.0).apply(ds, 0).X.reshape(images.shape)
    np.testing.assert_array_equal(cw, np.rot90(images, k=-1, axes=(1, 2)))


def test_small_rotation_interpolates_and_keeps_centre():
    img = np.zeros((1, 5, 5), dtype=np.float32)
    img[0, 2, 2] = 10.0  # the centre pixel stays put under any rotation
    img[0, 2, 4] = 8.0
    out = SensorShift(dx=0, rotation_deg=20.0).apply(image_dataset(img), 0).X.reshape(5, 5)
    assert out[2, 2] == pytest.approx(10.0)
    # The off-centre pixel is smeared bilinearly: no value above the original, not a pure copy.
    assert out.max() <= 10.0 + 1e-5 and 0 < out[2, 4] < 8.0


def test_noise_is_deterministic_per_seed(random_images):
    shift = SensorShift(dx=0, noise_std=1.5)
    ds = image_dataset(random_images)
    a, b, c = shift.apply(ds, seed=5), shift.apply(ds, seed=5), shift.apply(ds, seed=6)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.X, c.X)
    assert np.std(a.X - ds.X) == pytest.approx(1.5, rel=0.3)


def test_gain_offset_then_clip(random_images):
    ds = image_dataset(random_images)
    out = SensorShift(dx=0, gain=2.0, offset=-1.0).apply(ds, 0)
    np.testing.assert_allclose(out.X, ds.X * 2.0 - 1.0, rtol=1e-6)
    clipped = SensorShift(dx=0, gain=2.0, offset=-1.0, clip=(0.0, 16.0)).apply(ds, 0)
    np.testing.assert_allclose(clipped.X, np.clip(ds.X * 2.0 - 1.0, 0, 16), rtol=1e-6)
    assert clipped.X.max() == 16.0
    # Input left untouched.
    np.testing.assert_array_equal(ds.X, image_dataset(random_images).X)


def test_shift_needs_images_and_describes_itself():
    flat = Dataset(np.zeros((2, 3)), np.zeros(2), 1, "flat")
    with pytest.raises(DataError, match="image_shape"):
        SensorShift().apply(flat, 0)
    assert SensorShift(dx=1, dy=0, gain=0.75, noise_std=1.5).describe() == "shift (1, 0) px, gain 0.75, noise 1.5"
    assert SensorShift(dx=0).describe() == "no shift"
    with pytest.raises(DataError):
        SensorShift(noise_std=-1.0)


# --- signal shift (1-D signals, e.g. MNIST-1D) ------------------------------------------------------


def signal_dataset(signals: np.ndarray) -> Dataset:
    return Dataset(signals.astype(np.float32), np.arange(len(signals)) % 2, 2, "sig", None)


@pytest.fixture
def random_signals():
    return np.random.default_rng(3).normal(size=(4, 12)).astype(np.float32)


def test_signal_delay_moves_samples_later_and_zeros_the_start(random_signals):
    later = SignalShift(delay=3).apply(signal_dataset(random_signals), 0).X
    np.testing.assert_array_equal(later[:, 3:], random_signals[:, :-3])
    np.testing.assert_array_equal(later[:, :3], 0.0)
    earlier = SignalShift(delay=-2).apply(signal_dataset(random_signals), 0).X
    np.testing.assert_array_equal(earlier[:, :-2], random_signals[:, 2:])
    np.testing.assert_array_equal(earlier[:, -2:], 0.0)


def test_stretch_is_linear_interpolation_about_the_centre():
    ramp = np.arange(1, 10, dtype=np.float64)[None, :]       # value i + 1 at sample i, centre sample 4
    np.testing.assert_allclose(stretch_signals(ramp, 1.0), ramp)
    # twice as fast: sample i reads sample 4 + (i - 4) / 2, a ramp of slope 1/2 through the centre
    np.testing.assert_allclose(stretch_signals(ramp, 2.0), 5 + (ramp - 5) / 2)
    # half as fast: sample i reads sample 4 + 2 (i - 4); the event shrinks, reads outside the record are 0
    np.testing.assert_allclose(stretch_signals(ramp, 0.5)[0], [0, 0, 1, 3, 5, 7, 9, 0, 0])


def test_signal_shift_electronics_noise_and_description(random_signals):
    ds = signal_dataset(random_signals)
    out = SignalShift(gain=0.5, offset=0.25).apply(ds, 0)
    np.testing.assert_allclose(out.X, random_signals * 0.5 + 0.25, rtol=1e-6)
    assert out.X.dtype == np.float32 and out.image_shape is None and np.array_equal(out.y, ds.y)
    noisy = SignalShift(noise_std=0.3)
    np.testing.assert_array_equal(noisy.apply(ds, 7).X, noisy.apply(ds, 7).X)
    assert not np.array_equal(noisy.apply(ds, 7).X, noisy.apply(ds, 8).X)
    np.testing.assert_array_equal(ds.X, random_signals)                 # input untouched
    assert (SignalShift(delay=2, stretch=1.2, gain=0.7, offset=0.3, noise_std=0.2).describe()
            == "delay 2 samples, stretch 1.2, gain 0.7, offset 0.3, noise 0.2")
    assert SignalShift().describe() == "no shift"


def test_signal_shift_refuses_images_and_bad_fields(random_images):
    with pytest.raises(DataError, match="1-D signals.*SensorShift"):
        SignalShift(delay=1).apply(image_dataset(random_images), 0)
    for bad in ({"stretch": 0.0}, {"stretch": float("nan")}, {"noise_std": -1.0}, {"clip": (1.0, 0.0)}):
        with pytest.raises(DataError):
            SignalShift(**bad)


def test_device_data_is_the_held_out_part_shifted_and_split():
    full = make_dataset(counts=(30, 30, 30), image_shape=(1, 12))
    full = Dataset(full.X, full.y, full.n_classes, "sig", None)
    shift = SignalShift(gain=2.0)
    dev_train, dev_test = device_data(full, 0.2, shift, seed=4)
    _, held_out = stratified_split(full, 0.2, 4)
    assert len(dev_train) + len(dev_test) == len(held_out) == 18 and len(dev_test) == 6
    # column 0 holds each sample's index (times the gain): exactly the held-out samples, each once
    got = np.sort(np.concatenate([dev_train.X[:, 0], dev_test.X[:, 0]]) / 2.0)
    np.testing.assert_array_equal(got, np.sort(held_out.X[:, 0]))
    assert isinstance(device_shift("mnist1d"), SignalShift) and isinstance(device_shift("digits"), SensorShift)
    with pytest.raises(DataError, match="no device sensor shift"):
        device_shift("cifar10")
