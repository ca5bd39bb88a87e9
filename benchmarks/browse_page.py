"""The cluster browser at scale (issue 31): write the page for a clusters CSV, then time it in headless Chromium.

    python -m benchmarks.browse_page --csv clusters.csv --data DIR --out PAGE_DIR [--shots DIR] [--big 2000]

Prints and writes PAGE_DIR/../browse_benchmark.json: the page's write time, thumbnails per second and folder size;
in Chromium (the system's chromium, from file://): the time until the index is usable (cards drawn and the first
screen's thumbnails loaded), and the time until a cluster of about ``--big`` members (the largest clusters merged
in the page, as a person would) shows its first screen of thumbnails. ``--shots`` keeps screenshots of both.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from deepclust.commands.browse import write_browse_page

FIRST_SCREEN = """sel => {
  const imgs = [...document.querySelectorAll(sel)].filter(i => i.getBoundingClientRect().top < innerHeight);
  return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""

MERGE_LARGEST = """big => {
  const groups = [...window.deepclustBrowse.groups().values()].sort((a, b) => b.members.length - a.members.length);
  const into = groups[0].id, edits = window.deepclustBrowse.edits();
  let size = groups[0].members.length;
  for (const g of groups.slice(1)) { if (size >= big) break; edits.merged[g.id] = into; size += g.members.length; }
  localStorage.setItem("deepclust-browse:" + window.DEEPCLUST_BROWSE.digest, JSON.stringify(edits));
  return [into, size];
}"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="the page's folder")
    parser.add_argument("--shots", help="a folder for screenshots of the index and the big cluster")
    parser.add_argument("--big", type=int, default=2000, help="members of the opened cluster (largest ones merged)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--labels-out", help="also name every cluster by its majority class in the page and save its "
                        "labels.csv here (for eval --labels; the page's purity is recorded beside it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from playwright.sync_api import sync_playwright

    info = write_browse_page(Path(args.csv), args.data, Path(args.out), workers=args.workers)
    result = {"images": info["images"], "clusters": info["clusters"], "write_seconds": round(info["seconds"], 2),
              "thumbnails_per_second": round(info["images"] / info["seconds"], 1),
              "folder_mib": round(info["bytes"] / 2**20, 1), "sheets": info["sheets"],
              "clusters_js_mib": round((Path(args.out) / "clusters.js").stat().st_size / 2**20, 2)}
    index = (Path(args.out) / "index.html").resolve().as_uri()
    shots = Path(args.shots) if args.shots else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        start = time.perf_counter()
        page.goto(index)
        page.wait_for_selector("#cards .card")
        result["index_cards_seconds"] = round(time.perf_counter() - start, 2)
        page.wait_for_function(FIRST_SCREEN, arg="#cards img", timeout=120_000)
        result["index_usable_seconds"] = round(time.perf_counter() - start, 2)
        if shots:
            page.screenshot(path=str(shots / "browse-index.jpg"), type="jpeg", quality=85)
        into, size = page.evaluate(MERGE_LARGEST, args.big)
        result["big_cluster"] = {"id": into, "members": size}
        page.goto("about:blank")
        start = time.perf_counter()
        page.goto(f"{index}#c={into}")
        page.wait_for_selector("#members img")
        page.wait_for_function(FIRST_SCREEN, arg="#members img", timeout=120_000)
        result["big_cluster_first_screen_seconds"] = round(time.perf_counter() - start, 2)
        result["big_cluster_thumbnails_on_page"] = len(page.query_selector_all("#members img"))
        if shots:
            page.screenshot(path=str(shots / "browse-cluster.jpg"), type="jpeg", quality=85)
        page.evaluate("() => localStorage.clear()")
        if args.labels_out:
            page.goto(index)
            page.wait_for_selector("#cards .card")
            page.click("#name-majority")
            result["page_summary"] = page.inner_text("#summary")
            with page.expect_download() as download:
                page.click("#export-labels")
            shutil.copyfile(download.value.path(), args.labels_out)
            page.evaluate("() => localStorage.clear()")
        browser.close()
    print(json.dumps(result, indent=1))
    (Path(args.out).parent / "browse_benchmark.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
