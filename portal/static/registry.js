// Registry admin page: CSV import through the API, with the line-by-line report.
"use strict";
(function () {
  const form = document.getElementById("import-form");
  if (!form) return;
  const out = document.getElementById("import-report");
  const token = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const file = document.getElementById("import-file").files[0];
    if (!file) return;
    const dry = document.getElementById("import-dry").checked;
    out.textContent = "…";
    const r = await fetch(form.dataset.url + (dry ? "?dry_run=1" : ""), {
      method: "POST", body: file, credentials: "same-origin",
      headers: { "Content-Type": "text/csv", "X-CSRF-Token": token },
    });
    let body;
    try { body = await r.json(); } catch (err) { out.textContent = "HTTP " + r.status; return; }
    out.textContent = "";
    const head = document.createElement("p");
    head.className = body.errors && body.errors.length ? "error" : "notice";
    head.id = "import-result";
    head.textContent = (body.errors && body.errors.length ? out.dataset.bad : out.dataset.ok) + " (" +
      (body.rows || 0) + ")" + (body.counts ? " " + JSON.stringify(body.counts) : "");
    out.appendChild(head);
    const list = document.createElement("ul");
    list.id = "import-errors";
    for (const err of body.errors || []) {
      const li = document.createElement("li");
      li.textContent = out.dataset.line + " " + err.line + ": " + err.message;
      list.appendChild(li);
    }
    out.appendChild(list);
  });
})();
