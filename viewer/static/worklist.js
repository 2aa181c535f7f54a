"use strict";
(function () {
  const {el, api} = window.cyto;
  let sort = "received_at", order = "desc";
  const tbody = document.querySelector("#worklist tbody");
  function fmtTime(ts) { return new Date(ts * 1000).toLocaleString(); }
  async function refresh() {
    const params = new URLSearchParams({sort, order});
    const status = document.getElementById("status").value;
    const q = document.getElementById("q").value.trim();
    if (status) params.set("status", status);
    if (q) params.set("q", q);
    try {
      const data = await api("/api/worklist?" + params);
      tbody.replaceChildren(...data.cases.map(row => {
        const series = encodeURIComponent(row.series_instance_uid);
        const open = row.status === "ready for review" || row.status === "signed";
        return el("tr", {class: "status-" + row.status.replace(/ /g, "-"), dataset: {series: row.series_instance_uid}},
          el("td", {}, (row.patient_name || "").split("^").filter(Boolean).join(" ")), el("td", {}, row.patient_id), el("td", {}, row.accession_number),
          el("td", {}, row.study_date), el("td", {}, row.study_description + " / " + row.series_description),
          el("td", {class: "status"}, row.status + (row.status === "analysing" && row.progress ? " (" + row.progress + ")" : "")),
          el("td", {}, row.cell_count ?? ""), el("td", {class: "flagged", dataset: {flagged: row.flagged ?? ""}}, row.flag_text ?? ""),
          el("td", {}, fmtTime(row.received_at)),
          el("td", {}, open ? el("a", {href: "/slides/" + series, class: "open-slide"}, "Slide") : "", " ",
            open ? el("a", {href: "/cases/" + series, class: "open-review"}, "Review") : ""));
      }));
      document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      document.getElementById("updated").textContent = "update failed: " + e.message;
    }
  }
  document.querySelectorAll("#worklist th[data-sort]").forEach(th => th.addEventListener("click", () => {
    const key = th.dataset.sort;
    order = (sort === key && order === "desc") ? "asc" : "desc";
    sort = key;
    refresh();
  }));
  document.getElementById("status").addEventListener("change", refresh);
  document.getElementById("q").addEventListener("input", refresh);
  refresh();
  setInterval(refresh, 5000);  // status updates without reloading the page
})();
