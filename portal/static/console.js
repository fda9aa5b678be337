// The guard console: new events arrive over a WebSocket and are added to the list without a reload.
// The socket reconnects by itself (backoff with jitter) and asks for what it missed (?after=<newest id>).
(function () {
  "use strict";
  var list = document.getElementById("events");
  var conn = document.getElementById("conn");
  var tpl = document.getElementById("event-template");
  var empty = document.getElementById("empty");
  if (!list || !conn || !tpl) { return; }
  var maxRows = parseInt(list.getAttribute("data-max") || "100", 10);
  var newest = "";
  var delay = 500;
  var failures = 0;

  Array.prototype.forEach.call(list.children, function (row) {
    var id = row.getAttribute("data-id") || "";
    if (id > newest) { newest = id; }
  });

  function setConn(state) {
    conn.className = "conn conn-" + state;
    conn.setAttribute("data-state", state);
    conn.querySelector(".text").textContent = conn.getAttribute("data-label-" + state) || state;
  }

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

  function checkSignedIn() {
    fetch("/api/events?limit=1", { credentials: "same-origin" }).then(function (r) {
      if (r.status === 401 || r.status === 403) {
        window.location.href = "/login?next=" + encodeURIComponent("/console");
      }
    }).catch(function () { /* the network is down: keep retrying the socket */ });
  }

  function connect() {
    setConn(failures ? "offline" : "connecting");
    var proto = window.location.protocol === "https:" ? "wss:" : "ws:";
    var url = proto + "//" + window.location.host + "/ws" + (newest ? "?after=" + encodeURIComponent(newest) : "");
    var ws;
    try { ws = new WebSocket(url); } catch (err) { schedule(); return; }
    ws.onopen = function () { delay = 500; failures = 0; setConn("online"); };
    ws.onmessage = function (m) {
      var msg;
      try { msg = JSON.parse(m.data); } catch (err) { return; }
      if (msg.kind === "event") { addEvent(msg.event); }
      else if (msg.kind === "status") { setGateway(msg); }
    };
    ws.onclose = function () { setConn("offline"); schedule(); };
  }

  function schedule() {
    failures += 1;
    if (failures % 3 === 0) { checkSignedIn(); }
    var wait = delay / 2 + Math.random() * delay / 2;
    delay = Math.min(delay * 2, 15000);
    window.setTimeout(connect, wait);
  }

  connect();
})();
