"""What the ``clip`` command shows a person: the ``clip: error:`` type, warning lines, names escaped for the terminal,
progress bars. It imports no other part of the command line and never imports torch.
"""
import re
import sys
from typing import Any, Optional

# Seconds between progress-bar redraws (tqdm's own default); tests set 0 to see every update.
PROGRESS_INTERVAL = 0.1

# Characters that must never reach a terminal or a line-based file raw: C0 and C1 controls and DEL (escape
# sequences, carriage returns, the line breaks and separators that str.splitlines splits at), the Unicode line and
# paragraph separators, and the lone surrogates that stand for the undecodable bytes of a file name that is not
# UTF-8 (they cannot be encoded for output). Those JSON leaves raw are the ones past U+001F.
_UNSAFE_PAST_C0 = "\x7f-\x9f\u2028\u2029\ud800-\udfff"
UNSAFE_CHARACTERS = "\x00-\x1f" + _UNSAFE_PAST_C0
_UNSAFE = re.compile(f"[{UNSAFE_CHARACTERS}]")
_UNSAFE_IN_JSON = re.compile(f"[{_UNSAFE_PAST_C0}]")


class CLIError(Exception):
    """A user error: ``main`` prints ``clip: error: <message>`` and returns ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def printable(text: str, *, keep_newlines: bool = False) -> str:
    r"""``text`` safe for a terminal: each control, separator or lone surrogate as a ``\xHH``/``\uHHHH`` escape.

    Ordinary text (any script, spaces, backslashes) is unchanged; a name can neither move the cursor nor start a
    new line. ``keep_newlines`` leaves ``\n`` alone, for a message of several lines built by us.
    """
    return _UNSAFE.sub(lambda match: match.group() if keep_newlines and match.group() == "\n"
                       else escape_character(match.group()), text)


def escape_character(char: str) -> str:
    r"""``\xHH`` for a character below U+0100, else ``\uHHHH`` (every character of ``UNSAFE_CHARACTERS`` fits)."""
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def json_safe(text: str) -> str:
    """A JSON document (from ``json.dumps(..., ensure_ascii=False)``) with the characters of ``_UNSAFE`` that JSON
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
