"""The privacy portal in a real browser (Debian's Chromium driven by Playwright).

Journey 1: sign in with the mailed code, give and withdraw a consent with receipts,
see a team's read in "Who read my story", take the data, erase the story and get
the certificate. Journey 2: the consent switches by keyboard alone. Plus GPC.
Every page is photographed at desktop and phone width (tests/e2e/screenshots/).
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import jwt
import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import SCREENSHOTS, Portal, shoot

pytestmark = pytest.mark.browser

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'"
)
DOCS = Path(__file__).parents[2] / "docs"


def sign_in(page: Page, portal: Portal, email: str) -> None:
    page.goto(portal.base + "/portal/")
    expect(page).to_have_url(re.compile(r"/portal/sign-in$"))
    page.get_by_label("Your e-mail address").fill(email)
    page.get_by_role("button", name="Send me a code").click()
    expect(page.get_by_role("heading", name="Enter your code")).to_be_visible()
    page.get_by_label("Sign-in code").fill(portal.code_for(email))
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/portal/story$"))


def verify_jws(portal: Portal, token: str) -> dict[str, Any]:
    """Check a receipt or certificate against the service's published keys."""
    with portal.api() as api:
        jwks = api.get("/.well-known/jwks.json").json()
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwt.PyJWKSet.from_dict(jwks).keys if k.key_id == kid)
    payload = jwt.PyJWS().decode(token, key.key, algorithms=["EdDSA"])
    claims: dict[str, Any] = json.loads(payload)
    return claims


def consent_row(page: Page, purpose: str) -> Any:
    return page.locator(f"#purpose-{purpose.replace('.', '-')}")


def test_journey_sign_in_consent_access_export_erase(page: Page, portal: Portal) -> None:
    """The whole customer journey, with the security properties checked on the way."""
    name = "Mira Lindqvist"
    customer_id, email = portal.new_customer(name)
    seen_urls: list[str] = []
    titles: list[str] = []
    page.on("request", lambda r: seen_urls.append(r.url))
    page.on("load", lambda p: titles.append(p.title()))

    # --- sign in with the code from the outbox ---------------------------------------
    page.goto(portal.base + "/portal/")
    expect(page).to_have_url(re.compile(r"/portal/sign-in$"))
    shoot(page, "01-sign-in")
    page.get_by_label("Your e-mail address").fill(email)
    page.get_by_role("button", name="Send me a code").click()
    expect(page.get_by_role("heading", name="Enter your code")).to_be_visible()
    shoot(page, "02-code")
    page.get_by_label("Sign-in code").fill("00000000")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("That code is wrong")).to_be_visible()
    page.get_by_label("Sign-in code").fill(portal.code_for(email))
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/portal/story$"))

    cookie = next(c for c in page.context.cookies() if c["name"] == "sv_session")
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/portal"
    assert cookie["secure"] is False  # secure_cookies is off on loopback test servers
    assert page.evaluate("document.cookie") == ""  # invisible to scripts

    # --- my story: profile and chapters by category, in plain words ------------------
    response = page.reload()
    assert response is not None
    assert response.headers["content-security-policy"].startswith(CSP)
    assert "unsafe-inline" not in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"
    expect(page.get_by_role("heading", name="My story", level=1)).to_be_visible()
    expect(page.get_by_text(name)).to_be_visible()
    expect(page.get_by_role("heading", name=re.compile("Support tickets"))).to_be_visible()
    expect(page.get_by_text("Sole came loose after two weeks")).to_be_visible()
    expect(
        page.get_by_role("heading", name=re.compile("Invoices, which tax law requires"))
    ).to_be_visible()
    shoot(page, "03-story")

    # --- give and withdraw a consent; each change shows its signed receipt -------------
    page.get_by_role("link", name="My consents").click()
    row = consent_row(page, "marketing.email")
    expect(row).to_contain_text("Newsletters and offers by e-mail")
    expect(row).to_contain_text("Your consent")
    expect(row).to_contain_text("Off: not given")
    expect(consent_row(page, "service.support")).to_contain_text("Cannot be switched off")
    row.get_by_role("button", name="Give consent").click()
    receipt = page.locator("section.receipt")
    expect(receipt).to_contain_text("You gave your consent to")
    expect(receipt).to_be_focused()
    expect(consent_row(page, "marketing.email")).to_contain_text("On: consent given")
    expect(consent_row(page, "marketing.email")).to_contain_text("Since")
    claims = verify_jws(portal, page.locator("#receipt-jws").inner_text().strip())
    assert "marketing.email" in json.dumps(claims)
    with page.expect_download() as dl:
        page.get_by_role("link", name="Download the receipt").click()
    downloaded = Path(dl.value.path()).read_text().strip()
    assert downloaded == page.locator("#receipt-jws").inner_text().strip()

    consent_row(page, "marketing.email").get_by_role("button", name="Withdraw consent").click()
    expect(page.locator("section.receipt")).to_contain_text("You withdrew your consent to")
    expect(consent_row(page, "marketing.email")).to_contain_text("Off: consent withdrawn")
    withdrawn = verify_jws(portal, page.locator("#receipt-jws").inner_text().strip())
    assert withdrawn != claims
    # a second purpose, so the screenshot shows both states
    consent_row(page, "personalization").get_by_role("button", name="Give consent").click()
    expect(consent_row(page, "personalization")).to_contain_text("On: consent given")
    shoot(page, "04-consents")
    SCREENSHOTS.mkdir(exist_ok=True)
    DOCS.mkdir(exist_ok=True)
    shutil.copyfile(SCREENSHOTS / "04-consents-desktop.png", DOCS / "portal-consents.png")

    # the API agrees with what the page shows
    with portal.api() as api:
        resp = api.get(f"/v1/customers/{customer_id}/consents", headers=portal.team_keys["support"])
        assert resp.status_code == 200, resp.text
        states = {c["purpose"]: c["state"] for c in resp.json()["items"]}
        assert states["marketing.email"] == "withdrawn"
        assert states["personalization"] == "granted"

    # --- a team reads the story; "Who read my story" shows it --------------------------
    page.get_by_role("link", name="Who read my story").click()
    expect(page.get_by_text("Nobody has read your story yet.")).to_be_visible()
    with portal.api() as api:
        resp = api.get(
            f"/v1/customers/{customer_id}/story?purpose=service.support",
            headers=portal.team_keys["support"],
        )
        assert resp.status_code == 200, resp.text
    page.reload()
    read = page.locator("li.read").first
    expect(read).to_contain_text("Support team")
    expect(read).to_contain_text("Helping you with orders, deliveries and support requests")
    expect(read).to_contain_text("Your name")
    expect(read).to_contain_text("Support tickets")
    expect(read).to_contain_text("Kept from them")  # the policy withholds the insights
    shoot(page, "05-access")

    # --- take my data: JSON and ZIP ---------------------------------------------------
    page.get_by_role("link", name="Take my data").click()
    shoot(page, "06-export")
    with page.expect_download() as dl:
        page.get_by_role("link", name="Download as JSON").click()
    assert dl.value.suggested_filename == "my-story.json"
    export = json.loads(Path(dl.value.path()).read_text())
    text = json.dumps(export)
    assert name in text
    assert "Sole came loose after two weeks" in text
    with page.expect_download() as dl:
        page.get_by_role("link", name="Download as ZIP").click()
    assert dl.value.suggested_filename == "my-story.zip"
    with zipfile.ZipFile(dl.value.path()) as zf:
        assert "export.json" in zf.namelist()
        assert name in zf.read("export.json").decode()

    # --- erase my story ----------------------------------------------------------------
    page.get_by_role("link", name="Erase my story").click()
    keep = page.locator("section.keep")
    expect(keep).to_contain_text("Invoices, which tax law requires us to keep")
    expect(keep).to_contain_text("2 March 2034")  # the invoice of 2 March 2024 + 10 years
    expect(page.locator("section", has_text="What will be erased")).to_contain_text(
        "Support tickets"
    )
    shoot(page, "07-erase")
    page.get_by_role("button", name="Erase my story").click()  # not confirmed yet
    expect(page).to_have_url(re.compile(r"/portal/erase$"))
    page.get_by_label("I understand that my story will be erased").check()
    page.get_by_role("button", name="Erase my story").click()
    expect(page).to_have_url(re.compile(r"/portal/requests/[0-9a-f-]{36}$"))
    expect(page.locator("#request-status")).to_have_text("Completed")
    expect(page.get_by_text("Your story has been erased.")).to_be_visible()
    certificate = page.locator("#certificate").inner_text().strip()
    cert = verify_jws(portal, certificate)
    assert cert["typ"] == "erasure-certificate"
    assert "support.ticket" in cert["categories_erased"]
    assert [h["category"] for h in cert["categories_held"]] == ["commerce.invoice"]
    with page.expect_download() as dl:
        page.get_by_role("link", name="Download the certificate").click()
    assert Path(dl.value.path()).read_text().strip() == certificate
    shoot(page, "08-certificate")

    page.get_by_role("link", name="All my requests").click()
    row = page.locator("table.requests tbody tr").first
    expect(row).to_contain_text("Erase my story")
    expect(row).to_contain_text("Completed")
    shoot(page, "09-requests")
    # the story itself is gone: other pages lead back to the requests
    page.goto(portal.base + "/portal/story")
    expect(page).to_have_url(re.compile(r"/portal/requests$"))
    with portal.api() as api:
        resp = api.get(
            f"/v1/customers/{customer_id}/story?purpose=service.support",
            headers=portal.team_keys["support"],
        )
        assert resp.status_code in (403, 404, 410), resp.text

    # --- sign out ----------------------------------------------------------------------
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_text("You are signed out.")).to_be_visible()
    page.goto(portal.base + "/portal/requests")
    expect(page).to_have_url(re.compile(r"/portal/sign-in$"))

    # no personal value ever appeared in a URL or a page title
    for value in (email, name, email.split("@")[0]):
        assert not [u for u in seen_urls if value in u or value.replace(" ", "+") in u]
        assert not [t for t in titles if value in t]


def _focused(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(
        """() => {
            const el = document.activeElement;
            const s = getComputedStyle(el);
            return {
                tag: el.tagName.toLowerCase(),
                text: (el.textContent || '').trim().replace(/\\s+/g, ' '),
                row: el.closest('li.consent') ? el.closest('li.consent').id : null,
                label: el.labels && el.labels.length ? el.labels[0].textContent.trim() : null,
                focusVisible: el.matches(':focus-visible'),
                outline: s.outlineStyle + ' ' + s.outlineWidth,
                background: s.backgroundColor,
            };
        }"""
    )
    return result


def tab_to(page: Page, want: Any, limit: int = 60) -> dict[str, Any]:
    for _ in range(limit):
        page.keyboard.press("Tab")
        info = _focused(page)
        if want(info):
            return info
    raise AssertionError("Tab never reached the wanted control")


FOCUS_YELLOW = "rgb(255, 191, 0)"


def assert_visible_focus(info: dict[str, Any]) -> None:
    """The focused control shows it: a 2px+ outline, or (navigation links on the dark
    header) the yellow focus background."""
    assert info["focusVisible"], info
    style, width = info["outline"].split(" ", 1)
    outlined = style != "none" and float(width.removesuffix("px")) >= 2
    assert outlined or info["background"] == FOCUS_YELLOW, info


def test_keyboard_only_consent_switches(page: Page, portal: Portal) -> None:
    """Sign in, reach the consents and switch one on and off again by keyboard alone,
    with a visible focus indicator at every step."""
    _, email = portal.new_customer("Tomasz Keyes")
    page.goto(portal.base + "/portal/sign-in")
    first = tab_to(page, lambda i: i["tag"] == "a")
    assert first["text"] == "Skip to content"
    expect(page.get_by_role("link", name="Skip to content")).to_be_in_viewport()
    assert_visible_focus(first)
    field = tab_to(page, lambda i: i["label"] == "Your e-mail address")
    assert_visible_focus(field)
    page.keyboard.type(email)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Enter your code")).to_be_visible()
    expect(page.get_by_label("Sign-in code")).to_be_focused()  # focus lands on the field
    page.keyboard.type(portal.code_for(email))
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/portal/story$"))

    link = tab_to(page, lambda i: i["text"] == "My consents")
    assert_visible_focus(link)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/portal/consents$"))

    switch = tab_to(page, lambda i: i["row"] == "purpose-analytics-profiling")
    assert switch["tag"] == "button"
    assert switch["text"] == "Give consent"
    assert_visible_focus(switch)
    page.screenshot(path=str(SCREENSHOTS / "10-consents-keyboard-focus-desktop.png"))
    page.keyboard.press("Enter")
    expect(page.locator("section.receipt")).to_contain_text("You gave your consent to")
    expect(page.locator("section.receipt")).to_be_focused()  # the news gets the focus
    expect(consent_row(page, "analytics.profiling")).to_contain_text("On: consent given")

    switch = tab_to(page, lambda i: i["row"] == "purpose-analytics-profiling")
    assert switch["text"] == "Withdraw consent"
    assert_visible_focus(switch)
    page.keyboard.press("Space")
    expect(page.locator("section.receipt")).to_contain_text("You withdrew your consent to")
    expect(consent_row(page, "analytics.profiling")).to_contain_text("Off: consent withdrawn")

    # objecting to a legitimate-interest purpose, also by keyboard
    switch = tab_to(page, lambda i: i["row"] == "purpose-sales-outreach")
    assert switch["text"] == "Object"
    page.keyboard.press("Enter")
    expect(page.locator("section.receipt")).to_contain_text("You objected to")
    expect(consent_row(page, "sales.outreach")).to_contain_text("Off: you objected")


def test_gpc_is_honoured_and_shown(browser: Any, portal: Portal) -> None:
    """With Sec-GPC: 1 the sharing purpose is opted out, and the page says so."""
    _, email = portal.new_customer("Ines Gracia")
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, extra_http_headers={"Sec-GPC": "1"}
    )
    page = context.new_page()
    try:
        sign_in(page, portal, email)
        page.goto(portal.base + "/portal/consents")
        expect(page.locator("#gpc-note")).to_contain_text("Global Privacy Control is on")
        sharing = consent_row(page, "sharing.partners")
        expect(sharing).to_contain_text("opted out by your browser's Global Privacy Control")
        expect(sharing).to_contain_text("Off while Global Privacy Control is on")
        expect(sharing.get_by_role("button")).to_have_count(0)
        shoot(page, "11-consents-gpc")
    finally:
        context.close()
