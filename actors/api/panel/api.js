// The panel's only way to the api actor: same-origin JSON and the server-sent event stream (session cookie).

const API = "/api/v1";

export class ApiError extends Error {}

export async function get(path) {
  const response = await fetch(API + path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (body.error && body.error.message) || `${response.status} ${response.statusText}`;
    throw new ApiError(message);
  }
  return body;
}

// A state change: JSON body, same origin (the API refuses other origins), the error's one line on failure.
export async function send(method, path, data) {
  const response = await fetch(API + path, {
    method, credentials: "same-origin",
    headers: { Accept: "application/json", "Content-Type": "application/json" },
    body: JSON.stringify(data),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError((body.error && body.error.message) || `${response.status} ${response.statusText}`);
  return body;
}

// Subscribe to bus topics; `handlers` maps a topic to a function of its decoded data.
export function subscribe(topics, handlers, onState) {
  const query = topics.map((t) => "topic=" + encodeURIComponent(t)).join("&");
  const source = new EventSource(`${API}/events?${query}`);
  source.addEventListener("open", () => onState("live"));
  source.addEventListener("error", () => onState(source.readyState === EventSource.CLOSED ? "down" : "reconnecting"));
  for (const [topic, handler] of Object.entries(handlers)) {
    source.addEventListener(topic, (event) => handler(JSON.parse(event.data)));
  }
  return source;
}
