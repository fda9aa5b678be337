// The sound check page: plays the console shell's siren for three seconds and shows what the browser reports.
(function () {
  "use strict";
  var GH = window.GH;
  var button = document.getElementById("play-siren");
  var sound = document.getElementById("sound");
  if (!GH || !button || !sound) { return; }
  button.addEventListener("click", function () { if (GH.testRing) { GH.testRing(3000); } });
  window.setInterval(function () {
    document.getElementById("sound-state").textContent = sound.textContent;
    document.getElementById("sound-heard").textContent = (sound.getAttribute("data-heard-ms") || "0") + " ms";
  }, 250);
})();
