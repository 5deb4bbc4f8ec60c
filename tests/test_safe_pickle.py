"""The restricted unpickler: data loads, code does not run."""

from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from fastdinov2.safe_pickle import UnsafePickleError, safe_load


def gnd_like() -> dict:
    """The shape of revisitop's gnd_roxford5k.pkl: image lists and per-query ground truth."""
    return {
        "imlist": ["all_souls_000000", "ashmolean_000001"],
        "qimlist": ["all_souls_000013"],
        "gnd": [{"bbx": [136.5, 34.0, 648.5, 955.0], "easy": np.array([1, 5, 9]),
                 "hard": np.array([], dtype=np.int64), "junk": [2, 3]}],
        "extra": (1, 2.5, True, None, b"raw", 3 + 4j, {1, 2}, frozenset({3}), np.float32(0.5)),
        "ordered": collections.OrderedDict(a=np.eye(2, dtype=np.float32)),
    }


def assert_same(a: object, b: object) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and type(a) is type(b) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)  # type: ignore[arg-type]
        for x, y in zip(a, b):  # type: ignore[call-overload]
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_data_round_trips(tmp_path: Path, protocol: int) -> None:
    data = gnd_like()
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert_same(data, safe_load(path))
    assert_same(data, safe_load(str(path)))
    with open(path, "rb") as fh:
        assert_same(data, safe_load(fh))
    assert_same(data, safe_load(path.read_bytes()))


class Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"gnd": [Evil(str(marker))]})
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError) as info:
        safe_load(path)
    assert "posix.system" in str(info.value) or "nt.system" in str(info.value)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # sanity: the payload really is dangerous with the plain unpickler
    pickle.loads(payload)
    assert marker.exists()


class Custom:
    pass


@pytest.mark.parametrize(
    "obj, name",
    [(Custom(), "test_safe_pickle.Custom"), (eval, "builtins.eval"), (getattr, "builtins.getattr"),
     (np.load, "numpy.load")],
)
def test_other_globals_are_refused(obj: object, name: str) -> None:
    with pytest.raises(UnsafePickleError, match=name.replace(".", r"\.")):
        safe_load(io.BytesIO(pickle.dumps([1, obj])))


def test_object_arrays_are_still_checked() -> None:
    arr = np.array([Custom()], dtype=object)
    with pytest.raises(UnsafePickleError, match="Custom"):
        safe_load(pickle.dumps(arr))


def test_corrupt_or_truncated(tmp_path: Path) -> None:
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(gnd_like())[:40])
    with pytest.raises(pickle.UnpicklingError, match="cut.pkl"):
        safe_load(path)
    with pytest.raises(FileNotFoundError):
        safe_load(tmp_path / "missing.pkl")
