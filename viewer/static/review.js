"use strict";
(function () {
  const {el, api} = window.cyto;
  const root = document.getElementById("review");
  const series = root.dataset.series;
  const caseUrl = window.cyto.caseUrl(series);
  let kase = null, selected = null, busy = false;
  const state = window.cytonodeReview = {changes: 0, rendered: 0, seen: 0};

  function say(text) { document.getElementById("status").textContent = text; }
  function pct(v) { return v === null ? "" : v.toFixed(1); }
  function name(label) { return (kase.class_names && kase.class_names[label]) || label; }

  function card(cell) {
    const url = caseUrl + "/cells/" + cell.cell_id;
    const top = Object.entries(cell.probabilities).sort((a, b) => b[1] - a[1]).slice(0, 3);
    const classes = "cell-card" + (cell.flagged ? " flagged" : "") + (cell.changed ? " changed" : "")
      + (cell.flagged && !cell.looked_at ? " unseen" : "") + (cell.cell_id === selected ? " selected" : "");
    const buttons = kase.classes.map((label, i) => el("button", {type: "button", class: "cls",
      title: "key " + (i + 1) + ": " + name(label), disabled: kase.signed ? "disabled" : null,
      dataset: {label: label},
      onclick: ev => { ev.stopPropagation(); select(cell.cell_id); change({label: label}); }},
      name(label)));
    const flags = [...(cell.review_labels || []).map(r => "review: " + r),
      cell.abnormal ? "marked abnormal" : "", cell.unclassifiable ? "unclassifiable" : ""].filter(Boolean);
    return el("figure", {class: classes, id: "cell-" + cell.cell_id, tabindex: "0",
        dataset: {cell: cell.cell_id, label: cell.label}, onclick: () => select(cell.cell_id)},
      el("div", {class: "images"},
        el("img", {src: url + "/crop.jpg", alt: "Cell " + cell.cell_id, loading: "lazy", width: "128", height: "128"}),
        el("img", {src: url + "/heatmap.jpg", alt: "counterfactual heatmap", class: "heat", loading: "lazy", width: "128", height: "128"})),
      el("figcaption", {},
        el("span", {class: "number"}, "Cell " + cell.cell_id),
        el("strong", {class: "label", style: "color:" + (kase.colours[cell.label] || "#000")},
          cell.unclassifiable ? "unclassifiable" : name(cell.label)),
        cell.changed && cell.original_label !== cell.label ? el("span", {class: "was"}, " (was " + name(cell.original_label) + ")") : "",
        el("div", {class: "scores"}, "uncertainty " + cell.uncertainty.toFixed(3) + " · anomaly " + cell.anomaly_score.toFixed(2)),
        el("div", {class: "probs"}, top.map(([k, v]) => name(k) + " " + (100 * v).toFixed(0) + "%").join(", ")),
        el("div", {class: "flags"}, flags.length ? el("ul", {}, ...flags.map(f => el("li", {class: "reason"}, f))) : ""),
        el("div", {class: "buttons"}, ...buttons,
          el("button", {type: "button", class: "flag", title: "key a", disabled: kase.signed ? "disabled" : null, onclick: ev => { ev.stopPropagation(); select(cell.cell_id); change({abnormal: !cell.abnormal}); }}, "abnormal"),
          el("button", {type: "button", class: "flag", title: "key x", disabled: kase.signed ? "disabled" : null, onclick: ev => { ev.stopPropagation(); select(cell.cell_id); change({unclassifiable: !cell.unclassifiable}); }}, "unclassifiable"))));
  }

  function render() {
    const gallery = document.getElementById("gallery");
    const groups = [];
    let current = null;
    for (const cell of kase.cells) {
      const group = cell.unclassifiable ? "unclassifiable" : cell.label;
      if (!current || current.name !== group) { current = {name: group, cells: []}; groups.push(current); }
      current.cells.push(cell);
    }
    gallery.replaceChildren(...groups.map(g => el("section", {class: "group"},
      el("h3", {}, name(g.name) + " (" + g.cells.length + ")"), el("div", {class: "cards"}, ...g.cells.map(card)))));
    const report = kase.report;
    const tbody = document.querySelector("#differential tbody");
    tbody.replaceChildren(...report.rows.filter(r => r.white_cell).map(r => el("tr", {dataset: {label: r.label}},
      el("td", {}, r.name), el("td", {class: "count"}, r.count), el("td", {}, pct(r.percentage)),
      el("td", {}, r.ci95 ? pct(r.ci95[0]) + "-" + pct(r.ci95[1]) : ""))));
    document.getElementById("differential-caption").textContent = "White-cell differential on " + report.white_cells + " white cells";
    const note = document.getElementById("differential-note");
    note.textContent = report.note || "";
    note.hidden = !report.note;
    document.getElementById("nrbc").textContent = report.text.nrbc;
    document.getElementById("platelets").textContent = report.text.platelets;
    document.getElementById("flag-count").textContent = report.text.flags;
    document.getElementById("unreviewed-count").textContent = kase.unreviewed_flagged.length;
    chart();
    document.getElementById("changes-text").textContent =
      kase.changes + (kase.changes === 1 ? " cell changed." : " cells changed.");
    document.getElementById("undo").disabled = kase.signed || !kase.can_undo;
    state.changes = kase.changes;
    state.rendered += 1;
    if (kase.signed) say("Version " + kase.version + " is signed: read-only.");
  }

  function chart() {
    const svg = document.getElementById("chart");
    const ns = "http://www.w3.org/2000/svg";
    const rowH = 18, width = 260;
    const rows = kase.report.rows.filter(r => r.white_cell);
    svg.setAttribute("viewBox", "0 0 " + width + " " + rowH * rows.length);
    svg.replaceChildren();
    rows.forEach((r, i) => {
      const y = i * rowH, scale = (width - 130) / 100;
      const add = (tag, attrs, text) => {
        const n = document.createElementNS(ns, tag);
        for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
        if (text !== undefined) n.textContent = text;
        svg.append(n);
      };
      add("text", {x: 0, y: y + 13, "font-size": 10}, r.name);
      if (r.percentage !== null) {
        add("rect", {x: 125, y: y + 3, width: Math.max(0.5, r.percentage * scale), height: rowH - 6, fill: kase.colours[r.label]});
        add("line", {x1: 125 + r.ci95[0] * scale, x2: 125 + r.ci95[1] * scale, y1: y + rowH / 2, y2: y + rowH / 2, stroke: "#999", "stroke-width": 1.5});
      }
    });
  }

  // record: false for the page's own first selection (nobody chose that cell yet)
  function select(id, record = true) {
    selected = id;
    document.querySelectorAll(".cell-card.selected").forEach(n => n.classList.remove("selected"));
    const node = document.getElementById("cell-" + id);
    if (node) { node.classList.add("selected"); node.focus({preventScroll: true}); node.scrollIntoView({block: "nearest"}); }
    if (record) seen(id);
  }

  // Opening or selecting a cell records that the reviewer looked at it (sign-off asks about
  // flagged cells nobody looked at).
  async function seen(id) {
    const cell = kase && kase.cells.find(c => c.cell_id === id);
    if (!cell || cell.looked_at || kase.signed) return;
    cell.looked_at = true;
    try {
      await api(caseUrl + "/cells/" + id + "/seen", {method: "POST"});
      kase.unreviewed_flagged = kase.unreviewed_flagged.filter(x => x !== id);
      document.getElementById("unreviewed-count").textContent = kase.unreviewed_flagged.length;
      const node = document.getElementById("cell-" + id);
      if (node) node.classList.remove("unseen");
      state.seen += 1;
    } catch (e) { cell.looked_at = false; }
  }

  async function change(body) {
    if (selected === null || busy || kase.signed) return;
    busy = true;
    try {
      kase = await api(caseUrl + "/cells/" + selected, {method: "POST", json: body});
      render();
      select(selected);
      say("Cell " + selected + " changed.");
    } catch (e) { say("Not changed: " + e.message); }
    busy = false;
  }

  async function undo() {
    if (busy || kase.signed) return;
    busy = true;
    try { kase = await api(caseUrl + "/undo", {method: "POST"}); render(); if (selected !== null) select(selected); say("Undone."); }
    catch (e) { say("Nothing undone: " + e.message); }
    busy = false;
  }

  function move(step) {
    const ids = kase.cells.map(c => c.cell_id);
    const at = ids.indexOf(selected);
    const next = ids[Math.min(ids.length - 1, Math.max(0, at + step))];
    if (next !== undefined) select(next);
  }

  document.addEventListener("keydown", ev => {
    if (ev.target.matches("input, textarea, select") || ev.ctrlKey || ev.metaKey || ev.altKey || !kase) return;
    const n = Number(ev.key);
    if (n >= 1 && n <= kase.classes.length) { change({label: kase.classes[n - 1]}); ev.preventDefault(); }
    else if (ev.key === "a") { const c = kase.cells.find(c => c.cell_id === selected); if (c) change({abnormal: !c.abnormal}); }
    else if (ev.key === "x") { const c = kase.cells.find(c => c.cell_id === selected); if (c) change({unclassifiable: !c.unclassifiable}); }
    else if (ev.key === "z") undo();
    else if (ev.key === "ArrowRight" || ev.key === "ArrowDown") { move(1); ev.preventDefault(); }
    else if (ev.key === "ArrowLeft" || ev.key === "ArrowUp") { move(-1); ev.preventDefault(); }
  });
  document.getElementById("undo").addEventListener("click", undo);

  api(caseUrl).then(data => {
    kase = data;
    render();
    const hash = window.location.hash.match(/^#cell-(\d+)$/);
    const first = kase.cells.find(c => c.flagged) || kase.cells[0];
    if (hash) select(Number(hash[1])); else if (first) select(first.cell_id, false);
  }).catch(e => say("Could not load the case: " + e.message));
})();
