// Password reset: ask for a link, or, opened from the emailed link (/reset-password#token=...), set the new
// password. The token travels in the fragment, which browsers never send to a server or in a Referer; the
// page reads it and then takes it out of the address bar and history.
import { ApiError, api } from "./api.js";

const requestSection = document.querySelector("[data-reset-request]");
const requestForm = document.querySelector("[data-form='reset-request']");
const sent = document.querySelector("[data-reset-sent]");
const confirmSection = document.querySelector("[data-reset-confirm]");
const confirmForm = document.querySelector("[data-form='reset-confirm']");
const done = document.querySelector("[data-reset-done]");
const invalid = document.querySelector("[data-reset-invalid]");

function takeToken() {
  const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
  const token = fragment.get("token");
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  return token && token.trim() ? token.trim() : null;
}

let token = takeToken();

function clearErrors(form) {
  form.querySelectorAll("[data-field-error]").forEach((node) => { node.textContent = ""; });
  form.querySelectorAll("[aria-invalid]").forEach((node) => node.removeAttribute("aria-invalid"));
  form.querySelector("[data-form-error]").textContent = "";
}

function fieldError(form, name, message) {
  const slot = form.querySelector(`[data-field-error="${CSS.escape(name)}"]`);
  const input = form.querySelector(`[name="${CSS.escape(name)}"]`);
  if (!slot) return false;
  slot.textContent = message;
  input?.setAttribute("aria-invalid", "true");
  input?.focus();
  return true;
}

function showApiErrors(form, error, friendly = {}) {
  clearErrors(form);
  let placed = false;
  for (const item of Array.isArray(error.details) ? error.details : []) {
    const name = String((item.loc ?? []).filter((part) => part !== "body")[0] ?? "");
    const message = friendly[name] && /pattern/.test(item.msg) ? friendly[name] : String(item.msg).replace(/^Value error, /, "");
    placed = fieldError(form, name, message) || placed;
  }
  if (!placed) form.querySelector("[data-form-error]").textContent = error.message;
}

function show(section) {
  for (const node of [requestSection, confirmSection, done, invalid]) node.hidden = node !== section;
  if (section.hasAttribute("tabindex")) section.focus();
}

requestForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const email = requestForm.elements.email.value.trim();
  clearErrors(requestForm);
  if (!email) { fieldError(requestForm, "email", "Enter the email address of your account."); return; }
  const button = requestForm.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    await api("/api/v1/auth/password-reset", { method: "POST", body: { email } });
    // The same answer for every address: the page can't tell whether an account exists, and says so.
    sent.querySelector("[data-reset-sent-text]").textContent =
      `If ${email} has an account, a link is on its way.`;
    sent.hidden = false;
    sent.focus();
  } catch (error) {
    const known = error instanceof ApiError ? error : new ApiError(0, "error", String(error));
    showApiErrors(requestForm, known, { email: "Enter an email address such as you@example.com." });
  } finally {
    button.disabled = false;
  }
});

confirmForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors(confirmForm);
  const password = confirmForm.elements.new_password.value;
  const again = confirmForm.elements.new_password_again.value;
  if (!password) { fieldError(confirmForm, "new_password", "Choose a new password."); return; }
  if (password !== again) { fieldError(confirmForm, "new_password_again", "The two passwords are not the same."); return; }
  const button = confirmForm.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    await api("/api/v1/auth/password-reset/confirm", { method: "POST", body: { token, new_password: password } });
    token = null;
    confirmForm.reset();
    show(done);
  } catch (error) {
    const known = error instanceof ApiError ? error : new ApiError(0, "error", String(error));
    if (known.status === 400 || (known.status === 422 && !Array.isArray(known.details)
        && /token/.test(known.message))) {
      invalid.querySelector("[data-reset-invalid-text]").textContent =
        "The link has expired or has already been used (each link works once). Ask for a new one below.";
      show(invalid);
    } else if (known.status === 422 && Array.isArray(known.details)
        && known.details.some((d) => (d.loc ?? []).includes("token"))) {
      invalid.querySelector("[data-reset-invalid-text]").textContent =
        "The link is incomplete: it may have been cut short by the mail program. Ask for a new one below.";
      show(invalid);
    } else {
      showApiErrors(confirmForm, known);
    }
  } finally {
    button.disabled = false;
  }
});

invalid.querySelector("[data-action='ask-again']").addEventListener("click", () => {
  show(requestSection);
  requestForm.elements.email.focus();
});

function start() {
  if (token) {
    show(confirmSection);
    confirmForm.elements.new_password.focus();
  } else {
    requestSection.hidden = false;
  }
}

// The link pasted into a tab already on this page changes only the fragment: no new page load.
window.addEventListener("hashchange", () => {
  const fresh = takeToken();
  if (fresh) { token = fresh; clearErrors(confirmForm); start(); }
});

start();
