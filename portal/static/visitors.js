// Visitor registration: show the house's registered residents while the guard types it; print the slip.
(function () {
  "use strict";
  var print = document.getElementById("print-slip");
  if (print) { print.addEventListener("click", function () { window.print(); }); }

  var house = document.getElementById("v-house");
  var info = document.getElementById("house-info");
  if (!house || !info) { return; }
  var site = document.getElementById("v-site");
  var timer = null;
  var asked = 0;

  function say(text, unknown) {
    info.hidden = !text;
    info.className = "house-info" + (unknown ? " unknown" : "");
    info.textContent = text;
  }

  function lookup() {
    var value = house.value.trim();
    if (!value) { say(""); return; }
    var n = ++asked;
    var url = "/api/visitors/house?house=" + encodeURIComponent(value) + (site ? "&site=" + encodeURIComponent(site.value) : "");
    fetch(url, { credentials: "same-origin" }).then(function (r) { return r.json(); }).then(function (body) {
      if (n !== asked) { return; }  // an older answer
      if (!body.found) {
        var key = body.error === "pick-site" ? "data-pick-site" : (body.error === "bad-house" ? "data-bad-house" : "data-unknown");
        say(info.getAttribute(key), true);
        return;
      }
      var people = (body.residents || []).map(function (r) {
        return r.name + " (" + (info.getAttribute("data-role-" + r.role) || r.role) + ") " + r.phone;
      });
      var en = document.documentElement.lang === "en";
      var text = (en && body.address_en ? body.address_en : body.address) + " · " + info.getAttribute("data-residents") + ": " +
        (people.length ? people.join(", ") : info.getAttribute("data-no-residents"));
      if (body.doors && body.doors.length) {
        text += " · " + info.getAttribute("data-doors") + ": " + body.doors.map(function (d) { return d.label; }).join(", ");
      }
      say(text, false);
    }).catch(function () { /* no answer: the slip shows the residents anyway */ });
  }

  function soon() {
    if (timer) { window.clearTimeout(timer); }
    timer = window.setTimeout(lookup, 250);
  }
  house.addEventListener("input", soon);
  if (site) { site.addEventListener("change", soon); }
  if (house.value) { lookup(); }
})();
