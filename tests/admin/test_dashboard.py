"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, via
selenium), against a running proxy with traffic: the token dialog, every table, the chart.

Keeps a screenshot in artifacts/dashboard.png (set SQLPROXY_DOCS_SCREENSHOT=1 to also refresh
docs/dashboard.png, the README's picture).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.admin.conftest import Admin, run
from tests.support.proxy import ProxyThread

MakeAdmin = Callable[..., tuple[ProxyThread, Admin]]
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "dashboard-test-token"

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("headless Chromium not installed: apt-get install chromium chromium-driver "
                    "(scripts/_setup.sh does this on Debian)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,1640", "--force-device-scale-factor=1",
                "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver: Any, script: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {script}")
        time.sleep(0.1)


def traffic(proxy: ProxyThread, db: str) -> None:
    """An application with an N+1 habit, a slow report and a few plain statements."""
    run(proxy, db,
        "create table customer (id int primary key, name text)",
        "create table orders (id serial primary key, customer_id int, total numeric)",
        "insert into customer select g, 'customer ' || g from generate_series(1, 20) g",
        "insert into orders (customer_id, total) select g % 20 + 1, g % 1000 from "
        "generate_series(1, 20000) g",
        "analyze orders", app="migrate")
    st = proxy.runtime.admin.state  # type: ignore[union-attr]
    for _ in range(4):
        with psycopg.connect(proxy.dsn(dbname=db), application_name="shop-web",
                             autocommit=True) as conn:
            ids = [r[0] for r in conn.execute("select id from customer order by id limit 10")]
            for i in ids:  # N+1
                conn.execute("select sum(total) from orders where customer_id = %s", (i,))
            conn.execute("select pg_sleep(0.03), count(*) from orders")  # the slow report
            conn.execute("select count(*) from orders where total > 100")
        time.sleep(0.15)  # end the burst
        proxy.call(st.sample_history)


def test_dashboard_renders_real_data(admin_proxy: MakeAdmin, db: str, browser: Any) -> None:
    proxy, admin = admin_proxy(admin={"token": TOKEN},
                               analysis={"slow_query_ms": 20, "n_plus_one_threshold": 5})
    traffic(proxy, db)
    assert admin.json("/api/n-plus-one")["total"] >= 1
    holder = psycopg.connect(proxy.dsn(dbname=db), application_name="shop-worker")
    holder.execute("select 1")  # an open connection, idle in transaction
    try:
        browser.get(admin.base + "/")
        # The API answers 401: the page asks for the token once.
        wait_for(browser, "return document.getElementById('token-dialog')"
                          ".classList.contains('open')")
        browser.find_element("id", "token-input").send_keys(TOKEN)
        browser.find_element("id", "token-save").click()
        wait_for(browser, "return document.body.dataset.loaded === 'true'")
        assert browser.execute_script(
            "return sessionStorage.getItem('sqlproxy.token')") == TOKEN

        rows = wait_for(browser, "const r = document.querySelectorAll("
                                 "'#queries tbody tr[data-fingerprint]'); "
                                 "return r.length >= 4 ? r.length : 0")
        assert rows >= 4
        queries_text = browser.find_element("id", "queries").text
        assert "select sum(total) from orders where customer_id = $1" in queries_text
        # Select the N+1 statement: its chart draws p50/p95/p99/mean from the four samples.
        [child] = [r for r in browser.find_elements(
            "css selector", "#queries tbody tr[data-fingerprint]") if "where customer_id" in r.text]
        child.click()
        wait_for(browser, "return document.getElementById('detail-query')"
                          ".textContent.includes('customer_id')")
        points = wait_for(browser, "const n = document.querySelectorAll("
                                   "'#chart svg circle.point').length; return n >= 16 ? n : 0")
        assert points >= 16
        lines = browser.execute_script(
            "return document.querySelectorAll('#chart svg path.line').length")
        assert lines == 4
        assert "pg_sleep" in browser.find_element("id", "slow").text
        findings = browser.find_element("id", "findings").text
        assert "n_plus_one" in findings and "shop-web" in findings
        connections = browser.find_element("id", "connections").text
        assert "shop-worker" in connections
        backends = browser.find_element("id", "backends").text
        assert "primary" in backends and "yes" in backends
        health = browser.find_element("id", "health").text
        assert health == "healthy"

        # EXPLAIN from the page: no index on orders.customer_id, and the advice says so.
        browser.find_element("id", "explain-button").click()
        advice = wait_for(browser, "const a = document.querySelector('#explain-result .advice');"
                                   " return a && a.textContent")
        assert "CREATE INDEX CONCURRENTLY ON public.orders (customer_id);" in advice

        artifacts = ROOT / "artifacts"
        artifacts.mkdir(exist_ok=True)
        shot = artifacts / "dashboard.png"
        browser.execute_script("window.scrollTo(0, 0)")
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("SQLPROXY_DOCS_SCREENSHOT"):
            (ROOT / "docs").mkdir(exist_ok=True)
            shutil.copy(shot, ROOT / "docs" / "dashboard.png")

        # Reloading keeps the token for the session: no second prompt.
        browser.refresh()
        wait_for(browser, "return document.body.dataset.loaded === 'true'")
        assert not browser.execute_script(
            "return document.getElementById('token-dialog').classList.contains('open')")
    finally:
        holder.close()


def test_dashboard_by_endpoint(admin_proxy: MakeAdmin, db: str, browser: Any) -> None:
    """Tagged traffic (sqlcommenter with a traceparent per request): the endpoints table, a
    click that filters the queries and findings by route, the query's per-route figures and
    its regression timeline."""
    import secrets

    proxy, admin = admin_proxy(analysis={"trace_idle_ms": 100.0, "window_s": 0.5})
    run(proxy, db,
        "create table customer (id int primary key, name text)",
        "create table orders (id serial primary key, customer_id int, total numeric)",
        "insert into customer select g, 'customer ' || g from generate_series(1, 20) g",
        "insert into orders (customer_id, total) select g % 20 + 1, g from "
        "generate_series(1, 200) g", app="migrate")
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        for _ in range(3):
            tp = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
            tag = (" /*controller='customers',action='index',route='/customers',"
                   f"traceparent='{tp}'*/")
            ids = [r[0] for r in conn.execute("select id from customer order by id limit 10"
                                              + tag)]
            for i in ids:  # N+1
                conn.execute("select sum(total) from orders where customer_id = %s" + tag, (i,))
            tp = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
            conn.execute(f"select count(*) from orders /*route='/stats',traceparent='{tp}'*/")
    time.sleep(1.2)  # requests judged (trace_idle_ms), and a few windows closed
    assert admin.json("/api/findings", route="/customers")["total"] == 1
    browser.get(admin.base + "/")
    wait_for(browser, "return document.body.dataset.loaded === 'true'")
    endpoints = wait_for(browser, "const t = document.getElementById('endpoints').innerText;"
                                  " return t.includes('/customers') && t")
    assert "/stats" in endpoints and "customers#index" in endpoints
    [row] = [r for r in browser.find_elements("css selector", "#endpoints tbody tr")
             if "/customers" in r.text]
    cells = [c.text for c in row.find_elements("css selector", "td")]
    assert cells[2] == "3" and cells[3] == "11.0" and cells[6] == "1"  # requests, stmts, findings
    row.click()
    wait_for(browser, "const r = document.querySelectorAll('#queries tbody tr[data-fingerprint]');"
                      " return r.length === 2")
    assert "/customers" in browser.find_element("id", "findings").text
    [child] = [r for r in browser.find_elements(
        "css selector", "#queries tbody tr[data-fingerprint]") if "where customer_id" in r.text]
    child.click()
    # (The pane may still show the query shown before the click, also on /customers: wait for
    # this one's figures, 30 calls.)
    routes = wait_for(browser, "const t = document.getElementById('detail-routes').innerText;"
                               " return t.includes('/customers') && t.includes('30 calls') && t")
    assert "10.0 / request" in routes
    wait_for(browser, "return document.getElementById('detail-windows').innerText"
                      ".includes('p95')")


def test_dashboard_pool_panel(admin_proxy: MakeAdmin, db: str, browser: Any) -> None:
    """Transaction pooling: the pools panel shows each pool's figures, the pinned clients and
    the sizing advice; the pool findings are in the findings table."""
    proxy, admin = admin_proxy(pool={"mode": "transaction", "size": 8})
    conns = [psycopg.connect(proxy.dsn(dbname=db), autocommit=True, application_name="web")
             for _ in range(8)]
    try:
        for c in conns:
            c.execute("select 1")
        conns[0].execute("listen dashboard_jobs")  # pins that client
        (pool,) = admin.json("/api/pools")["items"]
        assert pool["advice"], pool
        browser.get(admin.base + "/")
        wait_for(browser, "return document.body.dataset.loaded === 'true'")
        text = wait_for(browser, "const t = document.getElementById('pools').innerText;"
                                 " return t.includes('listen') && t")
        [row] = [r for r in browser.find_elements("css selector", "#pools tbody tr")
                 if db in r.text]
        cells = [c.text for c in row.find_elements("css selector", "td")]
        assert cells[:3] == [db, "postgres", "8"]
        assert cells[6] == "8"  # clients
        assert cells[12] == "1: web (listen)"
        for advice in pool["advice"]:
            assert advice in text
        assert any(a.startswith("application web: at most") for a in pool["advice"])
        findings = wait_for(browser, "const t = document.getElementById('findings').innerText;"
                                     " return t.includes('session_state_in_pool') && t")
        assert "listen dashboard_jobs" in findings
        artifacts = ROOT / "artifacts"
        artifacts.mkdir(exist_ok=True)
        browser.execute_script("document.getElementById('pools').scrollIntoView()")
        assert browser.save_screenshot(str(artifacts / "dashboard-pools.png"))
    finally:
        for c in conns:
            c.close()


def test_dashboard_pool_panel_in_session_mode(admin_proxy: MakeAdmin, db: str,
                                              browser: Any) -> None:
    proxy, admin = admin_proxy()
    run(proxy, db, "select 1")
    browser.get(admin.base + "/")
    wait_for(browser, "return document.body.dataset.loaded === 'true'")
    assert 'pool.mode is "session"' in browser.find_element("id", "pools").text
