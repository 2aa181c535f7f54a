// Browser test of the viewer: headless Chromium driven by playwright-core (run by test_browser.py).
// Logs in, opens the case from the worklist, waits for tiles and cell overlays, opens a cell by
// clicking its outline, reclassifies it with the keyboard, tries to sign with flagged cells nobody
// looked at (refused without the confirmation, by the form and by the server), signs with it, and
// prints what happened as JSON, with the patient identity each case page shows.
// Environment: BASE_URL, SERIES, USERNAME, PASSWORD, CHROMIUM, SCREENSHOTS (a folder).
"use strict";
const path = require("path");
const { chromium } = require("playwright-core");

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};

// What the case header of the page says about the patient and the slide.
const identity = (page) => page.evaluate(() => Object.fromEntries(
  ["patient-name", "patient-id", "accession-number", "slide-id", "flag-count"].map(
    (id) => [id, (document.getElementById(id) || {}).textContent || null])));

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
    out.identity = { slide: await identity(page) };
    out.slide_note = await page.locator("#differential-note").textContent();
    out.overlays_visible = await page.locator(".cell-box").evaluateAll(
      (nodes) => nodes.filter((n) => n.getBoundingClientRect().width > 2).length);
    await page.selectOption("#heatmap-kind", { index: 1 });
    await page.waitForFunction(() => window.cytonodeSlide.heatmap || window.cytonodeSlide.heatmapError);
    await page.waitForTimeout(500);
    out.heatmap = await page.evaluate(() => window.cytonodeSlide.heatmap || window.cytonodeSlide.heatmapError);
    await page.screenshot({ path: path.join(shots, "slide.png") });
    // 3. Click a cell's outline (one not flagged, so the flagged ones stay unreviewed): the review
    //    opens on that cell.
    const plain = page.locator(".cell-box:not(.flagged)");
    const box = (await plain.count()) ? plain.first() : page.locator(".cell-box").first();
    const cellId = await box.getAttribute("data-cell");
    await Promise.all([page.waitForURL(/\/cases\/.*#cell-/), box.click()]);
    await page.waitForFunction(() => window.cytonodeReview && window.cytonodeReview.rendered > 0);
    const card = page.locator(`#cell-${cellId}`);
    await card.waitFor();
    out.cell_id = Number(cellId);
    out.selected = await card.evaluate((n) => n.classList.contains("selected"));
    out.identity.review = await identity(page);
    const flaggedCard = page.locator(".cell-card.flagged").first();
    out.card = {
      number: (await card.locator(".number").textContent()).trim(),
      buttons: await card.locator("button.cls").allTextContents(),
      flagged_id: Number(await flaggedCard.getAttribute("data-cell")),
      flagged_number: (await flaggedCard.locator(".number").textContent()).trim(),
      flagged_reasons: await flaggedCard.locator(".flags li.reason").allTextContents(),
      flagged_unseen: await flaggedCard.evaluate((n) => n.classList.contains("unseen")),
    };
    await page.waitForFunction(() => window.cytonodeReview.seen > 0);  // opening it recorded the look
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
      changes: await page.evaluate(() => window.cytonodeReview.changes),
      changes_text: await page.locator("#changes-text").textContent() };
    const diff = await page.locator(`#differential tr[data-label="${target}"] td.count`).textContent();
    out.differential_count = Number(diff);
    await page.screenshot({ path: path.join(shots, "review.png"), fullPage: true });
    // 5. Sign off with the password: flagged cells nobody looked at need the confirmation.
    await page.goto(base + "/cases/" + series + "/signoff");
    out.identity.signoff = await identity(page);
    out.signoff_note = await page.locator("#differential-note").textContent();
    const unreviewed = await page.locator("#unreviewed-list li").allTextContents();
    out.unreviewed = unreviewed.map((t) => t.replace(/\s+/g, " ").trim());
    await page.fill('#signoff-form input[name="password"]', env("PASSWORD"));
    if (unreviewed.length) {
      // a. the form does not send without the box ticked
      await page.click('#signoff-form button[type="submit"]');
      await page.waitForTimeout(500);
      out.blocked_by_form = await page.evaluate(() => !document.getElementById("signed-note")
        && document.getElementById("confirm-unreviewed").validity.valueMissing);
      // b. the server refuses it too (the box's "required" removed, as a forged request would)
      await page.evaluate(() => document.getElementById("confirm-unreviewed").removeAttribute("required"));
      const [refused] = await Promise.all([
        page.waitForResponse((r) => r.url().endsWith("/signoff") && r.request().method() === "POST"),
        page.click('#signoff-form button[type="submit"]')]);
      await page.waitForLoadState("load");
      out.refused = { status: refused.status(), error: (await page.locator("p.error").textContent()).trim(),
        signed: await page.locator("#signed-note").count() > 0 };
      await page.screenshot({ path: path.join(shots, "signoff-refused.png"), fullPage: true });
      // c. with the confirmation it signs
      await page.fill('#signoff-form input[name="password"]', env("PASSWORD"));
      await page.check("#confirm-unreviewed");
    }
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
