"""The one exception the readers raise for bad file contents, with the file and line in it."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A data file exists but a row in it cannot be read.

    The message names the file and (1-based) line so the user can open it at the right place,
    and says what was expected there.
    """

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line


def require_file(path: str | Path, what: str = "data file") -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError saying what was looked for."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"{what} not found: {p} (resolved to {p.resolve()}); check the path, or use "
            "shared_data_dir() / the PEFTKIT_SHARED_DATA variable for the bundled data sets."
        )
    if p.is_dir():
        raise IsADirectoryError(f"expected a {what} but {p} is a directory; name a file in it.")
    return p
