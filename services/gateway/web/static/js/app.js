// Every page: sign-out, keeping the session fresh, and alert events as notifications.
import { api, refreshSession, scheduleRefresh } from "./api.js";
import { onAlert } from "./live.js";
import { describeAlert, notify } from "./notify.js";

function cookie(name) {
  const found = document.cookie.split("; ").find((part) => part.startsWith(`${name}=`));
  return found ? decodeURIComponent(found.slice(name.length + 1)) : null;
}

async function keepSessionFresh() {
  if (document.body.dataset.signedIn !== "true") {
    // The access token expired while the refresh token may still be good: renew and reload once.
    if (document.querySelector("[data-session-expired]") && cookie("coinlytics_csrf") && !sessionStorage.getItem("coinlytics-renewed")) {
      sessionStorage.setItem("coinlytics-renewed", "1");
      if (await refreshSession()) location.reload();
    }
    return;
  }
  sessionStorage.removeItem("coinlytics-renewed");
  const expires = Number(cookie("coinlytics_expires"));
  if (expires) scheduleRefresh(Math.max(0, expires - Date.now() / 1000));
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-action='sign-out']");
  if (!button) return;
  button.disabled = true;
  try { await api("/web/session", { method: "DELETE" }); } catch { /* signed out locally either way */ }
  location.href = "/login?signed_out=1";
});

onAlert((event) => notify("Alert", describeAlert(event), { href: "/alerts", linkText: "See alerts" }));
keepSessionFresh();
