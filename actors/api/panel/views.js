// The header's navigation: one view shows at a time, named in the URL's hash (#rules) so reload and the
// browser's back button keep it. A view module exports `show()` (called each time it is shown).
import { $ } from "./dom.js";
import * as notifications from "./notifications.js";
import * as rules from "./rules.js";
import * as settings from "./settings.js";
import * as status from "./status.js";

const VIEWS = { connections: null, rules, settings, status };

function current() {
  const name = location.hash.slice(1);
  return name in VIEWS ? name : "connections";
}

function show() {
  const name = current();
  for (const view of Object.keys(VIEWS)) {
    $(`view-${view}`).hidden = view !== name;
    const tab = document.querySelector(`nav a[href="#${view}"]`);
    if (view === name) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  if (VIEWS[name]) VIEWS[name].show();
  window.dispatchEvent(new CustomEvent("viewshown", { detail: name })); // app.js redraws the connections list
}

export function start() {
  notifications.start(); // the tray, the menu and the banner belong to every view
  for (const module of Object.values(VIEWS)) if (module) module.start();
  window.addEventListener("hashchange", show);
  show();
}
