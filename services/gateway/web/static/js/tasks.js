// The task monitor: each job queue's live counts and jobs (refreshed every few seconds), a failed job's error
// and a Retry button, and the cron schedule. Data: GET /api/v1/admin/tasks; retry: POST .../{id}/retry.
import { ApiError, api, formatNumber } from "./api.js";

const REFRESH_MS = 5000;
const LIMIT = 20;
const OUTCOMES = { completed: ["completed", "ok"], failed: ["failed", "bad"], retried: ["retried", "wait"] };
const COUNTS = [
  ["queued", "Queued"], ["deferred", "Deferred"], ["running", "Running"],
  ["completed", "Completed (24 h)"], ["failed", "Failed (24 h)"], ["retried", "Retried (24 h)"],
];
// Each list of a queue: its heading, what it says when empty, and its columns.
const LISTS = [
  ["failed", "Failed", "No job failed in the last 24 hours.", ["Job", "Task", "Finished", "Attempts", "Duration", "Error", "Action"]],
  ["running", "Running", "Nothing is running.", ["Job", "Task", "Started", "Attempt"]],
  ["queued", "Queued", "Nothing is waiting.", ["Job", "Task", "Due", "Last attempt", "Last error"]],
  ["completed", "Recently completed", "No job completed in the last 24 hours.", ["Job", "Task", "Finished", "Attempt", "Duration"]],
];

const root = document.querySelector("[data-tasks-queues]");
const auto = document.querySelector("[data-tasks-auto]");
let timer = null;
let loading = false;

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function when(iso) {
  if (!iso) return el("span", { className: "muted", textContent: "–" });
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "–";
  return el("time", { dateTime: date.toISOString(), textContent: date.toLocaleString(), title: date.toISOString() });
}

function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms < 1000 ? `${formatNumber(ms, { digits: 1 })} ms` : `${formatNumber(ms / 1000, { digits: 2 })} s`;
}

function attempts(job) {
  if (!job.attempt) return "–";
  return job.max_tries ? `${job.attempt} of ${job.max_tries}` : String(job.attempt);
}

function slug(name) {
  return name.replace(/[^A-Za-z0-9_-]/g, "_");
}

function message(slot, text) {
  document.querySelector(`[data-tasks-${slot}]`).textContent = text;
}

function jobCell(job) {
  const cell = el("td", { className: "admin-wrap admin-small" }, el("code", { textContent: job.job_id }));
  if (job.retry_of) cell.append(el("br"), el("span", { className: "muted", textContent: `retry of ${job.retry_of}` }));
  return cell;
}

function row(kind, job) {
  const tr = el("tr");
  Object.assign(tr.dataset, { job: job.job_id, status: job.status });
  if (job.retry_of) tr.dataset.retryOf = job.retry_of;
  const cells = [jobCell(job), el("td", {}, el("code", { textContent: job.task }))];
  if (kind === "failed") {
    const error = el("td", { className: "admin-wrap", textContent: job.error ?? "–" });
    error.dataset.cell = "error";
    const action = el("td");
    if (job.retried_as) {
      action.append(el("span", { className: "muted admin-small", textContent: `retried as ${job.retried_as}` }), el("br"));
    }
    const button = el("button", { type: "button", className: "secondary", textContent: "Retry" });
    button.dataset.retry = job.job_id;
    button.setAttribute("aria-label", `Retry ${job.task} (${job.job_id})`);
    action.append(button);
    cells.push(el("td", {}, when(job.finished_at)), el("td", { className: "num", textContent: attempts(job) }),
      el("td", { className: "num", textContent: duration(job.duration_ms) }), error, action);
  } else if (kind === "running") {
    cells.push(el("td", {}, when(job.started_at)), el("td", { className: "num", textContent: attempts(job) }));
  } else if (kind === "queued") {
    cells.push(el("td", {}, when(job.scheduled_for)), el("td", { className: "num", textContent: attempts(job) }),
      el("td", { className: "admin-wrap", textContent: job.error ?? "–" }));
  } else {
    cells.push(el("td", {}, when(job.finished_at)), el("td", { className: "num", textContent: attempts(job) }),
      el("td", { className: "num", textContent: duration(job.duration_ms) }));
  }
  tr.append(...cells);
  return tr;
}

function list(queue, [kind, title, , columns]) {
  const id = `queue-${slug(queue.name)}-${kind}`;
  const section = el("section", { className: "tasks-list" });
  section.dataset.list = kind;
  section.setAttribute("aria-labelledby", id);
  section.append(el("h3", { id, textContent: `${title} (${queue[kind].length})` }));
  const head = el("tr", {}, ...columns.map((name) => el("th", {
    scope: "col", textContent: name, className: ["Attempts", "Attempt", "Last attempt", "Duration"].includes(name) ? "num" : "",
  })));
  const table = el("table", { className: "admin-table" },
    el("caption", { className: "visually-hidden", textContent: `${title} jobs of queue ${queue.name}` }),
    el("thead", {}, head), el("tbody", {}, ...queue[kind].map((job) => row(kind, job))));
  table.dataset.table = kind;
  section.append(wrap(table, `${title} jobs of queue ${queue.name}`));
  return section;
}

function wrap(table, label) {
  const box = el("div", { className: "table-wrap" }, table);
  box.dataset.label = label;
  return box;
}

// A table wider than the screen scrolls inside its box: the box then takes the keyboard focus (arrow keys
// scroll it) and is a named region, as a screen reader announces it.
function scrollableByKeyboard() {
  for (const box of document.querySelectorAll(".table-wrap")) {
    if (box.scrollWidth > box.clientWidth) {
      box.tabIndex = 0;
      box.setAttribute("role", "region");
      box.setAttribute("aria-label", box.dataset.label ?? "Table");
    } else {
      for (const name of ["tabindex", "role", "aria-label"]) box.removeAttribute(name);
    }
  }
}

function counts(queue) {
  const table = el("table", { className: "admin-table tasks-counts" },
    el("caption", { className: "visually-hidden", textContent: `Live counts of queue ${queue.name}` }),
    el("thead", {}, el("tr", {}, ...COUNTS.map(([, label]) => el("th", { scope: "col", className: "num", textContent: label })))),
    el("tbody", {}, el("tr", {}, ...COUNTS.map(([key]) => {
      const cell = el("td", { className: "num", textContent: String(queue.counts[key]) });
      cell.dataset.count = key;
      return cell;
    }))));
  return wrap(table, `Live counts of queue ${queue.name}`);
}

function queueSection(queue) {
  const id = `queue-${slug(queue.name)}`;
  const section = el("section", { className: "tasks-queue" });
  section.dataset.queue = queue.name;
  section.setAttribute("aria-labelledby", id);
  const heading = el("h2", { id }, `Queue ${queue.name}`);
  if (queue.service && queue.service !== queue.name) heading.append(el("span", { className: "muted", textContent: ` (${queue.service})` }));
  section.append(heading, counts(queue));
  // Only the lists with jobs in them; the empty ones in one line, so that quiet queues stay short.
  const empty = LISTS.filter(([kind]) => !queue[kind].length).map(([, , text]) => text);
  if (empty.length) section.append(el("p", { className: "muted", textContent: empty.join(" ") }));
  section.append(...LISTS.filter(([kind]) => queue[kind].length).map((spec) => list(queue, spec)));
  return section;
}

function cronRows(queues) {
  const rows = [];
  for (const queue of queues) {
    for (const job of queue.cron) {
      const [text, tone] = OUTCOMES[job.last_status] ?? ["not run yet", "off"];
      const tr = el("tr", {},
        el("td", {}, el("code", { textContent: job.name })),
        el("td", { textContent: queue.name }),
        el("td", { textContent: job.run_at_startup ? `${job.schedule}, and at startup` : job.schedule }),
        el("td", {}, when(job.last_run)),
        el("td", {}, el("span", { className: `badge admin-state admin-state-${tone}`, textContent: text })),
        el("td", { className: "num", textContent: duration(job.last_duration_ms) }),
        el("td", {}, when(job.next_run)));
      tr.dataset.cron = job.name;
      rows.push(tr);
    }
  }
  return rows;
}

async function load() {
  if (loading) return;
  loading = true;
  try {
    const data = await api("/api/v1/admin/tasks", { query: { limit: LIMIT } });
    // Rebuilt on every refresh: keep the keyboard focus on the same control when it is still there.
    const focused = document.activeElement?.dataset?.retry;
    root.replaceChildren(...data.queues.map(queueSection));
    if (focused) root.querySelector(`[data-retry="${CSS.escape(focused)}"]`)?.focus();
    const cron = document.querySelector("[data-tasks-cron]");
    const rows = cronRows(data.queues);
    cron.querySelector("tbody").replaceChildren(...rows);
    cron.hidden = rows.length === 0;
    const state = document.querySelector("[data-tasks-state]");
    state.textContent = data.queues.length ? "" : "No worker has reported a queue yet.";
    state.hidden = data.queues.length > 0;
    scrollableByKeyboard();
    message("updated", `Updated ${new Date(data.generated_at).toLocaleTimeString()}`);
    message("error", "");
  } catch (error) {
    message("error", error instanceof ApiError ? error.message : String(error));
  } finally {
    loading = false;
  }
}

async function retry(button) {
  const jobId = button.dataset.retry;
  button.disabled = true;
  message("error", "");
  try {
    const done = await api(`/api/v1/admin/tasks/${encodeURIComponent(jobId)}/retry`, { method: "POST" });
    message("done", `${done.task} queued again as ${done.job_id}.`);
  } catch (error) {
    message("done", "");
    message("error", error instanceof ApiError ? error.message : String(error));
  } finally {
    if (button.isConnected) button.disabled = false;
  }
  await load();
}

function schedule() {
  clearInterval(timer);
  if (auto.checked) timer = setInterval(() => { if (!document.hidden) load(); }, REFRESH_MS);
}

root.addEventListener("click", (event) => {
  const button = event.target.closest("[data-retry]");
  if (button) retry(button);
});
document.querySelector("[data-tasks-refresh]").addEventListener("click", load);
auto.addEventListener("change", schedule);
window.addEventListener("resize", scrollableByKeyboard);
schedule();
load();
