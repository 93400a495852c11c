// Copy buttons: <button data-copy="ID"> copies the value (or text) of the element with that id.
"use strict";
(function () {
  function say(button, text) {
    var status = button.parentNode.querySelector(".tg-copied") || document.querySelector(".tg-copied");
    if (status) status.textContent = text;
  }

  function copyBySelecting(source) {
    var range = document.createRange();
    if (source.select) {
      source.select();
    } else {
      range.selectNodeContents(source);
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
    }
    try { return document.execCommand("copy"); } catch (error) { return false; }
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) return;
    var source = document.getElementById(button.dataset.copy);
    if (!source) return;
    var text = source.value !== undefined ? source.value : source.textContent;
    var done = function () { say(button, "Copied."); };
    var fallback = function () {
      say(button, copyBySelecting(source) ? "Copied." : "Selected: press Ctrl+C (⌘C) to copy.");
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, fallback);
    } else {
      fallback();
    }
  });
})();
