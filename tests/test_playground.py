"""GET /playground and the POST /items it searches with, on a real server, and the page driven in a
real headless browser (Playwright with Debian's chromium, which `make install-dev` installs).

The model is the demo's kind (SASRec on ml-100k, with ml-100k.item as its attributes), except that
one movie title is HTML: the page must show it as text and run nothing. Every request the page
sends must be answered without a refusal, and go to the server itself.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from conftest import HOSTILE_TITLE, serving

pytestmark = pytest.mark.server

HOSTILE = HOSTILE_TITLE
HISTORY = ["1", "50", "181"]  # 1 is the item whose title is HOSTILE
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def post(url: str, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


@pytest.fixture(scope="module")
def shop(sasrec_items_tag: str, sasrec_items_server: str) -> SimpleNamespace:
    """SASRec with ml-100k.item as its attributes, item 1's title HOSTILE (the session's server)."""
    return SimpleNamespace(url=sasrec_items_server, tag=sasrec_items_tag)


# ------------------------------------------------------------------ the files, over HTTP


def test_the_page_is_served_with_a_strict_policy(shop):
    page = httpx.get(f"{shop.url}/playground", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self';" in policy and "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), "an inline script"
    assert not re.search(r"\son[a-z]+=", page.text), "an inline event handler"
    for name, media in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        asset = httpx.get(f"{shop.url}/playground/{name}", timeout=30)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media)
        assert asset.headers["content-security-policy"] == policy
        for text in (page.text, asset.text):  # no other origin: everything ships in the package
            assert not re.search(r"https?://", text)
    assert "innerHTML" not in httpx.get(f"{shop.url}/playground/playground.js", timeout=30).text
    slash = httpx.get(f"{shop.url}/playground/", timeout=30)
    assert slash.status_code == 307 and slash.headers["location"].endswith("/playground")
    wrong = httpx.post(f"{shop.url}/playground", timeout=30)
    assert wrong.status_code == 405 and {m.strip() for m in wrong.headers["allow"].split(",")} == {
        "GET",
        "HEAD",
    }
    assert wrong.json() == {"error": f"POST /playground: method not allowed, use {wrong.headers['allow']}"}
    assert httpx.head(f"{shop.url}/playground", timeout=30).status_code == 200


def test_items_search_and_lookup_over_http(shop):
    found = post(shop.url, "/items", {"query": "1", "limit": 3}).json()
    assert [item["id"] for item in found["items"]] == ["1", "10", "100"]
    assert found["items"][0]["attributes"]["movie_title"] == HOSTILE.split()
    star = post(shop.url, "/items", {"query": "star wars"}).json()["items"]
    assert [" ".join(item["attributes"]["movie_title"]) for item in star][:1] == ["Star Wars"]
    looked = post(shop.url, "/items", {"ids": [50, "nope", "181"]}).json()
    assert [item["id"] for item in looked["items"]] == ["50", "181"] and looked["unknown_items"] == ["nope"]
    assert looked["items"][0]["attributes"]["release_year"] == "1977"
    refusals = [
        ({}, "give either ids (a list of item ids) or query (a search text), not both"),
        ({"query": "x" * 101}, "query: String should have at most 100 characters"),
        ({"query": "a b c d e f g h i"}, "query: at most 100 characters and 8 words"),
        ({"query": "   "}, "query: give a few characters of an item id or attribute"),
        ({"query": "star", "limit": 101}, "limit: Input should be less than or equal to 100"),
        ({"ids": [1.5]}, "ids[0]"),
    ]
    for body, fragment in refusals:
        response = post(shop.url, "/items", body)
        assert response.status_code == 400 and fragment in response.json()["error"], (body, response.text)
    not_json = httpx.post(f"{shop.url}/items", content=b"{", timeout=30)
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]
    assert httpx.get(f"{shop.url}/items", timeout=30).status_code == 405


# ------------------------------------------------------------------ the page, in a browser


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's chromium, headless, driven by Playwright (one per module: Playwright's sync API
    runs one event loop per thread)."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.fail("no chromium: `make install-dev` installs Debian's chromium package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def browser_on(chromium: Any, url: str) -> Iterator[SimpleNamespace]:
    """A fresh page on the playground at *url*, with every request, refused answer, console error
    and page error it produced."""
    seen = SimpleNamespace(requests=[], refused=[], errors=[])
    context = chromium.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("request", lambda r: seen.requests.append(r.url))
        page.on("response", lambda r: r.status >= 400 and seen.refused.append((r.url, r.status)))
        page.on("console", lambda m: m.type == "error" and seen.errors.append(m.text))
        page.on("pageerror", lambda e: seen.errors.append(str(e)))
        page.goto(f"{url}/playground")
        page.wait_for_selector("body[data-ready=true]")
        yield SimpleNamespace(page=page, seen=seen, url=url)
    finally:
        context.close()


@pytest.fixture(scope="module")
def browser_page(chromium, shop) -> Iterator[SimpleNamespace]:
    with browser_on(chromium, shop.url) as opened:
        yield opened


def _pick(page, item: str) -> None:
    page.fill("#search", item)
    page.click(f"#matches button.match[data-id='{item}']")
    page.wait_for_selector(f"#history li[data-id='{item}']")


def _shown(page, where: str) -> list[str]:
    return page.eval_on_selector_all(f"{where} li.item", "rows => rows.map(r => r.dataset.id)")


def _recommend(page) -> None:
    page.evaluate("document.getElementById('answers').replaceChildren()")
    page.click("#recommend")
    page.wait_for_selector("#answers .answer li.item")


def test_the_page_answers_as_the_api_does(browser_page, shop):
    page, url = browser_page.page, browser_page.url
    assert page.text_content("#model").startswith(f"{shop.tag} · SASRec")
    for item in HISTORY:
        _pick(page, item)
    page.fill("#topk", "5")
    _recommend(page)
    body = {"sequence": HISTORY, "topk": 5, "exclude_seen": True, "explain": True}
    expected = post(url, "/recommend", body).json()
    assert _shown(page, "#answers") == expected["item_list"]
    scores = page.eval_on_selector_all("#answers li.item .score", "s => s.map(e => e.textContent)")
    assert scores == [f"{score:.4f}" for score in expected["score_list"]]
    reasons = page.eval_on_selector_all("#answers li.item .because", "s => s.map(e => e.textContent)")
    assert len(reasons) == 5
    for text, because in zip(reasons, expected["because"], strict=True):
        assert [part.split(" · ")[0] for part in text.removeprefix("because: ").split("; ")] == because

    # The filters form sends the same filter /recommend takes.
    page.fill(".filter[data-field='class'] input", "Comedy, Drama")
    _recommend(page)
    filtered = post(url, "/recommend", body | {"filters": {"class": ["Comedy", "Drama"]}}).json()
    assert _shown(page, "#answers") == filtered["item_list"] != expected["item_list"]
    page.fill(".filter[data-field='class'] input", "")

    # Any item's similar items on a click.
    first = filtered["item_list"][0]
    page.click(f"#answers li.item[data-id='{first}'] button.pick")
    page.wait_for_selector(f"#similar[data-for='{first}'] li.item")
    similar = post(url, "/similar_items", {"items": [first], "topk": 5}).json()
    assert _shown(page, "#similar") == similar["item_list"]
    assert browser_page.seen.refused == [] and browser_page.seen.errors == []


def test_the_page_shows_html_in_attributes_as_text_and_runs_nothing(browser_page):
    page = browser_page.page
    page.fill("#search", "evil")
    page.wait_for_selector("#matches button.match[data-id='1']")
    assert page.text_content("#matches button.match[data-id='1']") == f"1 · {HOSTILE}"
    if not page.query_selector("#history li[data-id='1']"):
        _pick(page, "1")
    assert page.text_content("#history li[data-id='1'] span") == f"1 · {HOSTILE}"
    assert page.query_selector_all("img") == [] and page.query_selector_all("body script") == []
    assert page.evaluate("window.__pwned") is None
    page.fill("#search", "a b c d e f g h i")  # /items takes 8 words: the page says so, sends nothing
    page.wait_for_selector("#matches li.note")
    assert page.text_content("#matches li.note") == "a search takes at most 8 words"
    assert browser_page.seen.refused == [] and browser_page.seen.errors == []
    origin = browser_page.url + "/"
    assert [u for u in browser_page.seen.requests if not u.startswith(origin)] == []


@pytest.fixture(scope="module")
def two_variants(shop, sasrec_tag, tmp_path_factory) -> Iterator[str]:
    """A server with two variants: the model with attributes, and the same weights without them."""
    routes = tmp_path_factory.mktemp("routes") / "routes.yaml"
    routes.write_text(
        "variants:\n"
        f'  control: {{model: "{shop.tag}", weight: 50}}\n'
        f'  treatment: {{model: "{sasrec_tag}", weight: 50}}\n'
    )
    with serving(shop.tag, RECBOLE_BENTO_ROUTES=str(routes)) as url:
        yield url


def test_the_page_shows_variants_side_by_side(chromium, two_variants, shop, sasrec_tag):
    with browser_on(chromium, two_variants) as opened:
        page, url = opened.page, opened.url
        assert len(page.query_selector_all("#variants input[type=checkbox]:checked")) == 2
        for item in HISTORY:
            _pick(page, item)
        page.fill("#topk", "5")
        _recommend(page)
        body = {"sequence": HISTORY, "topk": 5, "exclude_seen": True, "explain": True}
        for variant, tag in (("control", shop.tag), ("treatment", sasrec_tag)):
            expected = post(url, "/recommend", body | {"variant": variant}).json()
            assert expected["model"] == tag and expected["variant"] == variant
            column = f"#answers .answer[data-variant='{variant}']"
            assert _shown(page, column) == expected["item_list"]
            assert f"model {tag}" in page.text_content(f"{column} .notes")

        # The similar items of an item in a column come from that column's variant.
        column = "#answers .answer[data-variant='treatment']"
        first = _shown(page, column)[0]
        page.click(f"{column} li.item[data-id='{first}'] button.pick")
        page.wait_for_selector(f"#similar[data-for='{first}'] li.item")
        similar = post(url, "/similar_items", {"items": [first], "topk": 5, "variant": "treatment"}).json()
        assert similar["model"] == sasrec_tag and _shown(page, "#similar") == similar["item_list"]

        page.uncheck("#variants input[data-variant='control']")
        _recommend(page)
        assert [c.get_attribute("data-variant") for c in page.query_selector_all("#answers .answer")] == [
            "treatment"
        ]
        assert opened.seen.refused == [] and opened.seen.errors == []
