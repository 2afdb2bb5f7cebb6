// Story Vault privacy portal: small progressive enhancements. Every page works without it.
(function () {
  "use strict";

  // After an action, move focus to its outcome (receipt, error, code field) so keyboard
  // and screen-reader users land where the news is.
  var target = document.querySelector("[data-focus]");
  if (target && target !== document.activeElement) {
    target.focus();
  }

  // "Copy the receipt" buttons (hidden unless the clipboard API is there).
  Array.prototype.forEach.call(document.querySelectorAll("[data-copy]"), function (button) {
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source || !navigator.clipboard) {
      return;
    }
    button.hidden = false;
    button.addEventListener("click", function () {
      var status = button.parentNode.querySelector(".copied");
      navigator.clipboard.writeText(source.textContent.trim()).then(
        function () { if (status) { status.textContent = "Copied."; } },
        function () { if (status) { status.textContent = "Could not copy; select the text instead."; } }
      );
    });
  });

  // One submit per click: a second press while the page is saving does nothing.
  Array.prototype.forEach.call(document.querySelectorAll("form[data-busy]"), function (form) {
    form.addEventListener("submit", function (event) {
      if (form.getAttribute("data-sent") === "1") {
        event.preventDefault();
        return;
      }
      form.setAttribute("data-sent", "1");
      var button = form.querySelector("button[type=submit]");
      if (button) {
        button.setAttribute("aria-busy", "true");
      }
    });
  });
})();
