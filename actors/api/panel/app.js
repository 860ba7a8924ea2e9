// The page's entry: the connections view (history from /connections, live updates from the event stream,
// verdict chips with counts from /counts, a text filter, the info panel of the selected connection); the other
// views (views.js) are switched by the header's navigation.
import { get, send, subscribe } from "./api.js";
import { $, el } from "./dom.js";
import * as fmt from "./format.js";
import * as views from "./views.js";

const HISTORY_LIMIT = 10000; // connections of history kept in the page (virtualised: only the visible rows are in the DOM)
const HISTORY_PAGE = 1000; // the first page paints at once, the rest follow (older and older, by `until`)
const OVERSCAN = 10; // rows rendered above and below the visible ones
const REFETCH_DELAY_MS = 150; // let the controller's registry join the event before asking it
const REFETCH_PARALLEL = 4; // requests for registry views in flight at once, however fast events come
const COUNTS_EVERY_MS = 500;
const SPLIT = "split tunneled";

const state = { rows: new Map(), order: [], verb: "", text: "", since: "", selected: "", counts: {}, action: {} };
const splitKeys = new Map(); // split_key → conn_id, for proxy.session.* events
const rulesById = new Map(); // the rules in force, for the info panel's "Decided by" (reloaded per policy)

async function loadRules() {
  try {
    const rules = await get("/rules");
    rulesById.clear();
    for (const r of rules) rulesById.set(r.id, r);
    if (state.selected && state.rows.has(state.selected)) showInfo(state.rows.get(state.selected));
  } catch { /* the info panel names the rule by its id */ }
}

// --- data ----------------------------------------------------------------------------------------------------

// `order` holds the rows newest first; a connection's start never changes, so a new row is inserted in place
// (binary search) and an update touches nothing but its row.
function insertOrdered(c) {
  let lo = 0, hi = state.order.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (state.order[mid].started > c.started) lo = mid + 1; else hi = mid;
  }
  state.order.splice(lo, 0, c);
  return lo;
}

function upsert(c) {
  const old = state.rows.get(c.conn_id);
  const row = { ...(old || {}), ...c };
  state.rows.set(c.conn_id, row);
  if (row.split_key) splitKeys.set(row.split_key, row.conn_id);
  if (old) {
    const at = state.order.indexOf(old);
    if (at >= 0) state.order[at] = row;
  } else {
    keepScrollPlace(insertOrdered(row));
    forgetOldest();
  }
  listDirty = true;
  render();
  if (c.conn_id === state.selected) showInfo(row);
}

// The page keeps HISTORY_LIMIT connections, however long it stays open: the oldest go (not the selected one).
function forgetOldest() {
  while (state.order.length > HISTORY_LIMIT) {
    const last = state.order.length - 1;
    const at = state.order[last].conn_id === state.selected ? last - 1 : last;
    const [gone] = state.order.splice(at, 1);
    state.rows.delete(gone.conn_id);
    if (gone.split_key) splitKeys.delete(gone.split_key);
  }
}

// The registry's joined view of a connection (process details, split session, bytes), asked at most
// REFETCH_PARALLEL at a time; asks for the same connection while one waits are merged.
const waiting = new Set();
let inFlight = 0;
function refetch(connId) {
  if (waiting.has(connId)) return;
  waiting.add(connId);
  setTimeout(pump, REFETCH_DELAY_MS);
}

async function pump() {
  while (inFlight < REFETCH_PARALLEL && waiting.size) {
    const connId = waiting.values().next().value;
    waiting.delete(connId);
    inFlight++;
    get(`/connections/${encodeURIComponent(connId)}`)
      .then((c) => { upsert(c); refreshCounts(); })
      .catch(() => { /* not registered (yet) */ })
      .finally(() => { inFlight--; pump(); });
  }
}

// Counts refresh at most every COUNTS_EVERY_MS after a change (throttled rather than debounced, so a steady
// stream of events still updates them), a little after the event so the registry has counted it too.
let countsDirty = false;
function refreshCounts() {
  setTimeout(() => { countsDirty = true; }, REFETCH_DELAY_MS);
}

setInterval(async () => {
  if (!countsDirty) return;
  countsDirty = false;
  try { state.counts = await get("/counts" + sinceQuery("?")); renderChips(); } catch { /* the stream says why */ }
}, COUNTS_EVERY_MS);

function sinceQuery(sep) {
  return state.since ? `${sep}since=${encodeURIComponent(state.since)}` : "";
}

// Live events fill the row themselves; only what the event does not carry (a split connection's session and
// bytes, the selected connection's details) is asked from the registry.
function onNew(e) {
  const p = e.process || {};
  if (!state.rows.has(e.conn_id)) {
    upsert({ conn_id: e.conn_id, started: e.ts, protocol: fmt.protocolName(e.protocol), src_ip: e.src_ip,
             src_port: e.src_port, dst_ip: e.dst_ip, dst_port: e.dst_port, domain: e.domain || "", pid: p.pid ?? -1,
             exe: p.exe || "", process_name: p.name || "", uid: p.uid ?? -1, cmdline: p.cmdline || [], verb: "",
             state: "open", ppid: p.ppid ?? -1, ancestors: p.ancestors || [], ancestor_names: p.ancestor_names || [] });
  }
  refreshCounts();
}

function onVerdict(e) {
  if (!state.rows.has(e.conn_id)) return refetch(e.conn_id);
  upsert({ conn_id: e.conn_id, verb: e.verb, rule: e.rule, reason: e.reason, split_key: e.split_key,
           interface: e.interface });
  if (e.verb === SPLIT || e.conn_id === state.selected) refetch(e.conn_id);
  refreshCounts();
}

function onEnd(e) {
  const c = state.rows.get(e.conn_id);
  if (!c) return;
  upsert({ conn_id: e.conn_id, state: "closed", ended: e.ts, end_reason: e.reason });
  if (c.verb === SPLIT || e.conn_id === state.selected) refetch(e.conn_id);
}

function onSession(e) {
  const connId = splitKeys.get(e.split_key);
  if (connId) refetch(connId);
}

// --- rendering -----------------------------------------------------------------------------------------------

function renderChips() {
  const chips = $("chips");
  const verbs = [...fmt.VERB_ORDER.filter((v) => v in state.counts),
                 ...Object.keys(state.counts).filter((v) => v !== "total" && !fmt.VERB_ORDER.includes(v))];
  const chip = (verb, label, count) => {
    const b = el("button", { type: "button", class: "chip", "aria-pressed": String(state.verb === verb),
                             dataset: { verb } }, label, el("span", { class: "count" }, String(count ?? 0)));
    b.addEventListener("click", () => { state.verb = verb; listDirty = true; renderChips(); render(); });
    return b;
  };
  chips.replaceChildren(chip("", "All", state.counts.total), ...verbs.map((v) => chip(v, v, state.counts[v])));
}

// The rows the chips and the text filter let through, newest first; recomputed at most once per frame.
let listDirty = true;
let shownList = [];
function shown() {
  if (listDirty) {
    shownList = state.order.filter((c) => (!state.verb || c.verb === state.verb) && fmt.matchesText(c, state.text));
    listDirty = false;
  }
  return shownList;
}

let rowHeight = 0; // px, measured from the first row drawn (every row is one line high)
const scroller = () => $("conn-scroll");

// A new row above the visible ones pushes them down; scroll with them so what the user reads stays put.
function keepScrollPlace(index) {
  const box = scroller();
  if (rowHeight && box.scrollTop > 0 && index * rowHeight < box.scrollTop) box.scrollTop += rowHeight;
}

let frame = 0;
function render() {
  if (frame) return;
  frame = requestAnimationFrame(() => { frame = 0; draw(); });
}

// Only the rows in view (plus OVERSCAN each side) are in the table; two spacer rows stand for the rest, so the
// scrollbar is that of the whole list.
function draw() {
  const rows = shown();
  const box = scroller();
  const h = rowHeight || 30;
  const first = Math.max(0, Math.floor(box.scrollTop / h) - OVERSCAN);
  const last = Math.min(rows.length, Math.ceil((box.scrollTop + box.clientHeight) / h) + OVERSCAN);
  const slice = rows.slice(first, last);
  $("spacer-top").style.height = `${first * h}px`;
  $("spacer-bottom").style.height = `${(rows.length - last) * h}px`;
  reconcile($("conn-rows"), slice, first);
  $("conn-table").setAttribute("aria-rowcount", String(rows.length + 1));
  $("empty").hidden = rows.length > 0;
  $("shown-count").textContent = rows.length === state.order.length ? `${rows.length} connections`
    : `${rows.length} of ${state.order.length} connections`;
  if (!rowHeight && slice.length) {
    rowHeight = $("conn-rows").querySelector("tr[data-conn-id]").getBoundingClientRect().height || 30;
    if (rowHeight !== h) render();
  }
}

// Keyed update: a row's <tr> is rebuilt only when what it shows changed (keeping the focus if it had it), and
// rows already in place are not moved, so a live update neither rebuilds the table nor takes the focus away.
const rowNodes = new Map(); // conn_id → { key, tr }
function reconcile(tbody, rows, first) {
  const top = $("spacer-top"), bottom = $("spacer-bottom");
  const keep = new Set();
  const wanted = rows.map((c, i) => {
    const key = JSON.stringify([c.verb, c.state, c.interface, c.split, c.process_name, c.domain, c.conn_id === state.selected]);
    let cached = rowNodes.get(c.conn_id);
    if (!cached || cached.key !== key) {
      const tr = row(c);
      const focused = cached && document.activeElement === cached.tr;
      if (cached && cached.tr.parentNode === tbody) tbody.replaceChild(tr, cached.tr);
      if (focused) tr.focus({ preventScroll: true }); // the new content takes the old one's focus
      cached = { key, tr };
      rowNodes.set(c.conn_id, cached);
    }
    cached.tr.setAttribute("aria-rowindex", String(first + i + 2)); // the header is row 1
    keep.add(c.conn_id);
    return cached.tr;
  });
  [top, ...wanted, bottom].forEach((tr, i) => {
    if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
  });
  while (tbody.children.length > wanted.length + 2) tbody.lastElementChild.remove();
  for (const id of rowNodes.keys()) if (!keep.has(id)) rowNodes.delete(id);
}

function row(c) {
  const dest = fmt.destination(c);
  const s = c.split || {};
  return el("tr", { tabindex: "0", class: c.conn_id === state.selected ? "selected" : "",
                    dataset: { connId: c.conn_id } },
    el("td", {}, appIcon(c), fmt.appName(c)),
    el("td", { title: dest.address }, dest.name || dest.address, dest.name ? el("span", { class: "sub" }, dest.address) : ""),
    el("td", {}, fmt.protocolName(c.protocol)),
    el("td", {}, c.verb ? el("span", { class: "verdict " + fmt.verdictClass(c.verb) }, c.verb) : "…"),
    el("td", {}, fmt.interfaceOf(c)),
    el("td", { class: "num" }, c.split ? fmt.bytes(s.bytes_up) : ""),
    el("td", { class: "num" }, c.split ? fmt.bytes(s.bytes_down) : ""),
    el("td", { class: "state-" + c.state }, c.state));
}

function appIcon(c) {
  const icon = fmt.appIcon(c);
  const node = el("span", { class: "app-icon", "aria-hidden": "true" }, icon.letter);
  node.style.setProperty("--hue", String(icon.hue)); // CSSOM, which the CSP allows (no inline style attribute)
  return node;
}

// Keyboard: ↑/↓, Page Up/Down, Home/End move between rows (scrolling the virtual list), Enter or Space opens
// the focused row's info panel, Escape closes it, "/" goes to the text filter.
function onRowKey(e) {
  const tr = e.target.closest("tr[data-conn-id]");
  if (!tr) return;
  const rows = shown();
  const at = rows.findIndex((c) => c.conn_id === tr.dataset.connId);
  const page = Math.max(1, Math.floor(scroller().clientHeight / (rowHeight || 30)) - 1);
  const to = { ArrowDown: at + 1, ArrowUp: at - 1, PageDown: at + page, PageUp: at - page, Home: 0,
               End: rows.length - 1 }[e.key];
  if (e.key === "Enter" || e.key === " ") {
    e.preventDefault();
    select(tr.dataset.connId);
  } else if (to !== undefined && rows.length) {
    e.preventDefault();
    focusRow(rows[Math.max(0, Math.min(rows.length - 1, to))].conn_id, Math.max(0, Math.min(rows.length - 1, to)));
  }
}

function focusRow(connId, index) {
  const box = scroller();
  const h = rowHeight || 30;
  const head = $("conn-table").tHead.getBoundingClientRect().height;
  if (index * h < box.scrollTop) box.scrollTop = index * h;
  else if ((index + 1) * h > box.scrollTop + box.clientHeight - head) box.scrollTop = (index + 1) * h - box.clientHeight + head;
  draw();
  const tr = rowNodes.get(connId);
  if (tr) tr.tr.focus({ preventScroll: true });
}

function dl(pairs) {
  const list = el("dl");
  for (const [k, v] of pairs) if (v !== "" && v !== undefined && v !== null) list.append(el("dt", {}, k), el("dd", {}, String(v)));
  return list;
}

function showInfo(c) {
  const dest = fmt.destination(c);
  const s = c.split;
  const body = [
    el("h3", {}, "Process"),
    dl([["Name", fmt.appName(c)], ["Path", c.exe], ["PID", c.pid >= 0 ? c.pid : ""], ["User", c.uid >= 0 ? c.uid : ""],
        ["Command line", (c.cmdline || []).join(" ")], ["Parent PID", c.ppid >= 0 ? c.ppid : ""],
        ["Parent chain", fmt.parentChain(c)]]),
    el("h3", {}, "Destination"),
    dl([["Name", dest.name], ["Address", c.dst_ip], ["Port", c.dst_port], ["Protocol", fmt.protocolName(c.protocol)],
        ["Resolved via", c.resolved_via]]),
    el("h3", {}, "Verdict"),
    dl([["Verdict", c.verb], ["Reason", c.reason], ["Decided by", fmt.ruleOrigin(c, rulesById.get(c.rule))],
        ["Started", fmt.when(c.started)], ["Ended", fmt.when(c.ended)], ["End", c.end_reason], ["State", c.state]]),
  ];
  if (c.verb === "split tunneled") {
    body.push(el("h3", {}, "Split Tunnel"), el("div", { class: "split-block", id: "split-block" },
      el("p", { class: "split-summary" }, fmt.splitSummary(c)),
      dl(s ? [["Data path", s.data_path === "kernel" ? "kernel (re-routed, source NAT)" : `proxy session ${s.session_id}`],
              ["Local address", s.local_port ? fmt.hostPort(s.local_ip, s.local_port) : s.local_ip],
              ["Bytes up", fmt.bytes(s.bytes_up)], ["Bytes down", fmt.bytes(s.bytes_down)],
              ["Packets up", s.packets_up || ""], ["Packets down", s.packets_down || ""], ["Resolved via", c.resolved_via]]
            : [["Resolved via", c.resolved_via]])));
  }
  body.push(appAction(c));
  $("info-title").textContent = `${fmt.appName(c)} → ${dest.name || dest.address}`;
  $("info-body").replaceChildren(...body);
  $("info").hidden = false;
}

// "Split this app" on a connection that stays in the VPN, "Keep this app in the VPN" on a split one. The
// outcome is kept in state.action (the panel re-renders under live updates and must not lose it).
function appAction(c) {
  const keep = c.verb === "split tunneled";
  const rule = fmt.appRule(c, keep);
  if (!rule || !c.verb) return "";
  const done = state.action.connId === c.conn_id ? state.action : { text: "", cls: "" };
  const result = el("span", { class: "action-result " + done.cls, id: "action-result", role: "status" }, done.text);
  const button = el("button", { type: "button", class: "action", id: "app-action" },
    keep ? "Keep this app in the VPN" : "Split this app");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const added = await send("POST", "/rules", rule);
      state.action = { connId: c.conn_id, cls: "ok",
                       text: `Added rule ${added.rule.id}` + (added.applied ? " (applied)" : "") };
    } catch (err) {
      state.action = { connId: c.conn_id, cls: "error", text: err.message };
    }
    if (state.selected === c.conn_id) showInfo(state.rows.get(c.conn_id));
  });
  return el("div", { class: "actions" }, button, result);
}

async function select(connId) {
  state.selected = connId;
  render();
  showInfo(state.rows.get(connId));
  try { upsert(await get(`/connections/${encodeURIComponent(connId)}`)); } catch { /* keep what we have */ }
}

// --- start ---------------------------------------------------------------------------------------------------

function setStream(s) {
  const node = $("stream");
  node.textContent = { live: "live", reconnecting: "reconnecting…", down: "disconnected" }[s] || s;
  node.className = "stream " + (s === "live" ? "live" : "down");
}

function closeInfo() {
  const was = state.selected;
  state.selected = "";
  $("info").hidden = true;
  render();
  if (was && rowNodes.has(was)) rowNodes.get(was).tr.focus({ preventScroll: true });
}

async function start() {
  $("text-filter").addEventListener("input", (e) => { state.text = e.target.value.trim(); listDirty = true; render(); });
  $("info-close").addEventListener("click", closeInfo);
  $("conn-rows").addEventListener("click", (e) => {
    const tr = e.target.closest("tr[data-conn-id]");
    if (tr) select(tr.dataset.connId);
  });
  $("conn-rows").addEventListener("keydown", onRowKey);
  scroller().addEventListener("scroll", render, { passive: true });
  window.addEventListener("resize", render);
  window.addEventListener("viewshown", (e) => { if (e.detail === "connections") render(); }); // sized again
  document.addEventListener("keydown", (e) => {
    if ($("view-connections").hidden) return;
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (e.key === "/" && !typing) { e.preventDefault(); $("text-filter").focus(); }
    if (e.key === "Escape" && !$("info").hidden && $("tray").hidden) closeInfo();
  });
  loadRules();
  subscribe(["conn.", "proxy.session.", "policy.snapshot"], {
    "policy.snapshot": loadRules,
    "conn.new": onNew,
    "conn.verdict": onVerdict,
    "conn.end": onEnd,
    "proxy.session.open": onSession,
    "proxy.session.close": onSession,
  }, setStream);
  $("range").addEventListener("change", (e) => { state.since = e.target.value; loadHistory(); });
  await loadHistory();
}

// History in the chosen time range, newest first, a page at a time (the live stream keeps adding to it).
let loading = 0;
async function loadHistory() {
  const mine = ++loading;
  state.rows.clear();
  state.order = [];
  splitKeys.clear();
  listDirty = true;
  render();
  try {
    state.counts = await get("/counts" + sinceQuery("?"));
    renderChips();
    let until = "";
    while (mine === loading && state.order.length < HISTORY_LIMIT) {
      const page = await get(`/connections?limit=${HISTORY_PAGE}` + sinceQuery("&") + until);
      if (mine !== loading) return;
      const before = state.rows.size;
      for (const c of page) if (!state.rows.has(c.conn_id)) upsert(c);
      if (page.length < HISTORY_PAGE || state.rows.size === before) break;
      until = `&until=${page[page.length - 1].started}`;
    }
  } catch (err) {
    setStream(err.message);
  }
}

views.start();
start();
