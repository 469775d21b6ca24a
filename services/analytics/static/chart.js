// Draws the figure of a Coinlytics chart page. It lives in a file rather than inline so the page works
// under a Content-Security-Policy of script-src 'self'; the figure itself is a JSON data block in the page.
(function () {
  "use strict";

  var DARK = "(prefers-color-scheme: dark)";

  function textColour(dark) {
    return dark ? "#d4d4d4" : "#303030";
  }

  function draw() {
    var target = document.getElementById("coinlytics-chart");
    var source = document.getElementById("coinlytics-chart-data");
    if (!target || !source) {
      return;
    }
    if (typeof window.Plotly === "undefined") {
      target.textContent = "The chart could not be drawn: the Plotly script did not load.";
      return;
    }
    var spec;
    try {
      spec = JSON.parse(source.textContent);
    } catch (err) {
      target.textContent = "The chart could not be drawn: its data is not valid JSON.";
      return;
    }
    var figure = spec.figure || {};
    var layout = figure.layout || {};
    var scheme = window.matchMedia ? window.matchMedia(DARK) : null;
    // The figure's neutral grey reads on both themes; a full page can afford the stronger contrast.
    layout.font = Object.assign({}, layout.font, { color: textColour(scheme && scheme.matches) });
    layout.autosize = true;
    // Styles set from script are allowed under a strict style-src, unlike inline style attributes.
    document.body.style.margin = "0";
    target.style.width = "100%";
    target.style.height = "100vh";
    window.Plotly.newPlot(target, figure.data || [], layout, spec.config || {});
    if (scheme && scheme.addEventListener) {
      scheme.addEventListener("change", function (event) {
        window.Plotly.relayout(target, { "font.color": textColour(event.matches) });
      });
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
