"""Print each module's line count, so growth past ~500 lines is seen in every `make test`."""

from __future__ import annotations

from pathlib import Path

LIMIT = 500


def main() -> None:
    sizes = sorted(
        ((len(p.read_text().splitlines()), p) for p in Path("src").rglob("*.py")), reverse=True
    )
    print("module sizes (lines): " + ", ".join(f"{p.relative_to('src')}={n}" for n, p in sizes[:8]))
    for n, p in sizes:
        if n > LIMIT:
            print(f"  {p}: {n} lines, past {LIMIT}: probably two rooms in one file")


if __name__ == "__main__":
    main()
