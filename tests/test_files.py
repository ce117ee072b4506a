from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mahir.files import content_hash, staged, write_text_atomically


def test_a_write_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "new" / "recipe.yaml"
    write_text_atomically(path, "one\n")
    write_text_atomically(path, "two\n")
    assert path.read_text() == "two\n"
    assert [p.name for p in path.parent.iterdir()] == ["recipe.yaml"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("old")

    def interrupted_write() -> None:
        with staged(path) as draft:
            draft.write_text("half a fi")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted_write()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_files_written_beside_the_draft_move_with_it(tmp_path: Path) -> None:
    """An ONNX file's external data keeps its name, so the reference inside the model holds."""
    path = tmp_path / "model.onnx"
    with staged(path) as draft:
        draft.write_text("graph")
        (draft.parent / "model.onnx.data").write_text("weights")
    assert path.read_text() == "graph"
    assert (tmp_path / "model.onnx.data").read_text() == "weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_a_folder_is_swapped_in_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged(out, folder=True) as draft:
        assert draft.is_dir()
        assert not any(draft.iterdir())
        (draft / "new.txt").write_text("new")
        assert (out / "old.txt").is_file()  # readers see the old folder until the swap
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_folder_write_keeps_the_old_folder_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mahir.json").write_text("old")

    def interrupted_write() -> None:
        with staged(out, folder=True) as draft:
            (draft / "mahir.json").write_text("new")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted_write()
    assert [p.name for p in out.iterdir()] == ["mahir.json"]
    assert (out / "mahir.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_content_hash_sees_contents_and_names_but_not_hidden_files(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "weights.bin").write_bytes(b"\x00" * 10)
    first = content_hash(folder)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("busy")
    assert content_hash(folder) == first
    (folder / "weights.bin").write_bytes(b"\x00" * 9 + b"\x01")
    changed = content_hash(folder)
    assert changed != first
    (folder / "weights.bin").rename(folder / "other.bin")
    assert content_hash(folder) not in (first, changed)
    assert content_hash(folder / "config.json") == hashlib.sha256(b"{}").hexdigest()
