"""Screenshots of the review page of a running service, for docs/review.md.

    .venv/bin/python scripts/review_screenshots.py --url http://127.0.0.1:8000 --job JOB_ID --out docs/img

Opens `/ui/` in headless Chromium (Debian's package), logs in with `VESSA_API_TOKEN` when it is set,
and saves the job list, the job's cases (least trusted first) and the viewer on the least trusted case
at its middle slice. It only reads: nothing is approved or uploaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("error: no Chromium on PATH: apt-get install chromium (scripts/bootstrap.sh does)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--job", required=True, help="a finished job's id (GET /v1/jobs)")
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    ap.add_argument("--prefix", default="review-")
    args = ap.parse_args()

    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    args.out.mkdir(parents=True, exist_ok=True)
    token = os.environ.get("VESSA_API_TOKEN")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(args.url.rstrip("/") + "/ui/")
        if token:
            page.fill("#token", token)
            page.click("#login-form button")
        row = page.locator(f"#jobs tr[data-job='{args.job}']")
        expect(row).to_be_visible()
        page.screenshot(path=str(args.out / f"{args.prefix}jobs.png"))
        row.locator("a").click()
        rows = page.locator("#cases tbody tr")
        expect(rows.first).to_be_visible()
        n = rows.count()
        expect(page.locator("#cases img.thumb[src^='blob:']")).to_have_count(n)
        page.screenshot(path=str(args.out / f"{args.prefix}cases.png"), full_page=True)
        first = rows.first.get_attribute("data-case")
        page.locator(f"#cases tr[data-case='{first}'] a").click()
        expect(page.locator("#viewer-case")).to_have_text(first)
        depth = int(page.locator("#slice").get_attribute("max") or 0)
        mid = str(depth // 2)
        page.locator("#slice").evaluate(f"el => {{ el.value = '{mid}'; el.dispatchEvent(new Event('input')); }}")
        expect(page.locator("#slice-img")).to_have_attribute("data-z", mid)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(args.out / f"{args.prefix}viewer.png"))
        browser.close()
    print(f"saved {args.prefix}jobs.png, {args.prefix}cases.png, {args.prefix}viewer.png under {args.out}")


if __name__ == "__main__":
    main()
