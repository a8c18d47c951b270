// Dataset upload with a progress bar: sends the same multipart form by XHR and follows
// the server's answer. Without JavaScript the form is an ordinary POST.
(function () {
  "use strict";
  var self = document.currentScript ? document.currentScript.src : "/static/kiln-upload.js";
  var form = document.getElementById("upload-form");
  if (!form || !window.XMLHttpRequest || !window.FormData) return;
  var bar = document.getElementById("upload-progress");
  var status = document.getElementById("upload-status");
  var button = form.querySelector("button[type=submit]");

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var data = new FormData(form);
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.setRequestHeader("X-Requested-With", "XMLHttpRequest");
    xhr.setRequestHeader("X-CSRF-Token", data.get("csrf_token"));
    xhr.upload.addEventListener("progress", function (e) {
      if (!e.lengthComputable) return;
      var pct = Math.round((e.loaded / e.total) * 100);
      bar.value = pct;
      status.textContent = "Uploading… " + pct + "%";
    });
    xhr.upload.addEventListener("load", function () {
      status.textContent = "Checking the file…";
    });
    xhr.addEventListener("load", function () {
      if (xhr.status >= 200 && xhr.status < 300) {
        var body = JSON.parse(xhr.responseText);
        window.location.assign(body.redirect);
        return;
      }
      // The server answered with the page, errors beside the fields: show it in place.
      var page = new DOMParser().parseFromString(xhr.responseText, "text/html");
      var fresh = page.querySelector("main");
      if (fresh) document.querySelector("main").replaceWith(fresh);
      else status.textContent = "Upload failed (" + xhr.status + ").";
      var again = document.getElementById("upload-form");
      if (again && again !== form) {
        // Re-run this script's setup for the new form.
        var script = document.createElement("script");
        script.src = self;
        document.body.appendChild(script);
      }
    });
    xhr.addEventListener("error", function () {
      status.textContent = "The upload failed: the connection was lost.";
      button.disabled = false;
    });
    bar.hidden = false;
    bar.value = 0;
    button.disabled = true;
    status.textContent = "Uploading…";
    xhr.send(data);
  });
})();
