"""Files the controller keeps, written by two deploys at once (flakefleet.files)."""

from __future__ import annotations

import threading
from pathlib import Path

from flakefleet.files import write_atomically


def test_two_writers_at_once_each_replace_the_file_whole(tmp_path: Path):
    path = tmp_path / "manifests" / "tree.json"
    errors: list[BaseException] = []

    def write(text: str) -> None:
        try:
            for _ in range(200):
                write_atomically(path, text)
        except BaseException as error:  # any failure of a writer fails the test
            errors.append(error)

    writers = [threading.Thread(target=write, args=(c * 1000,)) for c in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert errors == []
    assert path.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in path.parent.iterdir()] == ["tree.json"]  # no temporary left
