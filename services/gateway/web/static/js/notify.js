// In-page notifications (an aria-live region): alert events as they arrive, and short confirmations.

export function notify(title, text, { href, linkText } = {}) {
  const region = document.getElementById("notifications");
  if (!region) return;
  const toast = document.createElement("div");
  toast.className = "toast";
  toast.setAttribute("role", "status");
  const heading = document.createElement("strong");
  heading.textContent = title;
  const body = document.createElement("p");
  body.textContent = text;
  toast.append(heading, body);
  if (href) {
    const link = document.createElement("a");
    link.href = href;
    link.textContent = linkText ?? "Open";
    toast.append(link, " ");
  }
  const close = document.createElement("button");
  close.type = "button";
  close.className = "secondary";
  close.textContent = "Dismiss";
  close.addEventListener("click", () => toast.remove());
  toast.append(close);
  region.append(toast);
  setTimeout(() => toast.remove(), 20_000);
}

const WORDS = {
  above: "rose above", below: "fell below", pct_change_up: "rose by", pct_change_down: "fell by",
  spread_above: "spread between sources exceeded",
};

export function describeAlert(event) {
  const verb = WORDS[event.condition] ?? event.condition;
  const pct = event.condition.startsWith("pct") || event.condition === "spread_above";
  const threshold = pct ? `${event.threshold}%` : `${event.threshold} ${event.vs}`;
  return `${event.symbol} ${verb} ${threshold} (price ${event.price} ${event.vs})`;
}
