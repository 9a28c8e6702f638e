"""``scripts/overload.py --quick``: under more requests in flight than the queue bound, every
answered call is accounted for, refusals are counted, the log stays clean, and the server
answers normally afterwards."""

from __future__ import annotations

from tests.apart import run_quick


def test_overload_quick_accounts_for_every_call_and_logs_no_error() -> None:
    report = run_quick("overload.py")
    assert {p["in_flight"] for p in report["phases"]} <= {256, 2048}
    for phase in report["phases"]:
        assert phase["accounted_share"] >= 0.99
        assert phase["server_codes"].get("OK", 0) > 0
    assert report["after_load"]["code"] == "OK"
    assert "ERROR" not in report["log_levels"]
