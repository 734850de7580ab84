// The mmsearch page: search box, filters, a grid with infinite scroll, search by photo,
// "similar", a viewer (a video's moment plays from its start). Plain JS over the JSON API;
// the search lives in the URL.
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);
  const el = {
    form: $("#search"), q: $("#q"), file: $("#file"), pick: $("#pick"),
    in: $("#in"), after: $("#after"), before: $("#before"), camera: $("#camera"),
    type: $("#type"), typeField: $("#type-field"),
    sort: $("#sort"), dedup: $("#dedup"), cameras: $("#cameras"),
    status: $("#status"), intro: $("#intro"), empty: $("#empty"), results: $("#results"),
    more: $("#more"), info: $("#info"), watch: $("#watch"), drop: $("#drop"),
    viewer: $("#viewer"), vImg: $("#v-img"), vVideo: $("#v-video"), vName: $("#v-name"),
    vMeta: $("#v-meta"),
    vTexts: $("#v-texts"), vTextsBox: $("#v-texts-box"), vSimilar: $("#v-similar"),
    vOriginal: $("#v-original"), vClose: $("#v-close"), vPrev: $("#v-prev"), vNext: $("#v-next"),
  };
  const FILTERS = ["in", "after", "before", "camera"];
  const TYPES = ["image", "video"];
  const DEFAULT_K = 50;
  const MAX_K = 500;

  // -- state -----------------------------------------------------------------
  // What is searched: {mode: "text"|"similar"|"image"|null, q, similar, filters, k}
  let state = emptyState();
  let uploaded = null;          // the File last searched by (kept for paging and filters)
  let info = null;              // /api/info
  let run = null;               // the search being shown: {gen, offset, done, loading, seen}
  let gen = 0;
  let hits = [];                // hits shown, in order (for the viewer's prev/next)
  let current = -1;             // index in hits of the photo in the viewer
  let lastStart = { key: "", at: 0 };

  function emptyState() {
    return { mode: null, q: "", similar: null, k: DEFAULT_K,
             filters: { in: "", after: "", before: "", camera: "", type: "", sort: "score",
                        dedup: false } };
  }

  function stateFromUrl() {
    const p = new URLSearchParams(location.search);
    const s = emptyState();
    for (const name of FILTERS) s.filters[name] = (p.get(name) || "").trim();
    const type = p.get("type");
    if (TYPES.includes(type)) s.filters.type = type;
    const sort = p.get("sort");
    if (sort === "date" || sort === "date-asc") s.filters.sort = sort;
    s.filters.dedup = ["1", "true", "yes", "on"].includes((p.get("dedup") || "").toLowerCase());
    const k = parseInt(p.get("k") || "", 10);
    if (k >= 1 && k <= MAX_K) s.k = k;
    const similar = p.get("similar");
    if (similar && /^\d+$/.test(similar)) {
      s.mode = "similar"; s.similar = similar;
    } else if (p.has("image")) {
      s.mode = "image";
    } else if ((p.get("q") || "").trim()) {
      s.mode = "text"; s.q = p.get("q").trim();
    }
    return s;
  }

  function filterParams(s, p) {
    for (const name of FILTERS) if (s.filters[name]) p.set(name, s.filters[name]);
    if (s.filters.type) p.set("type", s.filters.type);
    if (s.filters.sort !== "score") p.set("sort", s.filters.sort);
    if (s.filters.dedup) p.set("dedup", "1");
    return p;
  }

  function urlFor(s) {
    const p = new URLSearchParams();
    if (s.mode === "text") p.set("q", s.q);
    else if (s.mode === "similar") p.set("similar", s.similar);
    else if (s.mode === "image") p.set("image", "uploaded");
    filterParams(s, p);
    if (s.k !== DEFAULT_K) p.set("k", String(s.k));
    const query = p.toString();
    return location.pathname + (query ? "?" + query : "");
  }

  function fillForm(s) {
    el.q.value = s.mode === "text" ? s.q : "";
    for (const name of FILTERS) el[name].value = s.filters[name];
    el.type.value = s.filters.type;
    el.sort.value = s.filters.sort;
    el.dedup.checked = s.filters.dedup;
  }

  function formFilters() {
    const f = {};
    for (const name of FILTERS) f[name] = el[name].value.trim();
    f.type = el.type.value;
    f.sort = el.sort.value;
    f.dedup = el.dedup.checked;
    return f;
  }

  // Show state ``s``: remember it in the history (``push``) and run its search.
  function go(s, { push = true, force = false } = {}) {
    const url = urlFor(s);
    const same = url === location.pathname + location.search;
    state = s;
    if (push && !same) history.pushState(null, "", url);
    const key = url + (s.mode === "image" && uploaded ? "#" + uploaded.name + uploaded.size : "");
    // A submit right after the change event of the same edit would search twice.
    if (!force && key === lastStart.key && performance.now() - lastStart.at < 400) return;
    lastStart = { key, at: performance.now() };
    start();
  }

  // -- searching -------------------------------------------------------------
  function start() {
    gen += 1;
    run = { gen, offset: 0, done: false, loading: false, seen: new Set(), shown: 0 };
    hits = [];
    el.results.replaceChildren();
    el.more.classList.remove("loading");
    el.empty.hidden = true;
    setStatus("");
    document.title = titleFor(state);
    if (state.mode === null || (state.mode === "image" && !uploaded)) {
      run.done = true;
      el.results.setAttribute("aria-busy", "false");
      el.intro.hidden = false;
      if (state.mode === "image") setStatus("Drop the photo again (or use “Search by photo”) to search by it.");
      return;
    }
    el.intro.hidden = true;
    loadNext();
  }

  function titleFor(s) {
    if (s.mode === "text") return `${s.q} — mmsearch`;
    if (s.mode === "similar") return `Similar to #${s.similar} — mmsearch`;
    if (s.mode === "image") return "Search by photo — mmsearch";
    return "mmsearch";
  }

  function request(s, offset) {
    const p = new URLSearchParams();
    if (s.mode === "text") p.set("q", s.q);
    p.set("k", String(s.k));
    p.set("offset", String(offset));
    filterParams(s, p);
    const opts = { credentials: "same-origin", headers: { Accept: "application/json" } };
    if (s.mode === "text") return fetch("/api/search?" + p, opts);
    if (s.mode === "similar") return fetch(`/api/similar/${encodeURIComponent(s.similar)}?` + p, opts);
    const body = new FormData();
    body.append("file", uploaded, uploaded.name || "photo");
    return fetch("/api/search/image?" + p, { ...opts, method: "POST", body });
  }

  async function loadNext() {
    const r = run;
    if (!r || r.done || r.loading) return;
    r.loading = true;
    el.results.setAttribute("aria-busy", "true");
    el.more.classList.add("loading");
    if (r.offset === 0) setStatus("Searching…");
    try {
      const response = await request(state, r.offset);
      const data = await readJson(response);
      if (r !== run) return;
      if (!response.ok) throw new Error(detailOf(data, response));
      const page = Array.isArray(data.hits) ? data.hits : [];
      let added = 0;
      const frag = document.createDocumentFragment();
      for (const hit of page) {
        if (r.seen.has(hit.id)) continue;
        r.seen.add(hit.id);
        hits.push(hit);
        frag.append(tile(hit, hits.length - 1));
        added += 1;
      }
      el.results.append(frag);
      r.shown += added;
      r.offset += state.k;
      if (page.length < state.k || added === 0) r.done = true;
      el.empty.hidden = r.shown > 0;
      showCount(r, data);
    } catch (err) {
      if (r !== run) return;
      r.done = true;
      setStatus(err.message || String(err), true);
    } finally {
      r.loading = false;
      if (r === run) {
        el.more.classList.remove("loading");
        el.results.setAttribute("aria-busy", "false");
        // Observe again: if the sentinel is still in view, the next page loads at once.
        if (!r.done) { observer.unobserve(el.more); observer.observe(el.more); }
      }
    }
  }

  async function readJson(response) {
    try { return await response.json(); } catch { return {}; }
  }

  function detailOf(data, response) {
    const d = data && data.detail;
    if (typeof d === "string" && d) return d;
    if (Array.isArray(d) && d.length) {  // FastAPI's validation errors
      return d.map((e) => `${(e.loc || []).slice(-1)[0] || "request"}: ${e.msg}`).join("; ");
    }
    return `${response.status} ${response.statusText || "error"}`.trim();
  }

  function showCount(r, data) {
    const what = { text: `for “${state.q}”`, similar: `like photo #${state.similar}`,
                   image: `like ${uploaded ? uploaded.name || "your photo" : "your photo"}` }[state.mode];
    const word = hits.some((h) => h.kind === "video") ? "result" : "photo";
    let text;
    if (r.shown === 0) text = "";
    else if (typeof data.total === "number" && data.total > r.shown && !r.done)
      text = `${plural(r.shown, word)} ${what} · best of ${data.total.toLocaleString()}`;
    else text = `${plural(r.shown, word)} ${what}`;
    if (data.note) text = text ? `${text} — ${data.note}` : data.note;
    setStatus(text);
  }

  function plural(n, word) {
    return `${n.toLocaleString()} ${word}${n === 1 ? "" : "s"}`;
  }

  function setStatus(text, isError = false) {
    el.status.textContent = text;
    el.status.classList.toggle("error", isError);
  }

  const observer = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadNext();
  }, { rootMargin: "0px 0px 600px 0px" });
  observer.observe(el.more);

  // -- the grid --------------------------------------------------------------
  function fileName(path) {
    return String(path || "").split(/[\\/]/).pop() || "photo";
  }

  function scoreTitle(hit) {
    const parts = [Number(hit.score).toFixed(4)];
    if (hit.taken) parts.push(String(hit.taken).slice(0, 10));
    if (hit.kind === "video") parts.push(moment(hit));
    return parts.join(" · ");
  }

  // A video's moment: where it starts (its best frame's time when it has no span).
  const startOf = (hit) => Number(hit.start ?? hit.time ?? 0);

  function clock(seconds) {  // 0:07, 12:03, 1:02:03
    const whole = Math.max(0, Math.floor(Number(seconds) || 0));
    const h = Math.floor(whole / 3600), m = Math.floor((whole % 3600) / 60), s = whole % 60;
    const ss = String(s).padStart(2, "0");
    return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
  }

  function moment(hit) {  // "0:12–0:19"
    const start = startOf(hit), end = Number(hit.end ?? start);
    return end > start ? `${clock(start)}–${clock(end)}` : clock(start);
  }

  function videoBadge(hit) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = `▶ ${moment(hit)}`;
    return badge;
  }

  function tile(hit, index) {
    const name = fileName(hit.path);
    const isVideo = hit.kind === "video";
    const li = document.createElement("li");
    li.className = isVideo ? "hit video" : "hit";
    li.dataset.id = String(hit.id);

    const open = document.createElement("button");
    open.type = "button";
    open.className = "thumb";
    open.setAttribute("aria-label", isVideo ? `Play ${name} at ${moment(hit)}` : `Open ${name}`);
    open.addEventListener("click", () => openViewer(index));

    const img = document.createElement("img");
    img.src = hit.thumbnail;
    img.alt = name;
    img.title = scoreTitle(hit);
    img.loading = "lazy";
    img.decoding = "async";
    img.width = 320;
    img.height = 320;
    img.addEventListener("error", () => li.classList.add("broken"), { once: true });
    open.append(img);
    if (isVideo) open.append(videoBadge(hit));

    const caption = document.createElement("span");
    caption.className = "caption";
    caption.setAttribute("aria-hidden", "true");
    caption.textContent = scoreTitle(hit);
    open.append(caption);

    const similar = document.createElement("button");
    similar.type = "button";
    similar.className = "similar";
    similar.textContent = "Similar";
    similar.title = "Find photos like this one";
    similar.setAttribute("aria-label", `Find photos similar to ${name}`);
    similar.addEventListener("click", () => showSimilar(hit.id));

    li.append(open, similar);
    return li;
  }

  function showSimilar(id) {
    if (el.viewer.open) el.viewer.close();
    const s = { ...state, mode: "similar", similar: String(id), q: "", filters: formFilters() };
    fillForm(s);
    go(s, { force: true });
    window.scrollTo({ top: 0 });
  }

  // -- the viewer ------------------------------------------------------------
  function openViewer(index) {
    const hit = hits[index];
    if (!hit) return;
    current = index;
    const name = fileName(hit.path);
    showMedia(hit, name);
    el.vName.textContent = name;
    el.vOriginal.href = hit.kind === "video" ? `${hit.original}#t=${startOf(hit)}` : hit.original;
    el.vMeta.replaceChildren(...metaRows(hit));
    el.vPrev.disabled = index <= 0;
    el.vNext.disabled = index >= hits.length - 1;
    el.vTexts.replaceChildren();
    el.vTextsBox.hidden = true;
    loadTexts(hit.id);
    if (!el.viewer.open) el.viewer.showModal();
    el.vClose.focus();
  }

  // The photo in the <img>, or the video in the <video>, playing from the moment's start.
  function showMedia(hit, name) {
    const isVideo = hit.kind === "video";
    el.vImg.hidden = isVideo;
    el.vVideo.hidden = !isVideo;
    if (!isVideo) {
      stopVideo();
      el.vImg.src = hit.original;
      el.vImg.alt = name;
      return;
    }
    el.vImg.removeAttribute("src");
    const start = startOf(hit);
    el.vVideo.setAttribute("aria-label", `${name} from ${clock(start)}`);
    el.vVideo.dataset.start = String(start);
    el.vVideo.src = `${hit.original}#t=${start}`;
  }

  el.vVideo.addEventListener("loadedmetadata", () => {
    const start = Number(el.vVideo.dataset.start) || 0;
    if (Math.abs(el.vVideo.currentTime - start) > 0.25) el.vVideo.currentTime = start;
    el.vVideo.play().catch(() => {});  // a browser may refuse to start on its own
  });

  function stopVideo() {
    el.vVideo.pause();
    if (el.vVideo.hasAttribute("src")) {
      el.vVideo.removeAttribute("src");
      el.vVideo.load();  // drop the connection and the buffered video
    }
  }

  function metaRows(hit) {
    const rows = [];
    const add = (term, value) => {
      if (value === null || value === undefined || value === "") return;
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      if (value instanceof Node) dd.append(value); else dd.textContent = value;
      rows.push(dt, dd);
    };
    if (hit.taken) {
      const when = String(hit.taken).replace("T", " ").slice(0, 16);
      const source = { exif: "from EXIF", mtime: "file date" }[hit.taken_source] || hit.taken_source;
      add("Taken", source ? `${when} (${source})` : when);
    }
    add("Camera", camera(hit));
    add("Lens", hit.lens);
    const dims = hit.width && hit.height ? `${hit.width} × ${hit.height}` : "";
    const size = hit.size ? bytes(hit.size) : "";
    add("Size", [dims, size, hit.ext ? String(hit.ext).toUpperCase() : ""].filter(Boolean).join(" · "));
    if (typeof hit.gps_lat === "number" && typeof hit.gps_lon === "number") {
      const a = document.createElement("a");
      a.href = `https://www.openstreetmap.org/?mlat=${hit.gps_lat}&mlon=${hit.gps_lon}#map=15/${hit.gps_lat}/${hit.gps_lon}`;
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      a.textContent = `${hit.gps_lat.toFixed(5)}, ${hit.gps_lon.toFixed(5)}`;
      add("Place", a);
    }
    if (hit.kind === "video") {
      const best = typeof hit.time === "number" ? ` (best at ${clock(hit.time)})` : "";
      add("Moment", moment(hit) + best);
    }
    add("Score", Number(hit.score).toFixed(4));
    const path = document.createElement("code");
    path.className = "path";
    path.textContent = hit.path;
    add("Path", path);
    return rows;
  }

  function camera(hit) {
    const make = (hit.camera_make || "").trim();
    const model = (hit.camera_model || "").trim();
    if (make && model.toLowerCase().startsWith(make.toLowerCase().split(" ")[0])) return model;
    return [make, model].filter(Boolean).join(" ");
  }

  function bytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  async function loadTexts(id) {
    if (!info || !info.texts) return;  // no texts indexed: nothing to show
    try {
      const response = await fetch(`/api/texts?image_id=${encodeURIComponent(id)}&k=5`,
                                   { credentials: "same-origin" });
      if (!response.ok) return;
      const data = await response.json();
      if (current < 0 || !hits[current] || hits[current].id !== id) return;
      const items = (data.hits || []).map((t) => {
        const li = document.createElement("li");
        const text = document.createElement("span");
        text.textContent = t.text;
        const score = document.createElement("span");
        score.className = "score";
        score.textContent = Number(t.score).toFixed(3);
        li.append(text, score);
        return li;
      });
      el.vTexts.replaceChildren(...items);
      el.vTextsBox.hidden = items.length === 0;
    } catch {
      // texts are a bonus: say nothing
    }
  }

  el.vClose.addEventListener("click", () => el.viewer.close());
  el.vPrev.addEventListener("click", () => openViewer(current - 1));
  el.vNext.addEventListener("click", () => openViewer(current + 1));
  el.vSimilar.addEventListener("click", () => { if (hits[current]) showSimilar(hits[current].id); });
  el.viewer.addEventListener("click", (e) => { if (e.target === el.viewer) el.viewer.close(); });
  el.viewer.addEventListener("close", () => {
    const li = hits[current] && el.results.querySelector(`.hit[data-id="${hits[current].id}"] .thumb`);
    el.vImg.removeAttribute("src");
    stopVideo();
    current = -1;
    if (li) li.focus({ preventScroll: false });
  });
  el.viewer.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft" && current > 0) { e.preventDefault(); openViewer(current - 1); }
    if (e.key === "ArrowRight" && current < hits.length - 1) { e.preventDefault(); openViewer(current + 1); }
  });

  // -- search by photo -------------------------------------------------------
  function searchByFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setStatus(`${file.name || "That file"} is not an image.`, true);
      return;
    }
    uploaded = file;
    const s = { ...state, mode: "image", q: "", similar: null, filters: formFilters() };
    fillForm(s);
    go(s, { force: true });
  }

  el.pick.addEventListener("click", () => el.file.click());
  el.file.addEventListener("change", () => {
    const file = el.file.files && el.file.files[0];
    searchByFile(file);
    el.file.value = "";  // choosing the same file again searches again
  });

  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  let dragDepth = 0;
  window.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth += 1;
    el.drop.hidden = false;
  });
  window.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("dragleave", (e) => {
    if (!hasFiles(e)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) el.drop.hidden = true;
  });
  window.addEventListener("drop", (e) => {
    dragDepth = 0;
    el.drop.hidden = true;
    if (!hasFiles(e)) return;
    e.preventDefault();
    const files = Array.from(e.dataTransfer.files || []);
    searchByFile(files.find((f) => !f.type || f.type.startsWith("image/")) || files[0]);
  });
  document.addEventListener("paste", (e) => {
    if (typing(e.target)) return;
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []);
    const image = files.find((f) => f.type.startsWith("image/"));
    if (image) { e.preventDefault(); searchByFile(image); }
  });

  // -- form, keys, history ---------------------------------------------------
  el.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const q = el.q.value.trim();
    const s = { ...state, filters: formFilters() };
    if (q) Object.assign(s, { mode: "text", q, similar: null });
    else if (state.mode === "text") Object.assign(s, { mode: null, q: "" });
    go(s);
  });

  // A changed filter searches again (the same query, similar photo or uploaded photo).
  const onFilter = () => {
    const s = { ...state, filters: formFilters() };
    const q = el.q.value.trim();
    if (q && s.mode !== "similar" && s.mode !== "image") Object.assign(s, { mode: "text", q });
    go(s);
  };
  for (const name of [...FILTERS, "type", "sort", "dedup"]) el[name].addEventListener("change", onFilter);

  function typing(target) {
    if (!target || !(target instanceof Element)) return false;
    return target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName);
  }

  document.addEventListener("keydown", (e) => {
    if (e.key !== "/" || e.ctrlKey || e.metaKey || e.altKey || el.viewer.open) return;
    if (typing(e.target)) return;
    e.preventDefault();
    el.q.focus();
    el.q.select();
  });

  window.addEventListener("popstate", () => {
    const s = stateFromUrl();
    fillForm(s);
    state = s;
    if (el.viewer.open) el.viewer.close();
    lastStart = { key: "", at: 0 };
    start();
  });

  // -- index status ----------------------------------------------------------
  async function loadInfo() {
    try {
      const response = await fetch("/api/info", { credentials: "same-origin" });
      const data = await readJson(response);
      if (!response.ok) { el.info.textContent = detailOf(data, response); retryInfo(); return; }
      info = data;
      const parts = [plural(data.images || 0, "photo")];
      if (data.videos) parts.push(plural(data.videos, "video"));
      if (data.texts) parts.push(plural(data.texts, "text"));
      if (data.first_taken && data.last_taken) {
        const a = String(data.first_taken).slice(0, 4), b = String(data.last_taken).slice(0, 4);
        parts.push(a === b ? a : `${a}–${b}`);
      }
      if (data.model) parts.push(data.model);
      if (data.name) parts.push(`index “${data.name}”`);
      el.info.textContent = parts.join(" · ");
      showWatch(data.watch);
      describeFilters(data.filters || {});
      el.typeField.hidden = !(data.videos || state.filters.type);
      const cameras = Object.keys(data.cameras || {}).filter((c) => c.trim());
      el.cameras.replaceChildren(...cameras.map((c) => {
        const o = document.createElement("option");
        o.value = c;
        return o;
      }));
    } catch (err) {
      el.info.textContent = "The server cannot be reached.";
      retryInfo();
    }
  }

  // While watching, a failed look at /api/info is tried again (the status line stays live).
  function retryInfo() {
    clearTimeout(infoTimer);
    if (info && info.watch) infoTimer = setTimeout(loadInfo, 3000);
  }

  // serve --watch: what the watcher does, and the counts kept fresh (polled while watching:
  // often while a batch runs, now and then when idle).
  let infoTimer = null;
  function showWatch(watch) {
    el.watch.hidden = !watch;
    clearTimeout(infoTimer);
    if (!watch) return;
    const missing = (watch.missing || []).length;
    let text = watch.mode === "rescan" ? "rescanning now and then" : "watching for new photos";
    if (watch.state === "indexing" || watch.state === "rescanning") {
      const n = watch.indexing || watch.pending;
      text = n ? `indexing ${plural(n, "new photo")}…` : "checking for changes…";
    } else if (watch.state === "waiting for the lock") {
      text = "waiting for another index run to finish…";
    } else if (watch.pending) {
      text = `${plural(watch.pending, "change")} waiting…`;
    }
    if (missing) text += ` · ${watch.missing.join(", ")} missing (its photos stay)`;
    el.watch.textContent = text;
    const busy = watch.state !== "watching" || watch.pending;
    infoTimer = setTimeout(loadInfo, busy ? 1000 : 3000);
  }

  // The filters as the server declares them (one declaration for the CLI, the API and this
  // page): their bound on length as the field's maxlength, their help where it has no title.
  function describeFilters(filters) {
    for (const name of FILTERS) {
      const f = filters[name];
      if (!f) continue;
      if (f.max_chars) el[name].maxLength = f.max_chars;
      if (!el[name].title) el[name].title = f.help;
    }
    if (filters.type && !el.type.title) el.type.title = filters.type.help;
  }

  // -- start -----------------------------------------------------------------
  state = stateFromUrl();
  fillForm(state);
  loadInfo();
  start();
  if (state.mode === null) el.q.focus();
})();
