"""The domain errors both services raise.

This module knows nothing of gRPC: shared/grpc/errors.py maps each class to a status code and a
wire reason (shared/protocol.py), resolved along the class hierarchy, in one table. Every error
carries a message that tells the caller what went wrong and what to fix.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a client of either service can be told about."""


class InvalidArgumentError(ServiceError):
    """The request itself is malformed; retrying it unchanged cannot succeed."""


class InvalidInputError(InvalidArgumentError):
    """An inference request's tensors do not match what the model takes."""


class MalformedPushError(InvalidArgumentError):
    """A weights push is malformed: bad stream order, header, tensor table, sizes or digest."""


class MalformedBatchError(InvalidArgumentError):
    """An experience batch does not match its buffer: tensor names, dtypes, shapes, sample
    counts or the safetensors framing."""


class PushBrokenError(MalformedPushError):
    """A push's sender went away (cancelled, or its connection broke) before the commit."""


class OutOfRangeError(InvalidArgumentError):
    """A version or writer epoch at or past 2^63, the bound the sync plane keeps them under."""


class NotFoundError(ServiceError):
    """What the request names does not exist here."""


class ModelNotFoundError(NotFoundError):
    """No model of that name (or version) is served here."""


class VersionNotServedError(ModelNotFoundError):
    """A request names a version of a served model other than the one it serves now (an older
    one a push has since replaced, or one never served); the message names the served one."""


class BufferNotFoundError(NotFoundError):
    """The trainer holds no experience buffer of that name."""


class RegionNotFoundError(NotFoundError):
    """No shared-memory region of that name is registered (none ever is)."""


class PushRejectedError(ServiceError):
    """The push is well formed but the model's state forbids it until something changes."""


class InferenceOnlyModelError(PushRejectedError):
    """The model is inference-only: it is loaded from its pretrained file and refuses pushes."""


class BaseVersionMismatchError(PushRejectedError):
    """A delta names a base version the receiver does not serve; the sender should push in full."""


class SeedVersionMismatchError(PushRejectedError):
    """A seed names a version other than the one the replica serves: it would push another
    (possibly stale) version than the caller meant, so it pushes none."""


class ResumeMismatchError(PushRejectedError):
    """A push that resumes a broken one (`resume_from`) names no push kept here: another
    identity (model, version, base, writer, epoch, size), an offset past the bytes applied, or
    nothing kept (the resume window passed); nothing of it was applied."""


class ConflictError(ServiceError):
    """A concurrent writer won: the version is stale or another push holds the model."""


class FencedError(ConflictError):
    """Another writer has since acquired the model; pushes from this one are refused for good."""


class UnknownEpochError(ConflictError):
    """A push carries a writer epoch newer than any granted here: the service lost the lease it
    granted (restarted without its state), so the writer must acquire the model again."""


class DeadlineExceededError(ServiceError):
    """The caller's deadline passed before the work could start; it was dropped."""


class PushStalledError(DeadlineExceededError):
    """A push sent no message for the service's idle timeout; it was ended, nothing swapped."""


class UnavailableError(ServiceError):
    """The service cannot answer now (starting, draining, not ready); retry later."""


class ResourceLimitError(ServiceError):
    """The request exceeds a configured limit (sizes, queue depth, concurrent pushes)."""


class UnsupportedError(ServiceError):
    """The protocol has the call, but this service does not offer what it asks for."""


class StoredVersionDamagedError(ServiceError):
    """A version kept on disk no longer checks out (its digest, its tensors): it cannot be
    served again; nothing was swapped."""


class ConfigurationError(Exception):
    """The user's model definition or the service settings are wrong; raised at start-up."""


class StateWriteError(Exception):
    """State could not be written to disk (a full disk, a read-only mount); what was on disk
    before is kept whole."""
