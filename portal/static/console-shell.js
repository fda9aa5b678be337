// The console shell, on every staff page: one WebSocket to the portal, the proof that the page is live, and (for
// guards and administrators) the siren and the banner of the newest unacknowledged alarm, whatever page is open.
//
// Live: the server beats on the socket every few seconds. A page that hears nothing for stale_s (the socket
// dropped, the portal died, the network is gone) covers the whole screen in red, "报警看板已断开", and rings; when
// the session is gone it asks for a new sign-in. On every reconnect it reloads the open alarms and says what came
// in meanwhile. Pages listen with GH.on(kind, fn) ("open", "message", "reconnected" and each message kind).
//
// Sound: a WebAudio siren (two tones, faster when escalated or disconnected) through an AnalyserNode, which
// measures what is really played: #sound carries data-state (off | ringing | blocked) and data-heard-ms (how long
// a non-silent siren has played). A browser that will not play without a gesture shows the "开启报警声音" step
// until a click unlocks it; the guardroom's kiosk browser runs with an autoplay policy that needs none.
(function () {
  "use strict";
  var cfgEl = document.getElementById("shell-config");
  if (!cfgEl) { return; }
  var cfg = JSON.parse(cfgEl.textContent);
  var T = cfg.t || {};
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
  var connEl = document.getElementById("conn");
  var soundEl = document.getElementById("sound");
  var stepEl = document.getElementById("sound-blocked");
  var banner = document.getElementById("banner");
  var staleEl = document.getElementById("stale");
  var missedEl = document.getElementById("missed");
  var listeners = {};
  var STALE_MS = (cfg.stale_s || 6) * 1000;

  function t(key, kw) {
    var s = Object.prototype.hasOwnProperty.call(T, key) ? T[key] : key;
    if (kw) { Object.keys(kw).forEach(function (k) { s = s.split("{" + k + "}").join(String(kw[k])); }); }
    return s;
  }
  function setText(root, sel, text) {
    var e = root && root.querySelector(sel);
    if (e) { e.textContent = text == null ? "" : String(text); }
  }
  var fmt = null;
  try {
    fmt = new Intl.DateTimeFormat("sv-SE", { timeZone: cfg.tz, year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  } catch (err) { fmt = null; }
  function localTime(ts) {
    if (!ts) { return ""; }
    var d = ts instanceof Date ? ts : new Date(String(ts).slice(0, 23) + "Z");
    if (isNaN(d.getTime()) || !fmt) { return String(ts); }
    return fmt.format(d).replace("T", " ");
  }

  var GH = window.GH = {
    cfg: cfg, t: t, localTime: localTime, csrf: csrf, incidents: {},
    on: function (kind, fn) { (listeners[kind] = listeners[kind] || []).push(fn); },
    wsQuery: null,  // a page may set a function returning the socket's query string (the event list's ?after=)
    post: function (url, body) {
      return fetch(url, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(body || {})
      }).then(function (r) {
        if (r.status === 401) { sessionEnded(); }
        return r.json().then(function (j) { return { status: r.status, body: j }; },
          function () { return { status: r.status, body: {} }; });
      });
    }
  };
  function emit(kind, arg) {
    (listeners[kind] || []).forEach(function (fn) {
      try { fn(arg); } catch (err) { if (window.console) { window.console.error(err); } }
    });
  }

  // ------------------------------------------------------------ the siren

  var audio = null;  // {ctx, osc, gain, analyser}
  var ringLevel = "";  // "", "normal", "fast"
  var heardMs = 0;
  var lastProbe = 0;

  function makeAudio() {
    if (audio || !(window.AudioContext || window.webkitAudioContext)) { return audio; }
    var Ctx = window.AudioContext || window.webkitAudioContext;
    var ctx = new Ctx();
    var osc = ctx.createOscillator();
    var gain = ctx.createGain();
    var analyser = ctx.createAnalyser();
    analyser.fftSize = 1024;
    osc.type = "square";
    osc.frequency.value = 960;
    gain.gain.value = 0;
    osc.connect(gain);
    gain.connect(analyser);
    analyser.connect(ctx.destination);
    osc.start();
    audio = { ctx: ctx, osc: osc, gain: gain, analyser: analyser, buf: new Float32Array(analyser.fftSize) };
    ctx.onstatechange = updateSoundState;
    return audio;
  }

  function unlock() {
    var a = makeAudio();
    if (a && a.ctx.state !== "running") { a.ctx.resume().then(updateSoundState, function () {}); }
  }

  function running() { return !!audio && audio.ctx.state === "running"; }

  // The two-tone pattern, written ahead on the audio clock: normal 0.45 s + 0.45 s then 0.6 s quiet; fast 0.16 s
  // each. A hidden or covered tab's timers may run once a minute: the sound must not wait for them, so the pattern
  // is scheduled SIREN_AHEAD_S ahead, and each tick only extends it (or starts it afresh when the level changes).
  var SIREN_AHEAD_S = 150;
  var shaped = { level: null, until: 0 };

  function segments(level, from, to) {  // [start, frequency, gain] on the audio clock, phase from the clock itself
    var out = [];
    var t;
    if (level === "fast") {
      for (t = Math.floor(from / 0.16) * 0.16; t < to; t += 0.16) {
        out.push([t, Math.round(t / 0.16) % 2 ? 770 : 960, 0.5]);
      }
    } else if (level === "normal") {
      for (t = Math.floor(from / 1.5) * 1.5; t < to; t += 1.5) {
        out.push([t, 960, 0.35], [t + 0.45, 770, 0.35], [t + 0.9, 770, 0]);
      }
    } else {
      out.push([from, 960, 0]);
    }
    return out;
  }

  function shape() {
    if (!audio) { return; }
    var now = audio.ctx.currentTime;
    var from = shaped.until;
    if (shaped.level !== ringLevel || shaped.until < now) {
      audio.osc.frequency.cancelScheduledValues(now);
      audio.gain.gain.cancelScheduledValues(now);
      shaped.level = ringLevel;
      from = now;
    } else if (shaped.until - now > SIREN_AHEAD_S / 2) {
      return;  // far enough ahead
    }
    var to = now + SIREN_AHEAD_S;
    var segs = segments(ringLevel, from, to);
    var first = 0;  // the segment under way at `from` (it may have begun before), then the ones after it
    for (var k = 0; k < segs.length; k++) { if (segs[k][0] <= from) { first = k; } }
    segs.slice(first).forEach(function (s, i) {
      var at = Math.max(s[0], now);
      audio.osc.frequency.setValueAtTime(s[1], at);
      if (i === 0 && at === now) { audio.gain.gain.setTargetAtTime(s[2], now, 0.01); }
      else { audio.gain.gain.setValueAtTime(s[2], at); }
    });
    shaped.until = ringLevel ? to : Infinity;  // silence needs no extending
  }

  function probe() {
    if (!audio) { return; }
    var now = audio.ctx.currentTime;
    var dt = lastProbe ? now - lastProbe : 0;
    lastProbe = now;
    audio.analyser.getFloatTimeDomainData(audio.buf);
    var sum = 0;
    for (var i = 0; i < audio.buf.length; i++) { sum += audio.buf[i] * audio.buf[i]; }
    var rms = Math.sqrt(sum / audio.buf.length);
    if (running() && ringLevel && rms > 0.01 && dt > 0 && dt < 1) { heardMs += dt * 1000; }
    if (soundEl) {
      soundEl.setAttribute("data-heard-ms", String(Math.round(heardMs)));
      soundEl.setAttribute("data-level", ringLevel || "off");
    }
  }

  function updateSoundState() {
    var state = !cfg.rings ? "off" : (!running() ? "blocked" : (ringLevel ? "ringing" : "off"));
    if (soundEl) {
      soundEl.setAttribute("data-state", state);
      setText(soundEl, ".text", t("shell.sound." + state));
    }
    var blocked = cfg.rings && !running();
    if (stepEl) { stepEl.hidden = !blocked; }
    document.body.classList.toggle("not-ready", !!blocked);
    var staleSound = staleEl && staleEl.querySelector(".stale-sound");
    if (staleSound) { staleSound.hidden = !blocked; }
  }

  function ring(level) {
    if (!cfg.rings) { level = ""; }
    if (level && !audio) { makeAudio(); }
    ringLevel = level;
    shape();
    updateSoundState();
  }

  if (cfg.rings) {
    makeAudio();
    ["click", "keydown", "touchstart"].forEach(function (ev) { document.addEventListener(ev, unlock, true); });
    var enable = document.querySelectorAll(".enable-sound");
    for (var i = 0; i < enable.length; i++) {
      enable[i].addEventListener("click", function () {
        unlock();
        if (!ringLevel) {  // a short ring: the guard hears that the speakers work
          ring("normal");
          window.setTimeout(function () { if (ringLevel === "normal") { decide(); } }, 1200);
        }
      });
    }
    window.setInterval(function () { shape(); probe(); }, 100);
    // A context that has not started after a moment will not start without a gesture.
    window.setTimeout(updateSoundState, 400);
    GH.testRing = function (ms) { ring("normal"); window.setTimeout(decide, ms || 3000); };
  }

  // ------------------------------------------------------------ open alarms: the banner and what rings

  // What the socket told while a snapshot (/api/board) was on its way: the snapshot may have been read before it,
  // so it must not undo it (an alarm that arrives while the page loads must ring).
  var during = [];  // one {id: newest incident the socket gave, open or closed} per snapshot in flight

  function upsert(inc) {
    if (!inc || typeof inc.id !== "number") { return; }
    during.forEach(function (told) {
      var seen = told[inc.id];
      if (!seen || seen.version <= inc.version) { told[inc.id] = inc; }
    });
    var known = GH.incidents[inc.id];
    if (known && known.version > inc.version) { return; }
    if (inc.state === "closed") { delete GH.incidents[inc.id]; } else { GH.incidents[inc.id] = inc; }
  }

  function resetFrom(body, told) {
    GH.incidents = {};
    (body.incidents || []).concat(body.closed || []).forEach(function (i) {
      var later = told[i.id];
      if (!later || later.version < i.version) { told[i.id] = i; }
    });
    Object.keys(told).forEach(function (k) { upsert(told[k]); });
  }

  function unacknowledged() {
    return Object.keys(GH.incidents).map(function (k) { return GH.incidents[k]; })
      .filter(function (i) { return i.state === "new"; })
      // the gravest first (a fire before a hundred fence trips), then the newest to reach the portal (its ids, not
      // the gateways' clocks, which can be wrong)
      .sort(function (a, b) { return (b.priority - a.priority) || (b.id - a.id); });
  }

  var stale = false;
  var ended = false;

  function decide() {
    var waiting = unacknowledged();
    if (banner) {
      var b = cfg.rings ? waiting[0] : null;
      banner.hidden = !b;
      if (b) {
        var lang = cfg.lang;
        banner.className = "banner lvl-" + String(b.level).replace(/[^a-z]/g, "") + (b.escalated_at ? " escalated" : "");
        banner.setAttribute("data-id", String(b.id));
        setText(banner, ".badge", t("kind." + b.kind));
        setText(banner, ".title", (b.title && (b.title[lang] || b.title["zh-CN"])) || b.type);
        setText(banner, ".where", (b.where && (b.where[lang] || b.where["zh-CN"])) || "");
        setText(banner, ".ts", localTime(b.opened_at));
        setText(banner, ".more", waiting.length > 1 ? t("shell.more_waiting", { n: waiting.length - 1 }) : "");
      }
    }
    if (stale || ended) { ring("fast"); return; }
    var esc = waiting.some(function (i) { return !!i.escalated_at; });
    ring(waiting.length ? (esc ? "fast" : "normal") : "");
  }
  GH.refresh = decide;

  if (banner) {
    banner.querySelector(".ack").addEventListener("click", function () {
      var id = banner.getAttribute("data-id");
      if (!id) { return; }
      GH.post("/api/incidents/" + id + "/ack", {}).then(function (res) {
        if (res.body && res.body.incident) { upsert(res.body.incident); emit("incident", { incident: res.body.incident }); }
        else if (res.status === 409 && res.body && res.body.incident) { upsert(res.body.incident); }
        decide();
      });
    });
  }

  var knownMax = 0;
  var retries = 0;
  var retryTimer = null;
  // After a reconnect: what the banner says the page missed. Alarms raised during the outage that reach the portal
  // only after the page's snapshot (a portal restarting drains the broker's queue after it serves pages) are added
  // as the socket brings them: new to the page and opened before it reconnected (the gateway's clock against the
  // browser's: both keep time), within a minute of the reconnect.
  var missed = null;  // {before: newest id known before, at: when reconnected (ms), secs, fresh: [incidents]}
  var MISSED_CATCH_UP_MS = 60000;

  function showMissed() {
    var fresh = missed.fresh;
    missedEl.textContent = t("shell.missed", { s: missed.secs, n: fresh.length }) + (fresh.length ? " " +
      fresh.slice(0, 5).map(function (i) { return (i.title && (i.title[cfg.lang] || i.title["zh-CN"])) || i.type; }).join(t("punct.comma")) : "");
    missedEl.setAttribute("data-count", String(fresh.length));
    missedEl.hidden = false;
  }

  function missedLate(inc) {
    if (!missed || !missedEl || !inc || inc.id <= missed.before || Date.now() - missed.at > MISSED_CATCH_UP_MS) { return; }
    if (missed.fresh.some(function (i) { return i.id === inc.id; })) { return; }
    var opened = Date.parse(inc.opened_at);
    if (!(opened < missed.at)) { return; }
    missed.fresh.push(inc);
    showMissed();
    emit("missed", [inc]);
  }

  function load(reconnected, downSince) {
    if (!cfg.rings) { return; }
    var told = {};
    during.push(told);
    var done = function () { during = during.filter(function (x) { return x !== told; }); };
    fetch("/api/board", { credentials: "same-origin" }).then(function (r) {
      if (r.status === 401) { sessionEnded(); return null; }
      if (!r.ok) { throw new Error("/api/board answered " + r.status); }
      return r.json();
    }).then(function (body) {
      done();
      if (!body) { return; }
      retries = 0;
      var before = knownMax;
      resetFrom(body, told);
      var fresh = (body.incidents || []).filter(function (i) { return i.id > before; });
      (body.incidents || []).concat(body.closed || []).forEach(function (i) { knownMax = Math.max(knownMax, i.id); });
      if (reconnected && missedEl) {
        var now = Date.now();
        missed = { before: before, at: now, secs: Math.round((now - downSince) / 1000), fresh: fresh.slice() };
        showMissed();
        emit("missed", fresh);
      }
      decide();
    }).catch(function () {
      // A failed answer (a portal restarting, a balancer's 503) is asked for again, 1 s, 2 s ... 30 s later: what
      // is open must ring even when the socket stays up and tells nothing new.
      done();
      if (retryTimer !== null || ended) { return; }
      retryTimer = window.setTimeout(function () { retryTimer = null; load(reconnected, downSince); },
        Math.min(30000, 1000 * Math.pow(2, retries++)));
    });
  }

  // ------------------------------------------------------------ the socket and the proof of life

  var ws = null;
  var lastHeard = performance.now();
  var lastContact = new Date();
  var delay = 500;
  var failures = 0;
  var everOpen = false;

  function setConn(state) {
    if (!connEl) { return; }
    connEl.className = "conn conn-" + state;
    connEl.setAttribute("data-state", state);
    setText(connEl, ".text", connEl.getAttribute("data-label-" + state) || state);
  }

  function showStale(on, since) {
    if (on === stale && !ended) { decide(); return; }
    var was = stale;
    stale = on;
    if (staleEl) {
      staleEl.hidden = !on && !ended;
      setText(staleEl, ".why", ended ? t("shell.stale.ended") : t("shell.stale.down"));
      setText(staleEl, ".since", t("shell.stale.since", { at: localTime(lastContact) }));
      var si = staleEl.querySelector(".signin");
      if (si) { si.hidden = !ended; }
      var a = document.getElementById("stale-signin");
      if (a) { a.setAttribute("href", "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search)); }
    }
    document.body.classList.toggle("is-stale", on || ended);
    if (on || ended) { setConn("stale"); }
    if (was && !on && !ended) { emit("reconnected"); load(true, (since || lastContact).getTime()); }
    decide();
  }

  function sessionEnded() {
    if (ended) { return; }
    ended = true;
    if (ws) { try { ws.close(); } catch (err) { /* closing anyway */ } }
    showStale(true);
  }
  GH.sessionEnded = sessionEnded;

  function heard() {
    var before = lastContact;  // the outage is counted from the last word before this one
    lastHeard = performance.now();
    lastContact = new Date();
    if (stale) { showStale(false, before); }
  }

  function checkSignedIn() {
    fetch("/api/events?limit=1", { credentials: "same-origin" }).then(function (r) {
      if (r.status === 401 || r.status === 403) { sessionEnded(); }
    }).catch(function () { /* the portal is down: keep retrying the socket */ });
  }

  function connect() {
    if (ended) { return; }
    if (!stale) { setConn(failures ? "offline" : "connecting"); }
    var proto = window.location.protocol === "https:" ? "wss:" : "ws:";
    var q = GH.wsQuery ? GH.wsQuery() : "";
    try { ws = new WebSocket(proto + "//" + window.location.host + "/ws" + (q ? "?" + q : "")); }
    catch (err) { schedule(); return; }
    ws.onopen = function () {
      var again = everOpen;
      var wasStale = stale;
      var downSince = lastContact.getTime();
      everOpen = true;
      delay = 500;
      failures = 0;
      heard();
      setConn("online");
      emit("open", { reconnected: again });
      // A socket back before the page turned stale (a portal instance gone, its balancer sent us to another) may
      // have missed alarms too: reload them (a stale page reloads when it recovers, in showStale).
      if (!again) { load(false, 0); } else if (!wasStale) { load(true, downSince); }
    };
    ws.onmessage = function (m) {
      var msg;
      try { msg = JSON.parse(m.data); } catch (err) { return; }
      heard();
      if (stale) { return; }
      if (msg.kind === "session_ended") { sessionEnded(); return; }
      if (msg.kind === "incident") { upsert(msg.incident); decide(); }
      emit("message", msg);
      emit(msg.kind, msg);
      if (msg.kind === "incident") { missedLate(msg.incident); }  // after its card is made
    };
    ws.onclose = function (ev) {
      ws = null;
      if (ev && ev.code === 4401) { sessionEnded(); return; }
      if (!stale) { setConn("offline"); }
      schedule();
    };
  }

  function schedule() {
    failures += 1;
    if (failures % 2 === 0) { checkSignedIn(); }
    var wait = delay / 2 + Math.random() * delay / 2;
    delay = Math.min(delay * 2, 4000);  // never long: the page must notice the portal coming back
    window.setTimeout(connect, wait);
  }

  // The watchdog: monotonic time since anything was heard on the socket. Silent that long, the socket may be dead
  // without a close (a laptop that slept, a NAT entry dropped, the portal's host gone): it is dropped and a new one
  // made, not left to TCP, which can take minutes to give up on it.
  window.setInterval(function () {
    if (ended || performance.now() - lastHeard <= STALE_MS) { return; }
    showStale(true);
    if (ws !== null && ws.readyState === WebSocket.OPEN) {
      var dead = ws;
      ws = null;
      dead.onclose = null;
      dead.onmessage = null;
      try { dead.close(); } catch (err) { /* closing a dead socket: nothing to do */ }
      schedule();
    }
  }, 250);

  updateSoundState();
  window.setTimeout(connect, 0);  // after the page's own scripts have registered their listeners
})();
