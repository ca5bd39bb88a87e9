"""The cluster browser (issue 31): `deepclust browse` / `cluster --browse` pages driven in headless Chromium (the
system's chromium package, never a downloaded one), the edits and their exports, labels.csv read back with
--labels, cluster folders, and the messages for bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from browse_helpers import chromium_executable, make_class_folder, read_csv_rows, write_clusters_csv
from PIL import Image
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
    # two names (3's, and 2's taken from it by the merge), a merge, a move and an exclusion
    assert page.inner_text("#edit-count") == "5 edits kept in this browser"

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


def test_large_cluster_is_paged_and_an_index_csv_browses_any_source(browser, tmp_path, capsys):
    """An index CSV of digits (no files): a 450-member cluster shows 200 thumbnails a page, lazily loaded."""
    rows = [["index", "cluster", "confidence"]] + [[str(i), "0" if i < 450 else "1", f"{1 - i / 1000:.3f}"]
                                                   for i in range(500)]
    clusters_csv = tmp_path / "digits.csv"
    clusters_csv.write_text("\n".join(",".join(r) for r in rows) + "\n")
    out = tmp_path / "page"
    assert main(["browse", str(clusters_csv), "--data", "digits", "--out", str(out), "--thumb-size", "48"]) == 0
    sheets = sorted((out / "tiles").iterdir())
    assert len(sheets) == 5 and Image.open(sheets[0]).size == (480, 480)  # 500 tiles of 48 px, 10 x 10 a sheet
    page = open_page(browser, out / "index.html", "#c=0")
    page.wait_for_selector("#members img")
    sizes = []
    for number in (1, 2, 3):
        page.goto((out / "index.html").as_uri() + f"#c=0&p={number}")
        page.wait_for_selector(f"#member-pager button.current:text-is('{number}')")
        titles = [img.get_attribute("title") for img in page.query_selector_all("#members img")]
        sizes.append(len(titles))
        assert titles[0] == str(200 * (number - 1))  # by confidence, descending: the CSV's order here
    assert sizes == [200, 200, 50]
    lazy = page.eval_on_selector_all("#members img", "imgs => imgs.every(i => i.loading === 'lazy')")
    assert lazy
    assert page.eval_on_selector("#members img", "i => i.getBoundingClientRect().width") == 48  # one cell shown
    page.wait_for_function("document.querySelector('#members img').naturalWidth > 0")
    assert page.errors == []
    page.close()


def test_bad_input_gives_a_clear_message(browser, folder, tmp_path, capsys):
    data, clusters_csv = folder

    def refused(csv_text: str, data_dir: Path = data) -> str:
        bad = tmp_path / "bad.csv"
        bad.write_text(csv_text)
        assert main(["browse", str(bad), "--data", str(data_dir), "--out", str(tmp_path / "never")]) == 2
        return capsys.readouterr().err

    err = refused("file,group\nred/00.png,0\n")
    assert "lacks the column(s) path (or index) and cluster" in err and "'file,group'" in err
    err = refused("path,distance\nred/00.png,0.1\n")
    assert "lacks the column(s) cluster" in err
    err = refused("path,cluster,distance\n")
    assert "0 rows" in err and "nothing to browse" in err
    err = refused("path,cluster\nred/00.png,zero\n")
    assert "line 2" in err and "'zero' is not an integer" in err
    err = refused("path,cluster\nred/00.png,0\n", data_dir=tmp_path)
    assert "none of the 1 paths" in err and "--data must be the folder the paths are relative to" in err
    assert not (tmp_path / "never").exists()

    # a missing file and an unreadable one: placeholder tiles and a count, not a failed page
    broken = tmp_path / "with_broken"
    broken.mkdir()
    for name in ("red", "green"):
        (broken / name).symlink_to(data / name)
    (broken / "blue").mkdir()
    (broken / "blue" / "bad.png").write_bytes(b"not a png at all")
    text = clusters_csv.read_text() + "blue/bad.png,3,0.9,0.1,blue\n"
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(text)
    out = tmp_path / "page"
    assert main(["browse", str(mixed), "--data", str(broken), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "6 missing, 1 unreadable" in said  # blue/00..05 are not in this folder
    page = open_page(browser, out / "index.html", "#c=3")
    page.wait_for_selector("#members img")
    assert "6 image file(s) of the CSV were not found" in page.inner_text("#warnings")
    assert "1 image(s) could not be read" in page.inner_text("#warnings")
    bad = page.query_selector_all("#members img.bad")
    assert len(bad) == 5 and "blue/bad.png (unreadable image)" in [b.get_attribute("title") for b in bad]
    page.wait_for_function("[...document.querySelectorAll('#members img')].every(i => i.naturalWidth > 0)")
    assert page.errors == []
    page.close()


def test_cluster_browse_folders_and_the_report_link(trained_run, folder, tmp_path, capsys):
    data, _ = folder
    run = tmp_path / "run"  # a copy of the shared tiny run: its folder gets a page and a report
    shutil.copytree(trained_run, run)
    trained_checkpoint = run / "checkpoint.pt"
    out_csv, page, links = run / "clusters.csv", run / "browse", tmp_path / "by_cluster"
    assert main(["cluster", "--checkpoint", str(trained_checkpoint), "--data", str(data), "--k", "3", "--out",
                 str(out_csv), "--browse", str(page), "--folders", str(links)]) == 0
    said = capsys.readouterr().out
    assert "18 images in 3 clusters" in said and "wrote 3 cluster folders" in said
    script = (page / "clusters.js").read_text()
    payload = json.loads(script[script.index("=") + 1:].strip().rstrip(";"))
    assert payload["map"]["ids"] == [0, 1, 2] and all(0 <= v <= 1 for v in payload["map"]["x"] + payload["map"]["y"])
    assert all(len(near) == 2 for near in payload["map"]["near"])  # each cluster's nearest: the other two
    rows = read_csv_rows(out_csv)[1:]
    linked = sorted(p for p in links.rglob("*") if p.is_symlink())
    assert len(linked) == 18 and sorted(d.name for d in links.iterdir()) == ["cluster_0000", "cluster_0001",
                                                                             "cluster_0002"]
    for row in rows:  # each image linked in its cluster's folder, pointing at the file
        link = links / f"cluster_{int(row[1]):04d}" / row[0].replace("/", "__")
        assert link.resolve() == (data / row[0]).resolve()

    # the page's edited CSV names the folders; a non-empty target is refused
    edited = tmp_path / "edited.csv"
    edited.write_text("path,cluster,name\n" + "".join(f"{r[0]},{r[1]},{'odd one' if r[1] == '0' else ''}\n"
                                                      for r in rows))
    named = tmp_path / "named"
    assert main(["browse", str(edited), "--data", str(data), "--folders", str(named)]) == 0
    assert "odd one" in {d.name for d in named.iterdir()}
    assert main(["browse", str(edited), "--data", str(data), "--folders", str(named)]) == 2
    assert "not an empty folder" in capsys.readouterr().err

    # the run's own training data (200 digits, a subset: no files): the pixels just clustered make the tiles
    assert main(["cluster", "--checkpoint", str(trained_checkpoint), "--k", "4", "--out", str(tmp_path / "d.csv"),
                 "--browse", str(tmp_path / "digits_page")]) == 0
    assert "200 images in 4 clusters, 2 thumbnail sheets" in capsys.readouterr().out
    script = (tmp_path / "digits_page" / "clusters.js").read_text()
    assert '"key":"index"' in script and '"problem":{}' in script

    # report links to the page beside the run, and shows the images with the labels of a labels.csv
    from deepclust.commands.report import browse_links
    assert browse_links(tmp_path / "by_cluster") == ""  # no page in that folder: no link
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{r[0]},{'warm' if r[0].startswith('red') else 'cool'}\n"
                                               for r in rows))
    assert main(["report", str(run), "--test-data", str(data), "--labels", str(labels), "--k", "2"]) == 0
    report = (run / "report.html").read_text()
    assert '<a href="browse/index.html">browse/</a>' in report
    assert ">warm<" in report and ">cool<" in report and ">green<" not in report  # the file's names, not the folders'


def test_labels_file_trains_supervised_and_is_checked(folder, tmp_path, capsys):
    data, _ = folder
    labels = tmp_path / "labels.csv"
    rows = [(p, "warm" if p.startswith("red") else "cool") for p in sorted(p for m in CLUSTERS.values() for p in m)]
    labels.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows[1:]))  # the first one left out
    out = tmp_path / "run"
    assert main(["train", "--method", "supervised", "--data", str(data), "--test-data", str(data), "--labels",
                 str(labels), "--backbone", "convnet", "--epochs", "1", "--out", str(out), "width=8",
                 "batch_size=16", "progress=false", "image_size=16"]) == 0
    assert "kNN top-1" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["knn_top1"] is not None

    from deepclust.data import load_data, load_train_test
    train, test = load_train_test(str(data), str(data), 16, labels=str(labels))
    assert len(train) == 17 and train.classes == ["cool", "warm"]
    assert train.labels_agreement == 0  # cool / warm are never a folder's name
    assert test.classes[:2] == ["cool", "warm"] and len(test.classes) == 5  # + blue, green, red, by name
    assert train.labels.tolist() == [0 if p.startswith(("blue", "green")) else 1 for p, _ in rows[1:]]

    bad = tmp_path / "bad_labels.csv"
    bad.write_text("path,label\nred/00.png,warm\nelsewhere/x.png,cool\n")
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data), "--test-data", str(data),
                 "--labels", str(bad)]) == 2
    assert "1 of the 2 rows" in capsys.readouterr().err
    bad.write_text("file,name\nred/00.png,warm\n")
    try:
        load_data(str(data), labels=str(bad))
    except ValueError as err:
        assert "needs the columns path (or index) and label" in str(err)
    else:
        raise AssertionError("a labels file without path,label columns was accepted")
