// The notification tray (the header's "Notifications" button) and the menu's "Reset Notifications State".
// Notifications showing now come from /notifications, asked every POLL_MS (their topics are open-ended, so the
// event stream cannot name them up front); an action button answers with that action ("Don't show again" is
// `suppress`: the controller writes the marker and never shows it again until the reset).
import { get, send } from "./api.js";
import { $, button, el } from "./dom.js";

const POLL_MS = 2000;
const SAY_MS = 15000; // how long what the menu did stays in view
let shown = [];
let sayTimer = 0;

async function load() {
  try {
    shown = await get("/notifications");
  } catch {
    return; // the stream indicator says why
  }
  render();
}

function render() {
  $("tray-count").textContent = String(shown.length);
  $("tray-count").className = "badge" + (shown.length ? " some" : "");
  $("tray-list").replaceChildren(...shown.map((n) => el("li", { class: `note level-${n.level}`, dataset: { noteId: n.id } },
    el("strong", { class: "note-title" }, n.title || n.id),
    el("p", { class: "note-message" }, n.message),
    el("div", { class: "note-actions" }, ...n.actions.map((a) =>
      button(a.text, { class: "action", dataset: { action: a.id } }, () => respond(n, a)))))));
  $("tray-empty").hidden = shown.length > 0;
}

async function respond(note, action) {
  try {
    await send("POST", `/notifications/${encodeURIComponent(note.id)}/respond`, { action: action.id });
    if (action.type === "open-setting") location.hash = "#settings";
    if (action.type === "open-page" && typeof action.payload === "string") location.hash = "#" + action.payload;
  } catch (err) {
    say(err.message, "error");
  }
  await load();
}

function say(text, cls = "ok") {
  const node = $("menu-status");
  node.textContent = text;
  node.className = "menu-status " + cls;
  node.hidden = false;
  clearTimeout(sayTimer);
  sayTimer = setTimeout(() => { node.hidden = true; }, SAY_MS);
}

async function reset() {
  $("menu").open = false;
  try {
    const done = await send("POST", "/notifications/reset-state");
    say(`Reset Notifications State: deleted ${done.notifications} notification(s) and ${done.markers} ` +
        "'don't show again' marker(s)");
  } catch (err) {
    say(err.message, "error");
  }
  await load();
}

function toggleTray(open) {
  $("tray").hidden = !open;
  $("tray-toggle").setAttribute("aria-expanded", String(open));
  if (open) load();
}

export function start() {
  $("tray-toggle").addEventListener("click", () => toggleTray($("tray").hidden));
  $("reset-notifications").addEventListener("click", reset);
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (!$("tray").hidden) { toggleTray(false); $("tray-toggle").focus(); }
    if ($("menu").open) { $("menu").open = false; $("menu").querySelector("summary").focus(); }
  });
  load();
  setInterval(load, POLL_MS);
}
