// Patrol pages: place a checkpoint by clicking the site map (the coordinates go into its form), and print the report.
"use strict";
(function () {
  var printButton = document.getElementById("print");
  if (printButton) { printButton.addEventListener("click", function () { window.print(); }); }

  var map = document.querySelector("#patrol-map svg.sitemap");
  if (!map) { return; }
  var picking = null;
  var hint = document.getElementById("pick-hint");
  Array.prototype.forEach.call(document.querySelectorAll("button.pick"), function (b) {
    b.addEventListener("click", function () {
      picking = b.getAttribute("data-checkpoint");
      map.classList.add("picking");
      if (hint) { hint.setAttribute("data-picking", picking); }
    });
  });
  map.addEventListener("click", function (ev) {
    if (!picking) { return; }
    var pt = map.createSVGPoint();
    pt.x = ev.clientX;
    pt.y = ev.clientY;
    var ctm = map.getScreenCTM();
    if (!ctm) { return; }
    var p = pt.matrixTransform(ctm.inverse());
    var x = document.getElementById("x-" + picking);
    var y = document.getElementById("y-" + picking);
    if (x && y) {
      x.value = String(Math.round(p.x * 10) / 10);
      y.value = String(Math.round(p.y * 10) / 10);
      var form = x.form;
      picking = null;
      map.classList.remove("picking");
      if (form) { form.submit(); }
    }
  });
})();
