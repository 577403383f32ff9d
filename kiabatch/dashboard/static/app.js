// kiabatch dashboard: keeps the page's live part current, and asks before destructive actions.
// The server says how often to refresh (X-Kiabatch-Refresh, milliseconds; 0: stop, e.g. a finished
// batch). Never more than one request per second, none while the tab is hidden. The fragment is
// HTML the server escaped; inserted markup never runs scripts (and the CSP allows none inline).
(function () {
  "use strict";
  var MIN_INTERVAL = 1000;
  var live = document.getElementById("live");
  var timer = null;
  var busy = false;
  var interval = live ? parseInt(live.getAttribute("data-refresh") || "0", 10) : 0;

  function schedule() {
    clearTimeout(timer);
    if (interval > 0) timer = setTimeout(refresh, Math.max(MIN_INTERVAL, interval));
  }

  function refresh() {
    if (busy || document.hidden) { schedule(); return; }
    busy = true;
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    fetch(url.toString(), { credentials: "same-origin", cache: "no-store", headers: { "Accept": "text/html" } })
      .then(function (response) {
        var next = parseInt(response.headers.get("X-Kiabatch-Refresh") || "0", 10);
        return response.text().then(function (text) {
          if (response.ok) {
            live.innerHTML = text;
            live.setAttribute("data-refresh", String(next));
            interval = next;
          } else if (response.status === 404) {
            interval = 0; // deleted meanwhile: keep what is shown, stop asking
          } // anything else (Redis restarting): keep the page as it is and try again
        });
      })
      .catch(function () { /* the server restarts or the network blips: try again later */ })
      .then(function () { busy = false; window.kiabatchRefreshes = (window.kiabatchRefreshes || 0) + 1; schedule(); });
  }

  document.addEventListener("visibilitychange", function () { if (!document.hidden) schedule(); });
  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });
  if (live) schedule();
})();
