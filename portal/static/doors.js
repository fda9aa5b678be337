// The door list: live door state over the console WebSocket, and remote unlock with a reason.
// Messages: {kind: "door", door: {...}} (a door changed), {kind: "unlock", command: {...}} (a remote unlock
// was sent or answered), {kind: "status", gateway, status} (a gateway went on- or offline).
(function () {
  "use strict";
  var list = document.getElementById("doors");
  var conn = document.getElementById("conn");
  var labels = document.getElementById("labels");
  var tpl = document.getElementById("door-template");
  var commands = document.querySelector("#commands tbody");
  if (!list || !conn || !labels) { return; }
  var token = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  var delay = 500;
  var failures = 0;

  function label(name, fallback) {
    var v = labels.getAttribute("data-" + name);
    return v == null ? (fallback == null ? name : fallback) : v;
  }
  function clean(s) { return String(s == null ? "" : s).replace(/[^a-z0-9_-]/gi, ""); }

  function setConn(state) {
    conn.className = "conn conn-" + state;
    conn.setAttribute("data-state", state);
    conn.querySelector(".text").textContent = conn.getAttribute("data-label-" + state) || state;
  }

  function card(key) {
    var items = list.querySelectorAll("li.door");
    for (var i = 0; i < items.length; i++) {
      if (items[i].getAttribute("data-key") === key) { return items[i]; }
    }
    return null;
  }

  function lastAccess(a) {
    if (!a) { return ""; }
    var parts = [label("result-" + clean(a.result), a.result)];
    if (a.kind) { parts.push(label("kind-" + clean(a.kind), a.kind)); }
    parts.push(a.ts_local || "");
    return parts.join(" · ");
  }

  function setDoor(d) {
    if (!d || typeof d.key !== "string") { return; }
    var li = card(d.key);
    if (!li) {
      if (!tpl) { return; }
      li = tpl.content.firstElementChild.cloneNode(true);
      li.setAttribute("data-key", d.key);
      li.querySelector(".name").textContent = d.label || d.door;
      li.querySelector(".id").textContent = d.key;
      var none = document.getElementById("no-doors");
      if (none) { none.parentNode.removeChild(none); }
      list.appendChild(li);
    }
    var state = clean(d.state) || "unknown";
    li.setAttribute("data-state", state);
    li.setAttribute("data-gateway", d.site + "/" + d.gateway);
    li.className = "door state-" + state + (d.tamper ? " is-tamper" : "") + (d.reader_offline ? " is-reader-offline" : "") +
      (d.gateway_status === "offline" ? " is-gateway-offline" : "");
    li.querySelector(".state").textContent = label("state-" + state, state);
    li.querySelector(".since").textContent = d.since_local ? label("since", "{ts}").replace("{ts}", d.since_local) : "";
    li.querySelector(".last").textContent = lastAccess(d.last_access);
    li.classList.add("changed");
    window.setTimeout(function () { li.classList.remove("changed"); }, 1500);
  }

  function commandText(c) {
    var text = label("cmd-" + clean(c.status), c.status);
    return c.detail ? text + " (" + c.detail + ")" : text;
  }

  function setCommand(c) {
    if (!c || typeof c.id !== "string") { return; }
    var li = card(c.key);
    var out = li && li.querySelector(".unlock-result");
    if (out) {
      var current = out.getAttribute("data-command") || "";
      if (current === "" || c.id >= current) {  // ids are time-ordered (ULID): show the newest order
        out.setAttribute("data-command", c.id);
        out.setAttribute("data-status", clean(c.status));
        out.className = "unlock-result cmd-" + clean(c.status);
        out.textContent = commandText(c);
      }
    }
    if (!commands) { return; }
    var row = commands.querySelector('tr[data-id="' + clean(c.id) + '"]');
    if (!row) {
      row = document.createElement("tr");
      row.setAttribute("data-id", c.id);
      ["sent_local", "key", "by", "reason", "status"].forEach(function (k) {
        var td = document.createElement("td");
        if (k === "status") { td.className = "status"; } else { td.textContent = c[k] || ""; }
        row.appendChild(td);
      });
      commands.insertBefore(row, commands.firstElementChild);
    }
    row.className = "cmd-" + clean(c.status);
    row.querySelector(".status").textContent = commandText(c);
  }

  function setGateway(m) {
    var items = list.querySelectorAll("li.door");
    for (var i = 0; i < items.length; i++) {
      if (items[i].getAttribute("data-gateway") === m.gateway) {
        items[i].classList.toggle("is-gateway-offline", m.status === "offline");
      }
    }
  }

  function resync() {
    fetch("/api/doors", { credentials: "same-origin" }).then(function (r) {
      if (r.status === 401 || r.status === 403) {
        window.location.href = "/login?next=" + encodeURIComponent("/doors");
        return null;
      }
      return r.ok ? r.json() : null;
    }).then(function (body) {
      if (body && body.doors) { body.doors.forEach(setDoor); }
    }).catch(function () { /* the network is down: the socket retries */ });
  }

  function connect() {
    setConn(failures ? "offline" : "connecting");
    var proto = window.location.protocol === "https:" ? "wss:" : "ws:";
    var ws;
    try { ws = new WebSocket(proto + "//" + window.location.host + "/ws"); } catch (err) { schedule(); return; }
    ws.onopen = function () {
      delay = 500;
      if (failures) { resync(); }  // what changed while the socket was down
      failures = 0;
      setConn("online");
    };
    ws.onmessage = function (m) {
      var msg;
      try { msg = JSON.parse(m.data); } catch (err) { return; }
      if (msg.kind === "door") { setDoor(msg.door); }
      else if (msg.kind === "unlock") { setCommand(msg.command); }
      else if (msg.kind === "status") { setGateway(msg); }
    };
    ws.onclose = function () { setConn("offline"); schedule(); };
  }

  function schedule() {
    failures += 1;
    var wait = delay / 2 + Math.random() * delay / 2;
    delay = Math.min(delay * 2, 15000);
    window.setTimeout(connect, wait);
  }

  list.addEventListener("submit", function (e) {
    var form = e.target;
    if (!form.classList || !form.classList.contains("unlock-form")) { return; }
    e.preventDefault();
    var li = form.closest("li.door");
    var out = li.querySelector(".unlock-result");
    var input = form.querySelector(".reason");
    var reason = input.value.trim();
    if (!reason) {
      out.className = "unlock-result cmd-failed";
      out.textContent = label("reason-required");
      input.focus();
      return;
    }
    var button = form.querySelector("button");
    button.disabled = true;
    fetch(form.getAttribute("data-url"), {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": token },
      body: JSON.stringify({ reason: reason }),
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (body) { return { status: r.status, body: body }; });
    }).then(function (res) {
      button.disabled = false;
      if (res.body && res.body.command) {
        setCommand(res.body.command);
        input.value = "";
        var details = form.closest("details");
        if (details) { details.open = false; }
      } else {
        out.className = "unlock-result cmd-failed";
        out.textContent = res.status === 400 ? label("reason-required") : label("error") + " (HTTP " + res.status + ")";
      }
    }).catch(function () {
      button.disabled = false;
      out.className = "unlock-result cmd-failed";
      out.textContent = label("error");
    });
  });

  connect();
})();
