"""Test-suite wide policy: where kernel tests run, and no silent skips.

Tests marked ``kernel`` need a kernel with kTLS and the ``handshake``
genetlink family; they run inside the VM (``tools/test`` boots it, and
``tools/vm-run`` sets ``TLSHD_IN_VM=1`` there).  On a bare host they are
skipped with a pointer to the right command.

Inside the VM a skip would hide a missing kernel feature or a broken
fixture, so every skip is turned into a failure there, unless the test is
marked ``not_applicable`` (for example a rekey test on a kernel older than
6.14).
"""

from __future__ import annotations

# The worker's OpenSSL settings (no session tickets, TLS 1.3 only) are read
# once, when cryptography first loads OpenSSL: before any test module or
# fixture imports it.
from tlshd.worker import sslconf

sslconf.use_worker_config()

import os  # noqa: E402
import re  # noqa: E402
from collections.abc import Generator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

IN_VM = os.environ.get("TLSHD_IN_VM") == "1"

SKIP_OUTSIDE_VM = (
    "kernel test: needs the VM (tools/test, or tools/vm-run -- "
    ".venv/bin/python -m pytest -m kernel tests/kernel)"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "not_applicable: may skip inside the VM (the feature does not "
        "exist on this kernel); any other skip there is a failure",
    )
    config.addinivalue_line(
        "markers",
        "wide: needs more vCPUs than the default VM; tools/test runs these "
        "in a second boot with TLSHD_VM_SMP_WIDE (default 4) vCPUs",
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if IN_VM:
        return
    skip = pytest.mark.skip(reason=SKIP_OUTSIDE_VM)
    for item in items:
        if item.get_closest_marker("kernel"):
            item.add_marker(skip)


def _skip_reason(longrepr: Any) -> str:
    # A skip's longrepr is (path, lineno, "Skipped: reason").
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    if not IN_VM:
        return
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    if item.get_closest_marker("not_applicable"):
        return
    report.outcome = "failed"
    report.longrepr = (
        "skipped inside the VM, which counts as a failure (mark the test "
        f"not_applicable if that is intended): {_skip_reason(report.longrepr)}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, Any, None]:
    """A module-level skip (importorskip) inside the VM fails as well."""
    outcome = yield
    if not IN_VM:
        return
    report: pytest.CollectReport = outcome.get_result()
    if report.skipped:
        report.outcome = "failed"
        report.longrepr = (
            "module skipped inside the VM, which counts as a failure: "
            f"{_skip_reason(report.longrepr)}"
        )


@pytest.fixture(scope="session")
def kernel_version() -> tuple[int, ...]:
    """The running kernel's version, e.g. (6, 12, 117)."""
    release = os.uname().release
    m = re.match(r"\d+(?:\.\d+)*", release)
    assert m, f"unparsable kernel release {release!r}"
    return tuple(int(x) for x in m.group(0).split("."))
