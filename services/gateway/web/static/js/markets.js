// Markets: every tracked coin, live. Sorted by a column header; the watchlist first; currency switcher.
import { ApiError, api, changeCell, formatCompact, formatNumber } from "./api.js";
import { onPrice, watch } from "./live.js";

const table = document.querySelector("[data-markets]");
const body = table.querySelector("tbody");
const state = document.querySelector("[data-markets-state]");
const select = document.getElementById("vs");
let coins = [];
let watchlist = [];
let sort = { key: "market_cap", descending: true };

function rowFor(symbol) { return body.querySelector(`tr[data-symbol="${CSS.escape(symbol)}"]`); }

function sparkline(closes) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 120 32");
  svg.setAttribute("role", "img");
  const values = closes.filter((v) => Number.isFinite(v));
  if (values.length < 2) { svg.setAttribute("aria-label", "no history yet"); return svg; }
  const low = Math.min(...values), high = Math.max(...values), span = high - low || 1;
  const points = values.map((v, i) => `${(i / (values.length - 1)) * 118 + 1},${31 - ((v - low) / span) * 30}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  const rising = values.at(-1) >= values[0];
  svg.classList.add(rising ? "up" : "down");
  svg.setAttribute("aria-label", `7 days: ${rising ? "up" : "down"} ${Math.abs((values.at(-1) / values[0] - 1) * 100).toFixed(1)} percent`);
  return svg;
}

function sourcesBadge(cell, used, total) {
  cell.replaceChildren();
  if (!used) { cell.textContent = "–"; return; }
  if (!total) {
    cell.append(Object.assign(document.createElement("span"), { className: "badge", textContent: String(used), title: `${used} sources used` }));
    return;
  }
  const badge = document.createElement("span");
  badge.className = used < total ? "badge badge-warn" : "badge";
  badge.textContent = `${used}/${total}`;
  badge.title = used < total ? `${total - used} source(s) not used (stale or an outlier)` : "every source agrees";
  badge.setAttribute("aria-label", `${used} of ${total} sources used${used < total ? ", some left out" : ""}`);
  cell.append(badge);
}

function render() {
  const vs = select.value;
  const pinned = new Set(watchlist);
  const sorted = [...coins].sort((a, b) => {
    const pin = Number(pinned.has(b.symbol)) - Number(pinned.has(a.symbol));
    if (pin) return pin;
    const x = a[sort.key], y = b[sort.key];
    const order = typeof x === "string" && Number.isNaN(Number(x)) ? String(x).localeCompare(String(y))
      : (Number(x ?? -Infinity) - Number(y ?? -Infinity));
    return sort.descending ? -order : order;
  });
  body.replaceChildren(...sorted.map((coin) => {
    const row = document.createElement("tr");
    row.dataset.symbol = coin.symbol;
    if (pinned.has(coin.symbol)) row.classList.add("pinned");
    const name = document.createElement("th");
    name.scope = "row";
    const link = document.createElement("a");
    link.href = `/coins/${encodeURIComponent(coin.symbol)}?vs=${vs}`;
    link.textContent = coin.name ? `${coin.name} (${coin.symbol})` : coin.symbol;
    name.append(link);
    if (pinned.has(coin.symbol)) name.append(" ", Object.assign(document.createElement("span"), { className: "badge", textContent: "watchlist" }));
    const cells = Array.from({ length: 8 }, () => document.createElement("td"));
    const [price, h1, h24, d7, cap, volume, spark, sources] = cells;
    price.className = "num"; price.dataset.price = "";
    price.textContent = formatNumber(coin.price, { currency: vs });
    if (coin.price_status === "stale") price.append(" ", Object.assign(document.createElement("span"), { className: "badge badge-warn", textContent: "stale" }));
    [h1, h24, d7].forEach((cell) => { cell.className = "num"; });
    changeCell(h1, coin.change_1h_pct); changeCell(h24, coin.change_24h_pct); changeCell(d7, coin.change_7d_pct);
    cap.className = "num"; cap.textContent = formatCompact(coin.market_cap);
    volume.className = "num"; volume.textContent = formatCompact(coin.volume_24h);
    if (coin.closes) spark.append(sparkline(coin.closes));
    sourcesBadge(sources, coin.sources_used, coin.sources_total);
    row.append(name, ...cells);
    return row;
  }));
  table.querySelectorAll("th[scope=col]").forEach((th) => {
    const key = th.querySelector("button")?.dataset.sort;
    th.setAttribute("aria-sort", key === sort.key ? (sort.descending ? "descending" : "ascending") : "none");
  });
}

async function sparklines(vs) {
  const end = new Date();
  const start = new Date(end.getTime() - 7 * 86_400_000);
  await Promise.all(coins.map(async (coin) => {
    try {
      const candles = await api(`/api/v1/prices/${encodeURIComponent(coin.symbol)}/history`,
        { query: { vs, interval: "1h", start: start.toISOString(), end: end.toISOString() } });
      coin.closes = (candles ?? []).map((c) => Number(c.close));
    } catch { coin.closes = []; }
  }));
}

let loadTicket = 0;

async function load() {
  const vs = select.value;
  // A newer load (another currency picked meanwhile) wins: an older answer arriving late is dropped.
  const ticket = ++loadTicket;
  const current = () => ticket === loadTicket;
  state.textContent = "Loading prices…";
  try {
    const listed = await api("/api/v1/coins", { query: { vs, per_page: 250 } });
    if (!current()) return;
    coins = listed;
    if (coins.length) {
      const symbols = coins.map((c) => c.symbol);
      const table = await api("/api/v1/prices", { query: { symbols: symbols.join(","), vs } }).catch(() => null);
      if (!current()) return;
      for (const coin of coins) {
        const entry = table?.prices?.[coin.symbol]?.[vs] ?? table?.[coin.symbol]?.[vs];
        if (entry) { coin.sources_used = entry.sources_used; coin.sources_total = entry.sources_total; }
      }
    }
  } catch (error) {
    if (!current()) return;
    state.textContent = error instanceof ApiError ? `Prices are unavailable: ${error.message}` : "Prices are unavailable.";
    table.hidden = true;
    return;
  }
  if (!coins.length) {
    state.textContent = "No coins are tracked yet. An administrator adds them under Admin → Coins.";
    table.hidden = true;
    return;
  }
  const priced = coins.filter((c) => c.price !== null).length;
  state.textContent = priced ? `${coins.length} coins, prices in ${vs}, updating live.`
    : "No prices yet: the sources are starting up or unreachable. This table fills in as soon as the first quotes arrive.";
  table.hidden = false;
  render();
  watch(coins.map((c) => c.symbol), vs);
  await sparklines(vs);
  if (current()) render();
}

onPrice((frame) => {
  if (frame.vs !== select.value) return;
  const coin = coins.find((c) => c.symbol === frame.base);
  if (!coin) return;
  const before = Number(coin.price);
  coin.price = frame.price; coin.price_status = frame.status;
  coin.sources_used = frame.sources_used; coin.sources_total = frame.sources_total;
  const row = rowFor(frame.base);
  const cell = row?.querySelector("[data-price]");
  if (!cell) return;
  const after = Number(frame.price);
  const direction = after > before ? "up" : after < before ? "down" : null;
  cell.textContent = `${direction === "up" ? "▲ " : direction === "down" ? "▼ " : ""}${formatNumber(frame.price, { currency: frame.vs })}`;
  if (frame.status === "stale") cell.append(" ", Object.assign(document.createElement("span"), { className: "badge badge-warn", textContent: "stale" }));
  cell.classList.remove("flash-up", "flash-down", "up", "down");
  if (direction) {
    void cell.offsetWidth; // restart the animation
    cell.classList.add(`flash-${direction}`, direction);
    cell.dataset.direction = direction;
  }
  sourcesBadge(row.lastElementChild, frame.sources_used, frame.sources_total);
});

table.querySelector("thead").addEventListener("click", (event) => {
  const key = event.target.closest("button[data-sort]")?.dataset.sort;
  if (!key) return;
  sort = { key, descending: sort.key === key ? !sort.descending : key !== "symbol" };
  render();
});

select.addEventListener("change", () => {
  const url = new URL(location.href);
  url.searchParams.set("vs", select.value);
  history.replaceState(null, "", url);
  load();
});

async function start() {
  const fromUrl = new URLSearchParams(location.search).get("vs");
  if (document.body.dataset.signedIn === "true") {
    try {
      const me = await api("/api/v1/users/me");
      watchlist = me.watchlist ?? [];
      if (!fromUrl && me.vs_currency) select.value = me.vs_currency;
    } catch { /* the table works without the preferences */ }
  }
  if (fromUrl && [...select.options].some((o) => o.value === fromUrl)) select.value = fromUrl;
  load();
}

start();
