"""The dashboard end to end: a worker and the dashboard in their own processes, driven by
Debian's Chromium through Playwright (never a browser Playwright downloads)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from machinery import Config, Server, Signature
from support.asgi import answers
from support.configs import push_raw
from support.processes import stop_processes
from support.services import IN_CI, free_port
from support.waiting import wait_until

TESTS = Path(__file__).resolve().parent  # apps.observed is tests/e2e/apps/observed.py
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUEUE = "dash_q"


def machinery(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("machinery")), *args],
        cwd=log.parent,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def chromium() -> str:
    if not shutil.which(CHROMIUM):
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture
def system(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    env = {
        **os.environ,
        "BROKER": f"sqlite:///{tmp_path / 'dash.db'}",
        "DEFAULT_QUEUE": QUEUE,
        "PYTHONPATH": str(TESTS),
    }
    client = Server(Config(broker=env["BROKER"], default_queue=QUEUE))
    client.send_task(Signature("work", args=["warm-up"]))  # creates the database before the others open it
    port = free_port()
    worker = machinery(
        "worker", "-A", "apps.observed:server", "-c", "2", "--no-periodic", env=env, log=tmp_path / "w.log"
    )
    board = machinery("dashboard", "-A", "apps.observed:server", "--port", str(port), env=env, log=tmp_path / "d.log")
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: answers(url), timeout=30, what="the dashboard answering")
        yield client, url
    finally:
        stop_processes([worker, board], timeout=20)


def test_the_dashboard_shows_workers_queues_tasks_and_requeues_a_dead_letter(
    chromium: str, system: tuple[Server, str], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    client, url = system
    running = client.send_task(Signature("slow", args=[60.0]))
    failed = client.send_task(Signature("fail", args=["it broke"]))
    push_raw(client, b"\x00 not a task")
    wait_until(lambda: client.dead_letters(QUEUE), timeout=30, what="the worker dead-lettering the bad message")

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = context.new_page()
            page.goto(url)
            page.wait_for_selector("tr.worker", timeout=30_000)
            page.wait_for_selector(f'tr.queue[data-queue="{QUEUE}"]')
            link = page.wait_for_selector(f'a[href="/tasks/{running.task_uuid}"]', timeout=30_000)
            assert link is not None
            link.click()
            page.wait_for_url(f"**/tasks/{running.task_uuid}")
            assert page.inner_text("td.state") == "STARTED"
            assert "slow" in page.inner_text("#task")

            # A task that failed before the dashboard saw it: its page shows the error and the
            # traceback, and from then on it is among the recent failures.
            wait_until(
                lambda: (s := client.result(failed.task_uuid).state()) is not None and s.state == "FAILURE",
                timeout=30,
                what="the failure",
            )
            page.goto(f"{url}tasks/{failed.task_uuid}")
            assert page.inner_text("td.state") == "FAILURE"
            assert "it broke" in page.inner_text("#task pre")

            page.goto(url + "dead")
            page.wait_for_selector(f'section.dead-queue[data-queue="{QUEUE}"] tr.letter', timeout=30_000)
            page.on("dialog", lambda dialog: dialog.accept())
            page.click(f'section.dead-queue[data-queue="{QUEUE}"] button:has-text("Requeue all")')
            page.wait_for_selector("#message:has-text('Requeued 1 dead letter(s)')", timeout=30_000)

            page.goto(url)
            page.wait_for_selector(f'#failures a[href="/tasks/{failed.task_uuid}"]', timeout=30_000)
            page.wait_for_selector(f'a[href="/tasks/{running.task_uuid}"]', timeout=30_000)
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        finally:
            context.close()
    if os.environ.get("DASHBOARD_SCREENSHOT"):
        shutil.copy(tmp_path / "dashboard.png", os.environ["DASHBOARD_SCREENSHOT"])
