"""Datasets: digits, IDX and npz files written here, tfds through its mock; splits, errors."""

import dataclasses
import gzip
import json
import sys

import numpy as np
import pytest

import hypergrad as hg
from hypergrad.cli import main
from hypergrad.config import ConfigError, from_dict, override
from tests.problems import assert_one_line_error


def test_digits_split_is_deterministic_and_disjoint():
    a = hg.data.load("digits", seed=3)
    b = hg.data.load("digits", seed=3)
    c = hg.data.load("digits", seed=4)
    assert [len(s[0]) for s in (a.train, a.val, a.test)] == [1000, 400, 397]
    assert a.input_shape == (8, 8, 1) and a.num_classes == 10
    np.testing.assert_array_equal(a.train[0], b.train[0])
    assert not np.array_equal(a.train[0], c.train[0])
    x = np.concatenate([np.asarray(s[0]).reshape(len(s[0]), -1)
                        for s in (a.train, a.val, a.test)])
    assert x.shape == (1797, 64)
    assert 0.0 <= x.min() and x.max() == 1.0
    assert a.train[1].dtype == np.int32 and a.train[0].dtype == np.float32


def test_split_covers_every_example_once():
    x = np.arange(20)[:, None]
    y = np.arange(20)
    train, val, test = hg.data.split(x, y, seed=0, train_size=10, val_size=6)
    ids = np.concatenate([train[1], val[1], test[1]])
    assert sorted(ids) == list(range(20))


def test_errors():
    with pytest.raises(hg.data.DataError, match="unknown dataset 'mnistt'; available: digits"):
        hg.data.load("mnistt")
    with pytest.raises(hg.data.DataError, match="exceeds the 1797 examples"):
        hg.data.load("digits", train_size=1500, val_size=400, test_size=10)
    # The test split is the rest: say that train + val take too much, not "test_size".
    with pytest.raises(hg.data.DataError, match="train_size \\+ val_size = 1900 exceeds the "
                                                "1797 examples available; lower train_size"):
        hg.data.load("digits", train_size=1500, val_size=400)
    with pytest.raises(hg.data.DataError, match="= 1797 leaves no test split of the 1797"):
        hg.data.load("digits", train_size=1397, val_size=400)


# --- MNIST-format files and npz, written here ---------------------------------------------

def images(n, shape=(28, 28), seed=0):
    """uint8 images whose first two pixels spell the example's index (to recover it)."""
    x = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    x[:, 0, 0], x[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    return x


def ids(x):
    """The indices spelled by :func:`images` in loaded [0, 1] float images."""
    x = np.rint(np.asarray(x) * 255).astype(int)
    return x[:, 0, 0, 0] * 256 + x[:, 0, 1, 0]


def write_idx(path, array, gz=False):
    """An IDX file (magic 0x0000080N, big-endian dimensions, then uint8 data)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(folder, x, y, prefix="train", gz=False):
    folder.mkdir(exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte", x, gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", y, gz)
    return folder


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(1)
    return {"x_train": images(300), "y_train": rng.integers(0, 10, 300).astype(np.uint8),
            "x_test": images(80, seed=2), "y_test": rng.integers(0, 10, 80).astype(np.uint8)}


@pytest.fixture(scope="module")
def sources(arrays, tmp_path_factory):
    """The same arrays as plain IDX files, gzipped IDX files and an npz file."""
    root = tmp_path_factory.mktemp("data")
    out = {}
    for gz in (False, True):
        folder = root / ("gz" if gz else "plain")
        write_mnist(folder, arrays["x_train"], arrays["y_train"], "train", gz)
        write_mnist(folder, arrays["x_test"], arrays["y_test"], "t10k", gz)
        out["gz" if gz else "plain"] = f"idx:{folder}"
    np.savez(root / "all.npz", **arrays)
    out["npz"] = f"npz:{root / 'all.npz'}"
    return out


def as_numpy(data):
    return [np.asarray(a) for split in (data.train, data.val, data.test) for a in split]


def test_idx_plain_gz_and_npz_give_identical_splits(sources, arrays):
    loaded = {k: hg.data.load(v, seed=5, train_size=100, val_size=50)
              for k, v in sources.items()}
    ref = loaded["plain"]
    for data in loaded.values():
        for a, b in zip(as_numpy(data), as_numpy(ref), strict=True):
            np.testing.assert_array_equal(a, b)
    assert ref.input_shape == (28, 28, 1) and ref.num_classes == 10
    (x, y), (xv, yv), (xt, yt) = ref.train, ref.val, ref.test
    np.testing.assert_array_equal(yv, arrays["y_train"][ids(xv)])
    assert x.dtype == np.float32 and y.dtype == np.int32 and yt.dtype == np.int32
    assert [len(x), len(xv), len(xt)] == [100, 50, 80]  # the test split is the t10k files
    train_ids, val_ids = ids(x), ids(xv)
    assert not set(train_ids) & set(val_ids)
    np.testing.assert_array_equal(ids(xt), np.arange(80))
    np.testing.assert_array_equal(x, arrays["x_train"][train_ids, ..., None] / np.float32(255))
    np.testing.assert_array_equal(y, arrays["y_train"][train_ids])
    np.testing.assert_array_equal(yt, arrays["y_test"])


def test_split_depends_on_the_seed_only(sources):
    a = hg.data.load(sources["gz"], seed=1, train_size=100, val_size=50, test_size=30)
    b = hg.data.load(sources["gz"], seed=1, train_size=100, val_size=50, test_size=30)
    c = hg.data.load(sources["gz"], seed=2, train_size=100, val_size=50, test_size=30)
    for u, v in zip(as_numpy(a), as_numpy(b), strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.train[0], c.train[0])
    assert len(set(ids(a.test[0]))) == 30 and max(ids(a.test[0])) < 80


def test_sources_without_a_test_split_are_cut_in_three(arrays, tmp_path):
    x, y = arrays["x_train"], arrays["y_train"]
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    write_mnist(tmp_path / "only", x, y, "train", gz=True)
    a = hg.data.load(f"npz:{tmp_path / 'xy.npz'}", seed=0, train_size=100, val_size=50)
    b = hg.data.load(f"idx:{tmp_path / 'only'}", seed=0, train_size=100, val_size=50)
    for u, v in zip(as_numpy(a), as_numpy(b), strict=True):
        np.testing.assert_array_equal(u, v)
    parts = [ids(s[0]) for s in (a.train, a.val, a.test)]
    assert [len(p) for p in parts] == [100, 50, 150]
    assert sorted(np.concatenate(parts)) == list(range(300))


def test_other_idx_file_names(arrays, tmp_path, sources):
    """Kaggle's ``train-images.idx3-ubyte`` and EMNIST's ``emnist-digits-test-...``."""
    folder = tmp_path / "named"
    folder.mkdir()
    write_idx(folder / "train-images.idx3-ubyte", arrays["x_train"])
    write_idx(folder / "train-labels.idx1-ubyte", arrays["y_train"])
    write_idx(folder / "emnist-digits-test-images-idx3-ubyte", arrays["x_test"], gz=True)
    write_idx(folder / "emnist-digits-test-labels-idx1-ubyte", arrays["y_test"], gz=True)
    a = hg.data.load(f"idx:{folder}", train_size=100, val_size=50)
    b = hg.data.load(sources["npz"], train_size=100, val_size=50)
    for u, v in zip(as_numpy(a), as_numpy(b), strict=True):
        np.testing.assert_array_equal(u, v)


def test_npz_colour_images_and_float_pixels(tmp_path):
    x = np.random.default_rng(0).random((40, 32, 32, 3)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x, y=np.arange(40) % 10)
    data = hg.data.load(f"npz:{tmp_path / 'c.npz'}", train_size=20, val_size=10)
    assert data.input_shape == (32, 32, 3) and data.train[1].dtype == np.int32


def test_memory_map_reads_only_the_subset(sources, arrays):
    data = hg.data.load(sources["plain"], train_size=10, val_size=5, test_size=5)
    assert [len(s[0]) for s in (data.train, data.val, data.test)] == [10, 5, 5]


def corrupt(tmp_path, arrays, kind):
    """A folder of MNIST files with one thing wrong."""
    folder = write_mnist(tmp_path / kind, arrays["x_train"], arrays["y_train"],
                         gz=kind.endswith("gz"))
    images = folder / ("train-images-idx3-ubyte" + (".gz" if kind.endswith("gz") else ""))
    if kind == "magic":
        raw = bytearray(images.read_bytes())
        raw[3] = 1  # 0x00000801 is a labels file's magic number
        images.write_bytes(bytes(raw))
    elif kind.startswith("truncated"):
        raw = images.read_bytes()
        images.write_bytes(raw[: len(raw) // 2])
    elif kind == "counts":
        write_idx(folder / "train-labels-idx1-ubyte", arrays["y_train"][:299])
    elif kind == "no-labels":
        (folder / "train-labels-idx1-ubyte").unlink()
    return f"idx:{folder}"


@pytest.mark.parametrize("kind, message", [
    ("magic", "is not an IDX images file (magic number 0x00000801; expected 0x00000803)"),
    ("truncated", "is truncated: its header says 300x28x28 (235216 bytes), the file has"),
    ("truncated-gz", "truncated or not gzip"),
    ("counts", "300 images but 299 labels"),
    ("no-labels", "train-images-idx3-ubyte has no matching labels file"),
])
def test_broken_idx_files(kind, message, tmp_path, arrays):
    with pytest.raises(hg.data.DataError, match=None) as e:
        hg.data.load(corrupt(tmp_path, arrays, kind))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_and_unusable_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    np.savez(tmp_path / "keys.npz", images=np.zeros((3, 2, 2), np.uint8))
    np.savez(tmp_path / "bad.npz", x=np.full((3, 2, 2), 7.0), y=np.zeros(3, int))
    cases = [
        ("idx:" + str(tmp_path / "nowhere"), "no such folder"),
        ("idx:" + str(tmp_path / "empty"), "no MNIST-format files"),
        ("npz:" + str(tmp_path / "nothing.npz"), "no such file"),
        ("npz:" + str(tmp_path / "junk.npz"), "is not a readable .npz file"),
        ("npz:" + str(tmp_path / "keys.npz"), "has arrays images; expected x and y"),
        ("npz:" + str(tmp_path / "bad.npz"), "float images must lie in [0, 1]"),
        ("idx:", "names no path; write idx:DIR"),
        ("mnistt", "unknown dataset 'mnistt'"),
    ]
    for name, message in cases:
        with pytest.raises(hg.data.DataError) as e:
            hg.data.load(name, train_size=1, val_size=1)
        assert message in str(e.value) and "\n" not in str(e.value), name


def test_empty_and_degenerate_sources_name_file_and_cause(tmp_path, monkeypatch):
    """Issue 21, items 9-12: each a one-line DataError naming the file, not a traceback.
    (Relative names: a long temporary path, as under pytest-xdist, would be cut.)"""
    monkeypatch.chdir(tmp_path)
    x, y = np.zeros((600, 8, 8), np.uint8), np.arange(600) % 10
    cases = {
        "empty.npz": (dict(x=x[:0], y=y[:0]), "(x, y) holds 0 examples"),
        "flat.npz": (dict(x=np.zeros((600, 0, 8), np.uint8), y=y),
                     "(x, y): images must be [n, H, W] or [n, H, W, C] with every size at "
                     "least 1, got shape (600, 0, 8)"),
        "notest.npz": (dict(x_train=x, y_train=y, x_test=x[:0], y_test=y[:0]),
                       "x_test and y_test hold 0 examples; leave them out"),
        "marker.npz": (dict(x=x, y=np.where(np.arange(600) == 7, 255, y)),
                       "(y): labels run to 255 but only 11 of the 256 classes"),
        "huge.npz": (dict(x=x, y=np.where(np.arange(600) == 7, 2**31 - 1, y)),
                     "(y): a label of 2147483647 would make 2147483648 classes (at most "
                     "10000)"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(name, **arrays)
        with pytest.raises(hg.data.DataError) as e:
            hg.data.load(f"npz:{name}", train_size=100, val_size=50)
        assert str(e.value).startswith(f"npz:{name}"), str(e.value)
        assert message in str(e.value) and "\n" not in str(e.value), name
    write_mnist(tmp_path / "idx0", x[:0], y[:0].astype(np.uint8))
    with pytest.raises(hg.data.DataError, match=r"\(train\) holds 0 examples"):
        hg.data.load(f"idx:{tmp_path / 'idx0'}", train_size=1, val_size=1)
    write_mnist(tmp_path / "idx255", x, np.where(np.arange(600) == 7, 255, y).astype(np.uint8))
    with pytest.raises(hg.data.DataError, match="train-labels-idx1-ubyte: labels run to 255"):
        hg.data.load(f"idx:{tmp_path / 'idx255'}", train_size=100, val_size=50)
    # Missing classes are data, not a marker: five of nine classes still load, and so
    # do two of a hundred among fewer examples than classes (a small sample).
    np.savez(tmp_path / "half.npz", x=x, y=2 * (np.arange(600) % 5))
    assert hg.data.load(f"npz:{tmp_path / 'half.npz'}", train_size=100,
                        val_size=50).num_classes == 9
    np.savez(tmp_path / "few.npz", x=x[:60], y=np.where(np.arange(60) % 2, 99, 0))
    assert hg.data.load(f"npz:{tmp_path / 'few.npz'}", train_size=30,
                        val_size=10).num_classes == 100


def test_sizes_beyond_the_source(sources):
    with pytest.raises(hg.data.DataError, match="exceeds the 300 training examples"):
        hg.data.load(sources["npz"], train_size=290, val_size=20)
    with pytest.raises(hg.data.DataError, match="test_size 81 exceeds the 80 test examples"):
        hg.data.load(sources["npz"], test_size=81, train_size=10, val_size=10)


# --- tensorflow-datasets ------------------------------------------------------------------

def test_missing_tfds_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(hg.data.DataError, match=r'pip install -e "\.\[tfds\]"'):
        hg.data.load("mnist")


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_through_its_mock(name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE):
        a = hg.data.load(name, seed=0, train_size=30, val_size=10)
        b = hg.data.load(name, seed=0, train_size=30, val_size=10, test_size=20)
    assert a.input_shape == shape and a.num_classes == 10
    assert [len(s[0]) for s in (a.train, a.val, a.test)] == [30, 10, 60]
    assert len(b.test[0]) == 20
    np.testing.assert_array_equal(a.train[0], b.train[0])
    x = np.asarray(a.train[0])
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert a.train[1].dtype == np.int32
    assert "tensorflow" not in sys.modules  # reading needs no TensorFlow


def test_tfds_not_prepared_and_offline(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    def offline(self, *args, **kwargs):
        raise ConnectionError("Failed to connect to storage.googleapis.com\nmore detail")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(hg.data.DataError) as e:
        hg.data.load("fashion_mnist", data_dir=str(tmp_path))
    message = str(e.value)
    assert "\n" not in message
    for part in ("fashion_mnist is not prepared in", str(tmp_path), "ConnectionError",
                 "tfds build fashion_mnist --file_format=array_record --data_dir DIR",
                 "data.data_dir", "idx:DIR"):
        assert part in message


def test_tfds_prepared_as_tfrecord_only(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    asked = {}

    def data_source(name, **kwargs):
        asked.update(kwargs)
        raise NotImplementedError("Random access data source for file format tfrecord is "
                                  "not supported. Possible root causes:\n\t* ...")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    monkeypatch.setattr(tfds, "data_source", data_source)
    with pytest.raises(hg.data.DataError) as e:
        hg.data.load("kmnist", data_dir=str(tmp_path))
    assert asked["builder_kwargs"] == {"file_format": "array_record"}
    assert "\n" not in str(e.value)
    assert "tfds build kmnist --file_format=array_record" in str(e.value)


# --- config keys and the command line -----------------------------------------------------

def seed_cnn_config():
    from hypergrad.experiment import get_experiment

    return get_experiment("seed-cnn").config


def test_data_keys_set_round_trip_and_suggest():
    config = override(seed_cnn_config(), ["data=idx:/some/dir", "data.train_size=5000",
                                          "data.val_size=500", "data.test_size=2000",
                                          "data.data_dir=/tmp/tfds"])
    assert (config.data_train_size, config.data_val_size, config.data_test_size,
            config.data_dir) == (5000, 500, 2000, "/tmp/tfds")
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["data.train_size"] == 5000 and "data_train_size" not in saved
    assert from_dict(seed_cnn_config(), saved) == config
    assert from_dict(seed_cnn_config(), {"steps": 3}).data_train_size == 1000  # old files
    for name in ("mnist", "fashion_mnist", "kmnist", "cifar10", "npz:x.npz", "digits"):
        assert override(seed_cnn_config(), [f"data={name}"]).data == name
    with pytest.raises(ConfigError, match="did you mean data.train_size"):
        override(seed_cnn_config(), ["train_size=10"])
    assert dataclasses.replace(config, data_dir="").validate().data_dir == ""


@pytest.mark.parametrize("sets, message", [
    (["data.train_size=0"], "data.train_size must be at least 1, got 0"),
    (["data.val_size=x"], "data.val_size must be an integer, got 'x'"),
    (["data.test_size=-1"], "data.test_size must be at least 0"),
    (["data=idx:"], "data: data 'idx:' names no path"),
])
def test_bad_data_keys_are_one_line(sets, message, capsys, tmp_path):
    argv = ["run", *[a for kv in sets for a in ("--set", kv)], "--workdir", str(tmp_path / "w")]
    assert_one_line_error(argv, message, capsys)


def test_data_errors_through_the_cli(tmp_path, arrays, capsys):
    for name, message in [
        ("idx:" + str(tmp_path / "nowhere"), "no such folder"),
        (corrupt(tmp_path, arrays, "magic"), "is not an IDX images file"),
        (corrupt(tmp_path, arrays, "truncated"), "is truncated"),
        (corrupt(tmp_path, arrays, "counts"), "300 images but 299 labels"),
    ]:
        workdir = tmp_path / "w"
        assert_one_line_error(["run", "--set", f"data={name}", "--workdir", str(workdir)],
                              message, capsys)
        assert not workdir.exists()


TINY = ["--set", "steps=3", "--set", "meta_steps=2", "--set", "batch_size=10",
        "--set", "channels=2,2,2", "--set", "data.train_size=40", "--set", "data.val_size=20",
        "--set", "strategy=local", "--quiet"]  # the data, not the search, is under test


def test_seed_cnn_runs_on_idx_files_and_resumes(tmp_path, arrays, capsys):
    folder = write_mnist(tmp_path / "mnist", arrays["x_train"][:100], arrays["y_train"][:100],
                         gz=True)
    write_mnist(folder, arrays["x_test"][:30], arrays["y_test"][:30], "t10k", gz=True)
    workdir = tmp_path / "run"
    assert main(["run", "seed-cnn", "--set", f"data=idx:{folder}", *TINY,
                 "--workdir", str(workdir)]) == 0
    config = json.loads((workdir / "config.json").read_text())
    assert config["data"] == f"idx:{folder}" and config["data.train_size"] == 40
    summary = json.loads((workdir / "summary.json").read_text())
    assert np.isfinite(summary["final_val_loss"]) and 0 <= summary["test_accuracy"] <= 1
    assert main(["run", "--resume", "--workdir", str(workdir), "--set", "meta_steps=3",
                 "--quiet"]) == 0
    assert json.loads((workdir / "summary.json").read_text())["meta_steps_run"] == 3
    capsys.readouterr()


def test_seed_cnn_runs_on_colour_images(tmp_path, capsys):
    x = np.random.default_rng(0).integers(0, 256, (80, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", x=x, y=np.arange(80) % 10)
    assert main(["run", "--set", f"data=npz:{tmp_path / 'c.npz'}", *TINY,
                 "--workdir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
