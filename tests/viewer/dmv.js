// Browser test of the dicom-microscopy-viewer page (run by test_dmv.py): headless Chromium driven
// by playwright-core. Opens PAGE_URL (after logging in at LOGIN_URL when USERNAME is set), waits for
// the slide's tiles, every annotation group's features and the segmentation's tiles, fits the slide
// into the viewport and screenshots the viewport in four states: slide only (base), cells
// (annotations), heatmap (segments), all layers (SR regions too); then the whole page for the docs. Maps the image points of
// POINTS_FILE (JSON [[x, y], ...], base-level pixels) to viewport pixels with the page's
// imageToScreen, and prints the page's state and those pixels as JSON.
// Environment: PAGE_URL, CHROMIUM, SCREENSHOTS (a folder), NAME (a prefix of the screenshots),
// POINTS_FILE; optional LOGIN_URL, USERNAME, PASSWORD.
"use strict";
const fs = require("fs");
const path = require("path");
const { chromium } = require("playwright-core");

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};

async function main() {
  const shots = env("SCREENSHOTS"), name = env("NAME");
  const points = JSON.parse(fs.readFileSync(env("POINTS_FILE"), "utf8"));
  // WebGL (the library draws tiles with OpenLayers' WebGL layers) from SwiftShader, on the CPU.
  const browser = await chromium.launch({ executablePath: env("CHROMIUM"), headless: true,
    args: ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
      "--ignore-gpu-blocklist"] });
  const out = { errors: [], console_errors: [], failed_requests: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.on("pageerror", (e) => out.errors.push(String(e)));
    page.on("crash", () => out.errors.push("page crashed"));
    page.on("console", (m) => {
      if (m.type() === "error") out.console_errors.push(m.text().slice(0, 500));
      // The page runs under a Content-Security-Policy: anything it blocks is an error too.
      if (/Content Security Policy/i.test(m.text())) out.errors.push(m.text().slice(0, 500));
    });
    page.on("response", (r) => {
      if (r.status() >= 400) out.failed_requests.push(`${r.status()} ${r.url()}`);
    });
    if (process.env.USERNAME) {
      await page.goto(env("LOGIN_URL"));
      await page.fill('input[name="username"]', env("USERNAME"));
      await page.fill('input[name="password"]', env("PASSWORD"));
      await Promise.all([page.waitForLoadState("load"), page.click('button[type="submit"]')]);
    }
    await page.goto(env("PAGE_URL"));
    await page.waitForFunction(() => {
      const s = window.cytonodeDmv;
      return s && (s.error || (s.ready && s.tilesLoaded > 0));
    }, null, { timeout: 60000 }).catch(async (e) => {
      const s = await page.evaluate(() => JSON.stringify(window.cytonodeDmv || null, (k, v) => (k === "viewer" ? undefined : v)).slice(0, 3000));
      throw new Error(`${e.message}; page state ${s}; ${JSON.stringify(out).slice(0, 3000)}`);
    });
    const early = await page.evaluate(() => window.cytonodeDmv.error);
    if (early) throw new Error("page: " + early + " " + JSON.stringify(out));
    await page.evaluate(() => window.cytonodeDmv.fit());
    // Every group's features loaded and the heatmap's tiles in, at the fitted view.
    await page.waitForFunction(() => {
      const s = window.cytonodeDmv;
      return s.annotationGroups.every((g) => s.annotationsLoaded[g.uid] !== undefined)
        && (s.segments.length === 0 || s.segmentTilesLoaded > 0);
    }, null, { timeout: 60000 }).catch(() => {});
    const viewport = page.locator("#dmv-viewport");
    const shoot = async (state, annotations, segments, rois) => {
      await page.evaluate(async ([a, s, r]) => {
        const d = window.cytonodeDmv;
        d.showAnnotations(a); d.showSegments(s); d.showROIs(r);
        await d.render();
      }, [annotations, segments, rois]);
      await page.waitForTimeout(1500);  // tiles of a newly shown layer, then a settled frame
      await page.evaluate(() => window.cytonodeDmv.render());
      await viewport.screenshot({ path: path.join(shots, `${name}-${state}.png`) });
    };
    await shoot("base", false, false, false);
    await shoot("annotations", true, false, false);
    await shoot("segments", false, true, false);
    await shoot("all", true, true, true);
    // For the documentation: cells, the SR's flagged cells and the first heatmap, half opaque.
    await page.evaluate(async () => {
      const d = window.cytonodeDmv;
      d.showSegments(1, 0.45);
      await d.render();
    });
    await page.waitForTimeout(1000);
    await page.screenshot({ path: path.join(shots, `${name}.png`) });
    out.state = await page.evaluate(() => {
      const s = window.cytonodeDmv;
      return { ready: s.ready, error: s.error, errors: s.errors, slide: s.slide,
        tilesLoaded: s.tilesLoaded, tilesFailed: s.tilesFailed,
        segmentTilesLoaded: s.segmentTilesLoaded, segmentTilesFailed: s.segmentTilesFailed,
        annotationGroups: s.annotationGroups, annotationsLoaded: s.annotationsLoaded,
        segments: s.segments, rois: s.rois, status: document.getElementById("dmv-status").textContent };
    });
    out.screen = await page.evaluate((pts) => pts.map(([x, y]) => window.cytonodeDmv.imageToScreen(x, y)),
      points);
    out.origin = await page.evaluate(() => [window.cytonodeDmv.imageToScreen(0, 0),
      window.cytonodeDmv.imageToScreen(window.cytonodeDmv.slide.columns, window.cytonodeDmv.slide.rows)]);
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((e) => { process.stderr.write(String(e && e.stack || e) + "\n"); process.exit(1); });
