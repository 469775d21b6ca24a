// Sign-in and registration forms.
import { ApiError, api, showErrors } from "./api.js";

function nextPage() {
  const next = new URLSearchParams(location.search).get("next");
  if (!next) return "/";
  // Only a page of this site, never an open redirect: resolved the way the browser will ("/\\evil",
  // "/\t/evil" and the like name other hosts), then kept only if it stays on this origin.
  try {
    const target = new URL(next, location.origin);
    return target.origin === location.origin ? target.pathname + target.search + target.hash : "/";
  } catch {
    return "/";
  }
}

async function signIn(email, password) {
  return api("/web/session", { method: "POST", body: { email, password } });
}

const signInForm = document.querySelector("[data-form='sign-in']");
if (new URLSearchParams(location.search).get("signed_out")) {
  signInForm?.querySelector("[data-form-error]")?.replaceChildren("You have signed out.");
}
signInForm?.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData(signInForm);
  const button = signInForm.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    await signIn(String(data.get("email")), String(data.get("password")));
    location.href = nextPage();
  } catch (error) {
    showErrors(signInForm, error instanceof ApiError ? error : new ApiError(0, "error", String(error)));
  } finally {
    button.disabled = false;
  }
});

const registerForm = document.querySelector("[data-form='register']");
registerForm?.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData(registerForm);
  const email = String(data.get("email"));
  const password = String(data.get("password"));
  const button = registerForm.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    await api("/api/v1/auth/register", { method: "POST", body: { email, password } });
    await signIn(email, password);
    location.href = "/account?welcome=1";
  } catch (error) {
    showErrors(registerForm, error instanceof ApiError ? error : new ApiError(0, "error", String(error)));
  } finally {
    button.disabled = false;
  }
});
