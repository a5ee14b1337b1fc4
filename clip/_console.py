"""What the ``clip`` command shows a person: the ``clip: error:`` type, warning lines, names escaped for the terminal,
progress bars. It imports no other part of the command line and never imports torch.
"""
import re
import sys
from typing import Any, Optional

# Which characters never reach a terminal raw, and their escapes: one rule, kept in the launcher (which must speak
# before the package may be imported) and read from there.
from clip_dropin_launcher import UNSAFE_CHARACTERS, UNSAFE_PAST_C0, escape_character, printable  # noqa: F401

# Seconds between progress-bar redraws (tqdm's own default); tests set 0 to see every update.
PROGRESS_INTERVAL = 0.1

_UNSAFE_IN_JSON = re.compile(f"[{UNSAFE_PAST_C0}]")


class CLIError(Exception):
    """A user error: ``main`` prints ``clip: error: <message>`` and returns ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def json_safe(text: str) -> str:
    """A JSON document (from ``json.dumps(..., ensure_ascii=False)``) with the characters of ``UNSAFE_CHARACTERS`` that JSON
    leaves raw (DEL, C1 controls, U+2028/9, lone surrogates) written as ``\\uHHHH``: still the same JSON value."""
    return _UNSAFE_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def warn(message: str) -> None:
    """A ``clip: warning:`` line on stderr that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(f"clip: warning: {message}", file=sys.stderr)


def progress_bar(total: int, unit: str, show: Optional[bool], *, description: str = "") -> Any:
    """A tqdm bar on stderr with counts, rate and time left.

    ``show``: True or False as the user asked (``--progress``, ``-q``), None to show it only when stderr is a
    terminal, so logs and pipes get no carriage-return noise.
    """
    from tqdm import tqdm

    if show is None:
        show = sys.stderr.isatty()
    return tqdm(total=total, unit=unit, desc=description or None, disable=not show, file=sys.stderr,
                dynamic_ncols=True, mininterval=PROGRESS_INTERVAL)
