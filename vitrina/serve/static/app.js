// The vitrina page: instant text search, search by an example image (picked, dropped, or a result
// clicked), a grid of ranked thumbnails, score / near-duplicate toggles and a JSON download.
// Plain browser JavaScript: no build step, no dependencies; every request goes to this server's API.
"use strict";

const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 250;

const state = {
  exampleId: null, // id of an indexed image to search by
  upload: null, // a File picked or dropped
  last: null, // the last search response, for the download
  controller: null, // aborts a request that a newer one replaces
  timer: null,
  explain: false, // the model has attention maps: show a "where the model looks" link
};

function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = "status " + kind;
}

function debounce() {
  clearTimeout(state.timer);
  state.timer = setTimeout(run, DEBOUNCE_MS);
}

function options() {
  const k = Math.min(1000, Math.max(1, parseInt($("k").value, 10) || 24));
  return { k, collapse: $("collapse").checked };
}

async function request(url, init) {
  if (state.controller) state.controller.abort();
  state.controller = new AbortController();
  const response = await fetch(url, { ...init, signal: state.controller.signal });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = { error: `the server answered ${response.status} without JSON` };
  }
  if (!response.ok) throw new Error(body.error || `the server answered ${response.status}`);
  return body;
}

// The search lives in the address bar (?q=…&k=…&collapse=1&image=ID), so it can be shared and reloaded.
// An uploaded file cannot be put in a URL: while one is searched by, the address keeps the text only.
function saveToUrl(q, k, collapse) {
  const params = new URLSearchParams();
  if (q) params.set("q", q);
  if (state.exampleId !== null && !state.upload) params.set("image", state.exampleId);
  if (k !== 24) params.set("k", k);
  if (collapse) params.set("collapse", "1");
  const search = params.toString();
  const url = location.pathname + (search ? `?${search}` : "");
  if (url !== location.pathname + location.search) history.replaceState(null, "", url);
}

function loadFromUrl() {
  const params = new URLSearchParams(location.search);
  $("q").value = params.get("q") || "";
  const k = parseInt(params.get("k"), 10);
  if (k >= 1 && k <= 1000) $("k").value = k;
  $("collapse").checked = params.get("collapse") === "1";
  const image = parseInt(params.get("image"), 10);
  if (image >= 0) {
    state.exampleId = image;
    showExample(`/api/thumbs/${image}`, `image ${image}`);
  }
  if ($("q").value || state.exampleId !== null) run();
}

async function run() {
  const q = $("q").value.trim();
  const { k, collapse } = options();
  saveToUrl(q, k, collapse);
  let url;
  let init;
  if (state.upload) {
    const form = new FormData();
    form.append("file", state.upload);
    if (q) form.append("q", q);
    url = `/api/search/image?k=${k}&collapse=${collapse}`;
    init = { method: "POST", body: form };
  } else if (state.exampleId !== null) {
    url = "/api/search";
    const body = { image_id: state.exampleId, k, collapse };
    if (q) body.q = q;
    init = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  } else if (q) {
    url = `/api/search?${new URLSearchParams({ q, k, collapse })}`;
    init = { method: "GET" };
  } else {
    clearResults();
    setStatus("");
    return;
  }
  setStatus("searching…");
  try {
    render(await request(url, init));
  } catch (error) {
    if (error.name === "AbortError") return; // a newer search replaced this one
    clearResults();
    setStatus(error.message, "error");
  }
}

function clearResults() {
  $("results").replaceChildren();
  state.last = null;
  $("download").disabled = true;
}

function render(response) {
  state.last = response;
  $("download").disabled = false;
  const grid = $("results");
  grid.replaceChildren(...response.hits.map(card));
  if (response.count === 0) {
    setStatus("The index is empty: build it with `vitrina index FOLDER --out INDEX`, then restart the server.", "weak");
  } else if (response.hits.length === 0) {
    setStatus("Nothing found.", "weak");
  } else if (response.weak) {
    const best = response.hits[0].score.toFixed(3);
    setStatus(`Nothing matches well (best score ${best}); showing the closest anyway. Try other words.`, "weak");
  } else {
    const collapsed = response.hits.reduce((n, hit) => n + hit.duplicates.length, 0);
    const extra = collapsed ? `, ${collapsed} near-duplicates folded in` : "";
    setStatus(`${response.hits.length} of ${response.count} images, best first (${response.took_ms} ms${extra}).`);
  }
}

function card(hit, rank) {
  const item = document.createElement("li");
  item.className = "card";
  item.dataset.id = hit.id;
  item.dataset.score = hit.score;
  const button = document.createElement("button");
  button.type = "button";
  button.title = `search by ${hit.name}`;
  button.addEventListener("click", () => searchBy(hit));

  const thumb = document.createElement("div");
  thumb.className = "thumb";
  const img = document.createElement("img");
  img.src = hit.thumb_url;
  img.alt = hit.caption || hit.label || hit.name;
  img.loading = "lazy";
  thumb.append(img, badge("rank", `#${rank + 1}`), badge("score", hit.score.toFixed(3)));
  if (hit.duplicates.length) thumb.append(badge("dups", `+${hit.duplicates.length}`));

  const meta = document.createElement("div");
  meta.className = "meta";
  if (hit.label) meta.append(line("label", hit.label));
  if (hit.caption) meta.append(line("caption", hit.caption));
  meta.append(line("name", hit.name));
  button.append(thumb, meta);
  item.append(button);
  if (state.explain) {
    // the attention-rollout overlay: where the image tower looked (the same for every query)
    const links = document.createElement("div");
    links.className = "explain";
    links.append(explainLink("why", `/api/explain/${hit.id}`, "where the model looks"));
    const q = textQuery();
    if (q) {
      // beside it, the query's patch-similarity map: which parts of this image resemble the text
      const url = `/api/explain/${hit.id}?${new URLSearchParams({ q })}`;
      links.append(explainLink("why-query", url, "what matches the query"));
    }
    item.append(links);
  }
  return item;
}

function explainLink(className, href, text) {
  const a = document.createElement("a");
  a.className = className;
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener";
  a.textContent = text;
  return a;
}

// The text of the results shown, when they answer a text query alone (not mixed with an image).
function textQuery() {
  const echo = (state.last && state.last.query) || {};
  return echo.q && echo.image_id === undefined && echo.image === undefined ? echo.q : null;
}

function badge(className, text) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  return span;
}

function line(className, text) {
  const div = document.createElement("div");
  div.className = className;
  div.textContent = text;
  return div;
}

function showExample(src, name) {
  $("example-img").src = src;
  $("example-name").textContent = name;
  $("example").hidden = false;
}

function searchBy(hit) {
  state.exampleId = hit.id;
  state.upload = null;
  $("q").value = "";
  showExample(hit.thumb_url, hit.name);
  window.scrollTo({ top: 0 });
  run();
}

function searchByFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image; pick a PNG, JPEG, GIF, BMP, WebP or TIFF file.`, "error");
    return;
  }
  state.upload = file;
  state.exampleId = null;
  showExample(URL.createObjectURL(file), file.name);
  run();
}

function clearExample() {
  state.exampleId = null;
  state.upload = null;
  $("file").value = "";
  $("example").hidden = true;
  run();
}

function download() {
  if (!state.last) return;
  const blob = new Blob([JSON.stringify(state.last, null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "vitrina-results.json";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function loadInfo() {
  try {
    const info = await (await fetch("/api/info")).json();
    const model = info.model.ref || info.model.name;
    state.explain = Boolean(info.model.explain);
    $("info").textContent =
      `${info.count} images in “${info.collection}” · model ${model} (${info.embed_dim}-d, ${info.version})` +
      ` · ${info.index_kind} index` + (info.ledger.total ? ` · ${info.ledger.total} files skipped` : "");
    if (info.model.untrained) {
      $("info").append(badge("warning", " · untrained preset: results are random"));
    }
    if (info.count === 0) setStatus("The index is empty: build it with `vitrina index FOLDER --out INDEX`.", "weak");
  } catch {
    $("info").textContent = "cannot reach the server";
  }
}

function wire() {
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(state.timer);
    run();
  });
  $("q").addEventListener("input", debounce);
  $("file").addEventListener("change", () => searchByFile($("file").files[0]));
  $("example-clear").addEventListener("click", clearExample);
  $("scores").addEventListener("change", () => document.body.classList.toggle("hide-scores", !$("scores").checked));
  $("collapse").addEventListener("change", run);
  $("k").addEventListener("change", run);
  $("download").addEventListener("click", download);
  $("drop").addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("file").click();
  });
  // The whole page is a drop target: dropping anywhere searches by that image.
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    document.body.classList.remove("dragging");
    searchByFile(event.dataTransfer.files[0]);
  });
}

wire();
loadInfo();
loadFromUrl();
