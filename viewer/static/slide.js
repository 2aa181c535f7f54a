"use strict";
(async function () {
  const {el, api} = window.cyto;
  const box = document.getElementById("osd");
  const series = box.dataset.series;
  const base = "/api/slides/" + encodeURIComponent(series);
  const state = window.cytonodeSlide = {tilesLoaded: 0, tilesFailed: 0, overlays: 0, ready: false, heatmap: null};
  // Legend colours: set here, as the page's Content-Security-Policy allows no style attributes.
  for (const swatch of document.querySelectorAll(".swatch[data-colour]")) swatch.style.background = swatch.dataset.colour;
  const [info, kase] = await Promise.all([api(base + "/info"), api(window.cyto.caseUrl(series))]);
  const name = label => (kase.class_names && kase.class_names[label]) || label;
  state.flagged = kase.cells.filter(c => c.flagged).length;
  const viewer = OpenSeadragon({
    element: box, prefixUrl: box.dataset.prefix, drawer: "canvas", showNavigator: true,
    maxZoomPixelRatio: 4, crossOriginPolicy: false,
    tileSources: {
      width: info.width, height: info.height, tileSize: info.tile_size, tileOverlap: 0,
      minLevel: info.min_level, maxLevel: info.max_level,
      // k = how many times the level is halved: the stored frame of that level, as it is
      getTileUrl: (level, x, y) => base + "/tiles/" + (info.max_level - level) + "/" + x + "_" + y + ".jpg",
    },
  });
  viewer.addHandler("tile-loaded", () => { state.tilesLoaded += 1; });
  viewer.addHandler("tile-load-failed", () => { state.tilesFailed += 1; });
  const boxes = [];
  function openCell(id) { window.location.href = box.dataset.review + "#cell-" + id; }
  viewer.addHandler("open", () => {
    const tiled = viewer.world.getItemAt(0);
    for (const cell of kase.cells) {
      const [x0, y0, x1, y1] = cell.bbox;
      const colour = kase.colours[cell.label] || "#ffffff";
      const node = el("div", {class: "cell-box" + (cell.flagged ? " flagged" : "") + (cell.changed ? " changed" : ""),
        title: "Cell " + cell.cell_id + ": " + name(cell.label) + " (p " + cell.probability.toFixed(2) + ")"
          + (cell.flagged ? ", flagged: " + cell.review_labels.join(", ") : ""),
        dataset: {cell: cell.cell_id}});
      node.style.borderColor = colour;
      viewer.addOverlay({element: node, location: tiled.imageToViewportRectangle(x0, y0, x1 - x0, y1 - y0)});
      new OpenSeadragon.MouseTracker({element: node, clickHandler: () => openCell(cell.cell_id)});
      boxes.push(node);
    }
    state.overlays = boxes.length;
    state.ready = true;
  });
  document.getElementById("show-cells").addEventListener("change", e => {
    for (const b of boxes) b.style.display = e.target.checked ? "" : "none";
  });
  document.getElementById("cell-count").textContent = "(" + kase.cells.length + ")";
  document.getElementById("cell-list").replaceChildren(...kase.cells.map(cell => el("li", {},
    el("a", {href: "#", onclick: ev => {
      ev.preventDefault();
      const [x0, y0, x1, y1] = cell.bbox;
      const tiled = viewer.world.getItemAt(0);
      viewer.viewport.fitBounds(tiled.imageToViewportRectangle(x0 - 50, y0 - 50, x1 - x0 + 100, y1 - y0 + 100));
    }}, "Cell " + cell.cell_id + ": " + (cell.unclassifiable ? "unclassifiable" : name(cell.label))
      + (cell.flagged ? " (flagged: " + cell.review_labels.join(", ") + ")" : "")), " ",
    el("a", {href: box.dataset.review + "#cell-" + cell.cell_id}, "review"))));
  // Heatmap: the analysis grid as one image over the slide, its opacity under the slider.
  let heat = null;
  const kind = document.getElementById("heatmap-kind");
  const opacity = document.getElementById("heatmap-opacity");
  kind.addEventListener("change", () => {
    if (heat) { viewer.world.removeItem(heat); heat = null; }
    const option = kind.selectedOptions[0];
    document.getElementById("heatmap-key").hidden = !kind.value;
    document.getElementById("heatmap-legend").textContent = kind.value ? option.textContent + ": " + option.dataset.legend : "";
    if (!kind.value) return;
    const widthPx = Number(option.dataset.cols) * Number(option.dataset.cell);
    viewer.addTiledImage({
      tileSource: {type: "image", url: base + "/heatmaps/" + encodeURIComponent(kind.value) + ".png"},
      x: 0, y: 0, width: widthPx / info.width, opacity: Number(opacity.value),
      success: ev => { heat = ev.item; state.heatmap = kind.value; },
      error: ev => { state.heatmapError = String(ev.message || "failed"); },
    });
  });
  opacity.addEventListener("input", () => { if (heat) heat.setOpacity(Number(opacity.value)); });
})();
