// Shared helpers: CSRF header on every state-changing fetch, element builder (text only, never HTML).
"use strict";
window.cyto = {
  csrf: document.querySelector('meta[name="csrf-token"]').content,
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k === "style") node.style.cssText = v;  // CSSOM: allowed by the CSP, a style attribute is not
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  },
  async api(url, options) {
    const opts = Object.assign({headers: {}}, options || {});
    opts.headers = Object.assign({"Accept": "application/json"}, opts.headers);
    if (opts.method && opts.method !== "GET") opts.headers["X-CSRF-Token"] = window.cyto.csrf;
    if (opts.json !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(opts.json);
      delete opts.json;
    }
    const response = await fetch(url, opts);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.description || response.statusText);
    return body;
  },
  caseUrl(series) { return "/api/cases/" + encodeURIComponent(series); },
};
