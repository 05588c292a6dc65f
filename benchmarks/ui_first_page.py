"""The MLflow UI's first page, in headless Chromium (issue #24): a fresh browser profile (empty localStorage, as a
new user's) opens an experiment, and a stream's runs, by the links the README gives; prints where it landed and how
long until the runs table showed its first row. Needs Playwright and a Chromium, neither of them a project
dependency:

  apt-get install chromium && python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
  /tmp/pw/bin/python benchmarks/ui_first_page.py http://127.0.0.1:5000 <experiment id> [<stream run name>]

(On benchmarks/bench_10k_runs.py's 10,000-run experiment: run that with --keep, then this against its server.)
"""
import json
import sys
import time

from playwright.sync_api import sync_playwright


def visit(browser, url: str, row_text: str) -> dict:
    ctx = browser.new_context()  # a fresh profile: MLflow 3.17 keeps its GenAI / Model training switch here
    page = ctx.new_page()
    t0 = time.perf_counter()
    page.goto(url)
    out = {"url": url}
    try:
        page.get_by_text(row_text, exact=False).first.wait_for(timeout=60000)
        out["first_row_s"] = round(time.perf_counter() - t0, 2)
    except Exception as e:  # noqa: BLE001
        out["first_row_s"] = None
        out["error"] = str(e).splitlines()[0][:200]
    body = page.inner_text("body")
    out["shows"] = {k: k in body for k in ("Traces", "Detect issues", "Runs", "Model training", "GenAI")}
    out["final_url"] = page.url
    ctx.close()
    return out


def main() -> None:
    base, exp = sys.argv[1], sys.argv[2]
    stream = sys.argv[3] if len(sys.argv) > 3 else None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        res = [visit(browser, f"{base}/#/experiments/{exp}", "stream-"),  # the plain link: where a new user lands
               visit(browser, f"{base}/#/experiments/{exp}/runs?workflowType=machine_learning", "stream-")]
        if stream:
            q = f"tags.ksm_sequence = '{stream}'"
            res.append(visit(browser, f"{base}/#/experiments/{exp}/runs?workflowType=machine_learning&searchFilter="
                                      + q.replace(" ", "%20").replace("'", "%27").replace("=", "%3D"), "stream-"))
        browser.close()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
