"""The one error table: every request error has a row, rows speak the wire's codes, and
every wire code a peer may send comes back as an error the requester can act on."""

import inspect

import pytest

from rbee_p2p import errors
from rbee_p2p.errors import (ERRORS, Busy, EngineFailure, PeerUnavailable, RequestError,
                             from_wire, spec)
from rbee_p2p.protocol.messages import ERROR_CODES


def request_errors():
    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, RequestError) and cls is not RequestError]


def test_the_tree_has_request_errors():
    # guards the tests below against an empty walk
    assert {"InvalidRequest", "Busy", "PeerUnavailable", "Forbidden"} <= \
        {cls.__name__ for cls in request_errors()}


@pytest.mark.parametrize("cls", request_errors(), ids=lambda c: c.__name__)
def test_every_request_error_has_its_own_row(cls):
    assert cls in ERRORS


@pytest.mark.parametrize("cls", list(ERRORS), ids=lambda c: c.__name__)
def test_every_row_speaks_a_wire_code_and_a_sane_status(cls):
    row = ERRORS[cls]
    assert row.wire in ERROR_CODES
    assert 400 <= row.status < 600 and row.type


@pytest.mark.parametrize("code", ERROR_CODES)
def test_every_wire_code_comes_back_as_a_request_error(code):
    exc = from_wire(code, f"peer said {code}")
    assert isinstance(exc, RequestError) and str(exc) == f"peer said {code}"
    assert type(exc) in ERRORS or any(c in ERRORS for c in type(exc).__mro__)


def test_busy_keeps_retry_after_and_unknown_codes_are_engine_failures():
    exc = from_wire("busy", "full", 2500)
    assert type(exc) is Busy and exc.retry_after == 2.5
    assert from_wire("busy", "full").retry_after == 1.0  # no hint: a second
    unknown = from_wire("no-such-code", "?")
    assert type(unknown) is EngineFailure


def test_not_here_codes_move_on_and_bad_requests_do_not():
    assert isinstance(from_wire("model_not_found", "x"), PeerUnavailable)
    assert isinstance(from_wire("forbidden", "x"), PeerUnavailable)
    assert not isinstance(from_wire("bad_request", "x"), PeerUnavailable)


def test_spec_of_an_unlisted_subclass_finds_its_parents_row():
    class Narrower(PeerUnavailable):
        pass

    class Narrowest(Busy):
        pass

    assert spec(Narrower("x")) is ERRORS[PeerUnavailable]
    assert spec(Narrowest("x", retry_after=3)) is ERRORS[Busy]
    assert spec(PeerUnavailable("x")) is not ERRORS[EngineFailure]  # its own row, not the parent's
