"""The errors a user can cause. Each message is written for a person, not a programmer.

The CLI prints them as one line, the UI shows them as a message; anything else that
escapes is a bug in lensbench.
"""


class LensbenchError(Exception):
    """Base class: something the user can fix (a path, a prompt, a setting, memory)."""


class ModelNotFound(LensbenchError):
    """The named model is not a file, not a folder, not in models/, and not reachable online."""


class BadModelFile(LensbenchError):
    """The file exists but is not a readable model (wrong magic, truncated, corrupt)."""


class UnsupportedModel(LensbenchError):
    """The model is readable but this backend cannot run it; the message names one that can."""


class NotEnoughMemory(LensbenchError):
    """The model would not fit in this machine's memory (estimated before loading)."""


class BadPrompt(LensbenchError):
    """Empty prompt, or longer than the model's context."""


class BadTarget(LensbenchError):
    """The target string is not exactly one token of this model's vocabulary.

    `suggestion`: a one-token target to offer instead (e.g. ' Berlin' for 'Berlin'), or None.
    """

    def __init__(self, message: str, suggestion: str | None = None):
        super().__init__(message)
        self.suggestion = suggestion


class BadChoice(LensbenchError):
    """A layer, attention head or position that this model or this prompt does not have."""


class BadControlVector(LensbenchError):
    """A steering (control) vector file that cannot be used: not a control vector, damaged, or made for another model."""


class BadSetting(LensbenchError):
    """A setting out of its range: a layer range, a strength, a list of strengths."""


class RemoteUnavailable(LensbenchError):
    """A remote run (NDIF, through nnsight) cannot happen: no API key or a rejected one, the model
    is not hosted, no network, or no answer in time. Local backends are unaffected."""


class FitStopped(LensbenchError):
    """A lens fit or training run was stopped before it ended (nothing was saved)."""
