// Keeps the "Sync status" line of an MCP server's admin page current while a sync runs, and
// reloads the page when it ends so the tool list and any error show up.
"use strict";
(function () {
  function poll(element, deadline) {
    if (Date.now() > deadline) return;
    fetch(element.dataset.statusUrl, { credentials: "same-origin" })
      .then(function (response) { return response.json(); })
      .then(function (data) {
        element.textContent = data.status;
        if (data.state === "idle") {
          window.location.reload();
        } else {
          setTimeout(function () { poll(element, deadline); }, 1000);
        }
      })
      .catch(function () { setTimeout(function () { poll(element, deadline); }, 3000); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    var element = document.getElementById("sync-status");
    if (element && element.dataset.state !== "idle") {
      poll(element, Date.now() + 5 * 60 * 1000);
    }
  });
})();
