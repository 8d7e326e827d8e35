"""What counts as the machine running out."""

from __future__ import annotations

import errno

from uploader._exceptions import StoreError, TargetError
from uploader.fdlimit import exhausted_hint, ran_out


def _caused(error: Exception, cause: BaseException) -> Exception:
    error.__cause__ = cause
    return error


def test_an_error_caused_by_running_out_says_so() -> None:
    emfile = OSError(errno.EMFILE, "Too many open files")
    assert ran_out(emfile)
    assert ran_out(_caused(StoreError("running nix"), emfile))
    assert ran_out(_caused(TargetError("uploading"), _caused(RuntimeError("pool"), emfile)))
    assert "open-file limit" in exhausted_hint(emfile)


def test_other_errors_are_not_taken_for_running_out() -> None:
    refused = OSError(errno.ECONNREFUSED, "Connection refused")
    assert not ran_out(refused)
    assert not ran_out(_caused(TargetError("uploading"), refused))
    assert not ran_out(TargetError("AccessDenied"))
    assert exhausted_hint(refused) == ""
