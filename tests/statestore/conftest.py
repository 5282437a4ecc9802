"""The dashboard test's headless browser, for the fleet's dashboard switch."""

from tests.admin.test_dashboard import browser  # noqa: F401
