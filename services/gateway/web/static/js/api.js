// One way to call the API from a page: same origin, the session cookie, the CSRF header on every change,
// and errors as the contract's {error: {code, message, details}}.

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

function csrfToken() {
  const found = document.cookie.split("; ").find((part) => part.startsWith("coinlytics_csrf="));
  return found ? decodeURIComponent(found.slice("coinlytics_csrf=".length)) : "";
}

let refreshing = null;

function expiresAt() {
  const found = document.cookie.split("; ").find((part) => part.startsWith("coinlytics_expires="));
  return found ? Number(found.slice("coinlytics_expires=".length)) : 0;
}

async function renew() {
  // Across tabs too: two tabs presenting the same refresh token would look like a stolen one (the server
  // then ends the whole sign-in). Inside the lock, a renewal another tab just made is simply taken up.
  const run = async () => {
    const before = expiresAt();
    if (before - Date.now() / 1000 > 90) return { expires_in: before - Date.now() / 1000 };
    const response = await fetch("/web/session/refresh", {
      method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken() },
    });
    return response.ok ? response.json() : null;
  };
  return navigator.locks ? navigator.locks.request("coinlytics-session-refresh", run) : run();
}

export async function refreshSession() {
  // One refresh at a time, however many requests found the token expired.
  refreshing ??= renew().then((body) => {
    refreshing = null;
    if (!body) return null;
    scheduleRefresh(body.expires_in);
    window.dispatchEvent(new CustomEvent("coinlytics:session-renewed"));
    return body;
  }, () => { refreshing = null; return null; });
  return refreshing;
}

let refreshTimer = null;

export function scheduleRefresh(expiresIn) {
  clearTimeout(refreshTimer);
  if (!expiresIn) return;
  // A minute before the access token expires (or halfway, for very short tokens).
  const lead = Math.min(60, expiresIn / 2);
  refreshTimer = setTimeout(refreshSession, Math.max(5, expiresIn - lead) * 1000);
}

export async function api(path, { method = "GET", body, query, retried = false } = {}) {
  const url = new URL(path, location.origin);
  for (const [key, value] of Object.entries(query ?? {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, value);
  }
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "network", "The platform can't be reached. Check the connection and try again.");
  }
  if (response.status === 401 && !retried && document.body.dataset.signedIn === "true") {
    if (await refreshSession()) return api(path, { method, body, query, retried: true });
    sessionExpired();
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) {
    const error = data?.error ?? {};
    throw new ApiError(response.status, error.code ?? "http_error",
      error.message ?? `The request failed (HTTP ${response.status}).`, error.details);
  }
  return data;
}

export function sessionExpired() {
  if (document.querySelector("[data-session-expired]")) return;
  const banner = document.createElement("div");
  banner.className = "banner banner-warning";
  banner.setAttribute("role", "status");
  banner.dataset.sessionExpired = "";
  banner.append("Your session has expired. ");
  const link = document.createElement("a");
  link.href = `/login?next=${encodeURIComponent(location.pathname + location.search)}`;
  link.textContent = "Sign in again";
  banner.append(link, ".");
  document.querySelector(".site-header").after(banner);
  document.body.dataset.signedIn = "false";
}

// Field errors from a 422: details is a list of {loc, msg} (FastAPI) or a message naming the field.
export function showErrors(form, error) {
  form.querySelectorAll("[data-field-error]").forEach((node) => { node.textContent = ""; });
  form.querySelectorAll("[aria-invalid]").forEach((node) => node.removeAttribute("aria-invalid"));
  const general = form.querySelector("[data-form-error]");
  let placed = false;
  if (Array.isArray(error.details)) {
    for (const item of error.details) {
      const loc = Array.isArray(item.loc) ? item.loc.filter((part) => part !== "body") : [];
      const name = loc.map(String).join(".");
      const slot = form.querySelector(`[data-field-error="${CSS.escape(name)}"]`)
        ?? form.querySelector(`[data-field-error="${CSS.escape(String(loc[0] ?? ""))}"]`);
      if (slot) {
        slot.textContent = item.msg;
        form.querySelector(`[name="${CSS.escape(String(loc[0]))}"]`)?.setAttribute("aria-invalid", "true");
        placed = true;
      }
    }
  }
  // Our own messages name their field first ("amount: must be positive", "channels.0.url: ...").
  const named = !placed && typeof error.message === "string" ? error.message.match(/^([A-Za-z_][\w.]*): (.+)$/s) : null;
  if (named) {
    const slot = form.querySelector(`[data-field-error="${CSS.escape(named[1])}"]`)
      ?? form.querySelector(`[data-field-error="${CSS.escape(named[1].split(".")[0])}"]`);
    if (slot) {
      slot.textContent = named[2];
      form.querySelector(`[name="${CSS.escape(named[1].split(".")[0])}"]`)?.setAttribute("aria-invalid", "true");
      placed = true;
    }
  }
  if (general) general.textContent = placed ? "" : error.message;
}

export function formatNumber(value, { digits, currency } = {}) {
  if (value === null || value === undefined || value === "") return "–";
  const number = Number(value);
  if (!Number.isFinite(number)) return "–";
  const maximumFractionDigits = digits ?? (Math.abs(number) >= 1000 ? 2 : Math.abs(number) >= 1 ? 4 : 8);
  const text = number.toLocaleString(undefined, { maximumFractionDigits, minimumFractionDigits: Math.min(2, maximumFractionDigits) });
  return currency ? `${text} ${currency}` : text;
}

export function formatCompact(value) {
  if (value === null || value === undefined) return "–";
  const number = Number(value);
  return Number.isFinite(number) ? number.toLocaleString(undefined, { notation: "compact", maximumFractionDigits: 2 }) : "–";
}

// A change in percent with its direction in words and an arrow, not only in colour.
export function changeCell(cell, value) {
  cell.classList.remove("up", "down");
  if (value === null || value === undefined) { cell.textContent = "–"; return; }
  const number = Number(value);
  const arrow = number > 0 ? "▲" : number < 0 ? "▼" : "";
  cell.textContent = `${arrow} ${number.toFixed(2)}%`.trim();
  if (number > 0) cell.classList.add("up");
  if (number < 0) cell.classList.add("down");
  cell.setAttribute("aria-label", `${number > 0 ? "up" : number < 0 ? "down" : "unchanged"} ${Math.abs(number).toFixed(2)} percent`);
}
