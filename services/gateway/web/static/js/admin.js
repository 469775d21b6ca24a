// Administration: sources (health, switch off/on), the error log, accounts, tracked coins. Every change asks
// for confirmation first and shows the API's own message when it is refused.
import { ApiError, api, formatNumber, showErrors } from "./api.js";

const SOURCES_REFRESH_MS = 5000;
const USERS_PER_PAGE = 25;
// How each source state reads, and whether it is good news, a deliberate stop, or a problem.
const STATES = {
  connected: ["connected", "ok"],
  starting: ["starting", "wait"],
  scheduled: ["scheduled", "wait"],
  backing_off: ["backing off", "bad"],
  down: ["down", "bad"],
  rate_limited: ["rate limited", "bad"],
  banned: ["banned (IP ban)", "bad"],
  publish_failed: ["publishing failed", "bad"],
  error: ["error", "bad"],
  disabled: ["disabled", "off"],
};

const loaded = new Set();
let me = null;
let sourcesTimer = null;
let usersOffset = 0;
let usersQuery = "";

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "–";
  return el("time", { dateTime: date.toISOString(), textContent: date.toLocaleString(), title: date.toISOString() });
}

function ago(iso) {
  if (!iso) return el("span", { className: "muted", textContent: "never" });
  const date = new Date(iso);
  const seconds = Math.max(0, Math.round((Date.now() - date.getTime()) / 1000));
  const text = seconds < 90 ? `${seconds} s ago` : seconds < 5400 ? `${Math.round(seconds / 60)} min ago`
    : seconds < 172800 ? `${Math.round(seconds / 3600)} h ago` : date.toLocaleDateString();
  return el("time", { dateTime: date.toISOString(), textContent: text, title: date.toLocaleString() });
}

function badge(text, tone) {
  return el("span", { className: `badge admin-state admin-state-${tone}`, textContent: text });
}

function panelError(name, error) {
  const slot = document.querySelector(`[data-admin-error="${name}"]`);
  if (slot) slot.textContent = error ? (error instanceof ApiError ? error.message : String(error)) : "";
  if (error) panelDone(name, "");
}

// The outcome of an action, next to the table it changed (toasts would cover the tables' action column).
function panelDone(name, text) {
  const slot = document.querySelector(`[data-admin-done="${name}"]`);
  if (slot) slot.textContent = text;
}

function setState(name, text) {
  const node = document.querySelector(`[data-state="${name}"]`);
  node.textContent = text;
  node.hidden = !text;
}

// --- confirmation -----------------------------------------------------------------------------

const dialog = document.querySelector("[data-confirm]");

function confirmAction({ title, text, ok }) {
  const opener = document.activeElement;
  dialog.querySelector("[data-confirm-title]").textContent = title;
  dialog.querySelector("[data-confirm-text]").textContent = text;
  dialog.querySelector("[data-confirm-ok]").textContent = ok;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      opener?.focus?.();
      resolve(dialog.returnValue === "confirm");
    }, { once: true });
    dialog.showModal();
    // The safe choice has the focus: Enter alone never confirms.
    dialog.querySelector("[data-confirm-cancel]").focus();
  });
}

// One action: confirm, call, report. The button stays disabled while the call runs.
async function act(button, panel, question, call, done) {
  if (!(await confirmAction(question))) return;
  panelError(panel, null);
  panelDone(panel, "");
  if (button) button.disabled = true;
  try {
    const result = await call();
    if (done) panelDone(panel, done(result));
  } catch (error) {
    panelError(panel, error);
  } finally {
    if (button?.isConnected) button.disabled = false;
  }
  await reload(panel);
}

// --- tabs -------------------------------------------------------------------------------------

const tabs = [...document.querySelectorAll("[data-admin-tabs] [role=tab]")];

function select(name, { focus = false } = {}) {
  const tab = tabs.find((t) => t.dataset.tab === name) ?? tabs[0];
  for (const other of tabs) {
    const chosen = other === tab;
    other.setAttribute("aria-selected", String(chosen));
    other.tabIndex = chosen ? 0 : -1;
    document.getElementById(other.getAttribute("aria-controls")).hidden = !chosen;
  }
  if (focus) tab.focus();
  history.replaceState(null, "", `#${tab.dataset.tab}`);
  clearInterval(sourcesTimer);
  if (tab.dataset.tab === "sources") sourcesTimer = setInterval(() => { if (!document.hidden) loadSources({ background: true }); }, SOURCES_REFRESH_MS);
  if (!loaded.has(tab.dataset.tab)) {
    loaded.add(tab.dataset.tab);
    reload(tab.dataset.tab);
  }
}

document.querySelector("[data-admin-tabs]").addEventListener("click", (event) => {
  const tab = event.target.closest("[role=tab]");
  if (tab) select(tab.dataset.tab);
});

document.querySelector("[data-admin-tabs]").addEventListener("keydown", (event) => {
  const index = tabs.indexOf(document.activeElement);
  if (index < 0) return;
  const next = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: tabs.length - 1 }[event.key];
  if (next === undefined) return;
  event.preventDefault();
  select(tabs[(next + tabs.length) % tabs.length].dataset.tab, { focus: true });
});

function reload(panel) {
  return { sources: loadSources, errors: loadErrors, users: loadUsers, coins: loadCoins }[panel]?.();
}

// --- sources ----------------------------------------------------------------------------------

let sourceNames = [];

function sourceState(source) {
  if (source.enabled === false && source.state !== "disabled") return badge("stopping…", "wait");
  const [text, tone] = STATES[source.state] ?? [source.state ?? "unknown", "wait"];
  return badge(text, tone);
}

function switchedCell(source) {
  if (!source.switchable) {
    const why = source.kind === "none" ? "not started: see its last error" : "scheduled job, not switchable here";
    return el("span", { className: "muted", textContent: why });
  }
  const word = source.enabled ? "on" : "off";
  const cell = el("span", {}, el("strong", { textContent: word }));
  if (source.enabled_changed_at) cell.append(el("br"), el("span", { className: "muted admin-small" }, "since ", when(source.enabled_changed_at)));
  return cell;
}

function sourceAction(source) {
  if (!source.switchable) return el("span", { className: "muted", textContent: "–" });
  const disable = source.enabled;
  const button = el("button", {
    type: "button",
    className: disable ? "secondary" : "",
    textContent: disable ? "Disable" : "Enable",
  });
  button.setAttribute("aria-label", `${disable ? "Disable" : "Enable"} ${source.name}`);
  button.dataset.sourceToggle = source.name;
  button.addEventListener("click", () => act(button, "sources", {
    title: `${disable ? "Disable" : "Enable"} ${source.name}?`,
    text: disable
      ? `${source.name} stops polling now and sends no more quotes until it is enabled again, also after a restart. Prices are consolidated from the other sources meanwhile.`
      : `${source.name} starts polling again now.`,
    ok: disable ? `Disable ${source.name}` : `Enable ${source.name}`,
  }, () => api(`/api/v1/admin/sources/${encodeURIComponent(source.name)}`, { method: "PATCH", body: { enabled: !disable } }),
  (result) => `${result.name} is ${result.enabled ? "enabled" : "disabled"} (state: ${result.state}).`));
  return button;
}

function lastError(source) {
  if (!source.last_error) return el("span", { className: "muted", textContent: "none" });
  const box = el("div", { className: "admin-error-cell" });
  box.append(el("strong", { textContent: source.last_error_kind ?? "error" }), " ", source.last_error);
  if (source.last_error_at) box.append(" (", ago(source.last_error_at), ")");
  return box;
}

async function loadSources({ background = false } = {}) {
  // A background refresh waits while a confirmation is open: it would replace the button that opened it.
  if (background && dialog.open) return;
  const table = document.querySelector("[data-table=sources]");
  let body;
  try {
    body = await api("/api/v1/admin/sources");
  } catch (error) {
    panelError("sources", error);
    if (table.hidden) setState("sources", "The sources' health is unavailable right now.");
    return;
  }
  const sources = body.sources ?? [];
  sourceNames = sources.map((s) => s.name);
  fillSourceFilter();
  document.querySelector("[data-sources-updated]").textContent = `Updated ${new Date().toLocaleTimeString()}`;
  if (!sources.length) {
    setState("sources", "No source has reported yet: ingest may still be starting, or no source is configured (COINLYTICS_SOURCES).");
    table.hidden = true;
    return;
  }
  const focused = document.activeElement?.dataset?.sourceToggle;
  setState("sources", "");
  table.querySelector("tbody").replaceChildren(...sources.map((source) => {
    const row = el("tr");
    row.dataset.source = source.name;
    row.dataset.state = source.state ?? "";
    row.dataset.enabled = String(source.enabled !== false);
    const name = el("th", { scope: "row" }, el("span", { textContent: source.name }));
    if (source.kind) name.append(" ", el("span", { className: "muted", textContent: `(${source.kind})` }));
    const cells = [
      el("td", {}, sourceState(source)),
      el("td", {}, switchedCell(source)),
      el("td", {}, ago(source.last_message_at)),
      el("td", { className: "num", textContent: formatNumber(source.messages_per_second, { digits: 2 }) }),
      el("td", { className: "num", textContent: formatNumber(source.messages_total, { digits: 0 }) }),
      el("td", { className: "num", textContent: formatNumber(source.rejected_total, { digits: 0 }) }),
      el("td", { className: "admin-wrap" }, lastError(source)),
      el("td", {}, sourceAction(source)),
    ];
    cells[0].dataset.cell = "state";
    row.append(name, ...cells);
    return row;
  }));
  table.hidden = false;
  // A refresh must not take the keyboard focus away from the button the admin is on.
  if (focused) table.querySelector(`[data-source-toggle="${CSS.escape(focused)}"]`)?.focus();
}

document.querySelector("[data-refresh=sources]").addEventListener("click", () => loadSources());

// --- error log --------------------------------------------------------------------------------

const errorsForm = document.querySelector("[data-form=errors]");

function fillSourceFilter() {
  const picker = errorsForm.elements.source;
  const current = picker.value;
  const names = [...new Set([...sourceNames, current].filter(Boolean))].sort();
  picker.replaceChildren(el("option", { value: "", textContent: "All sources" }),
    ...names.map((name) => el("option", { value: name, textContent: name })));
  picker.value = current;
}

async function loadErrors() {
  const table = document.querySelector("[data-table=errors]");
  const source = errorsForm.elements.source.value;
  const local = errorsForm.elements.since.value;
  const since = local ? new Date(local) : null;
  showErrors(errorsForm, { details: [], message: "" });
  if (since && Number.isNaN(since.getTime())) {
    showErrors(errorsForm, { details: [{ loc: ["since"], msg: "Enter a date and time." }], message: "" });
    return;
  }
  setState("errors", "Loading the error log…");
  let body;
  try {
    body = await api("/api/v1/admin/errors", { query: { source, since: since?.toISOString(), limit: 100 } });
  } catch (error) {
    showErrors(errorsForm, error);
    setState("errors", "The error log is unavailable right now.");
    table.hidden = true;
    return;
  }
  if (!sourceNames.length) loadSources();
  const counts = Object.entries(body.counts ?? {}).sort(([a], [b]) => a.localeCompare(b));
  document.querySelector("[data-error-counts]").textContent = counts.length
    ? `Entries per source: ${counts.map(([name, n]) => `${name} ${n}`).join(" · ")}` : "";
  const scope = `${source ? ` for ${source}` : ""}${since ? ` since ${since.toLocaleString()}` : ""}`;
  if (!body.entries?.length) {
    setState("errors", `No errors logged${scope}.`);
    table.hidden = true;
    return;
  }
  const n = body.entries.length;
  setState("errors", `${n} entr${n === 1 ? "y" : "ies"}${scope}, newest first.`);
  table.querySelector("tbody").replaceChildren(...body.entries.map((entry) => el("tr", {},
    el("td", {}, when(entry.created_at)),
    el("td", { textContent: entry.source }),
    el("td", { textContent: entry.kind }),
    el("td", { className: "admin-wrap", textContent: entry.message }),
  )));
  table.hidden = false;
}

errorsForm.addEventListener("submit", (event) => { event.preventDefault(); loadErrors(); });

// --- users ------------------------------------------------------------------------------------

const usersForm = document.querySelector("[data-form=users]");
const pager = document.querySelector("[data-pager=users]");

function userActions(user) {
  const self = me && me.id === user.id;
  const promote = user.role !== "admin";
  const role = el("button", { type: "button", className: "secondary", textContent: promote ? "Make administrator" : "Make user" });
  role.setAttribute("aria-label", `${promote ? "Make administrator" : "Make user"}: ${user.email}`);
  role.addEventListener("click", () => act(role, "users", {
    title: promote ? `Make ${user.email} an administrator?` : `Make ${user.email} a regular user?`,
    text: `${promote ? "They can then use this page and every admin route." : "They lose access to this page and every admin route."} They are signed out so the new role applies at once.`,
    ok: promote ? "Make administrator" : "Make user",
  }, () => api(`/api/v1/admin/users/${encodeURIComponent(user.id)}`, { method: "PATCH", body: { role: promote ? "admin" : "user" } }),
  (result) => `${result.email} is now ${result.role === "admin" ? "an administrator" : "a user"}.`));
  const deactivate = user.is_active;
  const active = el("button", { type: "button", className: deactivate ? "danger" : "secondary", textContent: deactivate ? "Deactivate" : "Reactivate" });
  active.setAttribute("aria-label", `${deactivate ? "Deactivate" : "Reactivate"}: ${user.email}`);
  active.addEventListener("click", () => act(active, "users", {
    title: deactivate ? `Deactivate ${user.email}?` : `Reactivate ${user.email}?`,
    text: deactivate ? "They are signed out at once and cannot sign in until an administrator reactivates the account. Their data is kept."
      : "They can sign in again.",
    ok: deactivate ? "Deactivate" : "Reactivate",
  }, () => api(`/api/v1/admin/users/${encodeURIComponent(user.id)}`, { method: "PATCH", body: { is_active: !deactivate } }),
  (result) => `${result.email} is ${result.is_active ? "active" : "deactivated"}.`));
  const box = el("div", { className: "admin-actions" }, role, active);
  if (self) box.append(el("span", { className: "muted", textContent: "(you)" }));
  return box;
}

async function loadUsers() {
  const table = document.querySelector("[data-table=users]");
  showErrors(usersForm, { details: [], message: "" });
  setState("users", "Loading the accounts…");
  let body;
  try {
    if (!me) me = (await api("/web/session").catch(() => null))?.user ?? null;
    body = await api("/api/v1/admin/users", { query: { email: usersQuery, limit: USERS_PER_PAGE, offset: usersOffset } });
  } catch (error) {
    showErrors(usersForm, error);
    setState("users", "The accounts are unavailable right now.");
    table.hidden = true;
    pager.hidden = true;
    return;
  }
  const users = body.users ?? [];
  if (!users.length) {
    setState("users", usersQuery ? `No account's email contains “${usersQuery}”.` : "No accounts yet.");
    table.hidden = true;
    pager.hidden = usersOffset === 0;
  } else {
    setState("users", `${body.total} account${body.total === 1 ? "" : "s"}${usersQuery ? ` matching “${usersQuery}”` : ""}.`);
    table.querySelector("tbody").replaceChildren(...users.map((user) => {
      const row = el("tr");
      row.dataset.user = user.email;
      row.append(
        el("th", { scope: "row", textContent: user.email }),
        el("td", { textContent: user.role === "admin" ? "administrator" : "user" }),
        el("td", {}, user.is_active ? badge("active", "ok") : badge("deactivated", "off")),
        el("td", {}, when(user.created_at)),
        el("td", {}, userActions(user)),
      );
      return row;
    }));
    table.hidden = false;
    pager.hidden = body.total <= USERS_PER_PAGE && usersOffset === 0;
  }
  pager.querySelector("[data-page=previous]").disabled = usersOffset === 0;
  pager.querySelector("[data-page=next]").disabled = usersOffset + USERS_PER_PAGE >= body.total;
  const first = Math.min(body.total, usersOffset + 1);
  pager.querySelector("[data-page-info]").textContent = `${first}–${Math.min(body.total, usersOffset + users.length)} of ${body.total}`;
}

usersForm.addEventListener("submit", (event) => {
  event.preventDefault();
  usersQuery = usersForm.elements.email.value.trim();
  usersOffset = 0;
  loadUsers();
});

pager.addEventListener("click", (event) => {
  const which = event.target.closest("[data-page]")?.dataset.page;
  if (!which) return;
  usersOffset = Math.max(0, usersOffset + (which === "next" ? USERS_PER_PAGE : -USERS_PER_PAGE));
  loadUsers();
});

// --- coins ------------------------------------------------------------------------------------

const coinForm = document.querySelector("[data-form=add-coin]");

function coinAction(coin) {
  const remove = coin.active;
  const button = el("button", { type: "button", className: remove ? "danger" : "secondary", textContent: remove ? "Remove" : "Track again" });
  button.setAttribute("aria-label", `${remove ? "Remove" : "Track again"}: ${coin.symbol}`);
  button.addEventListener("click", () => act(button, "coins", {
    title: remove ? `Stop tracking ${coin.symbol}?` : `Track ${coin.symbol} again?`,
    text: remove ? `${coin.symbol} leaves the markets and the sources stop quoting it within a few seconds. Its history is kept, and it can be tracked again.`
      : `The sources quote ${coin.symbol} again within a few seconds.`,
    ok: remove ? `Remove ${coin.symbol}` : `Track ${coin.symbol}`,
  }, () => (remove
    ? api(`/api/v1/admin/coins/${encodeURIComponent(coin.symbol)}`, { method: "DELETE" })
    : api("/api/v1/admin/coins", { method: "POST", body: { symbol: coin.symbol } })),
  (result) => `${result.symbol}: ${result.change ?? (result.active ? "tracked" : "removed")}.`));
  return button;
}

async function loadCoins() {
  const table = document.querySelector("[data-table=coins]");
  let body;
  try {
    body = await api("/api/v1/admin/coins");
  } catch (error) {
    panelError("coins", error);
    setState("coins", "The coins are unavailable right now.");
    table.hidden = true;
    return;
  }
  const coins = (body.coins ?? []).sort((a, b) => Number(b.active) - Number(a.active) || a.symbol.localeCompare(b.symbol));
  if (!coins.length) {
    setState("coins", "No coin is tracked yet: add the first one above.");
    table.hidden = true;
    return;
  }
  const active = coins.filter((c) => c.active).length;
  setState("coins", `${active} tracked, ${coins.length - active} removed.`);
  table.querySelector("tbody").replaceChildren(...coins.map((coin) => {
    const row = el("tr");
    row.dataset.coin = coin.symbol;
    row.append(
      el("th", { scope: "row", textContent: coin.name ? `${coin.symbol} (${coin.name})` : coin.symbol }),
      el("td", {}, coin.active ? badge("tracked", "ok") : badge("removed", "off")),
      el("td", {}, when(coin.added_at)),
      el("td", {}, coinAction(coin)),
    );
    return row;
  }));
  table.hidden = false;
}

coinForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const symbol = coinForm.elements.symbol.value.trim().toUpperCase();
  const name = coinForm.elements.name.value.trim();
  showErrors(coinForm, { details: [], message: "" });
  if (!symbol) {
    showErrors(coinForm, { details: [{ loc: ["symbol"], msg: "Enter the coin's ticker." }], message: "" });
    return;
  }
  if (!(await confirmAction({
    title: `Track ${symbol}?`,
    text: `${symbol} joins the markets, and the sources start quoting it within a few seconds where they list it.`,
    ok: `Track ${symbol}`,
  }))) return;
  const button = coinForm.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    const result = await api("/api/v1/admin/coins", { method: "POST", body: { symbol, ...(name ? { name } : {}) } });
    panelError("coins", null);
    panelDone("coins", `${result.symbol}: ${result.change ?? "tracked"}.`);
    coinForm.reset();
  } catch (error) {
    showErrors(coinForm, error);
  } finally {
    button.disabled = false;
  }
  await loadCoins();
});

// --- start ------------------------------------------------------------------------------------

select(location.hash.slice(1) || "sources");
