// The page's one live websocket (/api/v1/ws): prices for the symbols pages ask for, and, signed in, the
// user's alert events. Reconnects with a growing, jittered delay; pages subscribe through onPrice().

const priceListeners = new Set();
const alertListeners = new Set();
const wanted = new Set();
let socket = null;
let vs = "USD";
let attempts = 0;
let opened = false;

function status(text) {
  document.querySelectorAll("[data-live-status]").forEach((node) => { node.textContent = `live updates: ${text}`; });
}

function send(message) {
  if (socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = new URLSearchParams({ vs });
  if (wanted.size) query.set("symbols", [...wanted].join(","));
  if (!wanted.size && document.body.dataset.signedIn !== "true") {
    status("idle");
    return;
  }
  status(opened ? "reconnecting…" : "connecting…");
  socket = new WebSocket(`${scheme}://${location.host}/api/v1/ws?${query}`);
  socket.addEventListener("open", () => { attempts = 0; opened = true; status("on"); });
  socket.addEventListener("message", (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    if (frame.type === "price") priceListeners.forEach((listener) => listener(frame));
    else if (frame.type === "alert.triggered") alertListeners.forEach((listener) => listener(frame));
  });
  socket.addEventListener("close", (event) => {
    socket = null;
    if (event.code === 4401) { status("signed out"); return; }
    if (event.code === 1008) { status(`off (${event.reason || "refused"})`); return; }
    attempts += 1;
    const delay = Math.min(30, 2 ** attempts) * (0.5 + Math.random() / 2);
    status(opened ? "reconnecting…" : "unavailable, retrying…");
    setTimeout(connect, delay * 1000);
  });
}

export function watch(symbols, currency) {
  const changed = currency && currency !== vs;
  if (currency) vs = currency;
  const fresh = symbols.filter((symbol) => !wanted.has(symbol));
  symbols.forEach((symbol) => wanted.add(symbol));
  if (!socket || changed) {
    socket?.close(1000);
    socket = null;
    connect();
  } else if (fresh.length) {
    send({ action: "subscribe", symbols: fresh });
  }
}

export function onPrice(listener) { priceListeners.add(listener); }
export function onAlert(listener) {
  alertListeners.add(listener);
  if (!socket && document.body.dataset.signedIn === "true") connect();
}
