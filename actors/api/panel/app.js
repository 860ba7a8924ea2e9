// The page's entry: the connections view (history from /connections, live updates from the event stream,
// verdict chips with counts from /counts, a text filter, the info panel of the selected connection); the other
// views (views.js) are switched by the header's navigation.
import { get, send, subscribe } from "./api.js";
import { $, el } from "./dom.js";
import * as fmt from "./format.js";
import * as views from "./views.js";

const HISTORY_LIMIT = 1000;
const SHOWN_LIMIT = 500; // rows in the table; a virtualised list is the next step for 10,000
const REFETCH_DELAY_MS = 150; // let the controller's registry join the event before asking it
const COUNTS_EVERY_MS = 500;

const state = { rows: new Map(), verb: "", text: "", since: "", selected: "", counts: {}, action: {} };

// --- data ----------------------------------------------------------------------------------------------------

function upsert(c) {
  const old = state.rows.get(c.conn_id) || {};
  state.rows.set(c.conn_id, { ...old, ...c });
  render();
  if (c.conn_id === state.selected) showInfo(state.rows.get(c.conn_id));
}

const pending = new Map();
function refetch(connId) {
  clearTimeout(pending.get(connId));
  pending.set(connId, setTimeout(async () => {
    pending.delete(connId);
    try {
      upsert(await get(`/connections/${encodeURIComponent(connId)}`));
      refreshCounts();
    } catch { /* not registered (yet) */ }
  }, REFETCH_DELAY_MS));
}

// Counts refresh at most every COUNTS_EVERY_MS, after the registry answered for a changed connection (so the
// counts include it); throttled rather than debounced, so a steady stream of events still updates them.
let countsDirty = false;
function refreshCounts() {
  countsDirty = true;
}

setInterval(async () => {
  if (!countsDirty) return;
  countsDirty = false;
  try { state.counts = await get("/counts" + sinceQuery("?")); renderChips(); } catch { /* the stream says why */ }
}, COUNTS_EVERY_MS);

function sinceQuery(sep) {
  return state.since ? `${sep}since=${encodeURIComponent(state.since)}` : "";
}

function onNew(e) {
  const p = e.process || {};
  upsert({ conn_id: e.conn_id, started: e.ts, protocol: fmt.protocolName(e.protocol), src_ip: e.src_ip,
           src_port: e.src_port, dst_ip: e.dst_ip, dst_port: e.dst_port, domain: e.domain || "", pid: p.pid ?? -1,
           exe: p.exe || "", process_name: p.name || "", verb: "", state: "open" });
  refetch(e.conn_id);
}

function onSession(e) {
  for (const c of state.rows.values()) if (c.split_key && c.split_key === e.split_key) refetch(c.conn_id);
}

// --- rendering -----------------------------------------------------------------------------------------------

function renderChips() {
  const chips = $("chips");
  const verbs = [...fmt.VERB_ORDER.filter((v) => v in state.counts),
                 ...Object.keys(state.counts).filter((v) => v !== "total" && !fmt.VERB_ORDER.includes(v))];
  const chip = (verb, label, count) => {
    const b = el("button", { type: "button", class: "chip", "aria-pressed": String(state.verb === verb),
                             dataset: { verb } }, label, el("span", { class: "count" }, String(count ?? 0)));
    b.addEventListener("click", () => { state.verb = verb; renderChips(); render(); });
    return b;
  };
  chips.replaceChildren(chip("", "All", state.counts.total), ...verbs.map((v) => chip(v, v, state.counts[v])));
}

let frame = 0;
function render() {
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    const rows = [...state.rows.values()]
      .filter((c) => (!state.verb || c.verb === state.verb) && fmt.matchesText(c, state.text))
      .sort((a, b) => b.started - a.started)
      .slice(0, SHOWN_LIMIT);
    reconcile($("conn-rows"), rows);
    $("empty").hidden = rows.length > 0;
  });
}

// Keyed update: a row's <tr> is rebuilt only when what it shows changed, and rows already in place are not
// moved, so a live update neither rebuilds the table nor takes the keyboard focus away from a row.
const rowNodes = new Map(); // conn_id → { key, tr }
function reconcile(tbody, rows) {
  const wanted = rows.map((c) => {
    const key = JSON.stringify([c.verb, c.state, c.interface, c.split, c.process_name, c.domain, c.conn_id === state.selected]);
    let cached = rowNodes.get(c.conn_id);
    if (!cached || cached.key !== key) {
      const tr = row(c);
      if (cached && cached.tr.parentNode === tbody) tbody.replaceChild(tr, cached.tr);
      cached = { key, tr };
      rowNodes.set(c.conn_id, cached);
    }
    return cached.tr;
  });
  wanted.forEach((tr, i) => { if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null); });
  while (tbody.children.length > wanted.length) tbody.lastElementChild.remove();
  for (const id of rowNodes.keys()) if (!state.rows.has(id)) rowNodes.delete(id);
}

function row(c) {
  const dest = fmt.destination(c);
  const s = c.split || {};
  const tr = el("tr", { tabindex: "0", class: c.conn_id === state.selected ? "selected" : "",
                        dataset: { connId: c.conn_id } },
    el("td", {}, fmt.appName(c)),
    el("td", { title: dest.address }, dest.name || dest.address, dest.name ? el("span", { class: "sub" }, dest.address) : ""),
    el("td", {}, fmt.protocolName(c.protocol)),
    el("td", {}, c.verb ? el("span", { class: "verdict " + fmt.verdictClass(c.verb) }, c.verb) : "…"),
    el("td", {}, fmt.interfaceOf(c)),
    el("td", { class: "num" }, c.split ? fmt.bytes(s.bytes_up) : ""),
    el("td", { class: "num" }, c.split ? fmt.bytes(s.bytes_down) : ""),
    el("td", { class: "state-" + c.state }, c.state));
  const open = () => select(c.conn_id);
  tr.addEventListener("click", open);
  tr.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
  return tr;
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
        ["Command line", (c.cmdline || []).join(" ")]]),
    el("h3", {}, "Destination"),
    dl([["Name", dest.name], ["Address", c.dst_ip], ["Port", c.dst_port], ["Protocol", fmt.protocolName(c.protocol)],
        ["Resolved via", c.resolved_via]]),
    el("h3", {}, "Verdict"),
    dl([["Verdict", c.verb], ["Reason", c.reason], ["Rule", c.rule || (c.verb ? "default (global setting)" : "")],
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

async function start() {
  $("text-filter").addEventListener("input", (e) => { state.text = e.target.value.trim(); render(); });
  $("info-close").addEventListener("click", () => { state.selected = ""; $("info").hidden = true; render(); });
  subscribe(["conn.", "proxy.session."], {
    "conn.new": onNew,
    "conn.verdict": (e) => refetch(e.conn_id),
    "conn.end": (e) => refetch(e.conn_id),
    "proxy.session.open": onSession,
    "proxy.session.close": onSession,
  }, setStream);
  $("range").addEventListener("change", (e) => { state.since = e.target.value; loadHistory(); });
  await loadHistory();
}

// History in the chosen time range (the live stream keeps adding to it).
async function loadHistory() {
  state.rows.clear();
  render();
  renderChips();
  try {
    for (const c of await get(`/connections?limit=${HISTORY_LIMIT}` + sinceQuery("&"))) upsert(c);
    state.counts = await get("/counts" + sinceQuery("?"));
    renderChips();
  } catch (err) {
    setStream(err.message);
  }
}

views.start();
start();
