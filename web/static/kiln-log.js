// The job page's log box follows its tail: it opens at the newest line and stays there as
// htmx swaps in fresh lines every 2 s, unless the reader has scrolled up to read; then
// their place is kept until they scroll back to the bottom. Without scripts the box
// simply opens at the top.
(function () {
  "use strict";
  var SLACK = 24;  // px from the bottom that still count as "at the newest line"
  var following = true;
  var kept = 0;

  function box() { return document.getElementById("log-lines"); }

  function atBottom(el) { return el.scrollHeight - el.scrollTop - el.clientHeight <= SLACK; }

  function place() {
    var el = box();
    if (!el) return;
    el.scrollTop = following ? el.scrollHeight : kept;
    if (el.dataset.follows) return;  // a box htmx has not replaced keeps its listener
    el.dataset.follows = "1";
    el.addEventListener("scroll", function () {
      following = atBottom(el);
      kept = el.scrollTop;
    }, { passive: true });
  }

  document.body.addEventListener("htmx:beforeSwap", function (event) {
    var el = box();
    if (el && event.detail.target && event.detail.target.id === "job-log") {
      following = atBottom(el);
      kept = el.scrollTop;
    }
  });
  // Right after any swap (not at settle, 20 ms later: the new box would show its top for
  // a frame): the log's own, or the first one that brings the box in at all.
  document.body.addEventListener("htmx:afterSwap", place);
  place();
})();
