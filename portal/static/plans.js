// The site plan editor: clicking on the plan fills the points of the zone, building or door being placed (a door:
// one point; a building: two opposite corners; a zone: each corner of its line in turn), and draws them. Without
// this script the points are typed in the same field.
(function () {
  "use strict";
  var fig = document.getElementById("plan");
  var svg = fig ? fig.querySelector("svg.sitemap") : null;
  var kind = document.getElementById("mark-kind");
  var name = document.getElementById("mark-name");
  var label = document.getElementById("mark-label");
  var points = document.getElementById("mark-points");
  var hint = document.getElementById("click-hint");
  if (!kind || !points) { return; }
  var NS = "http://www.w3.org/2000/svg";
  var preview = null;

  function parse() {
    return points.value.trim().split(/[;\s]+/).filter(Boolean).map(function (p) {
      var xy = p.split(",");
      return [parseFloat(xy[0]), parseFloat(xy[1])];
    }).filter(function (p) { return !isNaN(p[0]) && !isNaN(p[1]); });
  }

  function fmt(n) { return String(Math.round(n * 10) / 10); }

  function draw() {
    if (!svg) { return; }
    if (!preview) {
      preview = document.createElementNS(NS, "g");
      preview.setAttribute("id", "preview");
      preview.setAttribute("class", "preview");
      svg.appendChild(preview);
    }
    while (preview.firstChild) { preview.removeChild(preview.firstChild); }
    var pts = parse();
    var box = svg.viewBox.baseVal;
    var r = Math.max(box.width, box.height) / 120;
    if (kind.value === "building" && pts.length === 2) {
      var rect = document.createElementNS(NS, "rect");
      rect.setAttribute("x", Math.min(pts[0][0], pts[1][0]));
      rect.setAttribute("y", Math.min(pts[0][1], pts[1][1]));
      rect.setAttribute("width", Math.abs(pts[1][0] - pts[0][0]));
      rect.setAttribute("height", Math.abs(pts[1][1] - pts[0][1]));
      preview.appendChild(rect);
    } else if (kind.value === "zone" && pts.length > 1) {
      var line = document.createElementNS(NS, "polyline");
      line.setAttribute("points", pts.map(function (p) { return p.join(","); }).join(" "));
      line.setAttribute("stroke-width", r / 2);
      preview.appendChild(line);
    }
    pts.forEach(function (p) {
      var c = document.createElementNS(NS, "circle");
      c.setAttribute("cx", p[0]);
      c.setAttribute("cy", p[1]);
      c.setAttribute("r", r);
      preview.appendChild(c);
    });
  }

  function showHint() {
    if (hint && fig) { hint.textContent = fig.getAttribute("data-hint-" + kind.value) || ""; }
    if (name) { name.setAttribute("list", "names-" + kind.value); }
  }

  if (svg) {
    svg.addEventListener("click", function (e) {
      var m = svg.getScreenCTM();
      if (!m) { return; }
      var pt = svg.createSVGPoint();
      pt.x = e.clientX;
      pt.y = e.clientY;
      var p = pt.matrixTransform(m.inverse());
      var box = svg.viewBox.baseVal;
      var x = Math.min(Math.max(p.x, 0), box.width), y = Math.min(Math.max(p.y, 0), box.height);
      var pts = parse();
      if (kind.value === "door") { pts = []; }
      if (kind.value === "building" && pts.length >= 2) { pts = []; }
      pts.push([x, y]);
      points.value = pts.map(function (q) { return fmt(q[0]) + "," + fmt(q[1]); }).join(" ");
      draw();
    });
  }

  kind.addEventListener("change", function () { points.value = ""; showHint(); draw(); });
  points.addEventListener("input", draw);
  var clear = document.getElementById("mark-clear");
  if (clear) { clear.addEventListener("click", function () { points.value = ""; draw(); }); }

  // "Move": the form takes that mark's kind, name and label; the next clicks place it anew.
  Array.prototype.forEach.call(document.querySelectorAll("button.move"), function (b) {
    b.addEventListener("click", function () {
      kind.value = b.getAttribute("data-kind");
      name.value = b.getAttribute("data-name");
      label.value = b.getAttribute("data-label");
      points.value = "";
      showHint();
      draw();
      kind.scrollIntoView({ block: "center" });
    });
  });
  showHint();
  draw();
})();
