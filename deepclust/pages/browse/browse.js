// The cluster browser of `deepclust browse`. Data: window.DEEPCLUST_BROWSE, set by clusters.js (a script, since
// Chromium refuses fetch() of local files under file://). Rows are numbered by their position in display order
// ("pos"): cluster by cluster, most central first; tile pos is cell pos % sheetTiles of sheet pos / sheetTiles.
// Edits (names, merges, moves, exclusions) live in localStorage under the CSV's sha256, so they survive a reload
// and never apply to another CSV.
"use strict";

(function () {
  const D = window.DEEPCLUST_BROWSE;
  if (!D) {
    document.body.textContent = "clusters.js is missing or broken: write the page again with deepclust browse.";
    return;
  }
  const STORE = "deepclust-browse:" + D.digest;
  const CARDS_PER_PAGE = 120;
  const MEMBERS_PER_PAGE = 200;
  const PREVIEW = 4; // central images on a card
  const $ = (id) => document.getElementById(id);

  // ---- edits ------------------------------------------------------------------------------------------------
  function emptyEdits() {
    return { names: {}, merged: {}, moved: {}, excluded: {} };
  }
  function loadEdits() {
    try {
      const stored = JSON.parse(localStorage.getItem(STORE));
      if (stored && typeof stored === "object") return Object.assign(emptyEdits(), stored);
    } catch (err) {
      console.warn("ignoring unreadable stored edits", err);
    }
    return emptyEdits();
  }
  let edits = loadEdits();
  function save() {
    localStorage.setItem(STORE, JSON.stringify(edits));
    groups = null;
  }
  // A merged cluster points at the one it was merged into; follow the chain to the cluster that holds it now.
  function root(id) {
    let c = String(id);
    for (let hops = 0; edits.merged[c] !== undefined && hops < 100000; hops++) c = String(edits.merged[c]);
    return Number(c);
  }
  function current(pos) {
    if (edits.excluded[pos]) return null;
    const moved = edits.moved[pos];
    const c = root(moved !== undefined ? moved : D.cluster[pos]);
    return c < 0 ? null : c; // -1: in no cluster, as deepclust cluster writes it
  }
  function nameOf(id) {
    const given = edits.names[id];
    if (given !== undefined && given !== "") return given;
    const initial = D.names[id];
    return initial !== undefined ? initial : "";
  }
  function labelOf(id) {
    return nameOf(id) || String(id);
  }

  // ---- clusters as they are after the edits ------------------------------------------------------------------
  let groups = null; // Map id -> {id, members[], ...stats}
  function computeGroups() {
    const byId = new Map();
    for (let pos = 0; pos < D.count; pos++) {
      const c = current(pos);
      if (c === null) continue;
      let g = byId.get(c);
      if (!g) byId.set(c, (g = { id: c, members: [] }));
      g.members.push(pos);
    }
    const dist = D.distance;
    for (const g of byId.values()) {
      // most central first; images moved in by hand after the cluster's own (their distance is to another centre)
      g.members.sort((a, b) => {
        const ma = edits.moved[a] !== undefined ? 1 : 0, mb = edits.moved[b] !== undefined ? 1 : 0;
        if (ma !== mb) return ma - mb;
        if (dist) {
          const da = dist[a] === null ? Infinity : dist[a], db = dist[b] === null ? Infinity : dist[b];
          if (da !== db) return da - db;
        }
        return a - b;
      });
      let sum = 0, n = 0;
      if (D.confidence) for (const p of g.members) if (D.confidence[p] !== null) { sum += D.confidence[p]; n++; }
      g.confidence = n ? sum / n : null;
      g.majority = null; g.purity = null; g.majorityCount = 0;
      if (D.label) {
        const counts = new Map();
        let labelled = 0;
        for (const p of g.members) {
          const l = D.label[p];
          if (l < 0) continue;
          labelled++;
          counts.set(l, (counts.get(l) || 0) + 1);
        }
        for (const [l, k] of counts) if (k > g.majorityCount || (k === g.majorityCount && l < g.majority)) {
          g.majority = l; g.majorityCount = k;
        }
        g.purity = labelled ? g.majorityCount / labelled : null;
        g.labelled = labelled;
      }
    }
    return byId;
  }
  function allGroups() {
    if (!groups) groups = computeGroups();
    return groups;
  }

  // ---- tiles ---------------------------------------------------------------------------------------------------
  const T = D.tile, SC = D.sheetColumns, ST = D.sheetTiles;
  document.documentElement.style.setProperty("--tile", T + "px"); // browse --thumb-size: the cells' size
  function tile(pos) {
    const img = document.createElement("img");
    img.className = "tile";
    img.loading = "lazy";
    img.decoding = "async";
    img.width = T; img.height = T;
    const cell = pos % ST;
    img.src = "tiles/sheet-" + String(Math.floor(pos / ST)).padStart(5, "0") + ".jpg";
    img.style.objectPosition = `-${(cell % SC) * T}px -${Math.floor(cell / SC) * T}px`;
    const problem = D.problem[pos];
    img.title = D.keys[pos] + (problem ? ` (${problem} image)` : "");
    img.alt = D.keys[pos];
    if (problem) img.classList.add("bad");
    return img;
  }

  // ---- the index: one card per cluster -----------------------------------------------------------------------
  let ticked = []; // clusters ticked for a merge, in the order ticked
  let cardPage = 0;
  function pct(x) { return (100 * x).toFixed(1) + "%"; }
  function statsLine(g) {
    const parts = [`${g.members.length} image${g.members.length === 1 ? "" : "s"}`];
    if (g.confidence !== null) parts.push(`confidence ${g.confidence.toFixed(2)}`);
    if (g.majority !== null) parts.push(`${D.classes[g.majority]} ${pct(g.purity)}`);
    return parts.join(" · ");
  }
  function sortedGroups() {
    const query = $("search").value.trim().toLowerCase();
    let list = [...allGroups().values()];
    if (query) list = list.filter((g) => String(g.id) === query || nameOf(g.id).toLowerCase().includes(query)
      || (g.majority !== null && D.classes[g.majority].toLowerCase().includes(query)));
    const key = $("sort").value, sign = $("descending").checked ? -1 : 1;
    const value = {
      size: (g) => g.members.length, id: (g) => g.id,
      confidence: (g) => (g.confidence === null ? -Infinity : g.confidence),
      purity: (g) => (g.purity === null ? -Infinity : g.purity),
    }[key];
    list.sort((a, b) => {
      if (key === "name") return sign * labelOf(a.id).localeCompare(labelOf(b.id), undefined, { numeric: true });
      const d = value(a) - value(b);
      return d !== 0 ? sign * d : a.id - b.id;
    });
    return list;
  }
  function card(g) {
    const div = document.createElement("div");
    div.className = "card";
    div.dataset.cluster = g.id;
    if (ticked.includes(g.id)) div.classList.add("ticked");
    const h = document.createElement("h3");
    const box = document.createElement("input");
    box.type = "checkbox"; box.className = "tick"; box.checked = ticked.includes(g.id);
    box.title = "tick to merge";
    box.addEventListener("click", (ev) => {
      ev.stopPropagation();
      ticked = box.checked ? [...ticked, g.id] : ticked.filter((c) => c !== g.id);
      div.classList.toggle("ticked", box.checked);
      updateMergeButton();
    });
    const title = document.createElement("span");
    title.className = "name";
    title.textContent = nameOf(g.id) || `cluster ${g.id}`;
    const number = document.createElement("span");
    number.className = "number";
    number.textContent = nameOf(g.id) ? `#${g.id}` : "";
    h.append(box, title, number);
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.textContent = statsLine(g);
    const tiles = document.createElement("div");
    tiles.className = "tiles";
    for (const p of g.members.slice(0, PREVIEW)) tiles.append(tile(p));
    div.append(h, stats, tiles);
    div.addEventListener("click", () => { location.hash = "c=" + g.id; });
    return div;
  }
  function pager(nav, pages, page, go) {
    nav.replaceChildren();
    if (pages <= 1) return;
    const add = (label, target, isCurrent) => {
      const b = document.createElement("button");
      b.textContent = label;
      if (isCurrent) b.className = "current";
      b.disabled = target < 0 || target >= pages;
      b.addEventListener("click", () => go(target));
      nav.append(b);
    };
    add("‹ previous", page - 1, false);
    const shown = new Set([0, pages - 1]);
    for (let p = Math.max(0, page - 3); p <= Math.min(pages - 1, page + 3); p++) shown.add(p);
    let last = -1;
    for (const p of [...shown].sort((a, b) => a - b)) {
      if (p > last + 1) nav.append("…");
      add(String(p + 1), p, p === page);
      last = p;
    }
    add("next ›", page + 1, false);
  }
  function renderIndex() {
    const list = sortedGroups();
    const pages = Math.max(1, Math.ceil(list.length / CARDS_PER_PAGE));
    cardPage = Math.min(cardPage, pages - 1);
    const cards = $("cards");
    cards.replaceChildren(...list.slice(cardPage * CARDS_PER_PAGE, (cardPage + 1) * CARDS_PER_PAGE).map(card));
    $("card-count").textContent = `${list.length} cluster${list.length === 1 ? "" : "s"}`
      + (pages > 1 ? `, page ${cardPage + 1} of ${pages}` : "");
    pager($("card-pager"), pages, cardPage, (p) => { cardPage = p; renderIndex(); window.scrollTo(0, 0); });
    updateMergeButton();
    drawMaps(null);
  }
  function updateMergeButton() {
    const live = allGroups();
    ticked = ticked.filter((c) => live.has(c));
    $("merge").disabled = ticked.length < 2;
    $("merge").textContent = ticked.length >= 2 ? `Merge ${ticked.length} clusters into ${labelOf(ticked[0])}`
      : "Merge selected";
  }
  function merge() {
    if (ticked.length < 2) return;
    const [into, ...others] = ticked;
    for (const c of others) {
      if (!nameOf(into) && nameOf(c)) edits.names[into] = nameOf(c); // keep a name given to a part
      edits.merged[c] = into;
    }
    ticked = [];
    save();
    render();
  }

  // ---- one cluster: its members, most central first, a page at a time ----------------------------------------
  let openId = null, memberPage = 0, selected = new Set();
  function renderCluster(id, page) {
    const g = allGroups().get(id);
    if (openId !== id) selected = new Set();
    openId = id;
    $("cluster-title").textContent = (nameOf(id) || `cluster ${id}`) + (nameOf(id) ? ` (#${id})` : "");
    const nameBox = $("cluster-name");
    if (document.activeElement !== nameBox) nameBox.value = nameOf(id);
    const members = g ? g.members : [];
    $("cluster-stats").textContent = g ? statsLine(g) + (g.majority !== null
      ? ` (majority class ${D.classes[g.majority]}: ${g.majorityCount} of ${g.labelled})` : "")
      : "this cluster is empty now (merged, or every image moved or excluded)";
    const pages = Math.max(1, Math.ceil(members.length / MEMBERS_PER_PAGE));
    memberPage = Math.min(Math.max(0, page), pages - 1);
    const shown = members.slice(memberPage * MEMBERS_PER_PAGE, (memberPage + 1) * MEMBERS_PER_PAGE);
    $("members").replaceChildren(...shown.map((pos) => {
      const wrap = document.createElement("div");
      wrap.className = "member";
      wrap.dataset.pos = pos;
      if (selected.has(pos)) wrap.classList.add("selected");
      if (edits.moved[pos] !== undefined) wrap.classList.add("moved");
      wrap.append(tile(pos));
      wrap.addEventListener("click", () => {
        if (selected.has(pos)) selected.delete(pos); else selected.add(pos);
        wrap.classList.toggle("selected", selected.has(pos));
        updateSelection();
      });
      return wrap;
    }));
    pager($("member-pager"), pages, memberPage, (p) => { location.hash = `c=${id}&p=${p + 1}`; });
    renderNeighbours(id);
    updateSelection();
    drawMaps(id);
  }
  function updateSelection() {
    $("selected-count").textContent = `${selected.size} selected`;
    $("move").disabled = selected.size === 0 || !$("move-target").value.trim();
    $("exclude").disabled = selected.size === 0;
  }
  function targetCluster(text) {
    const t = text.trim();
    if (/^-?\d+$/.test(t)) return root(Number(t));
    for (const g of allGroups().values()) if (nameOf(g.id) === t) return g.id;
    return null;
  }
  function moveSelected() {
    const target = targetCluster($("move-target").value);
    if (target === null || target < 0) {
      alert(`No cluster is called "${$("move-target").value}": give a cluster number (a new number makes a new `
        + "cluster) or an existing name.");
      return;
    }
    for (const pos of selected) {
      if (D.cluster[pos] !== undefined && root(D.cluster[pos]) === target) delete edits.moved[pos];
      else edits.moved[pos] = target;
      delete edits.excluded[pos];
    }
    selected = new Set();
    save();
    render();
  }
  function excludeSelected() {
    for (const pos of selected) edits.excluded[pos] = 1;
    selected = new Set();
    save();
    render();
  }

  // ---- the map of cluster centres and each cluster's nearest ------------------------------------------------
  function renderNeighbours(id) {
    const p = $("neighbours");
    p.replaceChildren();
    if (!D.map) return;
    const near = new Set();
    D.map.ids.forEach((c, i) => {
      if (root(c) !== id) return;
      for (const n of D.map.near[i]) if (root(n) !== id && allGroups().has(root(n))) near.add(root(n));
    });
    if (!near.size) return;
    p.append("nearest clusters: ");
    for (const n of [...near].slice(0, 8)) {
      const a = document.createElement("a");
      a.href = "#c=" + n;
      a.textContent = labelOf(n);
      p.append(a);
    }
  }
  function drawMaps(id) {
    if (!D.map) return;
    for (const box of document.querySelectorAll(".map-box")) {
      box.hidden = false;
      const canvas = box.querySelector("canvas"), ctx = canvas.getContext("2d");
      const W = canvas.width, H = canvas.height, pad = 8;
      ctx.clearRect(0, 0, W, H);
      const live = allGroups();
      D.map.ids.forEach((c, i) => {
        const r = root(c);
        if (!live.has(r)) return;
        const mine = r === id;
        ctx.fillStyle = mine ? "#d22" : "rgba(31, 95, 168, 0.55)";
        const s = mine ? 8 : 4;
        ctx.fillRect(pad + D.map.x[i] * (W - 2 * pad) - s / 2, pad + (1 - D.map.y[i]) * (H - 2 * pad) - s / 2, s, s);
      });
      canvas.onclick = (ev) => {
        const rect = canvas.getBoundingClientRect();
        const x = ((ev.clientX - rect.left) * W) / rect.width, y = ((ev.clientY - rect.top) * H) / rect.height;
        let best = null, bestD = Infinity;
        D.map.ids.forEach((c, i) => {
          if (!live.has(root(c))) return;
          const dx = pad + D.map.x[i] * (W - 2 * pad) - x, dy = pad + (1 - D.map.y[i]) * (H - 2 * pad) - y;
          if (dx * dx + dy * dy < bestD) { bestD = dx * dx + dy * dy; best = root(c); }
        });
        if (best !== null) location.hash = "c=" + best;
      };
    }
  }

  // ---- exports -----------------------------------------------------------------------------------------------
  function csvCell(value) {
    const s = String(value);
    return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }
  function inCsvOrder() {
    const order = new Array(D.count);
    for (let pos = 0; pos < D.count; pos++) order[D.row[pos]] = pos;
    return order;
  }
  function labelsCsv() {
    const lines = [D.key + ",label"];
    for (const pos of inCsvOrder()) {
      const c = current(pos);
      if (c !== null) lines.push(csvCell(D.keys[pos]) + "," + csvCell(labelOf(c)));
    }
    return lines.join("\n") + "\n";
  }
  function editedCsv() {
    const clusterColumn = D.header.indexOf("cluster");
    let nameColumn = D.header.indexOf("name");
    const header = nameColumn >= 0 ? D.header : [...D.header, "name"];
    if (nameColumn < 0) nameColumn = header.length - 1;
    const lines = [header.map(csvCell).join(",")];
    for (const pos of inCsvOrder()) {
      const c = current(pos);
      const cells = [...D.cells[pos]];
      cells[clusterColumn] = c === null ? -1 : c;
      cells[nameColumn] = c === null ? "" : nameOf(c);
      lines.push(cells.map(csvCell).join(","));
    }
    return lines.join("\n") + "\n";
  }
  function download(name, text) {
    const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    const a = document.createElement("a");
    a.href = url; a.download = name;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }
  function editedName() {
    const base = D.csv.replace(/\.csv$/i, "");
    return base.endsWith("-edited") ? base + ".csv" : base + "-edited.csv";
  }

  // ---- the whole page ----------------------------------------------------------------------------------------
  function renderHeader() {
    $("csv-name").textContent = D.csv;
    const live = allGroups();
    let images = 0, majority = 0, labelled = 0;
    for (const g of live.values()) {
      images += g.members.length;
      if (g.majority !== null) { majority += g.majorityCount; labelled += g.labelled; }
    }
    const parts = [`${images} images in ${live.size} clusters`];
    if (labelled) {
      parts.push(`purity ${pct(majority / labelled)}: the accuracy of labels that name each cluster by its `
        + "majority class");
    }
    $("summary").textContent = parts.join(" · ");
    const problems = Object.values(D.problem);
    const missing = problems.filter((k) => k === "missing").length, bad = problems.length - missing;
    const warn = [];
    if (missing) warn.push(`${missing} image file(s) of the CSV were not found: shown as crossed tiles`);
    if (bad) warn.push(`${bad} image(s) could not be read: shown as crossed tiles`);
    $("warnings").hidden = !warn.length;
    $("warnings").textContent = warn.join("; ");
    const n = Object.keys(edits.names).length + Object.keys(edits.merged).length + Object.keys(edits.moved).length
      + Object.keys(edits.excluded).length;
    $("edit-count").textContent = n ? `${n} edit${n === 1 ? "" : "s"} kept in this browser` : "";
    $("name-majority").hidden = !D.label;
  }
  function route() {
    const m = /^#c=(-?\d+)(?:&p=(\d+))?$/.exec(location.hash);
    return m ? { id: Number(m[1]), page: m[2] ? Number(m[2]) - 1 : 0 } : null;
  }
  function render() {
    renderHeader();
    const r = route();
    $("index-view").hidden = r !== null;
    $("cluster-view").hidden = r === null;
    if (r) renderCluster(root(r.id), r.page);
    else { openId = null; renderIndex(); }
  }

  $("search").addEventListener("input", () => { cardPage = 0; renderIndex(); });
  $("sort").addEventListener("change", () => { cardPage = 0; renderIndex(); });
  $("descending").addEventListener("change", renderIndex);
  $("merge").addEventListener("click", merge);
  $("cluster-name").addEventListener("change", () => {
    const value = $("cluster-name").value.trim();
    if (value) edits.names[openId] = value; else edits.names[openId] = "";
    save();
    render();
  });
  $("move-target").addEventListener("input", updateSelection);
  $("move").addEventListener("click", moveSelected);
  $("exclude").addEventListener("click", excludeSelected);
  $("select-page").addEventListener("click", () => {
    for (const el of document.querySelectorAll("#members .member")) { selected.add(Number(el.dataset.pos)); el.classList.add("selected"); }
    updateSelection();
  });
  $("clear-selection").addEventListener("click", () => {
    selected = new Set();
    for (const el of document.querySelectorAll("#members .member")) el.classList.remove("selected");
    updateSelection();
  });
  $("export-labels").addEventListener("click", () => download("labels.csv", labelsCsv()));
  $("export-csv").addEventListener("click", () => download(editedName(), editedCsv()));
  $("name-majority").addEventListener("click", () => {
    for (const g of allGroups().values()) if (!nameOf(g.id) && g.majority !== null) edits.names[g.id] = D.classes[g.majority];
    save();
    render();
  });
  $("reset").addEventListener("click", () => {
    if (!confirm("Forget every edit made to these clusters in this browser?")) return;
    edits = emptyEdits();
    ticked = [];
    save();
    render();
  });
  window.addEventListener("hashchange", render);
  // for tests and the console: what the page holds now
  window.deepclustBrowse = { labelsCsv, editedCsv, groups: allGroups, edits: () => edits };
  render();
})();
