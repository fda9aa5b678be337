// The guard's alarm board (and the live site map page): incidents over the console WebSocket, the workflow
// buttons, the checklist, a siren that loops while any alarm is unacknowledged, arm/disarm of zone groups.
// Every change arrives from the server as {"kind": "incident" | "group" | "arm_command" | "door", ...};
// an incident carries a version, so an older copy never overwrites a newer one.
(function () {
  "use strict";
  var cfgEl = document.getElementById("board-config");
  if (!cfgEl) { return; }
  var cfg = JSON.parse(cfgEl.textContent);
  var T = cfg.t || {};
  var lang = cfg.lang;
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
  var list = document.getElementById("incidents");
  var closedList = document.getElementById("closed");
  var conn = document.getElementById("conn");
  var banner = document.getElementById("banner");
  var siren = document.getElementById("siren");
  var soundEl = document.getElementById("sound");
  var blockedEl = document.getElementById("sound-blocked");
  var toastEl = document.getElementById("toast");
  var groupsEl = document.getElementById("groups");
  var commandsEl = document.getElementById("commands");
  var maps = document.querySelectorAll("svg.sitemap");

  var incidents = {};  // open incidents by id
  var closed = {};     // recently closed, by id
  var groups = {};     // "site/gateway/group" -> group
  var commands = {};   // command id -> command
  var soundState = "off";
  var unlocked = false;
  var delay = 500;
  var failures = 0;

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

  function post(url, body) {
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {})
    }).then(function (r) {
      return r.json().then(function (j) { return { status: r.status, body: j }; },
        function () { return { status: r.status, body: {} }; });
    });
  }

  function signedOut(status) {
    if (status === 401 || status === 403) {
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
        else { toast(t("board.conflict", { state: t("state." + b.state) })); }
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
    head.appendChild(el("time", "ts"));
    li.appendChild(head);
    var status = el("div", "status");
    status.appendChild(el("span", "state-label"));
    status.appendChild(el("span", "tag owner"));
    status.appendChild(el("span", "tag dispatched"));
    status.appendChild(el("span", "tag restored", t("board.restored")));
    status.appendChild(el("span", "tag esc", t("board.escalated")));
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
    var cause = el("select", "cause");
    cause.setAttribute("aria-label", t("board.cause"));
    cause.appendChild(el("option", null, t("board.cause") + "…")).value = "";
    (cfg.causes || []).forEach(function (c) { cause.appendChild(el("option", null, t("cause." + c))).value = c; });
    actions.appendChild(cause);
    var resolve = el("button", "resolve", t("board.resolve"));
    resolve.type = "button";
    resolve.setAttribute("data-act", "resolve");
    actions.appendChild(resolve);
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
      var a = target.getAttribute("data-act");
      if (!a) { return; }
      var extra = {};
      if (a === "dispatch") { extra.guard = guard.value.trim(); if (!extra.guard) { toast(t("board.need_guard")); guard.focus(); return; } }
      if (a === "resolve") { extra.cause = cause.value; if (!extra.cause) { toast(t("board.need_cause")); cause.focus(); return; } }
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
      if (!(target instanceof HTMLInputElement) || target.type !== "checkbox") { return; }
      act(li.getAttribute("data-id"), "check", { step: parseInt(target.getAttribute("data-step"), 10),
        done: target.checked }).then(function (ok) { if (!ok) { target.checked = !target.checked; } });
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
    show(li, ".count", inc.count > 1);
    setText(li, ".state-label", t("state." + st));
    var owner = li.querySelector(".owner");
    owner.textContent = inc.owner ? (mine ? t("board.owner_you") : t("board.owner", { name: inc.owner })) : "";
    owner.classList.toggle("mine", !!mine);
    owner.hidden = !inc.owner;
    setText(li, ".dispatched", inc.dispatched_to ? t("board.dispatched_to", { name: inc.dispatched_to }) : "");
    show(li, ".dispatched", !!inc.dispatched_to);
    show(li, ".restored", !!inc.restored_at);
    show(li, ".esc", !!inc.escalated_at);
    show(li, "[data-act=ack]", st === "new");
    show(li, "input.guard, [data-act=dispatch]", st === "acknowledged" || st === "dispatched");
    show(li, "[data-act=on_scene]", st === "dispatched");
    show(li, "select.cause, [data-act=resolve]", st === "acknowledged" || st === "dispatched" || st === "on_scene");
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
      box2.checked = !!c;
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
      if (body.residents !== null && body.residents !== undefined) {
        detail.appendChild(el("strong", null, t("board.residents")));
        var ul = el("ul", "residents");
        if (!body.residents.length) { ul.appendChild(el("li", "none", t("board.no_residents"))); }
        body.residents.forEach(function (r) {
          ul.appendChild(el("li", "resident", r.name + " · " + t("board.resident_role." + r.role) + " · " + r.phone));
        });
        detail.appendChild(ul);
      }
      detail.appendChild(el("strong", null, t("board.log")));
      var ol = el("ol", "log");
      (body.log || []).forEach(function (e) {
        ol.appendChild(el("li", "log-" + e.action, localTime(e.at) + " · " + e.actor + " · " +
          t("board.action." + e.action) + (e.detail ? " · " + e.detail : "")));
      });
      detail.appendChild(ol);
    });
  }

  function upsert(inc) {
    if (!inc || typeof inc.id !== "number") { return; }
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
      wanted.forEach(function (wid) {
        var c = findCard(list, wid);
        if (c) { list.appendChild(c); }
      });
    }
  }

  function resetAll(body) {
    // The socket may already have delivered something newer than this answer: keep the higher version,
    // and keep incidents the answer cannot know yet (opened after it was read).
    var oldOpen = incidents;
    var oldClosed = closed;
    var fetched = (body.incidents || []).concat(body.closed || []);
    var maxId = 0;
    incidents = {};
    closed = {};
    fetched.forEach(function (i) {
      maxId = Math.max(maxId, i.id);
      var mine = oldOpen[i.id] || oldClosed[i.id];
      var best = mine && mine.version > i.version ? mine : i;
      if (best.state === "closed") { closed[best.id] = best; } else { incidents[best.id] = best; }
    });
    Object.keys(oldOpen).forEach(function (k) {
      if (oldOpen[k].id > maxId && !closed[k]) { incidents[k] = oldOpen[k]; }
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

  function newestUnacknowledged() {
    var best = null;
    Object.keys(incidents).forEach(function (k) {
      var i = incidents[k];
      if (i.state !== "new") { return; }
      if (!best || i.opened_at > best.opened_at || (i.opened_at === best.opened_at && i.id > best.id)) { best = i; }
    });
    return best;
  }

  function refresh() {
    var n = Object.keys(incidents).length;
    var count = document.getElementById("open-count");
    if (count) { count.textContent = String(n); }
    var none = document.getElementById("none");
    if (none) { none.hidden = n > 0; }
    if (banner) {
      var b = newestUnacknowledged();
      banner.hidden = !b;
      if (b) {
        banner.className = "banner lvl-" + String(b.level).replace(/[^a-z]/g, "") + (b.escalated_at ? " escalated" : "");
        banner.setAttribute("data-id", String(b.id));
        setText(banner, ".badge", t("kind." + b.kind));
        setText(banner, ".title", (b.title && (b.title[lang] || b.title["zh-CN"])) || b.type);
        setText(banner, ".where", (b.where && (b.where[lang] || b.where["zh-CN"])) || "");
        setText(banner, ".ts", localTime(b.opened_at));
      }
    }
    updateSound();
    updateMaps();
  }

  if (banner) {
    banner.querySelector(".ack").addEventListener("click", function () {
      var id = banner.getAttribute("data-id");
      if (id) { act(id, "ack", {}); }
    });
  }

  // ------------------------------------------------------------ the siren

  function setSound(state) {
    soundState = state;
    if (soundEl) {
      soundEl.setAttribute("data-state", state);
      setText(soundEl, ".text", t("board.sound." + state));
    }
    if (blockedEl) { blockedEl.hidden = state !== "blocked"; }
  }

  function ringingState() {
    var ring = false;
    var esc = false;
    Object.keys(incidents).forEach(function (k) {
      if (incidents[k].state === "new") {
        ring = true;
        if (incidents[k].escalated_at) { esc = true; }
      }
    });
    return { ring: ring, esc: esc };
  }

  function play() {
    var p = siren.play();
    if (p && typeof p.then === "function") {
      p.then(function () {
        unlocked = true;
        if (!ringingState().ring) { siren.pause(); setSound("off"); } else { setSound("ringing"); }
      }, function (err) {
        if (err && err.name === "AbortError") { return; }  // paused again before it started
        setSound("blocked");
      });
    } else {
      setSound("ringing");
    }
  }

  function updateSound() {
    if (!siren || !list) { return; }
    var s = ringingState();
    if (!s.ring) {
      if (!siren.paused) { siren.pause(); }
      if (soundState !== "blocked") { setSound("off"); }
      return;
    }
    var src = s.esc ? cfg.sounds.fast : cfg.sounds.normal;
    var changed = siren.getAttribute("data-src") !== src;
    if (changed) {
      siren.setAttribute("data-src", src);
      siren.src = src;
    }
    siren.volume = s.esc ? 1.0 : 0.6;
    siren.setAttribute("data-level", s.esc ? "escalated" : "normal");
    if (siren.paused || changed) { play(); }
  }

  function enableSound() {
    if (!siren) { return; }
    if (!siren.getAttribute("src")) { siren.setAttribute("data-src", cfg.sounds.normal); siren.src = cfg.sounds.normal; }
    play();
  }

  if (siren && list) {
    var enable = document.getElementById("enable-sound");
    if (enable) { enable.addEventListener("click", enableSound); }
    // Any click on the page is a user gesture: use the first one to let the siren play.
    document.addEventListener("click", function () { if (!unlocked && soundState === "blocked") { enableSound(); } },
      true);
    try {
      if (navigator.getAutoplayPolicy && navigator.getAutoplayPolicy("mediaelement") !== "allowed") {
        setSound("blocked");
      }
    } catch (err) { /* no policy API: we learn it from the first play() */ }
  }

  // ------------------------------------------------------------ the site map

  function updateMaps() {
    for (var m = 0; m < maps.length; m++) {
      var svg = maps[m];
      var site = svg.getAttribute("data-site");
      var zones = {}, buildings = {}, houses = {}, doors = {};
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
    setText(row, ".name", (g.label ? g.label + " " : "") + "(" + g.group + ")");
    var gs = row.querySelector(".gstate");
    gs.className = "gstate " + state;
    gs.textContent = t("arm." + state) + (g.mode && state !== "disarmed" ? " · " + g.mode : "");
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
    row.appendChild(document.createTextNode(" " + t("arm.cmd." + c.type) + " " + ((c.args && c.args.group) || "") +
      (c.args && c.args.mode ? " (" + c.args.mode + ")" : "") + " · " + c.by + " · "));
    row.appendChild(el("span", "st st-" + c.status, t("arm.status." + c.status)));
    if (c.detail) { row.appendChild(el("span", "detail", " " + c.detail)); }
  }

  // ------------------------------------------------------------ the socket

  function setConn(state) {
    if (!conn) { return; }
    conn.className = "conn conn-" + state;
    conn.setAttribute("data-state", state);
    setText(conn, ".text", conn.getAttribute("data-label-" + state) || state);
  }

  function load() {
    return fetch("/api/board", { credentials: "same-origin" }).then(function (r) {
      if (signedOut(r.status)) { return; }
      if (!r.ok) { return; }
      return r.json().then(resetAll);
    }).catch(function () { /* offline: the socket retries and loads again */ });
  }

  function connect() {
    setConn(failures ? "offline" : "connecting");
    var proto = window.location.protocol === "https:" ? "wss:" : "ws:";
    var ws;
    try { ws = new WebSocket(proto + "//" + window.location.host + "/ws"); } catch (err) { schedule(); return; }
    ws.onopen = function () { delay = 500; failures = 0; setConn("online"); load(); };
    ws.onmessage = function (m) {
      var msg;
      try { msg = JSON.parse(m.data); } catch (err) { return; }
      if (msg.kind === "incident") { upsert(msg.incident); }
      else if (msg.kind === "group") { upsertGroup(msg.group); }
      else if (msg.kind === "arm_command") { upsertCommand(msg.command); }
      else if (msg.kind === "door") { setDoor(msg.door); }
    };
    ws.onclose = function () { setConn("offline"); schedule(); };
  }

  function schedule() {
    failures += 1;
    var wait = delay / 2 + Math.random() * delay / 2;
    delay = Math.min(delay * 2, 15000);
    window.setTimeout(connect, wait);
  }

  (cfg.groups || []).forEach(upsertGroup);
  var names = document.getElementById("guard-names");
  if (names) { (cfg.guards || []).forEach(function (g) { names.appendChild(el("option")).value = g; }); }
  connect();
})();
