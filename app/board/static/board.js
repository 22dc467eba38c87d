// Live board: swap the sections the server renders once per change, keep CSRF fields filled.
(function () {
  "use strict";
  var meta = document.querySelector('meta[name="csrf-token"]');
  var token = meta ? meta.getAttribute("content") : "";
  function fillCsrf() {
    document.querySelectorAll('input[name="csrf"]').forEach(function (input) {
      input.value = token;
    });
  }
  fillCsrf();
  var url = document.body.getAttribute("data-live");
  var badge = document.getElementById("live");
  if (!url || !window.EventSource) return;
  var version = document.body.getAttribute("data-version");
  var source = new EventSource(url);
  source.addEventListener("open", function () {
    badge.textContent = "live";
    badge.className = "live on";
  });
  source.addEventListener("error", function () {
    badge.textContent = "reconnecting";
    badge.className = "live off";
  });
  source.addEventListener("update", function (event) {
    var msg = JSON.parse(event.data);
    if (!msg.sections || msg.version === version) return;
    version = msg.version;
    document.body.setAttribute("data-version", version);
    var active = document.activeElement;
    Object.keys(msg.sections).forEach(function (id) {
      var el = document.getElementById(id);
      // Do not replace a form the operator is typing in (e.g. a priority).
      if (el && !(active && active.tagName === "INPUT" && el.contains(active))) {
        el.innerHTML = msg.sections[id];
      }
    });
    fillCsrf();
  });
})();
