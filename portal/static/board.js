// The guard's alarm board (and the live site map page): incidents over the console shell's WebSocket
// (console-shell.js, which also rings and shows the banner on every page), the workflow buttons, the checklist,
// acknowledging a zone's or a kind's alarms together, the flat's numbers to call, arm/disarm of zone groups.
// Every change arrives from the server as {"kind": "incident" | "group" | "arm_command" | "door", ...};
// an incident carries a version, so an older copy never overwrites a newer one.
(function () {
  "use strict";
  var cfgEl = document.getElementById("board-config");
  if (!cfgEl || !window.GH) { return; }
  var GH = window.GH;
  var cfg = JSON.parse(cfgEl.textContent);
  var T = cfg.t || {};
  var lang = cfg.lang;
  var list = document.getElementById("incidents");
  var closedList = document.getElementById("closed");
  var bulkEl = document.getElementById("bulk");
  var toastEl = document.getElementById("toast");
  var groupsEl = document.getElementById("groups");
  var commandsEl = document.getElementById("commands");
  var maps = document.querySelectorAll("svg.sitemap");

  var incidents = {};  // open incidents by id
  var closed = {};     // recently closed, by id
  var groups = {};     // "site/gateway/group" -> group
  var commands = {};   // command id -> command
  var required = {};   // kinds whose checklist must be complete before resolving
  (cfg.required || []).forEach(function (k) { required[k] = true; });
  var newest = 0;      // the newest incident id on this board (what a bulk acknowledgement covers)

  function t(key, kw) {
    var s = Object.prototype.hasOwnProperty.call(T, key) ? T[key] : key;
    if (kw) { Object.keys(kw).forEach(function (k) { s = s.split("{" + k + "}").join(String(kw[k])); }); }
    return s;
  }

  var fmt = null;
  try {
    fmt = new Intl.DateTimeFormat("sv-SE", { timeZone: cfg.tz, year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  } catch (err) { fmt = null; }

  function localTime(ts) {
    if (!ts) { return ""; }
    var d = new Date(String(ts).slice(0, 23) + "Z");
    if (isNaN(d.getTime()) || !fmt) { return String(ts); }
    return fmt.format(d).replace("T", " ");
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text != null) { e.textContent = String(text); }
    return e;
  }

  function toast(msg) {
    if (!toastEl) { return; }
    toastEl.textContent = msg;
    toastEl.hidden = false;
    window.clearTimeout(toast.timer);
    toast.timer = window.setTimeout(function () { toastEl.hidden = true; }, 5000);
  }

  function post(url, body) { return GH.post(url, body); }

  function signedOut(status) {
    if (status === 401) { GH.sessionEnded(); return true; }
    if (status === 403) {
      window.location.href = "/login?next=" + encodeURIComponent(window.location.pathname);
      return true;
    }
    return false;
  }

  // ------------------------------------------------------------ incidents

  function byBoardOrder(a, b) {
    if (a.priority !== b.priority) { return b.priority - a.priority; }
    if (a.opened_at !== b.opened_at) { return a.opened_at < b.opened_at ? 1 : -1; }
    return b.id - a.id;
  }

  function act(id, action, extra) {
    return post("/api/incidents/" + id + "/" + action, extra).then(function (res) {
      if (res.status === 200 && res.body.incident) { upsert(res.body.incident); return true; }
      if (signedOut(res.status)) { return false; }
      if (res.status === 409) {
        var b = res.body || {};
        if (b.incident) { upsert(b.incident); }
        if (action === "ack" && b.owner) { toast(t("board.taken", { name: b.owner })); }
        else if (b.winner && b.winner.actor) {
          toast(t("board.first", { name: b.winner.actor, state: t("state." + b.state) }));
        } else { toast(t("board.conflict", { state: t("state." + b.state) })); }
      } else if (res.status === 400) {
        toast((res.body && res.body.message) || t("board.error"));
      } else {
        toast(t("board.error") + " (" + res.status + ")");
      }
      return false;
    }, function () { toast(t("board.error")); return false; });
  }

  function buildCard(inc) {
    var li = el("li", "incident");
    li.setAttribute("data-id", String(inc.id));
    var head = el("div", "head");
    head.appendChild(el("span", "badge"));
    head.appendChild(el("span", "title"));
    head.appendChild(el("span", "where"));
    head.appendChild(el("span", "tag count"));
    head.appendChild(el("span", "tag trips"));
    head.appendChild(el("time", "ts"));
    li.appendChild(head);
    var status = el("div", "status");
    status.appendChild(el("span", "state-label"));
    status.appendChild(el("span", "tag owner"));
    status.appendChild(el("span", "tag dispatched"));
    status.appendChild(el("span", "tag restored", t("board.restored")));
    status.appendChild(el("span", "tag esc", t("board.escalated")));
    status.appendChild(el("span", "tag bulk-one"));
    status.appendChild(el("span", "tag grid"));
    li.appendChild(status);

    var actions = el("div", "actions");
    var ack = el("button", "ack primary", t("board.ack"));
    ack.type = "button";
    ack.setAttribute("data-act", "ack");
    actions.appendChild(ack);
    var guard = el("input", "guard");
    guard.setAttribute("list", "guard-names");
    guard.setAttribute("maxlength", "40");
    guard.placeholder = t("board.guard_placeholder");
    guard.setAttribute("aria-label", t("board.guard_placeholder"));
    actions.appendChild(guard);
    var dispatch = el("button", "dispatch", t("board.dispatch"));
    dispatch.type = "button";
    dispatch.setAttribute("data-act", "dispatch");
    actions.appendChild(dispatch);
    var onScene = el("button", "on-scene", t("board.on_scene"));
    onScene.type = "button";
    onScene.setAttribute("data-act", "on_scene");
    actions.appendChild(onScene);
    var finish = el("span", "finish");
    (cfg.flags || []).forEach(function (f) {
      var label = el("label", "flag");
      var box = el("input", "flag");
      box.type = "checkbox";
      box.value = f;
      box.setAttribute("data-flag", f);
      label.appendChild(box);
      label.appendChild(document.createTextNode(" " + t("flag." + f)));
      finish.appendChild(label);
    });
    finish.appendChild(el("span", "finish-label", t("board.finish_as")));
    (cfg.causes || []).forEach(function (c) {
      var b = el("button", "finish-" + c, t("cause." + c));
      b.type = "button";
      b.setAttribute("data-act", "finish");
      b.setAttribute("data-cause", c);
      finish.appendChild(b);
    });
    finish.appendChild(el("span", "need-checks", t("board.need_checks")));
    actions.appendChild(finish);
    var close = el("button", "close primary", t("board.close"));
    close.type = "button";
    close.setAttribute("data-act", "close");
    actions.appendChild(close);
    li.appendChild(actions);

    var checklist = el("ol", "checklist");
    checklist.setAttribute("aria-label", t("board.checklist"));
    li.appendChild(checklist);

    var noteRow = el("div", "note-row");
    var note = el("input", "note");
    note.setAttribute("maxlength", "1000");
    note.placeholder = t("board.note_placeholder");
    note.setAttribute("aria-label", t("board.note_placeholder"));
    noteRow.appendChild(note);
    var addNote = el("button", "add-note", t("board.note"));
    addNote.type = "button";
    addNote.setAttribute("data-act", "note");
    noteRow.appendChild(addNote);
    var more = el("button", "more", t("board.details"));
    more.type = "button";
    noteRow.appendChild(more);
    li.appendChild(noteRow);
    var detail = el("div", "detail");
    detail.hidden = true;
    li.appendChild(detail);

    li.addEventListener("click", function (ev) {
      var target = ev.target;
      if (!(target instanceof HTMLElement)) { return; }
      var id = li.getAttribute("data-id");
      if (target === more) { toggleDetail(li, id); return; }
      if (target.classList.contains("reveal")) { reveal(li, id, target); return; }
      if (target.classList.contains("bulk-zone")) { ackMany({ zone: target.getAttribute("data-zone") }); return; }
      var a = target.getAttribute("data-act");
      if (!a) { return; }
      var extra = {};
      if (a === "dispatch") {
        extra.guard = guard.value.trim();
        if (!extra.guard) { toast(t("board.need_guard")); guard.focus(); return; }
        var seen = incidents[id] || {};
        extra.seen_guard = seen.dispatched_to || "";  // someone sent meanwhile by another guard: told, not replaced
      }
      if (a === "finish") {
        extra.cause = target.getAttribute("data-cause");
        extra.flags = Array.prototype.filter.call(li.querySelectorAll("input.flag"), function (b) { return b.checked; })
          .map(function (b) { return b.value; });
      }
      if (a === "note") { extra.text = note.value.trim(); if (!extra.text) { toast(t("board.need_note")); note.focus(); return; } }
      target.disabled = true;
      act(id, a, extra).then(function (ok) {
        target.disabled = false;
        if (ok && a === "note") { note.value = ""; }
        if (ok && !detail.hidden) { loadDetail(li, id); }
      });
    });
    li.addEventListener("change", function (ev) {
      var target = ev.target;
      if (!(target instanceof HTMLInputElement) || target.type !== "checkbox" || target.classList.contains("flag")) {
        return;
      }
      // Until its answer, an update of the card (another step's answer, an event) must not undo the tick.
      target.setAttribute("data-pending", "1");
      act(li.getAttribute("data-id"), "check", { step: parseInt(target.getAttribute("data-step"), 10),
        done: target.checked }).then(function (ok) {
        target.removeAttribute("data-pending");
        if (!ok) { target.checked = !target.checked; }
      });
    });
    return li;
  }

  function setText(root, sel, text) {
    var e = root.querySelector(sel);
    if (e) { e.textContent = text == null ? "" : String(text); }
  }

  function show(root, sel, on) {
    var items = root.querySelectorAll(sel);
    for (var i = 0; i < items.length; i++) { items[i].hidden = !on; }
  }

  function updateCard(li, inc) {
    var st = inc.state;
    var mine = inc.owner && inc.owner === cfg.user;
    li.className = "incident prio-" + String(inc.level).replace(/[^a-z]/g, "") + " state-" + st +
      (inc.escalated_at ? " escalated" : "") + (inc.restored_at ? " restored" : "") + (mine ? " mine" : "");
    li.setAttribute("data-state", st);
    li.setAttribute("data-version", String(inc.version));
    li.setAttribute("data-owner", inc.owner || "");
    li.setAttribute("data-kind", inc.kind);
    setText(li, ".badge", t("kind." + inc.kind));
    setText(li, ".title", (inc.title && (inc.title[lang] || inc.title["zh-CN"])) || inc.type);
    setText(li, ".where", (inc.where && (inc.where[lang] || inc.where["zh-CN"])) || "");
    setText(li, ".ts", localTime(inc.opened_at));
    setText(li, ".count", t("board.count", { n: inc.count }));
    show(li, ".count", inc.count > 1 && !(inc.trips > 1));
    setText(li, ".trips", inc.trips > 1 ? t("board.trips", { n: inc.trips, first: localTime(inc.opened_at).slice(11),
      last: localTime(inc.last_event_at).slice(11) }) : "");
    show(li, ".trips", inc.trips > 1);
    li.setAttribute("data-trips", String(inc.trips || 1));
    setText(li, ".state-label", t("state." + st));
    var owner = li.querySelector(".owner");
    owner.textContent = inc.owner ? (mine ? t("board.owner_you") : t("board.owner", { name: inc.owner })) : "";
    owner.classList.toggle("mine", !!mine);
    owner.hidden = !inc.owner;
    setText(li, ".dispatched", inc.dispatched_to ? t("board.dispatched_to", { name: inc.dispatched_to }) : "");
    show(li, ".dispatched", !!inc.dispatched_to);
    show(li, ".restored", !!inc.restored_at);
    show(li, ".esc", !!inc.escalated_at);
    setText(li, ".esc", escalationText(inc));
    var g = inc.grid;
    setText(li, ".grid", g ? gridText(g) : "");
    show(li, ".grid", !!g);
    li.setAttribute("data-grid", g ? (g.status || g.delivery) : "");
    li.setAttribute("data-zone", zoneOf(inc));
    show(li, "[data-act=ack]", st === "new");
    show(li, "input.guard, [data-act=dispatch]", st === "acknowledged" || st === "dispatched");
    show(li, "[data-act=on_scene]", st === "dispatched");
    var working = st === "acknowledged" || st === "dispatched" || st === "on_scene";
    var steps0 = (cfg.checklists || {})[inc.kind] || [];
    var ticked = Object.keys(inc.checks || {}).length;
    var blocked = !!required[inc.kind] && ticked < steps0.length;
    show(li, ".finish", working);
    show(li, ".need-checks", working && blocked);
    var fins = li.querySelectorAll("[data-act=finish]");
    for (var f = 0; f < fins.length; f++) { fins[f].disabled = blocked; }
    li.classList.toggle("needs-checks", blocked);
    show(li, "[data-act=close]", st === "resolved");
    show(li, ".note-row input, .note-row [data-act=note]", st !== "closed");
    var steps = (cfg.checklists || {})[inc.kind] || [];
    var ol = li.querySelector(".checklist");
    if (ol.children.length !== steps.length) {
      ol.textContent = "";
      steps.forEach(function (text, i) {
        var item = el("li");
        var label = el("label");
        var box = el("input");
        box.type = "checkbox";
        box.setAttribute("data-step", String(i));
        label.appendChild(box);
        label.appendChild(document.createTextNode(" " + text));
        item.appendChild(label);
        item.appendChild(el("span", "by"));
        ol.appendChild(item);
      });
    }
    var checks = inc.checks || {};
    for (var i = 0; i < ol.children.length; i++) {
      var c = checks[String(i)];
      var box2 = ol.children[i].querySelector("input");
      if (!box2.hasAttribute("data-pending")) { box2.checked = !!c; }
      box2.disabled = st === "closed";
      ol.children[i].classList.toggle("done", !!c);
      setText(ol.children[i], ".by", c ? c.by + " " + localTime(c.at).slice(11) : "");
    }
    ol.hidden = st === "new" || steps.length === 0;
  }

  function toggleDetail(li, id) {
    var detail = li.querySelector(".detail");
    detail.hidden = !detail.hidden;
    if (!detail.hidden) { loadDetail(li, id); }
  }

  function loadDetail(li, id) {
    fetch("/api/incidents/" + id, { credentials: "same-origin" }).then(function (r) {
      if (signedOut(r.status) || !r.ok) { return null; }
      return r.json();
    }).then(function (body) {
      if (!body) { return; }
      var detail = li.querySelector(".detail");
      detail.textContent = "";
      var addr = el("p", "address");
      addr.appendChild(el("strong", null, t("board.address") + ": "));
      addr.appendChild(document.createTextNode(body.address || ""));
      detail.appendChild(addr);
      (body.sections || []).forEach(function (sec) { detail.appendChild(section(sec)); });
      if (body.residents !== null && body.residents !== undefined) {
        detail.appendChild(el("strong", null, t("board.residents")));
        var ul = el("ul", "residents");
        if (!body.residents.length) { ul.appendChild(el("li", "none", t("board.no_residents"))); }
        body.residents.forEach(function (r) {
          ul.appendChild(el("li", "resident", r.name + " · " + t("board.resident_role." + r.role) + " · " + r.phone));
        });
        detail.appendChild(ul);
        if (body.residents.length) {
          var row = el("div", "reveal-row");
          var why = el("select", "reveal-reason");
          why.setAttribute("aria-label", t("board.reveal_reason"));
          ["callback", "verify", "emergency"].forEach(function (k) {
            why.appendChild(el("option", null, t("board.reveal." + k))).value = t("board.reveal." + k);
          });
          row.appendChild(why);
          var rb = el("button", "reveal", t("board.reveal_button"));
          rb.type = "button";
          row.appendChild(rb);
          detail.appendChild(row);
        }
      }
      detail.appendChild(el("strong", null, t("board.log")));
      var ol = el("ol", "log");
      (body.log || []).forEach(function (e) {
        ol.appendChild(el("li", "log-" + e.action, localTime(e.at) + " · " + actor(e.actor) + " · " +
          t("board.action." + e.action) + (e.detail ? " · " + logDetail(e) : "")));
      });
      detail.appendChild(ol);
    });
  }

  // A log line's detail in words: the gateway's "count 3", "restored", "cleared by bob", a fold's trip number.
  function logDetail(e) {
    var d = String(e.detail || ""), m;
    if ((m = /^count (\d+)$/.exec(d))) { return t("board.count", { n: m[1] }); }
    if (e.action === "trip" && /^\d+$/.test(d)) { return t("board.trip_n", { n: d }); }
    if (e.action === "notify" && (m = /^(\S+): (pending|delivered|failed)(?: after (\d+) attempts)?/.exec(d))) {
      var channel = (cfg.channels && cfg.channels[m[1]]) || m[1];  // the details are on the notifications page
      return t("board.notify_" + m[2], { channel: channel, n: m[3] || "1" });
    }
    if (e.action === "restore" && (m = /^(restored|cleared)(?: by (.+))?$/.exec(d))) {
      return t("board.how." + m[1]) + (m[2] ? " · " + actor(m[2]) : "");
    }
    return d;
  }

  // A section another part of the portal adds to the detail (a care household's context): rows of label and
  // value, and numbers kept masked until the guard reveals them with a reason (audited by the server).
  function section(sec) {
    var box = el("section", "context context-" + String(sec.key || "").replace(/[^a-z_-]/g, ""));
    box.appendChild(el("strong", null, sec.title || ""));
    var dl = el("dl", "rows");
    var fill = function (rows) {
      dl.textContent = "";
      (rows || []).forEach(function (r) {
        dl.appendChild(el("dt", null, r[0]));
        var dd = el("dd");
        if (r[2] === "tel") {
          var a = el("a", "call", r[1]);
          a.href = "tel:" + r[1];
          dd.appendChild(a);
        } else {
          dd.textContent = r[1] == null ? "" : String(r[1]);
        }
        dl.appendChild(dd);
      });
    };
    fill(sec.rows);
    box.appendChild(dl);
    if (sec.reveal && sec.reveal.url) {
      var row = el("div", "reveal-row");
      var why = el("select", "reveal-reason");
      why.setAttribute("aria-label", t("board.reveal_reason"));
      ["callback", "verify", "emergency"].forEach(function (k) {
        why.appendChild(el("option", null, t("board.reveal." + k))).value = t("board.reveal." + k);
      });
      row.appendChild(why);
      var rb = el("button", "reveal-section", sec.reveal.label || t("board.reveal_button"));
      rb.type = "button";
      rb.addEventListener("click", function () {
        rb.disabled = true;
        post(sec.reveal.url, { reason: why.value }).then(function (res) {
          rb.disabled = false;
          if (signedOut(res.status)) { return; }
          if (res.status !== 200) { toast((res.body && res.body.message) || t("board.error")); return; }
          fill(res.body.rows);
          if (row.parentNode) { row.parentNode.removeChild(row); }
        }, function () { rb.disabled = false; toast(t("board.error")); });
      });
      row.appendChild(rb);
      box.appendChild(row);
    }
    return box;
  }

  function zoneOf(inc) {
    var place = inc.place || {}, data = inc.data || {};
    var name = place.zone || data.zone || place.door || ((inc.device || "") + ":" + (inc.point || ""));
    return inc.site + "/" + name;
  }

  function gridText(g) {
    // The incident's report to the grid platform: the platform's status with who and when, else the delivery.
    if (g.status) {
      return t("board.grid", { state: t("grid.status." + g.status) + (g.by ? " · " + g.by : "") + " " +
        localTime(g.at).slice(5, 16) });
    }
    return t("board.grid", { state: t("board.grid_" + g.delivery) });
  }

  function escalationText(inc) {
    if (!inc.escalated_at) { return ""; }
    var notices = inc.notices || [];
    if (!notices.length) { return t("board.escalated_none"); }
    var parts = notices.map(function (n) {
      if (n.state === "delivered") { return t("board.notice_ok", { name: n.label, at: localTime(n.at).slice(11) }); }
      if (n.state === "failed") { return t("board.notice_failed", { name: n.label }); }
      return t("board.notice_pending", { name: n.label });
    });
    return t("board.escalated_prefix") + " · " + parts.join(t("punct.comma"));
  }

  function reveal(li, id, button) {
    var why = li.querySelector(".reveal-reason");
    button.disabled = true;
    post("/api/incidents/" + id + "/phones", { reason: why ? why.value : "" }).then(function (res) {
      button.disabled = false;
      if (signedOut(res.status)) { return; }
      if (res.status !== 200) { toast((res.body && res.body.message) || t("board.error")); return; }
      var ul = li.querySelector(".detail .residents");
      if (!ul) { return; }
      ul.textContent = "";
      (res.body.residents || []).forEach(function (r) {
        var item = el("li", "resident revealed", r.name + " · " + t("board.resident_role." + r.role) + " · ");
        var a = el("a", "call", r.phone);
        a.href = "tel:" + r.phone;
        item.appendChild(a);
        ul.appendChild(item);
      });
      var row = li.querySelector(".reveal-row");
      if (row) { row.parentNode.removeChild(row); }
    }, function () { button.disabled = false; toast(t("board.error")); });
  }

  function ackMany(what) {
    var body = { upto: newest };
    if (what.kind) { body.kind = what.kind; } else { body.zone = what.zone; }
    if (cfg.site) { body.site = cfg.site; }  // one estate's board: its alarms only, as its button counted
    post("/api/board/ack", body).then(function (res) {
      if (signedOut(res.status)) { return; }
      if (res.status !== 200) { toast((res.body && res.body.message) || t("board.error")); return; }
      (res.body.incidents || []).forEach(upsert);
      toast(t("board.acked_many", { n: (res.body.incidents || []).length }));
    }, function () { toast(t("board.error")); });
  }

  function zoneButtons() {
    if (!list) { return; }
    var per = {};
    Object.keys(incidents).forEach(function (k) {
      if (incidents[k].state === "new") { var z = zoneOf(incidents[k]); per[z] = (per[z] || 0) + 1; }
    });
    Array.prototype.forEach.call(list.children, function (li) {
      var inc = incidents[li.getAttribute("data-id")];
      var bz = li.querySelector(".bulk-one");
      if (!inc || !bz) { return; }
      var n = inc.state === "new" ? per[zoneOf(inc)] || 0 : 0;
      var bb = bz.querySelector("button");
      if (n > 1) {
        if (!bb) {
          bb = el("button", "bulk-zone");
          bb.type = "button";
          bz.appendChild(bb);
        }
        bb.setAttribute("data-zone", zoneOf(inc));
        bb.textContent = t("board.ack_zone", { n: n });
      } else if (bb) {
        bz.removeChild(bb);
      }
      bz.hidden = n <= 1;
    });
  }

  function renderBulk() {
    zoneButtons();
    if (!bulkEl) { return; }
    var byKind = {};
    Object.keys(incidents).forEach(function (k) {
      var i = incidents[k];
      if (i.state === "new") { byKind[i.kind] = (byKind[i.kind] || 0) + 1; }
    });
    bulkEl.textContent = "";
    var kinds = Object.keys(byKind).filter(function (k) { return byKind[k] > 1; }).sort();
    kinds.forEach(function (k) {
      var b = el("button", "bulk-kind", t("board.ack_kind", { kind: t("kind." + k), n: byKind[k] }));
      b.type = "button";
      b.setAttribute("data-kind", k);
      b.addEventListener("click", function () { ackMany({ kind: k }); });
      bulkEl.appendChild(b);
    });
    bulkEl.hidden = !kinds.length;
  }

  // Incidents the socket told while a snapshot was on its way, one record per snapshot asked for: the answer may have
  // been read before they were stored (on PostgreSQL with several instances, an incident can commit after one with
  // a higher id), so they are kept whatever their id.
  var toldDuring = [];

  function upsert(inc) {
    if (!inc || typeof inc.id !== "number") { return; }
    newest = Math.max(newest, inc.id);
    toldDuring.forEach(function (told) { told[inc.id] = true; });
    var known = incidents[inc.id] || closed[inc.id];
    if (known && known.version > inc.version) { return; }
    if (inc.state === "closed") {
      delete incidents[inc.id];
      closed[inc.id] = inc;
    } else {
      incidents[inc.id] = inc;
      delete closed[inc.id];
    }
    if (list) { renderLists(inc); }
    refresh();
  }

  function findCard(root, id) {
    return root ? root.querySelector('li.incident[data-id="' + id + '"]') : null;
  }

  function renderLists(changed) {
    var id = changed ? changed.id : null;
    if (changed) {
      var inOpen = findCard(list, id);
      var inClosed = findCard(closedList, id);
      if (changed.state === "closed") {
        if (inOpen) { inOpen.parentNode.removeChild(inOpen); }
        if (closedList) {
          var card = inClosed || buildCard(changed);
          updateCard(card, changed);
          if (!inClosed) { closedList.insertBefore(card, closedList.firstChild); }
          while (closedList.children.length > 20) { closedList.removeChild(closedList.lastElementChild); }
        }
      } else {
        if (inClosed) { inClosed.parentNode.removeChild(inClosed); }
        var card2 = inOpen || buildCard(changed);
        updateCard(card2, changed);
        if (!inOpen) { list.appendChild(card2); }
      }
    }
    var order = Object.keys(incidents).map(function (k) { return incidents[k]; }).sort(byBoardOrder);
    var current = Array.prototype.map.call(list.children, function (c) { return c.getAttribute("data-id"); });
    var wanted = order.map(function (i) { return String(i.id); });
    if (current.join(",") !== wanted.join(",")) {
      // Only the cards out of place move: a card moved loses the focus of what the guard is typing in it (a note,
      // a name, mid-way through an IME's composition), so a new alarm on top must not move the others.
      var at = list.firstElementChild;
      wanted.forEach(function (wid) {
        var c = findCard(list, wid);
        if (!c) { return; }
        if (c === at) { at = at.nextElementSibling; return; }
        list.insertBefore(c, at);
      });
    }
  }

  function resetAll(body, told) {
    // The socket may already have delivered something newer than this answer: keep the higher version,
    // and keep what the socket told while the answer was on its way and the answer does not have.
    var oldOpen = incidents;
    var oldClosed = closed;
    var fetched = (body.incidents || []).concat(body.closed || []);
    incidents = {};
    closed = {};
    fetched.forEach(function (i) {
      newest = Math.max(newest, i.id);
      var mine = oldOpen[i.id] || oldClosed[i.id];
      var best = mine && mine.version > i.version ? mine : i;
      if (best.state === "closed") { closed[best.id] = best; } else { incidents[best.id] = best; }
    });
    Object.keys(told).forEach(function (k) {
      if (incidents[k] || closed[k]) { return; }
      if (oldOpen[k]) { incidents[k] = oldOpen[k]; } else if (oldClosed[k]) { closed[k] = oldClosed[k]; }
    });
    if (list) {
      Array.prototype.slice.call(list.children).forEach(function (c) {
        if (!incidents[c.getAttribute("data-id")]) { list.removeChild(c); }
      });
      Object.keys(incidents).forEach(function (k) {
        var card = findCard(list, k) || buildCard(incidents[k]);
        updateCard(card, incidents[k]);
        if (!card.parentNode) { list.appendChild(card); }
      });
      renderLists(null);
      if (closedList) {
        closedList.textContent = "";
        Object.keys(closed).map(function (k) { return closed[k]; }).sort(function (a, b) {
          return a.closed_at === b.closed_at ? b.id - a.id : (a.closed_at < b.closed_at ? 1 : -1);
        }).slice(0, 20).forEach(function (i) {
          var card = buildCard(i);
          updateCard(card, i);
          closedList.appendChild(card);
        });
      }
    }
    (body.groups || []).forEach(upsertGroup);
    (body.commands || []).slice().reverse().forEach(upsertCommand);
    refresh();
  }

  function refresh() {
    var n = Object.keys(incidents).length;
    var count = document.getElementById("open-count");
    if (count) { count.textContent = String(n); }
    var none = document.getElementById("none");
    if (none) { none.hidden = n > 0; }
    renderBulk();
    updateMaps();
  }

  // ------------------------------------------------------------ the site map

  function updateMaps() {
    for (var m = 0; m < maps.length; m++) {
      var svg = maps[m];
      var site = svg.getAttribute("data-site");
      var zones = {}, buildings = {}, houses = {}, doors = {}, markers = {};
      Object.keys(incidents).forEach(function (k) {
        var i = incidents[k];
        if (i.site !== site) { return; }
        var alarm = i.state === "new" || !i.restored_at;
        var mark = function (set, key) { if (key && set[key] !== "alarm") { set[key] = alarm ? "alarm" : "open"; } };
        mark(zones, i.place.zone || (i.data && i.data.zone));
        mark(buildings, i.place.building);
        if (alarm && i.place.building && i.place.house) {
          (houses[i.place.building] = houses[i.place.building] || []).push(i.place.house);
        }
        mark(doors, i.place.door);
        var ms = i.data && i.data.markers;
        if (Array.isArray(ms)) { ms.forEach(function (key) { if (typeof key === "string") { mark(markers, key); } }); }
      });
      var apply = function (sel, attr, base, states) {
        var items = svg.querySelectorAll(sel);
        for (var j = 0; j < items.length; j++) {
          var st = states[items[j].getAttribute(attr)];
          items[j].setAttribute("class", base + (st ? " " + st : ""));
        }
      };
      apply("[data-zone]", "data-zone", "zone", zones);
      apply("[data-building]", "data-building", "building", buildings);
      apply("[data-door]", "data-door", "door", doors);
      var ms = svg.querySelectorAll("[data-marker]");
      for (var q = 0; q < ms.length; q++) {
        var mst = markers[ms[q].getAttribute("data-marker")];
        ms[q].setAttribute("class", "marker " + (ms[q].getAttribute("data-kind") || "") + (mst ? " " + mst : ""));
      }
      var bs = svg.querySelectorAll("[data-building]");
      for (var b = 0; b < bs.length; b++) {
        var hs = (houses[bs[b].getAttribute("data-building")] || []).slice().sort();
        var txt = bs[b].querySelector(".houses");
        if (txt) {
          txt.textContent = hs.filter(function (h, n) { return hs.indexOf(h) === n; }).map(function (h) {
            return (T["place.house"] || "{v}").split("{v}").join(h);
          }).join(" ");
        }
      }
    }
  }

  function setDoor(d) {
    if (!d || typeof d.site !== "string" || typeof d.door !== "string") { return; }
    for (var m = 0; m < maps.length; m++) {
      if (maps[m].getAttribute("data-site") !== d.site) { continue; }
      var items = maps[m].querySelectorAll("[data-door]");
      for (var j = 0; j < items.length; j++) {
        if (items[j].getAttribute("data-door") === d.door) { items[j].setAttribute("data-state", String(d.state || "")); }
      }
    }
  }

  // ------------------------------------------------------------ arm / disarm

  function groupKey(g) { return g.site + "/" + g.gateway + "/" + g.group; }

  function upsertGroup(g) {
    if (!g || !groupsEl) { return; }
    var key = groupKey(g);
    var old = groups[key] || {};
    groups[key] = Object.assign({}, old, g);
    renderGroup(groups[key]);
  }

  function renderGroup(g) {
    var key = groupKey(g);
    var row = null;
    for (var i = 0; i < groupsEl.children.length; i++) {
      if (groupsEl.children[i].getAttribute("data-key") === key) { row = groupsEl.children[i]; }
    }
    if (!row) {
      row = el("li", "group");
      row.setAttribute("data-key", key);
      row.appendChild(el("span", "name"));
      row.appendChild(el("span", "gstate"));
      var buttons = el("span", "buttons");
      [["arm", "away", "arm.arm_away"], ["arm", "stay", "arm.arm_stay"], ["disarm", "", "arm.disarm"]].forEach(function (b) {
        var btn = el("button", b[0] + (b[1] ? " " + b[1] : ""), t(b[2]));
        btn.type = "button";
        btn.addEventListener("click", function () { sendArm(g, b[0], b[1], row); });
        buttons.appendChild(btn);
      });
      var force = el("label", "force");
      var box = el("input");
      box.type = "checkbox";
      force.appendChild(box);
      force.appendChild(document.createTextNode(" " + t("arm.force")));
      buttons.appendChild(force);
      row.appendChild(buttons);
      groupsEl.appendChild(row);
    }
    var state = g.state || "unknown";
    row.setAttribute("data-state", state);
    setText(row, ".name", g.label || g.group);
    row.querySelector(".name").title = g.group;
    var gs = row.querySelector(".gstate");
    gs.className = "gstate " + state;
    gs.textContent = t("arm." + state) + (g.mode && state !== "disarmed" ? " · " + t("arm.mode." + g.mode) : "");
    var none = document.getElementById("no-groups");
    if (none) { none.hidden = true; }
  }

  function sendArm(g, action, mode, row) {
    var force = row.querySelector(".force input");
    var body = { site: g.site, gateway: g.gateway, group: g.group, action: action };
    if (action === "arm") { body.mode = mode; body.force = !!(force && force.checked); }
    post("/api/board/arm", body).then(function (res) {
      if (signedOut(res.status)) { return; }
      if (res.body && res.body.command) { upsertCommand(res.body.command); }
      else { toast(t("board.error") + " (" + res.status + ")"); }
    }, function () { toast(t("board.error")); });
  }

  // A command's group by its label, as the arm panel names it.
  function groupName(c) {
    var group = (c.args && c.args.group) || "";
    var g = (cfg.groups || []).filter(function (x) { return x.group === group && x.site === c.site; })[0];
    return (g && g.label) || group;
  }

  // Who sent it, as people say it ("保安 bob"): the shell's role names.
  function actor(by) {
    var s = String(by || ""), i = s.indexOf(":");
    if (s === "gateway:portal") { return t("actor.phone"); }  // raised by the portal: a resident's phone
    if (i < 0) { return T.hasOwnProperty("actor." + s) ? t("actor." + s) : s; }
    var kind = s.slice(0, i), who = s.slice(i + 1);
    if (T.hasOwnProperty("role." + kind)) { return t("role." + kind) + " " + who; }
    if (kind === "gateway" && cfg.gateway_names && cfg.gateway_names[who]) { who = cfg.gateway_names[who]; }
    return T.hasOwnProperty("actor." + kind) ? t("actor." + kind, { v: who }) : s;
  }

  function upsertCommand(c) {
    if (!c || !commandsEl) { return; }
    commands[c.id] = c;
    var row = commandsEl.querySelector('li[data-id="' + c.id + '"]');
    if (!row) {
      row = el("li", "command");
      row.setAttribute("data-id", c.id);
      commandsEl.insertBefore(row, commandsEl.firstChild);
      while (commandsEl.children.length > 20) { commandsEl.removeChild(commandsEl.lastElementChild); }
    }
    row.setAttribute("data-status", c.status);
    row.textContent = "";
    row.appendChild(el("time", null, localTime(c.sent_at).slice(11)));
    row.appendChild(document.createTextNode(" " + t("arm.cmd." + c.type) + " " + groupName(c) +
      (c.args && c.args.mode ? " (" + t("arm.mode." + c.args.mode) + ")" : "") + " · " + actor(c.by) + " · "));
    row.appendChild(el("span", "st st-" + c.status, t("arm.status." + c.status)));
    if (c.detail) { row.appendChild(el("span", "detail", " " + c.detail)); }
  }

  // ------------------------------------------------------------ the shell's socket

  // The centre's drill-down (/board?site=...): one estate's board; the shell still rings for every estate.
  function mine(x) { return !cfg.site || (x && x.site === cfg.site); }

  // What is open, asked for when the page starts (a socket that cannot connect, say behind a proxy that refuses
  // WebSockets, must not leave the board empty) and whenever the socket opens; an answer that fails is asked for
  // again, 1 s, 2 s ... 30 s later, until one comes.
  var retries = 0;
  var retryTimer = null;

  function load() {
    var url = "/api/board" + (cfg.site ? "?site=" + encodeURIComponent(cfg.site) : "");
    var told = {};
    toldDuring.push(told);
    var done = function () { toldDuring.splice(toldDuring.indexOf(told), 1); };
    return fetch(url, { credentials: "same-origin" }).then(function (r) {
      if (signedOut(r.status)) { return; }
      if (!r.ok) { throw new Error("/api/board answered " + r.status); }
      return r.json().then(function (body) { retries = 0; resetAll(body, told); });
    }).catch(loadAgain).then(done);
  }

  function loadAgain() {
    if (retryTimer !== null) { return; }
    retryTimer = window.setTimeout(function () { retryTimer = null; load(); }, Math.min(30000, 1000 * Math.pow(2, retries++)));
  }

  load();
  GH.on("open", load);
  GH.on("incident", function (m) { if (mine(m.incident)) { upsert(m.incident); } });
  GH.on("group", function (m) { if (mine(m.group)) { upsertGroup(m.group); } });
  GH.on("arm_command", function (m) { if (mine(m.command)) { upsertCommand(m.command); } });
  GH.on("door", function (m) { if (mine(m.door)) { setDoor(m.door); } });
  GH.on("missed", function (fresh) {
    fresh.forEach(function (i) { var c = findCard(list, i.id); if (c) { c.classList.add("missed"); } });
  });

  (cfg.groups || []).filter(mine).forEach(upsertGroup);
  var names = document.getElementById("guard-names");
  if (names) { (cfg.guards || []).forEach(function (g) { names.appendChild(el("option")).value = g; }); }
})();
