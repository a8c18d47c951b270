// Live pages: the job page and the jobs list follow their jobs' streams (EventSource on
// /jobs/<id>/stream, the API's stream on the session's key) and re-fetch their htmx
// fragments when an event says something changed. While every job a page shows is
// streamed, its every-2-s polls are skipped; when a stream drops, is refused (the key or
// the web process at its limit) or the browser has no EventSource, the polls go on as
// before. The jobs list still polls every 10 s, for jobs submitted elsewhere.
(function () {
  "use strict";
  if (!window.EventSource || !window.htmx) return;
  var MAX_LIST_STREAMS = 6;   // well under the per-key limit (KILN_STREAMS_PER_KEY)
  var LIST_POLL_MS = 10000;
  var TERMINAL = { succeeded: true, failed: true, cancelled: true };
  var sources = {};           // stream URL -> EventSource
  var asked = {};             // fragment id -> a stream event asked for this fetch
  var timers = {};
  var listLoadedAt = Date.now();

  function refresh(id) {
    if (timers[id]) return;   // coalesce a burst of events into one fetch
    timers[id] = setTimeout(function () {
      delete timers[id];
      var el = document.getElementById(id);
      if (!el) return;
      asked[id] = true;
      htmx.trigger(el, "kiln:update");
    }, 250);
  }

  function open(url, targets) {
    if (sources[url]) return;
    var source = new EventSource(url);
    sources[url] = source;
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) delete sources[url];  // refused: poll
    };
    ["state", "progress", "log"].forEach(function (type) {
      source.addEventListener(type, function (event) {
        targets(type).forEach(refresh);
        if (type === "state" && TERMINAL[JSON.parse(event.data).state]) {
          source.close();
          delete sources[url];
        }
      });
    });
  }

  function live(url) { return sources[url] && sources[url].readyState === EventSource.OPEN; }

  function rowStreams() {
    var rows = document.querySelectorAll("#jobs-table [data-stream]");
    return Array.prototype.map.call(rows, function (row) { return row.dataset.stream; });
  }

  function syncList() {
    var urls = rowStreams();
    Object.keys(sources).forEach(function (url) {
      if (urls.indexOf(url) < 0) { sources[url].close(); delete sources[url]; }
    });
    if (urls.length > MAX_LIST_STREAMS) return;  // too many to stream: the table polls
    urls.forEach(function (url) {
      open(url, function () { return ["jobs-table"]; });
    });
  }

  function covered(id) {
    if (id === "jobs-table") {
      if (Date.now() - listLoadedAt > LIST_POLL_MS) return false;
      var urls = rowStreams();
      return urls.length <= MAX_LIST_STREAMS && urls.every(live);
    }
    var page = document.getElementById("job-stream");
    return !!page && live(page.dataset.url);
  }

  document.body.addEventListener("htmx:beforeRequest", function (event) {
    var id = event.detail.elt && event.detail.elt.id;
    if (id !== "jobs-table" && id !== "job-live" && id !== "job-log") return;
    if (asked[id]) { asked[id] = false; return; }
    if (covered(id)) event.preventDefault();  // a poll the stream makes needless
  });
  document.body.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail.target && event.detail.target.id === "jobs-table") {
      listLoadedAt = Date.now();
      syncList();
    }
  });

  var page = document.getElementById("job-stream");
  if (page) {
    open(page.dataset.url, function (type) {
      return type === "log" ? ["job-log"] : type === "state" ? ["job-live", "job-log"] : ["job-live"];
    });
  }
  if (document.getElementById("jobs-table")) syncList();
})();
