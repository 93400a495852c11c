// The queue page: decide without a reload, follow the outcome, and keep the list current by
// polling a small JSON endpoint. No inline script: this file is all the page runs.
"use strict";
(function () {
  var queue;

  function json(url, options) {
    return fetch(url, Object.assign({ credentials: "same-origin", headers: { Accept: "application/json" } }, options))
      .then(function (response) { return response.json().then(function (data) { return { ok: response.ok, data: data }; }); });
  }

  function setOutcome(card, text) {
    card.querySelector(".outcome").textContent = text;
  }

  function close(card, delay) {
    card.classList.add("decided");
    card.querySelectorAll("button, input, textarea, select").forEach(function (el) { el.disabled = true; });
    setTimeout(function () { card.remove(); updateEmpty(); }, delay);
  }

  function follow(card) {
    json(card.dataset.stateUrl).then(function (reply) {
      setOutcome(card, reply.data.outcome);
      if (reply.data.final) { close(card, 15000); } else { setTimeout(function () { follow(card); }, 1000); }
    }).catch(function () { setTimeout(function () { follow(card); }, 3000); });
  }

  function decide(event) {
    var form = event.target.closest("form.decide");
    if (!form) return;
    event.preventDefault();
    var card = form.closest(".card");
    var body = new FormData(form);
    if (event.submitter) body.set("decision", event.submitter.value);
    card.dataset.decided = "1";
    card.querySelectorAll("button").forEach(function (el) { el.disabled = true; });
    setOutcome(card, "Sending…");
    json(form.action, { method: "POST", body: body }).then(function (reply) {
      if (reply.data.retry) { return reopen(card, [reply.data.message].concat(reply.data.details || []).join(" ")); }
      setOutcome(card, reply.data.message || reply.data.error);
      showDiff(card, reply.data.diff);
      if (reply.ok && !reply.data.final) { follow(card); } else { close(card, reply.ok ? 8000 : 15000); }
      focusNext(card);
    }).catch(function () { reopen(card, "Could not reach Toolgate; try again."); });
  }

  // What the approver sent was refused (e.g. edited arguments failing the schema): the call
  // is still pending, so let them correct it.
  function reopen(card, text) {
    setOutcome(card, text);
    card.querySelectorAll("button").forEach(function (el) { el.disabled = false; });
    delete card.dataset.decided;
  }

  function showDiff(card, diff) {
    var pre = card.querySelector(".edited-diff");
    if (!pre || !diff) return;
    pre.textContent = diff;
    pre.hidden = false;
  }

  function focusNext(card) {
    var next = card.nextElementSibling;
    while (next && next.dataset.decided) next = next.nextElementSibling;
    if (next) next.querySelector("button.approve").focus();
  }

  function updateEmpty() {
    document.getElementById("empty").hidden = queue.querySelector(".card") !== null;
  }

  function addCard(id) {
    return fetch(queue.dataset.cardUrl.replace("ID", id), { credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.text() : ""; })
      .then(function (html) {
        if (!html || queue.querySelector('[data-call-id="' + id + '"]')) return;
        var holder = document.createElement("div");
        holder.innerHTML = html;
        queue.appendChild(holder.firstElementChild);
        updateEmpty();
      });
  }

  function poll() {
    json(queue.dataset.stateUrl).then(function (reply) {
      var pending = reply.data.pending.map(String);
      document.getElementById("pending-count").textContent = reply.data.total;
      document.title = document.title.replace(/^\(\d+\)/, "(" + reply.data.total + ")");
      queue.querySelectorAll(".card").forEach(function (card) {
        if (!card.dataset.decided && pending.indexOf(card.dataset.callId) === -1) {
          card.dataset.decided = "1";
          card.querySelectorAll("button").forEach(function (el) { el.disabled = true; });
          follow(card);
        }
      });
      pending.forEach(function (id) {
        if (!queue.querySelector('[data-call-id="' + id + '"]')) addCard(id);
      });
    }).finally(function () { setTimeout(poll, Number(queue.dataset.poll) || 3000); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    queue = document.getElementById("queue");
    if (!queue) return;
    queue.addEventListener("submit", decide);
    setTimeout(poll, Number(queue.dataset.poll) || 3000);
  });
})();
