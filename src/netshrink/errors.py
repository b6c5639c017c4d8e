"""One user-facing error type: what is wrong and where. The CLI prints it on one line and exits 2."""
from __future__ import annotations


class NetshrinkError(Exception):
    """A problem the user can fix: names the thing (`what`) and the place (`where`: a file, layer or recipe key)."""

    def __init__(self, what: str, where: str | None = None, hint: str | None = None) -> None:
        self.what = what
        self.where = where
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.hint:
            text += f" ({self.hint})"
        return text
