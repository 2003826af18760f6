"""The one exception type for errors a user can cause (bad config, missing files)."""


class ConfigError(ValueError):
    """A user-facing error: names the key, the bad value and what would be accepted.

    The CLI turns it into exit status 2 without a traceback.
    """

    def __init__(self, key: str, value, accepted: str, detail: str = ""):
        self.key, self.value, self.accepted, self.detail = key, value, accepted, detail
        msg = f"{key}: invalid value {value!r}; accepted: {accepted}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
