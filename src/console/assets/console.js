// imattr console: the one script of the console (no inline scripts: the
// Content-Security-Policy forbids them). It draws the overview's charts as
// SVG from /console/api/overview, refreshing them every few seconds, and
// drives the dead-letter pages' selections, confirmations and job progress.
"use strict";

(function () {
  var SVG = "http://www.w3.org/2000/svg";
  var REFRESH_MS = 3000;

  function csrf() {
    var m = document.querySelector('meta[name="csrf-token"]');
    return m ? m.getAttribute("content") : "";
  }

  function fmt(v) {
    if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "–";
    if (typeof v !== "number") return String(v);
    if (Math.round(v) === v) return String(v);
    return Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2);
  }

  function get(obj, path) {
    return path.split(".").reduce(function (o, k) {
      return o === null || o === undefined ? undefined : o[k];
    }, obj);
  }

  // ---- overview -------------------------------------------------------

  function lastOf(arr) {
    return arr && arr.length ? arr[arr.length - 1] : null;
  }

  function derived(o) {
    var s = o.series;
    var now = {};
    Object.keys(s).forEach(function (k) {
      if (Array.isArray(s[k])) now[k] = lastOf(s[k]);
    });
    o.now = now;
    var dead = 0;
    Object.keys(o.latest.dead_lettered || {}).forEach(function (r) {
      dead += o.latest.dead_lettered[r];
    });
    o.latest.dead_lettered_total = dead;
    if (o.worker) {
      o.worker.paused =
        o.worker.paused_code !== null && o.worker.paused_code !== undefined
          ? "ErrorCode " + o.worker.paused_code + ": " + (o.worker.paused_message || "")
          : null;
    }
    return o;
  }

  function seriesOf(o, spec) {
    var out = [];
    spec.split(",").forEach(function (key, i) {
      if (/\.\*$/.test(key)) {
        var map = get(o.series, key.slice(0, -2)) || {};
        Object.keys(map).forEach(function (k) {
          out.push({ name: k, values: map[k] });
        });
      } else {
        out.push({ key: key, index: i, values: get(o.series, key) || [] });
      }
    });
    return out;
  }

  function draw(fig, o) {
    var svg = fig.querySelector("svg");
    var legend = fig.querySelector(".legend");
    var labels = (fig.getAttribute("data-labels") || "").split(",");
    var lines = seriesOf(o, fig.getAttribute("data-series"));
    lines.forEach(function (l) {
      if (l.name === undefined) l.name = labels[l.index] || l.key;
    });
    var W = 600, H = 150, PAD = 6;
    // The last 15 minutes once there are; until then what there is (at least a minute).
    var t1 = o.now_ms;
    var first = o.series.t_ms.length ? o.series.t_ms[0] : t1;
    var t0 = Math.max(t1 - o.window_ms, Math.min(first, t1 - 60000));
    var max = 0;
    lines.forEach(function (l) {
      l.values.forEach(function (v) {
        if (v !== null && v > max) max = v;
      });
    });
    var top = max > 0 ? max * 1.1 : 1;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    [0.25, 0.5, 0.75].forEach(function (f) {
      var g = document.createElementNS(SVG, "line");
      g.setAttribute("x1", 0);
      g.setAttribute("x2", W);
      g.setAttribute("y1", PAD + (H - 2 * PAD) * f);
      g.setAttribute("y2", PAD + (H - 2 * PAD) * f);
      g.setAttribute("class", "grid");
      svg.appendChild(g);
    });
    lines.forEach(function (l, i) {
      var segs = [], cur = [];
      l.values.forEach(function (v, j) {
        var t = o.series.t_ms[j];
        if (v === null || v === undefined) {
          if (cur.length) segs.push(cur);
          cur = [];
          return;
        }
        var x = ((t - t0) / (t1 - t0)) * W;
        var y = H - PAD - (v / top) * (H - 2 * PAD);
        cur.push(x.toFixed(1) + "," + y.toFixed(1));
      });
      if (cur.length) segs.push(cur);
      segs.forEach(function (pts) {
        var p = document.createElementNS(SVG, "polyline");
        p.setAttribute("points", pts.length === 1 ? pts[0] + " " + pts[0] : pts.join(" "));
        p.setAttribute("class", "line s" + (i % 6));
        p.setAttribute("vector-effect", "non-scaling-stroke");
        svg.appendChild(p);
      });
    });
    while (legend.firstChild) legend.removeChild(legend.firstChild);
    lines.forEach(function (l, i) {
      var item = document.createElement("span");
      item.className = "item";
      var sw = document.createElement("span");
      sw.className = "swatch s" + (i % 6);
      item.appendChild(sw);
      item.appendChild(document.createTextNode(l.name + " " + fmt(lastOf(l.values))));
      item.setAttribute("data-name", l.name);
      legend.appendChild(item);
    });
    var peak = document.createElement("span");
    peak.className = "peak";
    peak.textContent = "peak " + fmt(max);
    legend.appendChild(peak);
  }

  function refreshOverview() {
    fetch("/console/api/overview", { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (o) {
        derived(o);
        document.querySelectorAll("[data-field]").forEach(function (el) {
          var v = get(o, el.getAttribute("data-field"));
          el.textContent = fmt(v);
          if (el.id === "worker-state") el.className = "state state-" + v;
        });
        document.querySelectorAll("figure.chart").forEach(function (fig) {
          draw(fig, o);
        });
        var at = document.getElementById("updated-at");
        if (at) {
          at.textContent = new Date(o.now_ms).toLocaleTimeString();
          at.setAttribute("data-refreshes", String(Number(at.getAttribute("data-refreshes") || "0") + 1));
        }
        document.body.classList.remove("stale");
      })
      .catch(function () {
        document.body.classList.add("stale");
      });
  }

  // ---- dead letters ---------------------------------------------------

  function initSelection() {
    var all = document.getElementById("select-all");
    var boxes = function () {
      return Array.prototype.slice.call(document.querySelectorAll("input.row-select"));
    };
    function update() {
      var n = boxes().filter(function (b) { return b.checked; }).length;
      document.querySelectorAll("[data-selected-count]").forEach(function (el) {
        el.textContent = String(n);
      });
      document.querySelectorAll("button[data-needs-selection]").forEach(function (b) {
        b.disabled = n === 0;
      });
    }
    if (all) {
      all.addEventListener("change", function () {
        boxes().forEach(function (b) { b.checked = all.checked; });
        update();
      });
    }
    boxes().forEach(function (b) { b.addEventListener("change", update); });
    update();
  }

  // A form with data-confirm asks first, naming the count it acts on.
  function initConfirm() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        var submitter = ev.submitter;
        var scope = submitter ? submitter.value : "";
        var count =
          scope === "selected"
            ? document.querySelectorAll("input.row-select:checked").length
            : form.getAttribute("data-matching");
        var msg = form.getAttribute("data-confirm").replace("{count}", String(count));
        if (!window.confirm(msg)) ev.preventDefault();
      });
    });
  }

  function refreshJob(box) {
    var id = box.getAttribute("data-job");
    fetch("/console/api/jobs/" + encodeURIComponent(id), { credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(function (j) {
        box.querySelectorAll("[data-job-field]").forEach(function (el) {
          el.textContent = fmt(get(j, el.getAttribute("data-job-field")));
        });
        var bar = box.querySelector("progress");
        if (bar) {
          bar.max = Math.max(1, j.total || 0);
          bar.value = (j.moved || 0) + (j.failed || 0);
        }
        box.setAttribute("data-state", j.state);
        if (j.state === "running") setTimeout(function () { refreshJob(box); }, 1000);
        else {
          var cancel = box.querySelector("form.cancel");
          if (cancel) cancel.hidden = true;
        }
      })
      .catch(function () { setTimeout(function () { refreshJob(box); }, 3000); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (document.querySelector("figure.chart")) {
      refreshOverview();
      setInterval(refreshOverview, REFRESH_MS);
    }
    initSelection();
    initConfirm();
    document.querySelectorAll("[data-job]").forEach(refreshJob);
    // The count of everything matching comes after the rows: counting reads the whole store.
    document.querySelectorAll("[data-stats]").forEach(function (el) {
      fetch(el.getAttribute("data-stats"), { credentials: "same-origin" })
        .then(function (r) {
          if (!r.ok) throw new Error("HTTP " + r.status);
          return r.json();
        })
        .then(function (s) {
          el.textContent = String(s.total);
          var all = document.querySelectorAll("#replay-matching, #delete-matching");
          all.forEach(function (b) { b.textContent = b.textContent.replace(/ all.*$/, " all " + s.total); });
        })
        .catch(function () { el.textContent = "(cannot count)"; });
    });
    document.querySelectorAll("form").forEach(function (f) {
      var input = f.querySelector('input[name="csrf"]');
      if (input && !input.value) input.value = csrf();
    });
  });
})();
