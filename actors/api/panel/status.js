// Is splittun fully running? A banner on every view (from /status, every POLL_MS) names what is not: an actor
// gone or not ready, a refused config file, or the API itself not answering. The status view shows the uplink
// per family (netenv's snapshot) and each actor's state and heartbeat age.
import { get } from "./api.js";
import { $, el } from "./dom.js";
import * as fmt from "./format.js";

const POLL_MS = 2000;
let last = null; // the last /status answer

async function poll() {
  let found;
  try {
    last = await get("/status");
    found = fmt.problems(last);
  } catch (err) {
    last = null;
    found = ["splittun does not answer: " + err.message]; // the api actor, or the controller behind it
  }
  $("banner-problems").replaceChildren(...found.map((p) => el("li", {}, p)));
  $("banner").hidden = found.length === 0;
  if (!$("view-status").hidden) render();
}

function cells(...values) {
  return values.map((v) => el("td", {}, v === undefined || v === null ? "" : v));
}

async function render() {
  if (last) {
    $("actor-rows").replaceChildren(...last.actors.map((a) => {
      const s = fmt.actorState(a, last.heartbeat_ttl);
      return el("tr", { dataset: { actor: a.instance } },
        ...cells(a.instance, el("span", { class: "actor-" + s.cls }, s.text), `${fmt.duration(a.age)} ago`,
                 String(a.pid), fmt.duration(a.uptime)));
    }));
  }
  let net;
  try { net = await get("/interfaces"); } catch (err) {
    $("uplink-rows").replaceChildren(el("tr", {}, el("td", { colspan: "4" }, err.message)));
    return;
  }
  const byName = Object.fromEntries(net.interfaces.map((i) => [i.name, i]));
  $("uplink-rows").replaceChildren(...[4, 6].map((f) => {
    const up = net[`uplink_ipv${f}`];
    const address = up && byName[up] ? byName[up][`ipv${f}`] : "";
    return el("tr", { dataset: { family: String(f) } },
      ...cells(`IPv${f}`, up ? up + (address ? ` (${address})` : "") : "none", net[`uplink_gateway_ipv${f}`] || "",
               net[`default_ipv${f}`] || "none"));
  }));
  $("interface-rows").replaceChildren(...net.interfaces.map((i) =>
    el("tr", {}, ...cells(i.name, i.kind + (i.link_kind ? ` (${i.link_kind})` : ""), i.operstate,
                          i.addresses.join(", ")))));
}

export function start() {
  poll();
  setInterval(poll, POLL_MS);
}

export function show() {
  render();
}
