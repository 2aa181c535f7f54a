// Browser test of the viewer: headless Chromium driven by playwright-core (run by test_browser.py).
// Logs in, opens the case from the worklist, waits for tiles and cell overlays, opens a cell by
// clicking its outline, reclassifies it with the keyboard, signs off and prints what happened as JSON.
// Environment: BASE_URL, SERIES, USERNAME, PASSWORD, CHROMIUM, SCREENSHOTS (a folder).
"use strict";
const path = require("path");
const { chromium } = require("playwright-core");

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};

async function main() {
  const base = env("BASE_URL"), series = env("SERIES"), shots = env("SCREENSHOTS");
  const browser = await chromium.launch({ executablePath: env("CHROMIUM"), headless: true,
    args: ["--no-sandbox", "--disable-gpu"] });
  const out = { tiles: { "stored-frame": 0, rendered: 0, failed: 0 }, errors: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.on("pageerror", (e) => out.errors.push(String(e)));
    // The pages run under a Content-Security-Policy: anything it blocks is an error too.
    page.on("console", (m) => {
      if (m.type() === "error" && /Content Security Policy/i.test(m.text())) out.errors.push(m.text());
    });
    page.on("response", (r) => {
      if (!r.url().includes("/tiles/")) return;
      if (r.status() !== 200) out.tiles.failed += 1;
      else out.tiles[r.headers()["x-tile-source"]] = (out.tiles[r.headers()["x-tile-source"]] || 0) + 1;
    });
    // 1. Log in.
    await page.goto(base + "/login");
    await page.fill('input[name="username"]', env("USERNAME"));
    await page.fill('input[name="password"]', env("PASSWORD"));
    await Promise.all([page.waitForURL(base + "/"), page.click('button[type="submit"]')]);
    const row = page.locator(`tr[data-series="${series}"]`);
    await row.waitFor();
    out.worklist_status = (await row.locator("td.status").textContent()).trim();
    await page.screenshot({ path: path.join(shots, "worklist.png") });
    // 2. Open the slide: tiles load, overlays draw.
    await Promise.all([page.waitForURL(/\/slides\//), row.locator("a.open-slide").click()]);
    await page.waitForFunction(() => window.cytonodeSlide && window.cytonodeSlide.ready
      && window.cytonodeSlide.tilesLoaded > 0, null, { timeout: 30000 });
    await page.waitForTimeout(1000);  // let the first level's tiles finish
    out.slide = await page.evaluate(() => Object.assign({}, window.cytonodeSlide));
    out.overlays_visible = await page.locator(".cell-box").evaluateAll(
      (nodes) => nodes.filter((n) => n.getBoundingClientRect().width > 2).length);
    await page.selectOption("#heatmap-kind", { index: 1 });
    await page.waitForFunction(() => window.cytonodeSlide.heatmap || window.cytonodeSlide.heatmapError);
    await page.waitForTimeout(500);
    out.heatmap = await page.evaluate(() => window.cytonodeSlide.heatmap || window.cytonodeSlide.heatmapError);
    await page.screenshot({ path: path.join(shots, "slide.png") });
    // 3. Click a flagged cell's outline: the review opens on that cell.
    const box = page.locator(".cell-box.flagged").first();
    const cellId = await box.getAttribute("data-cell");
    await Promise.all([page.waitForURL(/\/cases\/.*#cell-/), box.click()]);
    await page.waitForFunction(() => window.cytonodeReview && window.cytonodeReview.rendered > 0);
    const card = page.locator(`#cell-${cellId}`);
    await card.waitFor();
    out.cell_id = Number(cellId);
    out.selected = await card.evaluate((n) => n.classList.contains("selected"));
    const before = await card.getAttribute("data-label");
    // 4. Reclassify with the keyboard: key n is the n-th class; pick one that differs.
    const classes = ["neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte", "ig",
      "erythroblast", "platelet"];
    const target = before === "monocyte" ? "lymphocyte" : "monocyte";
    await page.keyboard.press(String(classes.indexOf(target) + 1));
    await page.waitForFunction(([id, label]) => {
      const n = document.getElementById("cell-" + id);
      return n && n.dataset.label === label;
    }, [cellId, target]);
    out.reclassified = { from: before, to: target,
      changes: await page.evaluate(() => window.cytonodeReview.changes) };
    const diff = await page.locator(`#differential tr[data-label="${target}"] td.count`).textContent();
    out.differential_count = Number(diff);
    await page.screenshot({ path: path.join(shots, "review.png"), fullPage: true });
    // 5. Sign off with the password.
    await page.goto(base + "/cases/" + series + "/signoff");
    await page.fill('#signoff-form input[name="password"]', env("PASSWORD"));
    await Promise.all([page.waitForLoadState("load"), page.click('#signoff-form button[type="submit"]')]);
    await page.locator("#signed-note").waitFor();
    await page.screenshot({ path: path.join(shots, "signoff.png"), fullPage: true });
    const versions = await page.evaluate(async (s) => (await fetch("/api/cases/" + s + "/versions")).json(), series);
    out.versions = versions.versions;
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((e) => { process.stderr.write(String(e && e.stack || e) + "\n"); process.exit(1); });
