// An off-the-shelf WebSocket client of patchwire's GET /ws: the browser's own `WebSocket`,
// run in a headless Chromium page, with a small RFC 6902 apply (add, remove, replace, move).
// The Rust test evaluates `patchwireClient.handle(command)` through the DevTools protocol; the
// commands and replies are those of ws_client.py (tests/it/support/scripted.rs).
(() => {
  const TIMEOUT = 10000;
  const docs = {}, last = {}, snapshots = {}, patches = {};
  let ws = null, queue = [], waiters = [];

  const unescape = (token) => token.replace(/~1/g, "/").replace(/~0/g, "~");
  const parse = (path) => path === "" ? [] : path.split("/").slice(1).map(unescape);
  function parentOf(doc, tokens) {
    let node = doc;
    for (const t of tokens.slice(0, -1)) {
      node = Array.isArray(node) ? node[Number(t)] : node[t];
      if (node === undefined) throw new Error("no parent at " + tokens.join("/"));
    }
    return [node, tokens[tokens.length - 1]];
  }
  function remove(doc, path) {
    const [parent, key] = parentOf(doc, parse(path));
    if (Array.isArray(parent)) return parent.splice(Number(key), 1)[0];
    if (!(key in parent)) throw new Error("nothing to remove at " + path);
    const value = parent[key];
    delete parent[key];
    return value;
  }
  function add(doc, path, value) {
    const [parent, key] = parentOf(doc, parse(path));
    if (Array.isArray(parent)) {
      parent.splice(key === "-" ? parent.length : Number(key), 0, value);
    } else {
      parent[key] = value;
    }
  }
  function applyPatch(doc, ops) {
    doc = structuredClone(doc);
    for (const op of ops) {
      if (op.path === "") throw new Error("a patch never touches the root");
      if (op.op === "add") add(doc, op.path, op.value);
      else if (op.op === "remove") remove(doc, op.path);
      else if (op.op === "replace") { remove(doc, op.path); add(doc, op.path, op.value); }
      else if (op.op === "move") add(doc, op.path, remove(doc, op.from));
      else throw new Error("unexpected op " + op.op);
    }
    return doc;
  }

  function apply(message) {
    const s = message.stream;
    if (message.type === "snapshot") {
      docs[s] = message.data;
      snapshots[s] = (snapshots[s] || 0) + 1;
    } else if (message.type === "patch") {
      docs[s] = applyPatch(docs[s], message.data);
      patches[s] = (patches[s] || 0) + 1;
    } else if (message.type !== "error" && message.type !== "recovered") {
      return;
    }
    last[s] = message.id;
  }

  function next() {
    if (queue.length) return Promise.resolve(queue.shift());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no message in time")), TIMEOUT);
      waiters.push((m) => { clearTimeout(timer); resolve(m); });
    });
  }
  async function readUntil(done) {
    for (;;) {
      const message = await next();
      apply(message);
      if (done(message)) return message;
    }
  }
  function same(a, b) {
    if (a === b) return true;
    if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
    if (Array.isArray(a) !== Array.isArray(b)) return false;
    const keys = Object.keys(a);
    if (keys.length !== Object.keys(b).length) return false;
    return keys.every((k) => Object.prototype.hasOwnProperty.call(b, k) && same(a[k], b[k]));
  }

  async function handle(command) {
    try {
      return { ok: await run(command) };
    } catch (error) {
      return { error: String(error) };
    }
  }
  async function run(command) {
    switch (command.op) {
      case "connect":
        queue = []; waiters = [];
        ws = new WebSocket(command.url);
        ws.onmessage = (event) => {
          const message = JSON.parse(event.data);
          const waiter = waiters.shift();
          if (waiter) waiter(message); else queue.push(message);
        };
        await new Promise((resolve, reject) => {
          ws.onopen = resolve;
          ws.onerror = () => reject(new Error("the connection failed"));
        });
        return {};
      case "send":
        ws.send(JSON.stringify(command.message));
        return await readUntil((m) => command.until.includes(m.type));
      case "converge":
        if (!same(docs[command.stream], command.doc)) {
          await readUntil(() => same(docs[command.stream], command.doc));
        }
        return {};
      case "drop":
        ws.close(1000, "bye");
        ws = null;
        return {};
      case "state":
        return { docs, last, snapshots, patches };
      default:
        throw new Error("unknown op " + command.op);
    }
  }
  window.patchwireClient = { handle };
})();
