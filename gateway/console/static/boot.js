// Runs before the console's modules: if they fail to load or throw before the app starts, the page
// says so instead of staying blank.
(function () {
  "use strict";
  function show(message) {
    var root = document.getElementById("app");
    if (!root || root.dataset.state === "ready") return;
    root.dataset.state = "failed";
    root.textContent = "";
    var box = document.createElement("div");
    box.className = "error boot-error";
    box.setAttribute("role", "alert");
    var title = document.createElement("strong");
    title.textContent = "The console could not start. ";
    box.appendChild(title);
    box.appendChild(document.createTextNode(message));
    root.appendChild(box);
  }
  window.addEventListener("error", function (event) {
    var target = event.target;
    if (target && target !== window && (target.src || target.href)) {
      show("A file of the console did not load: " + (target.src || target.href));
    } else if (event.message) {
      show(event.message);
    }
  }, true);
  window.setTimeout(function () {
    var root = document.getElementById("app");
    if (root && root.dataset.state === "loading") {
      show("Its scripts did not run within 15 s (an old browser without JavaScript modules?).");
    }
  }, 15000);
})();
