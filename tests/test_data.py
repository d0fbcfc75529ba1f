import numpy as np
import pytest

import hypergrad as hg


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
    with pytest.raises(hg.data.DataError, match="test_size must be at least 1"):
        hg.data.load("digits", train_size=1500, val_size=400)
