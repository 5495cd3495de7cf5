"""`cache` settings: what each form means, and the one-line errors for bad ones."""

from pathlib import Path

import pytest

from flakefleet import cache


def test_cache_settings(tmp_path):
    served = {"store": "file://cache", "url": "http://127.0.0.1:8370", "serve": True}
    assert cache.parse(served, tmp_path, []) == cache.Cache(
        f"file://{tmp_path}/cache", "http://127.0.0.1:8370", True
    )
    assert cache.parse({"store": "s3://fleet"}, tmp_path, []) == cache.Cache(
        "s3://fleet", "s3://fleet"
    )
    assert cache.parse({"machine": "build1"}, tmp_path, ["build1"]) == cache.Cache(machine="build1")
    assert cache.parse(None, tmp_path, []) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"machine": "nope"}, "machine 'nope' is not in the fleet"),
        ({"url": "http://x:1"}, "needs a store"),
        ({"store": "s3://b", "serve": True}, "serve needs a file:// store"),
        ({"store": "file:///c", "url": "http://127.0.0.1", "serve": True}, "needs a port"),
        ({"store": "file:///c", "ur": "x"}, "unknown field 'ur'"),
        ("file:///c", "expected a mapping"),
    ],
)
def test_bad_cache_settings(value, message):
    with pytest.raises(cache.CacheError, match=message):
        cache.parse(value, Path("/repo"), ["build1"])
