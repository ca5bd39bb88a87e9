"""The cluster browser (issue 31): `deepclust browse` / `cluster --browse` pages driven in headless Chromium (the
system's chromium package, never a downloaded one), the edits and their exports, labels.csv read back with
--labels, cluster folders, and the messages for bad input."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from browse_helpers import chromium_executable, make_class_folder, read_csv_rows, write_clusters_csv
from playwright.sync_api import Browser, Page, sync_playwright

from deepclust.cli import main

# The clusters of the 18 generated images (red, green, blue: 6 each): k = 4, one green cluster holding a red image.
CLUSTERS = {
    0: ["red/00.png", "red/01.png", "red/02.png", "red/03.png", "red/04.png"],
    1: ["green/00.png", "green/01.png", "green/02.png", "green/03.png", "green/04.png", "green/05.png", "red/05.png"],
    2: ["blue/00.png", "blue/01.png"],
    3: ["blue/02.png", "blue/03.png", "blue/04.png", "blue/05.png"],
}
PURITY = 17 / 18  # majorities 5 + 6 + 2 + 4 of 18 images
SCREENSHOTS = os.environ.get("DEEPCLUST_BROWSE_SCREENSHOTS")  # a folder: keep the screenshots there (README)


def central_first(members: list[str]) -> list[str]:
    """The test CSV gives member j of n (alphabetical) the distance (n - j) / 10: the page must show them reversed."""
    return list(reversed(members))


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_executable(), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, clusters CSV): rows in the folder's path order, not the page's."""
    root = tmp_path_factory.mktemp("browse")
    data = root / "images"
    paths = make_class_folder(data)
    rows = []
    for path in paths:
        cluster = next(c for c, members in CLUSTERS.items() if path in members)
        j, n = CLUSTERS[cluster].index(path), len(CLUSTERS[cluster])
        rows.append((path, cluster, (n - j) / 10, 1 - (n - j) / 20, path.split("/")[0]))
    write_clusters_csv(root / "clusters.csv", rows)
    return data, root / "clusters.csv"


def open_page(browser: Browser, index: Path, fragment: str = "") -> Page:
    page = browser.new_page(viewport={"width": 1200, "height": 800}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("dialog", lambda dialog: dialog.accept())  # the reset's confirm()
    page.goto(index.as_uri() + fragment)
    page.wait_for_selector("#summary:not(:empty)")
    page.errors = errors  # checked by the tests: a script error fails them
    return page


def cards(page: Page) -> dict[int, str]:
    """{cluster: its card's stats line} as shown."""
    return {int(el.get_attribute("data-cluster")): el.query_selector(".stats").inner_text()
            for el in page.query_selector_all("#cards .card")}


def card_names(page: Page) -> dict[int, str]:
    return {int(el.get_attribute("data-cluster")): el.query_selector(".name").inner_text()
            for el in page.query_selector_all("#cards .card")}


def open_cluster(page: Page, cluster: int) -> list[str]:
    """Open a cluster by clicking its card; wait for every thumbnail to load; its members' paths in page order."""
    page.click(f'#cards .card[data-cluster="{cluster}"] .tiles')
    page.wait_for_selector("#cluster-view:not([hidden])")
    page.wait_for_function("[...document.querySelectorAll('#members img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")
    return [img.get_attribute("title") for img in page.query_selector_all("#members img")]


def back_to_index(page: Page) -> None:
    page.click("#cluster-view .back")
    page.wait_for_selector("#index-view:not([hidden])")


def download(page: Page, button: str) -> str:
    with page.expect_download() as info:
        page.click(button)
    return Path(info.value.path()).read_text()


def test_browser_page_cards_cluster_edits_reload_and_exports(browser, folder, tmp_path, capsys, trained_checkpoint):
    data, clusters_csv = folder
    out = tmp_path / "page"
    assert main(["browse", str(clusters_csv), "--data", str(data), "--out", str(out)]) == 0
    assert "18 images in 4 clusters" in capsys.readouterr().out
    tiles = sorted((out / "tiles").iterdir())
    assert [t.name for t in tiles] == ["sheet-00000.jpg"]  # thumbnails as a sprite sheet beside the page
    assert "base64" not in (out / "index.html").read_text() + (out / "clusters.js").read_text()

    page = open_page(browser, out / "index.html")
    shown = cards(page)
    assert sorted(shown) == [0, 1, 2, 3]  # one card per cluster: k = 4
    assert shown[1].startswith("7 images") and "green 85.7%" in shown[1]  # size, confidence, majority and purity
    assert "purity 94.4%" in page.inner_text("#summary")
    first = [int(el.get_attribute("data-cluster")) for el in page.query_selector_all("#cards .card")]
    assert first == [1, 0, 3, 2]  # by size, descending
    page.select_option("#sort", "purity")
    page.uncheck("#descending")
    assert int(page.query_selector("#cards .card").get_attribute("data-cluster")) == 1  # the least pure first
    page.fill("#search", "blue")
    assert sorted(cards(page)) == [2, 3]  # searched by majority class
    page.fill("#search", "")
    if SCREENSHOTS:
        page.select_option("#sort", "size")
        page.check("#descending")
        page.screenshot(path=str(Path(SCREENSHOTS) / "browse-index-small.png"))

    members = open_cluster(page, 1)
    assert members == central_first(CLUSTERS[1])  # all members, most central first, each path on hover
    assert len(page.query_selector_all("#members img")) == 7

    # the round trip of purity: name every cluster by its majority class, export, read back (below)
    back_to_index(page)
    page.click("#name-majority")
    assert card_names(page) == {0: "red", 1: "green", 2: "blue", 3: "blue"}
    majority_labels = download(page, "#export-labels")
    page.click("#reset")
    assert card_names(page) == {c: f"cluster {c}" for c in CLUSTERS}  # the reset forgets every edit

    # rename 3, merge 2 and 3, move red/05 from 1 to 0, exclude red/00
    page.goto((out / "index.html").as_uri() + "#c=3")
    page.wait_for_selector("#cluster-view:not([hidden])")
    page.fill("#cluster-name", "blue ones")
    page.press("#cluster-name", "Enter")
    assert page.inner_text("#cluster-title").startswith("blue ones")
    back_to_index(page)
    assert "blue ones" in page.inner_text('#cards .card[data-cluster="3"] h3')
    page.check('#cards .card[data-cluster="2"] .tick')
    page.check('#cards .card[data-cluster="3"] .tick')
    page.click("#merge")
    assert sorted(cards(page)) == [0, 1, 2]
    assert cards(page)[2].startswith("6 images")
    assert "blue ones" in page.inner_text('#cards .card[data-cluster="2"] h3')  # the part's name kept
    # merged: both clusters' members by distance (ties: cluster 2's first), each image's own to its old centre
    assert open_cluster(page, 2) == ["blue/01.png", "blue/05.png", "blue/00.png", "blue/04.png", "blue/03.png",
                                     "blue/02.png"]
    back_to_index(page)
    open_cluster(page, 1)
    page.click('#members img[title="red/05.png"]')
    page.fill("#move-target", "0")
    page.click("#move")
    assert "red/05.png" not in [i.get_attribute("title") for i in page.query_selector_all("#members img")]
    back_to_index(page)
    assert "red/05.png" in open_cluster(page, 0)
    page.click('#members img[title="red/00.png"]')
    page.click("#exclude")
    assert "red/00.png" not in [i.get_attribute("title") for i in page.query_selector_all("#members img")]
    back_to_index(page)
    expected_sizes = {0: 5, 1: 6, 2: 6}
    assert {c: int(s.split()[0]) for c, s in cards(page).items()} == expected_sizes

    page.reload()  # the edits live in localStorage under the CSV's digest
    page.wait_for_selector("#cards .card")
    assert {c: int(s.split()[0]) for c, s in cards(page).items()} == expected_sizes
    assert "blue ones" in page.inner_text('#cards .card[data-cluster="2"] h3')
    assert "4 edits" in page.inner_text("#edit-count") or "edits kept" in page.inner_text("#edit-count")

    labels = read_csv_rows_text(download(page, "#export-labels"))
    expected = [["path", "label"]]
    for path in sorted(p for members in CLUSTERS.values() for p in members):  # the CSV's order
        if path == "red/00.png":
            continue  # excluded
        label = "blue ones" if path.startswith("blue") else "1" if path.startswith("green") else "0"
        expected.append([path, label])
    assert labels == expected
    edited = read_csv_rows_text(download(page, "#export-csv"))
    assert edited[0] == ["path", "cluster", "distance", "confidence", "label", "name"]
    by_path = {row[0]: row for row in edited[1:]}
    assert len(by_path) == 18 and by_path["red/00.png"][1] == "-1" and by_path["red/05.png"][1] == "0"
    assert by_path["blue/05.png"][1:2] + by_path["blue/05.png"][5:] == ["2", "blue ones"]
    original = read_csv_rows(clusters_csv)
    assert [row[0] for row in edited[1:]] == [row[0] for row in original[1:]]  # the CSV's order
    assert all(by_path[row[0]][2:5] == row[2:5] for row in original[1:])  # the other cells as they were
    if SCREENSHOTS:
        page.goto((out / "index.html").as_uri() + "#c=2")
        page.wait_for_selector("#cluster-view:not([hidden])")
        page.screenshot(path=str(Path(SCREENSHOTS) / "browse-cluster-small.png"))
    assert page.errors == []
    page.close()

    # labels.csv back in: named by majority class, the labels agree with the class folders as often as the page's
    # purity says, and eval prints that agreement
    labels_file = tmp_path / "labels.csv"
    labels_file.write_text(majority_labels)
    assert [row[1] for row in read_csv_rows(labels_file)[1:]].count("green") == 7
    assert main(["eval", "--checkpoint", str(trained_checkpoint), "--data", str(data), "--test-data", str(data),
                 "--labels", str(labels_file), "--protocol", "knn", "--k", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["labels_agreement"] == pytest.approx(100 * PURITY)
    assert 0 <= result["knn_top1"] <= 100


def read_csv_rows_text(text: str) -> list[list[str]]:
    return list(csv.reader(text.splitlines()))
