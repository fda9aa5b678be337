// The centre's console: the estates at a glance, kept live. Whenever the console socket brings an incident, a
// gateway's status, an estate's link or a door's change (from any estate, through any instance), the table is
// fetched again from the server (rendered there, at most once a second) and swapped in. The console shell rings
// for every estate.
(function () {
  "use strict";
  if (!window.GH) { return; }
  var GH = window.GH;
  var pending = false;  // a fetch is due or on its way
  var sent = false;  // ... and on its way: its answer may have been read before what the socket tells now
  var again = false;  // so fetch once more when it is back
  var last = 0;
  var MIN_MS = 1000;

  function settled() {
    pending = sent = false;
    if (again) { again = false; refresh(); }
  }

  function refresh() {
    if (pending) { again = again || sent; return; }
    var wait = Math.max(0, last + MIN_MS - Date.now());
    pending = true;
    window.setTimeout(function () {
      last = Date.now();
      sent = true;
      fetch("/centre/estates", { credentials: "same-origin" }).then(function (r) {
        if (r.status === 401) { GH.sessionEnded(); return null; }
        return r.ok ? r.text() : null;
      }).then(function (html) {
        settled();
        if (html == null) { return; }
        var box = document.getElementById("centre-estates");
        if (!box) { return; }
        var tmp = document.createElement("div");
        tmp.innerHTML = html;
        var fresh = tmp.querySelector("#centre-estates");
        if (fresh) { box.replaceWith(fresh); }
      }, settled);
    }, wait);
  }

  ["incident", "status", "door", "link", "open"].forEach(function (kind) { GH.on(kind, refresh); });
})();
