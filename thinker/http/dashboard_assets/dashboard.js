// thinker dashboard: polls GET /dashboard/state and draws the page with plain DOM + SVG.
// No framework and no CDN, so the page works on an air-gapped server. Everything that comes
// from the server is written with textContent / setAttribute, never parsed as HTML.
"use strict";

(() => {
  const POLL_MS = 1500;
  const MAX_POINTS = 300; // per adapter, as the server sends at most
  const KEY_STORAGE = "thinker.apiKey";
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const view = {
    since: null, // server_time of the last answer: the next poll asks only for newer points
    adapters: new Map(), // model_id -> {meta, points: [[t, step, loss]]}
    selected: null, // model_id plotted in the big chart (null: the most recently active)
    last: null, // the last state answer
    paused: false,
    timer: null,
    inFlight: false,
    hoverX: null, // mouse position over the loss chart, if any
  };

  // ------------------------------------------------------------------ formatting

  function fmtCount(n) {
    if (n == null) return "–";
    const abs = Math.abs(n);
    if (abs >= 1e9) return (n / 1e9).toFixed(abs >= 1e10 ? 0 : 1) + "B";
    if (abs >= 1e6) return (n / 1e6).toFixed(abs >= 1e7 ? 0 : 1) + "M";
    if (abs >= 1e3) return (n / 1e3).toFixed(abs >= 1e4 ? 0 : 1) + "k";
    return Number.isInteger(n) ? String(n) : n.toFixed(n < 10 ? 2 : 1);
  }
  function fmtLoss(x) {
    if (x == null) return "–";
    return Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(4);
  }
  function fmtMs(ms) {
    if (ms == null) return "–";
    if (ms < 1) return "<1 ms";
    if (ms < 1000) return Math.round(ms) + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";
    return (ms / 60000).toFixed(1) + " min";
  }
  function fmtAgo(seconds) {
    if (seconds < 2) return "just now";
    if (seconds < 60) return Math.round(seconds) + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h ago";
    return Math.round(seconds / 86400) + " d ago";
  }
  function fmtClock(t) {
    return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  }
  function fmtUptime(s) {
    if (s < 60) return Math.floor(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 86400) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }
  function shortOwner(owner) {
    if (!owner) return "–";
    return owner.length > 14 ? owner.slice(0, 13) + "…" : owner;
  }

  // ------------------------------------------------------------------ DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  }
  function svgEl(tag, attrs, parent) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    if (parent) parent.append(node);
    return node;
  }

  // "Nice" tick values (1, 2, 5 x 10^k) covering [lo, hi]; `decimals` is what the step needs.
  function ticks(lo, hi, count) {
    if (!(hi > lo)) return Object.assign([lo], { decimals: 2 });
    const raw = (hi - lo) / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    out.decimals = Math.min(6, Math.max(0, -Math.floor(Math.log10(step) + 1e-9)));
    return out;
  }

  // A chart frame: axes, grid and scales in a fresh SVG filling `box`.
  function frame(box, x, y, opts) {
    box.textContent = "";
    const width = Math.max(240, box.clientWidth);
    const height = Math.max(160, box.clientHeight);
    const m = { top: 12, right: opts.rightAxis ? 48 : 16, bottom: 34, left: 56 };
    const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": opts.label });
    box.append(svg);
    const sx = (v) => m.left + ((v - x[0]) / (x[1] - x[0] || 1)) * (width - m.left - m.right);
    const sy = (v) => height - m.bottom - ((v - y[0]) / (y[1] - y[0] || 1)) * (height - m.top - m.bottom);
    const grid = svgEl("g", { class: "grid" }, svg);
    const axis = svgEl("g", { class: "axis" }, svg);
    const yTicks = ticks(y[0], y[1], 5);
    for (const v of yTicks) {
      svgEl("line", { x1: m.left, x2: width - m.right, y1: sy(v), y2: sy(v) }, grid);
      svgEl("text", { x: m.left - 8, y: sy(v) + 4, "text-anchor": "end", text: opts.yFormat(v, yTicks.decimals) }, axis);
    }
    for (const v of opts.xTicks || ticks(x[0], x[1], Math.max(2, Math.floor((width - m.left - m.right) / 90)))) {
      svgEl("line", { x1: sx(v), x2: sx(v), y1: height - m.bottom, y2: height - m.bottom + 4 }, axis);
      svgEl("text", { x: sx(v), y: height - m.bottom + 16, "text-anchor": "middle", text: opts.xFormat(v) }, axis);
    }
    svgEl("line", { x1: m.left, x2: width - m.right, y1: height - m.bottom, y2: height - m.bottom }, axis);
    svgEl("text", { class: "label", x: (m.left + width - m.right) / 2, y: height - 3, "text-anchor": "middle",
      text: opts.xLabel }, svg);
    svgEl("text", { class: "label", x: 12, y: m.top + (height - m.top - m.bottom) / 2, "text-anchor": "middle",
      transform: `rotate(-90 12 ${m.top + (height - m.top - m.bottom) / 2})`, text: opts.yLabel }, svg);
    return { svg, sx, sy, width, height, m };
  }

  function emptyChart(box, message) {
    box.textContent = "";
    const svg = svgEl("svg", { viewBox: "0 0 400 200", preserveAspectRatio: "xMidYMid meet" });
    svgEl("text", { class: "empty-note", x: 200, y: 104, "text-anchor": "middle", text: message }, svg);
    box.append(svg);
  }

  function extent(values, pad) {
    let lo = Math.min(...values), hi = Math.max(...values);
    if (lo === hi) { lo -= pad || 1; hi += pad || 1; }
    return [lo, hi];
  }

  // ------------------------------------------------------------------ charts

  function drawLossChart() {
    const box = $("loss-chart");
    const id = view.selected;
    $("loss-title").textContent = id || "";
    const entry = id && view.adapters.get(id);
    $("loss-hint").textContent = entry
      ? `rank ${entry.meta.rank} · step ${entry.meta.step} · last loss ${fmtLoss(entry.meta.last_loss)}`
      : "";
    const pts = entry ? entry.points.filter((p) => p[2] != null) : [];
    if (!pts.length) {
      emptyChart(box, id ? "No training steps yet for this adapter" : "No adapters yet");
      return;
    }
    const x = extent(pts.map((p) => p[1]), 1);
    const yRaw = extent(pts.map((p) => p[2]), Math.abs(pts[0][2]) * 0.1 || 1);
    const pad = (yRaw[1] - yRaw[0]) * 0.08;
    // A little air above and below; a loss that is never negative keeps its axis at or above 0.
    const y = [yRaw[0] >= 0 ? Math.max(0, yRaw[0] - pad) : yRaw[0] - pad, yRaw[1] + pad];
    const f = frame(box, x, y, {
      label: `loss curve of ${id}`, xLabel: "optimizer step", yLabel: "loss",
      xFormat: (v) => (Number.isInteger(v) ? String(v) : ""), yFormat: (v, decimals) => v.toFixed(decimals),
    });
    const coords = pts.map((p) => [f.sx(p[1]), f.sy(p[2])]);
    const base = f.height - f.m.bottom;
    const line = coords.map((c) => c[0].toFixed(1) + "," + c[1].toFixed(1)).join(" ");
    svgEl("polygon", { class: "area", points: `${coords[0][0].toFixed(1)},${base} ${line} ${coords[coords.length - 1][0].toFixed(1)},${base}` }, f.svg);
    svgEl("polyline", { class: "curve", points: line, "data-points": String(pts.length) }, f.svg);
    const lastC = coords[coords.length - 1];
    svgEl("circle", { class: "last", cx: lastC[0], cy: lastC[1], r: 4 }, f.svg);
    hover(box, f, pts, coords);
  }

  // Nearest point under the mouse: a dashed cursor and a tooltip.
  function hover(box, f, pts, coords) {
    const cursor = svgEl("line", { class: "cursor", y1: f.m.top, y2: f.height - f.m.bottom, visibility: "hidden" }, f.svg);
    const tip = el("div", { class: "tooltip", hidden: "" });
    box.append(tip);
    const show = (clientX) => {
      const rect = f.svg.getBoundingClientRect();
      const mx = ((clientX - rect.left) / rect.width) * f.width;
      let best = 0;
      for (let i = 1; i < coords.length; i++) if (Math.abs(coords[i][0] - mx) < Math.abs(coords[best][0] - mx)) best = i;
      const [cx, cy] = coords[best];
      cursor.setAttribute("x1", cx);
      cursor.setAttribute("x2", cx);
      cursor.setAttribute("visibility", "visible");
      const p = pts[best];
      tip.textContent = `step ${p[1]} · loss ${fmtLoss(p[2])} · ${fmtClock(p[0])}`;
      tip.hidden = false;
      const left = (cx / f.width) * rect.width;
      tip.style.left = Math.min(rect.width - tip.offsetWidth - 4, Math.max(4, left + 10)) + "px";
      tip.style.top = Math.max(0, (cy / f.height) * rect.height - 30) + "px";
    };
    // The chart is redrawn at every poll: a reader hovering keeps the tooltip.
    f.svg.addEventListener("mousemove", (ev) => { view.hoverX = ev.clientX; show(ev.clientX); });
    f.svg.addEventListener("mouseleave", () => {
      view.hoverX = null;
      cursor.setAttribute("visibility", "hidden");
      tip.hidden = true;
    });
    if (view.hoverX != null) show(view.hoverX);
  }

  function drawThroughputChart(state) {
    const box = $("throughput-chart");
    const tp = state.throughput;
    const now = Math.floor(state.server_time);
    const bySecond = new Map(tp.series.map((b) => [b[0], b]));
    const seconds = [];
    for (let s = now - tp.window_s + 1; s <= now; s++) seconds.push(s);
    const tokens = seconds.map((s) => (bySecond.get(s) || [0, 0, 0])[2]);
    const requests = seconds.map((s) => (bySecond.get(s) || [0, 0, 0])[1]);
    const tokMax = Math.max(10, ...tokens) * 1.1;
    const reqMax = Math.max(1, ...requests) * 1.1;
    const f = frame(box, [-tp.window_s, 0], [0, tokMax], {
      label: "trained tokens and requests per second", xLabel: "seconds ago", yLabel: "tokens / s",
      xTicks: [-60, -45, -30, -15, 0].filter((v) => v >= -tp.window_s), rightAxis: true,
      xFormat: (v) => (v === 0 ? "now" : String(-v)), yFormat: fmtCount,
    });
    const barW = Math.max(1, (f.sx(0) - f.sx(-tp.window_s)) / tp.window_s - 1.5);
    seconds.forEach((s, i) => {
      if (!tokens[i]) return;
      const x0 = f.sx(s - now - 1) + 0.75;
      svgEl("rect", { class: "bar", x: x0, width: barW, y: f.sy(tokens[i]), height: f.sy(0) - f.sy(tokens[i]) }, f.svg);
    });
    // requests/s on its own scale, labelled on the right
    const ry = (v) => f.sy((v / reqMax) * tokMax);
    const axis = svgEl("g", { class: "axis" }, f.svg);
    const rTicks = ticks(0, reqMax, 4);
    for (const v of rTicks) {
      svgEl("text", { x: f.width - f.m.right + 8, y: ry(v) + 4, text: v.toFixed(rTicks.decimals) }, axis);
    }
    const mid = f.m.top + (f.height - f.m.top - f.m.bottom) / 2;
    svgEl("text", { class: "label", x: f.width - 8, y: mid, "text-anchor": "middle",
      transform: `rotate(90 ${f.width - 8} ${mid})`, text: "requests / s" }, f.svg);
    const line = seconds.map((s, i) => `${f.sx(s - now - 0.5).toFixed(1)},${ry(requests[i]).toFixed(1)}`).join(" ");
    svgEl("polyline", { class: "rate", points: line }, f.svg);
  }

  function sparkline(points) {
    const pts = points.filter((p) => p[2] != null);
    const w = 140, h = 30, pad = 3;
    const svg = svgEl("svg", { class: "spark", viewBox: `0 0 ${w} ${h}`, "data-points": String(pts.length) });
    if (!pts.length) return svg;
    const ys = extent(pts.map((p) => p[2]), 1);
    const sx = (i) => pad + (pts.length === 1 ? (w - 2 * pad) / 2 : (i / (pts.length - 1)) * (w - 2 * pad));
    const sy = (v) => h - pad - ((v - ys[0]) / (ys[1] - ys[0])) * (h - 2 * pad);
    const coords = pts.map((p, i) => `${sx(i).toFixed(1)},${sy(p[2]).toFixed(1)}`);
    svgEl("polyline", { points: coords.join(" ") }, svg);
    svgEl("circle", { cx: sx(pts.length - 1), cy: sy(pts[pts.length - 1][2]), r: 2.2 }, svg);
    return svg;
  }

  // ------------------------------------------------------------------ page sections

  function stat(label, value, detail) {
    return el("div", { class: "card stat" },
      el("div", { class: "label", text: label }),
      el("div", { class: "value", text: value }),
      el("div", { class: "detail", text: detail || "\u00a0" }));
  }

  function chip(label, value, cls) {
    return el("span", { class: "chip" + (cls ? " " + cls : "") }, el("span", { text: label }), el("b", { text: value }));
  }

  function drawHeader(state) {
    const s = state.server;
    const meta = $("server-meta");
    meta.replaceChildren(
      chip("model", s.base_model),
      chip("device", s.device),
      chip("dtype", s.dtype),
      chip("context", fmtCount(s.context_length)),
      chip("up", fmtUptime(s.uptime_s)),
      state.keys ? chip("you", shortOwner(state.owner)) : chip("mode", "open (no keys)", "warn"),
    );
    $("updated").textContent = "updated " + fmtClock(state.server_time);
    $("sign-out").hidden = !state.keys;
  }

  function drawStats(state) {
    const s = state.server, tp = state.throughput;
    const trained = [...view.adapters.values()].reduce((n, a) => n + (a.meta.tokens_trained || 0), 0);
    $("stats").replaceChildren(
      // Threads, not adapters: one fused pass keeps one worker busy however many adapters it runs.
      stat("Workers", `${s.busy_workers} / ${s.workers}`, "busy / total" + (s.batching ? " · fused batching" : "")),
      stat("Queue", state.keys ? `${state.queue.yours} / ${state.queue.total}` : String(state.queue.total),
        state.keys ? "yours / all users" : "requests not finished"),
      stat("Requests / s", fmtCount(tp.requests_per_s), `last ${tp.window_s} s`),
      stat("Tokens / s", fmtCount(tp.tokens_per_s), `trained, last ${tp.window_s} s`),
      stat("Adapters", String(state.adapters_total),
        `${fmtCount(trained)} tokens trained (shown) · ${s.adapters_resident} of ${s.adapters_loaded} resident`),
      stat("Fused passes", fmtCount(s.fused_passes),
        `${fmtCount(s.fused_jobs)} jobs fused · adapters running now: ${s.running}`),
    );
  }

  // The big chart keeps plotting the same adapter until another is clicked or it goes away;
  // at first (or then) it takes the most recently active one.
  function pickSelected() {
    if (view.selected && view.adapters.has(view.selected)) return;
    const first = view.last && view.last.adapters[0];
    view.selected = first ? first.model_id : null;
  }

  function drawAdapters(state) {
    const tbody = document.querySelector("#adapters tbody");
    const shown = state.adapters.length, total = state.adapters_total;
    $("adapters-count").textContent = total > shown ? `${shown} most recently active of ${total}` : String(total);
    $("adapters-empty").hidden = total > 0;
    // The server picks the most recently active; rows keep a steady order (newest first) so
    // they do not reshuffle under the reader's eyes at every poll.
    const ordered = [...state.adapters].sort((a, b) => b.created_at - a.created_at || (a.model_id < b.model_id ? -1 : 1));
    const current = view.selected;
    const rows = ordered.map((a) => {
      const entry = view.adapters.get(a.model_id);
      const idCell = el("td", { class: "id", text: a.model_id });
      if (!a.trainable) idCell.append(el("span", { class: "badge frozen", text: "frozen" }));
      const tr = el("tr", { "data-adapter": a.model_id, class: a.model_id === current ? "selected" : "" },
        idCell,
        el("td", { class: "id muted", text: shortOwner(a.owner), title: a.owner || "" }),
        el("td", { class: "num", text: String(a.rank) }),
        el("td", { class: "num", text: fmtCount(a.step) }),
        el("td", { class: "num", text: fmtCount(a.tokens_trained) }),
        el("td", { class: "num", text: fmtLoss(a.last_loss) }),
        el("td", {}, sparkline(entry ? entry.points : [])),
        el("td", { class: "num muted", text: fmtAgo(state.server_time - a.last_active) }));
      tr.addEventListener("click", () => {
        view.selected = a.model_id;
        drawAdapters(view.last);
        drawLossChart();
      });
      return tr;
    });
    tbody.replaceChildren(...rows);
  }

  function drawRequests(state) {
    const tbody = document.querySelector("#requests tbody");
    const list = state.recent_requests;
    $("requests-count").textContent = list.length ? `newest ${list.length}` : "";
    $("requests-empty").hidden = list.length > 0;
    tbody.replaceChildren(...list.map((r) => el("tr", {},
      el("td", { class: "muted", text: fmtClock(r.finished_at) }),
      el("td", { class: "id", text: r.id }),
      el("td", { text: r.kind }),
      el("td", { class: "id muted", text: r.model_id || "–" }),
      el("td", {}, el("span", { class: "badge " + r.status, text: r.status, title: r.error_type || "" })),
      el("td", { class: "num", text: fmtMs(r.queued_ms) }),
      el("td", { class: "num", text: fmtMs(r.latency_ms) }),
    )));
  }

  // EXECUTOR=ray only: one row per model worker (no adapter ids: they are other users' too).
  function drawWorkers(state) {
    const list = state.workers || [];
    $("workers-panel").hidden = list.length === 0;
    document.querySelector("#workers tbody").replaceChildren(...list.map((w) => el("tr", {},
      el("td", { class: "id", text: w.name }),
      el("td", {}, el("span", { class: "badge " + (w.state === "up" ? "completed" : "failed"), text: w.state })),
      el("td", { text: w.device }),
      el("td", { class: "muted", text: `${w.host} · pid ${w.pid}` }),
      el("td", { class: "num", text: String(w.adapters_placed) }),
      el("td", { class: "num", text: String(w.queue) }),
      el("td", { text: w.busy ? "busy" : "idle" }),
    )));
  }

  // ------------------------------------------------------------------ data

  // Fold an answer into the kept points (a full answer replaces them). Returns true when an
  // adapter arrived whose older points this page never got (it became active again): the
  // next poll then asks for everything.
  function merge(state, full) {
    let needFull = false;
    const seen = new Set();
    for (const a of state.adapters) {
      seen.add(a.model_id);
      const entry = view.adapters.get(a.model_id);
      if (!entry || full) {
        if (!full && a.points_left_out > 0) needFull = true;
        view.adapters.set(a.model_id, { meta: a, points: a.points.slice(-MAX_POINTS) });
        continue;
      }
      const lastT = entry.points.length ? entry.points[entry.points.length - 1][0] : -Infinity;
      for (const p of a.points) if (p[0] > lastT) entry.points.push(p);
      if (entry.points.length > MAX_POINTS) entry.points.splice(0, entry.points.length - MAX_POINTS);
      entry.meta = a;
    }
    for (const id of [...view.adapters.keys()]) if (!seen.has(id)) view.adapters.delete(id);
    return needFull;
  }

  function setStatus(kind, text) {
    $("status").className = "status " + kind;
    $("status-text").textContent = text;
  }

  function showKeyForm(message) {
    $("content").hidden = true;
    $("key-form").hidden = false;
    $("sign-out").hidden = true;
    $("key-error").hidden = !message;
    $("key-error").textContent = message || "";
    setStatus("paused", "API key needed");
    $("key-input").focus();
  }

  async function poll() {
    if (view.inFlight) return;
    view.inFlight = true;
    clearTimeout(view.timer);
    const key = sessionStorage.getItem(KEY_STORAGE);
    // A poll some seconds old may miss a point stamped just before the previous answer was
    // read; asking from 2 s earlier costs a few repeats, which merge() drops by time.
    const full = view.since == null;
    const url = "/dashboard/state" + (full ? "" : `?since=${Math.max(0, view.since - 2)}`);
    const controller = new AbortController();
    const abort = setTimeout(() => controller.abort(), 10000);
    let rerun = false;
    try {
      const response = await fetch(url, {
        headers: key ? { "X-API-Key": key } : {}, cache: "no-store", signal: controller.signal,
      });
      // A key entered (or signed out) while this was in flight: its answer is not for this key.
      if (sessionStorage.getItem(KEY_STORAGE) !== key) {
        rerun = true;
        return;
      }
      if (response.status === 401) {
        sessionStorage.removeItem(KEY_STORAGE);
        view.adapters.clear();
        view.since = null;
        showKeyForm(key ? "That key was not accepted." : "");
        return; // no further polling until a key is entered
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const state = await response.json();
      const needFull = merge(state, full);
      view.last = state;
      view.since = needFull ? null : state.server_time;
      pickSelected();
      $("key-form").hidden = true;
      $("content").hidden = false;
      drawHeader(state);
      drawStats(state);
      drawAdapters(state);
      drawLossChart();
      drawThroughputChart(state);
      drawRequests(state);
      drawWorkers(state);
      setStatus(view.paused ? "paused" : "live", view.paused ? "Paused" : "Live");
      schedule();
    } catch (err) {
      setStatus("down", "Disconnected: " + (err.name === "AbortError" ? "timeout" : err.message));
      schedule();
    } finally {
      clearTimeout(abort);
      view.inFlight = false;
      if (rerun) poll();
    }
  }

  function schedule() {
    clearTimeout(view.timer);
    // A hidden tab stops asking: 1000 open dashboards must not load a server nobody watches.
    if (!view.paused && !document.hidden) view.timer = setTimeout(poll, POLL_MS);
  }

  // ------------------------------------------------------------------ wiring

  $("key-form-inner").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-input").value = "";
    setStatus("", "Connecting…");
    poll();
  });
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    clearTimeout(view.timer);
    $("requests").querySelector("tbody").replaceChildren();
    document.querySelector("#adapters tbody").replaceChildren();
    view.adapters.clear();
    view.since = null;
    view.last = null;
    view.selected = null;
    showKeyForm("");
  });
  $("pause").addEventListener("click", () => {
    view.paused = !view.paused;
    $("pause").textContent = view.paused ? "Resume" : "Pause";
    if (view.paused) {
      clearTimeout(view.timer);
      setStatus("paused", "Paused");
    } else {
      poll();
    }
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !view.paused && $("key-form").hidden) poll();
  });
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      if (!view.last) return;
      drawLossChart();
      drawThroughputChart(view.last);
    }, 150);
  });

  poll();
})();
