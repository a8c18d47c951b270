// Training curves on the job page: one chart per metric family (loss, accuracy, ...),
// fed from the UI's session-authenticated metrics.json and redrawn every 2 s while the
// job runs. Served from /static so the page's CSP needs no inline script.
(function () {
  "use strict";
  var box = document.getElementById("charts");
  if (!box || typeof Chart === "undefined") return;
  var url = box.dataset.url;
  var xLabel = box.dataset.xLabel || "epoch";
  var charts = {};
  var palette = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#dc2626"];

  // train_loss and val_loss share the "loss" chart; val_accuracy goes on "accuracy".
  function family(name) {
    var lower = name.toLowerCase();
    if (lower.endsWith("loss")) return "loss";
    if (lower.endsWith("accuracy") || lower.endsWith("acc")) return "accuracy";
    return name;
  }

  // Axis labels people read: three significant figures, and very small or large values
  // (a learning rate of 0.0003) in exponent form, never "0.000300" with six decimals.
  function tick(value) {
    var v = Number(value);
    if (v === 0) return "0";
    var size = Math.abs(v);
    if (size < 1e-3 || size >= 1e5) return v.toExponential(1).replace("e-", "e\u2212");
    return String(Number(v.toPrecision(3)));
  }

  function chartFor(fam) {
    if (charts[fam]) return charts[fam];
    var figure = document.createElement("figure");
    figure.className = "chart";
    figure.dataset.family = fam;
    var caption = document.createElement("figcaption");
    caption.textContent = fam;
    var canvas = document.createElement("canvas");
    figure.appendChild(caption);
    figure.appendChild(canvas);
    box.appendChild(figure);
    charts[fam] = new Chart(canvas, {
      type: "line",
      data: { datasets: [] },
      options: {
        animation: false,
        maintainAspectRatio: false,
        parsing: false,
        interaction: { mode: "nearest", intersect: false },
        scales: {
          x: { type: "linear", title: { display: true, text: xLabel }, ticks: { precision: 0 } },
          y: Object.assign(
            { ticks: { callback: tick, maxTicksLimit: 6 } },
            fam === "accuracy" ? { suggestedMin: 0, suggestedMax: 1 } : {}
          ),
        },
        plugins: { legend: { position: "bottom" } },
      },
    });
    return charts[fam];
  }

  function draw(series) {
    // Loss first, then accuracy, then the rest (the learning rate...) by name.
    var rank = function (name) {
      var fam = family(name);
      return fam === "loss" ? 0 : fam === "accuracy" ? 1 : 2;
    };
    var names = Object.keys(series).sort(function (a, b) {
      return rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0);
    });
    var empty = document.getElementById("charts-empty");
    if (empty && names.length) empty.remove();
    names.forEach(function (name) {
      var chart = chartFor(family(name));
      var points = series[name].map(function (p) { return { x: p[0], y: p[1] }; });
      var found = chart.data.datasets.find(function (d) { return d.label === name; });
      if (!found) {
        var color = palette[chart.data.datasets.length % palette.length];
        found = { label: name, data: [], borderColor: color, backgroundColor: color,
                  pointRadius: 2, borderWidth: 2, tension: 0.2 };
        chart.data.datasets.push(found);
      }
      found.data = points;
      chart.update();
    });
    box.dataset.points = String(names.reduce(function (n, k) { return n + series[k].length; }, 0));
  }

  function poll() {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (body) {
        draw(body.series);
        box.dataset.state = body.state;  // the state these points were read with
        if (!body.terminal) setTimeout(poll, 2000);
        else box.dataset.done = "1";
      })
      .catch(function () { setTimeout(poll, 5000); });
  }
  poll();
})();
