// Residents' phone pages: the self-refreshing access QR, the problem report upload, sharing a visitor pass.
"use strict";
(function () {
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  // Forms that ask first (the help call, stopping the care service).
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (e) => {
      if (!window.confirm(form.dataset.confirm)) e.preventDefault();
    });
  });

  // Own access QR: a fresh pass well before the last one expires (about every 45 s), and at once when the
  // page becomes visible again. The QR arrives as SVG rendered by the portal.
  const pass = document.getElementById("my-pass");
  if (pass) {
    let timer = null;
    let expiresAt = 0;
    const status = document.getElementById("my-pass-status");
    const refresh = async () => {
      clearTimeout(timer);
      let next = 45000;
      try {
        const r = await fetch(pass.dataset.src, { credentials: "same-origin", cache: "no-store" });
        if (r.status === 401 || r.status === 403) {
          pass.innerHTML = "";
          pass.dataset.state = "refused";
          if (status) status.textContent = pass.dataset.expired;
          return;
        }
        if (!r.ok) throw new Error("HTTP " + r.status);
        const body = await r.json();
        pass.innerHTML = body.svg;
        pass.dataset.state = "ok";
        pass.dataset.passId = body.pass_id;
        expiresAt = Date.now() + body.life_s * 1000;
        next = Math.max(5000, Math.min(45000, (body.life_s - 15) * 1000));
      } catch (err) {
        next = 5000;
        if (Date.now() > expiresAt) { pass.innerHTML = ""; pass.dataset.state = "stale"; }
      }
      timer = setTimeout(refresh, next);
    };
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
    refresh();
  }

  // Problem report: send the photo with the token in a header, so a large photo is streamed, not refused.
  const report = document.getElementById("report-form");
  if (report && window.fetch && window.FormData) {
    report.addEventListener("submit", async (e) => {
      e.preventDefault();
      const file = report.querySelector('input[type="file"]');
      if (file && file.files.length && file.files[0].size > Number(report.dataset.max)) {
        window.alert(report.dataset.tooLarge);
        return;
      }
      const button = report.querySelector('button[type="submit"]');
      if (button) button.disabled = true;
      try {
        const r = await fetch(report.action, {
          method: "POST", body: new FormData(report), credentials: "same-origin",
          headers: { "X-CSRF-Token": csrf() },
        });
        const html = await r.text();
        document.open();
        document.write(html);
        document.close();
        // The address bar follows the page shown (the report's progress): a reload refreshes it, never resends.
        if (r.redirected && r.url) { window.history.replaceState(null, "", r.url); }
      } catch (err) {
        if (button) button.disabled = false;
        window.alert(String(err));
      }
    });
  }

  const copy = document.getElementById("copy-share");
  if (copy) {
    copy.addEventListener("click", async () => {
      const input = document.getElementById("share-url");
      if (navigator.share) {
        try { await navigator.share({ url: input.value }); return; } catch (err) { /* fall back to copying */ }
      }
      input.select();
      try { await navigator.clipboard.writeText(input.value); } catch (err) { document.execCommand("copy"); }
      copy.textContent = copy.dataset.copied;
    });
  }
})();
