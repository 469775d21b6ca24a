// One coin: its figures (live), a chart over a chosen range as a line with volume or as candlesticks, and
// every exchange's quote beside the consolidated price.
import { ApiError, api, changeCell, formatCompact, formatNumber } from "./api.js";
import { onPrice, watch } from "./live.js";

const root = document.querySelector("[data-coin]");
const symbol = root.dataset.symbol;
const select = document.getElementById("vs");
const state = root.querySelector("[data-coin-state]");
const body = root.querySelector("[data-coin-body]");
const chart = root.querySelector("[data-chart]");
const chartState = root.querySelector("[data-chart-state]");
const sourcesTable = root.querySelector("[data-sources]");
const sourcesState = root.querySelector("[data-sources-state]");

const DAY = 86_400_000;
const RANGES = {
  "1d": { label: "the last day", days: 1 },
  "7d": { label: "the last 7 days", days: 7 },
  "1m": { label: "the last month", days: 30 },
  "1y": { label: "the last year", days: 365 },
  // Bitcoin's first block: no market has candles before it.
  all: { label: "all stored history", start: "2009-01-03T00:00:00Z", interval: "1d" },
};
const KINDS = { history: "line with volume", candles: "candlesticks" };
const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"] };
const DARK = window.matchMedia?.("(prefers-color-scheme: dark)");
// Sources refresh on live prices, but not more often than this.
const SOURCES_EVERY_MS = 5000;

let range = "1d";
let kind = "history";
let coin = null;
let chartTicket = 0;
let renders = 0;
let sourcesLoadedAt = 0;
let sourcesPending = false;

function message(error) {
  return error instanceof ApiError ? error.message : String(error);
}

function unavailable(error) {
  return error instanceof ApiError && (error.status === 0 || error.status >= 500);
}

function formatTime(value) {
  if (!value) return "–";
  const moment = new Date(value);
  if (Number.isNaN(moment.getTime())) return "–";
  return moment.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

function ago(value) {
  const seconds = Math.round((Date.now() - new Date(value).getTime()) / 1000);
  if (!Number.isFinite(seconds)) return "";
  if (seconds < 60) return `${Math.max(0, seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86_400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86_400)} days ago`;
}

function badge(text, warn, title) {
  const node = document.createElement("span");
  node.className = warn ? "badge badge-warn" : "badge";
  node.textContent = text;
  if (title) node.title = title;
  return node;
}

// --- the figures -----------------------------------------------------------------------------

function showPrice(price, status, updated, direction) {
  const cell = root.querySelector("[data-price]");
  const arrow = direction === "up" ? "▲ " : direction === "down" ? "▼ " : "";
  cell.textContent = price === null || price === undefined ? "no price yet" : `${arrow}${formatNumber(price, { currency: select.value })}`;
  if (status === "stale") cell.append(" ", badge("stale", true, "too few fresh sources agree: this is the last good price"));
  cell.classList.remove("up", "down", "flash-up", "flash-down");
  if (direction) {
    void cell.offsetWidth; // restart the animation
    cell.classList.add(direction, `flash-${direction}`);
    cell.dataset.direction = direction;
  }
  const meta = root.querySelector("[data-price-meta]");
  meta.textContent = price === null || price === undefined
    ? "The sources are starting up or unreachable; the price appears with the first quotes."
    : `Consolidated over the sources${updated ? `, updated ${formatTime(updated)}` : ""}. Updates live.`;
}

function showCoin() {
  const name = coin.name ? `${coin.name} (${coin.symbol})` : coin.symbol;
  root.closest("main").querySelector("[data-coin-title]").textContent = name;
  document.title = `${name} · Coinlytics`;
  showPrice(coin.price, coin.price_status, coin.last_updated, null);
  root.querySelectorAll("[data-change]").forEach((cell) => changeCell(cell, coin[cell.dataset.change]));
  root.querySelector("[data-market-cap]").textContent = coin.market_cap === null
    ? "not known yet" : formatNumber(coin.market_cap, { digits: 0, currency: select.value });
  root.querySelector("[data-market-cap-meta]").textContent = coin.market_cap === null
    ? "Needs the circulating supply from CoinGecko and a price."
    : `${formatCompact(coin.market_cap)} ${select.value}${coin.market_cap_method ? ` (${coin.market_cap_method})` : ""}`;
  root.querySelectorAll("[data-supply]").forEach((cell) => {
    const value = coin[cell.dataset.supply];
    cell.textContent = value === null || value === undefined ? "not known yet" : `${formatNumber(value, { digits: 0 })} ${coin.symbol}`;
  });
  root.querySelector("[data-volume]").textContent = coin.volume_24h === null || coin.volume_24h === undefined
    ? "–" : `${formatCompact(coin.volume_24h)} ${coin.symbol}`;
}

// --- the chart -------------------------------------------------------------------------------

function chartQuery() {
  const chosen = RANGES[range];
  // Whole minutes, so switching back and forth reuses the platform's cached figure.
  const now = Math.floor(Date.now() / 60_000) * 60_000;
  const start = chosen.start ?? new Date(now - chosen.days * DAY).toISOString();
  return { symbol, vs: select.value, start, interval: chosen.interval, format: "json" };
}

function pressed(group, attribute, value) {
  group.querySelectorAll("button").forEach((button) => {
    button.setAttribute("aria-pressed", String(button.dataset[attribute] === value));
  });
}

function anomalyCount(data) {
  return data.filter((trace) => /anomal/i.test(trace.name ?? "")).reduce((sum, trace) => sum + (trace.x?.length ?? 0), 0);
}

async function renderChart() {
  const ticket = ++chartTicket;
  const what = `${KINDS[kind]} over ${RANGES[range].label}`;
  chartState.textContent = `Loading the chart (${what})…`;
  chart.setAttribute("aria-busy", "true");
  let figure;
  try {
    figure = await api(`/api/v1/charts/${kind}`, { query: chartQuery() });
  } catch (error) {
    if (ticket !== chartTicket) return;
    chart.removeAttribute("aria-busy");
    window.Plotly?.purge(chart);
    chart.dataset.state = "error";
    chartState.textContent = unavailable(error)
      ? `The chart service is unavailable right now (${message(error)}). Try again in a moment.`
      : `The chart could not be loaded: ${message(error)}`;
    return;
  }
  if (ticket !== chartTicket) return;
  chart.removeAttribute("aria-busy");
  if (!window.Plotly) {
    chart.dataset.state = "error";
    chartState.textContent = "The chart can't be drawn: the charting script did not load. Reload the page to try again.";
    return;
  }
  const data = figure?.data ?? [];
  const layout = { ...(figure?.layout ?? {}), autosize: true };
  layout.font = { ...(layout.font ?? {}), color: DARK?.matches ? "#d4d4d4" : "#303030" };
  await window.Plotly.newPlot(chart, data, layout, PLOT_CONFIG);
  if (ticket !== chartTicket) return;
  renders += 1;
  chart.dataset.range = range;
  chart.dataset.kind = kind;
  chart.dataset.renders = String(renders);
  chart.dataset.state = data.length ? "data" : "empty";
  chart.setAttribute("aria-label", `${coin?.name ?? symbol} in ${select.value}: ${what}`);
  if (!data.length) {
    chartState.textContent = `No price history for ${what} yet. Candles appear a minute after the first quotes; `
      + "a longer range shows older history once it is stored or backfilled.";
    return;
  }
  const anomalies = kind === "history" ? anomalyCount(data) : 0;
  chartState.textContent = `Showing ${what} in ${select.value}.`
    + (kind === "history" ? ` ${anomalies ? `${anomalies} unusual move${anomalies === 1 ? "" : "s"} marked with triangles.` : "No unusual moves in this range."}` : "");
}

root.querySelector("[data-ranges]").addEventListener("click", (event) => {
  const button = event.target.closest("button[data-range]");
  if (!button || button.dataset.range === range) return;
  range = button.dataset.range;
  pressed(event.currentTarget, "range", range);
  remember();
  renderChart();
});

root.querySelector("[data-kinds]").addEventListener("click", (event) => {
  const button = event.target.closest("button[data-kind]");
  if (!button || button.dataset.kind === kind) return;
  kind = button.dataset.kind;
  pressed(event.currentTarget, "kind", kind);
  remember();
  renderChart();
});

DARK?.addEventListener?.("change", (event) => {
  if (chart.dataset.renders) window.Plotly?.relayout(chart, { "font.color": event.matches ? "#d4d4d4" : "#303030" });
});

// --- the exchanges ---------------------------------------------------------------------------

function spreadCell(cell, price, consolidated) {
  cell.className = "num";
  const reference = Number(consolidated);
  const value = Number(price);
  if (!Number.isFinite(reference) || reference === 0 || !Number.isFinite(value)) { cell.textContent = "–"; return; }
  const pct = (value / reference - 1) * 100;
  const sign = pct > 0 ? "+" : pct < 0 ? "−" : "±";
  cell.textContent = `${sign}${Math.abs(pct).toFixed(3)}%`;
  cell.title = pct > 0 ? "above the consolidated price" : pct < 0 ? "below the consolidated price" : "equal to the consolidated price";
}

const STATUS_HELP = {
  used: "counted in the consolidated price",
  stale: "left out: this quote is too old",
  outlier: "left out: too far from the other sources",
};

async function loadSources() {
  if (sourcesPending) return;
  sourcesPending = true;
  sourcesLoadedAt = Date.now();
  const vs = select.value;
  let answer;
  try {
    answer = await api(`/api/v1/prices/${encodeURIComponent(symbol)}/sources`, { query: { vs } });
  } catch (error) {
    sourcesTable.hidden = true;
    sourcesState.textContent = unavailable(error)
      ? `The exchanges' quotes are unavailable right now (${message(error)}).`
      : `The exchanges' quotes could not be loaded: ${message(error)}`;
    return;
  } finally {
    sourcesPending = false;
  }
  if (vs !== select.value) return;
  const consolidated = answer.consolidated;
  const rows = answer.sources ?? [];
  if (!rows.length) {
    sourcesTable.hidden = true;
    sourcesState.textContent = consolidated
      ? `No exchange quotes ${symbol} in ${vs} directly: the ${vs} price is derived from other markets.`
      : `No exchange has quoted ${symbol} yet: the sources are starting up or unreachable.`;
    return;
  }
  const used = rows.filter((row) => row.status === "used").length;
  sourcesState.textContent = consolidated
    ? `${used} of ${rows.length} sources used in the consolidated price of ${formatNumber(consolidated.price, { currency: vs })}`
      + ` (${consolidated.status}, ${consolidated.method}).`
    : `${rows.length} sources quoted, but there is no consolidated price in ${vs} yet.`;
  sourcesTable.querySelector("tbody").replaceChildren(...rows.map((row) => {
    const tr = document.createElement("tr");
    tr.dataset.source = row.source;
    tr.dataset.status = row.status;
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = row.source;
    const cells = Array.from({ length: 5 }, () => document.createElement("td"));
    const [pair, price, status, spread, time] = cells;
    pair.textContent = row.quote && row.quote !== vs ? `${row.pair} (in ${row.quote})` : row.pair;
    price.className = "num";
    price.textContent = formatNumber(row.price, { currency: vs });
    status.append(badge(row.status, row.status !== "used", STATUS_HELP[row.status] ?? row.status));
    status.append(Object.assign(document.createElement("span"), { className: "visually-hidden", textContent: `: ${STATUS_HELP[row.status] ?? ""}` }));
    spreadCell(spread, row.price, consolidated?.price);
    time.textContent = row.timestamp ? `${formatTime(row.timestamp)} (${ago(row.timestamp)})` : "–";
    tr.append(name, ...cells);
    return tr;
  }));
  sourcesTable.hidden = false;
}

// --- the page --------------------------------------------------------------------------------

function remember() {
  const url = new URL(location.href);
  url.searchParams.set("vs", select.value);
  if (range === "1d") url.searchParams.delete("range"); else url.searchParams.set("range", range);
  if (kind === "history") url.searchParams.delete("chart"); else url.searchParams.set("chart", kind);
  history.replaceState(null, "", url);
}

async function load() {
  const vs = select.value;
  state.hidden = false;
  state.textContent = `Loading ${symbol}…`;
  try {
    coin = await api(`/api/v1/coins/${encodeURIComponent(symbol)}`, { query: { vs } });
  } catch (error) {
    body.hidden = true;
    coin = null;
    if (error instanceof ApiError && error.status === 404) {
      root.closest("main").querySelector("[data-coin-title]").textContent = "No such coin";
      state.replaceChildren(`No such coin: ${error.message}. `,
        Object.assign(document.createElement("a"), { href: "/", textContent: "See the tracked coins" }), ".");
      state.dataset.notFound = "";
    } else {
      state.textContent = unavailable(error)
        ? `${symbol} is unavailable right now: ${message(error)}. The page retries when you change the currency or reload.`
        : `${symbol} could not be loaded: ${message(error)}`;
    }
    return;
  }
  state.hidden = true;
  body.hidden = false;
  showCoin();
  watch([symbol], vs);
  renderChart();
  loadSources();
}

onPrice((frame) => {
  if (!coin || frame.base !== symbol || frame.vs !== select.value) return;
  const before = Number(coin.price);
  const after = Number(frame.price);
  coin.price = frame.price;
  coin.price_status = frame.status;
  coin.last_updated = frame.last_updated;
  showPrice(frame.price, frame.status, frame.last_updated, after > before ? "up" : after < before ? "down" : null);
  if (Date.now() - sourcesLoadedAt > SOURCES_EVERY_MS) loadSources();
});

select.addEventListener("change", () => {
  remember();
  load();
});

function start() {
  const query = new URLSearchParams(location.search);
  const vs = query.get("vs")?.toUpperCase();
  if (vs && [...select.options].some((option) => option.value === vs)) select.value = vs;
  if (Object.hasOwn(RANGES, query.get("range") ?? "")) range = query.get("range");
  if (Object.hasOwn(KINDS, query.get("chart") ?? "")) kind = query.get("chart");
  pressed(root.querySelector("[data-ranges]"), "range", range);
  pressed(root.querySelector("[data-kinds]"), "kind", kind);
  load();
}

start();
