"""One classification of failures for the write-back consumer: the error's own ``retriable`` flag."""

from __future__ import annotations

import pytest

from connectors.errors import AuthError, BulkExportError, EhrError, TemporaryEhrError
from sync.errors import KafkaError, PermanentEventError, has_flag, is_retriable


@pytest.mark.parametrize("status", [400, 403, 404, 406, 413, 415, 422, 501])
def test_an_ehr_answer_outside_the_temporary_set_is_not_retriable(status: int) -> None:
    assert not is_retriable(EhrError(f"harbor: POST Encounter -> HTTP {status}", status=status))


def test_temporary_errors_and_the_broker_are_retriable() -> None:
    assert is_retriable(TemporaryEhrError("harbor: HTTP 503", status=503))
    assert is_retriable(KafkaError("Kafka: producing failed"))
    assert is_retriable(EhrError("still a version conflict", retriable=True))


def test_auth_refusals_and_failed_exports_are_not_retriable() -> None:
    assert not is_retriable(AuthError("harbor: HTTP 401 (after re-authorising)"))
    assert not is_retriable(BulkExportError("export failed"))
    assert not is_retriable(PermanentEventError("unknown episode"))


def test_the_flag_is_kept_when_an_error_is_wrapped() -> None:
    def wrapped(cause: BaseException) -> BaseException:
        try:
            raise RuntimeError("while writing") from cause
        except RuntimeError as exc:
            return exc

    assert is_retriable(wrapped(TemporaryEhrError("harbor: HTTP 503")))
    assert not is_retriable(wrapped(EhrError("harbor: HTTP 403", status=403)))
    assert has_flag(wrapped(EhrError("harbor: HTTP 403", status=403)))


def test_a_bug_is_not_retriable_but_the_network_and_the_disk_are() -> None:
    for bug in (KeyError("x"), TypeError("y"), ValueError("z"), AttributeError("w")):
        assert not is_retriable(bug)
        assert not has_flag(bug)
    assert is_retriable(ConnectionError("reset"))
    assert is_retriable(TimeoutError())
