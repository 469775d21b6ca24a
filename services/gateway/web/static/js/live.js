// The page's one live websocket (/api/v1/ws): prices for the symbols pages ask for, and, signed in, the
// user's alert events. Reconnects with a growing, jittered delay; pages subscribe through onPrice().
//
// The socket is signed in by the session cookie it was opened with. The server closes it (4401) when that
// access token expires, and the page can't hand it the renewed one (the cookie is HttpOnly), so the socket
// is reopened after each renewal and, after a 4401, once the session is renewed.
import { refreshSession } from "./api.js";

const priceListeners = new Set();
const alertListeners = new Set();
const wanted = new Set();
let socket = null;
let vs = "USD";
let attempts = 0;
let opened = false;
let retryTimer = null;

function status(text) {
  document.querySelectorAll("[data-live-status]").forEach((node) => { node.textContent = `live updates: ${text}`; });
}

function send(message) {
  if (socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function close() {
  const old = socket;
  socket = null; // its handlers see they are no longer current and do nothing
  old?.close(1000);
}

function retry() {
  attempts += 1;
  const delay = Math.min(30, 2 ** attempts) * (0.5 + Math.random() / 2);
  status(opened ? "reconnecting…" : "unavailable, retrying…");
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, delay * 1000);
}

function connect() {
  clearTimeout(retryTimer);
  if (socket) return;
  if (!wanted.size && document.body.dataset.signedIn !== "true") {
    status("off");
    return;
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = new URLSearchParams({ vs });
  if (wanted.size) query.set("symbols", [...wanted].join(","));
  status(opened ? "reconnecting…" : "connecting…");
  const current = new WebSocket(`${scheme}://${location.host}/api/v1/ws?${query}`);
  socket = current;
  current.addEventListener("open", () => {
    if (socket !== current) return;
    attempts = 0; opened = true; status("on");
  });
  current.addEventListener("message", (event) => {
    if (socket !== current) return;
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    if (frame.type === "price") priceListeners.forEach((listener) => listener(frame));
    else if (frame.type === "alert.triggered") alertListeners.forEach((listener) => listener(frame));
  });
  current.addEventListener("close", async (event) => {
    if (socket !== current) return; // closed on purpose (replaced by a newer socket)
    socket = null;
    if (event.code === 4401) {
      if (await refreshSession()) { connect(); return; }
      status("signed out");
      return;
    }
    if (event.code === 1008) { status(`off (${event.reason || "refused"})`); return; }
    retry();
  });
}

// A renewed session: reopen, so the socket carries the new access token before the old one expires.
window.addEventListener("coinlytics:session-renewed", () => {
  if (socket) { close(); connect(); }
});

export function watch(symbols, currency) {
  const changed = Boolean(currency) && currency !== vs;
  if (currency) vs = currency;
  const fresh = symbols.filter((symbol) => !wanted.has(symbol));
  symbols.forEach((symbol) => wanted.add(symbol));
  if (!socket || changed) {
    close();
    connect();
  } else if (fresh.length) {
    send({ action: "subscribe", symbols: fresh });
  }
}

export function onPrice(listener) { priceListeners.add(listener); }
export function onAlert(listener) {
  alertListeners.add(listener);
  // Signed in, the socket carries alert events; pages that watch prices open it anyway. Deferred a turn so
  // a page's own watch() (with its currency) comes first and one socket serves both.
  if (document.body.dataset.signedIn === "true") setTimeout(() => { if (!socket) connect(); }, 0);
}
