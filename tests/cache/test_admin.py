"""The cache in the admin API: /api/cache, /api/queries/{fp}, /metrics, findings."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import psycopg

from tests.support.proxy import ProxyThread


def test_admin_views(cache_proxy: Callable[..., ProxyThread], table: str) -> None:
    p = cache_proxy()
    assert p.runtime is not None and p.runtime.admin is not None
    base = f"http://127.0.0.1:{p.runtime.admin.port}"
    q = f"SELECT v FROM {table} WHERE id = %s"
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        for _ in range(6):
            conn.execute(q, (9,), prepare=False).fetchone()
    cache = httpx.get(f"{base}/api/cache").json()
    assert cache["enabled"] and cache["store"] == "memory"
    assert cache["totals"]["hits"] == 5 and cache["totals"]["misses"] == 1
    (rule,) = cache["rules"]
    assert rule["rule"] == f"table:{table}" and rule["hits"] == 5 and rule["entries"] == 1
    assert "TTL" in cache["consistency"]
    (fp,) = cache["fingerprints"]
    detail = httpx.get(f"{base}/api/queries/{fp}").json()
    assert detail["cache"]["hits"] == 5
    assert detail["calls"] == 6  # hits still count in the statement's statistics
    metrics = httpx.get(f"{base}/metrics").text
    assert f'sqlproxy_cache_hits_total{{rule="table:{table}"}} 5.0' in metrics
    assert "sqlproxy_cache_bytes" in metrics
    findings = httpx.get(f"{base}/api/findings", params={"kind": "repeated_query"}).json()
    rules = [f["cache_rule"] for f in findings["items"] if f["fingerprint"] == fp]
    assert rules and rules[0]["fingerprint"] == fp
    assert "[[cache.rules]]" in rules[0]["toml"]


def test_api_cache_off(proxy: ProxyThread) -> None:
    assert proxy.runtime is not None and proxy.runtime.admin is not None
    out = httpx.get(f"http://127.0.0.1:{proxy.runtime.admin.port}/api/cache").json()
    assert out == {"enabled": False}


def test_dashboard_cache_panel(cache_proxy: Callable[..., ProxyThread], table: str) -> None:
    """The dashboard's result-cache panel in a real headless Chromium."""
    from tests.admin.test_dashboard import CHROMEDRIVER, CHROMIUM, wait_for

    if not CHROMIUM or not CHROMEDRIVER:
        import pytest

        pytest.skip("headless Chromium not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    p = cache_proxy()
    assert p.runtime is not None and p.runtime.admin is not None
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        for _ in range(3):
            conn.execute(f"SELECT v FROM {table} WHERE id = 1").fetchone()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{p.runtime.admin.port}/")
        wait_for(driver, "return document.body.dataset.loaded === 'true'")
        assert driver.execute_script("return document.getElementById('cache').hidden") is False
        text = driver.find_element("id", "cache").text
        assert f"table:{table}" in text and "66.7 %" in text, text
        assert "bounded by the TTL only" in text
    finally:
        driver.quit()
