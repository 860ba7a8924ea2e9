// The settings view: the split-tunnel switch and the interface choice on top (auto says what it resolves to per
// family, from netenv's snapshot), then the options of the chosen expertise level with their descriptions.
// Every change is PUT /api/v1/options/KEY, the controller's `config set`: its refusal is shown by the option.
import { get, send } from "./api.js";
import { $, button, el } from "./dom.js";
import * as fmt from "./format.js";

const ENABLE = "splittun/enable";
const INTERFACE = "splittun/interface";
const RULES = "splittun/rules"; // edited in the rules view
const TOP = new Set([ENABLE, INTERFACE, RULES]);

async function setOption(key, value) {
  return send("PUT", `/options/${key}`, { value });
}

async function load() {
  const level = $("level").value;
  let options, net = null;
  try {
    options = await get(`/options?level=${encodeURIComponent(level)}`);
  } catch (err) {
    $("options").replaceChildren(el("p", { class: "field-error" }, err.message));
    return;
  }
  try { net = await get("/interfaces"); } catch { /* netenv has not reported yet */ }
  const byKey = Object.fromEntries(options.map((o) => [o.key, o]));
  $("enable").checked = Boolean(byKey[ENABLE] && byKey[ENABLE].value);
  const choice = $("interface-choice");
  if (document.activeElement !== choice) choice.value = (byKey[INTERFACE] && byKey[INTERFACE].value) || "auto";
  $("interface-resolved").textContent = fmt.interfaceResolution(choice.value, net);
  if (net) {
    $("choice-interfaces").replaceChildren(el("option", { value: "auto" }),
      ...net.interfaces.filter((i) => i.kind !== "loopback").map((i) => el("option", { value: i.name })));
  }
  const rest = options.filter((o) => !TOP.has(o.key));
  $("options").replaceChildren(...fmt.LEVELS.filter((l) => rest.some((o) => o.level === l)).map((l) =>
    el("section", { class: "option-group", "aria-label": `${l} options` }, el("h3", {}, `${l} options`),
       ...rest.filter((o) => o.level === l).map(option))));
}

function option(o) {
  const id = "opt-" + o.key.replace(/[^a-z0-9]+/gi, "-");
  const error = el("span", { class: "field-error", id: `${id}-error`, role: "alert" });
  // As typed on the command line (`splittun config set`): lists comma-separated, numbers and text as they are.
  const shown = Array.isArray(o.value) ? o.value.join(", ") : String(o.value ?? "");
  const input = typeof o.value === "boolean"
    ? el("input", { type: "checkbox", id, checked: o.value })
    : el("input", { id, value: shown, autocomplete: "off" });
  const save = button("Save", { class: "action", id: `${id}-save` }, async () => {
    error.textContent = "";
    const value = input.type === "checkbox" ? input.checked : input.value;
    try {
      await setOption(o.key, value);
      error.textContent = "";
      await load();
    } catch (err) {
      error.textContent = err.message;
    }
  });
  return el("div", { class: "option", dataset: { key: o.key } },
    el("label", { for: id, class: "option-key" }, o.key),
    el("div", { class: "option-edit" }, input, save, error),
    el("p", { class: "hint" }, o.description + ` (default: ${JSON.stringify(o.default)})`));
}

async function toggle() {
  const on = $("enable").checked;
  try {
    const done = await setOption(ENABLE, on);
    $("enable-status").textContent = `Split tunnelling ${on ? "on" : "off"}` + (done.applied ? " (applied)" : "");
    $("enable-status").className = "action-result ok";
  } catch (err) {
    $("enable").checked = !on;
    $("enable-status").textContent = err.message;
    $("enable-status").className = "action-result error";
  }
}

async function chooseInterface() {
  $("interface-error").textContent = "";
  try {
    await setOption(INTERFACE, $("interface-choice").value.trim() || "auto");
    $("interface-choice").blur();
  } catch (err) {
    $("interface-error").textContent = err.message;
  }
  await load();
}

export function start() {
  $("enable").addEventListener("change", toggle);
  $("interface-save").addEventListener("click", chooseInterface);
  $("level").addEventListener("change", load);
}

export function show() {
  load();
}
