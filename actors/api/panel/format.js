// Pure helpers: how a connection is shown. No DOM, no fetch, so each is easy to check by eye and by test.

const PROTOCOLS = { 1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6" };

// The verdict verbs (messages/verdict.py) in the order the chips show them.
export const VERB_ORDER = ["split tunneled", "accepted", "tunneled", "blocked", "dropped", "failed"];

export function verdictClass(verb) {
  const known = { "split tunneled": "split", accepted: "accepted", blocked: "blocked", dropped: "dropped",
                  tunneled: "tunneled", failed: "failed" };
  return "verdict-" + (known[verb] || "other");
}

export function protocolName(p) {
  return typeof p === "number" ? (PROTOCOLS[p] || String(p)) : (p || "");
}

export function appName(c) {
  if (c.process_name) return c.process_name;
  if (c.exe) return c.exe.split("/").pop();
  return c.pid >= 0 ? `pid ${c.pid}` : "unknown";
}

export function hostPort(ip, port) {
  return (ip.includes(":") ? `[${ip}]` : ip) + (port ? `:${port}` : "");
}

export function destination(c) {
  return { name: c.domain || "", address: hostPort(c.dst_ip, c.dst_port) };
}

export function bytes(n) {
  if (n === undefined || n === null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? String(v) : v.toFixed(1)) + " " + units[i];
}

export function when(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "";
}

export function interfaceOf(c) {
  return (c.split && c.split.interface) || c.interface || "";
}

// "This connection is routed through interface eth0 (192.0.2.10)" — the words of Portmaster's Split Tunnel block.
export function splitSummary(c) {
  const s = c.split || {};
  const iface = s.interface || c.interface;
  if (!iface) return "This connection is split tunneled; its interface is not known yet.";
  return `This connection is routed through interface ${iface}` + (s.local_ip ? ` (${s.local_ip})` : "");
}

// Does the row match the text filter (app, executable, destination name or address)?
export function matchesText(c, text) {
  if (!text) return true;
  const t = text.toLowerCase();
  return [appName(c), c.exe, c.domain, c.dst_ip, String(c.dst_port)].some((f) => (f || "").toLowerCase().includes(t));
}

// The rule "split this app" / "keep this app in the VPN" adds: the executable when known (like --app), else the
// process name (like --name); first, so it wins over the rules already there. null when the app is unknown.
export function appRule(c, keep) {
  const who = c.exe ? { app: c.exe } : c.process_name ? { name: c.process_name } : null;
  return who && { ...who, keep, position: 1 };
}

// What a rule applies to, in the words of `splittun rules list` (core/policy/rules.describe, minus the action).
export function ruleConditions(r) {
  const parts = [];
  if (r.endpoint) parts.push(`endpoint ${r.endpoint}`);
  if (r.app_path) parts.push(`app=${r.app_path}`);
  if (r.app_name) parts.push(`name=${r.app_name}`);
  if (r.uid !== undefined && r.uid >= 0) parts.push(`uid=${r.uid}`);
  if (r.children) parts.push("+children");
  if (r.preset) parts.push(`preset=${r.preset}`);
  if (r.dest) parts.push(`dest=${r.dest}`);
  if (r.proto || r.port_lo) {
    const lo = r.port_lo || 0, hi = r.port_hi || lo;
    parts.push(`${r.proto || "*"}/${!lo ? "*" : lo === hi ? lo : `${lo}-${hi}`}`);
  }
  return parts.join(" ") || "every connection";
}

// The add-rule form field an API error is about: its message starts with the field (or the CLI flag) it names,
// "dest: '1.2.3' is not a valid IP address", "--interface: unknown interface 'x'". "" = the form as a whole.
const FIELD_OF = { "--interface": "interface", interface: "interface", dest: "dest", port: "port", proto: "proto",
                   app_path: "app", app: "app", children: "app", app_name: "name", name: "name", uid: "app",
                   position: "position", endpoint: "dest" };
export function errorField(message) {
  const head = String(message).split(":")[0].trim();
  return FIELD_OF[head] || "";
}

export const LEVELS = ["user", "expert", "developer"];

// What the interface choice means now: "auto" names the uplink per family (the interface carrying the physical
// default route, from netenv's snapshot) with its address; a named choice is shown as it is.
export function interfaceResolution(choice, net) {
  if (!net) return "No network snapshot yet.";
  const byName = Object.fromEntries(net.interfaces.map((i) => [i.name, i]));
  const one = (family) => {
    const name = net[`uplink_ipv${family}`];
    if (!name) return `IPv${family}: no uplink`;
    const address = (byName[name] || {})[`ipv${family}`];
    return `IPv${family}: ${name}` + (address ? ` (${address})` : "");
  };
  if (choice && choice !== "auto") return `Split connections leave through ${choice}.`;
  return `auto resolves to ${one(4)}; ${one(6)}`;
}

// An actor's state as the status view shows it: gone (no heartbeat for the TTL), not ready (why), ready.
export function actorState(a, ttl) {
  if (a.age > ttl) return { cls: "gone", text: `gone (no heartbeat for ${duration(a.age)})` };
  if (!a.ready) return { cls: "not-ready", text: "not ready: " + (a.not_ready || "starting") };
  return { cls: "ready", text: "ready" };
}

// What keeps splittun from running fully, one line each ([] = all is well): actors gone or not ready, a refused
// config file. `status` is GET /api/v1/status.
export function problems(status) {
  const found = [];
  if (!status.actors.length) found.push("no actor has reported a heartbeat");
  for (const a of status.actors) {
    const s = actorState(a, status.heartbeat_ttl);
    if (s.cls !== "ready") found.push(`${a.instance}: ${s.text}`);
  }
  if (status.config_error) found.push("config file refused: " + status.config_error);
  return found;
}

export function duration(seconds) {
  if (seconds === undefined || seconds === null) return "";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

// Which rule decided a connection, and whether it is an app's rule or one for every app; no rule = the global
// setting. `rule` is that rule from /rules (undefined when not loaded or gone since).
export function ruleOrigin(c, rule) {
  if (!c.verb) return "";
  if (!c.rule) return "the global setting (no rule matched)";
  if (!rule) return `rule ${c.rule}`;
  const kind = rule.app_path || rule.app_name ? "app rule" : "rule for every app";
  return `${kind} ${c.rule}: ${rule.action} ${ruleConditions(rule)}`;
}

// An app's icon: its initial on a colour of its own (the same app, the same colour). Real icons would need the
// desktop's icon theme, which the api actor does not read.
export function appIcon(c) {
  const name = appName(c);
  let hash = 0;
  for (const ch of c.exe || name) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return { letter: (name.match(/[a-z0-9]/i) || ["?"])[0].toUpperCase(), hue: hash % 360 };
}

// The parent chain, parent first, as conn.new carried it (the interceptor reads it when the connection starts;
// the history does not keep it): "bash ← sshd ← systemd".
export function parentChain(c) {
  const names = (c.ancestor_names || []).length ? c.ancestor_names : (c.ancestors || []).map((a) => a.split("/").pop());
  return names.join(" ← ");
}
