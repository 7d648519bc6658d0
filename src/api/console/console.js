// patchwire console. Plain JavaScript, no dependencies. It reads only this server's public API
// (GET /streams, the streams' SSE) and, with a token typed into the page, the webhook admin API.
// Every URL it requests is a path on this origin. Nothing runs while the page is hidden.
"use strict";
(() => {
  const REFRESH_MS = 2000;
  const WEBHOOKS_REFRESH_MS = 5000;
  const CHART_WINDOW_MS = 120000;
  const MAX_EVENTS = 50;
  const TOKEN_KEY = "patchwire.adminToken";

  const $ = (id) => document.getElementById(id);

  /** An element with text or children; never parses HTML (stream data is untrusted). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "data") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // ---- formatting -------------------------------------------------------------------------

  function bytes(n) {
    if (!Number.isFinite(n)) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
  }
  const count = (n) => Number.isFinite(n) ? n.toLocaleString("en") : "–";
  function ago(date) {
    if (!date) return "–";
    const ms = Date.parse(date);
    if (!Number.isFinite(ms)) return "–";
    const s = Math.round((Date.now() - ms) / 1000);
    if (Math.abs(s) < 1) return "now";
    const span = humanSpan(Math.abs(s));
    return s > 0 ? span + " ago" : "in " + span;
  }
  function humanSpan(s) {
    if (s < 60) return s + " s";
    if (s < 3600) return Math.round(s / 60) + " min";
    if (s < 86400) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " d";
  }
  function timeCell(date) {
    if (!date) return "–";
    const ms = Date.parse(date);
    return el("time", { datetime: Number.isFinite(ms) ? new Date(ms).toISOString() : undefined, title: date, text: ago(date) });
  }

  // ---- the listing --------------------------------------------------------------------------

  let listing = null;
  let refreshTimer = null;
  let lastSummary = "";
  const samples = [];

  function viewSubscribers(stream) {
    return (stream.views && stream.views.active || []).reduce((n, v) => n + (v.subscribers || 0), 0);
  }

  /** What a stream is doing, from what the listing says: [css state, words]. */
  function streamState(stream, cluster) {
    if (stream.failing) return ["failing", "failing"];
    const upstream = stream.upstream;
    if (!upstream) return ["push", "push"];
    if (cluster && stream.lease && stream.lease.node && stream.lease.node !== cluster.node) {
      return ["standby", "polled by " + stream.lease.node];
    }
    if (upstream.on_demand) {
      if (stream.subscribers + viewSubscribers(stream) > 0) return ["polling", "polling (on demand)"];
      const last = Date.parse(upstream.last_poll_at);
      const linger = upstream.on_demand.linger_ms + upstream.interval_ms;
      if (Number.isFinite(last) && Date.now() - last < linger) return ["lingering", "lingering (on demand)"];
      return ["paused", "paused (on demand)"];
    }
    return ["polling", "polling"];
  }

  /**
   * Replaces a container's children without losing the keyboard's place: the control that had
   * focus (named by its `data-focus-key`) gets it back in the new rows.
   */
  function replaceKeepingFocus(container, children) {
    const active = document.activeElement;
    const key = active && container.contains(active) ? active.dataset.focusKey : undefined;
    container.replaceChildren(...children);
    if (key) {
      const again = container.querySelector(`[data-focus-key="${CSS.escape(key)}"]`);
      if (again) again.focus();
    }
  }

  function cell(label, content, cls) {
    return el("td", { "data-label": label, class: cls }, content);
  }

  function renderStreams() {
    const body = $("streams-table").tBodies[0];
    const cluster = listing.cluster || null;
    document.body.classList.toggle("clustered", !!cluster);
    const rows = listing.streams.map((s) => {
      const [state, words] = streamState(s, cluster);
      const u = s.upstream;
      const failing = s.failing ? el("span", { class: "sub", text: s.failing.status + " " + s.failing.message }) : null;
      const inspect = el("button", { type: "button", class: "link", "aria-label": "Inspect stream " + s.name, text: s.name, data: { focusKey: "inspect:" + s.name }, onclick: () => follow(s.name) });
      const views = (s.views && s.views.named || []).map((v) => v.name);
      const requests = u
        ? el("span", {}, count(u.requests), el("span", { class: "sub", text: "of " + count(u.subscriber_requests) }))
        : "–";
      const sent = s.sent ? s.sent.bytes : NaN;
      const traffic = el("span", {}, bytes(sent), el("span", { class: "sub", text: u ? "vs " + bytes(u.subscriber_bytes) : "no upstream" }));
      const holder = s.lease ? (s.lease.node || "–") : "–";
      return el("tr", { data: { stream: s.name, seq: String(s.seq), subscribers: String(s.subscribers), changes: String(s.changes_published), state } },
        cell("Stream", el("span", {}, inspect, views.length ? el("span", { class: "sub", text: "views: " + views.map((v) => "@" + v).join(" ") }) : null)),
        cell("State", el("span", {}, el("span", { class: "badge state-" + state, text: words }), failing)),
        cell("Last poll", u ? el("span", {}, timeCell(u.last_poll_at), u.last_outcome ? el("span", { class: "sub", text: u.last_outcome.result }) : null) : "–"),
        cell("Next poll", u ? timeCell(u.next_poll_at) : "–"),
        cell("Subscribers", count(s.subscribers + viewSubscribers(s)), "num"),
        cell("Changes", count(s.changes_published), "num"),
        cell("Upstream requests", requests, "num"),
        cell("Bytes", traffic, "num"),
        cell("Polled by", holder, "cluster-only"));
    });
    replaceKeepingFocus(body, rows);
    const failing = listing.streams.filter((s) => s.failing).length;
    const summary = `${listing.streams.length} stream${listing.streams.length === 1 ? "" : "s"}` +
      (failing ? `, ${failing} failing` : ", none failing");
    if (summary !== lastSummary) {
      $("streams-summary").textContent = summary;
      lastSummary = summary;
    }
  }

  function totals() {
    const t = { made: 0, would: 0, sent: 0, poll: 0 };
    for (const s of listing.streams) {
      if (!s.upstream) continue;
      t.made += s.upstream.requests || 0;
      t.would += s.upstream.subscriber_requests || 0;
      t.poll += s.upstream.subscriber_bytes || 0;
      t.sent += s.sent ? s.sent.bytes : 0;
    }
    return t;
  }

  function renderSaved() {
    const t = totals();
    const avoided = t.would - t.made;
    $("saved-requests").textContent = avoided >= 0 ? count(avoided) + " avoided" : count(-avoided) + " more";
    $("saved-requests-detail").textContent = `${count(t.made)} made instead of ${count(t.would)} by the subscribers polling themselves`;
    const ratio = t.sent > 0 ? t.poll / t.sent : NaN;
    $("saved-bytes").textContent = t.poll >= t.sent ? bytes(t.poll - t.sent) + " saved" : bytes(t.sent - t.poll) + " more";
    $("saved-bytes-detail").textContent = `${bytes(t.sent)} sent instead of ${bytes(t.poll)}` +
      (Number.isFinite(ratio) && ratio >= 1 ? ` (${ratio.toFixed(1)}× less)` : "");
    samples.push({ at: Date.now(), sent: t.sent, poll: t.poll });
    while (samples.length && samples[0].at < Date.now() - CHART_WINDOW_MS - REFRESH_MS) samples.shift();
    renderChart();
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  /** Bytes per second sent and that polling would have cost, over the last two minutes. */
  function renderChart() {
    const area = $("chart");
    const width = Math.max(area.clientWidth, 200), height = Math.max(area.clientHeight, 100);
    const pad = { l: 64, r: 8, t: 8, b: 18 };
    const rates = [];
    for (let i = 1; i < samples.length; i++) {
      const seconds = (samples[i].at - samples[i - 1].at) / 1000;
      if (seconds <= 0) continue;
      rates.push({
        at: samples[i].at,
        sent: Math.max(0, samples[i].sent - samples[i - 1].sent) / seconds,
        poll: Math.max(0, samples[i].poll - samples[i - 1].poll) / seconds,
      });
    }
    const now = samples.length ? samples[samples.length - 1].at : Date.now();
    const max = Math.max(1, ...rates.map((r) => Math.max(r.sent, r.poll)));
    const x = (at) => pad.l + (width - pad.l - pad.r) * (1 - (now - at) / CHART_WINDOW_MS);
    const y = (v) => height - pad.b - (height - pad.t - pad.b) * (v / max);
    const last = rates[rates.length - 1];
    const root = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-label": last
        ? `Now: ${bytes(last.sent)} per second sent, polling would cost ${bytes(last.poll)} per second`
        : "Collecting samples",
    });
    root.append(svg("line", { class: "axis", x1: pad.l, y1: y(0), x2: width - pad.r, y2: y(0) }));
    root.append(svg("line", { class: "axis", x1: pad.l, y1: pad.t, x2: pad.l, y2: y(0) }));
    const label = (text, attrs) => { const t = svg("text", attrs); t.textContent = text; return t; };
    root.append(
      label(bytes(max) + "/s", { x: pad.l - 4, y: pad.t + 10, "text-anchor": "end" }),
      label("0", { x: pad.l - 4, y: y(0), "text-anchor": "end" }),
      label("2 min ago", { x: pad.l, y: height - 4 }),
      label("now", { x: width - pad.r, y: height - 4, "text-anchor": "end" }));
    for (const [series, cls] of [["poll", "line-poll"], ["sent", "line-sent"]]) {
      if (rates.length < 2) break;
      const points = rates.map((r) => `${x(r.at).toFixed(1)},${y(r[series]).toFixed(1)}`).join(" ");
      root.append(svg("polyline", { class: cls, points }));
    }
    area.replaceChildren(root);
  }

  function renderProxyAndCluster() {
    const d = listing.dynamic;
    $("dynamic-off").hidden = !!d;
    $("dynamic-on").hidden = !d;
    if (d) {
      const c = $("dynamic-count");
      c.max = d.max_streams; c.value = d.streams; c.high = d.max_streams * 0.9;
      $("dynamic-count-text").textContent = `${count(d.streams)} of ${count(d.max_streams)}`;
      const m = $("dynamic-memory");
      m.max = d.max_memory_bytes; m.value = d.snapshot_bytes; m.high = d.max_memory_bytes * 0.9;
      $("dynamic-memory-text").textContent = `${bytes(d.snapshot_bytes)} of ${bytes(d.max_memory_bytes)}`;
    }
    const c = listing.cluster;
    $("cluster-off").hidden = !!c;
    $("cluster-on").hidden = !c;
    if (c) {
      $("cluster-node").textContent = c.node;
      $("cluster-ready").textContent = c.ready ? "ready" : "not ready";
      const held = {};
      for (const s of listing.streams) {
        if (s.lease && s.lease.node) (held[s.lease.node] = held[s.lease.node] || []).push(s.name);
      }
      $("cluster-nodes").replaceChildren(...c.nodes.map((n) =>
        el("li", { data: { node: n } }, el("strong", { text: n }), n === c.node ? " (this node)" : "",
          ": " + ((held[n] || []).join(", ") || "no streams"))));
    }
  }

  function renderInspectorChoices() {
    const select = $("inspect-stream");
    const names = [];
    for (const s of listing.streams) {
      names.push(s.name);
      for (const v of (s.views && s.views.named) || []) names.push(`${s.name}@${v.name}`);
      for (const v of (s.views && s.views.active) || []) names.push(v.name);
    }
    const unique = [...new Set(names)];
    const now = [...select.options].map((o) => o.value);
    if (unique.join("\n") === now.join("\n")) return;
    const chosen = select.value;
    select.replaceChildren(...unique.map((n) => el("option", { value: n, text: n })));
    if (unique.includes(chosen)) select.value = chosen;
  }

  async function refresh() {
    refreshTimer = null;
    try {
      const response = await fetch("/streams", { cache: "no-store", headers: { accept: "application/json" } });
      if (!response.ok) throw new Error(`GET /streams answered ${response.status}`);
      listing = await response.json();
      renderStreams();
      renderSaved();
      renderProxyAndCluster();
      renderInspectorChoices();
      setConnection("Live", "updated " + new Date().toLocaleTimeString());
    } catch (error) {
      setConnection("Cannot reach the server: " + error.message);
    }
    if (!document.hidden) refreshTimer = setTimeout(refresh, REFRESH_MS);
  }

  /** The live region says what changed (live, failing, paused), not every refresh. */
  function setConnection(text, updated) {
    if ($("connection").textContent !== text) $("connection").textContent = text;
    $("updated").textContent = updated || "";
  }

  // ---- the inspector: a live document ------------------------------------------------------

  let source = null;
  let following = null;
  let doc = undefined;
  let eventCount = 0;
  const openPaths = new Set();
  const closedPaths = new Set();

  const unescapeToken = (t) => t.replace(/~1/g, "/").replace(/~0/g, "~");
  const escapeToken = (t) => String(t).replace(/~/g, "~0").replace(/\//g, "~1");
  const tokens = (pointer) => pointer === "" ? [] : pointer.split("/").slice(1).map(unescapeToken);

  /** RFC 6902, applied in place; throws on an operation that does not apply. */
  function applyPatch(target, ops) {
    const wrapper = { root: target };
    const locate = (pointer) => {
      const path = ["root", ...tokens(pointer)];
      let parent = wrapper;
      for (const t of path.slice(0, -1)) {
        parent = Array.isArray(parent) ? parent[Number(t)] : parent[t];
        if (parent === null || typeof parent !== "object") throw new Error("no container at " + pointer);
      }
      return [parent, path[path.length - 1]];
    };
    const get = (pointer) => { const [p, k] = locate(pointer); return Array.isArray(p) ? p[Number(k)] : p[k]; };
    const remove = (pointer) => {
      const [p, k] = locate(pointer);
      if (Array.isArray(p)) {
        const i = Number(k);
        if (!(i >= 0 && i < p.length)) throw new Error("no element at " + pointer);
        return p.splice(i, 1)[0];
      }
      if (!Object.prototype.hasOwnProperty.call(p, k)) throw new Error("nothing at " + pointer);
      const v = p[k];
      delete p[k];
      return v;
    };
    const add = (pointer, value) => {
      const [p, k] = locate(pointer);
      if (Array.isArray(p)) {
        const i = k === "-" ? p.length : Number(k);
        if (!(i >= 0 && i <= p.length)) throw new Error("index out of range at " + pointer);
        p.splice(i, 0, value);
      } else {
        p[k] = value;
      }
    };
    for (const op of ops) {
      switch (op.op) {
        case "add": add(op.path, op.value); break;
        case "remove": remove(op.path); break;
        case "replace": remove(op.path); add(op.path, op.value); break;
        case "move": add(op.path, remove(op.from)); break;
        case "copy": add(op.path, structuredClone(get(op.from))); break;
        case "test":
          if (JSON.stringify(get(op.path)) !== JSON.stringify(op.value)) throw new Error("test failed at " + op.path);
          break;
        default: throw new Error("unknown operation " + op.op);
      }
    }
    return wrapper.root;
  }

  function typeOf(value) {
    if (value === null) return "null";
    if (Array.isArray(value)) return "array";
    return typeof value;
  }

  function isOpen(path, depth) {
    if (openPaths.has(path)) return true;
    if (closedPaths.has(path)) return false;
    return depth < 2;
  }

  /** One node of the tree: a list item carrying its path, type and (for scalars) JSON value. */
  function renderNode(key, value, path, depth) {
    const type = typeOf(value);
    const label = key === null ? "document" : key;
    const item = el("li", { data: { path, type } });
    if (type === "object" || type === "array") {
      const entries = type === "array" ? value.map((v, i) => [i, v]) : Object.entries(value);
      const summary = el("summary", {},
        el("span", { class: "k", text: label }),
        el("span", { class: "count", text: type === "array" ? ` [${entries.length}]` : ` {${entries.length}}` }));
      const list = el("ul", {}, ...entries.map(([k, v]) => renderNode(String(k), v, path + "/" + escapeToken(k), depth + 1)));
      const details = el("details", {}, summary, list);
      details.open = isOpen(path, depth);
      item.append(details);
    } else {
      item.dataset.value = JSON.stringify(value);
      const cls = { string: "s", number: "n", boolean: "b", null: "z" }[type] || "s";
      item.append(el("span", { class: "k", text: label }), ": ", el("span", { class: cls, text: JSON.stringify(value) }));
    }
    return item;
  }

  function depthOf(path) { return path === "" ? 0 : path.split("/").length - 1; }

  function renderTree() {
    const tree = $("tree");
    if (doc === undefined) { tree.replaceChildren(); return; }
    tree.replaceChildren(el("ul", {}, renderNode(null, doc, "", 0)));
  }

  function nodeAt(path) {
    return $("tree").querySelector(`li[data-path="${CSS.escape(path)}"]`);
  }

  function valueAt(path) {
    let v = doc;
    for (const t of tokens(path)) {
      if (v === null || typeof v !== "object") return undefined;
      v = Array.isArray(v) ? v[Number(t)] : v[t];
    }
    return v;
  }

  function parentPath(path) { return path.slice(0, path.lastIndexOf("/")); }

  /** Re-renders the subtrees a patch touched (keeping focus and what is open) and marks them. */
  function renderPatched(ops) {
    const touched = new Set();
    for (const op of ops) {
      for (const p of [op.path, op.from]) {
        if (p === undefined) continue;
        const parent = parentPath(p);
        const container = valueAt(parent);
        // Insertions and removals shift an array's indices, and change an object's keys.
        if (op.op !== "replace" || Array.isArray(container)) touched.add(parent);
        else touched.add(p);
      }
    }
    const paths = [...touched].sort((a, b) => a.length - b.length);
    const done = [];
    const focused = document.activeElement && $("tree").contains(document.activeElement)
      ? document.activeElement.closest("li[data-path]") : null;
    const focusPath = focused ? focused.dataset.path : null;
    for (const path of paths) {
      if (done.some((d) => path === d || path.startsWith(d + "/"))) continue;
      const old = nodeAt(path);
      if (!old) continue;
      const value = valueAt(path);
      if (value === undefined) continue;
      const key = path === "" ? null : unescapeToken(path.slice(path.lastIndexOf("/") + 1));
      const fresh = renderNode(key, value, path, depthOf(path));
      old.replaceWith(fresh);
      done.push(path);
    }
    for (const op of ops) {
      const target = nodeAt(op.path) || nodeAt(parentPath(op.path));
      if (target) {
        target.classList.remove("changed");
        void target.offsetWidth; // restart the highlight
        target.classList.add("changed");
      }
    }
    if (focusPath !== null) {
      const again = nodeAt(focusPath);
      const summary = again && again.querySelector(":scope > details > summary");
      if (summary) summary.focus();
    }
  }

  function pushEvent(kind, id, data) {
    eventCount++;
    $("inspect-position").textContent = `Last event ${id} (${kind}), ${eventCount} received`;
    const list = $("events");
    let text = data;
    if (text.length > 1500) text = text.slice(0, 1500) + ` … (${bytes(data.length)})`;
    const item = el("li", { class: "new", data: { kind, id } },
      el("span", { class: "meta", text: `${kind} ${id}` }), el("br"), el("code", { text }));
    list.prepend(item);
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  }

  function setInspectStatus(text) {
    $("inspect-status").textContent = text;
  }

  function curlFor(name) {
    return `curl -N '${location.origin}/streams/${name}'`;
  }

  const SAFE_NAME = /^[A-Za-z0-9_.~@-]+$/;

  function follow(name) {
    if (!SAFE_NAME.test(name)) return;
    stopFollowing();
    following = name;
    const select = $("inspect-stream");
    if ([...select.options].some((o) => o.value === name)) select.value = name;
    doc = undefined;
    eventCount = 0;
    openPaths.clear();
    closedPaths.clear();
    $("events").replaceChildren();
    $("inspect-position").textContent = "";
    renderTree();
    $("curl-text").textContent = curlFor(name);
    $("curl").hidden = false;
    $("copy-curl").disabled = false;
    $("inspect-close").disabled = false;
    setInspectStatus(`Connecting to ${name}…`);
    open();
    if (document.activeElement && document.activeElement.closest("#streams")) {
      $("inspector").scrollIntoView({ block: "start" });
    }
  }

  function open() {
    const name = following;
    source = new EventSource("/streams/" + name);
    const status = $("inspect-status");
    source.addEventListener("snapshot", (e) => {
      doc = JSON.parse(e.data);
      pushEvent("snapshot", e.lastEventId, e.data);
      renderTree();
      status.dataset.lastId = e.lastEventId;
      setInspectStatus(`Following ${name}: document at ${e.lastEventId}`);
    });
    source.addEventListener("patch", (e) => {
      const ops = JSON.parse(e.data);
      pushEvent("patch", e.lastEventId, e.data);
      try {
        doc = applyPatch(doc, ops);
        renderPatched(ops);
      } catch (error) {
        setInspectStatus(`A patch did not apply (${error.message}); reconnecting for a fresh document`);
        reopen();
        return;
      }
      status.dataset.lastId = e.lastEventId;
    });
    source.addEventListener("error", (e) => {
      if (e.data) {
        pushEvent("error", e.lastEventId, e.data);
        const failure = JSON.parse(e.data);
        setInspectStatus(`${name}: the upstream fails (${failure.status} ${failure.message}); the last document stays`);
      } else if (source && source.readyState === EventSource.CONNECTING) {
        setInspectStatus(`${name}: connection lost, reconnecting…`);
      }
    });
    source.addEventListener("recovered", (e) => {
      pushEvent("recovered", e.lastEventId, e.data);
      setInspectStatus(`Following ${name}: the upstream answers again`);
    });
  }

  function reopen() {
    if (source) source.close();
    source = null;
    doc = undefined;
    open();
  }

  function stopFollowing() {
    if (source) source.close();
    source = null;
    following = null;
    $("inspect-close").disabled = true;
  }

  $("inspect-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = $("inspect-stream").value;
    if (name) follow(name);
  });
  $("inspect-close").addEventListener("click", () => {
    const name = following;
    stopFollowing();
    if (name) setInspectStatus(`Stopped following ${name}.`);
  });
  $("tree").addEventListener("toggle", (e) => {
    const item = e.target.closest("li[data-path]");
    if (!item) return;
    const path = item.dataset.path;
    if (e.target.open) { openPaths.add(path); closedPaths.delete(path); }
    else { closedPaths.add(path); openPaths.delete(path); }
  }, true);
  $("copy-curl").addEventListener("click", async () => {
    const text = $("curl-text").textContent;
    try {
      await navigator.clipboard.writeText(text);
      $("copy-status").textContent = "Copied.";
    } catch {
      // Not a secure context: select the text for the user to copy.
      const range = document.createRange();
      range.selectNodeContents($("curl-text"));
      const selection = getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      $("copy-status").textContent = "Selected: press Ctrl+C (⌘C) to copy.";
    }
  });

  // ---- webhooks (admin API) ------------------------------------------------------------------

  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let webhooksTimer = null;
  let shownEndpoint = null;

  function setWebhooksStatus(text) { $("webhooks-status").textContent = text; }

  async function admin(path, options) {
    const response = await fetch(path, {
      ...(options || {}),
      cache: "no-store",
      headers: { authorization: "Bearer " + token, "content-type": "application/json" },
    });
    const text = await response.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch { body = null; }
    if (!response.ok) {
      const message = body && body.message ? body.message : `${response.status}`;
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  /** Asks the admin API without a token what it is: absent, disabled or waiting for a token. */
  async function probeWebhooks() {
    try {
      const response = await fetch("/admin/webhooks", { cache: "no-store" });
      if (response.status === 404) {
        setWebhooksStatus("Webhooks are not configured on this server.");
        $("token-form").hidden = true;
        $("token-help").hidden = true;
        return false;
      }
      if (response.status === 403) {
        setWebhooksStatus("The admin API is disabled (no webhooks.admin_token).");
        $("token-form").hidden = true;
        $("token-help").hidden = true;
        return false;
      }
      setWebhooksStatus("Enter the admin token to see the endpoints.");
      return true;
    } catch (error) {
      setWebhooksStatus("Cannot reach the server: " + error.message);
      return false;
    }
  }

  function endpointState(e) {
    if (e.disabled) return ["disabled", "disabled: " + e.disabled.reason];
    if (e.failing_since) return ["retrying", "failing since " + e.failing_since];
    return ["enabled", "enabled"];
  }

  async function loadEndpoints() {
    clearTimeout(webhooksTimer);
    webhooksTimer = null;
    if (!token) return;
    try {
      const { endpoints } = await admin("/admin/webhooks");
      const rows = endpoints.map((e) => {
        const [state, words] = endpointState(e);
        const actions = el("span", { class: "row" },
          el("button", { type: "button", "aria-label": "Deliveries of " + e.id, text: "Deliveries", data: { focusKey: "deliveries:" + e.id }, onclick: () => showDeliveries(e.id) }));
        if (e.disabled) {
          actions.append(el("button", { type: "button", "aria-label": "Re-enable " + e.id, text: "Re-enable", data: { focusKey: "reenable:" + e.id }, onclick: () => reenable(e.id) }));
        }
        return el("tr", { data: { endpoint: e.id, state } },
          el("td", {}, el("code", { text: e.id })),
          el("td", {}, el("code", { text: e.url })),
          el("td", { text: e.streams.join(", ") }),
          el("td", { text: e.mode }),
          el("td", {}, el("span", { class: "badge state-" + state, text: words })),
          el("td", {}, actions));
      });
      replaceKeepingFocus($("endpoints-table").tBodies[0], rows);
      $("endpoints-table").hidden = false;
      setWebhooksStatus(`${endpoints.length} endpoint${endpoints.length === 1 ? "" : "s"}`);
      if (shownEndpoint) await showDeliveries(shownEndpoint, true);
    } catch (error) {
      $("endpoints-table").hidden = true;
      setWebhooksStatus(error.status === 401 ? "The server refused the token." : "Cannot list endpoints: " + error.message);
      if (error.status === 401) return;
    }
    if (!document.hidden && token) webhooksTimer = setTimeout(loadEndpoints, WEBHOOKS_REFRESH_MS);
  }

  async function showDeliveries(id, quiet) {
    shownEndpoint = id;
    const base = "/admin/webhooks/" + encodeURIComponent(id);
    try {
      const [recent, dead] = await Promise.all([
        admin(base + "/deliveries?limit=20"),
        admin(base + "/dead-letters?limit=20"),
      ]);
      const byId = new Map();
      for (const d of [...recent.deliveries, ...dead.deliveries]) byId.set(d.id, d);
      const list = [...byId.values()].sort((a, b) => b.id - a.id);
      const rows = list.map((d) => el("tr", { data: { delivery: String(d.id), state: d.state } },
        el("td", { class: "num", text: String(d.id) }),
        el("td", { text: d.type }),
        el("td", { text: `${d.stream} · ${d.seq}` }),
        el("td", {}, el("span", { class: "badge state-" + d.state, text: d.state })),
        el("td", { class: "num", text: String(d.attempts) }),
        el("td", { text: d.last_error || (d.last_status ? String(d.last_status) : "–") }),
        el("td", {}, timeCell(d.created_at)),
        el("td", {}, d.state === "pending" ? "–" : el("button", {
          type: "button", text: "Replay", "aria-label": `Replay delivery ${d.id}`, data: { focusKey: "replay:" + d.id },
          onclick: () => replay(id, base + `/deliveries/${d.id}/replay`, null),
        }))));
      replaceKeepingFocus($("deliveries-table").tBodies[0], rows);
      $("deliveries-title").textContent = `Deliveries of ${id} (${dead.deliveries.length} dead letter${dead.deliveries.length === 1 ? "" : "s"} shown)`;
      $("deliveries").hidden = false;
      if (!quiet) $("deliveries-title").scrollIntoView({ block: "nearest" });
    } catch (error) {
      setWebhooksStatus("Cannot list deliveries: " + error.message);
    }
  }

  async function replay(id, path, body) {
    try {
      const answer = await admin(path, { method: "POST", body: body ? JSON.stringify(body) : "" });
      setWebhooksStatus(`${answer.replayed} deliver${answer.replayed === 1 ? "y" : "ies"} of ${id} queued again.`);
      await showDeliveries(id, true);
    } catch (error) {
      setWebhooksStatus("Replay refused: " + error.message);
    }
  }

  async function reenable(id) {
    try {
      await admin("/admin/webhooks/" + encodeURIComponent(id), { method: "PATCH", body: JSON.stringify({ disabled: false }) });
      setWebhooksStatus(`${id} enabled again.`);
      await loadEndpoints();
    } catch (error) {
      setWebhooksStatus("Cannot re-enable: " + error.message);
    }
  }

  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("admin-token").value.trim();
    if ($("remember-token").checked) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    loadEndpoints();
  });
  $("token-forget").addEventListener("click", () => {
    token = "";
    shownEndpoint = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("admin-token").value = "";
    $("endpoints-table").hidden = true;
    $("deliveries").hidden = true;
    clearTimeout(webhooksTimer);
    setWebhooksStatus("Token forgotten.");
  });
  $("replay-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("replay-since").value;
    if (!shownEndpoint || !value) return;
    const since = new Date(value).toISOString();
    replay(shownEndpoint, "/admin/webhooks/" + encodeURIComponent(shownEndpoint) + "/replay", { since });
  });

  // ---- visibility: nothing runs while nobody looks --------------------------------------------

  let resumeFollowing = null;
  function pause() {
    clearTimeout(refreshTimer);
    refreshTimer = null;
    clearTimeout(webhooksTimer);
    webhooksTimer = null;
    if (source) {
      resumeFollowing = following;
      stopFollowing();
    }
    // What happened meanwhile is not a rate of the time shown: the chart starts again.
    samples.length = 0;
    setConnection("Paused while this page is hidden");
  }
  function resume() {
    if (!refreshTimer) refresh();
    if (token) loadEndpoints();
    if (resumeFollowing) {
      follow(resumeFollowing);
      resumeFollowing = null;
    }
  }
  document.addEventListener("visibilitychange", () => (document.hidden ? pause() : resume()));
  window.addEventListener("resize", () => { if (samples.length) renderChart(); });

  // ---- start -----------------------------------------------------------------------------------

  if (token) { $("admin-token").value = token; $("remember-token").checked = true; }
  if (!document.hidden) refresh(); else setConnection("Paused while this page is hidden");
  probeWebhooks().then((available) => { if (available && token && !document.hidden) loadEndpoints(); });
  const wanted = new URLSearchParams(location.hash.slice(1)).get("follow");
  if (wanted) follow(wanted);
})();
