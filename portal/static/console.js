// The guard console's event list: new events arrive over the console shell's WebSocket (console-shell.js) and
// are added without a reload; when the shell reconnects, the socket asks for what it missed (?after=<newest id>).
(function () {
  "use strict";
  var list = document.getElementById("events");
  var tpl = document.getElementById("event-template");
  var empty = document.getElementById("empty");
  if (!list || !tpl || !window.GH) { return; }
  var maxRows = parseInt(list.getAttribute("data-max") || "100", 10);
  var newest = "";

  Array.prototype.forEach.call(list.children, function (row) {
    var id = row.getAttribute("data-id") || "";
    if (id > newest) { newest = id; }
  });

  function setText(row, sel, text) { row.querySelector(sel).textContent = text == null ? "" : String(text); }

  function addEvent(e) {
    if (!e || typeof e.id !== "string") { return; }
    for (var i = 0; i < list.children.length; i++) {
      if (list.children[i].getAttribute("data-id") === e.id) { return; }
    }
    var row = tpl.content.firstElementChild.cloneNode(true);
    row.setAttribute("data-id", e.id);
    row.setAttribute("data-type", e.type);
    row.classList.add("prio-" + String(e.level).replace(/[^a-z]/g, ""));
    setText(row, ".badge", e.level_label);
    setText(row, ".label", e.label);
    setText(row, ".ts", e.ts_local);
    setText(row, ".place", e.place);
    setText(row, ".source", e.source);
    row.setAttribute("title", e.codes || "");
    var before = null;  // newest first: ids are time-ordered (ULID)
    for (var j = 0; j < list.children.length; j++) {
      if (list.children[j].getAttribute("data-id") < e.id) { before = list.children[j]; break; }
    }
    list.insertBefore(row, before);
    row.classList.add("new");
    if (e.id > newest) { newest = e.id; }
    while (list.children.length > maxRows) { list.removeChild(list.lastElementChild); }
    if (empty) { empty.hidden = true; }
  }

  function setGateway(m) {
    var items = document.querySelectorAll("#gateways [data-gateway]");
    for (var i = 0; i < items.length; i++) {
      if (items[i].getAttribute("data-gateway") === m.gateway) {
        items[i].className = "gw gw-" + String(m.status).replace(/[^a-z]/g, "");
        items[i].querySelector(".state").textContent = m.label || m.status;
      }
    }
  }

  window.GH.wsQuery = function () { return newest ? "after=" + encodeURIComponent(newest) : ""; };
  window.GH.on("event", function (m) { addEvent(m.event); });
  window.GH.on("status", setGateway);
})();
