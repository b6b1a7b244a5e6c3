"""The exceptions mpstream raises. Every message names the channel (or operator) involved and
says what to do about it."""


class MpstreamError(Exception):
    """Base class of every mpstream error."""


class ChannelError(MpstreamError):
    """A shared-memory channel failed."""


class PeerDiedError(ChannelError):
    """The process on the other side of a channel exited while this side waited on it."""


class ChannelClosedError(ChannelError):
    """The consumer closed its end: nothing written now would be read."""


class ChannelTimeoutError(ChannelError, TimeoutError):
    """A blocking read or write waited its whole timeout."""


class SharedMemoryFullError(ChannelError, OSError):
    """/dev/shm has no room for a new channel segment."""


class LayoutError(ChannelError):
    """A segment is not an mpstream ring of this layout version, or a record is malformed."""


class RecordTooLargeError(ChannelError, ValueError):
    """A record does not fit in the channel's ring (its limit is half the capacity)."""


class SchemaError(MpstreamError, TypeError):
    """A column has a dtype mpstream cannot carry (object, complex, ...)."""
