// Keeps an MCP server's admin page current while a sync runs: the "Tool sync" fields follow
// the sync, and when it ends the tools table is swapped in place. The page is never reloaded,
// so nothing the admin is typing is lost, and tool settings changed but not yet saved are
// carried over into the new table.
"use strict";
(function () {
  var POLL_MS = 1000;
  var GIVE_UP_MS = 5 * 60 * 1000;

  function statusElement() {
    return document.getElementById("sync-status");
  }

  function showFields(fields) {
    Object.keys(fields).forEach(function (name) {
      var cell = document.querySelector(".field-" + name + " .readonly");
      if (cell) cell.innerHTML = fields[name];
    });
  }

  // "<tool id>/<field>" for a control in the tools table, e.g. "12/approval".
  function controlKey(control) {
    var row = control.closest("tr");
    var id = row && row.querySelector("input[type=hidden][name$='-id']");
    var field = control.name.replace(/^.*-\d+-/, "");
    return id && id.value ? id.value + "/" + field : null;
  }

  function initialValue(select) {
    for (var i = 0; i < select.options.length; i++) {
      if (select.options[i].defaultSelected) return select.options[i].value;
    }
    return select.options.length ? select.options[0].value : "";
  }

  // Settings the admin changed in the table and hasn't saved yet.
  function unsavedChoices(container) {
    var choices = {};
    container.querySelectorAll("select").forEach(function (select) {
      var key = controlKey(select);
      if (key && select.value !== initialValue(select)) choices[key] = select.value;
    });
    return choices;
  }

  function showTools(html) {
    var container = document.getElementById("server-tools");
    if (!container) return;
    var choices = unsavedChoices(container);
    var focused = container.contains(document.activeElement) ? controlKey(document.activeElement) : null;
    var template = document.createElement("template");
    template.innerHTML = html;
    var fresh = template.content.getElementById("server-tools");
    if (!fresh) return;
    container.replaceChildren.apply(container, Array.prototype.slice.call(fresh.childNodes));
    container.querySelectorAll("select").forEach(function (select) {
      var key = controlKey(select);
      if (key && Object.prototype.hasOwnProperty.call(choices, key)) select.value = choices[key];
      if (key && key === focused) select.focus();
    });
  }

  function poll(deadline) {
    var element = statusElement();
    if (!element || Date.now() > deadline) return;
    fetch(element.dataset.statusUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (data) {
        showFields(data.fields || {});
        if (data.state === "idle") {
          if (data.tools_html) showTools(data.tools_html);
        } else {
          setTimeout(function () { poll(deadline); }, POLL_MS);
        }
      })
      .catch(function () { setTimeout(function () { poll(deadline); }, 3 * POLL_MS); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var element = statusElement();
    if (element && element.dataset.state !== "idle") poll(Date.now() + GIVE_UP_MS);
  });
})();
