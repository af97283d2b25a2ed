"""One error base class carrying a stable, machine-readable code.

`sparkctl` maps codes to exit statuses in one place (`sparkd.ctl.exits`); the control
socket sends the code in error replies so the client can raise the same class.
"""

from __future__ import annotations


class SparkdError(Exception):
    """Base of every error sparkd reports to a person or a script."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(SparkdError):
    """The configuration file is missing, unparseable or invalid."""

    code = "config"


class StateError(SparkdError):
    """The durable state could not be read or written."""

    code = "state"


class PrestartRefused(SparkdError):
    """The memory gate refused an engine start."""

    code = "prestart-refused"


class DaemonUnreachable(SparkdError):
    """sparkctl could not reach the daemon's control socket."""

    code = "daemon-unreachable"


class PermissionDenied(SparkdError):
    """The caller may not use the control socket."""

    code = "permission-denied"


class BadRequest(SparkdError):
    """A control request was malformed or unknown."""

    code = "bad-request"


class SchemaError(SparkdError):
    """A message on the control socket that does not fit its schema (sparkd.control.status);
    the message names the path of the first value that does not fit."""

    code = "bad-message"


class UnknownModel(SparkdError):
    """A model name that the configuration does not define."""

    code = "unknown-model"


class SystemdError(SparkdError):
    """A call to systemd failed."""

    code = "systemd"


class StoreError(SparkdError):
    """A model's files could not be listed, fetched or checked (issue 4, sparkd.store)."""

    code = "store"


class ManifestError(StoreError):
    """A model's manifest is missing or unusable."""

    code = "manifest"


class HubError(StoreError):
    """The Hub's metadata could not be read (unknown repository or revision, no network)."""

    code = "hub"


class DiskFull(StoreError):
    """A download ran out of disk space (ENOSPC); the partial files are kept."""

    code = "disk-full"


class VerificationFailed(StoreError):
    """A model's files are not what its manifest says (BAD or MISSING files)."""

    code = "verification-failed"


class SwapRefused(SparkdError):
    """The swap cannot start; nothing was changed."""

    code = "swap-refused"


class SwapInProgress(SparkdError):
    """Another swap is running; one at a time."""

    code = "swap-in-progress"


class SwapFailed(SparkdError):
    """The swap failed and was rolled back (or the rollback failed too)."""

    code = "swap-failed"


class WaitTimeout(SparkdError):
    """sparkctl stopped waiting for work that goes on in the daemon."""

    code = "timeout"
