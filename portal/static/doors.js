// The door list: live door state over the console WebSocket, and remote unlock with a reason.
// Messages: {kind: "door", door: {...}} (a door changed), {kind: "unlock", command: {...}} (a remote unlock
// was sent or answered), {kind: "status", gateway, status} (a gateway went on- or offline).
(function () {
  "use strict";
  var list = document.getElementById("doors");
  var labels = document.getElementById("labels");
  var tpl = document.getElementById("door-template");
  var commands = document.querySelector("#commands tbody");
  if (!list || !labels || !window.GH) { return; }
  var token = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  function label(name, fallback) {
    var v = labels.getAttribute("data-" + name);
    return v == null ? (fallback == null ? name : fallback) : v;
  }
  function clean(s) { return String(s == null ? "" : s).replace(/[^a-z0-9_-]/gi, ""); }



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
    var why = li.querySelector(".door-why");
    if (why) {
      why.setAttribute("data-silent", clean(d.silent));
      why.setAttribute("data-door", d.door || "");
      why.setAttribute("data-gw", d.gateway_name || d.gateway || "");
      why.textContent = d.silent ? label("silent-" + clean(d.silent), "").replace("{gw}", d.gateway_name || d.gateway)
        .replace("{door}", d.door || "") : "";
    }
    li.classList.add("changed");
    window.setTimeout(function () { li.classList.remove("changed"); }, 1500);
  }

  // A command's door by its label and its sender as people say it ("保安 bob"), as the page's own rows show them.
  function shown(k, c) {
    if (k === "key") {
      var li = card(c.key);
      var name = li && li.querySelector(".name");
      return name ? name.textContent : c.door;
    }
    if (k === "by") {
      var parts = String(c.by || "").split(":");
      var role = labels.getAttribute("data-role-" + clean(parts[0]));
      return role && parts.length > 1 ? role + " " + parts.slice(1).join(":") : c.by;
    }
    return c[k];
  }

  function commandText(c) {
    if (c.status === "failed" && c.detail) {  // a known reason, worded: "开门失败：继电器未动作"
      var failed = labels.getAttribute("data-fail-" + clean(c.detail));
      if (failed != null) { return failed; }
    }
    var text = label("cmd-" + clean(c.status), c.status);
    return c.detail && c.status !== "opened" ? text + " (" + c.detail + ")" : text;  // "门已打开" says it all
  }

  // The socket can tell a command's outcome before the POST that sent it answers "pending": an order never goes back.
  var settled = {};

  function setCommand(c) {
    if (!c || typeof c.id !== "string") { return; }
    if (c.status === "pending" && settled[c.id]) { return; }
    if (c.status !== "pending") { settled[c.id] = true; }
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
        if (k === "status") { td.className = "status"; } else { td.textContent = shown(k, c) || ""; }
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
        var why = items[i].querySelector(".door-why");
        if (why && why.getAttribute("data-silent") === "gateway" && m.status !== "unknown") {  // it reports now
          why.setAttribute("data-silent", "door");
          why.textContent = label("silent-door", "").replace("{gw}", why.getAttribute("data-gw") || "").replace("{door}",
            why.getAttribute("data-door") || "");
        }
      }
    }
  }

  // Doors the socket told while a resync's answer was on its way: that answer may be older, so it leaves them be.
  var toldDuring = [];

  function resync() {
    var told = {};
    toldDuring.push(told);
    var done = function () { toldDuring.splice(toldDuring.indexOf(told), 1); };
    fetch("/api/doors", { credentials: "same-origin" }).then(function (r) {
      if (r.status === 401 || r.status === 403) {
        window.location.href = "/login?next=" + encodeURIComponent("/doors");
        return null;
      }
      return r.ok ? r.json() : null;
    }).then(function (body) {
      if (body && body.doors) { body.doors.forEach(function (d) { if (!told[d.key]) { setDoor(d); } }); }
    }).catch(function () { /* the network is down: the socket retries */ }).then(done);
  }

  window.GH.on("open", function (x) { if (x.reconnected) { resync(); } });  // what changed while it was down
  window.GH.on("door", function (m) {
    if (m.door) { toldDuring.forEach(function (told) { told[m.door.key] = true; }); }
    setDoor(m.door);
  });
  window.GH.on("unlock", function (m) { setCommand(m.command); });
  window.GH.on("status", setGateway);

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

})();
