"""mahir's own environments: created once with their pins, reused after, and a failed pip leaves
nothing behind but a one-line error. A tiny pin (six) keeps it to seconds; the optimum-intel
environment itself is exercised by tests/runtimes/test_openvino_genai.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from mahir.errors import RuntimeFailure
from mahir.venvs import SPEC_FILE, EnvSpec, ensure_env, run_script

SIX = EnvSpec("six-probe", steps=(("six==1.17.0",),), check="import six")


def test_an_environment_is_created_once_and_reused(tmp_path: Path) -> None:
    created = ensure_env(SIX, root=tmp_path)
    assert created.created_s is not None
    assert created.path == tmp_path / SIX.key()
    assert (created.path / SPEC_FILE).is_file()
    marker = created.path / "marker"
    marker.write_text("still here")
    script = tmp_path / "version.py"
    script.write_text("import six, sys\nprint(six.__version__, sys.prefix)\n")
    done = run_script(created, script, [])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1.17.0", str(created.path)]  # the renamed venv is its own

    again = ensure_env(SIX, root=tmp_path)
    assert again.created_s is None  # nothing installed the second time
    assert marker.read_text() == "still here"
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [SIX.key()]


def test_a_failed_pip_leaves_nothing_and_says_so_in_one_line(tmp_path: Path) -> None:
    broken = EnvSpec("no-such-pin", steps=(("six==0.0.0.1",),))
    with pytest.raises(RuntimeFailure, match=r"pip install six==0\.0\.0\.1 failed") as raised:
        ensure_env(broken, root=tmp_path)
    assert len(str(raised.value).splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no half-built environment to mistake for one


def test_the_pins_name_the_folder() -> None:
    other = EnvSpec("six-probe", steps=(("six==1.16.0",),), check="import six")
    assert SIX.key() != other.key()
    assert SIX.key().startswith("six-probe-")
    with pytest.raises(ValueError, match="at least one pip install step"):
        EnvSpec("empty", steps=())
