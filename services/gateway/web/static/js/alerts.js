// Alerts: the user's alert rules (list, create, pause, resume, delete) and each one's events with the
// delivery status of every channel. Live alert events (already shown as notifications by app.js) refresh
// the alert they belong to.
import { ApiError, api, formatNumber } from "./api.js";
import { onAlert } from "./live.js";
import { notify } from "./notify.js";

const CONDITIONS = ["above", "below", "pct_change_up", "pct_change_down", "spread_above"];
const PCT = new Set(["pct_change_up", "pct_change_down"]);
const CHANNEL_TYPES = ["webhook", "email", "sms"];
const FIELDS = ["symbol", "vs", "condition", "threshold", "window_minutes", "channels", "cooldown_seconds",
  "expires_at", "one_shot"];
const MAX_CHANNELS = 5;
const EVENTS_SHOWN = 20;
const PER_PAGE = 50;

const CHANNEL_FORM = {
  webhook: { label: "Webhook URL", help: "An http:// or https:// address on a public host.", type: "url",
    placeholder: "https://example.com/hooks/coinlytics", autocomplete: "url", bad: "enter an http:// or https:// URL" },
  email: { label: "Email address", help: "Each alert email has a one-click unsubscribe link.", type: "email",
    placeholder: "you@example.com", autocomplete: "email", bad: "enter an email address such as you@example.com" },
  sms: { label: "Phone number", help: "International format: + and the country code, e.g. +14155550100.", type: "tel",
    placeholder: "+14155550100", autocomplete: "tel", bad: "enter the number in international format, e.g. +14155550100" },
};
const CHANNEL_NAMES = { webhook: "Webhook", email: "Email", sms: "SMS" };
const STATUS_WORDS = {
  active: "active", paused: "paused", expired: "expired (no longer fires)", fired: "fired (one-shot: resume re-arms it)",
};

const form = document.querySelector("[data-form='alert']");
const rows = form.querySelector("[data-channel-rows]");
const rowTemplate = document.getElementById("channel-row");
const symbolSelect = document.getElementById("alert-symbol");
const vsSelect = document.getElementById("alert-vs");
const conditionSelect = document.getElementById("alert-condition");
const windowField = form.querySelector("[data-window-field]");
const secretBox = document.querySelector("[data-secret-box]");
const list = document.querySelector("[data-alert-list]");
const listState = document.querySelector("[data-alerts-state]");

const alerts = new Map(); // id -> the API's alert
const pollers = new Map(); // id -> timer refreshing events while a delivery is still under way
let rowCounter = 0;
let page = 1;
let total = 0;
let currentPrice = null;

// --- small helpers ------------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node && !key.includes("-")) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

function duration(seconds) {
  if (!seconds) return "none";
  if (seconds % 86_400 === 0) return `${seconds / 86_400} day${seconds === 86_400 ? "" : "s"}`;
  if (seconds % 3600 === 0) return `${seconds / 3600} hour${seconds === 3600 ? "" : "s"}`;
  if (seconds % 60 === 0) return `${seconds / 60} minute${seconds === 60 ? "" : "s"}`;
  return `${seconds} second${seconds === 1 ? "" : "s"}`;
}

export function conditionWords(alert) {
  const t = alert.threshold;
  switch (alert.condition) {
    case "above": return `price rises above ${t} ${alert.vs}`;
    case "below": return `price falls below ${t} ${alert.vs}`;
    case "pct_change_up": return `price rises by ${t}% within ${duration((alert.window_minutes ?? 0) * 60)}`;
    case "pct_change_down": return `price falls by ${t}% within ${duration((alert.window_minutes ?? 0) * 60)}`;
    case "spread_above": return `spread between sources exceeds ${t}%`;
    default: return `${alert.condition} ${t}`;
  }
}

function channelWords(channel) {
  const target = channel.type === "webhook" ? channel.url : channel.to;
  const off = channel.disabled ? ` (switched off${channel.disabled_reason ? `: ${channel.disabled_reason}` : ""})` : "";
  return `${CHANNEL_NAMES[channel.type] ?? channel.type}: ${target ?? "–"}${off}`;
}

function deliveryWords(delivery) {
  const attempts = `${delivery.attempts} attempt${delivery.attempts === 1 ? "" : "s"}`;
  const error = delivery.last_error ? `: ${delivery.last_error}` : "";
  switch (delivery.status) {
    case "pending": return "waiting to be sent";
    case "retrying": return `retrying after ${attempts}${error}; next try ${when(delivery.next_attempt_at)}`;
    case "delivered": return `delivered ${when(delivery.delivered_at)} (${attempts})`;
    case "failed": return `failed after ${attempts}${error}`;
    case "disabled": return `not delivered: the receiver asked to stop (410 Gone), the channel is switched off${error}`;
    case "skipped": return "skipped: the channel was switched off or changed";
    default: return delivery.status;
  }
}

// --- the form -----------------------------------------------------------------------------------

function updateCondition() {
  const condition = conditionSelect.value;
  const pct = PCT.has(condition) || condition === "spread_above";
  windowField.hidden = !PCT.has(condition);
  form.querySelector("[data-threshold-unit]").textContent = pct ? "(percent)" : `(price in ${vsSelect.value})`;
  const help = form.querySelector("[data-threshold-help]");
  if (pct) {
    help.textContent = condition === "spread_above"
      ? "The spread between the highest and lowest source, in percent."
      : "The change in percent over the window.";
  } else {
    help.textContent = currentPrice ? `The price that triggers the alert. Now: ${formatNumber(currentPrice, { currency: vsSelect.value })}.`
      : "The price that triggers the alert.";
  }
}

async function loadCurrentPrice() {
  const symbol = symbolSelect.value, vs = vsSelect.value;
  currentPrice = null;
  updateCondition();
  if (!symbol) return;
  try {
    const table = await api("/api/v1/prices", { query: { symbols: symbol, vs } });
    const entry = table?.prices?.[symbol]?.[vs] ?? table?.[symbol]?.[vs];
    if (symbolSelect.value === symbol && vsSelect.value === vs) {
      currentPrice = entry?.price ?? null;
      updateCondition();
    }
  } catch { /* the help text simply leaves the current price out */ }
}

function setChannelKind(row) {
  const kind = row.querySelector("[data-channel-type]").value;
  const spec = CHANNEL_FORM[kind];
  const input = row.querySelector("[data-channel-target]");
  row.querySelector(".channel-target label").textContent = spec.label;
  row.querySelector("[data-channel-help]").textContent = spec.help;
  input.type = spec.type;
  input.placeholder = spec.placeholder;
  input.autocomplete = spec.autocomplete;
}

function renumberChannels() {
  const all = [...rows.querySelectorAll("[data-channel-row]")];
  all.forEach((row, index) => {
    row.querySelector("[data-channel-error]").dataset.fieldError = `channels.${index}`;
    row.querySelector(`label[for="${row.querySelector("[data-channel-type]").id}"]`).textContent = `Channel ${index + 1}`;
    row.querySelector("[data-action='remove-channel']").hidden = all.length === 1;
    row.querySelector("[data-action='remove-channel']").setAttribute("aria-label", `Remove channel ${index + 1}`);
  });
  form.querySelector("[data-action='add-channel']").hidden = all.length >= MAX_CHANNELS;
}

function addChannel(kind = "webhook") {
  const fragment = rowTemplate.content.cloneNode(true);
  const row = fragment.querySelector("[data-channel-row]");
  const n = ++rowCounter;
  const select = row.querySelector("[data-channel-type]");
  const input = row.querySelector("[data-channel-target]");
  const [typeLabel, targetLabel] = row.querySelectorAll("label");
  select.id = `channel-${n}-type`; typeLabel.htmlFor = select.id;
  input.id = `channel-${n}-target`; targetLabel.htmlFor = input.id;
  input.name = `channel-${n}-target`;
  const help = row.querySelector("[data-channel-help]"), error = row.querySelector("[data-channel-error]");
  help.id = `channel-${n}-help`; error.id = `channel-${n}-error`;
  input.setAttribute("aria-describedby", `${help.id} ${error.id}`);
  select.value = kind;
  setChannelKind(row);
  rows.append(row);
  renumberChannels();
  return row;
}

function integerOrText(text) {
  const value = String(text ?? "").trim();
  if (value === "") return undefined;
  return /^-?\d+$/.test(value) ? Number(value) : value;
}

function formBody() {
  const condition = conditionSelect.value;
  const body = { symbol: symbolSelect.value, vs: vsSelect.value, condition };
  const threshold = form.elements.threshold.value.trim().replace(/\s+/g, "");
  if (threshold) body.threshold = threshold; // a decimal string keeps every digit
  if (PCT.has(condition)) {
    const window = integerOrText(form.elements.window_minutes.value);
    if (window !== undefined) body.window_minutes = window;
  }
  body.channels = [...rows.querySelectorAll("[data-channel-row]")].map((row) => {
    const type = row.querySelector("[data-channel-type]").value;
    const target = row.querySelector("[data-channel-target]").value.trim();
    return type === "webhook" ? { type, url: target } : { type, to: target };
  });
  const cooldown = integerOrText(form.elements.cooldown_seconds.value);
  if (cooldown !== undefined) body.cooldown_seconds = cooldown;
  body.one_shot = form.elements.one_shot.checked;
  const expires = form.elements.expires_at.value;
  if (expires) {
    const moment = new Date(expires); // datetime-local is the user's local time
    body.expires_at = Number.isNaN(moment.getTime()) ? expires : moment.toISOString();
  }
  return body;
}

// Where an API error belongs: FastAPI's details [{loc, msg}] (the union's tags, the condition and the channel
// type, stripped from loc), or a message that starts with the field's path ("channels.0.url: ...").
function placements(error) {
  const placed = [];
  if (Array.isArray(error.details)) {
    for (const item of error.details) {
      const loc = (Array.isArray(item.loc) ? item.loc : []).filter((part) => part !== "body");
      if (CONDITIONS.includes(loc[0])) loc.shift();
      if (loc[0] === "channels" && Number.isInteger(loc[1]) && CHANNEL_TYPES.includes(loc[2])) loc.splice(2, 1);
      const path = loc.map(String);
      let message = String(item.msg ?? "").replace(/^Value error, /, "");
      if (!path.length) {
        const named = fromMessage(message);
        if (named) { placed.push(named); continue; }
      }
      if (/should match pattern/.test(message)) message = patternMessage(path);
      else if (message === "Field required") message = "required";
      placed.push({ path, message });
    }
  }
  if (!placed.length) {
    if (error.code === "unknown_symbol") placed.push({ path: ["symbol"], message: error.message });
    else if (error.code === "unknown_currency") placed.push({ path: ["vs"], message: error.message });
    else {
      const named = error.status === 422 ? fromMessage(error.message) : null;
      if (named) placed.push(named);
    }
  }
  return placed;
}

function fromMessage(message) {
  const match = /^([a-z_]+)((?:\.[0-9a-z_]+)*)(:\s*|\s)(.*)$/s.exec(message);
  if (!match || !FIELDS.includes(match[1])) return null;
  const path = [match[1], ...match[2].split(".").filter(Boolean)];
  // "name: problem" keeps the problem; "window_minutes (1 to 10080) is required" reads well whole.
  return { path, message: match[3].startsWith(":") ? match[4] : message };
}

function patternMessage(path) {
  if (path[0] === "channels") {
    const row = rows.querySelectorAll("[data-channel-row]")[Number(path[1])];
    const kind = row?.querySelector("[data-channel-type]").value;
    return CHANNEL_FORM[kind]?.bad ?? "not a valid address";
  }
  if (path[0] === "symbol" || path[0] === "vs") return "choose one from the list";
  return "not in the expected format";
}

function clearErrors() {
  form.querySelectorAll("[data-field-error]").forEach((node) => { node.textContent = ""; });
  form.querySelectorAll("[aria-invalid]").forEach((node) => node.removeAttribute("aria-invalid"));
  form.querySelector("[data-form-error]").textContent = "";
}

function inputFor(path) {
  if (path[0] === "channels" && path.length > 1) {
    const row = rows.querySelectorAll("[data-channel-row]")[Number(path[1])];
    return row?.querySelector(path[2] === "type" ? "[data-channel-type]" : "[data-channel-target]") ?? null;
  }
  return form.querySelector(`[name="${CSS.escape(path[0])}"]`);
}

function showAlertErrors(error) {
  clearErrors();
  const unplaced = [];
  let first = null;
  for (const { path, message } of placements(error)) {
    let slot = null;
    for (let n = path.length; n > 0 && !slot; n -= 1) {
      slot = form.querySelector(`[data-field-error="${CSS.escape(path.slice(0, n).join("."))}"]`);
    }
    if (!slot) { unplaced.push(message); continue; }
    slot.textContent = slot.textContent ? `${slot.textContent}; ${message}` : message;
    const input = inputFor(path);
    input?.setAttribute("aria-invalid", "true");
    first ??= input;
  }
  const general = form.querySelector("[data-form-error]");
  if (unplaced.length) general.textContent = unplaced.join("; ");
  else if (!first) general.textContent = error.message;
  else general.textContent = "Please correct the fields marked below.";
  first?.focus();
}

function showSecrets(alert) {
  const container = secretBox.querySelector("[data-secrets]");
  container.replaceChildren();
  alert.channels.forEach((channel, index) => {
    if (channel.type !== "webhook" || !channel.secret) return;
    const id = `secret-${alert.id}-${index}`;
    const input = el("input", { id, type: "text", readOnly: true, value: channel.secret, className: "secret-value",
      dataset: { webhookSecret: "" }, spellcheck: false });
    const copy = el("button", { type: "button", className: "secondary", textContent: "Copy" });
    const done = el("span", { className: "muted", role: "status" });
    copy.addEventListener("click", async () => {
      input.select();
      try {
        await navigator.clipboard.writeText(channel.secret);
        done.textContent = "Copied.";
      } catch {
        done.textContent = "Selected: press Ctrl+C (⌘C on a Mac) to copy.";
      }
    });
    input.addEventListener("focus", () => input.select());
    container.append(el("div", { className: "field" },
      el("label", { htmlFor: id, textContent: `Secret for ${channel.url}` }),
      el("div", { className: "field-row" }, input, copy, done)));
  });
  if (container.childElementCount) {
    secretBox.hidden = false;
    secretBox.focus();
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  clearErrors();
  try {
    const created = await api("/api/v1/alerts", { method: "POST", body: formBody() });
    showSecrets(created);
    alerts.set(created.id, created);
    total += 1;
    list.prepend(renderAlert(created));
    renderListState();
    loadEvents(created.id);
    form.elements.threshold.value = "";
    notify("Alert created", `${created.symbol}: ${conditionWords(created)}.`);
  } catch (error) {
    showAlertErrors(error instanceof ApiError ? error : new ApiError(0, "error", String(error)));
  } finally {
    button.disabled = false;
  }
});

form.addEventListener("change", (event) => {
  const row = event.target.closest?.("[data-channel-row]");
  if (row && event.target.matches("[data-channel-type]")) setChannelKind(row);
  if (event.target === conditionSelect) updateCondition();
  if (event.target === symbolSelect || event.target === vsSelect) loadCurrentPrice();
});

form.addEventListener("click", (event) => {
  if (event.target.closest("[data-action='add-channel']")) {
    const row = addChannel("email");
    row.querySelector("[data-channel-type]").focus();
  }
  const remove = event.target.closest("[data-action='remove-channel']");
  if (remove) {
    remove.closest("[data-channel-row]").remove();
    renumberChannels();
    form.querySelector("[data-action='add-channel']").focus();
  }
});

secretBox.querySelector("[data-action='hide-secret']").addEventListener("click", () => {
  secretBox.hidden = true;
  secretBox.querySelector("[data-secrets]").replaceChildren();
});

async function loadCoins() {
  try {
    const coins = await api("/api/v1/coins", { query: { vs: vsSelect.value, per_page: 250 } });
    if (!coins.length) {
      symbolSelect.replaceChildren(el("option", { value: "", textContent: "No coins are tracked yet" }));
      return;
    }
    symbolSelect.replaceChildren(...coins.map((coin) => el("option", {
      value: coin.symbol, textContent: coin.name ? `${coin.name} (${coin.symbol})` : coin.symbol,
    })));
    loadCurrentPrice();
  } catch (error) {
    symbolSelect.replaceChildren(el("option", { value: "", textContent: "Coins unavailable" }));
    form.querySelector("[data-field-error='symbol']").textContent =
      `The list of coins could not be loaded: ${error.message ?? error}`;
  }
}

// --- the list -----------------------------------------------------------------------------------

function renderListState() {
  if (!alerts.size) {
    listState.textContent = "You have no alerts yet. Create one with the form.";
  } else {
    listState.textContent = total > alerts.size ? `Showing ${alerts.size} of ${total} alerts.`
      : `${alerts.size} alert${alerts.size === 1 ? "" : "s"}.`;
  }
  document.querySelector("[data-action='more-alerts']")?.remove();
  if (total > alerts.size) {
    const more = el("button", { type: "button", className: "secondary", textContent: "Show more alerts",
      dataset: { action: "more-alerts" } });
    more.addEventListener("click", () => { page += 1; loadAlerts(); });
    list.after(more);
  }
}

function renderAlert(alert) {
  const heading = `alert-${alert.id}-heading`;
  const status = alert.status ?? (alert.paused ? "paused" : "active");
  const item = el("li", { className: "card alert-item", dataset: { alertId: alert.id, status }, "aria-labelledby": heading });
  const title = el("h3", { id: heading }, `${alert.symbol}: ${conditionWords(alert)}`);
  const badge = el("span", { className: `badge status-${status}`, dataset: { alertStatus: status } }, STATUS_WORDS[status] ?? status);
  const facts = el("dl", { className: "facts" });
  const fact = (term, ...value) => facts.append(el("dt", {}, term), el("dd", {}, ...value));
  fact("Status", badge);
  fact("Channels", el("ul", { className: "plain" }, ...alert.channels.map((c) => el("li", {}, channelWords(c)))));
  fact("Cooldown", duration(alert.cooldown_seconds));
  fact("Fires", alert.one_shot ? "once" : "every time the condition is met, after the cooldown");
  fact("Expires", alert.expires_at ? when(alert.expires_at) : "never");
  fact("Last fired", alert.last_fired_at ? when(alert.last_fired_at) : "not yet");

  const actions = el("div", { className: "controls alert-actions" });
  const resumable = alert.paused || status === "fired";
  const toggle = el("button", { type: "button", className: "secondary",
    textContent: alert.paused ? "Resume" : status === "fired" ? "Re-arm" : "Pause",
    "aria-label": `${alert.paused ? "Resume" : status === "fired" ? "Re-arm" : "Pause"} alert ${alert.symbol} ${conditionWords(alert)}`,
    dataset: { action: resumable ? "resume" : "pause" } });
  toggle.addEventListener("click", () => setPaused(alert.id, !resumable, toggle));
  const remove = el("button", { type: "button", className: "secondary danger", textContent: "Delete",
    "aria-label": `Delete alert ${alert.symbol} ${conditionWords(alert)}`, dataset: { action: "delete" } });
  const confirmBox = el("div", { className: "confirm", role: "group", "aria-label": "Confirm deletion", hidden: true });
  const yes = el("button", { type: "button", className: "danger-solid", textContent: "Yes, delete it", dataset: { action: "confirm-delete" } });
  const no = el("button", { type: "button", className: "secondary", textContent: "Cancel" });
  confirmBox.append(el("span", {}, "Delete this alert and its history? This can't be undone. "), yes, " ", no);
  remove.addEventListener("click", () => { confirmBox.hidden = false; remove.hidden = true; no.focus(); });
  no.addEventListener("click", () => { confirmBox.hidden = true; remove.hidden = false; remove.focus(); });
  yes.addEventListener("click", () => deleteAlert(alert.id, yes));
  const actionError = el("p", { className: "form-error", role: "alert", dataset: { actionError: "" } });
  actions.append(toggle, remove, confirmBox);

  const events = el("section", { className: "events", "aria-label": `Events of ${alert.symbol} ${conditionWords(alert)}` },
    el("h4", {}, "Events"),
    el("p", { className: "muted", role: "status", dataset: { eventsState: "" } }, "Loading events…"),
    el("div", { className: "table-wrap", dataset: { eventsTable: "" } }));
  item.append(title, facts, actions, actionError, events);
  return item;
}

function itemFor(id) { return list.querySelector(`[data-alert-id="${CSS.escape(id)}"]`); }

function replaceAlert(alert) {
  alerts.set(alert.id, alert);
  const old = itemFor(alert.id);
  if (!old) return;
  const fresh = renderAlert(alert);
  // Keep the events already shown while the new ones load.
  fresh.querySelector(".events").replaceWith(old.querySelector(".events"));
  old.replaceWith(fresh);
}

async function setPaused(id, paused, button) {
  button.disabled = true;
  const item = itemFor(id);
  try {
    const alert = await api(`/api/v1/alerts/${encodeURIComponent(id)}/${paused ? "pause" : "resume"}`, { method: "POST" });
    replaceAlert(alert);
    itemFor(id)?.querySelector("[data-action='pause'], [data-action='resume']")?.focus();
    notify(paused ? "Alert paused" : "Alert resumed", `${alert.symbol}: ${conditionWords(alert)}.`);
  } catch (error) {
    button.disabled = false;
    item.querySelector("[data-action-error]").textContent = `Could not ${paused ? "pause" : "resume"} it: ${error.message}`;
  }
}

async function deleteAlert(id, button) {
  button.disabled = true;
  const item = itemFor(id);
  try {
    await api(`/api/v1/alerts/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) {
      button.disabled = false;
      item.querySelector("[data-action-error]").textContent = `Could not delete it: ${error.message}`;
      return;
    }
  }
  const alert = alerts.get(id);
  alerts.delete(id);
  total = Math.max(0, total - 1);
  clearTimeout(pollers.get(id));
  pollers.delete(id);
  item.remove();
  renderListState();
  document.getElementById("your-alerts-heading").setAttribute("tabindex", "-1");
  document.getElementById("your-alerts-heading").focus();
  if (alert) notify("Alert deleted", `${alert.symbol}: ${conditionWords(alert)}.`);
}

function renderEvents(item, events) {
  const state = item.querySelector("[data-events-state]");
  const holder = item.querySelector("[data-events-table]");
  if (!events.length) {
    state.textContent = "No events yet: it fires when the condition is met.";
    holder.replaceChildren();
    return;
  }
  state.textContent = events.length >= EVENTS_SHOWN ? `The latest ${events.length} events, newest first.`
    : `${events.length} event${events.length === 1 ? "" : "s"}, newest first.`;
  const alert = alerts.get(item.dataset.alertId);
  const table = el("table", { className: "events-table" },
    el("caption", { className: "visually-hidden" }, "When the alert fired, the value that crossed, and each channel's delivery"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "When"), el("th", { scope: "col", className: "num" }, "Price"),
      el("th", { scope: "col", className: "num" }, "Value"), el("th", { scope: "col" }, "Delivery"))));
  const body = el("tbody");
  for (const event of events) {
    const pct = event.condition && event.condition !== "above" && event.condition !== "below";
    const deliveries = el("ul", { className: "plain deliveries" }, ...event.deliveries.map((d) => {
      const channel = alert?.channels?.[d.channel];
      const target = channel ? ` ${channel.type === "webhook" ? channel.url : channel.to}` : "";
      return el("li", { dataset: { deliveryStatus: d.status } },
        el("span", { className: `badge delivery-${d.status}` }, d.status), " ",
        `${CHANNEL_NAMES[d.type] ?? d.type}${target}: ${deliveryWords(d)}`);
    }));
    if (!event.deliveries.length) deliveries.append(el("li", {}, "no channel to deliver to"));
    body.append(el("tr", { dataset: { eventId: event.id } },
      el("td", {}, when(event.created_at)),
      el("td", { className: "num" }, formatNumber(event.price, { currency: alert?.vs })),
      el("td", { className: "num" }, event.value === null || event.value === undefined ? "–"
        : pct ? `${formatNumber(event.value, { digits: 4 })}%` : formatNumber(event.value, { currency: alert?.vs })),
      el("td", {}, deliveries)));
  }
  table.append(body);
  holder.replaceChildren(table);
}

async function loadEvents(id) {
  clearTimeout(pollers.get(id));
  pollers.delete(id);
  const item = itemFor(id);
  if (!item) return;
  let events;
  try {
    events = (await api(`/api/v1/alerts/${encodeURIComponent(id)}/events`, { query: { limit: EVENTS_SHOWN } })).items;
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) { item.remove(); alerts.delete(id); renderListState(); return; }
    item.querySelector("[data-events-state]").textContent = `Events are unavailable right now: ${error.message}`;
    pollers.set(id, setTimeout(() => loadEvents(id), 15_000));
    return;
  }
  renderEvents(itemFor(id) ?? item, events);
  // While a delivery is still under way, look again (sooner for pending, at the next retry otherwise).
  const open = events.flatMap((e) => e.deliveries).filter((d) => d.status === "pending" || d.status === "retrying");
  if (open.length) {
    const next = Math.min(...open.map((d) => (d.status === "pending" || !d.next_attempt_at ? 2_000
      : Math.max(2_000, new Date(d.next_attempt_at).getTime() - Date.now() + 500))));
    pollers.set(id, setTimeout(() => loadEvents(id), Math.min(next, 60_000)));
  }
}

async function loadAlerts() {
  if (page === 1) listState.textContent = "Loading your alerts…";
  try {
    const result = await api("/api/v1/alerts", { query: { page, per_page: PER_PAGE } });
    total = result.total;
    for (const alert of result.items) {
      if (alerts.has(alert.id)) continue;
      alerts.set(alert.id, alert);
      list.append(renderAlert(alert));
      loadEvents(alert.id);
    }
    renderListState();
  } catch (error) {
    listState.textContent = error instanceof ApiError && error.status === 401
      ? "Your session has ended: sign in again to see your alerts."
      : `Your alerts can't be loaded right now: ${error.message}`;
  }
}

async function refreshAlert(id) {
  try {
    replaceAlert(await api(`/api/v1/alerts/${encodeURIComponent(id)}`));
  } catch { /* the events below say what is known */ }
  loadEvents(id);
}

onAlert((event) => {
  if (!event.alert_id) return;
  if (alerts.has(event.alert_id)) refreshAlert(event.alert_id);
  else { page = 1; loadAlerts(); } // made elsewhere (another tab, the API): fetch the list again
});

addChannel("webhook");
updateCondition();
loadCoins();
loadAlerts();
