// Convert an amount between two currencies, now or at a past moment, recomputed as the user types.
import { ApiError, api } from "./api.js";

const form = document.querySelector("[data-form='convert']");
const amount = form.querySelector("#amount");
const from = form.querySelector("#from");
const to = form.querySelector("#to");
const past = form.querySelector("#past");
const at = form.querySelector("#at");
const atField = form.querySelector("[data-at-field]");
const atHelp = form.querySelector("[data-at-help]");
const state = document.querySelector("[data-convert-state]");
const resultBox = document.querySelector("[data-convert-result]");

const TYPING_PAUSE_MS = 300;
const RETRY_MS = 5000;
const BASIS = {
  live: "live rates",
  snapshot: "a stored rate table from that moment",
  history: "stored candles and ECB reference days",
  identity: "the same currency: nothing to convert",
};
const SOURCES = {
  consolidated: "our consolidated price",
  ecb: "ECB reference rate",
  "sim-ecb": "simulated reference rate (offline demo)",
  measured: "measured stablecoin rate",
  candle: "stored candle",
};

let ticket = 0;
let timer = null;

function message(error) {
  return error instanceof ApiError ? error.message : String(error);
}

// --- the currency lists ----------------------------------------------------------------------

function group(label, entries) {
  const node = document.createElement("optgroup");
  node.label = label;
  for (const [code, name] of entries) {
    node.append(Object.assign(document.createElement("option"), { value: code, textContent: name ? `${code} · ${name}` : code }));
  }
  return node;
}

async function loadCurrencies() {
  const [coins, rates] = await Promise.allSettled([
    api("/api/v1/coins", { query: { vs: "USD", per_page: 250 } }),
    api("/api/v1/rates", { query: { base: "USD" } }),
  ]);
  const coinList = coins.status === "fulfilled" ? coins.value.map((coin) => [coin.symbol, coin.name]) : [];
  const known = new Set(coinList.map(([code]) => code));
  const fiat = new Map();
  const stable = new Map();
  const otherCrypto = new Map();
  const problems = [];
  if (rates.status === "fulfilled") {
    fiat.set(rates.value.base, null);
    for (const [code, entry] of Object.entries(rates.value.rates ?? {})) {
      if (entry.kind === "fiat") fiat.set(code, null);
      else if (entry.kind === "stablecoin") stable.set(code, null);
      else if (!known.has(code)) otherCrypto.set(code, null);
    }
    for (const code of rates.value.unavailable ?? []) if (!known.has(code) && !fiat.has(code) && !stable.has(code)) fiat.set(code, null);
  } else {
    // Without the rate table, the platform's quote currencies still make a usable list.
    for (const code of (form.dataset.vsCurrencies ?? "").split(",").filter(Boolean)) fiat.set(code, null);
    problems.push(`the list of currencies is incomplete (${message(rates.reason)})`);
  }
  if (coins.status === "rejected") problems.push(`the list of coins is unavailable (${message(coins.reason)})`);
  const sorted = (map) => [...map].sort(([a], [b]) => a.localeCompare(b));
  for (const select of [from, to]) {
    select.replaceChildren();
    if (coinList.length) select.append(group("Coins", coinList));
    if (otherCrypto.size) select.append(group("Other crypto", sorted(otherCrypto)));
    if (fiat.size) select.append(group("Currencies", sorted(fiat)));
    if (stable.size) select.append(group("Stablecoins", sorted(stable)));
  }
  return problems;
}

function choose(select, code, fallback) {
  const options = [...select.options].map((option) => option.value);
  if (code && !options.includes(code)) {
    // Kept from the address so the API says what is wrong with it, rather than silently changing it.
    select.append(Object.assign(document.createElement("option"), { value: code, textContent: code }));
  }
  select.value = code || (options.includes(fallback) ? fallback : options[0] ?? "");
}

// --- the moment ------------------------------------------------------------------------------

function localInputValue(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

// datetime-local is the user's wall-clock time; the API wants an instant, so it travels as ISO UTC.
function momentUtc() {
  if (!past.checked || !at.value) return null;
  const moment = new Date(at.value);
  if (Number.isNaN(moment.getTime())) return "invalid";
  return moment.toISOString().replace(/\.\d{3}Z$/, "Z");
}

function showMoment() {
  atField.hidden = !past.checked;
  const utc = momentUtc();
  atHelp.textContent = utc && utc !== "invalid" ? `Sent as ${utc} (UTC).` : "Your local time; sent as UTC.";
}

// --- converting ------------------------------------------------------------------------------

function clearErrors() {
  form.querySelectorAll("[data-field-error], [data-form-error]").forEach((node) => { node.textContent = ""; });
  form.querySelectorAll("[aria-invalid]").forEach((node) => node.removeAttribute("aria-invalid"));
}

function fieldError(name, text) {
  const slot = form.querySelector(`[data-field-error="${CSS.escape(name)}"]`);
  if (!slot) return false;
  slot.textContent = text;
  form.querySelector(`[name="${CSS.escape(name)}"]`)?.setAttribute("aria-invalid", "true");
  return true;
}

// The API names the field as "amount: ..." (or FastAPI's loc); an unknown currency lists the codes.
function showError(error) {
  let placed = false;
  if (Array.isArray(error.details)) {
    for (const item of error.details) {
      const loc = Array.isArray(item.loc) ? item.loc.filter((part) => part !== "query") : [];
      placed = fieldError(String(loc[0] ?? ""), `${loc[0]}: ${item.msg}`) || placed;
    }
  }
  const named = /^([a-z_]+): /.exec(error.message ?? "");
  if (!placed && named) placed = fieldError(named[1], error.message);
  if (!placed && error.code === "no_data_at_time") placed = fieldError("at", error.message);
  if (!placed && error.status === 404 && Array.isArray(error.details?.unknown)) {
    for (const code of error.details.unknown) {
      if (code === from.value) placed = fieldError("from", error.message) || placed;
      if (code === to.value) placed = fieldError("to", error.message) || placed;
    }
  }
  if (!placed) form.querySelector("[data-form-error]").textContent = message(error);
}

function formatAmount(value, code, rounding) {
  const number = Number(value);
  if (!Number.isFinite(number)) return `${value} ${code}`;
  const options = rounding?.kind === "decimal_places"
    ? { minimumFractionDigits: rounding.digits, maximumFractionDigits: rounding.digits }
    : { maximumSignificantDigits: Math.min(21, Math.max(1, rounding?.digits ?? 10)) };
  return `${number.toLocaleString(undefined, options)} ${code}`;
}

function formatRate(value) {
  const number = Number(value);
  return Number.isFinite(number) ? number.toLocaleString(undefined, { maximumSignificantDigits: 10 }) : String(value);
}

function formatTime(value) {
  if (!value) return "–";
  const moment = new Date(value);
  return Number.isNaN(moment.getTime()) ? String(value)
    : moment.toLocaleString(undefined, {
      year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short",
    });
}

function show(answer) {
  const source = answer.from, target = answer.to;
  resultBox.querySelector("[data-result]").textContent =
    `${formatAmount(answer.amount, source, null)} = ${formatAmount(answer.result, target, answer.rounding)}`;
  const inverse = Number(answer.rate) ? 1 / Number(answer.rate) : null;
  resultBox.querySelector("[data-rate]").textContent = `1 ${source} = ${formatRate(answer.rate)} ${target}`
    + (inverse ? ` · 1 ${target} = ${formatRate(inverse)} ${source}` : "");
  resultBox.querySelector("[data-path]").textContent = (answer.path ?? []).join(" → ");
  resultBox.querySelector("[data-as-of]").textContent = answer.at
    ? `${formatTime(answer.as_of)}; asked for ${formatTime(answer.at)}` : formatTime(answer.as_of);
  resultBox.querySelector("[data-basis]").textContent = BASIS[answer.basis] ?? answer.basis;
  const rounding = answer.rounding;
  resultBox.querySelector("[data-rounding]").textContent = rounding
    ? `${rounding.digits} ${rounding.kind === "decimal_places" ? "decimal places" : "significant digits"}, half-even (to ${rounding.unit} ${target})`
    : "none";
  resultBox.querySelector("[data-legs]").replaceChildren(...(answer.legs ?? []).map((leg) => {
    const item = document.createElement("li");
    const extra = [SOURCES[leg.source] ?? leg.source, `as of ${formatTime(leg.as_of)}`];
    if (leg.status) extra.push(leg.status);
    if (leg.sources_used) extra.push(`${leg.sources_used} sources`);
    if (leg.ecb_day) extra.push(`ECB day ${leg.ecb_day}`);
    item.textContent = `1 ${leg.from} = ${formatRate(leg.rate)} ${leg.to} (${extra.join(", ")})`;
    return item;
  }));
  resultBox.querySelector("[data-notes]").replaceChildren(...(answer.notes ?? []).map((note) =>
    Object.assign(document.createElement("li"), { textContent: note })));
  resultBox.hidden = false;
  state.textContent = answer.at ? `Converted at ${formatTime(answer.at)}.` : "Converted at the live rate. Changes as you type.";
}

function remember(query) {
  const url = new URL(location.href);
  url.search = new URLSearchParams(Object.entries(query).filter(([, value]) => value)).toString();
  history.replaceState(null, "", url);
}

async function convert() {
  clearTimeout(timer);
  const mine = ++ticket;
  clearErrors();
  showMoment();
  const value = amount.value.trim();
  if (!value) {
    resultBox.hidden = true;
    state.textContent = "Type an amount to convert.";
    return;
  }
  const moment = momentUtc();
  if (past.checked && !moment) {
    fieldError("at", "Pick the moment to convert at, or untick “At a past moment”.");
    state.textContent = "Waiting for the moment to convert at.";
    return;
  }
  if (moment === "invalid") {
    fieldError("at", "That is not a date and time.");
    return;
  }
  const query = { from: from.value, to: to.value, amount: value, at: moment ?? undefined };
  state.textContent = "Converting…";
  form.setAttribute("aria-busy", "true");
  let answer;
  try {
    answer = await api("/api/v1/convert", { query });
  } catch (error) {
    if (mine !== ticket) return;
    form.removeAttribute("aria-busy");
    resultBox.hidden = true;
    if (error instanceof ApiError && error.status === 503) {
      state.textContent = `No fresh rate right now: ${error.message}. Retrying in a few seconds…`;
      // Unless the user changes something first (which converts at once anyway).
      timer = setTimeout(() => { if (mine === ticket) convert(); }, RETRY_MS);
    } else if (error instanceof ApiError && error.status === 0) {
      state.textContent = error.message;
    } else {
      state.textContent = "Fix the highlighted value to see the result.";
      showError(error instanceof ApiError ? error : new ApiError(0, "error", String(error)));
    }
    return;
  }
  if (mine !== ticket) return;
  form.removeAttribute("aria-busy");
  remember({ amount: value, from: from.value, to: to.value, at: moment });
  show(answer);
}

function later() {
  clearTimeout(timer);
  timer = setTimeout(convert, TYPING_PAUSE_MS);
}

amount.addEventListener("input", later);
at.addEventListener("input", later);
from.addEventListener("change", convert);
to.addEventListener("change", convert);
past.addEventListener("change", () => {
  if (past.checked && !at.value) at.value = localInputValue(new Date(Date.now() - 3_600_000));
  showMoment();
  convert();
});
form.querySelector("[data-swap]").addEventListener("click", () => {
  const source = from.value;
  from.value = to.value;
  to.value = source;
  convert();
});
form.addEventListener("submit", (event) => { event.preventDefault(); convert(); });

async function start() {
  const query = new URLSearchParams(location.search);
  const problems = await loadCurrencies();
  if (!from.options.length) {
    state.textContent = `Nothing to convert yet: ${problems.join("; ") || "no currencies are known"}. Reload to try again.`;
    return;
  }
  choose(from, query.get("from")?.toUpperCase(), "BTC");
  choose(to, query.get("to")?.toUpperCase(), "USD");
  if (query.get("amount") !== null) amount.value = query.get("amount").slice(0, 100);
  const moment = query.get("at");
  if (moment && !Number.isNaN(new Date(moment).getTime())) {
    past.checked = true;
    at.value = localInputValue(new Date(moment));
  }
  await convert();
  if (problems.length) state.textContent += ` Note: ${problems.join("; ")}.`;
}

start();
