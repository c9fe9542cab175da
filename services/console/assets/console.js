// The console's few behaviours: regions that refresh themselves, the order
// page's live watch (server-sent events), and actions posted from forms.
"use strict";

// Regions with data-refresh="/url" are fetched again every data-every ms.
function refreshRegion(el, url) {
  return fetch(url, { headers: { "x-console": "1" } })
    .then((r) => (r.ok ? r.text() : null))
    .then((html) => {
      if (html !== null && html !== el.dataset.shown) {
        el.innerHTML = html;
        el.dataset.shown = html;
      }
    })
    .catch(() => {
      // The console itself is down or restarting: try again next time.
    });
}

function startRefreshing(el) {
  const every = Number(el.dataset.every) || 2000;
  const tick = () => {
    if (document.visibilityState === "visible") {
      refreshRegion(el, el.dataset.refresh).finally(() => setTimeout(tick, every));
    } else {
      setTimeout(tick, every);
    }
  };
  setTimeout(tick, every);
}

// The order page: WatchOrder through the console, each change redraws the
// live region; at the end it is drawn a few more times for effects that
// settle after the order's last status (a notification being sent).
function startWatching(el) {
  const live = () => refreshRegion(el, el.dataset.live);
  const source = new EventSource(el.dataset.watch);
  const note = document.getElementById("watch-state");
  source.addEventListener("change", () => live());
  source.addEventListener("end", () => {
    source.close();
    if (note) note.textContent = "the saga has ended";
    document.getElementById("cancel")?.remove();
    live();
    setTimeout(live, 1500);
    setTimeout(live, 5000);
  });
  source.addEventListener("problem", (e) => {
    if (note) note.textContent = "live updates paused: " + e.data + " — retrying";
  });
  source.addEventListener("open", () => {
    if (note) note.textContent = "live";
  });
}

// Forms with data-action post their fields as JSON and show the answer.
function startAction(form) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const result = form.querySelector("[data-result]");
    const button = form.querySelector("button");
    const fields = Object.fromEntries(new FormData(form).entries());
    button.disabled = true;
    result.textContent = "…";
    result.className = "";
    fetch(form.dataset.action, {
      method: "POST",
      headers: { "content-type": "application/json", "x-console-action": "1" },
      body: JSON.stringify(fields),
    })
      .then((r) => r.json())
      .then((answer) => {
        result.textContent = answer.message;
        result.className = answer.ok ? "ok" : "error";
        document.querySelectorAll("[data-live]").forEach((el) => refreshRegion(el, el.dataset.live));
        document.querySelectorAll("[data-refresh]").forEach((el) => refreshRegion(el, el.dataset.refresh));
      })
      .catch((e) => {
        result.textContent = "the console did not answer: " + e;
        result.className = "error";
      })
      .finally(() => {
        button.disabled = false;
      });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(startRefreshing);
  document.querySelectorAll("[data-watch]").forEach(startWatching);
  document.querySelectorAll("form[data-action]").forEach(startAction);
});
