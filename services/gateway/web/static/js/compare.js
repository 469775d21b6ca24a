// Compare 2 to 20 coins over a range: the normalised performance chart, the statistics table and the
// correlation heatmap; signed in, save the comparison and open a saved one.
import { ApiError, api, changeCell, formatNumber } from "./api.js";

const form = document.querySelector("[data-form='compare']");
const saveForm = document.querySelector("[data-form='save']");
const choices = form.querySelector("[data-coin-choices]");
const picked = form.querySelector("[data-picked]");
const vsSelect = form.querySelector("#compare-vs");
const periodSelect = form.querySelector("#compare-period");
const savedList = document.querySelector("[data-saved]");
const savedState = document.querySelector("[data-saved-state]");
const results = document.querySelector("[data-results]");
const resultsState = results.querySelector("[data-results-state]");
const resultsBody = results.querySelector("[data-results-body]");
const statsBody = results.querySelector("[data-stats] tbody");

const MIN_COINS = 2;
const MAX_COINS = 20;
const DAY = 86_400_000;
const PERIOD_DAYS = { "1d": 1, "7d": 7, "30d": 30, "90d": 90, "1y": 365, "3y": 3 * 365 };
const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"] };
const DARK = window.matchMedia?.("(prefers-color-scheme: dark)");
const signedIn = document.body.dataset.signedIn === "true";

let runTicket = 0;
let saved = [];
// The fixed range of an opened saved comparison ({start, end}), while the range select shows it.
let fixedRange = null;

function message(error) {
  return error instanceof ApiError ? error.message : String(error);
}

function unavailable(error) {
  return error instanceof ApiError && (error.status === 0 || error.status >= 500);
}

// --- field errors ----------------------------------------------------------------------------

function clearErrors(...forms) {
  for (const scope of forms.filter(Boolean)) {
    scope.querySelectorAll("[data-field-error], [data-form-error]").forEach((node) => { node.textContent = ""; });
    scope.querySelectorAll("[aria-invalid]").forEach((node) => node.removeAttribute("aria-invalid"));
  }
}

// Which field an API error is about: FastAPI's list of {loc, msg}, or our "field: message" convention, or
// what the status implies (an unknown coin, a name already taken).
function fieldMessages(error) {
  if (Array.isArray(error.details) && error.details.length) {
    return error.details.map((item) => {
      const loc = Array.isArray(item.loc) ? item.loc.filter((part) => part !== "body" && part !== "query") : [];
      return [String(loc[0] ?? ""), loc.length > 1 && typeof loc[1] === "number" ? `${item.msg} (item ${loc[1] + 1})` : item.msg];
    });
  }
  const named = /^([a-z_]+): /.exec(error.message ?? "");
  if (named) return [[named[1], error.message]];
  if (error.status === 409) return [["name", error.message]];
  if (error.status === 404 && /currency/i.test(error.message)) return [["vs", error.message]];
  if (error.status === 404 && error.details?.unknown) return [["symbols", error.message]];
  return [];
}

function showError(origin, error) {
  clearErrors(form, saveForm);
  let placed = false;
  for (const [field, text] of fieldMessages(error)) {
    const slot = document.querySelector(`[data-field-error="${CSS.escape(field)}"]`);
    if (!slot) continue;
    slot.textContent = slot.textContent ? `${slot.textContent} ${text}` : text;
    document.querySelector(`input[name="${CSS.escape(field)}"]:not([type=checkbox]), select[name="${CSS.escape(field)}"]`)
      ?.setAttribute("aria-invalid", "true");
    placed = true;
  }
  if (!placed) origin.querySelector("[data-form-error]").textContent = message(error);
}

// --- the coin picker -------------------------------------------------------------------------

function chosen() {
  return [...choices.querySelectorAll("input[name=symbols]:checked")].map((input) => input.value);
}

function describePicked() {
  const symbols = chosen();
  picked.textContent = symbols.length ? `${symbols.length} picked: ${symbols.join(", ")}.` : "None picked.";
}

function addChoice(symbol, name) {
  const id = `coin-${symbol}`;
  if (document.getElementById(id)) return;
  const wrap = document.createElement("div");
  wrap.className = "coin-choice";
  const input = Object.assign(document.createElement("input"), { type: "checkbox", id, name: "symbols", value: symbol });
  const label = Object.assign(document.createElement("label"), { htmlFor: id, textContent: name ? `${name} (${symbol})` : symbol });
  wrap.append(input, label);
  choices.append(wrap);
}

function pick(symbols) {
  symbols.forEach((symbol) => addChoice(symbol, null));
  choices.querySelectorAll("input[name=symbols]").forEach((input) => { input.checked = symbols.includes(input.value); });
  describePicked();
}

async function loadCoins() {
  const status = choices.querySelector("[data-coins-state]");
  try {
    const coins = await api("/api/v1/coins", { query: { vs: "USD", per_page: 250 } });
    if (!coins.length) {
      status.textContent = "No coins are tracked yet. An administrator adds them under Admin → Coins.";
      return;
    }
    status.remove();
    coins.forEach((coin) => addChoice(coin.symbol, coin.name));
  } catch (error) {
    status.textContent = `The list of coins is unavailable right now (${message(error)}). Reload the page to try again.`;
  }
}

choices.addEventListener("change", describePicked);

// --- drawing ---------------------------------------------------------------------------------

async function draw(kind, figure) {
  const element = results.querySelector(`[data-chart="${kind}"]`);
  const status = results.querySelector(`[data-chart-state="${kind}"]`);
  if (!window.Plotly) {
    element.dataset.state = "error";
    status.textContent = "The chart can't be drawn: the charting script did not load. Reload the page to try again.";
    return;
  }
  const data = figure?.data ?? [];
  const layout = { ...(figure?.layout ?? {}), autosize: true };
  layout.font = { ...(layout.font ?? {}), color: DARK?.matches ? "#d4d4d4" : "#303030" };
  await window.Plotly.newPlot(element, data, layout, PLOT_CONFIG);
  element.dataset.state = data.length ? "data" : "empty";
  element.dataset.renders = String(Number(element.dataset.renders ?? 0) + 1);
  status.textContent = data.length ? ""
    : "No data to draw for this range yet: the chart fills in as candles are stored.";
}

async function chart(kind, query, ticket) {
  const element = results.querySelector(`[data-chart="${kind}"]`);
  const status = results.querySelector(`[data-chart-state="${kind}"]`);
  status.textContent = "Loading the chart…";
  element.setAttribute("aria-busy", "true");
  try {
    const figure = await api(`/api/v1/charts/${kind}`, { query: { ...query, format: "json" } });
    if (ticket === runTicket) await draw(kind, figure);
  } catch (error) {
    if (ticket !== runTicket) return;
    window.Plotly?.purge(element);
    element.dataset.state = "error";
    status.textContent = unavailable(error)
      ? `The chart service is unavailable right now (${message(error)}).`
      : `The chart could not be loaded: ${message(error)}`;
  } finally {
    if (ticket === runTicket) element.removeAttribute("aria-busy");
  }
}

function missing(cell, reason) {
  cell.replaceChildren(
    Object.assign(document.createElement("span"), { textContent: "–", title: reason }),
    Object.assign(document.createElement("span"), { className: "visually-hidden", textContent: ` (not available: ${reason})` }),
  );
  cell.classList.add("missing");
}

function reasonFor(coin, ...fields) {
  for (const field of fields) if (coin.nulls?.[field]) return coin.nulls[field];
  return "not available";
}

function percentCell(cell, value, reason, { signed = false } = {}) {
  cell.className = "num";
  if (value === null || value === undefined) { missing(cell, reason); return; }
  if (signed) { changeCell(cell, value); return; }
  cell.textContent = `${Number(value).toFixed(2)}%`;
}

function numberCell(cell, value, reason) {
  cell.className = "num";
  if (value === null || value === undefined) { missing(cell, reason); return; }
  cell.textContent = Number(value).toFixed(2);
}

function when(value) {
  return value ? new Date(value).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" }) : null;
}

function statsRow(coin) {
  const row = document.createElement("tr");
  row.dataset.symbol = coin.symbol;
  const name = Object.assign(document.createElement("th"), { scope: "row", textContent: coin.symbol });
  const cells = Array.from({ length: 6 }, () => document.createElement("td"));
  const [total, volatility, drawdown, sharpe, beta, coverage] = cells;
  percentCell(total, coin.total_return_pct, reasonFor(coin, "total_return_pct"), { signed: true });
  percentCell(volatility, coin.annualised_volatility_pct, reasonFor(coin, "annualised_volatility_pct"));
  const dd = coin.max_drawdown?.pct;
  percentCell(drawdown, dd, reasonFor(coin, "max_drawdown.pct", "max_drawdown"));
  if (dd !== null && dd !== undefined) {
    const peak = when(coin.max_drawdown.peak_at), trough = when(coin.max_drawdown.trough_at);
    const recovered = when(coin.max_drawdown.recovered_at);
    if (peak && trough) drawdown.title = `peak ${peak}, trough ${trough}, ${recovered ? `recovered ${recovered}` : "not recovered yet"}`;
  }
  numberCell(sharpe, coin.sharpe, reasonFor(coin, "sharpe"));
  numberCell(beta, coin.beta, reasonFor(coin, "beta"));
  coverage.className = "num";
  coverage.textContent = `${(Number(coin.coverage) * 100).toFixed(0)}%`;
  coverage.title = `${coin.candles} of ${coin.expected} expected candles`;
  row.append(name, ...cells);
  return row;
}

const FIELD_NAMES = {
  total_return_pct: "return",
  annualised_volatility_pct: "volatility",
  max_drawdown: "max drawdown",
  "max_drawdown.pct": "max drawdown",
  sharpe: "Sharpe",
  beta: "beta",
};

// The reasons behind the dashes, in words under the table (a title alone reaches neither keyboards nor touch).
function nullReasons(coin) {
  const byReason = new Map();
  for (const [field, reason] of Object.entries(coin.nulls ?? {})) {
    const label = FIELD_NAMES[field];
    if (!label) continue;
    const fields = byReason.get(reason) ?? new Set();
    fields.add(label);
    byReason.set(reason, fields);
  }
  if (!byReason.size) return [];
  const text = [...byReason].map(([reason, fields]) => `${[...fields].join(", ")}: ${reason}`).join("; ");
  return [Object.assign(document.createElement("li"), { textContent: `${coin.symbol}: ${text}` })];
}

function correlationTable(correlation) {
  const holder = results.querySelector("[data-correlation-table]");
  const symbols = correlation?.symbols ?? [];
  if (!symbols.length) { holder.textContent = "No correlation: there are no returns in this range yet."; return; }
  const table = document.createElement("table");
  const head = document.createElement("tr");
  head.append(Object.assign(document.createElement("td"), { textContent: "" }),
    ...symbols.map((s) => Object.assign(document.createElement("th"), { scope: "col", textContent: s, className: "num" })));
  const rows = symbols.map((symbol, i) => {
    const row = document.createElement("tr");
    row.append(Object.assign(document.createElement("th"), { scope: "row", textContent: symbol }),
      ...correlation.matrix[i].map((value) => {
        const cell = Object.assign(document.createElement("td"), { className: "num" });
        if (value === null) missing(cell, "too few returns in common"); else cell.textContent = Number(value).toFixed(2);
        return cell;
      }));
    return row;
  });
  table.createTHead().append(head);
  table.createTBody().append(...rows);
  holder.replaceChildren(table);
}

function showStats(result) {
  const beta = results.querySelector("[data-beta-head]");
  beta.textContent = result.benchmark ? `Beta (vs ${result.benchmark})` : "Beta";
  statsBody.replaceChildren(...(result.coins ?? []).map(statsRow));
  results.querySelector("[data-null-reasons]").replaceChildren(...(result.coins ?? []).flatMap(nullReasons));
  const range = `${when(result.start)} to ${when(result.end)}, ${result.interval} candles, prices in ${result.vs}`;
  results.querySelector("[data-stats-note]").textContent = `${range}. Returns and drawdowns in percent; `
    + `Sharpe over a risk-free rate of ${(Number(result.risk_free_rate) * 100).toFixed(2)}% a year. `
    + "A dash means the value can't be computed; the reasons are listed below.";
  correlationTable(result.correlation);
}

// --- running a comparison --------------------------------------------------------------------

function periodStart(period) {
  // Whole minutes, so the statistics and both charts cover the same candles and hit the same cache.
  const now = Math.floor(Date.now() / 60_000) * 60_000;
  return new Date(now - PERIOD_DAYS[period] * DAY).toISOString();
}

function rangeOf(period) {
  if (PERIOD_DAYS[period]) return { start: periodStart(period) };
  return fixedRange ?? { start: periodStart("30d") };
}

function remember(symbols, vs, period) {
  const url = new URL(location.href);
  url.search = "";
  url.searchParams.set("symbols", symbols.join(","));
  url.searchParams.set("vs", vs);
  if (period) url.searchParams.set("period", period);
  history.replaceState(null, "", url);
}

async function run({ symbols, vs, period, savedItem }) {
  const ticket = ++runTicket;
  clearErrors(form);
  resultsState.textContent = `Comparing ${symbols.join(", ")} in ${vs}…`;
  results.setAttribute("aria-busy", "true");
  let result;
  try {
    result = savedItem
      ? await api(`/api/v1/analytics/comparisons/${encodeURIComponent(savedItem.id)}/run`)
      : await api("/api/v1/analytics/compare", { query: { symbols: symbols.join(","), vs, ...rangeOf(period) } });
  } catch (error) {
    if (ticket !== runTicket) return;
    results.removeAttribute("aria-busy");
    resultsBody.hidden = true;
    if (unavailable(error)) {
      resultsState.textContent = `The comparison is unavailable right now (${message(error)}). Try again in a moment.`;
    } else {
      resultsState.textContent = `The comparison could not be made: ${message(error)}`;
      showError(form, error);
    }
    return;
  }
  if (ticket !== runTicket) return;
  results.removeAttribute("aria-busy");
  remember(symbols, vs, period);
  resultsBody.hidden = false;
  results.dataset.symbols = symbols.join(",");
  resultsState.textContent = result.empty
    ? `No price history for ${symbols.join(", ")} in this range yet${result.note ? ` (${result.note})` : ""}. `
      + "The figures fill in as candles are stored."
    : `${savedItem ? `“${savedItem.name}”: ` : ""}${symbols.join(", ")} in ${result.vs}${result.note ? `. ${result.note}` : "."}`;
  showStats(result);
  const query = { symbols: symbols.join(","), vs: result.vs, start: result.start, end: result.end, interval: result.interval };
  await Promise.all([chart("compare", query, ticket), chart("correlation", query, ticket)]);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const symbols = chosen();
  clearErrors(form);
  if (symbols.length < MIN_COINS || symbols.length > MAX_COINS) {
    form.querySelector("[data-field-error=symbols]").textContent =
      `Pick ${MIN_COINS} to ${MAX_COINS} coins (${symbols.length} picked).`;
    choices.querySelector("input")?.focus();
    return;
  }
  run({ symbols, vs: vsSelect.value, period: periodSelect.value });
});

periodSelect.addEventListener("change", () => {
  if (!periodSelect.value) return;
  periodSelect.querySelector("[data-fixed]")?.remove();
  fixedRange = null;
});

// --- saved comparisons -----------------------------------------------------------------------

function describeSaved(item) {
  const range = item.period ? `last ${item.period}` : `${when(item.start)} to ${item.end ? when(item.end) : "now"}`;
  return `${item.symbols.join(", ")} · ${item.vs} · ${range}`;
}

function renderSaved() {
  savedList.replaceChildren(...saved.map((item) => {
    const entry = document.createElement("li");
    entry.dataset.comparison = item.id;
    const open = Object.assign(document.createElement("button"), { type: "button", className: "link-button", textContent: item.name });
    open.dataset.open = item.id;
    const about = Object.assign(document.createElement("span"), { className: "help", textContent: describeSaved(item) });
    const remove = Object.assign(document.createElement("button"), { type: "button", className: "secondary small", textContent: "Delete" });
    remove.dataset.delete = item.id;
    remove.setAttribute("aria-label", `Delete ${item.name}`);
    entry.append(open, about, remove);
    return entry;
  }));
  savedState.textContent = saved.length ? `${saved.length} saved.` : "Nothing saved yet: pick coins, name the comparison and save it.";
}

async function loadSaved() {
  try {
    saved = (await api("/api/v1/analytics/comparisons")).items ?? [];
    renderSaved();
  } catch (error) {
    savedState.textContent = unavailable(error)
      ? `Your saved comparisons are unavailable right now (${message(error)}).`
      : `Your saved comparisons could not be loaded: ${message(error)}`;
  }
}

function openSaved(item) {
  pick(item.symbols);
  if ([...vsSelect.options].some((option) => option.value === item.vs)) vsSelect.value = item.vs;
  periodSelect.querySelector("[data-fixed]")?.remove();
  fixedRange = null;
  if (item.period && PERIOD_DAYS[item.period]) {
    periodSelect.value = item.period;
  } else {
    const fixed = Object.assign(document.createElement("option"), { value: "", textContent: `Saved range: ${describeSaved(item).split(" · ").at(-1)}` });
    fixed.dataset.fixed = "";
    periodSelect.append(fixed);
    periodSelect.value = "";
    fixedRange = item.end ? { start: item.start, end: item.end } : { start: item.start };
  }
  run({ symbols: item.symbols, vs: item.vs, period: item.period, savedItem: item });
}

savedList?.addEventListener("click", async (event) => {
  const opener = event.target.closest("button[data-open]");
  if (opener) {
    const item = saved.find((entry) => entry.id === opener.dataset.open);
    if (item) openSaved(item);
    return;
  }
  const remover = event.target.closest("button[data-delete]");
  if (!remover) return;
  remover.disabled = true;
  try {
    await api(`/api/v1/analytics/comparisons/${encodeURIComponent(remover.dataset.delete)}`, { method: "DELETE" });
    saved = saved.filter((entry) => entry.id !== remover.dataset.delete);
    renderSaved();
  } catch (error) {
    remover.disabled = false;
    savedState.textContent = `Could not delete it: ${message(error)}`;
  }
});

saveForm?.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors(form, saveForm);
  savedState.textContent = saved.length ? `${saved.length} saved.` : "Nothing saved yet.";
  const button = saveForm.querySelector("button[type=submit]");
  const name = saveForm.querySelector("[name=name]").value;
  const body = { name, symbols: chosen(), vs: vsSelect.value };
  if (periodSelect.value) body.period = periodSelect.value;
  else if (fixedRange) Object.assign(body, fixedRange);
  button.disabled = true;
  try {
    const item = await api("/api/v1/analytics/comparisons", { method: "POST", body });
    saved = [item, ...saved]; // newest first, as the API lists them
    renderSaved();
    saveForm.querySelector("[data-form-error]").textContent = "";
    savedState.textContent = `Saved “${item.name}”. ${saved.length} saved.`;
    saveForm.reset();
  } catch (error) {
    showError(saveForm, error instanceof ApiError ? error : new ApiError(0, "error", String(error)));
  } finally {
    button.disabled = false;
  }
});

// --- the page --------------------------------------------------------------------------------

async function start() {
  const query = new URLSearchParams(location.search);
  await loadCoins();
  if (signedIn && savedList) loadSaved();
  const vs = query.get("vs")?.toUpperCase();
  if (vs && [...vsSelect.options].some((option) => option.value === vs)) vsSelect.value = vs;
  const period = query.get("period");
  if (period && PERIOD_DAYS[period]) periodSelect.value = period;
  const symbols = (query.get("symbols") ?? "").split(",").map((s) => s.trim().toUpperCase()).filter(Boolean);
  if (symbols.length) {
    pick([...new Set(symbols)].slice(0, 50)); // more than 20 is refused anyway
    form.requestSubmit();
  } else {
    describePicked();
  }
}

start();
