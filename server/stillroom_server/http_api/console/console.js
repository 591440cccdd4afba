// Stillroom's web console: plain DOM code, no framework, no build step, nothing from elsewhere.
// The API key lives in this tab's sessionStorage only. Data goes through textContent, never HTML.
// Pages (the URL's hash): #/runs, #/runs/<id>, #/checkpoints, #/sessions, #/server, #/playground.
"use strict";

const KEY_ITEM = "stillroom.console.key";
const API = "/api/v1";
const OAI = "/oai/api/v1";
const SVG_NS = "http://www.w3.org/2000/svg";
const PAGE_SIZE = 50;
let refreshTimer = null;
let renderCount = 0;

// ---------------------------------------------------------------- small helpers

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function ago(iso) {
  if (!iso) return "–";
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  return span(seconds >= 0 ? span_text(seconds) + " ago" : "in " + span_text(-seconds), iso);
}

function until(iso) {
  if (!iso) return h("span", {}, "never");
  const seconds = (Date.parse(iso) - Date.now()) / 1000;
  return span(seconds > 0 ? "in " + span_text(seconds) : "now", iso);
}

function span(text, iso) {
  return h("time", {datetime: iso, title: new Date(iso).toLocaleString()}, text);
}

function span_text(seconds) {
  if (seconds < 60) return Math.round(seconds) + " s";
  if (seconds < 3600) return Math.round(seconds / 60) + " min";
  if (seconds < 86400 * 2) return (seconds / 3600).toFixed(seconds < 36000 ? 1 : 0) + " h";
  return Math.round(seconds / 86400) + " d";
}

// A column heading; "#Name" heads a column of numbers (right-aligned).
function head(name) {
  const numeric = name.startsWith("#");
  return h("th", {scope: "col", class: numeric ? "num" : null}, numeric ? name.slice(1) : name);
}

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function number(value) {
  if (value === null || value === undefined) return "–";
  const size = Math.abs(value);
  if (size !== 0 && (size < 1e-3 || size >= 1e6)) return value.toExponential(3);
  return String(Number(value.toPrecision(6)));
}

const STATES = {in_memory: "in memory", on_disk: "on disk", unloaded: "unloaded"};

function stateBadge(state) {
  return h("span", {class: "badge state-" + state}, STATES[state] || state);
}

// "3600", "90s", "30m", "12h", "7d" -> seconds; "never" or "" -> null; anything else -> undefined.
function parseTtl(text) {
  text = text.trim().toLowerCase();
  if (text === "never" || text === "") return null;
  const match = /^(\d{1,9})\s*([smhd]?)$/.exec(text);
  if (!match) return undefined;
  const scale = {"": 1, s: 1, m: 60, h: 3600, d: 86400}[match[2]];
  return Number(match[1]) * scale;
}

// ---------------------------------------------------------------- the key and the API

function key() { return sessionStorage.getItem(KEY_ITEM); }

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function call(method, path, body, headers) {
  const init = {method, headers: Object.assign({"x-api-key": key() || ""}, headers || {}), cache: "no-store"};
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["content-type"] = "application/json";
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    let message = text.slice(0, 500) || response.statusText;
    if (data && typeof data.error === "string") message = data.error;
    else if (data && data.error && data.error.message) message = data.error.message;
    if (response.status === 401) signOut("The server refused the key: " + message);
    throw new ApiError(response.status, message);
  }
  return data;
}

const get = (path) => call("GET", path);

function checkpointUrl(checkpoint, runId) {
  const [kind, ...rest] = checkpoint.checkpoint_id.split("/");
  return `${encodeURIComponent(runId)}/checkpoints/${encodeURIComponent(kind)}/${encodeURIComponent(rest.join("/"))}`;
}

function runOf(checkpoint) {
  // tinker://<run>/<kind>/<name>
  return checkpoint.tinker_path.replace(/^[a-z]+:\/\//, "").split("/")[0];
}

// ---------------------------------------------------------------- messages

function say(text) {
  const status = document.getElementById("status");
  status.textContent = text;
}

function alertText(text) {
  const alert = document.getElementById("alert");
  alert.textContent = text || "";
  alert.hidden = !text;
}

async function guarded(action) {
  alertText("");
  try {
    return await action();
  } catch (error) {
    alertText(error instanceof ApiError ? `${error.message} (HTTP ${error.status})` : String(error));
    return undefined;
  }
}

// ---------------------------------------------------------------- sign in and routing

function signOut(reason) {
  sessionStorage.removeItem(KEY_ITEM);
  location.hash = "#/sign-in";
  route();
  if (reason) alertText(reason);
}

async function signIn(event) {
  event.preventDefault();
  const input = document.getElementById("key");
  const candidate = input.value.trim();
  if (!candidate) return;
  sessionStorage.setItem(KEY_ITEM, candidate);
  const ok = await guarded(async () => { await get(`${API}/console/server`); return true; });
  if (ok) {
    input.value = "";
    const target = PAGES.some(([pattern]) => pattern.test(location.hash)) ? location.hash : "#/runs";
    if (location.hash === target) route(); else location.hash = target;
  } else {
    sessionStorage.removeItem(KEY_ITEM);
  }
}

const PAGES = [
  [/^#\/runs\/(.+)$/, (m) => runPage(decodeURIComponent(m[1])), "runs"],
  [/^#\/runs(?:\?(.*))?$/, (m) => runsPage(new URLSearchParams(m[1] || "")), "runs"],
  [/^#\/checkpoints$/, () => checkpointsPage(), "checkpoints"],
  [/^#\/sessions$/, () => sessionsPage(), "sessions"],
  [/^#\/server$/, () => serverPage(), "server"],
  [/^#\/playground(?:\?(.*))?$/, (m) => playgroundPage(new URLSearchParams(m[1] || "")), "playground"],
];

async function route(event) {
  if (refreshTimer) { clearInterval(refreshTimer); refreshTimer = null; }
  if (event && event.type === "hashchange") say("");  // a message belongs to the page it was said on
  const signedIn = Boolean(key());
  document.getElementById("sign-in").hidden = signedIn;
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("sign-out").hidden = !signedIn;
  const view = document.getElementById("view");
  if (!signedIn) {
    view.replaceChildren();
    document.title = "Sign in · Stillroom console";
    document.getElementById("sign-in").querySelector("h1").focus();
    return;
  }
  let hash = location.hash;
  let match = null;
  let found = PAGES.find(([pattern]) => (match = pattern.exec(hash)));
  if (!found) {
    hash = "#/runs";
    history.replaceState(null, "", hash);
    found = PAGES[1];
    match = PAGES[1][0].exec(hash);
  }
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.page === found[2]) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  alertText("");
  const mine = ++renderCount;
  const content = await guarded(() => found[1](match));
  if (mine !== renderCount || content === undefined) return;  // a later route drew meanwhile
  view.replaceChildren(content);
  const heading = view.querySelector("h1");
  if (heading) {
    document.title = heading.textContent + " · Stillroom console";
    heading.setAttribute("tabindex", "-1");
    // a new page takes focus to its heading; a redraw of the same page leaves focus where it was
    if (!(event && event.type === "redraw")) heading.focus({preventScroll: true});
  }
  document.body.dataset.page = found[2];
  document.body.dataset.ready = String(mine);
}

async function redraw() {
  const view = document.getElementById("view");
  const inside = view.contains(document.activeElement);
  const focused = inside && document.activeElement.id;
  await route({type: "redraw"});
  if (!inside) return;   // focus outside the page (the navigation) stays there
  const again = focused && document.getElementById(focused);
  const heading = view.querySelector("h1");
  if (again) again.focus({preventScroll: true});
  else if (heading) heading.focus({preventScroll: true});   // what had focus is gone (deleted)
}

// ---------------------------------------------------------------- runs

async function runsPage(params) {
  const offset = Math.max(0, Math.floor(Number(params.get("offset")) || 0));
  const data = await get(`${API}/console/runs?limit=${PAGE_SIZE}&offset=${offset}`);
  const rows = data.runs.map((run) => h("tr", {},
    h("td", {}, h("a", {href: "#/runs/" + encodeURIComponent(run.training_run_id)}, run.training_run_id)),
    h("td", {}, run.base_model),
    h("td", {class: "num"}, run.is_lora ? run.lora_rank : "full"),
    h("td", {}, stateBadge(run.state)),
    h("td", {}, ago(run.last_request_time)),
    h("td", {class: "num"}, run.last_request_seq)));
  return h("section", {},
    h("h1", {}, "Training runs"),
    h("p", {class: "note"}, `${plural(data.cursor.total_count, "run")} of yours, newest first. In memory: ready; `
      + "on disk: live but moved out of memory to make room (it comes back on its next request); "
      + "unloaded: its client session ended or it was unloaded (its checkpoints stay)."),
    rows.length ? h("table", {},
      h("thead", {}, h("tr", {}, ["Run", "Base model", "#LoRA rank", "State", "Last activity", "#Requests"]
        .map(head))),
      h("tbody", {}, rows)) : h("p", {}, "No runs yet: train one with the SDK."),
    h("nav", {class: "pages", "aria-label": "More runs"},
      offset > 0 ? h("a", {href: `#/runs?offset=${Math.max(0, offset - PAGE_SIZE)}`}, "Newer") : null,
      offset + PAGE_SIZE < data.cursor.total_count
        ? h("a", {href: `#/runs?offset=${offset + PAGE_SIZE}`}, "Older") : null));
}

async function runPage(runId) {
  const base = `${API}/console/runs/${encodeURIComponent(runId)}`;
  const [run, metrics, checkpoints] = await Promise.all([
    get(base), get(base + "/metrics"),
    get(`${API}/training_runs/${encodeURIComponent(runId)}/checkpoints`)]);
  const facts = [
    ["Base model", run.base_model], ["LoRA rank", run.is_lora ? run.lora_rank : "full fine-tuning"],
    ["State", stateBadge(run.state)], ["Created", ago(run.created)],
    ["Last activity", ago(run.last_request_time)], ["Requests", run.last_request_seq],
    ["Trainable parameters", run.num_trainable_params.toLocaleString()],
    ["Client session", run.client_session || "none open"]];
  return h("section", {},
    h("h1", {}, "Run " + runId),
    h("dl", {class: "facts"}, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h("h2", {}, "Metrics by step"),
    metricsNote(metrics),
    h("div", {class: "charts"}, metrics.series.map((name) => chart(name, metrics.steps))),
    h("h2", {}, "Checkpoints"),
    checkpointTable(checkpoints.checkpoints, runId));
}

function metricsNote(metrics) {
  const days = Math.round(metrics.results_kept_seconds / 86400);
  let text = `From the request results the server still holds (it keeps each for ${days} days), `
    + `${metrics.requests_read} requests. A step is the forward_backward calls an optim_step closes; `
    + "“:sum” metrics are summed over the step, “:mean” averaged, forward-only calls show as forward/…";
  if (metrics.truncated) text += " Older results were left out (only the newest are read).";
  if (!metrics.steps.length) text = "No held results with metrics for this run. " + text;
  return h("p", {class: "note"}, text);
}

function chart(name, steps) {
  const points = steps.filter((s) => s.metrics[name] !== undefined).map((s) => [s.step, s.metrics[name]]);
  const id = "chart-" + name.replace(/[^a-z0-9]+/gi, "-");
  const width = 520, height = 200, left = 64, right = 12, top = 12, bottom = 30;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const pad = Math.abs(y0) * 0.05 || 1; y0 -= pad; y1 += pad; }
  const X = (x) => left + (x - x0) / (x1 - x0) * (width - left - right);
  const Y = (y) => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
  const plot = svg("svg", {viewBox: `0 0 ${width} ${height}`, role: "img", class: "chart",
                           "aria-labelledby": id + "-title"});
  plot.append(svg("title", {id: id + "-title"}, `${name} by step: ${points.length} points, `
    + `from ${number(ys[0])} at step ${xs[0]} to ${number(ys[ys.length - 1])} at step ${xs[xs.length - 1]}`));
  for (const [y, anchor] of [[y1, "end"], [y0, "end"]]) {
    plot.append(svg("line", {x1: left, x2: width - right, y1: Y(y), y2: Y(y), class: "grid"}));
    plot.append(svg("text", {x: left - 6, y: Y(y) + 4, "text-anchor": anchor}, number(y)));
  }
  plot.append(svg("line", {x1: left, x2: left, y1: top, y2: height - bottom, class: "axis"}));
  plot.append(svg("line", {x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis"}));
  plot.append(svg("text", {x: left, y: height - bottom + 18, "text-anchor": "start"}, "step " + xs[0]));
  if (xs.length > 1) {
    plot.append(svg("text", {x: width - right, y: height - bottom + 18, "text-anchor": "end"},
      "step " + xs[xs.length - 1]));
  }
  plot.append(svg("polyline", {class: "line", points: points.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" ")}));
  if (points.length <= 200) {
    for (const [x, y] of points) {
      plot.append(svg("circle", {cx: X(x).toFixed(1), cy: Y(y).toFixed(1), r: 2.5, class: "dot"},
        svg("title", {}, `step ${x}: ${number(y)}`)));
    }
  }
  const table = h("table", {class: "values", "data-metric": name},
    h("thead", {}, h("tr", {}, h("th", {scope: "col"}, "Step"), h("th", {scope: "col"}, name))),
    h("tbody", {}, points.map(([x, y]) => h("tr", {}, h("td", {class: "num"}, x),
      h("td", {class: "num", "data-value": y}, number(y))))));
  return h("figure", {class: "metric", id},
    h("figcaption", {}, h("h3", {}, name)), plot,
    h("details", {}, h("summary", {}, `Values of ${name} (${points.length})`), table));
}

// ---------------------------------------------------------------- checkpoints

async function checkpointsPage() {
  const data = await get(`${API}/checkpoints?limit=1000`);
  return h("section", {},
    h("h1", {}, "Checkpoints"),
    h("p", {class: "note"}, `${plural(data.cursor.total_count, "checkpoint")} of yours, newest first. `
      + "A TTL has the server delete the checkpoint that long from now (e.g. 90m, 12h, 7d; never). "
      + "Published: every key's owner on this server may sample, distill from and load it."),
    checkpointTable(data.checkpoints, null));
}

function checkpointTable(checkpoints, runId) {
  if (!checkpoints.length) return h("p", {}, "No checkpoints.");
  return h("table", {class: "checkpoints"},
    h("thead", {}, h("tr", {}, ["Checkpoint", runId ? null : "Run", "Type", "#Size", "Saved", "Expires",
      "Published", "Actions"].filter(Boolean).map(head))),
    h("tbody", {}, checkpoints.map((c) => checkpointRow(c, runId))));
}

function checkpointRow(checkpoint, runId) {
  const run = runId || runOf(checkpoint);
  const url = `${API}/training_runs/${checkpointUrl(checkpoint, run)}`;
  const label = checkpoint.checkpoint_id;
  const slug = (run + "-" + label).replace(/[^a-z0-9]+/gi, "-");
  const ttlInput = h("input", {id: "ttl-" + slug, name: "ttl", size: 7, maxlength: 16,
                               placeholder: "12h", "aria-label": `TTL of ${label}`});
  const act = (what, fn) => async (event) => {
    if (event) event.preventDefault();
    const done = await guarded(fn);
    if (done !== undefined) { await redraw(); say(what); }   // said once the page shows it
  };
  const setTtl = act(`TTL of ${label} set.`, async () => {
    const seconds = parseTtl(ttlInput.value);
    if (seconds === undefined) throw new Error(`TTL: “${ttlInput.value}” is not a duration (90m, 12h, 7d or never)`);
    await call("PUT", url + "/ttl", {ttl_seconds: seconds});
    return true;
  });
  const published = checkpoint.public;
  const actions = [
    h("form", {class: "ttl", onsubmit: setTtl}, ttlInput, h("button", {type: "submit"}, "Set TTL")),
    checkpoint.checkpoint_type === "external" ? null : h("button", {type: "button", "data-action": "publish",
      id: "publish-" + slug,
      onclick: act(`${label} ${published ? "unpublished" : "published"}.`, async () => {
        await call(published ? "DELETE" : "POST", url + "/publish"); return true;
      })}, published ? "Unpublish" : "Publish"),
    h("button", {type: "button", "data-action": "download", id: "download-" + slug, onclick: async () => {
      const link = await guarded(() => call("POST", `${API}/console/training_runs/${checkpointUrl(checkpoint, run)}/archive_url`));
      if (!link) return;
      const anchor = h("a", {href: link.url, download: link.file_name, hidden: true});
      document.body.append(anchor);
      anchor.click();
      anchor.remove();
      say(`Downloading ${link.file_name} (${bytes(link.size_bytes)}).`);
    }}, "Download"),
    checkpoint.checkpoint_type === "sampler" ? h("a", {class: "button",
      href: "#/playground?model=" + encodeURIComponent(checkpoint.tinker_path)}, "Chat") : null,
    h("button", {type: "button", class: "danger", "data-action": "delete", id: "delete-" + slug,
      onclick: act(`${label} deleted.`, async () => {
        if (!confirm(`Delete ${checkpoint.tinker_path}? Its files are removed for good.`)) return undefined;
        await call("DELETE", url); return true;
      })}, "Delete")];
  return h("tr", {"data-path": checkpoint.tinker_path},
    h("td", {}, h("code", {}, label)),
    runId ? null : h("td", {}, h("a", {href: "#/runs/" + encodeURIComponent(run)}, run)),
    h("td", {}, checkpoint.checkpoint_type),
    h("td", {class: "num"}, bytes(checkpoint.size_bytes)),
    h("td", {}, ago(checkpoint.time)),
    h("td", {class: "expires"}, until(checkpoint.expires_at)),
    h("td", {class: "published"}, published ? "yes" : "no"),
    h("td", {}, h("div", {class: "actions"}, actions)));
}

// ---------------------------------------------------------------- sessions

async function sessionsPage() {
  const data = await get(`${API}/console/sessions`);
  const timeout = data.session_timeout_seconds;
  const rows = data.sessions.map((s) => h("tr", {},
    h("td", {}, h("code", {}, s.session_id)),
    h("td", {}, h("span", {class: "badge session-" + s.state, title: s.why || ""}, s.state)),
    h("td", {}, ago(s.created)),
    h("td", {}, s.state === "live" ? ago(s.last_heartbeat) : ago(s.ended)),
    h("td", {}, s.runs.length ? h("ul", {class: "plain"}, s.runs.map((r) => h("li", {},
      h("a", {href: "#/runs/" + encodeURIComponent(r.training_run_id)}, r.training_run_id), " ",
      stateBadge(r.state)))) : "–"),
    h("td", {class: "num"}, s.samplers),
    h("td", {}, s.tags.join(", ") || "–")));
  return h("section", {},
    h("h1", {}, "Client sessions"),
    h("p", {class: "note"}, "One per tinker ServiceClient. "
      + (timeout > 0 ? `A session with no heartbeat for ${timeout} s lapses: its runs leave memory. `
        : "Sessions do not lapse on this server. ")
      + "Sessions live in the server's memory and do not survive a restart."),
    rows.length ? h("table", {},
      h("thead", {}, h("tr", {}, ["Session", "State", "Created", "Last heartbeat / ended", "Training runs",
        "#Samplers", "Tags"].map(head))),
      h("tbody", {}, rows)) : h("p", {}, "No client sessions since the server started."));
}

// ---------------------------------------------------------------- server

async function serverPage() {
  const s = await get(`${API}/console/server`);
  refreshTimer = setInterval(() => { if (!document.hidden) redraw(); }, 5000);
  const queued = Object.entries(s.queued_by_kind);
  const meter = (used, budget) => budget ? [h("meter", {min: 0, max: budget, value: used,
    "aria-label": "memory used"}), ` ${bytes(used)} of ${bytes(budget)}`] : bytes(used);
  const you = s.owner;
  return h("section", {},
    h("h1", {}, "Server"),
    h("p", {class: "note"}, "Totals over every owner of this server (counts only, as /metrics gives "
      + "them); refreshed every 5 s while shown."),
    h("div", {class: "cards"},
      h("section", {class: "card"}, h("h2", {}, "Queued work"),
        queued.length ? h("table", {}, h("thead", {}, h("tr", {}, h("th", {scope: "col"}, "Kind"),
          h("th", {scope: "col"}, "Waiting"))), h("tbody", {}, queued.map(([k, v]) =>
          h("tr", {}, h("td", {}, k), h("td", {class: "num"}, v))))) : h("p", {}, "Nothing waiting."),
        h("p", {}, `${s.outstanding_jobs} jobs accepted and not yet done.`)),
      h("section", {class: "card"}, h("h2", {}, "Memory"),
        h("dl", {class: "facts"},
          h("dt", {}, "Training state"), h("dd", {}, meter(s.run_memory_bytes_used, s.run_memory_bytes_budget)),
          h("dt", {}, "Runs in memory"), h("dd", {}, s.runs_in_memory),
          h("dt", {}, "Runs on disk"), h("dd", {}, s.runs_on_disk),
          h("dt", {}, "Live runs"), h("dd", {}, s.live_runs),
          h("dt", {}, "Loaded adapters"), h("dd", {}, s.loaded_adapters),
          h("dt", {}, "Open samplers"), h("dd", {}, s.open_samplers))),
      h("section", {class: "card"}, h("h2", {}, "Yours"),
        h("dl", {class: "facts"},
          h("dt", {}, "Owner"), h("dd", {}, you.owner),
          h("dt", {}, "Live runs"), h("dd", {}, `${you.live_runs} of at most ${you.max_live_runs}`),
          h("dt", {}, "Their weights and moments"), h("dd", {}, meter(you.live_bytes, you.live_bytes_budget))),
        h("p", {class: "note"}, "Keys are managed on the server: stillroom keys list | create | revoke."))),
    h("h2", {}, "Engines"),
    h("table", {}, h("thead", {}, h("tr", {}, ["Engine", "State", "Models", "Runs", "Restarts",
      "Last cause"].map((t) => h("th", {scope: "col", class: ["Runs", "Restarts"].includes(t) ? "num" : ""},
      t)))),
      h("tbody", {}, s.engines.map((e) => h("tr", {}, h("td", {}, e.engine),
        h("td", {class: e.state === "up" ? "" : "engine-down"}, e.state),
        h("td", {}, e.models.map((m) => m === "*" ? "every model placed nowhere else" : m).join(", ")),
        h("td", {class: "num"}, e.runs ?? ""), h("td", {class: "num"}, e.restarts), h("td", {}, e.cause || ""))))),
    h("h2", {}, "Models"),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", {scope: "col"}, "Model"),
      h("th", {scope: "col", class: "num"}, "Context"), h("th", {scope: "col", class: "num"}, "Vocabulary"),
      h("th", {scope: "col"}, "Source"))),
      h("tbody", {}, s.models.map((m) => h("tr", {}, h("td", {}, m.model_name),
        h("td", {class: "num"}, m.max_context_length), h("td", {class: "num"}, m.vocab_size),
        h("td", {}, m.source))))));
}

// ---------------------------------------------------------------- playground

const conversation = {model: "", messages: []};

async function playgroundPage(params) {
  const models = await call("GET", `${OAI}/models`, undefined, {authorization: "Bearer " + key()});
  const names = models.data.map((m) => m.id);
  const chosen = params.get("model") || conversation.model || names[0] || "";
  if (chosen !== conversation.model) { conversation.model = chosen; conversation.messages = []; }
  const log = h("ol", {id: "chat-log", class: "chat", "aria-live": "polite"});
  const drawLog = () => log.replaceChildren(...conversation.messages.filter((m) => m.role !== "system").map((m) =>
    h("li", {class: "msg " + m.role}, h("span", {class: "role"}, m.role === "user" ? "You" : "Model"),
      h("p", {}, m.content))));
  drawLog();
  const model = h("input", {id: "pg-model", name: "model", list: "pg-models", value: chosen, required: true,
                            maxlength: 512, spellcheck: "false"});
  const system = h("input", {id: "pg-system", name: "system", maxlength: 4000, placeholder: "optional"});
  const maxTokens = h("input", {id: "pg-max-tokens", name: "max_tokens", type: "number", min: 1, max: 4096, value: 48});
  const temperature = h("input", {id: "pg-temperature", name: "temperature", type: "number", min: 0, max: 2,
                                  step: 0.1, value: 0.7});
  const message = h("textarea", {id: "pg-message", name: "message", rows: 3, required: true, maxlength: 20000,
                                 placeholder: "Enter sends, Shift+Enter is a new line"});
  const send = h("button", {type: "submit", id: "pg-send"}, "Send");
  const form = h("form", {id: "playground-form", class: "playground"},
    h("div", {class: "row"},
      h("label", {for: "pg-model"}, "Model"), model,
      h("datalist", {id: "pg-models"}, names.map((n) => h("option", {value: n})))),
    h("div", {class: "row"}, h("label", {for: "pg-system"}, "System prompt"), system),
    h("div", {class: "row"}, h("label", {for: "pg-max-tokens"}, "Max tokens"), maxTokens,
      h("label", {for: "pg-temperature"}, "Temperature"), temperature),
    h("div", {class: "row"}, h("label", {for: "pg-message"}, "Message"), message),
    h("div", {class: "row"}, send, h("button", {type: "button", onclick: () => {
      conversation.messages = []; drawLog(); say("Conversation cleared."); message.focus();
    }}, "Clear")));
  message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = message.value.trim();
    if (!text) return;
    if (model.value !== conversation.model) { conversation.model = model.value; conversation.messages = []; }
    const earlier = conversation.messages.filter((m) => m.role !== "system");
    const messages = (system.value ? [{role: "system", content: system.value}] : []).concat(earlier,
      [{role: "user", content: text}]);
    send.disabled = true;
    say("Waiting for the model…");
    const reply = await guarded(() => call("POST", `${OAI}/chat/completions`, {
      model: model.value, messages, max_tokens: Number(maxTokens.value) || 48,
      temperature: Number(temperature.value)}, {authorization: "Bearer " + key()}));
    send.disabled = false;
    if (!reply) { say(""); return; }
    conversation.messages = messages.concat([{role: "assistant", content: reply.choices[0].message.content}]);
    message.value = "";
    drawLog();
    say(`Reply: ${reply.usage ? reply.usage.completion_tokens + " tokens" : "done"}.`);
    message.focus();
  });
  return h("section", {},
    h("h1", {}, "Playground"),
    h("p", {class: "note"}, "Chats through the OpenAI-compatible API (/oai/api/v1/chat/completions) with a "
      + "base model or one of your sampler checkpoints (tinker:// paths, or another owner's published one). "
      + "Models without a chat template get “role: content” lines."),
    form, log);
}

// ---------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-in-form").addEventListener("submit", signIn);
  document.getElementById("sign-out").addEventListener("click", () => { signOut(""); say("Signed out."); });
  window.addEventListener("hashchange", route);
  route();
});
