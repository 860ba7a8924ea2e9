// The rules view: the split rules in order (first match wins), moved with ↑/↓, removed with ✕, and a form that
// adds one. The API answers with the controller's own validation (the CLI's words); an error is shown next to
// the field it names.
import { get, send } from "./api.js";
import { $, button, el } from "./dom.js";
import * as fmt from "./format.js";

const FIELDS = ["app", "name", "dest", "proto", "port", "interface", "position"];
const RECENT = 300; // connections the app picker offers apps from

let rules = [];

async function load() {
  try {
    rules = await get("/rules");
    render();
  } catch (err) {
    status(err.message, "error");
  }
}

function status(text, cls = "ok") {
  const node = $("rules-status");
  node.textContent = text;
  node.className = "action-result " + cls;
}

function render() {
  const n = rules.length;
  $("rule-rows").replaceChildren(...rules.map((r, i) => el("tr", { dataset: { ruleId: r.id } },
    el("td", {}, String(i + 1)),
    el("td", {}, el("span", { class: "verdict " + (r.action === "keep" ? "verdict-tunneled" : "verdict-split") },
                    r.action === "keep" ? "keep in VPN" : "split")),
    el("td", { class: "conditions" }, fmt.ruleConditions(r)),
    el("td", {}, r.interface || "global choice"),
    el("td", { class: "rule-buttons" },
      button("↑", { class: "icon move-up", "aria-label": `Move rule ${r.id} up`, disabled: i === 0 }, () => move(r.id, i)),
      button("↓", { class: "icon move-down", "aria-label": `Move rule ${r.id} down`, disabled: i === n - 1 },
             () => move(r.id, i + 2)),
      button("✕", { class: "icon remove", "aria-label": `Remove rule ${r.id}` }, () => remove(r.id))))));
  $("rules-empty").hidden = n > 0;
}

async function move(id, position) {
  try {
    const done = await send("POST", `/rules/${encodeURIComponent(id)}/move`, { position });
    status(`Moved rule ${id} to position ${position}` + (done.applied ? " (applied)" : ""));
  } catch (err) {
    status(err.message, "error");
  }
  await load();
}

async function remove(id) {
  try {
    const done = await send("DELETE", `/rules/${encodeURIComponent(id)}`);
    status(`Removed rule ${id}` + (done.applied ? " (applied)" : ""));
  } catch (err) {
    status(err.message, "error");
  }
  await load();
}

function clearErrors() {
  for (const f of [...FIELDS, "form"]) $(`err-${f}`).textContent = "";
  for (const f of FIELDS) $(`rule-${f}`).removeAttribute("aria-invalid");
}

async function add(event) {
  event.preventDefault();
  clearErrors();
  const form = $("rule-form");
  const value = (f) => $(`rule-${f}`).value.trim();
  const spec = { keep: form.elements.action.value === "keep", position: Number(value("position")) };
  for (const f of ["app", "name", "dest", "proto", "port", "interface"]) if (value(f)) spec[f] = value(f);
  try {
    const done = await send("POST", "/rules", spec);
    status(`Added rule ${done.rule.id}` + (done.applied ? " (applied)" : ""));
    form.reset();
    await load();
  } catch (err) {
    const field = fmt.errorField(err.message);
    $(`err-${field || "form"}`).textContent = err.message;
    if (field) {
      $(`rule-${field}`).setAttribute("aria-invalid", "true");
      $(`rule-${field}`).focus();
    }
  }
}

// The app picker: executables and process names of recent connections, offered as the inputs' suggestions.
async function loadChoices() {
  const options = (id, values) => $(id).replaceChildren(...[...new Set(values)].filter(Boolean).sort()
    .map((v) => el("option", { value: v })));
  try {
    const recent = await get(`/connections?limit=${RECENT}`);
    options("recent-apps", recent.map((c) => c.exe));
    options("recent-names", recent.map((c) => c.process_name));
  } catch { /* no suggestions */ }
  try {
    const net = await get("/interfaces");
    options("known-interfaces", net.interfaces.filter((i) => i.kind !== "loopback").map((i) => i.name));
  } catch { /* no suggestions */ }
}

export function start() {
  $("rule-form").addEventListener("submit", add);
}

export function show() {
  load();
  loadChoices();
}
