// Rocket Relay portal: the little script the pages need (loaded from 'self'; no inline script anywhere).
(function () {
  "use strict";

  // Copy buttons: <button data-copy="input-id">.
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) return;
    var input = document.getElementById(button.getAttribute("data-copy"));
    input.select();
    var done = function () { button.textContent = "Copied"; };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(input.value).then(done, function () { document.execCommand("copy"); done(); });
    } else {
      document.execCommand("copy");
      done();
    }
  });

  // Forms that destroy something ask first: <form data-confirm="…">.
  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) event.preventDefault();
  }, true);

  // The usage chart: data from a JSON block the server rendered; Chart.js loaded on that page only.
  function drawUsage() {
    var canvas = document.getElementById("usage-chart");
    var source = document.getElementById("usage-chart-data");
    if (!canvas || !source || !window.Chart) return;
    var data = JSON.parse(source.textContent);
    var palette = ["#1d4ed8", "#059669", "#d97706", "#7c3aed", "#dc2626", "#0891b2", "#4b5563", "#db2777"];
    new window.Chart(canvas, {
      type: "bar",
      data: {
        labels: data.labels.map(function (d) { return d.slice(5); }),
        datasets: data.series.map(function (s, i) {
          return { label: s.model, data: s.data.map(function (m) { return m / 1e6; }),
                   backgroundColor: palette[i % palette.length] };
        })
      },
      options: {
        responsive: true, maintainAspectRatio: false, animation: false,
        scales: { x: { stacked: true }, y: { stacked: true, title: { display: true, text: "USD" },
          ticks: { callback: function (v) { return "$" + Number(v).toLocaleString("en-US", { maximumSignificantDigits: 3 }); } } } },
        plugins: { tooltip: { callbacks: { label: function (ctx) {
          return ctx.dataset.label + ": $" + ctx.parsed.y.toFixed(6);
        } } } }
      }
    });
  }
  document.addEventListener("DOMContentLoaded", drawUsage);
})();
