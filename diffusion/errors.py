"""The one exception type for errors a user can cause (bad config, missing files)."""
import reprlib

VALUE_CHARS = 80  # an error message shows at most this many characters of the bad value


class _ShortRepr(reprlib.Repr):
    """A repr that stops early: a huge value (an expanded YAML alias bomb, a 5000-digit integer) is never
    rendered in full, and a string shows its head only."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 8, 8, 8, 8
        self.maxstring = self.maxlong = self.maxother = VALUE_CHARS

    def repr_str(self, value, level):
        return repr(value[:VALUE_CHARS + 1])

    def repr_int(self, value, level):
        if value.bit_length() > 4 * VALUE_CHARS:
            return f"<an integer of {value.bit_length()} bits>"
        return repr(value)


_SHORT = _ShortRepr()


def show(value) -> str:
    """The repr of a value for an error message, cut at VALUE_CHARS characters with '...'."""
    try:
        text = _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still reported
        text = f"<{type(value).__name__}>"
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS - 3] + "..."


class ConfigError(ValueError):
    """A user-facing error: names the key, the bad value and what would be accepted.

    The CLI turns it into exit status 2 without a traceback.
    """

    def __init__(self, key: str, value, accepted: str, detail: str = ""):
        self.key, self.value, self.accepted, self.detail = key, value, accepted, detail
        msg = f"{key}: invalid value {show(value)}; accepted: {accepted}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
