// Account: who is signed in, the preferences (currency, watchlist) and the recent activity log.
import { ApiError, api } from "./api.js";

const ACTIVITY_PAGE = 20;
const ROLES = { user: "User", admin: "Administrator" };
const ACTIVITY_WORDS = {
  register: "Account created",
  login: "Signed in",
  login_failed: "Failed sign-in attempt (wrong password)",
  logout: "Signed out",
  password_reset_requested: "Password reset link requested",
  password_changed: "Password changed (every session was signed out)",
  preferences_changed: "Preferences changed",
  refresh_reuse_detected: "A spent sign-in token was used again: that sign-in was ended everywhere",
  account_changed_by_admin: "An administrator changed your account",
  alert_created: "Alert created",
  alert_updated: "Alert changed",
  alert_paused: "Alert paused",
  alert_resumed: "Alert resumed",
  alert_deleted: "Alert deleted",
  alert_channel_disabled: "An alert channel was switched off",
};

const form = document.querySelector("[data-form='preferences']");
const vsSelect = document.getElementById("pref-vs");
const watchInput = document.getElementById("pref-watchlist");
const profileState = document.querySelector("[data-profile-state]");
const activityState = document.querySelector("[data-activity-state]");
const activityTable = document.querySelector("[data-activity]");
const moreActivity = document.querySelector("[data-action='more-activity']");
let nextBefore = null;

function when(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso ?? "–") : date.toLocaleString();
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function describeActivity(entry) {
  const base = ACTIVITY_WORDS[entry.kind] ?? entry.kind.replaceAll("_", " ");
  const details = entry.details ?? {};
  const parts = [];
  if (entry.kind === "preferences_changed") {
    if (details.vs_currency) parts.push(`currency ${details.vs_currency}`);
    if (Array.isArray(details.watchlist)) parts.push(`watchlist ${details.watchlist.length ? details.watchlist.join(", ") : "emptied"}`);
  } else if (entry.kind === "account_changed_by_admin") {
    if (details.role) parts.push(`role ${ROLES[details.role] ?? details.role}`);
    if (details.is_active === false) parts.push("account disabled");
    if (details.is_active === true) parts.push("account enabled");
  } else if (entry.kind.startsWith("alert_") && details.symbol) {
    parts.push([details.symbol, details.condition, details.vs].filter(Boolean).join(" "));
    if (details.reason) parts.push(String(details.reason));
  }
  return parts.length ? `${base}: ${parts.join("; ")}` : base;
}

function fillPreferences(user) {
  if (![...vsSelect.options].some((option) => option.value === user.vs_currency)) {
    vsSelect.append(new Option(user.vs_currency, user.vs_currency));
  }
  vsSelect.value = user.vs_currency;
  watchInput.value = (user.watchlist ?? []).join(", ");
}

async function loadProfile() {
  try {
    const user = await api("/api/v1/users/me");
    document.querySelector("[data-profile-email]").textContent = user.email;
    document.querySelector("[data-profile-role]").textContent = ROLES[user.role] ?? user.role;
    document.querySelector("[data-profile-created]").textContent = when(user.created_at);
    document.querySelector("[data-profile]").hidden = false;
    profileState.textContent = "";
    profileState.hidden = true;
    fillPreferences(user);
  } catch (error) {
    profileState.textContent = error instanceof ApiError && error.status === 401
      ? "Your session has ended: sign in again to see your account."
      : `Your profile can't be loaded right now: ${error.message}`;
  }
}

async function loadCoinsHint() {
  try {
    const coins = await api("/api/v1/coins", { query: { per_page: 250 } });
    if (coins.length) {
      document.querySelector("[data-watchlist-help]").textContent =
        `Coin symbols separated by commas; they are pinned first on the markets page. Tracked: ${coins.map((c) => c.symbol).join(", ")}.`;
    }
  } catch { /* the generic hint stays */ }
}

async function loadActivity() {
  try {
    const page = await api("/api/v1/users/me/activity", { query: { limit: ACTIVITY_PAGE, before_id: nextBefore } });
    const body = activityTable.querySelector("tbody");
    for (const entry of page.items) {
      const row = document.createElement("tr");
      row.dataset.kind = entry.kind;
      row.append(cell(when(entry.created_at)), cell(describeActivity(entry)), cell(entry.client_address ?? "–"));
      body.append(row);
    }
    nextBefore = page.next_before_id;
    moreActivity.hidden = !nextBefore;
    const shown = body.childElementCount;
    activityTable.hidden = !shown;
    activityState.textContent = shown ? `The latest ${shown} entries, newest first.` : "No activity recorded yet.";
  } catch (error) {
    activityState.textContent = `Your activity can't be loaded right now: ${error.message}`;
  }
}

function watchlistFrom(text) {
  return text.split(/[\s,;]+/).map((s) => s.trim()).filter(Boolean);
}

// A 422 names its field in FastAPI's details (loc) or at the start of its message ("watchlist: ...").
function clearErrors() {
  form.querySelectorAll("[data-field-error]").forEach((node) => { node.textContent = ""; });
  form.querySelectorAll("[aria-invalid]").forEach((node) => node.removeAttribute("aria-invalid"));
  form.querySelector("[data-form-error]").textContent = "";
}

function showPreferenceErrors(error, sent) {
  clearErrors();
  const general = form.querySelector("[data-form-error]");
  const found = [];
  if (Array.isArray(error.details)) {
    for (const item of error.details) {
      const loc = (item.loc ?? []).filter((part) => part !== "body");
      let message = String(item.msg ?? "").replace(/^Value error, /, "");
      if (loc[0] === "watchlist" && Number.isInteger(loc[1])) {
        message = `"${sent.watchlist?.[loc[1]] ?? ""}" is not a coin symbol (letters and digits only)`;
      } else if (loc[0] === "vs_currency" && /pattern/.test(message)) {
        message = "not a currency code";
      }
      found.push([String(loc[0] ?? ""), message]);
    }
  }
  if (!found.length && error.status === 422) {
    const match = /^(vs_currency|watchlist):\s*(.*)$/s.exec(error.message);
    if (match) found.push([match[1], match[2]]);
  }
  let placed = false;
  for (const [name, message] of found) {
    const slot = form.querySelector(`[data-field-error="${CSS.escape(name)}"]`);
    if (!slot) continue;
    slot.textContent = slot.textContent ? `${slot.textContent}; ${message}` : message;
    const input = form.querySelector(`[name="${CSS.escape(name)}"]`);
    input?.setAttribute("aria-invalid", "true");
    if (!placed) input?.focus();
    placed = true;
  }
  general.textContent = placed ? "" : error.message;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = form.querySelector("button[type=submit]");
  const success = form.querySelector("[data-form-success]");
  success.textContent = "";
  const body = { vs_currency: vsSelect.value, watchlist: watchlistFrom(watchInput.value) };
  button.disabled = true;
  try {
    const user = await api("/api/v1/users/me", { method: "PATCH", body });
    clearErrors();
    fillPreferences(user);
    success.textContent = "Preferences saved.";
    // The activity log now has the change at the top.
    activityTable.querySelector("tbody").replaceChildren();
    nextBefore = null;
    loadActivity();
  } catch (error) {
    showPreferenceErrors(error instanceof ApiError ? error : new ApiError(0, "error", String(error)), body);
  } finally {
    button.disabled = false;
  }
});

form.addEventListener("input", () => { form.querySelector("[data-form-success]").textContent = ""; });

moreActivity.addEventListener("click", () => loadActivity());

const params = new URLSearchParams(location.search);
if (params.get("welcome")) {
  document.querySelector("[data-welcome]").hidden = false;
  // Welcomed once: a reload shows the plain page.
  params.delete("welcome");
  history.replaceState(null, "", location.pathname + (params.toString() ? `?${params}` : "") + location.hash);
}

loadProfile();
loadCoinsHint();
loadActivity();
