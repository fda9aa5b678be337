// Registry admin page: CSV import through the API, with a report in words (a dry run says it imported nothing) and
// the bad lines one by one.
"use strict";
(function () {
  const form = document.getElementById("import-form");
  if (!form) return;
  const out = document.getElementById("import-report");
  const token = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const fill = (key, n) => (out.getAttribute(key) || "").replace("{n}", String(n));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const file = document.getElementById("import-file").files[0];
    if (!file) return;
    const dry = document.getElementById("import-dry").checked;
    out.textContent = "…";
    let r, body;
    try {
      r = await fetch(form.dataset.url + (dry ? "?dry_run=1" : ""), {
        method: "POST", body: file, credentials: "same-origin",
        headers: { "Content-Type": "text/csv", "X-CSRF-Token": token },
      });
      body = await r.json();
    } catch (err) {
      out.textContent = out.dataset.failed;
      return;
    }
    out.textContent = "";
    const bad = body.errors && body.errors.length;
    const head = document.createElement("p");
    head.className = bad || !r.ok ? "error" : "notice";
    head.id = "import-result";
    head.textContent = bad ? out.dataset.bad : (!r.ok ? out.dataset.failed
      : fill(body.imported ? "data-ok" : "data-dry", body.rows || 0));
    out.appendChild(head);
    if (body.counts) {
      const parts = Object.keys(body.counts).filter((k) => body.counts[k] && out.hasAttribute("data-count-" + k))
        .map((k) => fill("data-count-" + k, body.counts[k]));
      if (parts.length) {
        const p = document.createElement("p");
        p.id = "import-counts";
        p.textContent = parts.join(out.dataset.sep);
        out.appendChild(p);
      }
    }
    const list = document.createElement("ul");
    list.id = "import-errors";
    for (const err of body.errors || []) {
      const li = document.createElement("li");
      li.textContent = fill("data-line", err.line) + out.dataset.colon + err.message;
      list.appendChild(li);
    }
    out.appendChild(list);
  });
})();
